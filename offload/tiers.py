"""Memory tiers, byte accounting, static placement and Belady eviction.

A :class:`Tier` is a place where tensors live (``device``: where compute runs; ``host``: CPU RAM,
pinned when the device is a GPU). Every allocation the manager makes is accounted against a tier
and a category, so ``memory_report()`` is exact at any moment. On a CPU-only box both tiers are
the same memory and :meth:`Tier.put` returns the tensor itself: moving between them copies nothing.
The NVMe tier will implement the same small interface (``put`` / ``account`` / ``budget``) with
file-backed storage.

Example::

    >>> import torch
    >>> from offload.tiers import Tier, belady_victim
    >>> t = Tier("host", torch.device("cpu"), budget=1024)
    >>> x = t.put(torch.zeros(16))  # already there: no copy
    >>> t.account("param_shard", x.nbytes); t.used
    64
    >>> belady_victim([0, 1, 2, 0, 1, 2], position=3, candidates=[0, 2])  # 2 is needed last
    2
"""

from __future__ import annotations

import bisect
import time
from collections import defaultdict
from collections.abc import Iterable, Sequence

import torch

CATEGORIES: tuple[str, ...] = (
    "param_shard",  # this rank's working-dtype parameter shards
    "param_gathered",  # full chunks gathered for compute (transient; not when payload = shard)
    "grad_buffer",  # full-size gradient buffers while gradients arrive (transient)
    "grad_shard",  # reduced, averaged fp32 gradient shards
    "master",  # fp32 master shards when they are not the working shard itself
    "optim_state",  # optimizer state (Adam: exp_avg, exp_avg_sq, step)
    "staging",  # host buffers of the NVMe swap pipeline
)
MODEL_STATE = ("param_shard", "grad_shard", "master", "optim_state")


