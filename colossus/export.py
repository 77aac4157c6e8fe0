"""Turn a training checkpoint back into a Hugging Face model: for ``colossus export`` (a folder
that ``AutoModelFor*.from_pretrained`` loads) and ``colossus generate``.

Example::

    from colossus.export import export_checkpoint
    export_checkpoint("runs/gpt2-tiny-.../checkpoints/step-00000200", "exported/gpt2-tiny")
    # AutoModelForCausalLM.from_pretrained("exported/gpt2-tiny")
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import load_model, save_file
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    PreTrainedTokenizerFast,
)

from colossus.checkpoint import load_json, load_tensors, verify_checkpoint
from colossus.chunk_strategy import shard_files
from colossus.errors import CheckpointError, ConfigError
from offload.consolidate import ShardFormatError, ShardSet


def load_checkpoint_model(path: str | Path, device: str | torch.device = "cpu"):
    """(model, tokenizer or None) from a verified checkpoint directory."""
    p = Path(path)
    verify_checkpoint(p)
    if not (p / "config.json").is_file():
        raise CheckpointError(
            f"checkpoint {p} has no config.json (was the model a Hugging Face model?)"
        )
    state = load_json(p / "trainer_state.json")
    hf_cfg = AutoConfig.from_pretrained(p)
    auto = AutoModelForMaskedLM if state.get("task") == "masked_lm" else AutoModelForCausalLM
    model = auto.from_config(hf_cfg, dtype=torch.float32)
    if shard_files(p):  # strategy chunk: consolidate the rank shards
        missing, unexpected = model.load_state_dict(dict(iter_consolidated(p)), strict=False)
    elif (p / "tp_layout.json").is_file():  # strategy tp: concatenate the tensor-parallel shards
        missing, unexpected = model.load_state_dict(tp_consolidated(p), strict=False)
    else:
        missing, unexpected = load_model(
            model, str(p / "model.safetensors"), strict=False, device=str(device)
        )
    tied = set(getattr(model, "_tied_weights_keys", None) or {})
    if unexpected or [k for k in missing if k not in tied and not any(k.endswith(t) for t in tied)]:
        raise CheckpointError(
            f"checkpoint {p}: weights do not match config.json (missing {missing[:5]}, unexpected {unexpected[:5]})"
        )
    model.tie_weights()
    model.eval()
    tok = (
        PreTrainedTokenizerFast.from_pretrained(p / "tokenizer")
        if (p / "tokenizer").is_dir()
        else None
    )
    return model.to(device), tok


def tp_consolidated(path: str | Path) -> dict[str, torch.Tensor]:
    """The full Hugging Face state dict of a ``strategy.tp`` checkpoint (tp shards + layout)."""
    from colossus.tp_strategy import LAYOUT, tp_shard_files
    from parallel.policies import consolidate

    p = Path(path)
    files = tp_shard_files(p)
    try:
        return consolidate([load_tensors(f) for f in files], load_json(p / LAYOUT))
    except (ValueError, KeyError, RuntimeError) as e:
        raise CheckpointError(f"checkpoint {p}: tensor-parallel shards do not fit: {e}") from None


def iter_consolidated(path: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Every parameter (fp32, chunk by chunk) and persistent buffer of a ``chunk`` checkpoint."""
    p = Path(path)
    try:
        with ShardSet(shard_files(p)) as shards:
            yield from shards.iter_params()
    except ShardFormatError as e:
        raise CheckpointError(f"checkpoint {p}: {e}") from None
    if (p / "buffers.safetensors").is_file():
        yield from load_tensors(p / "buffers.safetensors").items()


def _write_streaming(
    tensors: Iterator[tuple[str, torch.Tensor]], out: Path, max_shard_bytes: int
) -> None:
    """HF's sharded safetensors layout (``model-0000i-of-0000n.safetensors`` + index), written
    as the tensors arrive: at most ``max_shard_bytes`` (or one tensor) is held at a time."""
    files: list[tuple[str, list[str]]] = []
    buf: dict[str, torch.Tensor] = {}
    size = total = 0

    def flush() -> None:
        nonlocal buf, size
        name = f"part-{len(files):05d}.safetensors"
        save_file(buf, str(out / name), metadata={"format": "pt"})
        files.append((name, list(buf)))
        buf, size = {}, 0

    for name, t in tensors:
        if buf and size + t.nbytes > max_shard_bytes:
            flush()
        buf[name] = t.contiguous()
        size += t.nbytes
        total += t.nbytes
    if buf or not files:
        flush()
    if len(files) == 1:
        os.replace(out / files[0][0], out / "model.safetensors")
        return
    n = len(files)
    weight_map = {}
    for i, (tmp_name, names) in enumerate(files):
        final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        os.replace(out / tmp_name, out / final)
        weight_map.update(dict.fromkeys(names, final))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))


def export_checkpoint(
    path: str | Path, out_dir: str | Path, force: bool = False, max_shard_bytes: int = 2 << 30
) -> Path:
    """Write a ``save_pretrained`` folder (safetensors weights, config, tokenizer) atomically.

    A ``chunk`` checkpoint is consolidated chunk by chunk into weight files of at most
    ``max_shard_bytes``: the whole model is never gathered in memory at once."""
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not force:
        raise ConfigError(f"export: {out} exists and is not empty (pass --force to replace it)")
    p = Path(path)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    if shard_files(p):
        verify_checkpoint(p)
        if not (p / "config.json").is_file():
            raise CheckpointError(f"checkpoint {p} has no config.json (not a Hugging Face model)")
        tmp.mkdir(parents=True)
        _write_streaming(iter_consolidated(p), tmp, max_shard_bytes)
        shutil.copy2(p / "config.json", tmp / "config.json")
        if (p / "tokenizer").is_dir():
            shutil.copytree(p / "tokenizer", tmp, dirs_exist_ok=True)
    else:
        model, tok = load_checkpoint_model(p)
        model.save_pretrained(tmp, safe_serialization=True)
        if tok is not None:
            tok.save_pretrained(tmp)
    if out.exists():
        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, out)
    return out


def generate_text(
    path: str | Path,
    prompt: str,
    max_new_tokens: int = 64,
    temperature: float = 0.8,
    top_k: int | None = 50,
    seed: int = 0,
) -> str:
    model, tok = load_checkpoint_model(path)
    if tok is None:
        raise CheckpointError(f"checkpoint {path} has no tokenizer/ folder; cannot encode a prompt")
    if not getattr(model.config, "is_decoder", True) and "MaskedLM" in type(model).__name__:
        raise ConfigError("generate needs a causal LM checkpoint; this one is a masked LM")
    torch.manual_seed(seed)
    ids = tok(prompt, return_tensors="pt")
    out = model.generate(
        **ids,
        max_new_tokens=max_new_tokens,
        do_sample=temperature > 0,
        temperature=temperature if temperature > 0 else None,
        top_k=top_k,
        pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
    )
    return tok.decode(out[0], skip_special_tokens=True)
