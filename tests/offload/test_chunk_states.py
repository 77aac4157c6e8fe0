"""Slot state machine: every legal transition works, everything else raises."""

import itertools

import pytest
import torch

from offload import TRANSITIONS, Chunk, IllegalTransition, SlotState

S = SlotState


def _chunk():
    w = torch.nn.Parameter(torch.ones(2, 3))
    b = torch.nn.Parameter(torch.zeros(3))
    return Chunk(0, [("w", w), ("b", b)], capacity=10, dtype=torch.float32, world_size=2)


def _force(chunk, slot, state):
    slot.state = state  # test setup only: start from an arbitrary state


LEGAL = [(a, b) for a, bs in TRANSITIONS.items() for b in bs]
ILLEGAL = [(a, b) for a, b in itertools.product(S, S) if b not in TRANSITIONS[a]]


@pytest.mark.parametrize(("src", "dst"), LEGAL, ids=lambda s: s.name)
def test_legal_transition(src, dst):
    c = _chunk()
    s = c.slots[0]
    _force(c, s, src)
    c.transition(s, dst)
    assert s.state is dst


@pytest.mark.parametrize(("src", "dst"), ILLEGAL, ids=lambda s: s.name)
def test_illegal_transition_raises(src, dst):
    c = _chunk()
    s = c.slots[1]
    _force(c, s, src)
    with pytest.raises(IllegalTransition, match=rf"'b'.*{src.name} -> {dst.name}"):
        c.transition(s, dst)
    assert s.state is src  # unchanged


def test_the_bugs_the_table_exists_for_are_illegal():
    # compute on data never gathered; drop unreduced gradient; release data in use
    assert S.COMPUTE not in TRANSITIONS[S.FREE]
    assert S.FREE not in TRANSITIONS[S.READY_FOR_REDUCE]
    assert S.FREE not in TRANSITIONS[S.HOLD_AFTER_BWD]
    assert S.FREE not in TRANSITIONS[S.COMPUTE]
    assert S.READY_FOR_REDUCE not in TRANSITIONS[S.FREE]


def test_a_step_walks_the_table():
    c = _chunk()
    s = c.slots[0]
    for st in (S.HOLD, S.COMPUTE, S.HOLD, S.FREE, S.HOLD, S.COMPUTE):  # fwd, release, bwd
        c.transition(s, st)
    s.pending, s.grad_count = True, 1
    c.transition(s, c.rest_state(s))
    assert s.state is S.READY_FOR_REDUCE
    c.transition(s, S.HOLD)
    c.transition(s, S.FREE)


def test_segments_straddle_shards():
    c = _chunk()  # w: [0, 6), b: [6, 9), shards of 5
    assert [(g.name, g.offset_in_shard, g.length, g.offset_in_param) for g in c.segments_of(0)] == [
        ("w", 0, 5, 0)
    ]
    assert [(g.name, g.offset_in_shard, g.length, g.offset_in_param) for g in c.segments_of(1)] == [
        ("w", 0, 1, 5),
        ("b", 1, 3, 0),
    ]


def test_capacity_must_split_evenly_and_fit():
    p = torch.nn.Parameter(torch.ones(5))
    with pytest.raises(ValueError, match="multiple"):
        Chunk(0, [("p", p)], capacity=7, dtype=torch.float32, world_size=2)
    with pytest.raises(ValueError, match="do not fit"):
        Chunk(0, [("p", p)], capacity=4, dtype=torch.float32)
