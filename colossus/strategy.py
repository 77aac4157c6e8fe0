"""Strategies: how a model's state is placed and synchronised. The Trainer talks only to this
small interface, so later strategies (``chunk`` offload, tensor / sequence parallel) plug in
without touching the training loop.

Example::

    from colossus.config import StrategyConfig, OptimConfig
    from colossus.distributed import init_distributed
    from colossus.strategy import make_strategy
    s = make_strategy(StrategyConfig(name="none"), init_distributed())
    model = s.prepare_model(torch.nn.Linear(4, 4))
    opt = s.build_optimizer(OptimConfig(lr=1e-3))
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from colossus.checkpoint import (
    CheckpointWriter,
    load_json,
    load_module,
    load_tensors,
    optimizer_state_from_tensors,
    optimizer_state_to_tensors,
)
from colossus.config import OptimConfig, StrategyConfig
from colossus.distributed import DistContext
from colossus.errors import CheckpointError, ConfigError


def decay_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on matrices only: biases, norms and other 1-D tensors are not decayed (the
    GPT-2 / BERT convention)."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def build_adamw(model: nn.Module, cfg: OptimConfig, device: torch.device) -> torch.optim.Optimizer:
    # fused AdamW runs at memory bandwidth on CPU (~22.7 GB/s measured), ~4x the foreach path.
    fused = cfg.fused if cfg.fused is not None else device.type in ("cpu", "cuda")
    return torch.optim.AdamW(
        decay_groups(model, cfg.weight_decay),
        lr=cfg.lr,
        betas=cfg.resolved_betas,
        eps=cfg.resolved_eps,
        fused=fused,
    )


class Strategy:
    """One process, the whole model on ``ctx.device``. Subclasses override what they change."""

    name = "none"

    def __init__(self, cfg: StrategyConfig, ctx: DistContext, optim: OptimConfig | None = None):
        self.cfg = cfg
        self.ctx = ctx
        self.optim_cfg = optim  # known before prepare_model: chunk packs by the decay rule
        self.model: nn.Module | None = None  # the user's (unwrapped) model
        self.engine: nn.Module | None = None  # what forward is called on
        self.optimizer: torch.optim.Optimizer | None = None

    # ---- data ---------------------------------------------------------------------------
    @property
    def data_rank(self) -> int:
        """Which data shard this rank reads (ranks that split one model read the same)."""
        return self.ctx.rank

    @property
    def data_world(self) -> int:
        """Number of distinct data shards per step (the data-parallel size)."""
        return self.ctx.world_size

    # ---- set-up -----------------------------------------------------------------------
    def prepare_model(self, model: nn.Module) -> nn.Module:
        _refuse_meta(model, self.name)
        self.model = model.to(self.ctx.device)
        self.engine = self.model
        return self.engine

    def build_optimizer(self, cfg: OptimConfig) -> torch.optim.Optimizer:
        assert self.model is not None, "prepare_model first"
        from colossus.optim import build_optimizer  # adamw, lamb or lars (optim.name)

        self.optimizer = build_optimizer(self.model, cfg, self.ctx.device)
        return self.optimizer

    # ---- step -------------------------------------------------------------------------
    def no_sync(self, sync: bool) -> contextlib.AbstractContextManager:
        """Context for one micro-batch's forward+backward; ``sync=False`` on accumulation steps."""
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def clip_grad_norm(self, max_norm: float | None) -> torch.Tensor:
        """Global grad norm (before clipping), clipping in place when ``max_norm`` is set."""
        params = [p for p in self.model.parameters() if p.grad is not None]
        if max_norm is None:
            return torch.nn.utils.get_total_norm([p.grad for p in params])
        return torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)

    def optimizer_step(self) -> None:
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def parameters(self) -> Iterator[nn.Parameter]:
        return self.model.parameters()

    def close(self) -> None:
        """Release external resources (files of an NVMe tier) after a fatal error."""

    def record_memory(self, on: bool) -> None:
        """Record a memory timeline of the next step (strategies that place memory in tiers)."""

    def save_memory_plot(self, path: Path) -> bool:
        """Write the recorded timeline as a PNG; False when there is nothing to draw."""
        return False

    def memory_report(self) -> dict[str, float]:
        """Model-state memory per tier (``device_gib``, ``host_gib``, ...) where the strategy
        accounts it; empty when the model simply lives on the device."""
        return {}

    # ---- state ------------------------------------------------------------------------
    def save(self, ckpt: CheckpointWriter) -> None:
        """Write model + optimizer state into a checkpoint (collective: every rank calls it)."""
        if self.ctx.is_main:
            ckpt.save_module("model.safetensors", self.model)
            tensors, meta = optimizer_state_to_tensors(self.optimizer.state_dict())
            ckpt.save_tensors("optimizer.safetensors", tensors)
            ckpt.save_json("optimizer.json", meta)

    def load(self, path: Path) -> None:
        # in place (load_state_dict copies into the parameters): flat optimizer views stay views
        missing, unexpected = load_module(
            self.model, path / "model.safetensors", device=self.ctx.device
        )
        if unexpected or missing:
            raise CheckpointError(
                f"checkpoint {path} does not fit this model: missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}"
            )
        meta = load_json(path / "optimizer.json")
        tensors = load_tensors(path / "optimizer.safetensors", device=self.ctx.device)
        try:
            self.optimizer.load_state_dict(optimizer_state_from_tensors(tensors, meta))
        except (ValueError, KeyError) as e:
            raise CheckpointError(f"checkpoint {path}: optimizer state does not fit: {e}") from None

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The whole model's state on CPU (for export); under sharding strategies a gather."""
        return {k: v.detach().cpu() for k, v in self.model.state_dict().items()}


