"""The NVMe tier: tensors stored in one preallocated file at aligned offsets, moved with O_DIRECT
by a pool of I/O threads with many requests in flight.

Why our own I/O path: DeepSpeed's aio op needs a compile step (~9 minutes here) and libaio;
``os.preadv`` / ``os.pwritev`` release the GIL, so N Python threads keep N requests in flight,
which reaches the many-in-flight bandwidth of the device with nothing to build (measured here:
8 threads x 4 MiB requests read ~2.4 GB/s, write ~3 GB/s; see ``colossus bench nvme``).

O_DIRECT needs the buffer address, the file offset and the length to be multiples of the
device's logical block size; :meth:`NvmeStore.empty` hands out host buffers that satisfy this
(4096-aligned, length rounded up), and every extent in the file is 4096-aligned. A filesystem that
refuses O_DIRECT (tmpfs) falls back to buffered I/O with a warning.

The store's file lives in a private directory named after the process
(``colossus-nvme-<pid>-<random>``) that is removed when the store is closed, at interpreter exit,
or, after a crash, by the next store opened in the same parent directory (only directories of
processes that are no longer alive). Nothing is ever read that this process did not write, so
a leftover file can never be misread.

Example::

    >>> import tempfile, torch
    >>> from offload.nvme import NvmeStore
    >>> store = NvmeStore(tempfile.mkdtemp(), capacity=1 << 20)
    >>> x = store.empty(1000, torch.float32); _ = x.copy_(torch.arange(1000.0))
    >>> ext = store.alloc(x.nbytes)
    >>> store.write(ext, x).result()
    >>> y = store.empty(1000, torch.float32)
    >>> store.read(ext, y).result(); torch.equal(x, y)
    True
    >>> store.close()
"""

from __future__ import annotations

import errno
import heapq
import itertools
import os
import secrets
import shutil
import threading
import time
import warnings
import weakref
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

import torch

from .staging import ALIGN, StagingPool, round_up

DIR_PREFIX = "colossus-nvme-"

# Request priorities (lower goes first; FIFO within one). Parameter reads that compute is
# about to wait for must not queue behind write-backs nobody waits for: measured, the previous
# step's deferred optimizer write-backs (~1 GB) delayed the first forward reads by ~0.4 s.
# Everything else shares one level, so reads and writes stay in flight together (this disk
# moves both directions at once faster than one after the other).
NEEDED = 0  # parameter reads (forward / backward wait for them)
BACKGROUND = 1  # update-pass reads and write-backs, read-ahead, gradient write-behind


class NvmeError(RuntimeError):
    """The NVMe directory cannot be used (missing, not writable, too small) or an I/O failed."""


@dataclass(frozen=True)
class Extent:
    """A byte range of the store's file: ``offset`` and ``nbytes`` are multiples of ALIGN."""

    offset: int
    nbytes: int


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale(parent: Path) -> list[Path]:
    """Remove store directories under ``parent`` left by processes that no longer run."""
    removed = []
    for d in parent.glob(DIR_PREFIX + "*"):
        try:
            pid = int(d.name[len(DIR_PREFIX) :].split("-")[0])
        except ValueError:
            continue
        if pid != os.getpid() and not _pid_alive(pid):
            shutil.rmtree(d, ignore_errors=True)
            removed.append(d)
    return removed


def check_directory(directory: str | Path, need_bytes: int) -> Path:
    """Raise :class:`NvmeError` naming the problem unless ``directory`` can hold ``need_bytes``."""
    d = Path(directory).expanduser()
    if not d.exists():
        raise NvmeError(
            f"NVMe directory {d} does not exist (create it, or point nvme_dir elsewhere)"
        )
    if not d.is_dir():
        raise NvmeError(f"NVMe directory {d} is not a directory")
    if not os.access(d, os.W_OK | os.X_OK):
        raise NvmeError(f"NVMe directory {d} is not writable by this user")
    remove_stale(d)
    free = shutil.disk_usage(d).free
    if need_bytes > free:
        raise NvmeError(
            f"NVMe directory {d} has {free / 2**30:.2f} GiB free, the NVMe tier needs "
            f"{need_bytes / 2**30:.2f} GiB ({(need_bytes - free) / 2**30:.2f} GiB more): free space, "
            "use another directory, or keep more on host (a larger host budget)"
        )
    return d


