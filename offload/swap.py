"""Chunk state on the NVMe tier, swapped in for the optimizer through a pipeline.

For a chunk whose optimizer tier is ``nvme``, the optimizer state (Adam's ``exp_avg``,
``exp_avg_sq``) and, where it is not the working shard itself, the fp32 master shard live in the
:class:`~offload.nvme.NvmeStore`. Between steps nothing of them is in RAM. The optimizer walks the
chunks through :meth:`ShardSwapper.iter_resident`: while chunk *k* is updated, the reads of chunks
*k+1 .. k+depth* are in flight and the write-back of chunk *k-1* drains, from a bounded pool of
aligned host buffer sets (``depth + 2`` sets, each as large as the largest shard), so disk and
compute overlap and host memory stays bounded whatever the model size.

A state that was never written (first step) is zero-filled instead of read, which is what the
optimizer's fresh state is.

Example::

    >>> import tempfile, torch
    >>> from offload.nvme import NvmeStore
    >>> from offload.swap import ShardSwapper
    >>> class C:  # the three attributes the swapper uses of a Chunk
    ...     def __init__(self, i): self.index, self.shard_size, self.optim_state, self.master = i, 8, {}, None
    >>> chunks = [C(0), C(1), C(2)]
    >>> sw = ShardSwapper(NvmeStore(tempfile.mkdtemp(), 1 << 20), max_shard=8, depth=1)
    >>> for c in chunks: sw.register(c, ["exp_avg"])
    >>> for c in sw.iter_resident(chunks):
    ...     _ = c.optim_state["exp_avg"].add_(c.index + 1)   # an "update"
    >>> [float(c.optim_state["exp_avg"][0]) for c in sw.iter_resident(chunks, write_back=False)]
    [1.0, 2.0, 3.0]
    >>> sw.close()
"""

from __future__ import annotations

import contextlib
import time
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future
from typing import Any

import torch

from .nvme import Extent, NvmeStore


def _bind(c: Any, key: str, t: torch.Tensor | None) -> None:
    """``master`` is the chunk's ``master`` attribute; other keys are optimizer state."""
    if key == "master":
        c.master = t
    elif t is None:
        del c.optim_state[key]
    else:
        c.optim_state[key] = t


def _wait(futures: list[Future]) -> None:
    for f in futures:
        f.result()


