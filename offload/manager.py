"""ChunkManager: packs a module's parameters into chunks, shards them across data-parallel ranks
(ZeRO-3), installs the hooks that gather chunks before use and reduce-scatter gradients after, and
accounts every byte per tier.

Example (one process; under ``torchrun`` the same code shards over the default process group)::

    >>> import torch
    >>> from offload import ChunkAdamW, ChunkConfig, ChunkManager
    >>> model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    >>> mgr = ChunkManager(model, ChunkConfig(chunk_size=64))
    >>> opt = ChunkAdamW(mgr, lr=1e-2, weight_decay=0.1)
    >>> loss = mgr.module(torch.randn(4, 8)).square().mean()
    >>> mgr.backward(loss)
    >>> norm = mgr.clip_grad_norm_(1.0)
    >>> opt.step(); opt.zero_grad()
    True
    >>> mgr.memory_report()["device"]["model_state"] > 0
    True

Hooks and slot states (see :mod:`offload.chunk`):

* forward pre-hook of a module: its chunks are gathered (all_gather_into_tensor) and its params
  go to COMPUTE; chunks used by the previous module are released lazily, so consecutive modules
  that share a chunk gather it once.
* forward post-hook: params return to HOLD; a hook on every output tensor marks the start of the
  module's backward ("pre-backward"): the chunks are gathered again and the params pinned
  (COMPUTE) until their gradient arrives. Under gradient checkpointing the recomputed forward
  re-gathers through the same forward hooks.
* post-accumulate-grad hook of each param: the gradient is added into the chunk's full-size
  gradient buffer and ``param.grad`` dropped. When every param of the chunk has received the
  number of contributions learned in the previous step (1 at first; 0 for unused params), the
  chunk is reduce-scattered, averaged, moved to the tier of its optimizer state and released.
* end of backward (an autograd engine callback, or :meth:`ChunkManager.backward`): whatever is
  still pending is reduced, in chunk order, so unused parameters never hang.

All ranks must run the same modules in the same order (as for any ZeRO-3): gathers are
collectives. Budgets must be equal on every rank so that eviction decisions agree.
"""

from __future__ import annotations

import contextlib
import json
import mmap
import sys
import time
from collections import defaultdict, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .chunk import Chunk, Slot, SlotState
from .comm import all_gather_into, reduce_scatter_sum
from .lazy import Materializer, has_meta_params
from .nvme import NvmeStore
from .pool import PoolMember
from .precision import DynamicLossScaler
from .search import default_candidates, pack, search_chunk_size
from .staging import StagingPool, huge_mapping, staged_bytes
from .swap import READ_ONLY, ParamFetcher, ShardSwapper
from .tiers import (
    AccessOrder,
    Tier,
    peak_rss_bytes,
    release_host_memory,
    static_placement,
)
from .tracer import ActivationTracer

S = SlotState
_WORKING_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def default_decay_filter(name: str, param: torch.Tensor) -> bool:
    """Decay matrices and embeddings (ndim >= 2); never biases or norm gains."""
    return param.ndim >= 2


@dataclass
class ChunkConfig:
    """How to chunk, where to place, how much memory each tier may use.

    * ``chunk_size``: elements per chunk; ``None`` searches ``search_range`` in steps of
      ``search_interval`` for the size with the least padding.
    * ``dtype``: working dtype of the chunks the model computes with. ``float32``: the rank's
      shard *is* the master copy; ``bfloat16`` / ``float16``: a separate fp32 master shard,
      and fp16 uses dynamic loss scaling (``init_scale``, ``growth_interval``).
    * ``offload_param_frac`` / ``offload_optim_frac`` (Colossal-AI static placement): the
      fraction of chunk bytes, counted from the first chunk, whose working parameter shard /
      fp32 master + gradient shard + optimizer state live on ``host`` instead of ``device``.
      A chunk whose parameters are on host must keep its optimizer state there too, so
      ``offload_param_frac <= offload_optim_frac``.
    * ``device_budget`` / ``host_budget``: bytes each tier may hold. With a device budget,
      gathered chunks stay cached after use and the one used furthest in the future (access
      order recorded in the first step) is evicted when the budget would be exceeded.
    * ``keep_gathered``: keep gathered chunks for the whole step (ZeRO-2-like memory, fewer
      gathers); they are released after ``optimizer.step()`` since the shards changed.
      ``keep_gathered_frac`` does this for a fraction of the chunk bytes only, counted from the
      *last* chunk: those are the first that backward needs again, so keeping them saves the
      re-gathers that are closest together in time. ``keep_gathered=True`` is frac 1.0.
    * ``decay_filter(name, param)``: which params get decoupled weight decay; decay and no-decay
      params are packed into separate chunks so one fused call per shard has one decay value.
    * ``nvme_dir`` / ``nvme_optim_frac``: the fraction of chunk bytes, from the first chunk,
      whose optimizer state (and fp32 master, where it is not the working shard itself) lives
      in a preallocated file under ``nvme_dir`` (see :mod:`offload.nvme`); the optimizer reads
      it ``nvme_prefetch`` chunks ahead and writes it back behind (:mod:`offload.swap`), with
      ``nvme_io_threads`` requests in flight. Those chunks' gradient shards and the optimizer
      kernel stay on host; ``nvme_optim_frac <= offload_optim_frac``. The file is sized for
      AdamW (two fp32 states per element).
    * ``init_fn`` / ``param_source``: for a model built on the ``meta`` device, how each chunk's
      parameters are filled when the chunk is built (see :mod:`offload.lazy`): from
      ``param_source.get(names)`` (e.g. :class:`offload.lazy.SafetensorsSource`), else by
      ``init_fn(module)`` (default: the HF model's ``_init_weights``).
    * ``nvme_param_frac`` (ZeRO-Infinity): the fraction of chunk bytes whose parameter shard
      (fp32: it is the master) and gradient shard live on NVMe too; their shards are read
      ``nvme_prefetch`` chunks ahead of use in forward and backward (by the access order
      recorded in the first step) and gradients are written out as backward produces them.
      ``nvme_param_frac <= nvme_optim_frac``; fp32 working dtype.
    * ``gather_prefetch`` (several ranks): all-gathers started this many chunks ahead of use,
      along the access order recorded in the first step, so they run while the current module
      computes (like FSDP's forward/backward prefetch). Each one holds a gathered chunk early;
      under a device budget a prefetch happens only when it fits. 0 = gather on demand.
    * ``placement``: ``static`` uses the fractions above as given; ``auto`` ignores them and
      picks the least offloading that fits ``device_budget`` / ``host_budget`` (optimizer state
      to host first, then parameters, then NVMe if ``nvme_dir`` is set; at chunk granularity;
      the chosen fractions are in ``mgr.fractions``), reserving ``activation_bytes`` of the
      device for non-model memory (activations, temporaries: an estimate such as
      ``colossus plan``'s; the first training forward measures it, ``mgr.activations``).
    * ``reduce_in_flight`` (several ranks): gradient reduce-scatters left running while
      backward goes on (each keeps its chunk's gradient buffer until it completes).
    """

    chunk_size: int | None = None
    dtype: torch.dtype = torch.float32
    offload_param_frac: float = 0.0
    offload_optim_frac: float = 0.0
    device_budget: int | None = None
    host_budget: int | None = None
    keep_gathered: bool = False
    keep_gathered_frac: float = 0.0
    device: str | torch.device | None = None
    search_range: tuple[int, int] = (1 << 20, 1 << 26)
    search_interval: int = 1 << 18
    decay_filter: Callable[[str, torch.Tensor], bool] = field(default=default_decay_filter)
    init_scale: float = 2.0**16
    growth_interval: int = 2000
    nvme_dir: str | None = None
    nvme_optim_frac: float = 0.0
    nvme_param_frac: float = 0.0
    nvme_prefetch: int = 2
    nvme_io_threads: int = 8
    gather_prefetch: int = 1
    reduce_in_flight: int = 2
    placement: str = "static"
    activation_bytes: int = 0
    init_fn: Callable[[nn.Module], None] | None = None
    param_source: Any = None

    def __post_init__(self) -> None:
        if self.dtype not in _WORKING_DTYPES:
            raise ValueError(f"dtype must be one of {_WORKING_DTYPES}, got {self.dtype}")
        for k in (
            "offload_param_frac",
            "offload_optim_frac",
            "keep_gathered_frac",
            "nvme_optim_frac",
            "nvme_param_frac",
        ):
            v = getattr(self, k)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"{k} must be in [0, 1], got {v}")
        if self.offload_param_frac > self.offload_optim_frac:
            raise ValueError(
                f"offload_param_frac={self.offload_param_frac} > offload_optim_frac="
                f"{self.offload_optim_frac}: a chunk whose parameters live on host must keep its "
                "fp32 master and optimizer state on host too (raise offload_optim_frac)"
            )
        if self.chunk_size is not None and self.chunk_size <= 0:
            raise ValueError(f"chunk_size must be positive, got {self.chunk_size}")
        if self.nvme_optim_frac > 0 and not self.nvme_dir:
            raise ValueError("nvme_optim_frac > 0 needs nvme_dir (a directory on a fast disk)")
        if self.nvme_optim_frac > self.offload_optim_frac:
            raise ValueError(
                f"nvme_optim_frac={self.nvme_optim_frac} > offload_optim_frac="
                f"{self.offload_optim_frac}: NVMe-resident optimizer state is stepped on host, "
                "so those chunks must be offloaded (raise offload_optim_frac)"
            )
        if self.nvme_param_frac > self.nvme_optim_frac:
            raise ValueError(
                f"nvme_param_frac={self.nvme_param_frac} > nvme_optim_frac={self.nvme_optim_frac}"
                ": a chunk whose parameters live on NVMe keeps its optimizer state there too"
            )
        if self.nvme_param_frac > 0 and self.dtype != torch.float32:
            raise ValueError(
                "nvme_param_frac needs the fp32 working dtype (the shard is the master)"
            )
        if self.nvme_prefetch < 0 or self.nvme_io_threads < 1:
            raise ValueError("nvme_prefetch must be >= 0 and nvme_io_threads >= 1")
        if self.placement not in ("static", "auto"):
            raise ValueError(f"placement must be 'static' or 'auto', got {self.placement!r}")
        if self.activation_bytes < 0:
            raise ValueError(f"activation_bytes must be >= 0, got {self.activation_bytes}")
        if self.gather_prefetch < 0 or self.reduce_in_flight < 0:
            raise ValueError("gather_prefetch and reduce_in_flight must be >= 0")


