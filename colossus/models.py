"""Build a Hugging Face model from the ``model`` section: an architecture plus config overrides
(no download: weights are initialised from the seed), or a local ``from_pretrained`` directory."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM, PretrainedConfig

from colossus.config import ModelConfig
from colossus.errors import ConfigError


def _auto_class(task: str):
    return AutoModelForMaskedLM if task == "masked_lm" else AutoModelForCausalLM


def build_hf_config(cfg: ModelConfig, vocab_size: int | None = None) -> PretrainedConfig:
    try:
        hf_cfg = AutoConfig.for_model(cfg.arch)
    except ValueError:
        raise ConfigError(
            f"model.arch: unknown Hugging Face architecture {cfg.arch!r} (e.g. gpt2, bert, llama)"
        ) from None
    overrides = dict(cfg.config)
    if vocab_size is not None:
        overrides.setdefault("vocab_size", vocab_size)
    for k, v in overrides.items():
        if not hasattr(hf_cfg, k) and k not in hf_cfg.attribute_map:
            raise ConfigError(f"model.config.{k}: {type(hf_cfg).__name__} has no attribute {k!r}")
        setattr(hf_cfg, k, v)
    # Llama-family configs derive head_dim = hidden_size / num_attention_heads in __init__: a
    # default derived that way must follow the overrides (not stay 4096 / 32 = 128)
    default = AutoConfig.for_model(cfg.arch)
    hd, h, a = "head_dim", "hidden_size", "num_attention_heads"
    if hd not in overrides and getattr(default, hd, None) and getattr(default, a, None):
        if default.head_dim == getattr(default, h, 0) // default.num_attention_heads:
            hf_cfg.head_dim = getattr(hf_cfg, h) // getattr(hf_cfg, a)
    return hf_cfg


def build_model(cfg: ModelConfig, vocab_size: int | None = None, tokenizer=None) -> nn.Module:
    """Instantiate the model on CPU in fp32 (the strategy moves it). ``vocab_size`` comes from
    the trained tokenizer unless ``model.config.vocab_size`` says otherwise."""
    auto = _auto_class(cfg.resolved_task)
    if cfg.lazy_init:
        return _build_lazy(cfg, auto, vocab_size, tokenizer)
    if cfg.path:
        p = Path(cfg.path).expanduser()
        if not (p / "config.json").is_file():
            raise ConfigError(f"model.path: {p} is not a model directory (no config.json)")
        model = auto.from_pretrained(p, dtype=torch.float32)
    else:
        hf_cfg = build_hf_config(cfg, vocab_size)
        _apply_special_tokens(hf_cfg, tokenizer)
        model = auto.from_config(hf_cfg, dtype=torch.float32)
    if cfg.gradient_checkpointing:
        _enable_checkpointing(model)
    return model


def _apply_special_tokens(hf_cfg: PretrainedConfig, tokenizer) -> None:
    if tokenizer is None:
        return
    for attr in ("pad_token_id", "bos_token_id", "eos_token_id"):
        tid = getattr(tokenizer, attr, None)
        if tid is not None and hasattr(hf_cfg, attr):
            setattr(hf_cfg, attr, tid)


def _enable_checkpointing(model: nn.Module) -> None:
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def _build_lazy(cfg: ModelConfig, auto, vocab_size: int | None, tokenizer) -> nn.Module:
    """Parameters on ``meta`` (buffers real): strategy chunk materialises them chunk by chunk.
    From a local checkpoint the weights stream tensor by tensor (``colossus_param_source``)."""
    from accelerate import init_empty_weights

    from offload.lazy import SafetensorsSource

    source = None
    if cfg.path:
        p = Path(cfg.path).expanduser()
        if not (p / "config.json").is_file():
            raise ConfigError(f"model.path: {p} is not a model directory (no config.json)")
        hf_cfg = AutoConfig.from_pretrained(p)
        try:
            source = SafetensorsSource(p)
        except FileNotFoundError as e:
            raise ConfigError(f"model.path with lazy_init needs safetensors weights: {e}") from None
    else:
        hf_cfg = build_hf_config(cfg, vocab_size)
        _apply_special_tokens(hf_cfg, tokenizer)
    with init_empty_weights():
        model = auto.from_config(hf_cfg, dtype=torch.float32)
    model.tie_weights()
    if source is not None:
        source.prefix = getattr(model, "base_model_prefix", "")
        model.colossus_param_source = source
    if cfg.gradient_checkpointing:
        _enable_checkpointing(model)
    return model


def count_parameters(model: nn.Module) -> int:
    seen: set[int] = set()
    n = 0
    for p in model.parameters():  # parameters() already skips tied duplicates
        if id(p) not in seen:
            seen.add(id(p))
            n += p.numel()
    return n