class Tier:
    """One memory tier with an optional byte budget and exact per-category accounting."""

    def __init__(self, name: str, device: torch.device, budget: int | None = None) -> None:
        self.name = name
        self.device = torch.device(device)
        self.budget = budget
        self.bytes: dict[str, int] = defaultdict(int)
        self.peak = 0
        self.peak_bytes: dict[str, int] = defaultdict(int)  # per category
        self.timeline: list[tuple[float, int]] | None = None  # (time, bytes) while recording

    @property
    def pin(self) -> bool:
        # pinned host memory makes host<->GPU copies asynchronous; meaningless without a GPU
        return self.name == "host" and torch.cuda.is_available()

    def put(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` on this tier; the same tensor when it is already there (no copy)."""
        if t.device == self.device:
            return t
        out = t.to(self.device, non_blocking=False)
        return out.pin_memory() if self.pin else out

    def empty(self, n: int, dtype: torch.dtype) -> torch.Tensor:
        t = torch.empty(n, dtype=dtype, device=self.device)
        return t.pin_memory() if self.pin else t

    def zeros(self, n: int, dtype: torch.dtype) -> torch.Tensor:
        return self.empty(n, dtype).zero_()

    def account(self, category: str, nbytes: int) -> None:
        if category not in CATEGORIES:
            raise KeyError(f"unknown memory category {category!r}")
        self.bytes[category] += nbytes
        if self.bytes[category] < 0:
            raise RuntimeError(f"tier {self.name}: {category} byte count went negative (a bug)")
        self.peak = max(self.peak, self.used)
        self.peak_bytes[category] = max(self.peak_bytes[category], self.bytes[category])
        if self.timeline is not None:
            self.timeline.append((time.perf_counter(), self.used))

    @property
    def used(self) -> int:
        return sum(self.bytes.values())

    def fits(self, nbytes: int) -> bool:
        return self.budget is None or self.used + nbytes <= self.budget

    def report(self) -> dict[str, int | None]:
        out: dict[str, int | None] = {c: self.bytes[c] for c in CATEGORIES}
        out["model_state"] = sum(self.bytes[c] for c in MODEL_STATE)
        out["total"] = self.used
        out["peak"] = self.peak
        for c in ("param_gathered", "grad_buffer"):
            out[f"peak_{c}"] = self.peak_bytes[c]
        out["budget"] = self.budget
        return out


def _load_libc():
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None
    except OSError:  # not glibc (macOS, musl): nothing to tune
        return None


_LIBC = _load_libc()
_MALLOC_TRIM = _LIBC.malloc_trim if _LIBC is not None else None
_M_MMAP_THRESHOLD = -3


def bound_host_memory(threshold: int = 1 << 20) -> bool:
    """Make glibc serve every allocation of ``threshold`` bytes or more with its own mmap, so
    freeing it returns the memory at once. Used when the host tier has a budget or NVMe is in
    play: chunk payloads, staging buffers and activations come and go every step, and with
    glibc's adaptive threshold the freed ones would stay in RSS. Returns whether it applied."""
    if _LIBC is None:
        return False
    return bool(_LIBC.mallopt(_M_MMAP_THRESHOLD, threshold))


def release_host_memory() -> None:
    """Hand freed heap pages back to the OS (glibc ``malloc_trim``).

    glibc raises its mmap threshold after the first large free, so later chunk-sized buffers
    come from the heap and, once freed, stay in the process: RSS would creep up to the size of
    everything ever staged. Host budgets are about RSS, so the manager trims after building
    chunks and after optimizer passes (a few ms)."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def static_placement(chunk_bytes: Sequence[int], frac: float) -> list[bool]:
    """Which chunks to offload so that ``frac`` of the bytes live on host (Colossal-AI style).

    Greedy from the first chunk: a chunk is offloaded while the offloaded bytes are still below
    ``frac * total``. ``frac=1.0`` offloads every chunk, ``0.0`` none.
    """
    if not 0.0 <= frac <= 1.0:
        raise ValueError(f"offload fraction must be in [0, 1], got {frac}")
    target = frac * sum(chunk_bytes)
    out, done = [], 0
    for b in chunk_bytes:
        off = frac > 0 and done < target
        out.append(off)
        done += b if off else 0
    return out


class AccessOrder:
    """Chunk access sequence of one training iteration, recorded in the first and replayed after.

    The access pattern repeats every step, so the chunk whose next use is furthest away is the
    optimal one to evict (Belady's MIN).
    """

    def __init__(self) -> None:
        self.sequence: list[int] = []
        self.frozen = False
        self.position = 0
        self._uses: dict[int, list[int]] = {}
        self._last: dict[int, int] = {}
        self._clock = 0

    def start_iteration(self) -> None:
        self.position = 0

    def record(self, chunk: int) -> None:
        self._clock += 1
        self._last[chunk] = self._clock
        if not self.frozen:
            self.sequence.append(chunk)
        self.position += 1

    def freeze(self) -> None:
        if not self.frozen and self.sequence:
            self.frozen = True
            uses: dict[int, list[int]] = defaultdict(list)
            for i, c in enumerate(self.sequence):
                uses[c].append(i)
            self._uses = dict(uses)

    def next_use(self, chunk: int) -> float:
        """Distance (in accesses) to the next use of ``chunk``; inf when unknown/never."""
        if not self.frozen:
            return float("inf")
        pos = self._uses.get(chunk)
        if not pos:
            return float("inf")
        i = bisect.bisect_left(pos, self.position)
        if i < len(pos):
            return pos[i] - self.position
        return pos[0] + len(self.sequence) - self.position  # next iteration

    def victim(self, candidates: Iterable[int]) -> int | None:
        """Furthest next use; ties (e.g. nothing recorded yet) go to the least recently used."""
        cands = list(candidates)
        if not cands:
            return None
        return max(cands, key=lambda c: (self.next_use(c), -self._last.get(c, 0)))


def belady_victim(sequence: Sequence[int], position: int, candidates: Iterable[int]) -> int | None:
    """Pure helper: victim among ``candidates`` for an access ``sequence`` at ``position``."""
    order = AccessOrder()
    order.sequence = list(sequence)
    order.freeze()
    order.position = position
    return order.victim(candidates)
