"""Tiers: exact accounting, static placement (Colossal-AI fractions), Belady eviction."""

import functools

import pytest
import torch

from offload import AccessOrder, Tier, belady_victim, static_placement


def test_put_on_same_device_copies_nothing():
    t = Tier("host", torch.device("cpu"))
    x = torch.arange(4.0)
    assert t.put(x) is x


def test_accounting_and_budget():
    t = Tier("device", torch.device("cpu"), budget=100)
    t.account("param_shard", 60)
    assert t.fits(40) and not t.fits(41)
    t.account("grad_buffer", 30)
    t.account("grad_buffer", -30)
    r = t.report()
    assert r["total"] == 60 and r["peak"] == 90 and r["peak_grad_buffer"] == 30
    assert r["model_state"] == 60
    with pytest.raises(RuntimeError, match="negative"):
        t.account("master", -1)
    with pytest.raises(KeyError):
        t.account("nonsense", 1)


def test_static_placement_fractions():
    b = [10, 10, 10, 10]
    assert static_placement(b, 0.0) == [False] * 4
    assert static_placement(b, 1.0) == [True] * 4
    assert static_placement(b, 0.5) == [True, True, False, False]
    assert static_placement(b, 0.3) == [True, True, False, False]  # greedy until >= target
    with pytest.raises(ValueError):
        static_placement(b, 1.5)


def _min_misses(seq, cap):
    """Brute force: fewest misses over every possible eviction choice (exponential, tiny)."""

    @functools.cache
    def go(i, cache):
        if i == len(seq):
            return 0
        x = seq[i]
        if x in cache:
            return go(i + 1, cache)
        if len(cache) < cap:
            return 1 + go(i + 1, cache | {x})
        return 1 + min(go(i + 1, (cache - {v}) | {x}) for v in cache)

    return go(0, frozenset())


def _belady_misses(seq, cap):
    order = AccessOrder()
    for c in seq:  # first iteration records the order
        order.record(c)
    order.freeze()
    order.start_iteration()
    cache, misses = set(), 0
    for c in seq:
        if c not in cache:
            misses += 1
            if len(cache) >= cap:
                cache.discard(order.victim(cache))
            cache.add(c)
        order.record(c)
    return misses


@pytest.mark.parametrize(
    "seq",
    [
        [0, 1, 2, 3, 0, 1, 4, 0, 1, 2, 3, 4],
        [0, 1, 2, 3, 4, 4, 3, 2, 1, 0],  # forward then backward, the chunk access shape
        [5, 0, 1, 5, 2, 5, 3, 0, 4, 1, 2],
    ],
)
@pytest.mark.parametrize("cap", [2, 3])
def test_furthest_next_use_is_optimal(seq, cap):
    assert _belady_misses(seq, cap) == _min_misses(tuple(seq), cap)


def test_victim_wraps_into_next_iteration_and_falls_back_to_lru():
    # at position 3 the sequence is done: next uses are in the next iteration, 1 before 2
    assert belady_victim([0, 1, 2, 0], position=3, candidates=[1, 2]) == 2
    fresh = AccessOrder()  # nothing frozen: least recently used goes first
    for c in (3, 1, 2):
        fresh.record(c)
    assert fresh.victim([1, 2, 3]) == 3


def test_release_host_memory_keeps_what_the_allowance_covers():
    """glibc: a heap holding at most ``keep`` free bytes is left alone (the next step reuses
    them without page faults); above it, ``malloc_trim`` hands the free pages back."""
    from offload import tiers

    if tiers.heap_free_bytes() is None:
        pytest.skip("not glibc >= 2.33 (no mallinfo2)")
    blocks = [torch.empty(1 << 18) for _ in range(64)]  # 1 MiB each
    for b in blocks:
        b.fill_(1.0)
    del blocks
    free = tiers.heap_free_bytes()
    assert free > 0
    assert not tiers.release_host_memory(keep=free), "within the allowance: no trim"
    assert tiers.release_host_memory(keep=0)


def test_manager_trims_the_heap_only_beyond_what_the_host_budget_has_room_for(
    tmp_path, monkeypatch
):
    """Without a host budget the freed heap stays for the next step; with one, only as much
    as the budget has room for by the plan and by the peak RSS so far: none when the process
    already peaked above the budget."""
    from offload_helpers import batches, tiny_gpt2

    from offload import ChunkAdamW, ChunkConfig, ChunkManager
    from offload import manager as manager_mod
    from offload.tiers import peak_rss_bytes

    keeps = []
    monkeypatch.setattr(manager_mod, "release_host_memory", lambda keep=0: keeps.append(keep))
    base = dict(chunk_size=1500, offload_optim_frac=1.0, nvme_optim_frac=1.0, nvme_dir=tmp_path)
    assert peak_rss_bytes() > 64 << 20  # torch alone is more
    for budget in (None, 64 << 20, 1 << 40):
        keeps.clear()
        mgr = ChunkManager(tiny_gpt2(), ChunkConfig(**base, host_budget=budget))
        opt = ChunkAdamW(mgr, lr=1e-3)
        b = batches(1)[0]
        mgr.backward(mgr.module(input_ids=b, labels=b).loss)
        opt.step()
        if budget is None:
            assert keeps[-1] >= 1 << 60
        elif budget == 64 << 20:
            assert keeps[-1] == 0, "the process peaked above the budget already"
        else:
            planned = mgr.plan["host"] + mgr.plan["device"]  # one RAM on a CPU-only box
            assert budget - peak_rss_bytes() <= keeps[-1] <= budget - planned
        mgr.close()
