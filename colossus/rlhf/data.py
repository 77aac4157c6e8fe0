"""RLHF data: the JSONL formats, their tokenisation and collators, and the built-in demo task.

Formats (one JSON object per line, UTF-8):

- SFT: ``{"prompt": str, "response": str}`` -- the loss is taken on the response tokens only.
- preferences (reward model, DPO): ``{"prompt": str, "chosen": str, "rejected": str}``.
- prompts (PPO): ``{"prompt": str}``.

Prompt and response are tokenised separately and concatenated, so the boundary a model sees in
training is the one it sees when it generates a response after the prompt.

The demo task (no download) is cut from the Python standard library: a prompt is a function's
signature and the first line of its docstring; the chosen continuation is the function's first
statement (one line, which ``ast.parse``s in context); the rejected one is the same line corrupted
(truncated, a bracket dropped or added, the indentation lost) so that it does not parse.

Example::

    from colossus.rlhf.data import write_demo_data, read_jsonl
    files = write_demo_data("data/rlhf-demo", n_examples=500)
    pairs = read_jsonl(files["pairs-train"], ("prompt", "chosen", "rejected"))
    assert parses_in_context(pairs[0]["prompt"], pairs[0]["chosen"])
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import random
import textwrap
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from colossus.data._cache import file_lock
from colossus.data.collators import IGNORE_INDEX
from colossus.data.corpus import stdlib_files
from colossus.errors import ConfigError

SFT_KEYS = ("prompt", "response")
PAIR_KEYS = ("prompt", "chosen", "rejected")
PROMPT_KEYS = ("prompt",)
DEMO_KINDS = {"sft": SFT_KEYS, "pairs": PAIR_KEYS, "prompts": PROMPT_KEYS}
# Bumped when the demo generator changes, so files written by older code are regenerated.
_DEMO_FORMAT = 2


# ---- JSONL --------------------------------------------------------------------------------


def read_jsonl(path: str | Path, keys: Sequence[str]) -> list[dict[str, str]]:
    """Records of a JSONL file, each checked to hold string values for ``keys``."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"rlhf data: {p} does not exist")
    out = []
    with open(p, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{p}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(obj, dict):
                raise ConfigError(f"{p}:{lineno}: expected a JSON object")
            missing = [k for k in keys if not isinstance(obj.get(k), str)]
            if missing:
                raise ConfigError(
                    f"{p}:{lineno}: needs string field(s) {missing}; this stage reads "
                    f"{{{', '.join(repr(k) for k in keys)}}}, found keys {sorted(obj)}"
                )
            out.append({k: obj[k] for k in keys})
    if not out:
        raise ConfigError(f"rlhf data: {p} holds no records")
    return out


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


# ---- the demo task ------------------------------------------------------------------------


def parses_in_context(prompt: str, continuation: str) -> bool:
    """Whether the continuation's first line completes the prompt into valid Python."""
    line = continuation.split("\n", 1)[0]
    try:
        with warnings.catch_warnings():  # stdlib code has invalid escapes in old strings
            warnings.simplefilter("ignore")
            ast.parse(prompt + line + "\n")
    except (SyntaxError, ValueError):
        return False
    return True


def _prompt_of(fn: ast.FunctionDef | ast.AsyncFunctionDef, lines: list[str]) -> str | None:
    """``def ...:`` (one source line) + the docstring's first line, closed; None if unusable."""
    header = lines[fn.lineno - 1]
    if not header.rstrip().endswith(":"):  # a signature over several lines: skip
        return None
    indent = len(header) - len(header.lstrip())
    out = header.rstrip()[indent:] + "\n"
    doc = _docstring(fn)
    if doc is not None:
        first = doc.strip().split("\n", 1)[0].strip().replace("\\", "")
        if not first or '"' in first:
            return None
        out += f'    """{first}"""\n'
    return out


def _docstring(fn: ast.AST) -> str | None:
    try:
        return ast.get_docstring(fn, clean=True)
    except TypeError:
        return None


def _first_statement(fn: ast.FunctionDef | ast.AsyncFunctionDef, lines: list[str]) -> str | None:
    body = fn.body[1:] if _docstring(fn) is not None else fn.body
    if not body:
        return None
    st = body[0]
    if st.lineno != st.end_lineno or isinstance(st, ast.Pass | ast.Expr):
        return None  # multi-line statements, and bare `pass` / expressions, teach little
    line = lines[st.lineno - 1].rstrip()
    indent = len(line) - len(line.lstrip())
    return "    " + line[indent:] + "\n"


def _corrupt(line: str, rng: random.Random, prompt: str, tries: int = 6) -> str | None:
    """A near miss of ``line`` that does not parse after ``prompt`` (what a weak model writes):
    truncated, a bracket dropped, added or left open, a stray quote, or the indentation lost."""
    body = line[4:].rstrip("\n")
    kinds = ["truncate", "drop_close", "add_open", "add_close", "quote", "dedent"]
    rng.shuffle(kinds)
    for kind in kinds[:tries]:
        if kind == "truncate" and len(body) > 4:
            cuts = list(range(2, len(body) - 1))
            rng.shuffle(cuts)
            for c in cuts[:8]:
                cand = "    " + body[:c] + "\n"
                if not parses_in_context(prompt, cand):
                    return cand
        elif kind == "drop_close":
            pos = [i for i, ch in enumerate(body) if ch in ")]}"]
            if pos:
                i = rng.choice(pos)
                cand = "    " + body[:i] + body[i + 1 :] + "\n"
                if not parses_in_context(prompt, cand):
                    return cand
        elif kind == "add_open":
            i = rng.randrange(1, len(body) + 1)
            cand = "    " + body[:i] + rng.choice("([{") + body[i:] + "\n"
            if not parses_in_context(prompt, cand):
                return cand
        elif kind == "add_close":  # an extra closing bracket, often where lines end
            i = len(body) if rng.random() < 0.5 else rng.randrange(1, len(body) + 1)
            cand = "    " + body[:i] + rng.choice(")]}") + body[i:] + "\n"
            if not parses_in_context(prompt, cand):
                return cand
        elif kind == "quote":  # an unterminated string
            i = rng.randrange(1, len(body) + 1)
            cand = "    " + body[:i] + rng.choice("\"'") + body[i:] + "\n"
            if not parses_in_context(prompt, cand):
                return cand
        elif kind == "dedent":
            cand = body + "\n"
            if not parses_in_context(prompt, cand):
                return cand
    return None


def demo_examples(
    n_examples: int = 3000, seed: int = 0, max_chars: int = 160, pairs_per_prompt: int = 2
) -> list[dict]:
    """``n_examples`` records ``{prompt, chosen, rejected: [str, ...]}`` from stdlib functions
    (up to ``pairs_per_prompt`` distinct corruptions each), in a fixed order (files shuffled by
    ``seed``, functions in source order)."""
    files = stdlib_files()
    random.Random(seed).shuffle(files)
    rng = random.Random(seed + 1)
    out: list[dict] = []
    seen: set[str] = set()
    for path in files:
        try:
            src = path.read_text(encoding="utf-8")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                tree = ast.parse(src)
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        lines = src.splitlines()
        for node in ast.walk(tree):
            if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            prompt = _prompt_of(node, lines)
            chosen = _first_statement(node, lines) if prompt else None
            if not prompt or not chosen or len(prompt) + len(chosen) > max_chars:
                continue
            prompt = textwrap.dedent(prompt)
            if prompt in seen or not parses_in_context(prompt, chosen):
                continue
            rejected = [_corrupt(chosen, rng, prompt) for _ in range(pairs_per_prompt)]
            rejected = list(dict.fromkeys(r for r in rejected if r is not None))
            if not rejected:
                continue
            seen.add(prompt)
            out.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
            if len(out) >= n_examples:
                return out
    return out


def write_demo_data(
    out_dir: str | Path,
    n_examples: int = 3000,
    eval_fraction: float = 0.1,
    seed: int = 0,
    max_chars: int = 160,
) -> dict[str, Path]:
    """Write the demo task's JSONL files (``sft-``, ``pairs-``, ``prompts-`` x ``train``,
    ``eval``) into ``out_dir`` and return their paths. Deterministic; a directory already
    holding the files of the same settings is reused (several ranks may call this at once)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ident = json.dumps([_DEMO_FORMAT, n_examples, eval_fraction, seed, max_chars])
    stamp = out / "demo.json"
    files = {f"{k}-{s}": out / f"{k}-{s}.jsonl" for k in DEMO_KINDS for s in ("train", "eval")}
    with file_lock(out / ".demo.lock"):
        if (
            stamp.is_file()
            and stamp.read_text() == ident
            and all(f.is_file() for f in files.values())
        ):
            return files
        ex = demo_examples(n_examples, seed, max_chars)
        if len(ex) < 10:
            raise ConfigError(f"demo task: only {len(ex)} examples found in the stdlib")
        # split by a hash of the prompt: stable when n_examples changes
        is_eval = [
            int(hashlib.blake2b(e["prompt"].encode(), digest_size=8).hexdigest(), 16) / 2**64
            < eval_fraction
            for e in ex
        ]
        for split, want in (("train", False), ("eval", True)):
            part = [e for e, v in zip(ex, is_eval) if v == want]
            write_jsonl(
                files[f"sft-{split}"],
                [{"prompt": e["prompt"], "response": e["chosen"]} for e in part],
            )
            pairs = [{**e, "rejected": r} for e in part for r in e["rejected"]]
            write_jsonl(files[f"pairs-{split}"], pairs)
            write_jsonl(files[f"prompts-{split}"], [{"prompt": e["prompt"]} for e in part])
        stamp.write_text(ident)
    return files


def resolve_files(rlhf: Any, kind: str) -> tuple[Path, Path | None]:
    """(train, eval) JSONL paths of a stage: ``kind`` is ``sft``, ``pairs`` or ``prompts``."""
    if rlhf.data == "demo":
        d = rlhf.demo
        files = write_demo_data(d.out_dir, d.n_examples, d.eval_fraction, d.seed)
        return files[f"{kind}-train"], files[f"{kind}-eval"]
    return Path(rlhf.data), Path(rlhf.eval_data) if rlhf.eval_data else None


# ---- tokenisation -------------------------------------------------------------------------


def _ids(tok: Any, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def encode_prompt(tok: Any, prompt: str, max_prompt_tokens: int) -> list[int]:
    ids = _ids(tok, prompt)[-max_prompt_tokens:]  # the end of a prompt is what matters most
    if not ids:
        raise ConfigError(f"rlhf data: a prompt encodes to no tokens: {prompt!r}")
    return ids


def encode_sft(
    tok: Any, prompt: str, response: str, max_prompt: int, max_response: int
) -> dict[str, torch.Tensor]:
    """``input_ids`` = prompt + response tokens; ``labels`` = -100 on the prompt, ids after."""
    p = encode_prompt(tok, prompt, max_prompt)
    r = _ids(tok, response)[:max_response]
    ids = torch.tensor(p + r, dtype=torch.long)
    labels = ids.clone()
    labels[: len(p)] = IGNORE_INDEX
    return {"input_ids": ids, "labels": labels}


def encode_pair(
    tok: Any, prompt: str, chosen: str, rejected: str, max_prompt: int, max_response: int
) -> dict[str, torch.Tensor]:
    c = encode_sft(tok, prompt, chosen, max_prompt, max_response)
    r = encode_sft(tok, prompt, rejected, max_prompt, max_response)
    return {
        "chosen_input_ids": c["input_ids"],
        "chosen_labels": c["labels"],
        "rejected_input_ids": r["input_ids"],
        "rejected_labels": r["labels"],
    }


def pad_right(rows: Sequence[torch.Tensor], value: int) -> torch.Tensor:
    n = max(r.numel() for r in rows)
    out = torch.full((len(rows), n), value, dtype=rows[0].dtype)
    for i, r in enumerate(rows):
        out[i, : r.numel()] = r
    return out


def pad_left(rows: Sequence[torch.Tensor], value: int) -> torch.Tensor:
    n = max(r.numel() for r in rows)
    out = torch.full((len(rows), n), value, dtype=rows[0].dtype)
    for i, r in enumerate(rows):
        out[i, n - r.numel() :] = r
    return out


class SFTCollator:
    """Right-padded ``input_ids`` / ``attention_mask`` / ``labels`` (-100 on prompt and pad)."""

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, items: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        ids = pad_right([x["input_ids"] for x in items], self.pad_token_id)
        mask = pad_right([torch.ones_like(x["input_ids"]) for x in items], 0)
        labels = pad_right([x["labels"] for x in items], IGNORE_INDEX)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


class PairCollator:
    """Both sides of each preference pair, right-padded: ``{chosen,rejected}_{input_ids,
    attention_mask,labels}`` (labels -100 on prompt and pad), plus any per-pair float fields
    (the DPO reference log-probabilities)."""

    def __init__(self, pad_token_id: int) -> None:
        self.sft = SFTCollator(pad_token_id)

    def __call__(self, items: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for side in ("chosen", "rejected"):
            b = self.sft(
                [
                    {"input_ids": x[f"{side}_input_ids"], "labels": x[f"{side}_labels"]}
                    for x in items
                ]
            )
            out |= {f"{side}_{k}": v for k, v in b.items()}
        for k, v in items[0].items():
            if v.ndim == 0:
                out[k] = torch.stack([x[k] for x in items])
        return out