class _IoPool:
    """``threads`` workers taking requests by priority (lower first), FIFO within one.

    Why not ``ThreadPoolExecutor``: it is FIFO only; the swap pipeline needs the reads that
    compute waits for ahead of queued write-backs (see ``NEEDED`` / ``BACKGROUND``)."""

    def __init__(self, threads: int, name: str) -> None:
        self._heap: list = []
        self._cv = threading.Condition()
        self._seq = itertools.count()
        self._closed = False
        self._threads = [
            threading.Thread(target=self._run, name=f"{name}_{i}", daemon=True)
            for i in range(threads)
        ]
        for t in self._threads:
            t.start()

    def submit(self, priority: int, fn, *args) -> Future:
        fut: Future = Future()
        with self._cv:
            if self._closed:
                raise RuntimeError("the NVMe store is closed")
            heapq.heappush(self._heap, (priority, next(self._seq), fut, fn, args))
            self._cv.notify()
        return fut

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._heap and not self._closed:
                    self._cv.wait()
                if not self._heap:
                    return  # closed and drained
                _, _, fut, fn, args = heapq.heappop(self._heap)
            if not fut.set_running_or_notify_cancel():
                continue
            result = error = None
            try:
                result = fn(*args)
            except BaseException as e:  # noqa: BLE001  (delivered to whoever waits)
                error = e
            # drop the request's buffer before waking the waiter: the staging pool reuses
            # memory only once nothing references it, and the waiter may ask for it at once
            del fn, args
            if error is None:
                fut.set_result(result)
            else:
                fut.set_exception(error)
            del fut, error

    def shutdown(self) -> None:
        """Finish what is queued, then stop the workers."""
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        for t in self._threads:
            if t is not threading.current_thread():
                t.join()


def _cleanup(pool: _IoPool, fd: int, path: Path) -> None:
    pool.shutdown()  # no request may run on a closed descriptor
    try:
        os.close(fd)
    except OSError:
        pass
    shutil.rmtree(path, ignore_errors=True)