def _refuse_meta(model: nn.Module, strategy: str) -> None:
    if any(p.is_meta for p in model.parameters()):
        raise ConfigError(
            f"the model's parameters are on the meta device (model.lazy_init), which strategy "
            f"{strategy!r} cannot materialise; use strategy.name=chunk"
        )


class DDPStrategy(Strategy):
    """torch DistributedDataParallel: every rank holds the whole model; gradients are all-reduced
    (averaged) in buckets during backward, skipped on gradient-accumulation micro-steps."""

    name = "ddp"

    def prepare_model(self, model: nn.Module) -> nn.Module:
        _refuse_meta(model, self.name)
        self.model = model.to(self.ctx.device)
        if not self.ctx.distributed:
            self.engine = self.model  # DDP of one process is just overhead
            return self.engine
        ids = [self.ctx.device.index] if self.ctx.device.type == "cuda" else None
        self.engine = DistributedDataParallel(self.model, device_ids=ids)
        return self.engine

    def no_sync(self, sync: bool) -> contextlib.AbstractContextManager:
        if sync or not isinstance(self.engine, DistributedDataParallel):
            return contextlib.nullcontext()
        return self.engine.no_sync()


STRATEGIES: dict[str, type[Strategy]] = {"none": Strategy, "ddp": DDPStrategy}


def make_strategy(
    cfg: StrategyConfig, ctx: DistContext, optim: OptimConfig | None = None
) -> Strategy:
    if cfg.sp > 1:  # before tp: SPStrategy composes sp with tp itself (or refuses)
        from colossus.sp_strategy import make_sp_strategy

        return make_sp_strategy(cfg, ctx, optim)
    if cfg.tp > 1:  # imported here: it pulls in parallel, which none/ddp/chunk never need
        from colossus.tp_strategy import TPStrategy

        return TPStrategy(cfg, ctx, optim)
    if cfg.name == "none" and ctx.distributed:
        raise ConfigError(
            f"strategy.name=none runs one process, but the launcher started {ctx.world_size}; "
            "use strategy.name=ddp (or launch one process)"
        )
    if cfg.name == "chunk":  # imported here: it pulls in offload, which none/ddp never need
        from colossus.chunk_strategy import ChunkStrategy

        return ChunkStrategy(cfg, ctx, optim)
    return STRATEGIES[cfg.name](cfg, ctx, optim)
