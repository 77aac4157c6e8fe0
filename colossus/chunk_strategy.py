"""Strategy ``chunk``: the model's parameters, gradients and AdamW state live in chunks managed by
:class:`offload.ChunkManager`, sharded over the launcher's ranks (ZeRO-3) and placed on the
``device`` / ``host`` tiers by ``strategy.chunk`` (see :class:`colossus.config.ChunkStrategyConfig`).

Checkpoints are sharded: each rank writes ``chunks-rankRRRRR-of-NNNNN.safetensors`` (its fp32
master shards, AdamW state and the chunk layout); rank 0 adds the model's persistent buffers and
the optimizer hyper-parameters. ``colossus export`` consolidates the shards chunk by chunk.

Example::

    from colossus import Trainer, TrainingConfig
    cfg = TrainingConfig(strategy={"name": "chunk", "chunk": {"offload_optim_frac": 1.0}})
    trainer = Trainer(model, cfg, train_dataset=blocks)  # under torchrun: sharded over ranks
"""

from __future__ import annotations

import contextlib
import re
from pathlib import Path

import torch
from torch import nn

from colossus.checkpoint import CheckpointWriter, load_json, load_tensors
from colossus.config import ChunkStrategyConfig, OptimConfig
from colossus.errors import CheckpointError, ConfigError, StorageError
from colossus.optim import is_excluded
from colossus.strategy import Strategy
from offload import ChunkAdamW, ChunkConfig, ChunkLamb, ChunkLars, ChunkManager
from offload.nvme import NvmeError
from parallel import comm

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SHARD_RE = re.compile(r"chunks-rank(\d{5})-of-(\d{5})\.safetensors")
_HYPER = ("lr", "betas", "eps", "weight_decay")


def shard_name(rank: int, world_size: int) -> str:
    return f"chunks-rank{rank:05d}-of-{world_size:05d}.safetensors"


def shard_files(path: str | Path) -> list[Path]:
    """The chunk shard files of a checkpoint directory, rank order ([] if it has none)."""
    return sorted(p for p in Path(path).iterdir() if SHARD_RE.fullmatch(p.name))


def persistent_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    """Buffers that ``state_dict()`` would save (not the non-persistent ones)."""
    out = {}
    for mname, mod in model.named_modules():
        for bname, b in mod.named_buffers(recurse=False):
            if b is not None and bname not in mod._non_persistent_buffers_set:
                out[f"{mname}.{bname}" if mname else bname] = b
    return out


@contextlib.contextmanager
def _storage_errors():
    try:
        yield
    except NvmeError as e:
        raise StorageError(
            f"{e}. Training stopped; checkpoints already written are intact (resume from the "
            "latest once the disk has room)"
        ) from e


def chunk_config(cc: ChunkStrategyConfig, device: torch.device, **extra) -> ChunkConfig:
    """The offload library's config from the schema's ``strategy.chunk`` section."""
    return ChunkConfig(
        chunk_size=cc.chunk_size,
        offload_param_frac=cc.offload_param_frac,
        offload_optim_frac=cc.offload_optim_frac,
        device_budget=None if cc.device_budget is None else int(cc.device_budget),
        host_budget=None if cc.host_budget is None else int(cc.host_budget),
        keep_gathered=cc.keep_gathered,
        keep_gathered_frac=cc.keep_gathered_frac,
        nvme_dir=cc.nvme_dir,
        nvme_optim_frac=cc.nvme_optim_frac,
        nvme_param_frac=cc.nvme_param_frac,
        nvme_prefetch=cc.nvme_prefetch,
        nvme_io_threads=cc.nvme_io_threads,
        gather_prefetch=cc.gather_prefetch,
        placement=cc.placement,
        reduce_in_flight=cc.reduce_in_flight,
        dtype=DTYPES[cc.dtype],
        device=device,
        **extra,
    )


def _comm_reducer(sq: torch.Tensor, columns) -> None:
    # through parallel.comm so the one all-reduce per step shows in the counted statistics
    comm.all_reduce(sq)


