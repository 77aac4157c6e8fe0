"""``colossus bench tp``: communication and memory of one transformer layer under 1D (Megatron),
2D (Optimus), 2.5D (Tesseract) and 3D tensor parallelism at equal world sizes.

One pre-LN transformer layer (LayerNorm -> fused QKV -> causal attention -> output projection ->
residual -> LayerNorm -> fc1 (4h) -> GELU -> fc2 -> residual; hidden ``h``, batch ``b``, sequence
``s``, ``M = b s`` rows) runs one forward + backward on ``P`` gloo ranks spawned here (no launcher
needed). Per rank it reports the bytes sent (ring model, :mod:`parallel.comm`) next to the closed
form below - they must be equal, these are counts - the parameter bytes (measured and closed
form), the bytes autograd keeps for backward (measured), the step time and the output's error
against the same layer on one process.

Closed forms, elements sent per rank per forward + backward (times 4 bytes, fp32), ``P`` ranks:

- 1d (Megatron): an all-reduce of ``M h`` after the output projection and fc2 (forward) and of
  the input gradients of QKV and fc1 (backward): ``4 * 2 (P-1)/P * M h``.
- 2d (``P = q^2``) and 2.5d (``P = q^2 d``; 2d is ``d = 1``), each linear ``N -> K`` costs
  ``[3 (q-1) M N + 3 (q d - 1) (N K + 2/3 K)] / (q^2 d)`` (SUMMA gathers of the input and weight in
  forward, again in backward, reduce-scatters of their gradients; bias gather + scatter), each
  LayerNorm ``8 (q-1)/q * M/(q d) + 4 (q d - 1) h/P``; the layer:
  ``[21 (q-1) M h + 36 (q d - 1) h^2 + 26 (q d - 1) h + 16 (q-1) M] / (q^2 d)``.
- 3d (``P = q^3``), each linear ``2 (q-1) (M N + N K + M K)/q^3 + 2 (q^2-1) K/q^3``, each
  LayerNorm ``8 (q-1)/q * M/q^2 + 4 (q^2-1) h/q^3``; the layer:
  ``[32 (q-1) M h + 24 (q-1) h^2 + 26 (q^2-1) h + 16 (q-1) M] / q^3``.

Parameters per rank: ``(12 h^2 + 13 h) / P`` for 2d, 2.5d and 3d (every tensor split 1/P);
``(12 h^2 + 7 h)/P + 6 h`` for 1d (LayerNorms and row-parallel biases replicated).
"""

from __future__ import annotations

import argparse
import math
import os
import socket
import sys
import tempfile
import time
from fractions import Fraction
from pathlib import Path
from typing import Any

CONFIGS = ("1d:4", "1d:8", "2d:4", "2.5d:8:2", "3d:8")


def add_parser(bsub, fmt) -> None:
    p = bsub.add_parser(
        "tp",
        help="tensor parallelism 1D/2D/2.5D/3D: bytes sent per rank vs the papers' closed forms",
        formatter_class=fmt,
        epilog=(
            "examples:\n"
            "  colossus bench tp --json docs/bench-tp.json --plot docs/bench-tp.png\n"
            "  colossus bench tp --hidden 32 --seq 8 --configs 2d:4 3d:8\n"
        ),
    )
    p.add_argument("--hidden", type=int, default=256, help="hidden size h")
    p.add_argument("--heads", type=int, default=8, help="attention heads (divisible by q and P)")
    p.add_argument("--batch", type=int, default=8, help="batch b (divisible by P / q)")
    p.add_argument("--seq", type=int, default=64, help="sequence length s")
    p.add_argument("--iters", type=int, default=3, help="timed forward+backward passes")
    p.add_argument(
        "--configs",
        nargs="+",
        default=list(CONFIGS),
        help="MODE:P[:DEPTH] per run (default: %(default)s)",
    )
    p.add_argument(
        "--shared-world",
        action="store_true",
        help="run every config in one spawn of the largest P (smaller P as independent "
        "replicas): faster, but step times are taken with all ranks busy",
    )
    p.add_argument("--json", help="write the results here")
    p.add_argument("--plot", help="draw bytes per rank vs P (closed forms and measured) here")
    p.set_defaults(bench_fn=run)


# ---- closed forms ------------------------------------------------------------------------------