class ShardSwapper:
    """NVMe home of per-chunk fp32 shard tensors (``master``, optimizer state) plus the
    bounded buffer pool and read-ahead / write-behind pipeline that brings them in.

    While resident, ``chunk.master`` (key ``master``) and ``chunk.optim_state[key]`` are views
    into pooled buffers; ``before_write(chunk)`` runs after the caller's update and before the
    write-back (the manager copies an updated master into the working shard there)."""

    def __init__(self, store: NvmeStore, max_shard: int, depth: int = 2) -> None:
        if depth < 0:
            raise ValueError(f"depth must be >= 0, got {depth}")
        self.store = store
        self.max_shard = max_shard
        self.depth = depth
        self.extents: dict[tuple[int, str], Extent] = {}
        self.written: set[tuple[int, str]] = set()
        self.keys: dict[int, list[str]] = {}
        self._sets: list[dict[str, torch.Tensor]] = []
        self._n_sets = 0
        self.io_wait_s = 0.0  # time the compute thread waited for reads / writes
        self.io_s = 0.0  # wall time of pipelined passes

    # ---------------------------------------------------------------- layout
    def register(self, chunk: Any, keys: Iterable[str]) -> None:
        """Give ``chunk`` an NVMe extent for each of ``keys`` (fp32, ``shard_size`` elements)."""
        ks = self.keys.setdefault(chunk.index, [])
        for k in keys:
            if (chunk.index, k) not in self.extents:
                self.extents[(chunk.index, k)] = self.store.alloc(chunk.shard_size * 4)
                ks.append(k)

    def nbytes(self, chunk: Any) -> int:
        return sum(self.extents[(chunk.index, k)].nbytes for k in self.keys.get(chunk.index, []))

    def write_now(self, chunk: Any, key: str, t: torch.Tensor) -> None:
        """Synchronously store ``t`` (any fp32 CPU tensor of the shard's size) as ``key``."""
        buf = self.store.empty(t.numel(), torch.float32)
        buf.copy_(t)
        self.store.write(self.extents[(chunk.index, key)], buf).result()
        self.written.add((chunk.index, key))

    # ---------------------------------------------------------------- buffers
    def _acquire(self, writes: deque) -> dict[str, torch.Tensor]:
        if not self._sets and self._n_sets < self.depth + 2:
            self._n_sets += 1
            return {}  # filled lazily per key below
        while not self._sets:
            t0 = time.perf_counter()
            bufs, futs = writes.popleft()
            _wait(futs)
            self.io_wait_s += time.perf_counter() - t0
            self._sets.append(bufs)
        return self._sets.pop()

    def _buf(self, bufs: dict[str, torch.Tensor], key: str) -> torch.Tensor:
        if key not in bufs:
            bufs[key] = self.store.empty(self.max_shard, torch.float32)
        return bufs[key]

    def buffer_bytes(self) -> int:
        """Host bytes held by the buffer pool right now."""
        return sum(b.nbytes for s in self._sets for b in s.values())

    # ---------------------------------------------------------------- pipeline
    def iter_resident(
        self,
        chunks: Iterable[Any],
        write_back: bool = True,
        on_resident=None,
        before_write=None,
        keys: Iterable[str] | None = None,
    ) -> Iterator[Any]:
        """Yield every chunk; those with NVMe state come with it in ``chunk.optim_state[key]``
        (views into pooled buffers), read ``depth`` chunks ahead and written back behind.
        ``keys`` limits what is brought in (e.g. only ``master`` to read parameters)."""
        chunks = list(chunks)
        want = None if keys is None else set(keys)
        sel = {
            c.index: [k for k in self.keys.get(c.index, []) if want is None or k in want]
            for c in chunks
        }
        todo = deque(c for c in chunks if sel[c.index])
        reads: deque = deque()
        writes: deque = deque()
        t_start = time.perf_counter()

        def issue() -> None:
            c = todo.popleft()
            bufs = self._acquire(writes)
            futs = []
            for k in sel[c.index]:
                b = self._buf(bufs, k)[: c.shard_size]
                if (c.index, k) in self.written:
                    futs.append(self.store.read(self.extents[(c.index, k)], b))
                else:
                    b.zero_()
            reads.append((c, bufs, futs))

        try:
            for c in chunks:
                if not sel[c.index]:
                    yield c
                    continue
                while todo and len(reads) <= self.depth:
                    issue()
                c2, bufs, futs = reads.popleft()
                assert c2 is c, "chunks must be visited in the order given"
                t0 = time.perf_counter()
                _wait(futs)
                self.io_wait_s += time.perf_counter() - t0
                for k in sel[c.index]:
                    _bind(c, k, bufs[k][: c.shard_size])
                if on_resident is not None:
                    on_resident(c)
                yield c
                if write_back:
                    if before_write is not None:
                        before_write(c)
                    wf = []
                    for k in sel[c.index]:
                        wf.append(
                            self.store.write(self.extents[(c.index, k)], bufs[k][: c.shard_size])
                        )
                        self.written.add((c.index, k))
                    writes.append((bufs, wf))
                else:
                    self._sets.append(bufs)
                for k in sel[c.index]:
                    _bind(c, k, None)
                while todo and len(reads) <= self.depth:
                    issue()
        finally:
            t0 = time.perf_counter()
            for _, bufs, futs in reads:  # an interrupted pass: let reads land, keep the buffers
                with contextlib.suppress(Exception):
                    _wait(futs)
                self._sets.append(bufs)
            while writes:
                bufs, futs = writes.popleft()
                _wait(futs)
                self._sets.append(bufs)
            self.io_wait_s += time.perf_counter() - t0
            self.io_s += time.perf_counter() - t_start

    def close(self) -> None:
        self._sets.clear()
        self.store.close()
