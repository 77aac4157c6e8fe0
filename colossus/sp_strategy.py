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

With ``strategy.tp > 1`` (``tp_mode=1d``) the layout is dp x sp x tp (tp innermost): the model
is first split by ``parallel.policies`` (each rank keeps ``heads / tp`` heads, which the sequence
variant runs over its sp group; Ulysses needs ``heads / tp`` divisible by ``sp``), the loss is
the vocabulary-parallel cross-entropy of this rank's tokens combined over the sp group, DDP runs
over the ranks holding the same tensor-parallel shard (dp x sp of them), and checkpoints are the
tensor-parallel ones (sp rank 0 of dp replica 0 writes; ``colossus export`` consolidates).
Refused: grid tp modes (2d / 2.5d / 3d split activations by batch rows) and ``strategy.name=chunk``.

Example::

    from colossus import Trainer, TrainingConfig
    cfg = TrainingConfig(strategy={"sp": 2, "sp_mode": "ulysses"})  # torchrun --nproc_per_node 4: sp=2 x dp=2
    trainer = Trainer(model, cfg, train_dataset=blocks)  # blocks of a length divisible by 2*sp
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from colossus.config import OptimConfig, StrategyConfig
from colossus.distributed import DistContext
from colossus.errors import ConfigError
from colossus.strategy import Strategy, _refuse_meta
from colossus.tp_strategy import TPStrategy
from parallel import comm
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

    def __init__(self, model: nn.Module, topo: Topology, vocab_parallel: bool = False):
        super().__init__()
        self.module = model
        self.topo = topo
        self.token_loss = None
        if vocab_parallel:  # the LM head's logits are split by vocabulary over the tp group
            from parallel.tensor.cross_entropy_1d import vocab_parallel_cross_entropy

            def token_loss(logits, labels, ignore_index):
                return vocab_parallel_cross_entropy(
                    logits, labels, topo.tp_group, ignore_index=ignore_index, reduction="sum"
                )

            self.token_loss = token_loss

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
        loss = sp_cross_entropy(logits, labels, self.topo.sp_group, token_loss=self.token_loss)
        return {"loss": loss, "logits": logits}


def _refuse_layout(cfg: StrategyConfig, ctx: DistContext) -> None:
    """The refusals that need no model: run before any process group or model work."""
    if cfg.name == "chunk":
        raise ConfigError(
            "strategy.sp > 1 does not compose with strategy.name=chunk; use strategy.name=ddp "
            "(sequence parallel x data parallel over world / sp)"
        )
    if cfg.tp > 1 and cfg.tp_mode != "1d":
        raise ConfigError(
            f"strategy.sp={cfg.sp} composes with tp_mode=1d only (tp_mode={cfg.tp_mode} splits "
            "activations by batch rows over its grid); use tp_mode=1d or strategy.sp=1"
        )
    try:
        check_sequence_parallel(cfg.sp, cfg.sp_mode, layout=LAYOUT)
    except ValueError as e:
        raise ConfigError(f"strategy.sp: {e}") from None
    if ctx.world_size % (cfg.sp * cfg.tp):
        n = cfg.sp * cfg.tp
        raise ConfigError(
            f"strategy.sp={cfg.sp} x strategy.tp={cfg.tp} = {n} does not divide the "
            f"{ctx.world_size} launched processes; launch a multiple of {n} "
            f"(e.g. torchrun --nproc_per_node {n})"
        )


def _check_model(model: nn.Module, cfg: StrategyConfig, seq_len: int | None) -> None:
    """Every refusal that needs the model: type, sequence length, Ulysses heads, dropout."""
    hf = getattr(model, "config", None)
    mt = getattr(hf, "model_type", None)
    sp, mode = cfg.sp, cfg.sp_mode
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
            seq_len=seq_len,
            heads=hf.num_attention_heads,
            tp=cfg.tp,
            layout=LAYOUT,
            attn_dropout=float(dropout or 0.0),
        )
    except ValueError as e:
        raise ConfigError(f"strategy.sp={sp} (sp_mode={mode}): {e}") from None