class NvmeStore:
    """A preallocated file of ``capacity`` bytes under ``directory`` with an extent allocator
    and an I/O thread pool. ``read`` / ``write`` return futures; each transfer is split into
    ``request_bytes`` requests spread over ``io_threads`` threads.

    ``direct=None`` tries O_DIRECT and falls back to buffered I/O (with a warning) where the
    filesystem refuses it; ``True`` makes that refusal an error.
    """

    def __init__(
        self,
        directory: str | Path,
        capacity: int,
        io_threads: int = 8,
        request_bytes: int = 4 << 20,
        direct: bool | None = None,
    ) -> None:
        capacity = round_up(capacity)
        parent = check_directory(directory, capacity)
        self.path = parent / f"{DIR_PREFIX}{os.getpid()}-{secrets.token_hex(4)}"
        self.path.mkdir()
        self.file = self.path / "store.bin"
        self.capacity = capacity
        self.request_bytes = round_up(request_bytes)
        self.direct = False
        flags = os.O_RDWR | os.O_CREAT | os.O_EXCL
        fd = -1
        if direct is not False and hasattr(os, "O_DIRECT"):
            try:
                fd = os.open(self.file, flags | os.O_DIRECT, 0o600)
                self.direct = True
            except OSError as e:
                if direct or e.errno not in (errno.EINVAL, errno.EOPNOTSUPP):
                    shutil.rmtree(self.path, ignore_errors=True)
                    raise NvmeError(f"cannot open {self.file} with O_DIRECT: {e}") from e
        if fd < 0:
            warnings.warn(
                f"{parent}: the filesystem refuses O_DIRECT; the NVMe tier uses buffered I/O "
                "(the page cache then competes with the host tier for RAM)",
                stacklevel=2,
            )
            fd = os.open(self.file, flags, 0o600)
        self.fd = fd
        self._pool = _IoPool(io_threads, "nvme-io")
        self._finalizer = weakref.finalize(self, _cleanup, self._pool, fd, self.path)
        self.staging = StagingPool()  # host buffers for transfers, reused across steps
        try:
            os.posix_fallocate(fd, 0, capacity)
        except OSError as e:
            self.close()
            raise NvmeError(f"cannot preallocate {capacity} B in {parent}: {e}") from e
        self.io_threads = io_threads
        self._lock = threading.Lock()
        self._free: list[Extent] = [Extent(0, capacity)]  # sorted by offset, coalesced
        self.used = 0
        self.bytes_read = 0
        self.bytes_written = 0
        self.busy_s = 0.0  # wall time with at least one request in flight
        self.io_log: list[tuple[float, float, str, int]] | None = None  # while recording
        self._busy_lock = threading.Lock()
        self._active = 0
        self._busy_since = 0.0

    # ------------------------------------------------------------------ allocation
    def alloc(self, nbytes: int) -> Extent:
        """First-fit extent of ``round_up(nbytes)`` bytes."""
        n = round_up(max(nbytes, 1))
        with self._lock:
            for i, e in enumerate(self._free):
                if e.nbytes >= n:
                    rest = Extent(e.offset + n, e.nbytes - n)
                    self._free[i : i + 1] = [rest] if rest.nbytes else []
                    self.used += n
                    return Extent(e.offset, n)
        raise NvmeError(
            f"NVMe store full: {n} B requested, {self.capacity - self.used} B free of "
            f"{self.capacity} B (fragmented into {len(self._free)} extents)"
        )

    def free(self, ext: Extent) -> None:
        with self._lock:
            self._free.append(ext)
            self._free.sort(key=lambda e: e.offset)
            merged: list[Extent] = []
            for e in self._free:
                if merged and merged[-1].offset + merged[-1].nbytes == e.offset:
                    last = merged.pop()
                    e = Extent(last.offset, last.nbytes + e.nbytes)
                merged.append(e)
            self._free = merged
            self.used -= ext.nbytes

    # ------------------------------------------------------------------ buffers
    def empty(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        """A host tensor that O_DIRECT can read into / write from (aligned, padded storage),
        from the store's :class:`~offload.staging.StagingPool` (memory of buffers no longer
        referenced is handed out again)."""
        buf = self.staging.empty(numel * dtype.itemsize)
        return buf.view(dtype)[:numel]

    # ------------------------------------------------------------------ I/O
    def _check(self, ext: Extent, t: torch.Tensor) -> memoryview:
        if t.device.type != "cpu" or not t.is_contiguous():
            raise ValueError("NVMe I/O needs a contiguous CPU tensor")
        if t.nbytes > ext.nbytes:
            raise ValueError(f"tensor of {t.nbytes} B does not fit extent of {ext.nbytes} B")
        # the whole aligned region behind t: O_DIRECT transfers whole blocks
        if self.direct and t.data_ptr() % ALIGN:
            raise ValueError("O_DIRECT needs a 4096-aligned buffer: allocate it with store.empty")
        n = round_up(t.nbytes) if self.direct else t.nbytes
        storage = t.untyped_storage()
        start = t.data_ptr() - storage.data_ptr()
        if start + n > storage.nbytes():
            raise ValueError("buffer storage is not padded to the block size: use store.empty")
        whole = torch.empty(0, dtype=torch.uint8).set_(storage, start, (n,))
        return memoryview(whole.numpy())

    def _submit(self, fn, ext: Extent, mv: memoryview, priority: int) -> Future:
        n = len(mv)
        parts = [
            self._pool.submit(priority, fn, mv[o : min(o + self.request_bytes, n)], ext.offset + o)
            for o in range(0, n, self.request_bytes)
        ]
        done: Future = Future()
        remaining = [len(parts)]
        lock = threading.Lock()

        def finished(f: Future) -> None:
            exc = f.exception()
            with lock:
                remaining[0] -= 1
                last = remaining[0] == 0
            if exc is not None and not done.done():
                done.set_exception(exc)
            elif last and not done.done():
                done.set_result(None)

        for p in parts:
            p.add_done_callback(finished)
        return done

    def _io(self, op, what: str, mv: memoryview, offset: int) -> None:
        with self._busy_lock:  # busy time: the union of the intervals with a request in flight
            if self._active == 0:
                self._busy_since = time.perf_counter()
            self._active += 1
        t0 = time.perf_counter()
        try:
            self._io_loop(op, what, mv, offset)
        finally:
            t1 = time.perf_counter()
            with self._busy_lock:
                self._active -= 1
                if self._active == 0:
                    self.busy_s += t1 - self._busy_since
                if self.io_log is not None:
                    self.io_log.append((t0, t1, what, len(mv)))

    def _io_loop(self, op, what: str, mv: memoryview, offset: int) -> None:
        while len(mv):
            try:
                n = op(self.fd, [mv], offset)
            except OSError as e:
                name = errno.errorcode.get(e.errno or 0, str(e.errno))
                hint = " (the disk is full)" if e.errno == errno.ENOSPC else ""
                raise NvmeError(
                    f"NVMe {what} of {len(mv)} B at offset {offset} of {self.file} failed: "
                    f"{name} {e.strerror}{hint}"
                ) from e
            if n <= 0:
                raise NvmeError(f"short NVMe {what} at offset {offset} of {self.file}")
            mv, offset = mv[n:], offset + n

    def _pwrite(self, mv: memoryview, offset: int) -> None:
        self._io(os.pwritev, "write", mv, offset)

    def _pread(self, mv: memoryview, offset: int) -> None:
        self._io(os.preadv, "read", mv, offset)

    def write(self, ext: Extent, t: torch.Tensor, priority: int = BACKGROUND) -> Future:
        """Write ``t`` at ``ext`` in the background; the future raises on an I/O error.
        Requests of a lower ``priority`` value go first. Nothing orders a read after a write
        of the same extent but the caller: wait for the write's future first."""
        mv = self._check(ext, t)
        self.bytes_written += len(mv)
        return self._submit(self._pwrite, ext, mv, priority)

    def read(self, ext: Extent, t: torch.Tensor, priority: int = NEEDED) -> Future:
        """Read ``ext`` into ``t`` in the background (``priority`` as for :meth:`write`)."""
        mv = self._check(ext, t)
        self.bytes_read += len(mv)
        return self._submit(self._pread, ext, mv, priority)

    def close(self) -> None:
        self._finalizer()  # finishes queued requests, closes the file, removes the directory

    @property
    def closed(self) -> bool:
        return not self._finalizer.alive
