"""2d (4 ranks), 2.5d (q=2, depth=2) and 3d (q=2) layers against single-process PyTorch:
forward outputs and input / weight / bias gradients of Linear, LayerNorm, Embedding and the
LM head + vocabulary-parallel cross-entropy equal nn.Linear / nn.LayerNorm / nn.Embedding /
F.cross_entropy (fp32, rtol = atol = 1e-5) on every rank; each rank holds 1/tp of every layer's
parameters. One spawn per world size runs every case."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from spawn_helpers import spawn
from torch import nn

from parallel.tensor import (
    build_grid,
    check_shape,
    cross_entropy,
    gather_output,
    make_embedding,
    make_head,
    make_layernorm,
    make_linear,
    split_input,
)

B, S, H, OUT, V = 8, 4, 16, 24, 32
TOL = {"rtol": 1e-5, "atol": 1e-5}


def _err(a: torch.Tensor, b: torch.Tensor) -> float:
    """How far ``a`` is past the tolerance of ``b`` (<= 0: within rtol/atol)."""
    assert a.shape == b.shape, (a.shape, b.shape)
    return ((a - b).abs() - TOL["atol"] - TOL["rtol"] * b.abs()).max().item()


def _full_grads(m: nn.Module) -> list[torch.Tensor | None]:
    """The full gradients of a grid layer, gathered the way its weights are."""
    saved = [(p, p.data) for p in m.parameters()]
    for p in m.parameters():
        p.data = p.grad
    try:
        out = [m.full_weight()]
        if hasattr(m, "full_bias"):
            out.append(m.full_bias())
        return out
    finally:
        for p, d in saved:
            p.data = d


def _param_bytes(m: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in m.parameters())


def _check_layer(grid, full: nn.Module, make, layout: str, x: torch.Tensor, ids: bool = False):
    """Forward + backward of ``full`` and its grid version on the same input and upstream
    gradient; returns {name: error past tolerance}."""
    g = torch.Generator().manual_seed(7)
    m = make(grid, full, layout=layout)
    out_layout = getattr(m, "output_layout_name", layout)
    if not ids:
        x = x.clone().requires_grad_()
    y_ref = full(x)
    dy = torch.randn(y_ref.shape, generator=g)
    (y_ref * dy).sum().backward()
    x_loc = split_input(x.detach(), grid, layout, hidden=not ids)
    if not ids:
        x_loc.requires_grad_()
    y = m(x_loc)
    (y * split_input(dy, grid, out_layout)).sum().backward()
    errs = {"out": _err(gather_output(y.detach(), grid, out_layout), y_ref.detach())}
    if not ids:
        errs["dx"] = _err(gather_output(x_loc.grad, grid, layout), x.grad)
    refs = [full.weight.grad] + (
        [full.bias.grad] if getattr(full, "bias", None) is not None else []
    )
    for name, got, ref in zip(("dw", "db"), _full_grads(m), refs, strict=False):
        errs[name] = _err(got, ref)
    for name, got, ref in zip(
        ("w", "b"),
        [m.full_weight()] + ([m.full_bias()] if hasattr(m, "full_bias") else []),
        [full.weight] + ([full.bias] if getattr(full, "bias", None) is not None else []),
        strict=False,
    ):
        if ref is not None:
            errs[f"roundtrip_{name}"] = float((got - ref.detach()).abs().max() > 0)
    full_bytes = sum(p.numel() * p.element_size() for p in full.parameters())
    errs["param_bytes"] = _param_bytes(m) * grid.tp - full_bytes
    return errs


def _check_head(grid, layout: str):
    torch.manual_seed(3)
    head = nn.Linear(H, V, bias=False)
    x = torch.randn(B, S, H, requires_grad=True)
    target = torch.randint(0, V, (B, S))
    target[0, 1] = target[3, 2] = -100  # ignored tokens
    loss_ref = F.cross_entropy(head(x).flatten(0, 1), target.flatten())
    loss_ref.backward()
    m = make_head(grid, head, layout)
    x_loc = split_input(x.detach(), grid, layout).requires_grad_()
    out = m.output_layout_name
    loss = cross_entropy(m(x_loc), split_input(target, grid, out, hidden=False), grid, out)
    loss.backward()
    res = {
        "loss": _err(loss.detach(), loss_ref.detach()),
        "dx": _err(gather_output(x_loc.grad, grid, layout), x.grad),
        "dw": _err(_full_grads(m)[0], head.weight.grad),
        "param_bytes": _param_bytes(m) * grid.tp - head.weight.numel() * 4,
    }
    # num_items: the summed loss over a given token count (gradient accumulation)
    t_loc = split_input(target, grid, out, hidden=False)
    with torch.no_grad():
        s = cross_entropy(m(x_loc), t_loc, grid, out, num_items=100)
        ref = F.cross_entropy(head(x).flatten(0, 1), target.flatten(), reduction="sum") / 100
    res["num_items"] = _err(s, ref)
    # full logits through the differentiable gather_output: same loss and gradients
    m.zero_grad()
    x2 = split_input(x.detach(), grid, layout).requires_grad_()
    logits = gather_output(m(x2), grid, out)
    F.cross_entropy(logits.flatten(0, 1), target.flatten()).backward()
    res["gathered/dx"] = _err(gather_output(x2.grad, grid, layout), x.grad)
    res["gathered/dw"] = _err(_full_grads(m)[0], head.weight.grad)
    return res


def _check_packed(grid, layout: str):
    """A fused q|k|v projection (parts=3): every output block holds a slice of each part."""
    torch.manual_seed(6)
    full = nn.Linear(H, 48)
    m = make_linear(grid, full, layout, parts=3)
    x = torch.randn(B, S, H)
    y = gather_output(m(split_input(x, grid, layout)).detach(), grid, m.output_layout_name)
    q = m.out_layout.hidden.size
    # packed order [p0_0 p1_0 p2_0 | p0_1 ...] back to [p0 | p1 | p2]
    y = y.reshape(B, S, q, 3, 16 // q).transpose(2, 3).reshape(B, S, 48)
    return {
        "out": _err(y, full(x).detach()),
        "roundtrip_w": float((m.full_weight() - full.weight).abs().max() > 0),
        "roundtrip_b": float((m.full_bias() - full.bias).abs().max() > 0),
    }


def _cases(grid, layouts) -> dict[str, float]:
    res: dict[str, float] = {}
    for lay in layouts:
        torch.manual_seed(1)
        lin = nn.Linear(H, OUT)
        for k, v in _check_layer(grid, lin, make_linear, lay, torch.randn(B, S, H)).items():
            res[f"linear/{lay}/{k}"] = v
        torch.manual_seed(2)
        ln = nn.LayerNorm(H)
        with torch.no_grad():  # non-trivial affine parameters
            ln.weight.normal_()
            ln.bias.normal_()
        x = 3 + 2 * torch.randn(B, S, H)
        for k, v in _check_layer(grid, ln, make_layernorm, lay, x).items():
            res[f"layernorm/{lay}/{k}"] = v
        torch.manual_seed(8)
        rms = nn.RMSNorm(H, eps=1e-6)
        with torch.no_grad():
            rms.weight.normal_()
        for k, v in _check_layer(grid, rms, make_layernorm, lay, torch.randn(B, S, H)).items():
            res[f"rmsnorm/{lay}/{k}"] = v
        torch.manual_seed(4)
        emb = nn.Embedding(V, H, padding_idx=1)
        ids = torch.randint(0, V, (B, S))
        ids[0, 0] = 1
        for k, v in _check_layer(grid, emb, make_embedding, lay, ids, ids=True).items():
            res[f"embedding/{lay}/{k}"] = v
        for k, v in _check_head(grid, lay).items():
            res[f"head_ce/{lay}/{k}"] = v
        for k, v in _check_packed(grid, lay).items():
            res[f"packed/{lay}/{k}"] = v
    # a 3d linear pair a -> b -> a keeps the layout of a residual stream
    if grid.mode == "3d":
        torch.manual_seed(5)
        fc1, fc2 = nn.Linear(H, OUT), nn.Linear(OUT, H)
        x = torch.randn(B, S, H, requires_grad=True)
        ref = fc2(torch.relu(fc1(x)))
        ref.sum().backward()
        a, b = make_linear(grid, fc1, "a"), make_linear(grid, fc2, "b")
        x_loc = split_input(x.detach(), grid, "a").requires_grad_()
        y = b(torch.relu(a(x_loc)))
        y.sum().backward()
        res["pair/out"] = _err(gather_output(y.detach(), grid, "a"), ref.detach())
        res["pair/dx"] = _err(gather_output(x_loc.grad, grid, "a"), x.grad)
        res["pair/dw2"] = _err(_full_grads(b)[0], fc2.weight.grad)
    return res


def _errors(grid) -> str:
    """Shape errors raised by the layers on this grid (the message of each)."""
    msgs = []
    for build in (
        lambda: make_linear(grid, nn.Linear(H + 1, OUT)),
        lambda: make_layernorm(grid, nn.LayerNorm(H + 2)),
        lambda: split_input(torch.randn(B + 1, H), grid),
    ):
        with pytest.raises(ValueError) as e:
            build()
        msgs.append(str(e.value))
    return "\n".join(msgs)


def _worker(specs):
    world = dist.get_world_size()
    out = {}
    for mode, depth, ntp in specs:
        tp = world // ntp
        lists = [list(range(k * tp, (k + 1) * tp)) for k in range(ntp)]
        grid = build_grid(mode, lists, depth=depth)
        layouts = ("a", "b") if mode == "3d" else ("a",)
        key = f"{mode}x{ntp}"
        out[key] = _cases(grid, layouts)
        out[key + "/errors"] = _errors(grid)
        out[key + "/coords"] = (grid.coords, {n: a.size for n, a in grid.axes.items()})
    return out


def _assert_all(results, specs):
    for r, res in enumerate(results):
        for mode, _, ntp in specs:
            key = f"{mode}x{ntp}"
            bad = {k: v for k, v in res[key].items() if v > 0}
            assert not bad, f"rank {r} {key}: past tolerance / wrong sizes: {bad}"
            assert len(res[key]) >= 20
            assert "must be divisible" in res[key + "/errors"]


@pytest.mark.slow
def test_2d_four_ranks(tmp_path):
    specs = [("2d", 1, 1)]
    res = spawn(_worker, 4, tmp_path, specs)
    _assert_all(res, specs)
    assert [r["2dx1/coords"][0] for r in res] == [(0, 0), (0, 1), (1, 0), (1, 1)]


@pytest.mark.slow
def test_2p5d_3d_and_two_2d_groups_eight_ranks(tmp_path):
    specs = [("2.5d", 2, 1), ("3d", 1, 1), ("2d", 1, 2)]
    res = spawn(_worker, 8, tmp_path, specs)
    _assert_all(res, specs)
    assert res[5]["2.5dx1/coords"] == ((0, 1, 1), {"row": 2, "col": 2, "dep": 2})
    assert res[6]["3dx1/coords"] == ((1, 1, 0), {"input": 2, "weight": 2, "output": 2})
    assert res[6]["2dx2/coords"][0] == (1, 0)  # second tp group [4..7]: rank 6 is k=2


def test_shape_errors():
    assert check_shape("2d", 9) == 3 and check_shape("2.5d", 8, 2) == 2
    assert check_shape("3d", 27) == 3
    with pytest.raises(
        ValueError, match=r"tp_mode=2d needs tp to be a square \(1, 4, 9, ...\); got 6"
    ):
        build_grid("2d", [list(range(6))])
    with pytest.raises(ValueError, match=r"2.5d needs tp = q\^2 \* depth; got tp=8, depth=3"):
        build_grid("2.5d", [list(range(8))], depth=3)
    with pytest.raises(ValueError, match=r"3d needs tp = q\^3 \(1, 8, 27, ...\); got 4"):
        build_grid("3d", [list(range(4))])
    with pytest.raises(ValueError, match="overlap"):
        build_grid("2d", [[0, 1, 2, 3], [3, 4, 5, 6]])
    with pytest.raises(ValueError, match="unknown grid mode"):
        check_shape("4d", 16)
