"""parallel.comm: results equal the torch.distributed definitions, and the counters hold the
ring-model byte counts of the module docstring, on every rank of 4 gloo ranks."""

from __future__ import annotations

import torch
import torch.distributed as dist
from spawn_helpers import spawn

from parallel import comm


def _worker():
    r, p = dist.get_rank(), dist.get_world_size()
    pair = None
    for ranks in ([0, 1], [2, 3]):  # every rank must create every group
        g = dist.new_group(ranks)
        if r in ranks:
            pair = g
    comm.register_group(pair, "pair")
    comm.reset_stats()
    out = {}
    t = torch.full((8,), float(r + 1))
    comm.all_reduce(t)
    out["all_reduce"] = t.clone()
    out["all_gather"] = comm.all_gather(torch.full((2, 3), float(r)), dim=1)
    out["reduce_scatter"] = comm.reduce_scatter(torch.arange(8.0) * (r + 1), dim=0)
    b = torch.full((4,), float(r))
    comm.broadcast(b, src=2)
    out["broadcast"] = b
    a2a = torch.empty(4)
    comm.all_to_all_single(a2a, torch.arange(4.0) + 10 * r)
    out["all_to_all"] = a2a
    recv = torch.empty(3)
    for w in comm.ring_pass(torch.full((3,), float(r)), recv):
        w.wait()
    out["ring"] = recv
    pr = torch.full((2,), float(r))
    comm.all_reduce(pr, group=pair)
    out["pair"] = pr
    out["stats"] = comm.stats()
    out["rank"], out["world"] = r, p
    return out


def test_collectives_and_counts(tmp_path):
    res = spawn(_worker, 4, tmp_path)
    p = 4
    for r, o in enumerate(res):
        assert torch.equal(o["all_reduce"], torch.full((8,), 10.0))
        assert torch.equal(
            o["all_gather"], torch.cat([torch.full((2, 3), float(k)) for k in range(p)], 1)
        )
        assert torch.equal(o["reduce_scatter"], (torch.arange(8.0) * 10)[2 * r : 2 * r + 2])
        assert torch.equal(o["broadcast"], torch.full((4,), 2.0))
        assert torch.equal(o["all_to_all"], torch.tensor([10.0 * k + r for k in range(p)]))
        assert torch.equal(o["ring"], torch.full((3,), float((r - 1) % p)))
        assert torch.equal(o["pair"], torch.full((2,), 1.0 if r < 2 else 5.0))
        s = o["stats"]["world"]
        assert s["all_reduce"] == {"calls": 1, "payload": 32, "sent": 2 * 3 * 32 / 4}
        assert s["all_gather"] == {"calls": 1, "payload": 24, "sent": 3 * 24}
        assert s["reduce_scatter"] == {"calls": 1, "payload": 32, "sent": 3 * 32 / 4}
        assert s["broadcast"] == {"calls": 1, "payload": 16, "sent": 16 if r == 2 else 0}
        assert s["all_to_all"] == {"calls": 1, "payload": 16, "sent": 12}
        assert s["send"] == {"calls": 1, "payload": 12, "sent": 12}
        assert o["stats"]["pair"]["all_reduce"] == {"calls": 1, "payload": 8, "sent": 8}


def test_world_of_one_is_a_no_op():
    comm.reset_stats()
    t = torch.ones(3)
    comm.all_reduce(t)
    assert torch.equal(comm.all_gather(t), t)
    assert comm.stats() == {}
