"""PPO under strategy ``chunk``: the four models in one memory budget (:class:`offload.MemoryPool`).

The actor and critic are trained through their own chunk managers (``strategy.chunk``'s
placement, ChunkAdamW); the reference and reward models are frozen chunk managers (parameters
only: no gradients, masters or optimizer state). All four join one pool whose device / host
budgets are ``strategy.chunk.device_budget`` / ``host_budget``. With ``rlhf.ppo.offload_frozen``
(default) the frozen models' parameter shards live on the host tier and are gathered to the device
chunk by chunk only while they score; every no-grad phase (generation, scoring) runs inside the
model's ``inference()``, which releases its gathered chunks when the phase ends, and a model that
needs device room first releases the idle gathered chunks of the others.

The same layout is built in dry-run (meta models, nothing allocated) for ``colossus plan`` and for
the check before a run: model state of all four + the largest working set of any one must fit.

Example::

    from colossus.config import TrainingConfig
    from colossus.rlhf.ppo_memory import plan_pool
    cfg = TrainingConfig.from_yaml("recipes/rlhf-ppo.yaml", ["strategy.name=chunk"])
    print(plan_pool(cfg, world_size=1).need())
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from colossus.config import ChunkStrategyConfig, TrainingConfig
from colossus.errors import ConfigError
from offload import ChunkManager, MemoryPool

TRAINED = ("actor", "critic")
FROZEN = ("reference", "reward")
MODELS = ("actor", "critic", "reference", "reward")


def chunk_section(cfg: TrainingConfig, name: str) -> ChunkStrategyConfig:
    """``strategy.chunk`` for model ``name``: as given for the trained models; for the frozen
    ones (with ``rlhf.ppo.offload_frozen``) parameter shards on the host tier."""
    cc = cfg.strategy.chunk
    if name in FROZEN and cfg.rlhf.ppo.offload_frozen:
        return cc.model_copy(update={"offload_param_frac": 1.0, "offload_optim_frac": 1.0})
    return cc


def new_pool(cfg: TrainingConfig) -> MemoryPool:
    cc = cfg.strategy.chunk
    to_int = lambda b: None if b is None else int(b)  # noqa: E731
    return MemoryPool(to_int(cc.device_budget), to_int(cc.host_budget))


def chunk_frozen(
    model: nn.Module, cfg: TrainingConfig, name: str, pool: MemoryPool, device: torch.device
) -> ChunkManager:
    """A frozen model (eval, no grads) in chunks, a member of ``pool``; buffers on ``device``."""
    from colossus.chunk_strategy import chunk_config

    model.eval().requires_grad_(False)
    for mod in model.modules():
        for k, b in mod._buffers.items():
            if b is not None:
                mod._buffers[k] = b.to(device)
    try:
        return ChunkManager(
            model, chunk_config(chunk_section(cfg, name), device), pool=pool.member(name)
        )
    except (ValueError, TypeError) as e:
        raise ConfigError(f"rlhf.stage=ppo, {name} model under strategy chunk: {e}") from None


def _meta_models(cfg: TrainingConfig) -> dict[str, nn.Module]:
    """The four models on the meta device, from the configs of their folders (or, before the
    earlier stages have run, from ``model.config``)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    from colossus.models import build_hf_config
    from colossus.plan import model_path_for_plan

    path = model_path_for_plan(cfg)
    hf = (
        AutoConfig.from_pretrained(path)
        if path
        else build_hf_config(cfg.model, vocab_size=cfg.data.tokenizer.vocab_size)
    )
    p = cfg.rlhf.ppo
    scalar_cfg = {}
    for name, src in (("reward", p.reward_model), ("critic", p.critic or p.reward_model)):
        ok = src and (Path(src).expanduser() / "config.json").is_file()
        scalar_cfg[name] = AutoConfig.from_pretrained(src) if ok else hf
    out: dict[str, nn.Module] = {}
    with init_empty_weights():
        for name in ("actor", "reference"):
            out[name] = AutoModelForCausalLM.from_config(hf)
            out[name].tie_weights()
        for name in ("critic", "reward"):
            c = scalar_cfg[name]
            c.num_labels = 1
            out[name] = AutoModelForSequenceClassification.from_config(c)
    for name in FROZEN:
        out[name].requires_grad_(False)
    return {k: out[k] for k in MODELS}


def plan_pool(cfg: TrainingConfig, world_size: int, device: torch.device | None = None):
    """The pool of the four models laid out in dry-run for ``world_size`` ranks."""
    from colossus.chunk_strategy import chunk_config

    if device is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    pool = new_pool(cfg)
    for name, model in _meta_models(cfg).items():
        try:
            ChunkManager(
                model,
                chunk_config(chunk_section(cfg, name), device),
                dry_run_world_size=world_size,
                pool=pool.member(name),
            )
        except (ValueError, TypeError) as e:
            raise ConfigError(f"rlhf.stage=ppo, {name} model under strategy chunk: {e}") from None
    return pool


def check_pool(pool: MemoryPool) -> None:
    try:
        pool.check()
    except ValueError as e:
        raise ConfigError(
            f"rlhf.stage=ppo under strategy chunk: the actor, critic, reference and reward "
            f"models share strategy.chunk's budgets: {e}"
        ) from None


def pool_rows(pool: MemoryPool) -> list[dict[str, Any]]:
    """Per model, bytes per tier: model state (held all the time) and working set (gathered
    chunks, gradient buffers, staging: one model's at a time); ``colossus plan``'s table."""
    return [{"name": name, **r} for name, r in pool.needs().items()]