class SPStrategy(Strategy):
    """``strategy.sp`` sequence-parallel ranks per model replica, data parallel across groups
    (``strategy.tp > 1``: :class:`TPSPStrategy`)."""

    name = "sp"

    def __init__(self, cfg: StrategyConfig, ctx: DistContext, optim: OptimConfig | None = None):
        super().__init__(cfg, ctx, optim)
        self.seq_len: int | None = None  # set by the Trainer from its data, checked up front
        _refuse_layout(cfg, ctx)
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
        _check_model(model, self.cfg, self.seq_len)
        self.model = model.to(self.ctx.device)
        apply_sequence_parallel(self.model, self.topo.sp_group, self.cfg.sp_mode, LAYOUT)
        wrapped = SequenceParallelLM(self.model, self.topo)
        ids = [self.ctx.device.index] if self.ctx.device.type == "cuda" else None
        self.engine = DistributedDataParallel(wrapped, device_ids=ids)  # over dp * sp ranks
        return self.engine

    # ---- step ---------------------------------------------------------------------------
    def no_sync(self, sync: bool) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext() if sync else self.engine.no_sync()

    def backward(self, loss: torch.Tensor) -> None:
        # DDP averages over dp * sp ranks; the group's gradient is the sum of its sp shares
        (loss * self.topo.sp).backward()


class TPSPStrategy(TPStrategy):
    """dp x sp x tp: tensor-parallel shards (``TPStrategy``'s clipping, optimizer and
    checkpoints) with each sequence split over sp; DDP over the dp x sp ranks of one shard."""

    name = "tp"  # checkpoint format: tensor-parallel shards (sp ranks hold replicas of them)

    def __init__(self, cfg: StrategyConfig, ctx: DistContext, optim: OptimConfig | None = None):
        Strategy.__init__(self, cfg, ctx, optim)  # not TPStrategy's: the topology has sp too
        self.seq_len: int | None = None
        _refuse_layout(cfg, ctx)
        try:
            self.topo = Topology.from_world(tp=cfg.tp, sp=cfg.sp)
        except TopologyError as e:
            raise ConfigError(f"strategy.sp x strategy.tp: {e}") from None
        t = self.topo
        # the ranks holding the same tensor-parallel shard; built on every rank in one order
        self.replica_group = None
        for tr in range(t.tp):
            ranks = [t.rank_of(d, s, tr) for d in range(t.dp) for s in range(t.sp)]
            g = dist.new_group(ranks)
            if tr == t.tp_rank:
                self.replica_group = g
        comm.register_group(self.replica_group, "dp_sp")

    def prepare_model(self, model: nn.Module) -> nn.Module:
        from parallel.policies import PolicyError, parallelize
        from parallel.policies.base import VocabParallelCausalLMLoss

        _refuse_meta(model, "sp x tp")
        _check_model(model, self.cfg, self.seq_len)
        model = model.to(self.ctx.device)
        try:
            parallelize(model, self.topo)
        except (PolicyError, NotImplementedError) as e:
            raise ConfigError(f"strategy.tp={self.cfg.tp}: {e}") from None
        apply_sequence_parallel(model, self.topo.sp_group, self.cfg.sp_mode, LAYOUT)
        self.model = model
        vocab = isinstance(getattr(model, "loss_function", None), VocabParallelCausalLMLoss)
        wrapped = SequenceParallelLM(model, self.topo, vocab_parallel=vocab)
        ids = [self.ctx.device.index] if self.ctx.device.type == "cuda" else None
        self.engine = DistributedDataParallel(
            wrapped, device_ids=ids, process_group=self.replica_group
        )
        return self.engine

    def no_sync(self, sync: bool) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext() if sync else self.engine.no_sync()

    def backward(self, loss: torch.Tensor) -> None:
        # DDP averages over the dp * sp replicas of a shard; sum over sp, mean over dp
        (loss * self.topo.sp).backward()

    def save(self, ckpt) -> None:
        if self.topo.sp_rank == 0:  # sp ranks hold the same shards
            super().save(ckpt)


def make_sp_strategy(
    cfg: StrategyConfig, ctx: DistContext, optim: OptimConfig | None = None
) -> Strategy:
    """``strategy.sp > 1``: :class:`SPStrategy`, or :class:`TPSPStrategy` with ``tp > 1``."""
    return (TPSPStrategy if cfg.tp > 1 else SPStrategy)(cfg, ctx, optim)
