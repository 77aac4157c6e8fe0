"""Text corpora: the built-in Python standard library, or the user's text / JSONL files.

Example::

    from colossus.config import DataConfig
    from colossus.data.corpus import load_documents
    train_docs, val_docs = load_documents(DataConfig(max_chars=200_000))
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path

from colossus.config import DataConfig
from colossus.errors import ConfigError

STDLIB = "python-stdlib"

# Bumped when the way documents are read or split changes, so old caches are not reused.
_CORPUS_FORMAT = 1

# Test suites are mostly fixtures and odd encodings, not representative code; site-packages is
# whatever the user installed, which would make the "built-in" corpus differ between machines.
_EXCLUDED_PARTS = frozenset(
    {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
)


def _stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files() -> list[Path]:
    """The running interpreter's standard-library ``.py`` sources, without test code.

    Sorted by path relative to the stdlib directory (posix form), so every process on every
    machine with the same Python lists them in the same order.
    """
    root = _stdlib_dir()
    found: list[tuple[str, Path]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        # Prune in place so os.walk never descends into excluded trees (site-packages can be big).
        dirnames[:] = [d for d in dirnames if d not in _EXCLUDED_PARTS]
        for name in filenames:
            if name.endswith(".py"):
                p = Path(dirpath) / name
                found.append((p.relative_to(root).as_posix(), p))
    found.sort(key=lambda t: t[0])
    return [p for _, p in found]


@dataclass(frozen=True)
class _Source:
    path: Path
    doc_id: str  # stable name used for the train/val split


def _corpus_patterns(cfg: DataConfig) -> list[str]:
    return [cfg.corpus] if isinstance(cfg.corpus, str) else list(cfg.corpus)


def _resolve_sources(cfg: DataConfig) -> list[_Source]:
    """Expand ``cfg.corpus`` into files, in a deterministic order, without reading them."""
    patterns = _corpus_patterns(cfg)
    if not patterns:
        raise ConfigError("data.corpus is empty: give 'python-stdlib' or paths / globs of files")
    sources: list[_Source] = []
    seen: set[Path] = set()
    for pat in patterns:
        if pat == STDLIB:
            root = _stdlib_dir()
            # The stdlib doc ids are relative paths, so the split is the same on every machine.
            matched = [(p, f"{STDLIB}/{p.relative_to(root).as_posix()}") for p in stdlib_files()]
            if not matched:
                raise ConfigError(f"data.corpus: no standard-library sources found under {root}")
        else:
            expanded = os.path.expanduser(pat)
            if glob.has_magic(expanded):
                hits = sorted(glob.glob(expanded, recursive=True))
                files = [Path(h) for h in hits if os.path.isfile(h)]
            elif os.path.isdir(expanded):
                raise ConfigError(
                    f"data.corpus: {pat!r} is a directory; give files or a glob, "
                    f"e.g. '{pat.rstrip('/')}/**/*.txt'"
                )
            else:
                files = [Path(expanded)] if os.path.isfile(expanded) else []
            if not files:
                raise ConfigError(f"data.corpus: {pat!r} matches no files")
            matched = [(p, str(p)) for p in files]
        for p, doc_id in matched:
            key = p.resolve()
            if key not in seen:  # overlapping globs must not duplicate documents
                seen.add(key)
                sources.append(_Source(p, doc_id))
    return sources


def _read_jsonl(path: Path, text_field: str, doc_id: str):
    """Yield ``(doc_id, text)`` per non-blank line; a malformed line is a ConfigError."""
    with open(path, encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(obj, dict):
                raise ConfigError(
                    f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}"
                )
            if text_field not in obj:
                keys = ", ".join(map(str, list(obj)[:10])) or "none"
                raise ConfigError(
                    f"{path}:{lineno}: no field {text_field!r} (data.text_field); "
                    f"keys on this line: {keys}"
                )
            text = obj[text_field]
            if not isinstance(text, str):
                raise ConfigError(
                    f"{path}:{lineno}: field {text_field!r} is {type(text).__name__}, not a string"
                )
            yield f"{doc_id}:{lineno}", text


def _iter_documents(cfg: DataConfig, sources: list[_Source]):
    for src in sources:
        if src.path.suffix == ".jsonl":
            yield from _read_jsonl(src.path, cfg.text_field, src.doc_id)
        else:
            yield src.doc_id, src.path.read_text(encoding="utf-8", errors="replace")


def _unit_hash(doc_id: str) -> float:
    """A stable value in [0, 1) per document (Python's hash() is salted per process)."""
    digest = hashlib.blake2b(doc_id.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def _split(docs: list[tuple[str, str]], fraction: float) -> list[bool]:
    """Which documents go to validation (see ``load_documents``)."""
    hashes = [_unit_hash(doc_id) for doc_id, _ in docs]
    is_val = [h < fraction for h in hashes]
    if fraction <= 0 or len(docs) < 2:
        return [False] * len(docs)
    # A few documents can leave the hash rule with a tiny val set (one 200-char file that packs
    # into zero blocks), so top it up, in hash order, to its share of the characters; skipping
    # documents that would overshoot to twice the target keeps one huge file from taking it all.
    total = sum(len(t) for _, t in docs)
    target = fraction * total
    val_chars = sum(len(t) for (_, t), v in zip(docs, is_val) if v)
    n_train = is_val.count(False)
    for i in sorted(range(len(docs)), key=hashes.__getitem__):
        if val_chars >= target or n_train <= 1:
            break
        size = len(docs[i][1])
        if is_val[i] or (val_chars > 0 and val_chars + size > 2 * target):
            continue
        is_val[i] = True
        val_chars += size
        n_train -= 1
    if all(is_val):  # only possible when the hash rule alone took everything
        is_val[max(range(len(docs)), key=hashes.__getitem__)] = False
    return is_val


def load_documents(cfg: DataConfig) -> tuple[list[str], list[str]]:
    """Read the corpus and split it into ``(train_docs, val_docs)``.

    A document goes to validation when a stable hash of its name (file path, plus line number
    for JSONL) falls below ``cfg.val_fraction``, so the split barely moves when files are added
    or ``max_chars`` changes. When those documents hold less than ``val_fraction`` of the
    characters, the documents with the next-smallest hashes are added until they do. With
    ``val_fraction > 0`` and at least two documents, both sides get at least one document.
    Empty documents are skipped.
    """
    sources = _resolve_sources(cfg)
    docs: list[tuple[str, str]] = []
    total = 0
    for doc_id, text in _iter_documents(cfg, sources):
        if not text:
            continue
        if cfg.max_chars is not None:
            text = text[: cfg.max_chars - total]
        docs.append((doc_id, text))
        total += len(text)
        if cfg.max_chars is not None and total >= cfg.max_chars:
            break
    if not docs:
        raise ConfigError(f"data.corpus {cfg.corpus!r}: no non-empty documents")

    is_val = _split(docs, cfg.val_fraction)
    train = [t for (_, t), v in zip(docs, is_val) if not v]
    val = [t for (_, t), v in zip(docs, is_val) if v]
    return train, val


def corpus_fingerprint(cfg: DataConfig) -> str:
    """A hex digest of the corpus identity: which files (with sizes and mtimes), and the settings
    that change what is read from them. Used as a cache key; no file contents are read."""
    h = hashlib.blake2b(digest_size=16)
    ident = {
        "format": _CORPUS_FORMAT,
        "corpus": _corpus_patterns(cfg),
        "text_field": cfg.text_field,
        "max_chars": cfg.max_chars,
        "val_fraction": cfg.val_fraction,
    }
    h.update(json.dumps(ident, sort_keys=True).encode())
    for src in _resolve_sources(cfg):
        st = src.path.stat()
        h.update(f"\n{src.path.resolve()}\t{src.doc_id}\t{st.st_size}\t{st.st_mtime_ns}".encode())
    return h.hexdigest()
