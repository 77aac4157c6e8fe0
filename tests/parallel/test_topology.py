"""Topology validation: impossible layouts fail at construction and say what would be valid.
(Group membership on 4 gloo ranks is checked in test_tensor_1d.py, in the same spawn.)"""

from __future__ import annotations

import pytest

from parallel.topology import Topology, TopologyError


@pytest.mark.parametrize(
    ("kwargs", "msg"),
    [
        (
            {"tp": 6, "tp_mode": "2d"},
            "tp_mode=2d needs tp to be a square (1, 4, 9, 16, ...); got 6",
        ),
        ({"tp": 8, "tp_mode": "2.5d", "tp_depth": 3}, "tp_mode=2.5d needs tp = q^2 * tp_depth"),
        ({"tp": 4, "tp_mode": "3d"}, "tp_mode=3d needs tp to be a cube (1, 8, 27, 64, ...); got 4"),
        ({"tp": 2, "tp_mode": "4d"}, "tp_mode must be one of 1d, 2d, 2.5d, 3d"),
        ({"tp": 2, "tp_depth": 2}, "tp_depth is only used by tp_mode=2.5d"),
        ({"tp": 0}, "tp must be >= 1"),
    ],
)
def test_bad_tp_shapes(kwargs, msg):
    with pytest.raises(TopologyError) as e:
        Topology(world_size=64, dp=None, **kwargs)
    assert msg in str(e.value)


def test_product_must_match_world():
    with pytest.raises(TopologyError) as e:
        Topology(dp=2, tp=2, world_size=6)
    s = str(e.value)
    assert "dp*tp*sp = 2*2*1 = 4 but the world size is 6" in s
    assert "dp=3 tp=2 sp=1" in s  # a valid layout with the same tp is offered
    with pytest.raises(TopologyError, match="tp\\*sp = 4 does not divide the world size 6"):
        Topology(dp=None, tp=4, world_size=6)


def test_valid_shapes_pass():
    assert Topology(dp=None, tp=8, tp_mode="2.5d", tp_depth=2, world_size=16).dp == 2
    assert Topology(dp=None, tp=9, tp_mode="2d", world_size=9).dp == 1
    assert Topology(dp=None, tp=8, tp_mode="3d", world_size=8).grid_side == 2
    t = Topology()  # one process, no torch.distributed
    assert (t.dp, t.tp, t.sp, t.tp_ranks, t.tp_group) == (1, 1, 1, [0], None)
    with pytest.raises(TopologyError, match="2.5d.*tp_depth in \\[2, 8\\]"):
        Topology(dp=None, tp=8, tp_mode="2.5d", tp_depth=4, world_size=8)
