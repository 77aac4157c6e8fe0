"""Tensor parallelism (``strategy.tp > 1``) composed with data parallelism over the rest of the
world: ``parallel.topology.Topology`` lays ranks out tp-innermost (``dp = world / tp``),
``parallel.policies.parallelize`` splits the Hugging Face model in place (each rank keeps 1/tp of
every split layer), and torch ``DistributedDataParallel`` over the data-parallel group averages
gradients (a tensor-parallel group's ranks hold different shards, so each shard is all-reduced
only with its replicas in the other dp groups).

Every rank of a tensor-parallel group reads the same batch (``data_rank`` = dp rank) and uses
the same RNG stream (dropout in replicated regions must agree). AdamW runs on the local shards
(elementwise, so it equals AdamW on the full model); LAMB / LARS get whole-parameter norms for
their trust ratios from ``colossus.optim.ShardedNormReducer`` over the tp group; clipping uses the global norm: squares of
split parameters are summed over the tp group, replicated ones are counted once.

Checkpoints: the ranks of data-parallel replica 0 write ``tp-rankRRRRR-of-TTTTT.safetensors``
(model shard) and ``tp-optim-rankRRRRR-of-TTTTT.safetensors`` (AdamW state of that shard); tp
rank 0 writes ``tp_layout.json`` (how shards rebuild each Hugging Face tensor), which
``colossus export`` uses to write a normal ``from_pretrained`` folder (2d / 2.5d / 3d: tp rank 0
writes the gathered ``model.safetensors`` instead). Resuming needs the same tp.

Example::

    from colossus import Trainer, TrainingConfig
    cfg = TrainingConfig(strategy={"tp": 2})  # under torchrun --nproc_per_node 4: tp=2 x dp=2
    trainer = Trainer(model, cfg, train_dataset=blocks)
"""

from __future__ import annotations

import contextlib
import re
from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from colossus.checkpoint import (
    CheckpointWriter,
    load_json,
    load_tensors,
    optimizer_state_from_tensors,
    optimizer_state_to_tensors,
)
from colossus.errors import CheckpointError, ConfigError
from colossus.strategy import Strategy, _refuse_meta
from parallel import comm
from parallel.policies import PolicyError, gather_state_dict, parallelize, tp_plan
from parallel.tensor.sharding import tp_shard
from parallel.topology import Topology, TopologyError

TP_SHARD_RE = re.compile(r"tp-rank(\d{5})-of-(\d{5})\.safetensors")
LAYOUT = "tp_layout.json"


def tp_shard_name(rank: int, tp: int, kind: str = "") -> str:
    return f"tp-{kind + '-' if kind else ''}rank{rank:05d}-of-{tp:05d}.safetensors"


def tp_shard_files(path: str | Path) -> list[Path]:
    """The model shard files of a tensor-parallel checkpoint, tp-rank order ([] if none)."""
    p = Path(path)
    return sorted(f for f in p.iterdir() if TP_SHARD_RE.fullmatch(f.name)) if p.is_dir() else []


