"""Host staging for NVMe transfers: buffers are reused only once nothing references them,
stay page-aligned for O_DIRECT, and the I/O pool serves reads compute waits for before queued
write-backs; parked pages move between mappings without copies or faults; the parameter
fetcher uses a handed-over master at once."""

from __future__ import annotations

import gc
import resource
import threading

import pytest
import torch

from offload import staging
from offload.nvme import ALIGN, BACKGROUND, NEEDED, NvmeStore, _IoPool
from offload.staging import HUGE_PAGE, StagingPool, huge_mapping, staged_bytes


def test_memory_is_reused_only_when_nothing_references_it():
    pool = StagingPool()
    a = pool.empty(3 << 20)
    view = a.view(torch.float32)[10:20]  # a view keeps the slab in use
    pa = a.data_ptr()
    del a
    gc.collect()
    b = pool.empty(3 << 20)
    assert b.data_ptr() != pa and pool.allocated == 2 and pool.reused == 0
    b.fill_(7)
    view.fill_(1.0)  # writing through the view must not touch b
    assert int(b.min()) == 7
    del view
    gc.collect()
    c = pool.empty(3 << 20)
    assert c.data_ptr() == pa and pool.reused == 1
    assert c.numel() == 3 << 20 and c.data_ptr() % ALIGN == 0
    assert pool.bytes == 2 * staged_bytes(3 << 20) == 2 * 4 * (1 << 20)


def test_sizes_match_by_class_and_small_buffers_are_not_pooled():
    pool = StagingPool()
    small = pool.empty(100)
    assert small.numel() == ALIGN and small.data_ptr() % ALIGN == 0 and pool.bytes == 0
    x = pool.empty(5 << 20)
    del x
    y = pool.empty(9 << 20)  # larger class: a new slab, the idle 6 MiB one stays
    assert pool.allocated == 2 and pool.idle_bytes() == 6 << 20
    del y
    assert pool.idle_bytes() == pool.bytes == (6 << 20) + (10 << 20)


def test_trim_gives_back_idle_slabs_only():
    pool = StagingPool()
    keep = pool.empty(HUGE_PAGE)
    idle = [pool.empty(4 << 20) for _ in range(3)]
    del idle
    assert pool.trim(keep_bytes=(2 << 20) + (4 << 20)) == 8 << 20
    assert pool.bytes == 6 << 20
    assert pool.trim() == 4 << 20 and pool.bytes == HUGE_PAGE  # `keep` is still in use
    keep.fill_(1)


def test_store_buffers_come_from_its_pool_and_round_trip(tmp_path):
    store = NvmeStore(tmp_path, capacity=16 << 20)
    x = store.empty(1 << 20, torch.float32)
    x.copy_(torch.arange(1 << 20, dtype=torch.float32))
    ext = store.alloc(x.nbytes)
    store.write(ext, x).result()
    ptr = x.data_ptr()
    del x
    y = store.empty(1 << 20, torch.float32)  # the same memory, handed out again
    assert y.data_ptr() == ptr and store.staging.reused == 1
    y.zero_()
    store.read(ext, y).result()
    assert torch.equal(y, torch.arange(1 << 20, dtype=torch.float32))
    store.close()


def test_io_pool_serves_lower_priority_values_first_fifo_within_one():
    pool = _IoPool(1, "test-io")
    gate, order = threading.Event(), []
    first = pool.submit(NEEDED, gate.wait)  # occupies the only worker
    futs = [
        pool.submit(BACKGROUND, order.append, "write-back 1"),
        pool.submit(BACKGROUND, order.append, "read-ahead"),
        pool.submit(BACKGROUND, order.append, "write-back 2"),
        pool.submit(NEEDED, order.append, "parameter read"),
    ]
    gate.set()
    for f in [first, *futs]:
        f.result(timeout=10)
    assert order == ["parameter read", "write-back 1", "read-ahead", "write-back 2"]
    pool.shutdown()


def test_io_pool_errors_reach_the_waiter_and_shutdown_drains():
    pool = _IoPool(2, "test-io")

    def boom():
        raise OSError(5, "EIO")

    bad = pool.submit(NEEDED, boom)
    done = [pool.submit(BACKGROUND, lambda i=i: i) for i in range(20)]
    pool.shutdown()  # queued requests finish before the workers stop
    assert [f.result(timeout=1) for f in done] == list(range(20))
    assert isinstance(bad.exception(timeout=1), OSError)


