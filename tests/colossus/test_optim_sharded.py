"""Sharded == unsharded for LAMB / LARS: trust ratios are norms of whole logical parameters.

* strategy ``chunk`` (ZeRO-3 shards, chunk size chosen so parameters straddle shard
  boundaries), 2 and 4 gloo ranks: ``ChunkLamb`` / ``ChunkLars`` give the parameters of
  ``colossus.optim.Lamb`` / ``Lars`` in one process within 1e-5, on every rank, with exactly one
  all-reduce per optimizer step (counted by wrapping ``torch.distributed.all_reduce``);
* tensor parallelism by hand: a Linear weight and its bias row-split over 2 ranks (1D) and a
  weight split in 2 x 2 blocks over 4 ranks (2D), replicated LayerNorm gains beside them,
  ``ShardedNormReducer`` over the group: same parameters as one process, one counted
  all-reduce per step (``parallel.comm`` statistics); and ``parallel``'s own 1D layers
  (column- then row-parallel Linear) on 2 ranks against ``nn.Linear`` in one process.

One spawn per world size runs every case."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "offload"))
from offload_helpers import (  # noqa: E402
    assert_params_close,
    batches,
    global_loss,
    local_slice,
    spawn,
    tiny_gpt2,
)

from colossus.optim import Lamb, Lars, ShardedNormReducer, param_groups  # noqa: E402
from offload import ChunkConfig, ChunkLamb, ChunkLars, ChunkManager  # noqa: E402

STEPS = 8
CHUNK = 1500
LAMB_KW = {"lr": 3e-3, "weight_decay": 0.1}
LARS_KW = {"lr": 0.5, "weight_decay": 0.01, "momentum": 0.9, "trust_coefficient": 0.02}
CASES = {
    "lamb": (ChunkLamb, Lamb, LAMB_KW),
    "lamb-options": (ChunkLamb, Lamb, {**LAMB_KW, "phi_max": 1.0, "bias_correction": False}),
    "lars": (ChunkLars, Lars, LARS_KW),
    "lars-nesterov": (ChunkLars, Lars, {**LARS_KW, "nesterov": True, "larc_clip": True}),
    # the compiled kernels (offload.trust_fused) on segments of >= FUSED_MIN_SEG elements, the
    # multi-tensor path on the rest; the one-process reference stays on the multi-tensor path
    "lamb-fused": (ChunkLamb, Lamb, {**LAMB_KW, "fused": True}),
    "lars-fused": (ChunkLars, Lars, {**LARS_KW, "nesterov": True, "fused": True}),
}
FUSED_MIN_SEG = 64


def reference(case: str):
    _, cls, kw = CASES[case]
    kw = {**kw, "fused": False}
    model = tiny_gpt2(0)
    # the chunk manager's default decay rule (ndim >= 2), no name patterns
    opt = cls(param_groups(model, kw["weight_decay"], exclude=()), **kw)
    for b in batches(STEPS):
        model(input_ids=b, labels=b).loss.backward()
        opt.step()
        opt.zero_grad()
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _count_all_reduce():
    calls = []
    orig = dist.all_reduce

    def counting(t, *a, **k):
        calls.append(tuple(t.shape))
        return orig(t, *a, **k)

    return calls, orig, counting


def chunk_case(case: str) -> dict:
    ccls, _, kw = CASES[case]
    import offload.trust_fused as tf

    tf.FUSED_MIN_NUMEL = FUSED_MIN_SEG if kw.get("fused") else 1 << 16
    kw = {"fused": False, **kw}
    mgr = ChunkManager(tiny_gpt2(0), ChunkConfig(chunk_size=CHUNK))
    opt = ccls(mgr, **kw)
    per_step, losses = [], []
    for b in batches(STEPS):
        b = local_slice(b)
        loss = mgr.module(input_ids=b, labels=b).loss
        mgr.backward(loss)
        calls, orig, counting = _count_all_reduce()
        dist.all_reduce = counting
        try:
            opt.step()
        finally:
            dist.all_reduce = orig
        per_step.append(calls)
        opt.zero_grad()
        losses.append(global_loss(loss))
    straddling = [
        s.name
        for c in mgr.chunks
        for s in c.slots
        if s.offset // c.shard_size != (s.offset + s.numel - 1) // c.shard_size
    ]
    return {
        "params": dict(mgr.iter_full_params()),
        "calls": per_step,
        "columns": len(opt.columns),
        "straddling": straddling,
        "state": sorted({k for c in mgr.chunks for k in c.optim_state}),
        # segments the fused kernels took (fused cases), and all segments of this rank
        "fused_segments": [s.length >= tf.FUSED_MIN_NUMEL for c in mgr.chunks for s in c.segments]
        if kw["fused"]
        else [],
    }


# ---------------------------------------------------------------- tensor parallel by hand
def _tp_problem():
    g = torch.Generator().manual_seed(5)
    full = {
        "w": torch.randn(8, 6, generator=g),  # split
        "b": torch.randn(8, generator=g) * 0.1,  # split with w (column-parallel bias)
        "ln": 1 + 0.1 * torch.randn(6, generator=g),  # replicated
        "head": torch.randn(3, 6, generator=g),  # replicated
    }
    grads = [{n: torch.randn(t.shape, generator=g) for n, t in full.items()} for _ in range(20)]
    return full, grads


def _tp_slices(world: int, rank: int):
    """1D (2 ranks): rows of w and b. 2D (4 ranks, grid i x j): w in 2 x 2 blocks; b split by
    rows over i and replicated over j (``replicas=2``), as 2D layouts hold a bias."""
    if world == 2:
        r = slice(4 * rank, 4 * rank + 4)
        return {"w": ((r, slice(None)), 0, 1), "b": ((r,), 0, 1)}
    i, j = divmod(rank, 2)
    rows = slice(4 * i, 4 * i + 4)
    return {"w": ((rows, slice(3 * j, 3 * j + 3)), 0, 1), "b": ((rows,), 0, 2)}


def tp_case(kind: str) -> dict:
    from parallel import comm
    from parallel.tensor.sharding import mark_sharded

    world, rank = dist.get_world_size(), dist.get_rank()
    full, grads = _tp_problem()
    sl = _tp_slices(world, rank)
    cls = Lamb if kind == "lamb" else Lars
    kw = {"lr": 0.05, "weight_decay": 0.01}
    if kind == "lars":
        kw.update(momentum=0.9, trust_coefficient=0.05, lr=0.5)

    def groups(ps):
        return [
            {"params": [ps["w"], ps["head"]], "weight_decay": kw["weight_decay"]},
            {"params": [ps["b"], ps["ln"]], "weight_decay": 0.0},
        ]

    ref = {n: torch.nn.Parameter(t.clone()) for n, t in full.items()}
    mine = {
        n: torch.nn.Parameter(t[sl[n][0]].clone() if n in sl else t.clone())
        for n, t in full.items()
    }
    for n, (_, dim, replicas) in sl.items():  # parallel's own record of a split (param.tp_shard)
        mark_sharded(mine[n], tuple(full[n].shape), dim, None, rank, world, replicas)
    ropt = cls(groups(ref), **kw)
    mopt = cls(groups(mine), norm_reducer=ShardedNormReducer(None), **kw)
    comm.reset_stats()
    for g in grads:
        for n in full:
            ref[n].grad = g[n].clone()
            mine[n].grad = g[n][sl[n][0]].clone() if n in sl else g[n].clone()
        ropt.step()
        mopt.step()
    calls = comm.stats().get("world", {}).get("all_reduce", {}).get("calls", 0)
    err = {}
    for n in full:
        want = ref[n].detach()[sl[n][0]] if n in sl else ref[n].detach()
        err[n] = (mine[n].detach() - want).abs().max().item() if want.numel() else 0.0
    moved = max((ref[n].detach() - full[n]).abs().max().item() for n in full)
    return {"err": err, "calls": calls, "steps": len(grads), "moved": moved}


def tp_layers_case(kind: str) -> dict:
    """``parallel``'s own 1D layers (column-parallel fc, row-parallel proj: they mark their
    split parameters) around a replicated LayerNorm, trained with ``ShardedNormReducer``."""
    from parallel import comm
    from parallel.tensor.linear_1d import ColumnParallelLinear, RowParallelLinear

    torch.manual_seed(0)
    ref = torch.nn.Sequential(
        torch.nn.LayerNorm(8), torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 8)
    )
    tp = torch.nn.Sequential(
        torch.nn.LayerNorm(8),
        ColumnParallelLinear.from_linear(ref[1], group=None),
        torch.nn.GELU(),
        RowParallelLinear.from_linear(ref[3], group=None),
    )
    tp[0].load_state_dict(ref[0].state_dict())
    if kind == "lamb":
        kw = {"lr": 0.02, "weight_decay": 0.01}
    else:
        kw = {"lr": 0.5, "weight_decay": 0.01, "momentum": 0.9, "trust_coefficient": 0.05}
    cls = Lamb if kind == "lamb" else Lars
    ropt = cls(param_groups(ref, 0.01), **kw)
    topt = cls(param_groups(tp, 0.01), norm_reducer=ShardedNormReducer(None), **kw)
    g = torch.Generator().manual_seed(3)
    calls = []
    for _ in range(10):
        x, y = torch.randn(16, 8, generator=g), torch.randn(16, 8, generator=g)
        for model, opt in ((ref, ropt), (tp, topt)):
            torch.nn.functional.mse_loss(model(x), y).backward()
            comm.reset_stats()
            opt.step()
            if model is tp:
                calls.append(comm.stats().get("world", {}).get("all_reduce", {}).get("calls", 0))
            opt.zero_grad()
    got = {"0.weight": tp[0].weight.detach(), "0.bias": tp[0].bias.detach()}
    for i in (1, 3):
        got.update({f"{i}.{k}": v for k, v in tp[i].full_params().items()})
    err = {n: (got[n] - p.detach()).abs().max().item() for n, p in ref.named_parameters()}
    return {"err": err, "calls": calls}


def worker(tp: bool) -> dict:
    out = {case: chunk_case(case) for case in CASES}
    if tp:
        out["tp"] = {k: tp_case(k) for k in ("lamb", "lars")}
        if dist.get_world_size() == 2:
            out["tp_layers"] = {k: tp_layers_case(k) for k in ("lamb", "lars")}
    return out


@pytest.fixture(scope="module")
def references():
    return {case: reference(case) for case in CASES}


@pytest.fixture(scope="module")
def world2(tmp_path_factory):
    return spawn(worker, 2, tmp_path_factory.mktemp("w2"), True)


@pytest.fixture(scope="module")
def world4(tmp_path_factory):
    return spawn(worker, 4, tmp_path_factory.mktemp("w4"), True)


def _check_chunk(results, references, world):
    for rank, res in enumerate(results):
        for case in CASES:
            r = res[case]
            assert r["straddling"], f"{case}: chunk size should make parameters straddle shards"
            assert_params_close(references[case], r["params"], atol=1e-5)
            for step, calls in enumerate(r["calls"]):
                assert calls == [(2, r["columns"])], (
                    f"rank {rank}/{world} {case} step {step}: all-reduces {calls}, want one "
                    f"batched call of shape (2, {r['columns']})"
                )
        assert "momentum_buffer" in res["lars"]["state"] and "exp_avg" in res["lamb"]["state"]
        for case in ("lamb-fused", "lars-fused"):  # both paths ran on every rank
            took = res[case]["fused_segments"]
            assert 0 < sum(took) < len(took), f"rank {rank} {case}: fused {sum(took)}/{len(took)}"


@pytest.mark.slow
def test_chunk_two_ranks_equal_one_process(world2, references):
    _check_chunk(world2, references, 2)


@pytest.mark.slow
def test_chunk_four_ranks_equal_one_process(world4, references):
    _check_chunk(world4, references, 4)


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
def test_tensor_parallel_split_equals_one_process(world, world2, world4):
    results = world2 if world == 2 else world4
    for rank, res in enumerate(results):
        for kind, r in res["tp"].items():
            assert r["moved"] > 0.1
            for n, e in r["err"].items():
                assert e <= 1e-5, f"{'1D' if world == 2 else '2D'} rank {rank} {kind} {n}: {e}"
            assert r["calls"] == r["steps"], f"{kind}: {r['calls']} all-reduces, want 1 per step"


@pytest.mark.slow
def test_parallel_1d_layers_equal_one_process(world2):
    """ColumnParallelLinear / RowParallelLinear from ``parallel`` (2 ranks) + Lamb / Lars with
    ShardedNormReducer == nn.Linear in one process; one all-reduce inside each optimizer step."""
    for rank, res in enumerate(world2):
        for kind, r in res["tp_layers"].items():
            for n, e in r["err"].items():
                assert e <= 1e-5, f"rank {rank} {kind} {n}: {e}"
            assert r["calls"] == [1] * 10, f"rank {rank} {kind}: {r['calls']}"


def test_trust_ratio_uses_whole_parameter():
    """Without the reducer a split parameter gets its shard's trust ratio: the test above could
    not pass by accident (each piece's norm differs from the whole's)."""
    full, grads = _tp_problem()
    w = torch.nn.Parameter(full["w"].clone())
    half = torch.nn.Parameter(full["w"][:4].clone())
    a, b = Lamb([w], lr=0.05), Lamb([half], lr=0.05)
    w.grad, half.grad = grads[0]["w"].clone(), grads[0]["w"][:4].clone()
    a.step()
    b.step()
    assert (w.detach()[:4] - half.detach()).abs().max() > 1e-4
