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
from collections import defaultdict, deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future
from typing import Any

import torch

from .nvme import BACKGROUND, NEEDED, Extent, NvmeStore

READ_ONLY = frozenset({"grad"})
"""Keys the optimizer pass reads but never writes back (the gradient is consumed, not updated)."""


def _bind(c: Any, key: str, t: torch.Tensor | None) -> None:
    """``master`` / ``grad`` are the chunk's ``master`` / ``grad_shard`` attributes; other keys
    are optimizer state."""
    if key == "master":
        c.master = t
    elif key == "grad":
        c.grad_shard = t
    elif t is None:
        del c.optim_state[key]
    else:
        c.optim_state[key] = t


def _idx(chunk: Any) -> int:
    return chunk if isinstance(chunk, int) else chunk.index


def _wait(futures: list) -> None:
    """Wait for futures (or write records ``(chunk index, key, future, buffer)``)."""
    for f in futures:
        (f if isinstance(f, Future) else f[2]).result()


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
        # bumped at every write of a key: what a copy of it in RAM must match to be current
        self.version: dict[tuple[int, str], int] = defaultdict(int)
        # writes issued outside a pass (gradients, written during backward): a read of the same
        # extent must wait for them; the buffer stays referenced until the write is done
        self.pending: dict[tuple[int, str], tuple[Future, torch.Tensor]] = {}
        self.keys: dict[int, list[str]] = {}
        self._sets: list[dict[str, torch.Tensor]] = []
        self._n_sets = 0
        # reads started before the pass (during backward, see read_ahead): chunk index ->
        # (buffer set, {key: future or None when zero-filled})
        self._early: dict[int, tuple[dict[str, torch.Tensor], dict[str, Future | None]]] = {}
        # updated masters handed over at the end of a pass (the next forward's first chunks):
        # chunk index -> (buffer, its write-back future)
        self.handed: dict[int, tuple[torch.Tensor, Future]] = {}
        # pending write-backs whose buffer was handed over (it is not ours to take over)
        self._lent: set[tuple[int, str]] = set()
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
        self.write_async(chunk, key, t)
        self.settle(chunk, key)

    def write_async(
        self, chunk: Any, key: str, t: torch.Tensor, max_pending: int = 4, copy: bool = True
    ) -> Future:
        """Store ``t`` as ``key`` in the background (at most ``max_pending`` such writes in
        flight: the caller waits for the oldest beyond that). ``copy=False``: ``t`` is a
        buffer from ``store.empty`` that the caller hands over (written as it is)."""
        while len(self.pending) >= max_pending:
            self.settle(*next(iter(self.pending)))
        self.settle(chunk, key)
        idx = _idx(chunk)
        if key in self._early.get(idx, ({}, {}))[1]:
            self._drop_early(idx)  # read before this write: stale
        if copy:
            buf = self.store.empty(t.numel(), torch.float32)
            buf.copy_(t)
        else:
            buf = t
        fut = self.store.write(self.extents[(idx, key)], buf, priority=BACKGROUND)
        self.pending[(idx, key)] = (fut, buf)
        self.written.add((idx, key))
        self.version[(idx, key)] += 1
        return fut

    def settle(self, chunk: Any, key: str) -> None:
        """Wait for a background write of ``key`` (raises its I/O error, if any)."""
        entry = self.pending.pop((_idx(chunk), key), None)
        self._lent.discard((_idx(chunk), key))
        if entry is not None:
            t0 = time.perf_counter()
            entry[0].result()
            self.io_wait_s += time.perf_counter() - t0

    def settle_all(self) -> None:
        for idx, key in list(self.pending):
            self.settle(idx, key)

    def read_async(self, chunk: Any, key: str, out: torch.Tensor, priority: int = NEEDED) -> Future:
        """Read ``key`` into ``out`` (an aligned buffer from ``store.empty``). Behind a write
        of the same key still in flight, the read is issued when that write is done (its
        error, if any, is the read's): the caller does not wait here (a prefetch in forward
        would otherwise hold compute until a queued write-back finished)."""
        ext = self.extents[(_idx(chunk), key)]
        entry = self.pending.get((_idx(chunk), key))
        if entry is None or entry[0].done():
            self.settle(chunk, key)
            return self.store.read(ext, out, priority)
        result: Future = Future()

        def relay(f: Future) -> None:
            exc = f.exception()
            if exc is None:
                result.set_result(None)
            else:
                result.set_exception(exc)

        def after_write(w: Future) -> None:
            if w.exception() is not None:
                relay(w)
                return
            try:
                self.store.read(ext, out, priority).add_done_callback(relay)
            except BaseException as e:  # noqa: BLE001  (the store closed meanwhile)
                result.set_exception(e)

        entry[0].add_done_callback(after_write)
        return result

    def invalidate(self, chunk: Any, key: str) -> None:
        """Forget ``key``'s content: the next pass zero-fills instead of reading it."""
        self.settle(chunk, key)
        self.written.discard((_idx(chunk), key))
        self.version[(_idx(chunk), key)] += 1

    def valid(self, chunk: Any, key: str) -> bool:
        return (_idx(chunk), key) in self.written

    # ---------------------------------------------------------------- buffers
    def _acquire(self, writes: deque) -> dict[str, torch.Tensor]:
        if not self._sets and (self._n_sets < self.depth + 2 or not writes):
            self._n_sets += 1
            return {}  # filled lazily per key below
        while not self._sets:
            t0 = time.perf_counter()
            bufs, futs = writes.popleft()
            _wait(futs)
            self.io_wait_s += time.perf_counter() - t0
            self._sets.append(bufs)
        return self._sets.pop()

    def _buf(self, bufs: dict[str, torch.Tensor], key: str, n: int) -> torch.Tensor:
        # sized for the chunk at hand, not the largest one: one oversized chunk (an embedding)
        # must not make every buffer set that large
        if key not in bufs or bufs[key].numel() < n:
            bufs[key] = self.store.empty(n, torch.float32)
        return bufs[key]

    def buffer_bytes(self) -> int:
        """Host bytes held by the buffer pool right now (read-ahead sets included)."""
        sets = [*self._sets, *(b for b, _ in self._early.values())]
        return sum(b.nbytes for s in sets for b in s.values())

    # ---------------------------------------------------------------- read-ahead
    def read_ahead(self, chunks: Iterable[Any]) -> None:
        """Start the next pass's first reads now (the first ``depth + 1`` of ``chunks`` with
        NVMe state; ``grad`` excluded: it may still be being written). The manager calls it
        once no parameter read is left in the step, so the disk, idle while forward and
        backward compute, reads optimizer state; the pass picks the buffers up. A key whose
        write-back is still pending (deferred by the last pass) is not read: its write buffer
        holds the current content and is taken over (the pass waits for the write before it
        changes the buffer). A later write of a key read here drops the read
        (:meth:`write_async`), so nothing stale is ever used."""
        want = [c for c in chunks if self.keys.get(c.index)][: self.depth + 1]
        for c in want:
            if c.index in self._early:
                continue
            bufs, futs = self._acquire(deque()), {}
            for k in self.keys[c.index]:
                if k in READ_ONLY:
                    continue
                pending = self.pending.get((c.index, k))
                lent = (c.index, k) in self._lent  # the parameter fetcher reuses that buffer
                if pending is not None and not lent and pending[1].numel() >= c.shard_size:
                    futs[k], bufs[k] = self.pending.pop((c.index, k))
                    continue
                b = self._buf(bufs, k, c.shard_size)[: c.shard_size]
                if (c.index, k) in self.written:
                    futs[k] = self.read_async(c, k, b, priority=BACKGROUND)
                else:
                    b.zero_()
                    futs[k] = None
            self._early[c.index] = (bufs, futs)

    def _drop_early(self, idx: int) -> None:
        bufs, futs = self._early.pop(idx)
        for f in futs.values():
            if f is not None:
                with contextlib.suppress(Exception):  # the pass that needs it reads again
                    f.result()
        self._sets.append(bufs)

    def drop_read_ahead(self, keep: Iterable[int] = ()) -> None:
        """Forget read-ahead buffers (except those of chunks in ``keep``): their sets return
        to the pool."""
        keep = set(keep)
        for idx in [i for i in self._early if i not in keep]:
            self._drop_early(idx)

    def take_handed(self) -> dict[int, tuple[torch.Tensor, Future]]:
        out, self.handed = self.handed, {}
        return out

    def release_buffers(self) -> None:
        """Free the pool (between optimizer passes forward / backward need the memory)."""
        self._sets.clear()
        self._n_sets = 0

    # ---------------------------------------------------------------- pipeline
    def iter_resident(
        self,
        chunks: Iterable[Any],
        write_back: bool = True,
        on_resident=None,
        before_write=None,
        keys: Iterable[str] | None = None,
        hand_over: Iterable[int] = (),
        defer_writes: bool = False,
        in_ram: dict[tuple[int, str], torch.Tensor] | None = None,
    ) -> Iterator[Any]:
        """Yield every chunk; those with NVMe state come with it in ``chunk.optim_state[key]``
        (views into pooled buffers), read ``depth`` chunks ahead and written back behind.
        ``keys`` limits what is brought in (e.g. only ``master`` to read parameters).

        A full update pass (``write_back``, all keys) uses the buffers :meth:`read_ahead`
        filled. ``hand_over``: chunks whose updated ``master`` buffer is kept after its
        write-back is issued (in :attr:`handed`, for the next forward to use instead of reading
        it back). ``defer_writes``: the last write-backs are not waited for; they stay pending
        like background writes (a read of the same key waits for them first). ``in_ram``:
        buffers that already hold a key's current content (a gradient whose write-behind
        just finished), used instead of reading it back."""
        in_ram = dict(in_ram or {})
        chunks = list(chunks)
        want = None if keys is None else set(keys)
        sel = {
            c.index: [k for k in self.keys.get(c.index, []) if want is None or k in want]
            for c in chunks
        }
        todo = deque(c for c in chunks if sel[c.index])
        if write_back and want is None:  # read-ahead is for the first chunks of this pass
            self.drop_read_ahead(keep=[c.index for c in list(todo)[: self.depth + 1]])
        else:
            self.drop_read_ahead()
        hand = set(hand_over) if write_back else set()
        reads: deque = deque()
        writes: deque = deque()
        t_start = time.perf_counter()

        def issue() -> None:
            c = todo.popleft()
            early = self._early.pop(c.index, None)
            bufs, done = early if early is not None else (self._acquire(writes), {})
            futs = [f for f in done.values() if f is not None]
            for k in sel[c.index]:
                if k in done:
                    continue
                kept = in_ram.pop((c.index, k), None)
                if kept is not None and kept.numel() >= c.shard_size:
                    bufs[k] = kept  # joins the set (it is an aligned store buffer)
                    continue
                b = self._buf(bufs, k, c.shard_size)[: c.shard_size]
                if (c.index, k) in self.written:
                    futs.append(self.read_async(c, k, b, priority=BACKGROUND))
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
                        if k in READ_ONLY:
                            continue
                        ext = self.extents[(c.index, k)]
                        fut = self.store.write(ext, bufs[k][: c.shard_size], priority=BACKGROUND)
                        wf.append((c.index, k, fut, bufs[k]))
                        self.written.add((c.index, k))
                        self.version[(c.index, k)] += 1
                        if k == "master" and c.index in hand:
                            self.handed[c.index] = (bufs.pop(k), fut)
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
                bufs, wf = writes.popleft()
                if defer_writes:  # pending writes hold their buffers; the set is not reused
                    for idx, k, fut, buf in wf:
                        self.pending[(idx, k)] = (fut, buf)
                        if k == "master" and idx in hand:
                            self._lent.add((idx, k))
                else:
                    _wait(wf)
                    self._sets.append(bufs)
            self.io_wait_s += time.perf_counter() - t0
            self.io_s += time.perf_counter() - t_start

    def close(self) -> None:
        self._sets.clear()
        self._early.clear()
        self.handed.clear()
        self.pending.clear()
        self._lent.clear()
        self.store.close()


