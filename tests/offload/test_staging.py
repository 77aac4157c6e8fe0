"""Host staging for NVMe transfers: buffers are reused only once nothing references them,
stay page-aligned for O_DIRECT, and the I/O pool serves reads compute waits for before queued
write-backs."""

from __future__ import annotations

import gc
import threading

import torch

from offload.nvme import ALIGN, BACKGROUND, NEEDED, NvmeStore, _IoPool
from offload.staging import HUGE_PAGE, StagingPool, staged_bytes


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