# ------------------------------------------------------------------------------ parking
def _faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def test_park_moves_pages_out_and_unpark_brings_them_back_without_faults():
    """A parked mapping keeps its address and reads zeros; its pages (old contents included)
    go to the next mapping of that size that is unparked, whose writes then fault nothing,
    where a fresh mapping faults every page (or huge page) in."""
    n = 64 << 20
    pool = StagingPool()
    mm = huge_mapping(n)
    t = torch.frombuffer(mm, dtype=torch.float32)
    ref = torch.arange(t.numel(), dtype=torch.float32)
    t.copy_(ref)
    ptr = t.data_ptr()
    if not pool.park(mm):
        pytest.skip("this kernel cannot move pages (MREMAP_DONTUNMAP, Linux >= 5.7)")
    assert t.data_ptr() == ptr and not t.any(), "parked: same address, empty"
    assert pool.parked_bytes == pool.bytes == n
    other = huge_mapping(n)
    o = torch.frombuffer(other, dtype=torch.float32)
    assert pool.unpark(other) and torch.equal(o, ref), "the pages moved, contents and all"
    assert pool.parked_bytes == pool.bytes == 0
    assert not pool.unpark(mm), "nothing parked"

    fresh = torch.frombuffer(huge_mapping(n), dtype=torch.float32)
    f0 = _faults()
    fresh.fill_(1.0)
    fresh_faults = _faults() - f0
    assert pool.park(other) and pool.unpark(mm)
    f0 = _faults()
    t.fill_(2.0)
    moved_faults = _faults() - f0
    assert fresh_faults >= n // HUGE_PAGE and moved_faults < 8, (fresh_faults, moved_faults)
    assert float(t.sum()) == 2.0 * t.numel()


def test_trim_gives_back_parked_pages():
    pool = StagingPool()
    mm = huge_mapping(4 << 20)
    mm.write(b"x" * len(mm))
    if not pool.park(mm):
        pytest.skip("this kernel cannot move pages (MREMAP_DONTUNMAP, Linux >= 5.7)")
    assert pool.trim(keep_bytes=0) == 4 << 20
    assert pool.bytes == pool.parked_bytes == 0 and not pool.unpark(mm)


def test_park_reports_false_where_pages_cannot_move(monkeypatch):
    """Without mremap (another OS, an old kernel): park / unpark change nothing and say so;
    the manager then releases the pages with MADV_DONTNEED as before."""
    monkeypatch.setattr(staging, "_mremap", False)
    pool = StagingPool()
    mm = huge_mapping(2 << 20)
    mm.write(b"y" * len(mm))
    assert not pool.park(mm) and not pool.unpark(mm)
    assert mm[:1] == b"y" and pool.bytes == 0


def test_hand_pages_moves_a_buffer_into_a_mapping_and_refills_it_from_parked_pages():
    """The buffer's contents land in the target mapping without a copy; parked pages refill
    the buffer (it stays usable, writes fault nothing); without parked pages of that size,
    or for memory that is not a slab start of that size, nothing changes."""
    n = 8 << 20
    pool = StagingPool()
    buf = pool.empty(n).view(torch.float32)
    ref = torch.arange(buf.numel(), dtype=torch.float32)
    buf.copy_(ref)
    payload = huge_mapping(n)
    p = torch.frombuffer(payload, dtype=torch.float32)
    assert not pool.hand_pages(buf, payload), "nothing parked: the caller copies"
    old = huge_mapping(n)
    old.write(b"z" * n)
    if not pool.park(old):
        pytest.skip("this kernel cannot move pages (MREMAP_DONTUNMAP, Linux >= 5.7)")
    assert not pool.hand_pages(buf[1:], payload), "not the start of a slab"
    assert not pool.hand_pages(buf, huge_mapping(n + HUGE_PAGE)), "another size"
    assert pool.hand_pages(buf, payload)
    assert torch.equal(p, ref), "the contents moved"
    assert pool.parked_bytes == 0 and pool.bytes == n, "the parked pages now back the buffer"
    f0 = _faults()
    buf.fill_(3.0)
    assert _faults() - f0 < 8, "the buffer was refilled with populated pages"
    assert torch.equal(p, ref), "the payload is no longer shared with the buffer"