class ParamFetcher:
    """Parameter shards that live on NVMe, read ahead of their use into a small pool of aligned
    host buffers (``depth + 1``). ``prefetch(c)`` starts a read; ``take(c)`` returns the shard
    (waiting for its read, or reading now); ``give(buf)`` returns the buffer to the pool.
    A mispredicted prefetch costs one read: when the pool is empty the oldest is dropped.
    ``adopt(c, buf, write)``: an updated master the optimizer pass handed over, taken by the
    next ``take(c)`` at once while its write-back runs on; that buffer is refilled only once
    the write is done (a read meanwhile gets one more buffer: ``depth + 2`` at most)."""

    def __init__(self, swapper: ShardSwapper, depth: int, key: str = "master") -> None:
        self.sw = swapper
        self.key = key
        self.depth = depth
        self._free: list[torch.Tensor] = []
        self._all: list[torch.Tensor] = []
        self.inflight: dict[int, tuple[torch.Tensor, Future]] = {}
        # buffers still read by a write-back (adopted masters): not refilled until it is done
        self._writing: list[tuple[torch.Tensor, Future]] = []
        self.hits = 0
        self.misses = 0
        self.dropped = 0

    def _settle_writes(self, buf: torch.Tensor | None = None) -> None:
        """Wait for the write-back that still reads ``buf`` (every one: None)."""
        keep = []
        for b, fut in self._writing:
            if buf is None or b is buf:
                fut.result()
            else:
                keep.append((b, fut))
        self._writing = keep

    def _buffer(self, n: int) -> torch.Tensor:
        fits = [b for b in self._free if b.numel() >= n]
        writing = {id(b) for b, f in self._writing if not f.done()}
        if fits and all(id(b) in writing for b in fits) and len(self._all) < self.depth + 2:
            # the free buffers still feed a write-back (a handed-over master): one more buffer
            # instead of holding this read until that write is done
            return self._new(n)
        if fits:
            buf = min(fits, key=lambda b: b.numel())
            self._free = [b for b in self._free if b is not buf]  # identity, not tensor ==
            self._settle_writes(buf)
            return buf
        if len(self._all) < self.depth + 1:
            return self._new(n)
        if self._free:  # all buffers exist but the free ones are too small: grow one
            old = self._free.pop()
            self._settle_writes(old)
            self._replace(old, n)
            return self._all[-1]
        idx = next(iter(self.inflight))  # oldest prefetch: let it land and reuse its buffer
        buf, fut = self.inflight.pop(idx)
        fut.result()
        self._settle_writes(buf)
        self.dropped += 1
        if buf.numel() < n:
            self._replace(buf, n)
            return self._all[-1]
        return buf

    def _new(self, n: int) -> torch.Tensor:
        self._all.append(self.sw.store.empty(n, torch.float32))
        return self._all[-1]

    def _replace(self, old: torch.Tensor, n: int) -> None:
        self._all = [b for b in self._all if b is not old]
        self._new(n)

    def prefetch(self, c: Any) -> None:
        if c.index in self.inflight or len(self.inflight) >= self.depth:
            return
        buf = self._buffer(c.shard_size)
        self.inflight[c.index] = (buf, self.sw.read_async(c, self.key, buf[: c.shard_size]))

    def take(self, c: Any) -> torch.Tensor:
        entry = self.inflight.pop(c.index, None)
        if entry is None:
            self.misses += 1
            buf = self._buffer(c.shard_size)
            fut = self.sw.read_async(c, self.key, buf[: c.shard_size])
        else:
            self.hits += 1
            buf, fut = entry
        t0 = time.perf_counter()
        fut.result()
        self.sw.io_wait_s += time.perf_counter() - t0
        return buf

    def adopt(self, c: Any, buf: torch.Tensor, fut: Future) -> None:
        """Take ``buf`` (holding ``c``'s current shard; ``fut`` its write-back) as if it had
        been prefetched: the next ``take(c)`` uses it without a read."""
        held = sum(b.numel() for b in self._all)
        if c.index in self.inflight or held + buf.numel() > (self.depth + 1) * self.sw.max_shard:
            fut.result()  # no room in the pool: the shard is read back when needed
            return
        self._all.append(buf)
        ready: Future = Future()
        ready.set_result(None)  # the buffer holds the shard already: take() does not wait
        self.inflight[c.index] = (buf, ready)
        self._writing.append((buf, fut))

    def writing(self, buf: torch.Tensor) -> bool:
        """Whether a write-back still reads ``buf`` (an adopted master being written)."""
        return any(b is buf and not f.done() for b, f in self._writing)

    def give(self, buf: torch.Tensor) -> None:
        self._free.append(buf)

    def cancel(self, c: Any) -> None:
        """``c`` turned out not to need its read (it was still resident): reclaim the buffer."""
        entry = self.inflight.pop(c.index, None)
        if entry is not None:
            entry[1].result()
            self._free.append(entry[0])
            self.dropped += 1

    def drain(self) -> None:
        """Let every read land and return its buffer (before the shards change on disk)."""
        for buf, fut in self.inflight.values():
            fut.result()
            self._free.append(buf)
        self.inflight.clear()
        self._settle_writes()

    def release_buffers(self) -> None:
        """Drain, then free every buffer (the optimizer pass needs the memory)."""
        self.drain()
        self._free.clear()
        self._all.clear()

    def buffer_bytes(self) -> int:
        return sum(b.nbytes for b in self._all)