def grid_side(mode: str, p: int, depth: int = 1) -> int:
    if mode == "1d":
        return p
    if mode == "3d":
        return round(p ** (1 / 3))
    return math.isqrt(p // depth)


def formula_sent_bytes(mode: str, p: int, depth: int, m: int, h: int, elem: int = 4) -> Fraction:
    """Bytes each rank sends in one forward + backward of the layer (module docstring)."""
    q, M = grid_side(mode, p, depth), Fraction(m)
    if mode == "1d":
        e = 4 * Fraction(2 * (p - 1), p) * M * h
    elif mode in ("2d", "2.5d"):
        d = depth if mode == "2.5d" else 1
        e = Fraction(
            21 * (q - 1) * M * h
            + 36 * (q * d - 1) * h * h
            + 26 * (q * d - 1) * h
            + 16 * (q - 1) * M,
            q * q * d,
        )
    elif mode == "3d":
        e = Fraction(
            32 * (q - 1) * M * h + 24 * (q - 1) * h * h + 26 * (q * q - 1) * h + 16 * (q - 1) * M,
            q**3,
        )
    else:
        raise ValueError(f"unknown tp mode {mode!r}")
    return e * elem


def formula_param_bytes(mode: str, p: int, h: int, elem: int = 4) -> Fraction:
    if mode == "1d":
        return (Fraction(12 * h * h + 7 * h, p) + 6 * h) * elem
    return Fraction(12 * h * h + 13 * h, p) * elem


# ---- the layer ---------------------------------------------------------------------------------


def _attention(qkv, heads: int):
    """Causal attention over the heads held locally: ``qkv`` ``(b, s, heads * 3 * hd)`` with each
    head's q, k, v adjacent, so any block of whole heads is self-contained."""
    import torch.nn.functional as F

    b, s, n = qkv.shape
    hd = n // (3 * heads)
    q, k, v = qkv.view(b, s, heads, 3, hd).permute(3, 0, 2, 1, 4).unbind(0)
    o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return o.transpose(1, 2).reshape(b, s, heads * hd)


def _layer_classes():
    import torch.nn.functional as F
    from torch import nn

    class Layer(nn.Module):
        """The reference layer on one process."""

        def __init__(self, h: int, heads: int) -> None:
            super().__init__()
            self.heads = heads
            self.ln1, self.ln2 = nn.LayerNorm(h), nn.LayerNorm(h)
            self.qkv, self.out = nn.Linear(h, 3 * h), nn.Linear(h, h)
            self.fc1, self.fc2 = nn.Linear(h, 4 * h), nn.Linear(4 * h, h)

        def forward(self, x):
            x = x + self.out(_attention(self.qkv(self.ln1(x)), self.heads))
            return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))

    class TPLayer(nn.Module):
        """The same layer with tensor-parallel parts; ``heads`` is the local head count."""

        def __init__(self, ref: Layer, mode: str, topo) -> None:
            super().__init__()
            from parallel.tensor import make_layernorm, make_linear

            if mode == "1d":
                from parallel.tensor import ColumnParallelLinear, RowParallelLinear

                g = topo.tp_group
                self.ln1, self.ln2 = ref.ln1, ref.ln2  # replicated in Megatron
                self.qkv = ColumnParallelLinear.from_linear(ref.qkv, group=g)
                self.out = RowParallelLinear.from_linear(ref.out, group=g)
                self.fc1 = ColumnParallelLinear.from_linear(ref.fc1, group=g)
                self.fc2 = RowParallelLinear.from_linear(ref.fc2, group=g)
                self.heads = ref.heads // topo.tp
            else:
                grid = topo.grid
                self.ln1, self.ln2 = make_layernorm(grid, ref.ln1), make_layernorm(grid, ref.ln2)
                self.qkv = make_linear(grid, ref.qkv, "a")
                self.out = make_linear(grid, ref.out, self.qkv.output_layout_name)
                self.fc1 = make_linear(grid, ref.fc1, "a")
                self.fc2 = make_linear(grid, ref.fc2, self.fc1.output_layout_name)
                self.heads = ref.heads // grid.q

        def forward(self, x):
            x = x + self.out(_attention(self.qkv(self.ln1(x)), self.heads))
            return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))

    return Layer, TPLayer


