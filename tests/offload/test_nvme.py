"""The NVMe store: data round-trips bit for bit through real files with O_DIRECT, many requests
in flight; bad directories are refused before any work; I/O errors are clear; nothing is left
behind."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import threading

import pytest
import torch

from offload.nvme import ALIGN, NvmeError, NvmeStore, check_directory, remove_stale


def test_round_trip_many_tensors_and_requests(tmp_path):
    store = NvmeStore(tmp_path, capacity=8 << 20, request_bytes=ALIGN * 4, io_threads=4)
    g = torch.Generator().manual_seed(0)
    items = []
    for n, dt in [
        (1, torch.float32),
        (1000, torch.float32),
        (70_000, torch.bfloat16),
        (5, torch.int64),
    ]:
        x = store.empty(n, dt)
        x.copy_((torch.randn(n, generator=g) * 100).to(dt))
        ext = store.alloc(x.nbytes)
        assert ext.offset % ALIGN == 0 and ext.nbytes % ALIGN == 0
        items.append((ext, x, store.write(ext, x)))
    for _, _, f in items:
        f.result()
    for ext, x, _ in items:
        y = store.empty(x.numel(), x.dtype)
        store.read(ext, y).result()
        assert torch.equal(x, y)
    assert store.bytes_written >= sum(x.nbytes for _, x, _ in items)
    # the data really is in the file (not a cache of ours): read it back with plain os.pread
    ext, x, _ = items[1]
    raw = os.pread(os.open(store.file, os.O_RDONLY), x.nbytes, ext.offset)
    assert torch.equal(torch.frombuffer(bytearray(raw), dtype=torch.float32), x)
    store.close()


def test_o_direct_is_used_where_the_filesystem_allows_it(tmp_path):
    store = NvmeStore(tmp_path, capacity=1 << 20)
    flags = int(open(f"/proc/self/fdinfo/{store.fd}").read().split("flags:")[1].split()[0], 8)
    assert bool(flags & os.O_DIRECT) == store.direct
    if store.direct:  # e.g. ext4: misaligned buffers are refused before the kernel sees them
        with pytest.raises(ValueError, match="aligned"):
            store.write(store.alloc(64), torch.zeros(1024)[1:17])
    store.close()


def test_buffered_fallback_warns(tmp_path, monkeypatch):
    real_open = os.open

    def refuse_direct(path, flags, *a):
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *a)

    monkeypatch.setattr(os, "open", refuse_direct)
    with pytest.warns(UserWarning, match="refuses O_DIRECT"):
        store = NvmeStore(tmp_path, capacity=1 << 20)
    assert not store.direct
    x = torch.arange(10.0)  # buffered I/O takes any contiguous buffer
    ext = store.alloc(x.nbytes)
    store.write(ext, x).result()
    y = torch.empty(10)
    store.read(ext, y).result()
    assert torch.equal(x, y)
    store.close()


def test_allocator_reuses_and_coalesces(tmp_path):
    store = NvmeStore(tmp_path, capacity=16 * ALIGN)
    a, b, c = (store.alloc(4 * ALIGN) for _ in range(3))
    with pytest.raises(NvmeError, match="store full"):
        store.alloc(5 * ALIGN)
    store.free(a)
    store.free(b)  # a and b merge into one 8-block hole
    d = store.alloc(8 * ALIGN)
    assert d.offset == 0 and store.used == 12 * ALIGN
    store.free(c)
    store.free(d)
    assert store.used == 0 and store.alloc(16 * ALIGN).offset == 0
    store.close()


def test_bad_directories_are_refused_before_any_work(tmp_path):
    with pytest.raises(NvmeError, match="does not exist"):
        NvmeStore(tmp_path / "missing", capacity=1 << 20)
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(NvmeError, match="not a directory"):
        NvmeStore(f, capacity=1 << 20)
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if os.geteuid() != 0:  # root writes anywhere; the check below covers root too
            with pytest.raises(NvmeError, match="not writable"):
                NvmeStore(ro, capacity=1 << 20)
    finally:
        ro.chmod(0o700)
    with pytest.raises(NvmeError, match=r"GiB free, the NVMe tier needs .* GiB more"):
        check_directory(tmp_path, 1 << 60)
    assert list(tmp_path.glob("colossus-nvme-*")) == []


def test_unwritable_directory_is_refused(tmp_path, monkeypatch):
    real_access = os.access
    monkeypatch.setattr(
        os, "access", lambda p, m: False if str(p) == str(tmp_path) else real_access(p, m)
    )
    with pytest.raises(NvmeError, match="not writable"):
        NvmeStore(tmp_path, capacity=1 << 20)


def test_disk_full_during_a_write_is_a_clear_error(tmp_path, monkeypatch):
    store = NvmeStore(tmp_path, capacity=1 << 20, request_bytes=ALIGN)
    x = store.empty(4 * ALIGN // 4, torch.float32)
    ext = store.alloc(x.nbytes)
    calls = [0]
    real = os.pwritev
    lock = threading.Lock()

    def flaky(fd, bufs, off):
        with lock:
            calls[0] += 1
            n = calls[0]
        if n == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, bufs, off)

    monkeypatch.setattr(os, "pwritev", flaky)
    with pytest.raises(NvmeError, match=r"write .* failed: ENOSPC .*disk is full"):
        store.write(ext, x).result()
    store.close()


def test_files_are_removed_on_close_and_after_a_crash(tmp_path):
    store = NvmeStore(tmp_path, capacity=1 << 20)
    d = store.path
    assert d.is_dir() and store.file.stat().st_size == 1 << 20  # preallocated
    store.close()
    assert not d.exists() and store.closed
    # a process that dies without cleaning up leaves its directory; the next store removes it
    code = (
        "import os; from offload.nvme import NvmeStore; "
        f"s = NvmeStore({str(tmp_path)!r}, capacity=1 << 20); print(s.path, flush=True); "
        "os._exit(9)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 9
    left = tmp_path / os.path.basename(out.stdout.strip())
    assert left.is_dir()
    assert remove_stale(tmp_path) == [left] and not left.exists()
    # and a normal interpreter exit cleans up by itself
    code = code.replace("os._exit(9)", "pass")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert not (tmp_path / os.path.basename(out.stdout.strip())).exists()