def build_chunk_trust_optimizer(mgr: ChunkManager, cfg: OptimConfig) -> torch.optim.Optimizer:
    """``ChunkLamb`` / ``ChunkLars`` from the schema's ``optim`` section. Weight decay follows
    the manager's decay / no-decay chunks, which :func:`chunk_decay_filter` built from the same
    ``optim.exclude`` patterns as strategies none / ddp use."""
    common = dict(
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        eps=cfg.resolved_eps,
        exclude_from_adaptation=cfg.exclude_from_adaptation,
        max_grad_norm=cfg.max_grad_norm,
        norm_reducer=_comm_reducer,
        fused=cfg.fused,
    )
    try:
        if cfg.name == "lamb":
            return ChunkLamb(
                mgr,
                betas=cfg.resolved_betas,
                bias_correction=cfg.bias_correction,
                phi_min=cfg.phi_min,
                phi_max=cfg.phi_max,
                trust_clip=cfg.trust_clip,
                **common,
            )
        return ChunkLars(
            mgr,
            momentum=cfg.momentum,
            trust_coefficient=cfg.trust_coefficient,
            nesterov=cfg.nesterov,
            larc_clip=cfg.larc_clip,
            lr_inside_momentum=cfg.lr_inside_momentum,
            **common,
        )
    except ValueError as e:
        raise ConfigError(f"optim.name={cfg.name} with strategy chunk: {e}") from None


def chunk_decay_filter(cfg: OptimConfig | None):
    """The manager's decay rule: AdamW keeps ndim >= 2; LAMB / LARS use ``optim.exclude``."""
    if cfg is None or cfg.name == "adamw":
        return None
    patterns, one_d = tuple(cfg.exclude), cfg.exclude_1d
    return lambda name, p: not is_excluded(name, p, patterns, one_d)


