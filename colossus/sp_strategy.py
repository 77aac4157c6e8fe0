"""Sequence parallelism (``strategy.sp > 1``) composed with data parallelism over the rest of the
world: ``parallel.topology.Topology`` groups ``sp`` consecutive ranks (``dp = world / sp``), every
rank of a sequence-parallel group reads the same batch (``data_rank`` = dp rank) and keeps
``L / sp`` tokens of each sequence (zigzag layout, so causal work is balanced), and the model's
attention is swapped for a sequence-parallel variant (``strategy.sp_mode``: ring attention, ring
self-attention or Ulysses; ``parallel.sequence.hf_attention``) for GPT-2 and Llama.

The loss is the mean over every token of the group's sequences (``sp_cross_entropy``), so the
logged loss equals one process's. Parameters are replicated: each rank's gradient is its tokens'
share of the group's gradient, so gradients are summed over sp and averaged over dp. One torch
``DistributedDataParallel`` over the whole world does both (bucketed, overlapped with backward):
it averages over dp * sp ranks, and backward scales the loss by ``sp`` first. After that every
rank holds the full gradient, so clipping, AdamW and checkpoints are those of plain data
parallelism (rank 0 writes a normal Hugging Face model; ``colossus export`` reads it as is).

Not composed yet: ``strategy.tp > 1`` and ``strategy.name=chunk`` with ``sp > 1`` are refused.

Example::

    from colossus import Trainer, TrainingConfig
    cfg = TrainingConfig(strategy={"sp": 2, "sp_mode": "ulysses"})  # torchrun --nproc_per_node 4: sp=2 x dp=2
    trainer = Trainer(model, cfg, train_dataset=blocks)  # blocks of a length divisible by 2*sp
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from colossus.config import OptimConfig, StrategyConfig
from colossus.distributed import DistContext
from colossus.errors import ConfigError
from colossus.strategy import Strategy, _refuse_meta
from parallel.sequence.data import sp_cross_entropy, split_batch
from parallel.sequence.hf_attention import (
    SUPPORTED_MODELS,
    apply_sequence_parallel,
    check_sequence_parallel,
)
from parallel.topology import Topology, TopologyError

LAYOUT = "zigzag"  # every sp_mode takes it; balances causal work across the group


class SequenceParallelLM(nn.Module):
    """Forward of one rank: takes the whole HF causal-LM batch, runs the model on this rank's
    part of each sequence with global position ids, returns the loss over the whole group's
    tokens (``{"loss", "logits"}``; logits are this rank's tokens)."""

    def __init__(self, model: nn.Module, topo: Topology):
        super().__init__()
        self.module = model
        self.topo = topo

    def forward(self, input_ids: torch.Tensor, **batch: Any) -> dict[str, torch.Tensor]:
        extra = sorted(set(batch) - {"attention_mask", "labels"})
        if extra:
            raise ConfigError(
                f"sequence parallelism feeds input_ids, attention_mask and labels; the batch also "
                f"has {extra}, which it cannot split"
            )
        try:
            part = split_batch(
                {"input_ids": input_ids, **batch}, self.topo.sp_rank, self.topo.sp, LAYOUT
            )
        except ValueError as e:  # a sequence length the layout cannot split
            raise ConfigError(f"strategy.sp={self.topo.sp}: {e}") from None
        labels = part.pop("labels")
        logits = self.module(**part).logits
        return {"loss": sp_cross_entropy(logits, labels, self.topo.sp_group), "logits": logits}


class SPStrategy(Strategy):
    """``strategy.sp`` sequence-parallel ranks per model replica, data parallel across groups."""

    name = "sp"

    def __init__(self, cfg: StrategyConfig, ctx: DistContext, optim: OptimConfig | None = None):
        super().__init__(cfg, ctx, optim)
        self.seq_len: int | None = None  # set by the Trainer from its data, checked up front
        if cfg.name == "chunk":
            raise ConfigError(
                "strategy.sp > 1 does not compose with strategy.name=chunk; use strategy.name=ddp "
                "(sequence parallel x data parallel over world / sp)"
            )
        if getattr(cfg, "tp", 1) > 1:
            raise ConfigError(
                f"strategy.sp={cfg.sp} with strategy.tp={cfg.tp} is not supported by the Trainer "
                "yet; use one of them (sp x dp or tp x dp)"
            )
        try:
            check_sequence_parallel(cfg.sp, cfg.sp_mode, layout=LAYOUT)
        except ValueError as e:
            raise ConfigError(f"strategy.sp: {e}") from None
        if ctx.world_size % cfg.sp:
            raise ConfigError(
                f"strategy.sp={cfg.sp} does not divide the {ctx.world_size} launched processes; "
                f"launch a multiple of {cfg.sp} (e.g. torchrun --nproc_per_node {cfg.sp})"
            )
        try:
            self.topo = Topology.from_world(sp=cfg.sp)
        except TopologyError as e:
            raise ConfigError(f"strategy.sp: {e}") from None

    @property
    def data_rank(self) -> int:
        return self.topo.dp_rank

    @property
    def data_world(self) -> int:
        return self.topo.dp

    # ---- set-up -------------------------------------------------------------------------
    def prepare_model(self, model: nn.Module) -> nn.Module:
        _refuse_meta(model, "sp")
        self._check_model(model)
        self.model = model.to(self.ctx.device)
        apply_sequence_parallel(self.model, self.topo.sp_group, self.cfg.sp_mode, LAYOUT)
        wrapped = SequenceParallelLM(self.model, self.topo)
        ids = [self.ctx.device.index] if self.ctx.device.type == "cuda" else None
        self.engine = DistributedDataParallel(wrapped, device_ids=ids)  # over dp * sp ranks
        return self.engine

    def _check_model(self, model: nn.Module) -> None:
        """Every refusal before any work: model type, sequence length, Ulysses heads, dropout."""
        hf = getattr(model, "config", None)
        mt = getattr(hf, "model_type", None)
        sp, mode = self.cfg.sp, self.cfg.sp_mode
        if mt not in SUPPORTED_MODELS:
            raise ConfigError(
                f"strategy.sp={sp}: sequence parallelism has an attention policy for "
                f"{', '.join(SUPPORTED_MODELS)} (causal LMs), not model_type={mt!r}; use strategy.sp=1"
            )
        dropout = getattr(hf, "attn_pdrop", None) if mt == "gpt2" else None
        if dropout is None:
            dropout = getattr(hf, "attention_dropout", 0.0)
        try:
            check_sequence_parallel(
                sp,
                mode,
                seq_len=self.seq_len,
                heads=hf.num_attention_heads,
                layout=LAYOUT,
                attn_dropout=float(dropout or 0.0),
            )
        except ValueError as e:
            raise ConfigError(f"strategy.sp={sp} (sp_mode={mode}): {e}") from None

    # ---- step ---------------------------------------------------------------------------
    def no_sync(self, sync: bool) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext() if sync else self.engine.no_sync()

    def backward(self, loss: torch.Tensor) -> None:
        # DDP averages over dp * sp ranks; the group's gradient is the sum of its sp shares
        (loss * self.topo.sp).backward()
