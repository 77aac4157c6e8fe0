"""1D tensor-parallel layers (parallel.tensor) against single-process nn.Linear / nn.Embedding /
F.cross_entropy: forward outputs and input / weight / bias gradients on every rank of 2 and 4
gloo ranks (fp32, rtol = atol = 1e-5), the per-rank parameter memory (1/tp of the full layer),
the gathered full weights, and the collective count of a column -> row MLP (one all-reduce
forward, one backward: Megatron's 2 per MLP per step). One spawn per world size runs every case."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from spawn_helpers import spawn

from parallel import comm
from parallel.tensor import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    vocab_parallel_cross_entropy,
)
from parallel.topology import Topology

TOL = {"rtol": 1e-5, "atol": 1e-5}


def _chunk(t, dim, r, p):
    return t.chunk(p, dim=dim)[r]


def _close(a, b):
    return bool(torch.allclose(a, b, **TOL)), float((a - b).abs().max())


def _worker():
    r, p = dist.get_rank(), dist.get_world_size()
    topo = Topology(tp=p)
    g = topo.tp_group
    torch.manual_seed(0)  # the same reference on every rank
    out: dict[str, tuple[bool, float]] = {}
    x0 = torch.randn(3, 5, 8)

    # column, gathered output, with bias
    full = torch.nn.Linear(8, 12)
    col = ColumnParallelLinear.from_linear(full, g, gather_output=True)
    gy = torch.randn(3, 5, 12)
    xr, xp = x0.clone().requires_grad_(), x0.clone().requires_grad_()
    (full(xr) * gy).sum().backward()
    yp = col(xp)
    (yp * gy).sum().backward()
    out["col.out"] = _close(yp, full(x0))
    out["col.dx"] = _close(xp.grad, xr.grad)
    out["col.dw"] = _close(col.weight.grad, _chunk(full.weight.grad, 0, r, p))
    out["col.db"] = _close(col.bias.grad, _chunk(full.bias.grad, 0, r, p))
    out["col.full_params"] = _close(col.full_params()["weight"], full.weight.detach())
    out["col.numel"] = (col.weight.numel() * p == full.weight.numel(), 0.0)

    # column (parallel output) -> gelu -> row (parallel input): a Megatron MLP
    fc, proj = torch.nn.Linear(8, 16), torch.nn.Linear(16, 8)
    c = ColumnParallelLinear.from_linear(fc, g)
    rw = RowParallelLinear.from_linear(proj, g, input_is_parallel=True)
    gy = torch.randn(3, 5, 8)
    xr, xp = x0.clone().requires_grad_(), x0.clone().requires_grad_()
    (proj(F.gelu(fc(xr))) * gy).sum().backward()
    comm.reset_stats()
    yp = rw(F.gelu(c(xp)))
    (yp * gy).sum().backward()
    st = comm.stats().get("tp", {})
    out["mlp.allreduce_calls"] = (st.get("all_reduce", {}).get("calls") == 2 and len(st) == 1, 0.0)
    out["mlp.out"] = _close(yp, proj(F.gelu(fc(x0))))
    out["mlp.dx"] = _close(xp.grad, xr.grad)
    out["mlp.fc.dw"] = _close(c.weight.grad, _chunk(fc.weight.grad, 0, r, p))
    out["mlp.fc.db"] = _close(c.bias.grad, _chunk(fc.bias.grad, 0, r, p))
    out["mlp.proj.dw"] = _close(rw.weight.grad, _chunk(proj.weight.grad, 1, r, p))
    out["mlp.proj.db"] = _close(rw.bias.grad, proj.bias.grad)
    out["mlp.proj.full_params"] = _close(rw.full_params()["weight"], proj.weight.detach())
    out["row.numel"] = (rw.weight.numel() * p == proj.weight.numel(), 0.0)

    # row with a full (replicated) input, no bias
    lin = torch.nn.Linear(8, 4, bias=False)
    row = RowParallelLinear.from_linear(lin, g, input_is_parallel=False)
    gy = torch.randn(3, 5, 4)
    xr, xp = x0.clone().requires_grad_(), x0.clone().requires_grad_()
    (lin(xr) * gy).sum().backward()
    yp = row(xp)
    (yp * gy).sum().backward()
    out["row_full.out"] = _close(yp, lin(x0))
    out["row_full.dx"] = _close(xp.grad, xr.grad)
    out["row_full.dw"] = _close(row.weight.grad, _chunk(lin.weight.grad, 1, r, p))

    # vocab-parallel embedding with a padding row (its gradient stays zero)
    emb = torch.nn.Embedding(16, 6, padding_idx=4)
    vemb = VocabParallelEmbedding.from_embedding(emb, g)
    ids = torch.randint(0, 16, (3, 7))
    ids[0, :3] = torch.tensor([4, 15, 0])
    gy = torch.randn(3, 7, 6)
    (emb(ids) * gy).sum().backward()
    yp = vemb(ids)
    (yp * gy).sum().backward()
    out["emb.out"] = _close(yp, emb(ids))
    out["emb.dw"] = _close(vemb.weight.grad, _chunk(emb.weight.grad, 0, r, p))
    out["emb.full_params"] = _close(vemb.full_params()["weight"], emb.weight.detach())
    out["emb.numel"] = (vemb.weight.numel() * p == emb.weight.numel(), 0.0)

    # vocab-parallel cross-entropy with ignored targets, three reductions
    logits = torch.randn(4, 6, 16) * 3
    target = torch.randint(0, 16, (4, 6))
    target[0, :2] = -100
    target[1, 0] = 15
    for red in ("mean", "sum", "none"):
        lr_ = logits.clone().requires_grad_()
        ref = F.cross_entropy(lr_.view(-1, 16), target.view(-1), reduction=red)
        ref = ref.view(4, 6) if red == "none" else ref
        gl = torch.rand(4, 6) if red == "none" else torch.tensor(1.7)
        (ref * gl).sum().backward()
        lp = _chunk(logits, -1, r, p).clone().requires_grad_()
        got = vocab_parallel_cross_entropy(lp, target, g, reduction=red)
        (got * gl).sum().backward()
        out[f"ce.{red}.loss"] = _close(got, ref)
        out[f"ce.{red}.dlogits"] = _close(lp.grad, _chunk(lr_.grad, -1, r, p))

    # topology: tp innermost, then dp
    if p == 4:
        t = Topology(tp=2, dp=2)
        out["topo.tp_ranks"] = (t.tp_ranks == [r - r % 2, r - r % 2 + 1], 0.0)
        out["topo.dp_ranks"] = (t.dp_ranks == [r % 2, r % 2 + 2], 0.0)
        out["topo.coords"] = ((t.dp_rank, t.tp_rank) == (r // 2, r % 2), 0.0)
        t = Topology.from_world(tp=2)
        out["topo.from_world"] = ((t.dp, t.tp, t.sp) == (2, 2, 1), 0.0)
        t = Topology(dp=1, tp=2, sp=2)
        out["topo.sp_ranks"] = (t.sp_ranks == [r % 2, r % 2 + 2], 0.0)
        out["topo.sp_tp"] = (t.tp_ranks == [r - r % 2, r - r % 2 + 1] and t.sp_rank == r // 2, 0.0)
        x = torch.full((1,), float(r))
        comm.all_reduce(x, group=t.tp_group)
        out["topo.tp_group_sum"] = (x.item() == 2 * (r - r % 2) + 1, 0.0)
    return out


@pytest.mark.parametrize("world", [2, 4])
def test_1d_layers_match_single_process(tmp_path, world):
    res = spawn(_worker, world, tmp_path)
    for rank, o in enumerate(res):
        bad = {k: v for k, v in o.items() if not v[0]}
        assert not bad, f"rank {rank} of {world}: {bad}"
        assert len(o) >= 28 + (7 if world == 4 else 0)


def test_single_process_layers_are_plain_layers():
    torch.manual_seed(0)
    fc = torch.nn.Linear(8, 6)
    x = torch.randn(2, 8)
    assert torch.allclose(ColumnParallelLinear.from_linear(fc)(x), fc(x), **TOL)
    assert torch.allclose(RowParallelLinear.from_linear(fc, input_is_parallel=False)(x), fc(x))
    fresh = ColumnParallelLinear(8, 6)
    assert fresh.weight.shape == (6, 8) and fresh.weight.abs().sum() > 0
