"""Turn a training checkpoint back into a Hugging Face model: for ``colossus export`` (a folder
that ``AutoModelFor*.from_pretrained`` loads) and ``colossus generate``.

Example::

    from colossus.export import export_checkpoint
    export_checkpoint("runs/gpt2-tiny-.../checkpoints/step-00000200", "exported/gpt2-tiny")
    # AutoModelForCausalLM.from_pretrained("exported/gpt2-tiny")
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_model
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    PreTrainedTokenizerFast,
)

from colossus.checkpoint import load_json, verify_checkpoint
from colossus.errors import CheckpointError, ConfigError


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


def export_checkpoint(path: str | Path, out_dir: str | Path, force: bool = False) -> Path:
    """Write a ``save_pretrained`` folder (safetensors weights, config, tokenizer) atomically."""
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not force:
        raise ConfigError(f"export: {out} exists and is not empty (pass --force to replace it)")
    model, tok = load_checkpoint_model(path)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
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