class ChunkManager:
    """Owns every chunk of ``module``'s parameters; see the module docstring for the protocol.

    ``process_group=None`` uses the default group when torch.distributed is initialised, else
    runs single-process. Parameters are moved into chunks at construction: afterwards each
    ``param.data`` is a view into a chunk (while resident) or an empty placeholder.
    """

    def __init__(
        self,
        module: nn.Module,
        config: ChunkConfig | None = None,
        process_group: Any = None,
        dry_run_world_size: int | None = None,
        pool: PoolMember | None = None,
    ) -> None:
        self.config = cfg = config or ChunkConfig()
        self.group = process_group
        dry = dry_run_world_size is not None
        if dry:  # plan only: lay out chunks and tiers for that many ranks, allocate nothing
            self.world_size, self.rank = dry_run_world_size, 0
        elif dist.is_available() and dist.is_initialized():
            self.world_size = dist.get_world_size(process_group)
            self.rank = dist.get_rank(process_group)
        else:
            self.world_size, self.rank = 1, 0
        self._module = module
        first = next(module.parameters(), None)
        if first is None:
            raise ValueError("module has no parameters to manage")
        self.device = torch.device(cfg.device) if cfg.device is not None else first.device
        self._materializer: Materializer | None = None
        if has_meta_params(module) and not dry:  # lazy init: materialised chunk by chunk below
            if self.device.type == "meta":
                self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
            self._materializer = Materializer(module, cfg.init_fn, cfg.param_source)
        self.tiers: dict[str, Tier] = {
            "device": Tier("device", self.device, cfg.device_budget),
            "host": Tier("host", torch.device("cpu"), cfg.host_budget),
        }
        # a budget shared with other managers (offload.pool): own accounting, the pool's budget
        self.pool = pool.pool if pool is not None else None
        if pool is not None:
            self.tiers.update(pool.pool.join(pool.name, self))
        if cfg.nvme_optim_frac > 0 or (cfg.placement == "auto" and cfg.nvme_dir):
            self.tiers["nvme"] = Tier("nvme", torch.device("cpu"))
        self.swapper: ShardSwapper | None = None
        self.fetcher: ParamFetcher | None = None
        self.dtype = cfg.dtype
        self.scaler = (
            DynamicLossScaler(cfg.init_scale, growth_interval=cfg.growth_interval)
            if cfg.dtype == torch.float16
            else None
        )
        self.order = AccessOrder()
        # non-model memory of the first training forward (bytes saved for backward, per module)
        self.activations: dict[str, Any] | None = None
        self._tracer: ActivationTracer | None = None
        self.evictions = 0
        self.gathers = 0
        self.prefetches = 0  # gathers started ahead of use (several ranks)
        self.moved_gathers = 0  # NVMe shards that became the payload by moving pages (no copy)
        self.reclaimed_gathers = 0  # NVMe chunks gathered from their own parked pages (no read)
        self._gathered_elems = 0
        self._reduced_elems = 0
        # a device budget caches every gathered chunk (evicted by furthest next use)
        self._cache_all = cfg.device_budget is not None
        # gradient buffers outlive a step only where memory is not budgeted and not sharded
        self._recycle_grads = (
            self.world_size == 1 and cfg.device_budget is None and cfg.host_budget is None
        )
        self._lazy: set[Chunk] = set()
        # multi-rank overlap: all-gathers started ahead of use (chunk index -> work) and
        # reduce-scatters still running (completed in issue order)
        self._gathering: dict[int, Any] = {}
        self._reducing: deque[tuple[Chunk, Any, torch.Tensor, torch.Tensor]] = deque()
        self._in_step = False
        self._flush_queued = False
        self._backward_active = False
        self._read_ahead_done = False
        self._grads_prepared = False
        self._found_inf: bool | None = None
        self._hooks: list[Any] = []
        self._placeholders: dict[torch.dtype, torch.Tensor] = {}
        self.chunks = self._build_chunks(module)
        self._slot_of: dict[int, tuple[Chunk, Slot]] = {
            id(s.param): (c, s) for c in self.chunks for s in c.slots
        }
        frac = 1.0 if cfg.keep_gathered else cfg.keep_gathered_frac
        nbytes = [c.capacity for c in reversed(self.chunks)]
        for c, keep in zip(reversed(self.chunks), static_placement(nbytes, frac)):
            c.keep_gathered = keep
        self._place(dry)
        if dry:
            return
        for c in self.chunks:
            self._init_storage(c)
            if self._materializer is not None or self.swapper is not None:
                release_host_memory()
        for c in self.chunks:  # bound only now: a lazy init_fn must never write into a chunk
            if c.payload_is_shard:
                c.bind()
        if self._materializer is not None:  # lazy init swapped the parameter objects
            self._materializer = None
            self._slot_of = {id(s.param): (c, s) for c in self.chunks for s in c.slots}
        self._install_hooks()

    # ================================================================ construction
    def _build_chunks(self, module: nn.Module) -> list[Chunk]:
        aliases: dict[int, list[str]] = defaultdict(list)
        for n, p in module.named_parameters(remove_duplicate=False):
            aliases[id(p)].append(n)
        named = list(module.named_parameters())  # tied weights appear once: stored once
        for n, p in named:
            if not p.is_floating_point():
                raise TypeError(f"parameter {n!r} has dtype {p.dtype}; only float params chunk")
        # decay / no-decay and trainable / frozen params go to separate chunks: one fused
        # optimizer call per shard then has a single weight-decay value and nothing to mask
        groups: dict[tuple[bool, bool], list[int]] = defaultdict(list)
        for i, (n, p) in enumerate(named):
            key = (p.requires_grad, p.requires_grad and bool(self.config.decay_filter(n, p)))
            groups[key].append(i)
        sizes = [[named[i][1].numel() for i in idx] for idx in groups.values()]
        cs = self.config.chunk_size
        if cs is None:
            lo, hi = self.config.search_range
            if self.world_size > 1:
                # sharded chunks are re-gathered on every use: a chunk holding half the model is
                # gathered several times a step (measured at 2 ranks, GPT-2 124M: auto 62M-element
                # chunks 7.7 s/step, 16M 5.6 s); cap the size so gathers stay fine-grained
                hi = max(lo, min(hi, 1 << 24))
            cands = default_candidates(sizes, lo, hi, self.config.search_interval)
            cs, _ = search_chunk_size(sizes, cands, self.world_size)
        self.chunk_size = cs
        specs = []
        for (req, decay), idx in groups.items():
            for members, cap in pack([named[i][1].numel() for i in idx], cs, self.world_size):
                specs.append((idx[members[0]], [named[idx[m]] for m in members], cap, req, decay))
        specs.sort(key=lambda s: s[0])  # chunk order = registration order of first param
        al = {k: tuple(v) for k, v in aliases.items()}
        return [
            Chunk(i, ps, cap, self.dtype, self.world_size, self.rank, al, req, decay)
            for i, (_, ps, cap, req, decay) in enumerate(specs)
        ]

    def _otier(self, c: Chunk) -> Tier:
        """Tier of the in-memory optimizer-side tensors (grad shard, master): host for NVMe."""
        return self.tiers["host" if c.optim_tier == "nvme" else c.optim_tier]

    def _separate_master(self, c: Chunk) -> bool:
        # fp32 working shard in the same memory as the optimizer: it *is* the master (no copy)
        return self.dtype != torch.float32 or self.tiers[c.param_tier].device != (
            self._otier(c).device
        )

    def _assign(self, fracs: tuple[float, float, float, float]) -> None:
        """Tiers per chunk from (offload_param, offload_optim, nvme_optim, nvme_param) fractions,
        each counted in chunk bytes from the first chunk (Colossal-AI semantics)."""
        nbytes = [c.capacity * self.dtype.itemsize for c in self.chunks]
        p_off, o_off, n_off, v_off = (static_placement(nbytes, f) for f in fracs)
        for c, po, oo, no, vo in zip(self.chunks, p_off, o_off, n_off, v_off):
            c.param_tier = "host" if po else "device"
            c.optim_tier = "nvme" if no and c.requires_grad else ("host" if oo else "device")
            if vo and c.requires_grad:
                c.param_tier = "nvme"

    def _needs(self) -> dict[str, int]:
        """Peak bytes per tier of the current assignment: model state, NVMe staging, the
        gathered working set and gradient buffers (what must fit before any work starts)."""
        cfg = self.config
        need = {t: 0 for t in (*self.tiers, "nvme")}
        max_nvme_shard = 0
        for c in self.chunks:
            n, w = c.shard_size, self.dtype.itemsize
            need[c.param_tier] += n * w
            if c.requires_grad:
                sep = int(self._separate_master(c))
                grad_tier = "nvme" if c.param_tier == "nvme" else self._otier(c).name
                need[grad_tier] += n * 4  # reduced gradient shard
                need[c.optim_tier] += n * 4 * (2 + sep)  # m, v (+ master)
                if c.optim_tier == "nvme":
                    max_nvme_shard = max(max_nvme_shard, n)
                    need["nvme"] += 4096 * 5  # extents are block-aligned
        if max_nvme_shard:
            need["host"] += self._staging_bytes()
        w = self.dtype.itemsize
        caps = sorted((c.capacity for c in self.chunks), reverse=True)
        # gradient buffers alive at once in backward: a tied embedding's (its first gradient
        # comes first, its last comes last), a shared no-decay chunk's, and the one being reduced;
        # on one rank without budgets every chunk keeps its buffer between steps (recycled)
        need["device"] += (sum(caps) if self._recycle_grads else sum(caps[:3])) * w
        needs_gather = self.world_size > 1 or self.tiers["host"].device != self.device
        if needs_gather or any(c.param_tier != "device" for c in self.chunks):
            need["device"] += caps[0] * w  # the gathered payload in use
            if self.world_size > 1:  # all-gathers started ahead of use
                need["device"] += sum(caps[1 : 1 + cfg.gather_prefetch]) * w
            kept = [c for c in self.chunks if c.keep_gathered]
            need["device"] += sum(c.capacity for c in kept) * w
        return need

    def _staging_bytes(self) -> int:
        """Host staging at its peak: the swap pipeline's depth + 2 buffer sets of (m, v,
        master, grad), plus for NVMe params the read-ahead buffers and the gradient
        write-behind buffers; each sized for the largest shards it may hold."""
        # fp32 shard bytes as the staging pool maps them (2 MiB steps from 2 MiB up)
        big = sorted(
            (staged_bytes(c.shard_size * 4) for c in self.chunks if c.optim_tier == "nvme"),
            reverse=True,
        )
        if not big:
            return 0
        depth = self.config.nvme_prefetch
        top = sum(big[: depth + 2])
        out = 4 * top
        if any(c.param_tier == "nvme" for c in self.chunks):
            out += sum(big[: depth + 1]) + top
        return out

    def _staged_grad_bytes(self) -> int:
        """Gradient buffers from the staging pool alive at once in backward (as the plan
        counts gradient buffers: the three largest)."""
        caps = sorted((c.capacity for c in self.chunks if self._grads_staged(c)), reverse=True)
        return sum(staged_bytes(n * 4) for n in caps[:3])

    def _budgeted(self, need: dict[str, int]) -> dict[str, int]:
        """``need`` as each tier's budget must hold it: plus the activation reserve on the
        device; on a CPU-only box the device tier is the same RAM, the host budget covers both."""
        checks = {t: n for t, n in need.items() if t != "nvme"}
        checks["device"] += self.config.activation_bytes
        if self.tiers["device"].device == self.tiers["host"].device:
            checks["host"] = checks["host"] + checks["device"]
        return checks

    def _over_budget(self, need: dict[str, int]) -> dict[str, int]:
        """Tiers whose budget ``need`` (plus the activation reserve on the device) exceeds."""
        return {
            t: n - self.tiers[t].budget
            for t, n in self._budgeted(need).items()
            if self.tiers[t].budget is not None and n > self.tiers[t].budget
        }

    def _heap_keep(self) -> int:
        """Freed heap memory the process may keep after an optimizer pass: what the next
        step's activations and autograd gradients take again without faulting in fresh pages
        (on a VM that returns freed memory to its host, ~0.1 s per step at 0.1 B parameters,
        ~10 % of the step at 1 B). All of it without a host budget. Under one, no more than
        the budget has room for by the plan and by the peak RSS measured so far (so what the
        heap keeps cannot lift a later peak above the budget); none in a budget shared with
        other models (their peaks are not ours to count)."""
        budget = self.tiers["host"].budget
        if budget is None:
            return 1 << 62
        if self.pool is not None:
            return 0
        return max(0, min(self._heap_slack, budget - peak_rss_bytes()))

    def _auto_fractions(self) -> tuple[float, float, float, float]:
        """``placement="auto"``: the least offloading that fits the budgets, at chunk
        granularity. Moves are tried cheapest first: optimizer state device -> host (touched
        once per step), then parameters device -> host (twice per step: forward and backward),
        then optimizer state host -> NVMe, then parameters host -> NVMe. On a CPU-only box device
        and host are one RAM, so only the NVMe moves can help (the host fractions follow them).
        Eviction of gathered chunks under the device budget stays Belady (furthest next use in
        the recorded order), and NVMe reads are issued ahead along the same order."""
        nbytes = [c.capacity * self.dtype.itemsize for c in self.chunks]
        total = sum(nbytes)
        prefix = [0]
        for b in nbytes:
            prefix.append(prefix[-1] + b)
        fr = [prefix[k] / total for k in range(len(nbytes) + 1)]  # k chunks from the first
        same = self.tiers["device"].device == self.tiers["host"].device
        cands: list[tuple[float, float, float, float]] = []
        if not same:
            cands += [(0.0, f, 0.0, 0.0) for f in fr]
            cands += [(f, 1.0, 0.0, 0.0) for f in fr]
        else:
            cands.append((0.0, 0.0, 0.0, 0.0))
        if self.config.nvme_dir:
            po = 1.0 if not same else 0.0
            cands += [(po, max(f, 0.0 if same else 1.0), f, 0.0) for f in fr]
            cands += [(max(f, po), 1.0, 1.0, f) for f in fr]
        best_over: dict[str, int] = {}
        for fracs in cands:
            if fracs[3] > 0 and self.dtype != torch.float32:
                break  # NVMe parameters need the fp32 working dtype
            self._assign(fracs)
            over = self._over_budget(self._needs())
            if not over:
                return fracs
            best_over = over
        more = ", ".join(f"{t} by {n} B" for t, n in best_over.items())
        hint = "" if self.config.nvme_dir else "; set nvme_dir to let auto use an NVMe tier"
        raise ValueError(
            f"placement=auto: no placement fits the budgets even with the most offloading "
            f"(over {more}){hint}. Raise the budgets or use more ranks."
        )

    def _place(self, dry: bool = False) -> None:
        cfg = self.config
        if cfg.placement == "auto":
            fracs = self._auto_fractions()
        else:
            fracs = (
                cfg.offload_param_frac,
                cfg.offload_optim_frac,
                cfg.nvme_optim_frac,
                cfg.nvme_param_frac,
            )
        self.fractions = dict(
            zip(
                ("offload_param_frac", "offload_optim_frac", "nvme_optim_frac", "nvme_param_frac"),
                fracs,
            )
        )
        self._assign(fracs)
        need = self._needs()
        max_nvme_shard = max(
            (c.shard_size for c in self.chunks if c.optim_tier == "nvme" and c.requires_grad),
            default=0,
        )
        self.plan = dict(need)  # predicted peak bytes per tier (model state + staging + working)
        self.plan["device"] += cfg.activation_bytes
        over = self._over_budget(need)
        self._heap_slack = max(0, (self.tiers["host"].budget or 0) - self._budgeted(need)["host"])
        self.nvme_bytes = need.pop("nvme", 0)
        for t, more in over.items():  # before anything is allocated or created
            if not dry:
                b = self.tiers[t].budget
                raise ValueError(
                    f"{t} budget {b} B is too small: model state placed there needs {b + more} B "
                    f"({more} B more), including one gathered chunk + its gradient buffer"
                    + (" and the activation reserve" if cfg.activation_bytes else "")
                    + ". Raise the budget, offload more (offload_param_frac / offload_optim_frac, "
                    "nvme_optim_frac / nvme_param_frac, or placement=auto), use more ranks, or "
                    "a smaller chunk_size; `colossus plan` finds a placement that fits."
                )
        if self.nvme_bytes and not dry:
            store = NvmeStore(cfg.nvme_dir, self.nvme_bytes, io_threads=cfg.nvme_io_threads)
            self.swapper = ShardSwapper(store, max_nvme_shard, cfg.nvme_prefetch)
            if any(c.param_tier == "nvme" for c in self.chunks):
                self.fetcher = ParamFetcher(self.swapper, cfg.nvme_prefetch)

    def _placeholder(self, dtype: torch.dtype) -> torch.Tensor:
        if dtype not in self._placeholders:
            self._placeholders[dtype] = torch.empty(0, dtype=dtype, device=self.device)
        return self._placeholders[dtype]

    @torch.no_grad()
    def _init_storage(self, c: Chunk) -> None:
        # build the full chunk once (one chunk at a time: peak = model + one chunk)
        if self._materializer is not None:
            self._materializer.materialize(c.slots)
        flat = torch.zeros(c.capacity, dtype=torch.float32, device=self.device)
        for s in c.slots:
            flat[s.offset : s.offset + s.numel].copy_(s.param.data.reshape(-1))
            s.param.data = self._placeholder(self.dtype)  # drop the original storage
        mine = flat[c.shard_begin : c.shard_begin + c.shard_size]
        pt, ot = self.tiers[c.param_tier], self._otier(c)
        if c.param_tier == "nvme":  # the fp32 shard is the master; it and the grad live on disk
            assert self.swapper is not None
            self.swapper.register(c, ["master", "grad"])
            self.swapper.write_now(c, "master", mine)
            pt.account("param_shard", self.swapper.extents[(c.index, "master")].nbytes)
            pt.account("grad_shard", self.swapper.extents[(c.index, "grad")].nbytes)
            c.shard = c.master = None
            del flat, mine
            c.unbind(self._placeholder(self.dtype))
            return
        if c.requires_grad and not self._separate_master(c):
            c.master = c.shard = pt.put(mine.clone())  # fp32, same memory: shard is the master
        else:
            c.shard = pt.put(mine.to(self.dtype).clone())
            if c.requires_grad and c.optim_tier == "nvme":
                assert self.swapper is not None
                self.swapper.register(c, ["master"])
                self.swapper.write_now(c, "master", mine)
                self.tiers["nvme"].account("master", mine.nbytes)
            elif c.requires_grad:
                c.master = ot.put(mine.clone())
                ot.account("master", c.master.nbytes)
        pt.account("param_shard", c.shard.nbytes)
        del flat, mine
        if self.world_size == 1 and pt.device == self.device:
            c.payload, c.payload_is_shard = c.shard, True  # always resident, gather is a no-op
            c.resident = True
            for s in c.slots:
                c.transition(s, S.HOLD)
        else:
            c.unbind(self._placeholder(self.dtype))

    def _install_hooks(self) -> None:
        root = self._module
        self._hooks.append(root.register_forward_pre_hook(self._root_pre_forward, prepend=True))
        self._hooks.append(root.register_forward_hook(self._root_post_forward, always_call=True))
        for mod in root.modules():
            ps = list(mod.parameters(recurse=False))
            if not ps:
                continue
            entries = [self._slot_of[id(p)] for p in ps]
            chunks = list(dict.fromkeys(c for c, _ in entries))
            self._hooks.append(
                mod.register_forward_pre_hook(partial(self._pre_forward, entries, chunks))
            )
            # always_call: non-reentrant checkpointing stops a recomputed forward early by
            # raising; the post-hook must still drop the forward's reference to the chunks
            post = partial(self._post_forward, entries, chunks)
            self._hooks.append(mod.register_forward_hook(post, always_call=True))
        for c in self.chunks:
            for s in c.slots:
                if s.param.requires_grad:
                    h = s.param.register_post_accumulate_grad_hook(partial(self._on_grad, c, s))
                    self._hooks.append(h)

    def record_timeline(self, on: bool) -> dict[str, Any]:
        """Start (``on``) or stop recording bytes per tier at every change and every NVMe
        request's interval; stopping returns ``{"tiers": {name: [(t, bytes)]}, "io": [(t0, t1,
        "read"|"write", bytes)], "t0": start}`` for :func:`offload.timeline.plot_timeline`."""
        store = self.swapper.store if self.swapper is not None else None
        if on:
            self._timeline_t0 = time.perf_counter()
            for t in self.tiers.values():
                t.timeline = [(self._timeline_t0, t.used)]
            if store is not None:
                store.io_log = []
            return {}
        out = {
            "t0": getattr(self, "_timeline_t0", 0.0),
            "tiers": {n: t.timeline or [] for n, t in self.tiers.items()},
            "io": list(store.io_log or []) if store is not None else [],
        }
        for t in self.tiers.values():
            t.timeline = None
        if store is not None:
            store.io_log = None
        return out

    def close(self) -> None:
        """Release the NVMe tier (its files are deleted); the manager is unusable afterwards
        for chunks whose state lived there."""
        if self.fetcher is not None:
            self.fetcher.release_buffers()
        if self.swapper is not None:
            self.swapper.close()

    def remove_hooks(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()

    @property
    def module(self) -> nn.Module:
        """The wrapped module; hooks are installed, forward/backward work as usual."""
        return self._module

    # ======================================================================= hooks
    def _root_pre_forward(self, module: nn.Module, args: Any) -> None:
        if torch.is_grad_enabled():
            self.order.start_iteration()
            self._in_step = True
            self._read_ahead_done = False
            if self.activations is None and self._tracer is None:  # first training forward
                self._tracer = ActivationTracer(self._module, self._model_storages)
                self._tracer.__enter__()

    def _root_post_forward(self, module: nn.Module, args: Any, output: Any) -> None:
        if self._tracer is not None:
            tr, self._tracer = self._tracer, None
            tr.__exit__(None, None, None)
            self.activations = {"total": tr.total, "top": tr.top(8)}

    def _model_storages(self) -> Iterator[int]:
        for c in self.chunks:
            if c.payload is not None and c.resident:
                yield c.payload.untyped_storage().data_ptr()

    def _pre_forward(self, entries, chunks, module, args) -> None:
        self._release_lazy(keep=chunks)
        for c in chunks:
            self._fetch(c)
        for c, s in entries:
            s.fwd_refs += 1
            if s.state is not S.COMPUTE:
                c.transition(s, S.COMPUTE)

    def _post_forward(self, entries, chunks, module, args, output) -> None:
        for c, s in entries:
            s.fwd_refs -= 1
            if s.fwd_refs == 0 and not s.pinned:
                c.transition(s, c.rest_state(s))
        if torch.is_grad_enabled():
            tensors = [t for t in _tensors(output) if t.requires_grad]
            fired = [False]  # one pre-backward per forward call, whichever output's grad is first
            for t in tensors:
                t.register_hook(partial(self._pre_backward, entries, chunks, fired))
        self._lazy.update(chunks)

    def _pre_backward(self, entries, chunks, fired, grad) -> None:
        if fired[0]:
            return
        fired[0] = True
        self._backward_started()
        self._release_lazy(keep=chunks)
        for c in chunks:
            self._fetch(c)
        for c, s in entries:
            if s.state is S.READY_FOR_REDUCE:
                s.expected = s.grad_count + 1  # used again: the learned count was too low
            s.pinned = True
            if s.state is not S.COMPUTE:
                c.transition(s, S.COMPUTE)

    @torch.no_grad()
    def _on_grad(self, c: Chunk, s: Slot, param: torch.Tensor) -> None:
        g = param.grad
        if g is None:
            return
        param.grad = None  # the gradient now lives in the chunk, not on the param
        self._backward_started()
        if c.grad_buffer is None:
            nbytes = c.capacity * self.dtype.itemsize
            self._make_room(nbytes, exclude=c)
            # not zero-filled: a slot's first gradient is copied in, ranges nobody wrote (unused
            # params, padding) are zeroed at reduction; saves a memset + a read per element
            if c.spare_grad is not None:
                c.grad_buffer, c.spare_grad = c.spare_grad, None  # already accounted
            elif self._grads_staged(c):
                # written to NVMe as it is (no copy into a write buffer), and pooled memory:
                # no page faults for a fresh chunk-sized buffer every backward
                assert self.swapper is not None
                c.grad_buffer = self.swapper.store.empty(c.capacity, self.dtype)
                self.tiers["device"].account("grad_buffer", nbytes)
            else:
                c.grad_buffer = torch.empty(c.capacity, dtype=self.dtype, device=self.device)
                self.tiers["device"].account("grad_buffer", nbytes)
            c.written = set()
        dst = c.grad_buffer[s.offset : s.offset + s.numel].view(s.shape)
        if id(s) in c.written:
            dst.add_(g)
        else:
            dst.copy_(g)
            c.written.add(id(s))
        s.grad_count += 1
        s.pending = s.has_grad = True
        s.pinned = False
        if s.fwd_refs == 0:
            c.transition(s, c.rest_state(s))
        if c.grads_complete:
            self._reduce(c)
            if not self._cached(c) and c.idle and not c.payload_is_shard:
                self._release(c)

    def _backward_started(self) -> None:
        self._backward_active = True
        self._read_ahead_done = False
        self._grads_prepared = False
        self._found_inf = None
        if not self._flush_queued:
            self._flush_queued = True
            # runs when the current autograd graph task finishes
            torch.autograd.Variable._execution_engine.queue_callback(self._flush_callback)

    def _flush_callback(self) -> None:
        self._flush_queued = False
        self.finish_backward()

    # ============================================================ gather / release
    def _fetch(self, c: Chunk) -> None:
        self.order.record(c.index)
        if c.index in self._gathering:  # started ahead of use: wait for it
            self._end_gather(c)
        elif c.resident:
            if self.fetcher is not None:
                self.fetcher.cancel(c)  # predicted as a fetch, but it never left
        else:
            self._make_room(c.capacity * self.dtype.itemsize, exclude=c)
            self._begin_gather(c, async_op=False)
            self._end_gather(c)
        self._prefetch_gathers()
        if (
            self._in_step
            and self.swapper is not None
            and not self._read_ahead_done
            and self.order.frozen
            and not self._upcoming(c)  # no parameter read left in this forward + backward
        ):
            self._optim_read_ahead()

    @torch.no_grad()
    def _begin_gather(self, c: Chunk, async_op: bool) -> None:
        nbytes = c.capacity * self.dtype.itemsize
        if c.payload is None:
            c.payload = self._new_payload(c)
        elif c.payload_map is None:  # same storage as before: autograd's views see the new data
            c.payload.untyped_storage().resize_(nbytes)
        # a payload mapping keeps its address and takes pages from the staging pool (no
        # faults); on one rank (tag) they may already hold the shard, or take the read's pages
        tag = self._payload_tag(c)
        pool = self._staging_pool() if c.payload_map is not None else None
        filled = tag is not None and pool.reclaim(c.payload_map, tag)  # no read, no copy
        if filled:
            self.reclaimed_gathers += 1
            self.fetcher.cancel(c)  # a read predicted anyway (another chunk took the pages)
        staged = self._fetch_nvme_shard(c) if c.param_tier == "nvme" and not filled else None
        if pool is not None and not filled:
            # the shard just read is the whole payload: its pages move there (no copy) unless
            # a write-back still reads them (a handed-over master)
            filled = (
                tag is not None
                and staged is not None
                and staged.dtype == self.dtype
                and not self.fetcher.writing(staged)
                and pool.hand_pages(staged, c.payload_map)
            )
            self.moved_gathers += filled
            if not filled:
                pool.unpark(c.payload_map)
        if pool is not None:
            self._account_staging()  # pages left the pool (counted as gathered below)
        c.payload_tag = tag
        work = None
        if not filled:
            # host -> device copy on a GPU, else none
            src = self.tiers["device"].put(c.shard if staged is None else staged[: c.shard_size])
            with _preserve_version(c.payload):
                if self.world_size > 1:
                    work = all_gather_into(c.payload, src, self.group, async_op=async_op)
                else:
                    c.payload.copy_(src)
        if staged is not None:
            self.fetcher.give(staged)
        self.tiers["device"].account("param_gathered", nbytes)
        self.gathers += 1
        self._gathered_elems += c.capacity
        self._gathering[c.index] = work

    def _payload_tag(self, c: Chunk) -> tuple[int, int] | None:
        """What a one-rank NVMe parameter chunk's payload holds once gathered now: its shard
        at the current version (bumped by every write of it). Parked with that tag on release,
        the pages serve the next gather of the same version without a read (the pool keeps
        them until another gather takes them). Several ranks: never (each rank would decide
        alone whether to all-gather)."""
        if c.payload_map is None or c.param_tier != "nvme" or self.world_size != 1:
            return None
        assert self.swapper is not None
        return (c.index, self.swapper.version[(c.index, self.fetcher.key)])

    def _parked_copy(self, c: Chunk) -> bool:
        """Whether the staging pool still holds ``c``'s current shard in parked pages."""
        tag = self._payload_tag(c)
        return tag is not None and self._staging_pool().holds(len(c.payload_map), tag)

    def _staging_pool(self) -> StagingPool:
        assert self.swapper is not None
        return self.swapper.store.staging

    def _new_payload(self, c: Chunk) -> torch.Tensor:
        """The gathered chunk's storage. An NVMe parameter chunk on CPU is gathered anew at
        every use, and a fresh allocation each time is faulted in 4 KiB at a time (measured
        here: ~0.3 s of kernel time per forward for 0.8 GB of gathers at 0.1 B parameters):
        its payload is an anonymous huge-page mapping whose pages are parked in the staging
        pool on release (:meth:`offload.staging.StagingPool.park`: moved, not freed) and moved
        back at the next gather; the address stays, so autograd's saved views stay valid, as
        with a storage resized to 0 and back."""
        if c.param_tier == "nvme" and self.device.type == "cpu" and sys.platform == "linux":
            c.payload_map = huge_mapping(staged_bytes(c.capacity * self.dtype.itemsize))
            return torch.frombuffer(c.payload_map, dtype=self.dtype, count=c.capacity)
        return torch.empty(c.capacity, dtype=self.dtype, device=self.device)

    def _end_gather(self, c: Chunk) -> None:
        work = self._gathering.pop(c.index)
        if work is not None:
            work.wait()
        c.resident = True
        c.bind()
        for s in c.slots:
            c.transition(s, S.HOLD)

    def _prefetch_gathers(self) -> None:
        """Start the all-gathers of the next chunks of the recorded access order, so they run
        while the current module computes (up to ``gather_prefetch`` in flight). Only within
        the current forward+backward: the optimizer step changes the shards, so nothing is
        gathered across it. Never evicts for a prefetch: under a device budget, a chunk is
        prefetched only if it fits now. Every rank makes the same decisions (same order, same
        budget), so the collectives match."""
        want = self.config.gather_prefetch
        if self.world_size == 1 or want <= 0 or not self._in_step or not self.order.frozen:
            return
        seq, dev = self.order.sequence, self.tiers["device"]
        for i in range(self.order.position, len(seq)):
            if len(self._gathering) >= want:
                return
            nxt = self.chunks[seq[i]]
            if nxt.resident or nxt.index in self._gathering or nxt.param_tier == "nvme":
                continue
            if not dev.fits(nxt.capacity * self.dtype.itemsize):
                return
            self._begin_gather(nxt, async_op=True)
            self.prefetches += 1

    def _drain(self) -> None:
        """Finish every collective started ahead (gathers become resident chunks, reduced
        gradients land in their shards)."""
        for i in list(self._gathering):
            self._end_gather(self.chunks[i])
        while self._reducing:
            self._complete_reduce()

    def _fetch_nvme_shard(self, c: Chunk) -> torch.Tensor:
        """``c``'s shard from NVMe (prefetched if predicted), then start the next reads: along
        the recorded access order once it is known, else by chunk index (forward ascends,
        backward descends)."""
        assert self.fetcher is not None
        buf = self.fetcher.take(c)
        for nxt in self._upcoming(c):
            self.fetcher.prefetch(nxt)
        return buf

    def _upcoming(self, c: Chunk) -> list[Chunk]:
        want = self.fetcher.depth if self.fetcher is not None else 0
        out: list[Chunk] = []
        if self.order.frozen:
            seq, pos = self.order.sequence, self.order.position
            # past the end of backward comes the optimizer step, which rewrites the shards: a
            # read of the next forward's chunks then would be stale (the update pass hands
            # those over itself); outside training the order wraps around
            end = len(seq) if self._in_step else pos + len(seq)
            for i in range(pos, end):
                nxt = self.chunks[seq[i % len(seq)]]
                if len(out) >= want:
                    break
                # c itself is not resident yet while it is being fetched: a read of it now
                # would be cancelled as soon as it is used again (a wasted read)
                if (
                    nxt.param_tier == "nvme"
                    and not nxt.resident
                    and nxt is not c
                    and nxt not in out
                    and not self._parked_copy(nxt)  # its pages still hold the shard
                ):
                    out.append(nxt)
            return out
        step = -1 if self._backward_active else 1
        i = c.index + step
        while 0 <= i < len(self.chunks) and len(out) < want:
            nxt = self.chunks[i]
            if nxt.param_tier == "nvme" and not nxt.resident and not self._parked_copy(nxt):
                out.append(nxt)
            i += step
        return out

    def _release(self, c: Chunk) -> None:
        if c.payload_is_shard or not c.resident:
            return
        for s in c.slots:
            c.transition(s, S.FREE)  # raises unless every slot is HOLD
        if c.grad_buffer is not None:
            raise RuntimeError(f"chunk {c.index} released with unreduced gradients (a bug)")
        c.unbind(self._placeholder(self.dtype))
        assert c.payload is not None
        # free the memory itself: autograd may hold views of this storage until backward
        self.tiers["device"].account("param_gathered", -c.capacity * self.dtype.itemsize)
        if c.payload_map is not None:  # address kept; the pages parked for the next gather
            if self._staging_pool().park(c.payload_map, tag=c.payload_tag):
                self._account_staging()  # the pool holds them now: host staging, not gathered
            else:
                c.payload_map.madvise(mmap.MADV_DONTNEED)  # to the kernel, faulted in again
        else:
            c.payload.untyped_storage().resize_(0)
        c.resident = False

    def _cached(self, c: Chunk) -> bool:
        """Stays gathered after use until the step ends (or a budget evicts it)."""
        return self._cache_all or c.keep_gathered

    def _release_lazy(self, keep: list[Chunk]) -> None:
        frozen = self.order.frozen
        for c in list(self._lazy):
            if c in keep or self._cached(c):
                continue
            if frozen and self.order.next_use(c.index) <= _REUSE_WINDOW:
                # used again within the next few accesses (a block's weights chunk around its
                # layer norm, whose gains sit in the no-decay chunk): releasing it now would
                # only gather (or read from NVMe) the same bytes again a module later
                continue
            self._lazy.discard(c)
            if c.resident and c.idle:
                self._release(c)

    def _make_room(self, nbytes: int, exclude: Chunk) -> None:
        dev = self.tiers["device"]
        if self.pool is not None and not dev.fits(nbytes):
            self.pool.make_room(self, nbytes)  # idle models' gathered chunks go first
        while not dev.fits(nbytes):
            cands = [
                c.index
                for c in self.chunks
                if c is not exclude and c.resident and not c.payload_is_shard and c.idle
            ]
            v = self.order.victim(cands)
            if v is None and (self._gathering or self._reducing):
                # collectives started ahead hold memory: finish them (a prefetched chunk
                # becomes evictable, a reduced gradient buffer is freed) and look again
                self._drain()
                continue
            if v is None:
                raise MemoryError(
                    f"device budget {dev.budget} B exceeded: chunk {exclude.index} needs "
                    f"{nbytes} B, {dev.used} B are in use and no idle chunk can be evicted. "
                    "Raise device_budget, offload more, or use a smaller chunk_size."
                )
            self._release(self.chunks[v])
            self._lazy.discard(self.chunks[v])
            self.evictions += 1

    # =================================================================== reduction
    @torch.no_grad()
    def _reduce(self, c: Chunk) -> None:
        buf = c.grad_buffer
        assert buf is not None
        for s in c.slots:  # what no gradient reached this backward is zero
            if id(s) not in c.written:
                buf[s.offset : s.offset + s.numel].zero_()
        buf[c.used :].zero_()
        c.grad_buffer = None  # the buffer lives on in the reduction until it completes
        for s in c.slots:
            if s.pending:
                s.pending = False
                if s.state is S.READY_FOR_REDUCE:
                    c.transition(s, S.HOLD)
        n = self.world_size
        if n == 1:
            self._finish_reduce(c, buf, buf)
            return
        if self.dtype == torch.float16:
            buf.div_(n)  # fp16: average before the sum so it cannot overflow
        out = torch.empty(c.shard_size, dtype=self.dtype, device=self.device)
        self._reduced_elems += c.capacity
        # runs while backward goes on; completed in issue order, at most reduce_in_flight open
        work = reduce_scatter_sum(out, buf, self.group, async_op=True)
        self._reducing.append((c, work, out, buf))
        while len(self._reducing) > self.config.reduce_in_flight:
            self._complete_reduce()

    def _complete_reduce(self) -> None:
        c, work, out, buf = self._reducing.popleft()
        if work is not None:
            work.wait()
        self._finish_reduce(c, out, buf)

    @torch.no_grad()
    def _finish_reduce(self, c: Chunk, out: torch.Tensor, buf: torch.Tensor) -> None:
        n = self.world_size
        ot = self._otier(c)
        g = ot.put(out.float())  # no copy when already fp32 on that tier
        if n > 1 and self.dtype != torch.float16:
            g.div_(n)
        if c.param_tier == "nvme":
            self._write_nvme_grad(c, g, owned=g is buf and self._grads_staged(c))
        elif c.grad_shard is None:
            c.grad_shard = g  # one rank, fp32, same tier: the buffer itself, no copy
            ot.account("grad_shard", c.grad_shard.nbytes)
        else:
            c.grad_shard.add_(g)
        self.tiers["device"].account("grad_buffer", -buf.numel() * buf.element_size())

    def _grads_staged(self, c: Chunk) -> bool:
        """Whether ``c``'s gradient buffer comes from the NVMe staging pool: one rank (the
        buffer is the reduced shard), fp32 (written as it is), compute device = host RAM."""
        return (
            c.param_tier == "nvme"
            and self.swapper is not None
            and self.world_size == 1
            and self.dtype == torch.float32
            and self.device.type == "cpu"
        )

    def _write_nvme_grad(self, c: Chunk, g: torch.Tensor, owned: bool = False) -> None:
        """Gradient shard of an NVMe chunk: accumulated with what earlier micro-batches wrote,
        its squared norm kept for clipping, and written out in the background (``owned``:
        ``g`` is a staging buffer nobody else uses, written without a copy)."""
        sw = self.swapper
        assert sw is not None
        if sw.valid(c, "grad"):  # gradient accumulation: read, add, write back
            old = sw.store.empty(c.shard_size, torch.float32)
            sw.read_async(c, "grad", old).result()
            old.add_(g)
            g, owned = old, True
        c.grad_sq = float(torch.linalg.vector_norm(g)) ** 2  # no chunk-sized temporary
        c.grad_coef = 1.0
        sw.write_async(c, "grad", g, max_pending=self.config.nvme_prefetch + 2, copy=not owned)

    def finish_backward(self) -> None:
        """Reduce everything still pending (unused params, partial chunks), unpin, release.

        Runs automatically when a backward pass ends; calling it again is a no-op.
        """
        if not self._backward_active:
            return
        self._backward_active = False
        self._in_step = False
        self._drain()
        for c in self.chunks:  # chunk order: every rank issues the same collectives
            for s in c.slots:
                if s.fwd_refs:  # a forward that never finished (cannot outlive the backward)
                    s.fwd_refs = 0
                    s.pinned = True
                if s.pinned:
                    s.pinned = False
                    if s.fwd_refs == 0:
                        c.transition(s, c.rest_state(s))
                if s.state is S.HOLD_AFTER_BWD:  # no more contributions are coming
                    s.expected = s.grad_count
                    c.transition(s, S.READY_FOR_REDUCE)
            if c.grad_buffer is not None:
                self._reduce(c)
            for s in c.slots:
                if s.param.requires_grad:
                    s.expected = s.grad_count  # learned for the next step; 0 = unused
                s.grad_count = 0
        for c in self.chunks:
            if not self._cached(c) and c.resident and c.idle:
                self._release(c)
        self._lazy.clear()
        if not self.order.frozen:
            self.order.freeze()
            self._keep_hot_chunks()

    def _keep_hot_chunks(self) -> None:
        """After the first step: a small chunk that many modules use (biases and norm gains of
        every layer share one no-decay chunk) would be released and gathered again between
        each use (an all-gather, or an NVMe read, every time). Keep such chunks gathered for the
        step: at most the size of a median chunk each, used at least 4 times per step."""
        if self._cache_all or not self.order.sequence:
            return
        uses: dict[int, int] = defaultdict(int)
        for i in self.order.sequence:
            uses[i] += 1
        caps = sorted(c.capacity for c in self.chunks)
        median = caps[len(caps) // 2]
        for c in self.chunks:
            if not c.payload_is_shard and uses[c.index] >= 4 and c.capacity <= median:
                c.keep_gathered = True

    def backward(self, loss: torch.Tensor) -> None:
        """``loss.backward()`` (scaled under fp16) and make sure every gradient is reduced."""
        if self.scaler is not None:
            loss = loss * self.scaler.scale
        loss.backward()
        self.finish_backward()

    # ================================================================ step helpers
    def check_reduced(self) -> None:
        """Raise, naming them, if any parameter holds gradient that was never reduced."""
        bad = [
            s.name
            for c in self.chunks
            for s in c.slots
            if s.pending or s.state in (S.HOLD_AFTER_BWD, S.READY_FOR_REDUCE)
        ]
        if bad:
            raise RuntimeError(
                f"{len(bad)} parameter(s) received gradients that were never reduce-scattered: "
                f"{bad}. The end-of-backward reduction did not run (backward still running, "
                "interrupted, or gradients produced outside the manager's hooks); call "
                "mgr.finish_backward() after backward or use mgr.backward(loss)."
            )

    @torch.no_grad()
    def _prepare_grads(self) -> None:
        """Once per step: check reduction, unscale (fp16)."""
        if self._grads_prepared:
            return
        self.finish_backward()
        self._in_step = False
        self._drain()
        self.check_reduced()
        if self.scaler is not None:
            inv = 1.0 / self.scaler.scale
            for c in self.chunks:
                if c.grad_shard is not None:
                    c.grad_shard.mul_(inv)
        self._grads_prepared = True

    def _all_reduce(self, t: torch.Tensor, op=None) -> torch.Tensor:
        if self.world_size > 1:
            dist.all_reduce(t, op=op or dist.ReduceOp.SUM, group=self.group)
        return t

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float | None) -> torch.Tensor:
        """Clip all gradients by their global 2-norm over every shard of every rank.

        One all_reduce of the local sum of squares (padding is zero, so it adds nothing).
        Matches ``torch.nn.utils.clip_grad_norm_`` (coefficient ``max_norm / (norm + 1e-6)``,
        clamped to 1); ``max_norm=None`` only measures. Returns the total norm (inf/nan on fp16
        overflow: the step is skipped).
        """
        self._prepare_grads()
        sq = torch.zeros((), dtype=torch.float32, device=self.device)
        shards = [c.grad_shard for c in self.chunks if c.grad_shard is not None]
        if shards:  # one multi-tensor kernel, no temporaries (per device the shards live on)
            for dev in {t.device for t in shards}:
                norms = torch._foreach_norm([t for t in shards if t.device == dev])
                sq += self.tiers["device"].put(torch.stack(norms).pow(2).sum())
        for c in self.chunks:
            if c.grad_shard is None and self._nvme_grad(c):  # norm taken when written to disk
                sq += c.grad_sq
        total = self._all_reduce(sq).sqrt()
        if not torch.isfinite(total):
            self._found_inf = True
            return total
        if self.scaler is not None:
            self._found_inf = False
        if max_norm is None:
            return total
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        for c in self.chunks:
            if c.grad_shard is not None:
                c.grad_shard.mul_(coef.to(c.grad_shard.device))
            elif self._nvme_grad(c):
                c.grad_coef *= float(coef)
        return total

    def found_inf(self) -> bool:
        """fp16: did any rank's gradient overflow this step (one all_reduce, cached)?"""
        if self.scaler is None:
            return False
        self._prepare_grads()
        if self._found_inf is None:
            bad = any(
                c.grad_shard is not None and not bool(torch.isfinite(c.grad_shard).all())
                for c in self.chunks
            )
            flag = torch.tensor([float(bad)], device=self.device)
            self._found_inf = bool(self._all_reduce(flag, dist.ReduceOp.MAX).item() > 0)
        return self._found_inf

    @torch.no_grad()
    def after_step(self) -> None:
        """Propagate updated masters to the working shards; gathered copies are now stale."""
        self._in_step = False
        self._drain()
        for c in self.chunks:
            if c.master is not None and c.shard is not c.master:
                c.shard.copy_(c.master)
            if c.resident and not c.payload_is_shard:
                self._release(c)
        self._lazy.clear()
        self._grads_prepared = False
        self._found_inf = None

    def _nvme_grad(self, c: Chunk) -> bool:
        """``c``'s gradient shard is on NVMe (and was written since the last zero_grad)."""
        return c.param_tier == "nvme" and self.swapper is not None and self.swapper.valid(c, "grad")

    def has_grad(self, c: Chunk) -> bool:
        return c.grad_shard is not None or self._nvme_grad(c)

    def zero_grad(self) -> None:
        for c in self.chunks:
            if c.param_tier == "nvme" and self.swapper is not None:
                self.swapper.invalidate(c, "grad")
            if c.grad_shard is not None:
                self._otier(c).account("grad_shard", -c.grad_shard.nbytes)
                if self._recycle_grads and c.grad_shard.device == self.device:
                    # one rank, no budget: the reduced shard *was* the gradient buffer; keep it
                    # for the next backward instead of faulting in fresh pages every step
                    c.spare_grad = c.grad_shard
                    self.tiers["device"].account("grad_buffer", c.spare_grad.nbytes)
                c.grad_shard = None
            for s in c.slots:
                s.has_grad = False
        self._grads_prepared = False
        self._found_inf = None

    def alloc_state(self, c: Chunk, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Zero-filled optimizer state for chunk ``c``'s shard, on its optimizer tier, accounted.

        For an NVMe chunk the state must have been declared (:meth:`declare_state`) and the
        chunk be resident (inside :meth:`optim_pass`); scalars (``step``) stay on host."""
        if name not in c.optim_state:
            if c.optim_tier == "nvme" and name != "step":
                raise RuntimeError(
                    f"chunk {c.index}: optimizer state {name!r} lives on NVMe and is not resident; "
                    "declare it (mgr.declare_state) and update inside mgr.optim_pass()"
                )
            n = 1 if name == "step" else c.shard_size
            tier = self._otier(c)
            t = tier.zeros(n, dtype)
            if name == "step":
                t = t.reshape(())
            c.optim_state[name] = t
            tier.account("optim_state", t.nbytes)
        return c.optim_state[name]

    def declare_state(self, names: tuple[str, ...]) -> None:
        """The optimizer's per-element fp32 state tensors: NVMe chunks get a home for each."""
        if self.swapper is None:
            return
        if len(names) > 2:
            raise ValueError(f"the NVMe tier is sized for 2 optimizer states (AdamW), got {names}")
        for c in self.chunks:
            if c.optim_tier == "nvme":
                before = self.swapper.nbytes(c)
                self.swapper.register(c, names)
                self.tiers["nvme"].account("optim_state", self.swapper.nbytes(c) - before)

    def optim_pass(self, chunks=None, write_back: bool = True, keys=None) -> Iterator[Chunk]:
        """Visit ``chunks`` (default: all, in order) with their master and optimizer state
        (or just ``keys``) resident: NVMe-resident state is read ahead and, with
        ``write_back``, written back behind (an updated NVMe master is copied into the working
        shard first)."""
        chunks = self.chunks if chunks is None else chunks
        if self.swapper is None:
            yield from chunks
            return
        update = write_back and keys is None
        hand: list[int] = []
        if write_back and self.fetcher is not None:
            self.fetcher.release_buffers()  # no read may overlap an update; memory for the pass
        kept: dict[tuple[int, str], torch.Tensor] = {}
        if update:
            chunks = self._pass_order(chunks)
            hand = self._hand_over(chunks)
            # the last gradients backward wrote are still in their write-behind buffers: the
            # pass takes them from there (once written) instead of reading them back
            kept = {key: buf for key, (_, buf) in self.swapper.pending.items() if key[1] == "grad"}
        self.swapper.settle_all()
        yield from self.swapper.iter_resident(
            chunks,
            write_back,
            on_resident=self._scale_nvme_grad,
            before_write=self._sync_shard,
            keys=keys,
            hand_over=hand,
            defer_writes=update,
            in_ram=kept,
        )
        if write_back:
            # the sets' memory goes back to the store's staging pool, which keeps it (up to
            # the planned staging peak) for the next step's reads instead of the kernel
            # faulting and zeroing fresh pages in backward
            self.swapper.release_buffers()
            self.swapper.store.staging.trim(self._staging_bytes() + self._staged_grad_bytes())
        for i, (buf, fut) in self.swapper.take_handed().items():
            assert self.fetcher is not None
            self.fetcher.adopt(self.chunks[i], buf, fut)
        release_host_memory(keep=self._heap_keep())
        self._account_staging()

    def _account_staging(self) -> None:
        host, sw = self.tiers["host"], self.swapper
        assert sw is not None
        in_use = sw.buffer_bytes() + (self.fetcher.buffer_bytes() if self.fetcher else 0)
        staging = max(in_use, sw.store.staging.bytes)  # the pool's idle memory is resident
        host.account("staging", staging - host.bytes["staging"])

    def _first_use(self) -> dict[int, int]:
        """Chunk index -> position of its first access in the recorded step (forward first)."""
        first: dict[int, int] = {}
        for pos, i in enumerate(self.order.sequence):
            first.setdefault(i, pos)
        return first

    def _pass_order(self, chunks) -> list[Chunk]:
        """Order of an update pass with NVMe state: the chunks the next forward needs first
        come last, so their updated masters are still in RAM when it starts (handed over to
        the parameter fetcher) and their write-backs overlap its compute. Any order gives the
        same result: each chunk's update is independent."""
        chunks = list(chunks)
        if self.fetcher is None or not self.order.frozen:
            return chunks
        first = self._first_use()
        never = len(self.order.sequence)
        return sorted(chunks, key=lambda c: -first.get(c.index, never))

    def _hand_over(self, chunks: list[Chunk]) -> list[int]:
        """The NVMe parameter chunks of this pass the next forward reads first, as many as
        ``depth`` full-size shards hold (a small chunk, such as the no-decay one, takes less
        than a slot): their updated masters go to the fetcher instead of back to disk and in
        again."""
        if self.fetcher is None or not self.order.frozen or self.fetcher.depth <= 0:
            return []
        first = self._first_use()
        mine = [c for c in chunks if c.param_tier == "nvme" and c.index in first]
        mine.sort(key=lambda c: first[c.index])
        room, out = self.fetcher.depth * max(c.shard_size for c in self.chunks), []
        for c in mine:
            if c.shard_size > room:
                break
            room -= c.shard_size
            out.append(c.index)
        return out

    def _optim_read_ahead(self) -> None:
        """Backward needs no more parameter reads: start reading the optimizer state of the
        coming update pass's first chunks (the disk would otherwise idle while backward
        computes). Only chunks the pass will visit, in its order."""
        if self.swapper is None or self._read_ahead_done:
            return
        self._read_ahead_done = True
        todo = [c for c in self.chunks if c.requires_grad and c.optim_tier == "nvme"]
        self.swapper.read_ahead(self._pass_order(todo))
        self._account_staging()

    @torch.no_grad()
    def _sync_shard(self, c: Chunk) -> None:
        if c.master is not None and c.shard is not None and c.shard is not c.master:
            c.shard.copy_(c.master)

    @torch.no_grad()
    def _scale_nvme_grad(self, c: Chunk) -> None:
        if c.param_tier == "nvme" and c.grad_shard is not None and c.grad_coef != 1.0:
            c.grad_shard.mul_(c.grad_coef)

    @torch.no_grad()
    def per_param_sq_norms(self, which: str = "grad") -> dict[str, torch.Tensor]:
        """Squared 2-norm of every trainable parameter (``which="param"``: fp32 master,
        ``"grad"``: reduced gradient) over its full logical tensor, though a parameter may
        straddle shards: each rank sums the squares of its segments, then one all_reduce.
        This is the building block for LAMB/LARS trust ratios."""
        if which not in ("param", "grad"):
            raise ValueError(f"which must be 'param' or 'grad', got {which!r}")
        names = [s.name for c in self.chunks if c.requires_grad for s in c.slots]
        index = {n: i for i, n in enumerate(names)}
        acc = torch.zeros(len(names), dtype=torch.float64, device=self.device)
        chunks = (
            self.optim_pass(write_back=False, keys=["master"]) if which == "param" else self.chunks
        )
        for c in chunks:
            t = c.master if which == "param" else c.grad_shard
            if not c.requires_grad or t is None:
                continue
            for g in c.segments:
                piece = t[g.offset_in_shard : g.offset_in_shard + g.length]
                acc[index[g.name]] += self.tiers["device"].put(piece.double().pow(2).sum())
        self._all_reduce(acc)
        return dict(zip(names, acc))

    # ============================================================ phases (offload.pool)
    def release_gathered(self) -> int:
        """Release every idle gathered chunk (its shard stays on its tier); returns how many.
        A model idle in a phase keeps no device copy; chunks in use are left alone."""
        n = 0
        for c in self.chunks:
            if c.resident and not c.payload_is_shard and c.idle:
                self._release(c)
                self._lazy.discard(c)
                n += 1
        return n

    @contextlib.contextmanager
    def inference(self) -> Iterator[None]:
        """No-grad forwards outside the training step (generation with a KV cache, scoring):
        chunks are fetched and released by the same hooks, but recorded in a separate access
        order, so the training step's recorded order (eviction, prefetch) is left as it was;
        on exit every idle gathered chunk is released. Collective over ranks, like a forward."""
        saved, self.order = self.order, AccessOrder()
        try:
            with torch.no_grad():
                yield
        finally:
            self.order = saved
            self.release_gathered()

    # ================================================================== reporting
    def min_nvme_bytes_per_step(self) -> int:
        """The least the NVMe tier must move per step (after the first) for this placement:
        each parameter shard read once (none for the chunks the update pass hands over to the
        next forward; every re-read on top, e.g. in backward after a release, is the price of
        not keeping parameters in RAM: on one rank a chunk whose parked pages still hold its
        shard is gathered from them instead), gradients written once; AdamW reads
        and writes m and v (and the fp32 master where it is not the working shard, or the NVMe
        parameter shard it updates) and reads back the gradient of an NVMe parameter shard
        (except the last few backward wrote, still in RAM)."""
        io = 0
        # the update pass hands the next forward's first chunks over in RAM (no forward read)
        # and takes the last gradients backward wrote from their write-behind buffers
        handed = set(self._hand_over([c for c in self.chunks if c.requires_grad]))
        kept = self._grads_kept()
        taken = self._state_taken_over()
        for c in self.chunks:
            if not c.requires_grad:
                continue
            s = c.shard_size * 4
            if c.param_tier == "nvme":
                io += (0 if c.index in handed else 1) * s + s
            if c.optim_tier == "nvme":
                master = int(self._separate_master(c) or c.param_tier == "nvme")
                grad = int(c.param_tier == "nvme" and c.index not in kept)
                saved = sum((c.index, k) in taken for k in ("exp_avg", "exp_avg_sq", "master"))
                io += (2 + master + grad - saved) * s  # reads
                io += (2 + master) * s  # writes
        return io

    def _state_taken_over(self) -> set[tuple[int, str]]:
        """NVMe state keys the read-ahead takes from the last pass's deferred write-back
        buffers instead of reading them (:meth:`ShardSwapper.read_ahead`): the pass defers the
        write-backs of its last ``nvme_prefetch + 2`` chunks, the read-ahead covers its first
        ``nvme_prefetch + 1``; they meet when the pass is short. Handed-over masters are the
        parameter fetcher's, not taken."""
        if self.swapper is None or not self.order.frozen:
            return set()
        todo = [c for c in self.chunks if c.requires_grad and c.optim_tier == "nvme"]
        todo = [c for c in self._pass_order(todo) if self.swapper.keys.get(c.index)]
        depth = self.config.nvme_prefetch
        deferred = {c.index for c in todo[-(depth + 2) :]}
        handed = set(self._hand_over(todo))
        return {
            (c.index, k)
            for c in todo[: depth + 1]
            if c.index in deferred
            for k in self.swapper.keys[c.index]
            if k not in READ_ONLY and not (k == "master" and c.index in handed)
        }

    def _grads_kept(self) -> set[int]:
        """NVMe gradient shards the update pass finds still in RAM: the last ones backward
        writes (its write-behind keeps ``nvme_prefetch + 2`` in flight), by last access in the
        recorded step."""
        if not self.order.frozen:
            return set()
        last = {i: pos for pos, i in enumerate(self.order.sequence)}
        mine = [c for c in self.chunks if c.param_tier == "nvme" and c.index in last]
        mine.sort(key=lambda c: last[c.index])
        return {c.index for c in mine[-(self.config.nvme_prefetch + 2) :]}

    def movement(self) -> dict[str, float]:
        """Bytes moved and time spent since construction (diff two calls for one step):
        ``nvme_read_bytes`` / ``nvme_written_bytes`` (disk <-> host), ``io_busy_s`` (wall time
        with a request in flight), ``io_wait_s`` (time compute waited for I/O: the part not
        overlapped), ``gathered_bytes`` / ``reduced_bytes`` (what this rank received in
        all-gathers / sent in reduce-scatters, ring model: (n-1)/n of the chunk)."""
        st = self.swapper.store if self.swapper is not None else None
        w = self.dtype.itemsize
        frac = (self.world_size - 1) / self.world_size
        return {
            "nvme_read_bytes": st.bytes_read if st else 0,
            "nvme_written_bytes": st.bytes_written if st else 0,
            "io_busy_s": st.busy_s if st else 0.0,
            "io_wait_s": self.swapper.io_wait_s if self.swapper is not None else 0.0,
            "gathered_bytes": self._gathered_elems * w * frac,
            "reduced_bytes": self._reduced_elems * w * frac,
        }

    def memory_report(self) -> dict[str, dict[str, int | None]]:
        """Bytes per tier and category right now (plus ``model_state``, ``total``, ``peak``,
        ``budget``). ``model_state`` = param shards + grad shards + masters + optimizer state."""
        return {name: t.report() for name, t in self.tiers.items()}

    def placement(self) -> list[dict[str, Any]]:
        """Where every chunk and its shard live right now."""
        return [
            {
                "index": c.index,
                "capacity": c.capacity,
                "used": c.used,
                "dtype": str(c.dtype),
                "param_tier": c.param_tier,
                "optim_tier": c.optim_tier,
                "resident": c.resident,
                "decay": c.decay,
                "params": [s.name for s in c.slots],
                "states": [s.state.name for s in c.slots],
            }
            for c in self.chunks
        ]

    def param_chunk(self, param: torch.Tensor) -> tuple[Chunk, Slot]:
        """The chunk and slot holding ``param``."""
        return self._slot_of[id(param)]

    # ================================================================ state dicts
    def state_dict_shard(self) -> dict[str, torch.Tensor]:
        """This rank's fp32 master shards, optimizer state and segment tables, as a flat dict of
        contiguous CPU tensors (``safetensors.torch.save_file`` takes it as is). ``meta`` holds
        the layout as JSON bytes, so loading can check it matches."""
        self._drain()
        sd: dict[str, torch.Tensor] = {}
        meta: dict[str, Any] = {
            "format": "offload.chunk_shard/1",
            "world_size": self.world_size,
            "rank": self.rank,
            "dtype": str(self.dtype),
            "chunks": [],
        }
        for c in self.optim_pass(write_back=False):
            k = f"chunk{c.index:05d}"
            segs = c.segments
            meta["chunks"].append(
                {
                    "capacity": c.capacity,
                    "names": [g.name for g in segs],
                    "params": len(c.slots),
                    # the whole chunk's layout, so shards can be consolidated offline
                    "slots": [[s.name, s.offset, list(s.shape), list(s.aliases)] for s in c.slots],
                }
            )
            src = c.master if c.master is not None else c.shard
            sd[f"{k}.master"] = src.detach().float().cpu().clone()
            for name, t in c.optim_state.items():
                sd[f"{k}.optim.{name}"] = t.detach().cpu().clone()
            sd[f"{k}.segments"] = torch.tensor(
                [[g.offset_in_shard, g.length, g.offset_in_param] for g in segs], dtype=torch.int64
            ).reshape(-1, 3)
        if self.scaler is not None:
            sd["loss_scaler"] = self.scaler.state_tensor()
        sd["meta"] = torch.tensor(list(json.dumps(meta).encode()), dtype=torch.uint8)
        return sd

    @torch.no_grad()
    def load_state_dict_shard(self, sd: dict[str, torch.Tensor]) -> None:
        """Load what :meth:`state_dict_shard` wrote on this rank (same world size and layout)."""
        self._drain()
        meta = json.loads(bytes(sd["meta"].tolist()).decode())
        if meta.get("format") != "offload.chunk_shard/1":
            raise ValueError(f"not an offload chunk shard (format={meta.get('format')!r})")
        if (meta["world_size"], meta["rank"]) != (self.world_size, self.rank):
            raise ValueError(
                f"shard was saved by rank {meta['rank']} of {meta['world_size']}; this is rank "
                f"{self.rank} of {self.world_size} (resharding is not supported: load the full "
                "parameters with iter_full_params/HF export instead)"
            )
        if len(meta["chunks"]) != len(self.chunks):
            raise ValueError(
                f"shard has {len(meta['chunks'])} chunks, model has {len(self.chunks)}"
            )
        for c, m in zip(self.chunks, meta["chunks"]):
            names = [g.name for g in c.segments]
            if m["capacity"] != c.capacity or m["names"] != names:
                raise ValueError(
                    f"chunk {c.index} layout differs: saved capacity {m['capacity']} with "
                    f"{m['names']}, current {c.capacity} with {names} (chunk_size or model changed)"
                )
        self.declare_state(
            tuple(sorted({k.split(".optim.")[1] for k in sd if ".optim." in k} - {"step"}))
        )
        for c in self.optim_pass(write_back=True):
            k = f"chunk{c.index:05d}"
            if c.master is not None:
                c.master.copy_(sd[f"{k}.master"])
            if c.shard is not None and c.shard is not c.master:
                c.shard.copy_(sd[f"{k}.master"])  # working copy (cast to the working dtype)
            for key, t in sd.items():
                if key.startswith(f"{k}.optim."):
                    name = key[len(f"{k}.optim.") :]
                    self.alloc_state(c, name, t.dtype).copy_(t.reshape(c.optim_state[name].shape))
        if self.scaler is not None and "loss_scaler" in sd:
            self.scaler.load_state_tensor(sd["loss_scaler"])
        for c in self.chunks:  # gathered copies predate the load
            if c.resident and not c.payload_is_shard and c.idle:
                self._release(c)

    @torch.no_grad()
    def iter_full_params(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield ``(name, full fp32 tensor)`` for every parameter, one chunk gathered at a time
        (never the whole model). Collective: every rank must exhaust the generator. Tied
        weights are yielded once, under their first name (like ``named_parameters()``)."""
        self._drain()
        for c in self.optim_pass(write_back=False, keys=["master"]):
            src = c.master if c.master is not None else c.shard.float()
            src = self.tiers["device"].put(src)
            if self.world_size > 1:
                full = torch.empty(c.capacity, dtype=torch.float32, device=self.device)
                all_gather_into(full, src.contiguous(), self.group)
            else:
                full = src
            for s in c.slots:
                yield s.name, full[s.offset : s.offset + s.numel].view(s.shape).clone()
            del full


_REUSE_WINDOW = 3
"""A used chunk whose next access (in the recorded order) is at most this many chunk accesses
ahead stays gathered instead of being released and gathered again."""


def _tensors(obj: Any) -> Iterator[torch.Tensor]:
    """Every tensor in a (nested) module output: tensors, tuples, lists, dicts, ModelOutputs."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for o in obj:
            yield from _tensors(o)
    elif isinstance(obj, dict):
        for o in obj.values():
            yield from _tensors(o)


def _preserve_version(t: torch.Tensor):
    # writing a gathered chunk into storage that autograd saved must not look like an in-place
    # modification of the saved tensors (they hold the same data they did in forward)
    f = getattr(torch.autograd, "_unsafe_preserve_version_counter", None)
    return f(t) if f is not None else contextlib.nullcontext()