def test_parked_pages_are_reclaimed_by_tag_with_their_contents_until_taken():
    """Pages parked with a tag come back, contents intact, to a mapping that asks for that
    tag; plain unparks take the oldest parked pages first, so the newest stay reclaimable;
    once another mapping took them, the tag is gone."""
    n = 4 << 20
    pool = StagingPool()
    maps = [huge_mapping(n) for _ in range(3)]
    for i, mm in enumerate(maps):
        mm.write(bytes([65 + i]) * n)
        if not pool.park(mm, tag=("chunk", i)):
            pytest.skip("this kernel cannot move pages (MREMAP_DONTUNMAP, Linux >= 5.7)")
    assert all(pool.holds(n, ("chunk", i)) for i in range(3))
    assert not pool.holds(n, ("chunk", 3)) and not pool.holds(2 * n, ("chunk", 0))
    assert pool.reclaim(maps[2], ("chunk", 2)) and maps[2][:1] == b"C" and maps[2][-1:] == b"C"
    other = huge_mapping(n)
    assert pool.unpark(other) and other[:1] == b"A", "the oldest parked pages go first"
    assert not pool.holds(n, ("chunk", 0)) and not pool.reclaim(maps[0], ("chunk", 0))
    assert maps[0][:1] == b"\x00", "a failed reclaim leaves the mapping as it was"
    assert pool.reclaim(maps[1], ("chunk", 1)) and maps[1][:1] == b"B"
    assert pool.parked_bytes == 0 and not pool.reclaim(maps[1], None)


# ------------------------------------------------------------------------------ fetcher
class _Shard:
    """The attributes of a Chunk that ShardSwapper / ParamFetcher use."""

    def __init__(self, i: int, n: int) -> None:
        self.index, self.shard_size, self.optim_state, self.master = i, n, {}, None


def test_adopted_buffer_is_taken_without_waiting_and_not_reused_while_written(tmp_path):
    """A master handed over by the update pass is used by the next forward at once, its
    write-back still running; its buffer is not refilled until that write is done (a read in
    between gets another buffer)."""
    from concurrent.futures import Future

    from offload.swap import ParamFetcher, ShardSwapper

    n = 1 << 20
    store = NvmeStore(tmp_path, capacity=64 << 20)
    sw = ShardSwapper(store, max_shard=n, depth=1)
    a, b = _Shard(0, n), _Shard(1, n)
    for c in (a, b):
        sw.register(c, ["master"])
    sw.write_now(b, "master", torch.full((n,), 5.0))
    fetcher = ParamFetcher(sw, depth=1)
    handed = store.empty(n, torch.float32).fill_(3.0)
    write_back = Future()  # not done: the write of `handed` is in flight
    fetcher.adopt(a, handed, write_back)
    took: list = []
    th = threading.Thread(target=lambda: took.append(fetcher.take(a)), daemon=True)
    th.start()
    th.join(10)
    if not took:
        write_back.set_result(None)  # unblock the thread before failing
        pytest.fail("take() waited for the handed-over buffer's write-back")
    got = took[0]
    assert got is handed and float(got[0]) == 3.0 and fetcher.hits == 1
    fetcher.give(got)
    fetcher.prefetch(b)
    buf_b = fetcher.inflight[b.index][0]
    assert buf_b is not handed, "the buffer under a running write was handed out again"
    assert float(fetcher.take(b)[0]) == 5.0 and float(handed[0]) == 3.0
    write_back.set_result(None)
    fetcher.drain()
    assert not fetcher._writing
    sw.close()
    store.close()


@pytest.mark.parametrize("fails", [False, True], ids=["ok", "write-error"])
def test_read_behind_a_running_write_does_not_block_the_caller(tmp_path, monkeypatch, fails):
    """A read of a key whose write-back is still in flight returns at once and is issued when
    the write is done: it then sees the written data, or the write's error."""
    import errno
    import time

    from offload.swap import ShardSwapper

    n = 1 << 18
    store = NvmeStore(tmp_path, capacity=16 << 20)
    sw = ShardSwapper(store, max_shard=n, depth=1)
    c = _Shard(0, n)
    sw.register(c, ["master"])
    gate, plain = threading.Event(), store._pwrite

    def held_write(mv, off):
        gate.wait(10)
        if fails:
            raise OSError(errno.ENOSPC, "No space left on device")
        return plain(mv, off)

    monkeypatch.setattr(store, "_pwrite", held_write)
    sw.write_async(c, "master", torch.full((n,), 7.0))
    out = store.empty(n, torch.float32).zero_()
    t0 = time.perf_counter()
    fut = sw.read_async(c, "master", out)
    assert time.perf_counter() - t0 < 2.0 and not fut.done(), "the read waited for the write"
    gate.set()
    if fails:
        with pytest.raises(OSError, match="No space"):
            fut.result(timeout=10)
    else:
        fut.result(timeout=10)
        assert bool((out == 7.0).all())
        sw.settle(c, "master")
    sw.close()
    store.close()