def _run_config(cfg: dict[str, Any], world: int) -> dict[str, Any]:
    """One config on this rank: ``P = cfg["P"]`` ranks per tensor-parallel group (``world / P``
    independent replicas when the world is larger)."""
    import torch
    import torch.distributed as dist

    from offload.tracer import ActivationTracer
    from parallel import comm
    from parallel.tensor import gather_output, split_input
    from parallel.topology import Topology

    mode, depth, h, p = cfg["mode"], cfg["depth"], cfg["hidden"], cfg["P"]
    topo = Topology(dp=world // p, tp=p, tp_mode=mode, tp_depth=depth)
    Layer, TPLayer = _layer_classes()
    torch.manual_seed(0)
    ref = Layer(h, cfg["heads"])
    layer = TPLayer(ref, mode, topo)
    x = torch.randn(cfg["batch"], cfg["seq"], h)
    dy = torch.randn(cfg["batch"], cfg["seq"], h)
    if mode == "1d":
        x_loc, dy_loc = x.clone(), dy
    else:
        x_loc, dy_loc = split_input(x, topo.grid), split_input(dy, topo.grid)
    x_loc.requires_grad_()
    out: dict[str, Any] = {}

    def step(trace: bool = False) -> None:
        x_loc.grad = None
        layer.zero_grad(set_to_none=True)
        if trace:
            with ActivationTracer(layer) as tr:
                y = layer(x_loc)
            out["act_bytes"] = tr.total
        else:
            y = layer(x_loc)
        (y * dy_loc).sum().backward()
        out["y"] = y.detach()

    step()  # warm-up
    comm.reset_stats()
    step(trace=True)
    stats, sent = comm.stats(), comm.sent_bytes()
    y = out["y"] if mode == "1d" else gather_output(out["y"], topo.grid)
    err = (y - ref(x)).abs().max().item()
    times = []
    for _ in range(cfg["iters"]):
        dist.barrier()
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    return {
        "sent": sent,
        "stats": stats,
        "param_bytes": sum(p.numel() * p.element_size() for p in layer.parameters()),
        "act_bytes": out["act_bytes"],
        "err": err,
        "step_s": sorted(times)[len(times) // 2],
    }


def _worker(rank: int, world: int, port: int, cfgs: list[dict[str, Any]], out: str) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        res = [_run_config(cfg, world) for cfg in cfgs]
        torch.save(res, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def parse_config(spec: str) -> tuple[str, int, int]:
    parts = spec.split(":")
    if len(parts) not in (2, 3) or parts[0] not in ("1d", "2d", "2.5d", "3d"):
        raise ValueError(f"config {spec!r}: expected MODE:P[:DEPTH], MODE one of 1d 2d 2.5d 3d")
    depth = int(parts[2]) if len(parts) == 3 else 1
    return parts[0], int(parts[1]), depth


def _config(mode: str, p: int, depth: int, ns: argparse.Namespace) -> dict[str, Any]:
    from parallel.topology import check_tp_shape

    check_tp_shape(p, mode, depth)
    q = grid_side(mode, p, depth)
    rows_split = {"1d": 1, "2d": q, "2.5d": q * depth, "3d": q * q}[mode]
    heads_split = p if mode == "1d" else q
    if ns.batch % rows_split or ns.heads % heads_split or ns.hidden % p:
        raise ValueError(
            f"{mode} on {p} ranks needs batch divisible by {rows_split}, heads by {heads_split} "
            f"and hidden by {p}; got batch={ns.batch}, heads={ns.heads}, hidden={ns.hidden}"
        )
    keys = ("hidden", "heads", "batch", "seq", "iters")
    return {"mode": mode, "P": p, "depth": depth, **{k: getattr(ns, k) for k in keys}}


def _spawn(cfgs: list[dict[str, Any]], world: int) -> list[list[dict[str, Any]]]:
    """Per config, every rank's result."""
    import torch
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as out:
        mp.spawn(_worker, args=(world, _free_port(), cfgs, out), nprocs=world, join=True)
        ranks = [torch.load(Path(out) / f"rank{r}.pt", weights_only=False) for r in range(world)]
    return [[ranks[r][c] for r in range(world)] for c in range(len(cfgs))]


def _row(cfg: dict[str, Any], ranks: list[dict[str, Any]]) -> dict[str, Any]:
    mode, p, depth = cfg["mode"], cfg["P"], cfg["depth"]
    q = grid_side(mode, p, depth)
    formula = formula_sent_bytes(mode, p, depth, cfg["batch"] * cfg["seq"], cfg["hidden"])
    sent = [r["sent"] for r in ranks]
    name = f"{mode} P={p}" + {"1d": "", "2.5d": f" q={q} d={depth}"}.get(mode, f" q={q}")
    return {
        "name": name,
        "mode": mode,
        "P": p,
        "depth": depth,
        "sent_bytes_per_rank": max(sent),
        "sent_bytes_min_rank": min(sent),
        "formula_sent_bytes": float(formula),
        "sent_equals_formula": all(s == formula for s in sent),
        "param_bytes_per_rank": max(r["param_bytes"] for r in ranks),
        "formula_param_bytes": float(formula_param_bytes(mode, p, cfg["hidden"])),
        "act_bytes_per_rank": max(r["act_bytes"] for r in ranks),
        "step_ms": 1e3 * max(r["step_s"] for r in ranks),
        "max_abs_err_vs_1proc": max(r["err"] for r in ranks),
        "by_group": ranks[0]["stats"],
    }


def plot(rows: list[dict[str, Any]], path: str, m: int, h: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = {
        "1d": [(p, 1) for p in (2, 4, 8, 16, 32, 64)],
        "2d": [(q * q, 1) for q in (2, 3, 4, 6, 8)],
        "2.5d": [(2 * q * q, 2) for q in (2, 3, 4, 5)],
        "3d": [(q**3, 1) for q in (2, 3, 4)],
    }
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for (mode, pts), color in zip(curves.items(), ("C0", "C1", "C2", "C3"), strict=True):
        xs = [p for p, _ in pts]
        ys = [float(formula_sent_bytes(mode, p, d, m, h)) / 2**20 for p, d in pts]
        label = mode + (" (depth 2)" if mode == "2.5d" else "")
        ax.plot(xs, ys, "-", color=color, label=f"{label}: closed form")
        meas = [(r["P"], r["sent_bytes_per_rank"] / 2**20) for r in rows if r["mode"] == mode]
        if meas:
            ax.plot(*zip(*meas, strict=True), "o", color=color, ms=8, label=f"{label}: measured")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("ranks P")
    ax.set_ylabel("MiB sent per rank, one forward + backward")
    ax.set_title(f"one transformer layer, h={h}, b*s={m}, fp32")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(ns: argparse.Namespace) -> int:
    from colossus.bench.common import print_table, write_json

    cfgs = [_config(*parse_config(c), ns) for c in ns.configs]
    if ns.shared_world:
        world = max(c["P"] for c in cfgs)
        bad = [c for c in cfgs if world % c["P"]]
        if bad:
            raise ValueError(f"--shared-world: every P must divide the largest ({world})")
        print(f"[bench tp] {len(cfgs)} configs on one world of {world}", file=sys.stderr)
        results = _spawn(cfgs, world)
    else:
        results = []
        for c in cfgs:
            print(f"[bench tp] {c['mode']} on {c['P']} ranks ...", file=sys.stderr, flush=True)
            results += _spawn([c], c["P"])
    rows = [_row(c, r) for c, r in zip(cfgs, results, strict=True)]
    short = {
        "sent_bytes_per_rank": "sent B",
        "formula_sent_bytes": "formula B",
        "sent_equals_formula": "equal",
        "param_bytes_per_rank": "params B",
        "formula_param_bytes": "formula params B",
        "act_bytes_per_rank": "saved act B",
        "step_ms": "step ms",
        "max_abs_err_vs_1proc": "err vs 1 proc",
    }
    table = [{"name": r["name"], **{v: r[k] for k, v in short.items()}} for r in rows]
    print_table(
        f"one transformer layer, h={ns.hidden}, b={ns.batch}, s={ns.seq}, fp32: per rank, "
        "one forward + backward",
        table,
    )
    keys = ("hidden", "heads", "batch", "seq", "iters", "configs", "shared_world")
    write_json(ns.json, "tp", rows, {k: getattr(ns, k) for k in keys})
    if ns.plot:
        plot(rows, ns.plot, ns.batch * ns.seq, ns.hidden)
    bad = [r["name"] for r in rows if not r["sent_equals_formula"]]
    if bad:
        print(f"[bench tp] measured bytes differ from the closed form: {bad}", file=sys.stderr)
        return 1
    return 0


__all__ = ["add_parser", "formula_param_bytes", "formula_sent_bytes", "run"]