class ChunkStrategy(Strategy):
    """ZeRO-3 over the default process group with chunked, tier-placed model state."""

    name = "chunk"
    activation_estimate: float = 0.0
    """Per-rank activation bytes of a step (the Trainer sets it from its batch shape)."""
    _steps_since_report = 0  # optimizer steps since memory_report last measured NVMe traffic
    _last_movement: dict[str, float] | None = None
    pool = None
    """An ``offload.pool.PoolMember``: the manager shares that pool's budget (RLHF PPO)."""

    def prepare_model(self, model: nn.Module) -> nn.Module:
        cc = self.cfg.chunk
        dev = self.ctx.device
        # only buffers go to the device here; parameters are copied chunk by chunk straight into
        # their tier by the manager, so the model never has to fit on the device whole
        for mod in model.modules():
            for k, b in mod._buffers.items():
                if b is not None:
                    mod._buffers[k] = b.to(dev)
        try:
            source = getattr(model, "colossus_param_source", None)
            extra = {"param_source": source}
            if cc.placement == "auto":
                extra["activation_bytes"] = int(
                    cc.activation_reserve
                    if cc.activation_reserve is not None
                    else self.activation_estimate
                )
            decay = chunk_decay_filter(self.optim_cfg)
            if decay is not None:
                extra["decay_filter"] = decay
            self.mgr = ChunkManager(model, chunk_config(cc, dev, **extra), pool=self.pool)
        except (ValueError, TypeError, NvmeError) as e:
            raise ConfigError(f"strategy.chunk: {e}") from None
        self.model = self.engine = model
        self.skipped_steps = 0
        return self.engine

    def build_optimizer(self, cfg: OptimConfig) -> torch.optim.Optimizer:
        if cfg.name != "adamw":
            self.optimizer = build_chunk_trust_optimizer(self.mgr, cfg)
            return self.optimizer
        # one fused AdamW kernel per owned shard (optim.fused is moot: always the fused kernel);
        # decay / no-decay follows the same ndim >= 2 rule as the other strategies
        self.optimizer = ChunkAdamW(
            self.mgr,
            lr=cfg.lr,
            betas=cfg.resolved_betas,
            eps=cfg.resolved_eps,
            weight_decay=cfg.weight_decay,
        )
        return self.optimizer

    def backward(self, loss: torch.Tensor) -> None:
        with _storage_errors():
            self.mgr.backward(loss)

    def clip_grad_norm(self, max_norm: float | None) -> torch.Tensor:
        with _storage_errors():
            return self.mgr.clip_grad_norm_(max_norm)

    def optimizer_step(self) -> None:
        with _storage_errors():
            if not self.optimizer.step():  # fp16 overflow: skipped, loss scale halved
                self.skipped_steps += 1
            self.optimizer.zero_grad()
        self._steps_since_report += 1

    def close(self) -> None:
        self.mgr.close()

    def record_memory(self, on: bool) -> None:
        data = self.mgr.record_timeline(on)
        if not on:
            self._timeline = data

    def save_memory_plot(self, path: Path) -> bool:
        data = getattr(self, "_timeline", None)
        if not data:
            return False
        from offload.timeline import plot_timeline

        plot_timeline(data, path)
        return True

    def memory_report(self) -> dict[str, float]:
        rep = self.mgr.memory_report()
        out = {}
        for tier, r in rep.items():
            out[f"{tier}_gib"] = r["total"] / 2**30
            out[f"{tier}_peak_gib"] = r["peak"] / 2**30
            out[f"{tier}_plan_gib"] = self.mgr.plan.get(tier, 0) / 2**30  # predicted up front
        steps = self._steps_since_report
        if self.mgr.swapper is not None and steps:  # NVMe traffic per step vs the least possible
            mv = self.mgr.movement()
            last = self._last_movement or {k: 0 for k in mv}
            self._last_movement, self._steps_since_report = mv, 0
            moved = (mv["nvme_read_bytes"] - last["nvme_read_bytes"]) + (
                mv["nvme_written_bytes"] - last["nvme_written_bytes"]
            )
            busy = mv["io_busy_s"] - last["io_busy_s"]
            out["nvme_gb"] = moved / 1e9 / steps
            out["nvme_min_gb"] = self.mgr.min_nvme_bytes_per_step() / 1e9
            wait = mv["io_wait_s"] - last["io_wait_s"]
            out["io_busy_s"] = busy / steps
            out["io_wait_s"] = wait / steps
            # share of disk time hidden behind compute (the rest the step waited for)
            out["io_overlap"] = max(0.0, 1.0 - wait / busy) if busy > 0 else 1.0
        if self.mgr.activations is not None:  # measured in the first step (offload.tracer)
            out["activations_peak_gib"] = self.mgr.activations["total"] / 2**30
        if self.mgr.scaler is not None:
            out["loss_scale"] = self.mgr.scaler.scale
            out["skipped_steps"] = self.skipped_steps
        return out

    # ---- state --------------------------------------------------------------------------
    def save(self, ckpt: CheckpointWriter) -> None:
        r, n = self.ctx.rank, self.ctx.world_size
        ckpt.save_tensors(shard_name(r, n), self.mgr.state_dict_shard())
        if self.ctx.is_main:
            bufs = persistent_buffers(self.model)
            if bufs:
                ckpt.save_tensors("buffers.safetensors", bufs)
            groups = [
                {k: g[k] for k in ("name", *_HYPER) if k in g} for g in self.optimizer.param_groups
            ]
            kind = f"chunk_{type(self.optimizer).__name__.removeprefix('Chunk').lower()}"
            ckpt.save_json("optimizer.json", {"kind": kind, "param_groups": groups})

    def load(self, path: Path) -> None:
        files = shard_files(path)
        if not files:
            raise CheckpointError(
                f"checkpoint {path} has no chunk shards (chunks-rank*.safetensors): it was not "
                "written by strategy chunk"
            )
        saved_world = int(SHARD_RE.fullmatch(files[0].name).group(2))
        if saved_world != self.ctx.world_size or len(files) != saved_world:
            raise CheckpointError(
                f"checkpoint {path} holds chunk shards of {saved_world} ranks ({len(files)} files); "
                f"this run has {self.ctx.world_size}. Resume with {saved_world} ranks, or "
                "`colossus export` it and start a new run from the exported model (model.path)."
            )
        sd = load_tensors(path / shard_name(self.ctx.rank, saved_world))
        try:
            self.mgr.load_state_dict_shard(sd)
        except (ValueError, KeyError, RuntimeError) as e:
            raise CheckpointError(f"checkpoint {path}: chunk shard does not fit: {e}") from None
        bf = path / "buffers.safetensors"
        if bf.is_file():
            bufs = persistent_buffers(self.model)
            for k, v in load_tensors(bf, device=self.ctx.device).items():
                if k in bufs:
                    bufs[k].copy_(v)
        groups = load_json(path / "optimizer.json")["param_groups"]
        if len(groups) != len(self.optimizer.param_groups):
            raise CheckpointError(f"checkpoint {path}: optimizer param groups do not match")
        for g, saved in zip(self.optimizer.param_groups, groups):
            for k in _HYPER:
                if k in saved:
                    g[k] = tuple(saved[k]) if k == "betas" else saved[k]

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Collective: every rank must call it; gathers one chunk at a time."""
        out = dict(self.mgr.iter_full_params())
        out.update({k: v.detach().cpu() for k, v in persistent_buffers(self.model).items()})
        return out
