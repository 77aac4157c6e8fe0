"""Host staging buffers for NVMe transfers: aligned, on transparent huge pages, reused across steps.

Why a pool: the swap pipeline stages every byte it moves (parameter reads, optimizer state
read-ahead, gradient write-behind) through host buffers. Allocated fresh each step, every
buffer's pages are faulted in and zeroed by the kernel on first touch, inside the disk's DMA
or a copy: measured on this 2-core box, a step of a 0.1 B-parameter model with everything on
NVMe took ~2.5 GB of fresh pages in backward, 640 K faults with 4 KiB pages, and with huge
pages still ~1.5-2.7 s of kernel time in the I/O threads (zeroing) while backward computed.
Reusing the same memory makes that cost once per run. Large buffers are anonymous mappings
advised as transparent huge pages (512x fewer faults where the kernel allows it, ``madvise``
mode included).

A slab is free when nothing references its memory any more (the last tensor or view on it
is gone): the pool holds the only reference to the mapping then (CPython's reference count
of the ``mmap`` object; a tensor made with ``torch.frombuffer`` keeps its buffer exported).
So callers never return buffers explicitly; the pool never hands out memory still in use.
Slabs are sized in 2 MiB steps and matched by size, so the pool grows to the most bytes the
pipeline held at once per size (its bounded depth), not further; :meth:`StagingPool.trim`
gives idle slabs back.

Parking (:meth:`StagingPool.park` / :meth:`StagingPool.unpark`): a mapping whose contents are
no longer needed but whose address must stay (an NVMe parameter chunk's gathered payload, which
autograd's saved views point into) hands its physical pages to the pool instead of to the
kernel, and takes populated pages back before it is filled again: ``mremap`` with
``MREMAP_DONTUNMAP`` moves the page tables (no copy, no fault) and leaves the source mapped and
empty. Why not ``MADV_DONTNEED`` and fault the pages in again: on this machine (a VM whose freed
memory goes back to the host) a 2 MiB page that comes back costs 3-5 ms, 0.3-0.47 s per 200 MB
chunk gathered, against 1.5 ms to move the pages in and out
(``tests/offload/test_staging.py``; Linux >= 5.7; elsewhere parking reports False and the caller
releases the pages as before). Parked pages keep their contents until another mapping takes
them (oldest first): parked with a tag (the manager's: chunk index and shard version), they
come back by :meth:`StagingPool.reclaim`, so a chunk gathered again before its shard changes
needs neither a read nor a copy.

Example::

    >>> from offload.staging import StagingPool
    >>> pool = StagingPool()
    >>> a = pool.empty(3 << 20); ptr = a.data_ptr(); del a
    >>> b = pool.empty(3 << 20); b.data_ptr() == ptr, pool.allocated, pool.reused
    (True, 1, 1)
    >>> pool.trim(), pool.bytes   # b still alive: its slab stays
    (0, 4194304)
    >>> del b; pool.trim(), pool.bytes
    (4194304, 0)
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import sys
import threading
from collections.abc import Hashable

import torch

ALIGN = 4096
HUGE_PAGE = 2 << 20
_MADV_HUGEPAGE: int | None = getattr(mmap, "MADV_HUGEPAGE", None)


def round_up(n: int, m: int = ALIGN) -> int:
    return -(-n // m) * m


def staged_bytes(nbytes: int) -> int:
    """Host bytes a :class:`StagingPool` buffer of ``nbytes`` occupies."""
    n = round_up(max(nbytes, 1))
    return round_up(n, HUGE_PAGE) if n >= HUGE_PAGE else n


def aligned_empty(nbytes: int, align: int = ALIGN) -> torch.Tensor:
    """A uint8 CPU tensor of ``round_up(nbytes)`` bytes whose address is ``align``-aligned
    (not pooled: small buffers and alignments above the page size)."""
    n = round_up(max(nbytes, 1), align)
    raw = torch.empty(n + align, dtype=torch.uint8)
    off = (-raw.data_ptr()) % align
    return raw[off : off + n]


def huge_mapping(nbytes: int) -> mmap.mmap:
    """An anonymous private mapping of ``nbytes``, advised as transparent huge pages."""
    mm = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if _MADV_HUGEPAGE is not None:
        with contextlib.suppress(OSError):  # THP disabled ("never"): plain pages, still correct
            mm.madvise(_MADV_HUGEPAGE)
    return mm


_MREMAP_MAYMOVE, _MREMAP_FIXED, _MREMAP_DONTUNMAP = 1, 2, 4
_mremap: ctypes._CFuncPtr | None | bool = None  # None = not probed yet, False = unavailable


def _mremap_fn():
    global _mremap
    if _mremap is None:
        _mremap = False
        if sys.platform == "linux":
            with contextlib.suppress(OSError, AttributeError):
                fn = ctypes.CDLL(None, use_errno=True).mremap
                fn.restype = ctypes.c_void_p
                fn.argtypes = [
                    ctypes.c_void_p,
                    ctypes.c_size_t,
                    ctypes.c_size_t,
                    ctypes.c_int,
                    ctypes.c_void_p,
                ]
                _mremap = fn
    return _mremap or None


def mapping_address(mm: mmap.mmap) -> int:
    return torch.frombuffer(mm, dtype=torch.uint8, count=1).data_ptr()


def move_pages(src: mmap.mmap, dst: mmap.mmap) -> bool:
    """Move the physical pages of anonymous mapping ``src`` onto ``dst`` (same length): ``dst``
    then holds ``src``'s contents and ``src`` stays mapped, empty (reads zeros). No copy, no
    page fault. False (nothing changed) where the kernel cannot (no ``MREMAP_DONTUNMAP``)."""
    global _mremap
    fn = _mremap_fn()
    if fn is None or len(src) != len(dst):
        return False
    n, d = len(src), mapping_address(dst)
    flags = _MREMAP_MAYMOVE | _MREMAP_FIXED | _MREMAP_DONTUNMAP
    if fn(mapping_address(src), n, n, flags, d) != d:
        _mremap = False  # EINVAL / ENOSYS: an older kernel; never try again
        return False
    return True


class StagingPool:
    """Page-aligned host buffers of 2 MiB and up, kept and reused; smaller ones are plain
    aligned allocations. ``empty(nbytes)`` returns a uint8 tensor of ``round_up(nbytes)``
    bytes. Thread-safe. ``bytes``: mapped bytes held (in use and idle); ``allocated`` /
    ``reused``: slabs mapped / handed out again."""

    def __init__(self, min_bytes: int = HUGE_PAGE) -> None:
        self.min_bytes = min_bytes
        self._slabs: list[mmap.mmap] = []
        self._lock = threading.Lock()
        # parking (see the module docstring): populated mappings per size, oldest first, each
        # with the caller's tag for what its pages still hold; empty mappings per size
        self._parked: dict[int, list[tuple[mmap.mmap, Hashable]]] = {}
        self._spare: dict[int, list[mmap.mmap]] = {}
        self.parked_bytes = 0  # the parked pages (also in ``bytes``)
        self.bytes = 0
        self.allocated = 0
        self.reused = 0

    def _idle(self, i: int) -> bool:
        # 2 references = the list's and getrefcount's argument: no tensor exports the slab
        return sys.getrefcount(self._slabs[i]) == 2

    def _free_slab(self, size: int) -> mmap.mmap | None:
        for i in range(len(self._slabs)):
            if len(self._slabs[i]) == size and self._idle(i):
                return self._slabs[i]
        return None

    def empty(self, nbytes: int) -> torch.Tensor:
        n = round_up(max(nbytes, 1))
        if n < self.min_bytes or sys.platform != "linux":
            return aligned_empty(n)
        size = staged_bytes(n)
        with self._lock:
            mm = self._free_slab(size)
            if mm is None:
                mm = huge_mapping(size)
                self._slabs.append(mm)
                self.bytes += size
                self.allocated += 1
            else:
                self.reused += 1
            return torch.frombuffer(mm, dtype=torch.uint8, count=n)

    def park(self, mm: mmap.mmap, tag: Hashable = None) -> bool:
        """Take ``mm``'s pages (``mm`` stays mapped, empty) and keep them for :meth:`unpark`,
        or, contents and all, for :meth:`reclaim` by ``tag`` (what they hold, in the caller's
        terms) until another mapping takes them. False where pages cannot be moved: release
        them otherwise."""
        size = len(mm)
        with self._lock:
            spares = self._spare.setdefault(size, [])
            slot = spares.pop() if spares else huge_mapping(size)
            if not move_pages(mm, slot):
                spares.append(slot)
                return False
            self._parked.setdefault(size, []).append((slot, tag))
            self.parked_bytes += size
            self.bytes += size
            return True

    def _take_parked(self, size: int, dst: mmap.mmap, tag: Hashable = None) -> bool:
        """Move parked pages of ``size`` onto ``dst``: those tagged ``tag`` (None: the oldest,
        so the most recently parked, the likeliest to be reclaimed, stay longest)."""
        parked = self._parked.get(size)
        if not parked:
            return False
        i = 0 if tag is None else next((j for j, p in enumerate(parked) if p[1] == tag), None)
        if i is None or not move_pages(parked[i][0], dst):
            return False
        self._spare.setdefault(size, []).append(parked.pop(i)[0])
        self.parked_bytes -= size
        self.bytes -= size
        return True

    def unpark(self, mm: mmap.mmap) -> bool:
        """Give ``mm`` (empty) parked pages of its size: it is then populated (stale contents,
        to be overwritten) and its next writes do not fault. False if none are parked."""
        with self._lock:
            return self._take_parked(len(mm), mm)

    def reclaim(self, mm: mmap.mmap, tag: Hashable) -> bool:
        """Give ``mm`` back the pages parked with ``tag``, contents intact (no copy, no read).
        False if another mapping took them meanwhile."""
        with self._lock:
            return tag is not None and self._take_parked(len(mm), mm, tag)

    def holds(self, size: int, tag: Hashable) -> bool:
        """Whether pages parked with ``tag`` (mapping size ``size``) are still here."""
        with self._lock:
            return tag is not None and any(t == tag for _, t in self._parked.get(size, ()))

    def hand_pages(self, src: torch.Tensor, dst: mmap.mmap) -> bool:
        """Give ``dst`` the contents of the pool buffer ``src`` without a copy: ``src``'s
        pages move onto ``dst`` and parked pages refill ``src`` (so its next use does not fault
        either). False (nothing changed) unless ``src`` starts a slab of ``dst``'s size and
        pages of that size are parked. No transfer may be using ``src``'s memory: the pages
        move with it."""
        size = len(dst)
        with self._lock:
            if not self._parked.get(size):
                return False
            slab = next(
                (m for m in self._slabs if len(m) == size and mapping_address(m) == src.data_ptr()),
                None,
            )
            if slab is None or not move_pages(slab, dst):
                return False
            self._take_parked(size, slab)  # else src faults its pages in again: still correct
            return True

    def idle_bytes(self) -> int:
        with self._lock:
            return sum(len(self._slabs[i]) for i in range(len(self._slabs)) if self._idle(i))

    def trim(self, keep_bytes: int = 0) -> int:
        """Unmap idle slabs (largest first) until at most ``keep_bytes`` are held in all;
        returns the bytes given back."""
        freed = 0
        with self._lock:
            by_size = sorted(range(len(self._slabs)), key=lambda i: -len(self._slabs[i]))
            drop = set()
            for i in by_size:
                if self.bytes - freed <= keep_bytes:
                    break
                if self._idle(i):
                    freed += len(self._slabs[i])
                    drop.add(i)
            for i in drop:
                self._slabs[i].close()
            self._slabs = [m for i, m in enumerate(self._slabs) if i not in drop]
            self.bytes -= freed
            for size, parked in self._parked.items():  # then parked pages, oldest first
                while parked and self.bytes > keep_bytes:
                    parked.pop(0)[0].close()
                    self.bytes -= size
                    self.parked_bytes -= size
                    freed += size
        return freed
