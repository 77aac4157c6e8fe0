"""Chunk size search minimises padding (checked against brute force); oversize params get a
chunk of their own; capacities split evenly over ranks."""

import itertools
import random

import pytest

from offload import pack, padding_waste, search_chunk_size


def _brute_waste(sizes, cs, world):
    """Independent re-implementation of the packing rule, written as a plain simulation."""
    caps, open_used = [], 0
    has_open = False
    for n in sizes:
        if n > cs:
            caps.append((n + world - 1) // world * world)
            continue
        if has_open and open_used + n <= cs:
            open_used += n
            continue
        if has_open:
            caps.append((cs + world - 1) // world * world)
        open_used, has_open = n, True
    if has_open:
        caps.append((open_used + world - 1) // world * world)
    return sum(caps) - sum(sizes)


@pytest.mark.parametrize("world", [1, 2, 4])
def test_search_matches_brute_force(world):
    rng = random.Random(world)
    for _ in range(20):
        groups = [[rng.choice([3, 7, 16, 30, 64, 100]) for _ in range(rng.randint(3, 9))]]
        groups.append([rng.randint(1, 40) for _ in range(4)])
        cands = range(8, 129, 4)
        size, waste = search_chunk_size(groups, cands, world)
        brute = {cs: sum(_brute_waste(g, cs, world) for g in groups) for cs in cands}
        best = min(brute.values())
        assert waste == best == brute[size]
        assert size == min(cs for cs, w in brute.items() if w == best)  # ties: smallest


def test_padding_waste_is_what_pack_allocates():
    for sizes in itertools.product([5, 9, 20], repeat=4):
        for cs in (10, 16, 25):
            assert padding_waste(sizes, cs, 2) == _brute_waste(sizes, cs, 2)


def test_oversize_param_gets_own_chunk():
    chunks = pack([4, 50, 4, 4], chunk_size=10, world_size=4)
    # 50 > 10: alone, rounded up to a multiple of 4 ranks; the open chunk stays open for the
    # second 4, the third 4 does not fit (12 > 10) and opens the trimmed last chunk
    assert chunks == [([0, 2], 12), ([1], 52), ([3], 4)]


def test_capacities_divide_by_world():
    for world in (1, 2, 3, 4, 8):
        for _idx, cap in pack([7, 13, 1, 40, 22, 5], chunk_size=30, world_size=world):
            assert cap % world == 0
            assert cap >= 0


def test_greedy_in_order():
    # closes a chunk when the next param does not fit; the last chunk is trimmed
    assert pack([6, 6, 3], chunk_size=10) == [([0], 10), ([1, 2], 9)]