class TPStrategy(Strategy):
    """``strategy.tp`` tensor-parallel ranks per model replica, DDP across replicas."""

    name = "tp"

    def __init__(self, cfg, ctx, optim=None):
        super().__init__(cfg, ctx, optim)
        if cfg.name == "chunk":
            raise ConfigError(
                "strategy.tp > 1 does not compose with strategy.name=chunk yet; use "
                "strategy.name=ddp (data parallel over world / tp)"
            )
        if ctx.world_size % cfg.tp:
            raise ConfigError(
                f"strategy.tp={cfg.tp} does not divide the {ctx.world_size} launched processes; "
                f"launch a multiple of {cfg.tp} (e.g. torchrun --nproc_per_node {cfg.tp})"
            )
        try:
            self.topo = Topology.from_world(tp=cfg.tp, tp_mode=cfg.tp_mode, tp_depth=cfg.tp_depth)
        except TopologyError as e:
            raise ConfigError(f"strategy.tp: {e}") from None

    @property
    def data_rank(self) -> int:
        return self.topo.dp_rank

    @property
    def data_world(self) -> int:
        return self.topo.dp

    # ---- set-up -------------------------------------------------------------------------
    def prepare_model(self, model: nn.Module) -> nn.Module:
        _refuse_meta(model, "tp")
        model = model.to(self.ctx.device)
        try:
            parallelize(model, self.topo)
        except (PolicyError, NotImplementedError) as e:
            raise ConfigError(f"strategy.tp={self.cfg.tp} ({self.cfg.tp_mode}): {e}") from None
        self.model = model
        if self.topo.dp > 1:
            ids = [self.ctx.device.index] if self.ctx.device.type == "cuda" else None
            self.engine = DistributedDataParallel(
                model, device_ids=ids, process_group=self.topo.dp_group
            )
        else:
            self.engine = model
        return self.engine

    def build_optimizer(self, cfg):
        from colossus.optim import ShardedNormReducer, build_optimizer

        # LAMB / LARS trust ratios need whole-parameter norms: partial squares of split
        # parameters are summed over the tp group (param.tp_shard), replicated ones counted once
        reducer = None if cfg.name == "adamw" else ShardedNormReducer(group=self.topo.tp_group)
        self.optimizer = build_optimizer(self.model, cfg, self.ctx.device, norm_reducer=reducer)
        return self.optimizer

    def no_sync(self, sync: bool) -> contextlib.AbstractContextManager:
        if sync or not isinstance(self.engine, DistributedDataParallel):
            return contextlib.nullcontext()
        return self.engine.no_sync()

    # ---- step ---------------------------------------------------------------------------
    def clip_grad_norm(self, max_norm: float | None) -> torch.Tensor:
        """Norm of the whole (unsplit) model's gradient; clips in place when ``max_norm``."""
        grads_split, grads_repl, weights = [], [], []
        for p in self.model.parameters():  # parameters() yields a tied weight once
            if p.grad is None:
                continue
            info = tp_shard(p)
            if info is None:
                grads_repl.append(p.grad)
            else:
                grads_split.append(p.grad)
                weights.append(1.0 / info.replicas)
        dev = self.ctx.device
        split_sq = torch.zeros((), dtype=torch.float32, device=dev)
        if grads_split:
            norms = torch._foreach_norm(grads_split)
            split_sq = sum(w * n.float() ** 2 for w, n in zip(weights, norms))
        comm.all_reduce(split_sq, group=self.topo.tp_group)  # shards differ across tp ranks
        repl_sq = torch.zeros((), dtype=torch.float32, device=dev)
        if grads_repl:  # identical on every tp rank: counted once, not summed over the group
            repl_sq = sum(n.float() ** 2 for n in torch._foreach_norm(grads_repl))
        total = (split_sq + repl_sq).sqrt()
        if max_norm is not None:
            coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
            torch._foreach_mul_(grads_split + grads_repl, coef)
        return total

    # ---- state --------------------------------------------------------------------------
    def save(self, ckpt: CheckpointWriter) -> None:
        t = self.topo
        if t.dp_rank != 0:  # data-parallel replicas hold the same shards
            return
        ckpt.save_module(tp_shard_name(t.tp_rank, t.tp), self.model)
        tensors, meta = optimizer_state_to_tensors(self.optimizer.state_dict())
        ckpt.save_tensors(tp_shard_name(t.tp_rank, t.tp, "optim"), tensors)
        if t.tp_mode != "1d":  # grid shards are 2D blocks: export from the gathered model
            full = gather_state_dict(self.model)  # collective over this tp group
            if t.tp_rank == 0:
                ckpt.save_tensors("model.safetensors", full)
        if t.tp_rank == 0:
            ckpt.save_json("optimizer.json", meta)
            if t.tp_mode == "1d":
                ckpt.save_json(LAYOUT, tp_plan(self.model).layout_json())

    def load(self, path: Path) -> None:
        files = tp_shard_files(path)
        if not files:
            raise CheckpointError(
                f"checkpoint {path} has no tensor-parallel shards (tp-rank*.safetensors): it was "
                "not written with strategy.tp > 1"
            )
        saved_tp = int(TP_SHARD_RE.fullmatch(files[0].name).group(2))
        t = self.topo
        if saved_tp != t.tp or len(files) != saved_tp:
            raise CheckpointError(
                f"checkpoint {path} holds {len(files)} shards of tp={saved_tp}; this run has "
                f"tp={t.tp}. Resume with strategy.tp={saved_tp}, or `colossus export` it and "
                "start a new run from the exported model (model.path)."
            )
        sd = load_tensors(path / tp_shard_name(t.tp_rank, t.tp), device=self.ctx.device)
        missing, unexpected = self.model.load_state_dict(sd, strict=False)
        tied = {a for a in tp_plan(self.model).aliases} | set(tp_plan(self.model).aliases.values())
        if unexpected or set(missing) - tied:
            raise CheckpointError(
                f"checkpoint {path}: tp shard does not fit this model: missing "
                f"{sorted(set(missing) - tied)[:5]}, unexpected {sorted(unexpected)[:5]}"
            )
        meta = load_json(path / "optimizer.json")
        tensors = load_tensors(path / tp_shard_name(t.tp_rank, t.tp, "optim"), self.ctx.device)
        try:
            self.optimizer.load_state_dict(optimizer_state_from_tensors(tensors, meta))
        except (ValueError, KeyError) as e:
            raise CheckpointError(f"checkpoint {path}: optimizer state does not fit: {e}") from None

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The whole model in Hugging Face layout on CPU (collective over the tp group)."""
        return gather_state_dict(self.model)

    def memory_report(self) -> dict[str, float]:
        local = sum(p.numel() * p.element_size() for p in self.model.parameters())
        return {"param_shard_gib": local / 2**30}
