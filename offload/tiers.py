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
import ctypes
import resource
import sys
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
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:  # not glibc (macOS, musl): nothing to tune
        return None


_LIBC = _load_libc()


def _mallinfo2():
    class MallInfo2(ctypes.Structure):
        _fields_ = [
            (n, ctypes.c_size_t)
            for n in (
                "arena", "ordblks", "smblks", "hblks", "hblkhd",
                "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost",
            )
        ]  # fmt: skip

    fn = getattr(_LIBC, "mallinfo2", None)  # glibc >= 2.33 (mallinfo's ints overflow at 2 GiB)
    if fn is not None:
        fn.restype = MallInfo2
    return fn


_MALLINFO2 = _mallinfo2() if _LIBC is not None else None


def heap_free_bytes() -> int | None:
    """Bytes glibc's malloc holds free in its arenas (resident or not: an upper bound on what
    :func:`release_host_memory` returns to the OS); ``None`` where unknown."""
    return None if _MALLINFO2 is None else int(_MALLINFO2().fordblks)


def peak_rss_bytes() -> int:
    """The process's peak resident set so far (``ru_maxrss``)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # macOS: bytes; Linux: KiB


def release_host_memory(keep: int = 0) -> bool:
    """Hand freed heap pages back to the OS (glibc ``malloc_trim``) unless the heap holds at
    most ``keep`` bytes free. Returns whether it trimmed.

    What the heap keeps is what the next step allocates again (activations, autograd's
    gradients) without faulting in fresh pages: on a VM that returns freed memory to its host
    a page faulted in again costs microseconds, ~0.1 s per step for a 0.1 B GPT's
    activations. So the manager trims only what a host budget has no room for (see
    ``ChunkManager._heap_keep``) and after building chunks (a few ms)."""
    if _LIBC is None:
        return False
    free = heap_free_bytes()
    if free is not None and free <= keep:
        return False
    _LIBC.malloc_trim(0)
    return True


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
