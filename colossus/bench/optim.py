"""``colossus bench optim``: optimizer step time for ~100M parameters against the memory bound.

The parameters are the tensors of a GPT-2-like model (token embedding, then per layer the qkv /
proj / fc / fc-proj matrices, their biases and two LayerNorms) scaled to ``--params``. Each
optimizer steps on the same gradients (LAMB, which overwrites them by default, on its own copy,
refreshed before every timed step and not timed, as a backward pass would); the step time
(median of ``--steps`` after a warm-up) is compared with its memory-bandwidth bound: the fewest
bytes the algorithm must touch per parameter (fp32), divided by the copy bandwidth measured in
the same run (``dst.copy_(src)`` over a buffer far larger than the caches; read + write bytes
counted).

Bytes per parameter, at least (reads + writes of 4-byte elements):

* AdamW: read w, g, m, v; write w, m, v: 28.
* LAMB: two passes, since no part of the update can be applied before its norm is known: 40.
  The fused path (``lamb-fused``, :mod:`offload.trust_fused`, the gradient as workspace) reads
  w, g, m, v and writes m, v and the update into g (norms of w and of the update on the fly),
  then reads w and the update and writes w; ``lamb-fused-keep-grad`` (``grad_as_workspace=False``)
  writes only m, v in pass 1 and recomputes the update from w, m, v in pass 2. Both touch 40; the
  multi-tensor path (``lamb-foreach``) 56-60. ``lamb-flat`` (``Lamb(flat=True)``, blocks of
  4096; ``lamb-flat-16k``: 16384) holds each group in flat buffers: the same 40 bytes (plus the
  padding of each parameter to whole blocks), in one compiled call and one native axpy per
  group instead of one compiled call per tensor. Its ``zero_grad`` is one memset of the
  gradient buffer (4 bytes per parameter written; AdamW's ``set_to_none`` frees instead, and
  the next backward then writes fresh gradients): the ``zero_grad`` column, not in the step.
* LARS (momentum): read w, g (norms), then read w, g, buf; write buf, w: 28 (the fused path;
  ``lars-foreach`` touches 52; ``lars-flat``, ``Lars(flat=True)``: the same 28 in one compiled
  apply per group).

The ``first step`` column is the warm-up step: for the fused variants it includes compiling the
kernels with ``torch.compile`` (``compile`` column; Inductor caches them on disk, so a second
run is faster: ``--fresh-cache`` compiles from scratch into a new cache directory).

Example::

    colossus bench optim --json docs/bench-optim.json
    colossus bench optim --params 2e7 --steps 3
"""

from __future__ import annotations

import argparse
import gc
import os
import time
from collections.abc import Callable
from typing import Any

import torch

from colossus.bench.common import machine_info, median, print_table, write_json

BYTES_PER_PARAM = {"adamw": 28, "lamb": 40, "lars": 28}  # the fewest the algorithm allows


def add_parser(bsub, fmt) -> None:
    p = bsub.add_parser(
        "optim",
        help="optimizer step time (AdamW fused, LAMB, LARS) vs the memory-bandwidth bound",
        formatter_class=fmt,
        epilog="examples:\n  colossus bench optim --json bench-optim.json\n"
        "  colossus bench optim --params 2e7 --steps 3 --variants adamw-fused lamb-fused\n",
    )
    p.add_argument("--params", type=float, default=1e8, help="parameters (default 1e8)")
    p.add_argument("--hidden", type=int, default=768, help="model width of the tensor shapes")
    p.add_argument("--steps", type=int, default=7, help="measured rounds (after one warm-up)")
    p.add_argument(
        "--variants",
        nargs="+",
        default=[  # lamb-flat / lars-flat: the trainer's default path for lamb / lars
            "adamw-fused",
            "lamb-flat",
            "lamb-fused",
            "lamb-foreach",
            "lars-flat",
            "lars-fused",
            "lars-foreach",
        ],
        choices=list(VARIANTS),
        help="optimizers to time",
    )
    p.add_argument(
        "--fresh-cache",
        action="store_true",
        help="compile the fused kernels into a new Inductor cache directory (cold compile time)",
    )
    p.add_argument("--json", help="write the results here")
    p.set_defaults(bench_fn=run)


def gpt_shapes(params: float, hidden: int = 768, vocab: int = 32000) -> list[tuple[int, ...]]:
    """Tensor shapes of a GPT-2-like model with about ``params`` parameters."""
    h = hidden
    layer = [(h,), (h,), (h, 3 * h), (3 * h,), (h, h), (h,), (h,), (h,), (h, 4 * h), (4 * h,)]
    layer += [(4 * h, h), (h,)]
    per_layer = sum(torch.Size(s).numel() for s in layer)
    shapes: list[tuple[int, ...]] = [(vocab, h), (1024, h)]
    n = sum(torch.Size(s).numel() for s in shapes)
    while n + per_layer <= params or n < per_layer:
        shapes += layer
        n += per_layer
    return shapes + [(h,), (h,)]


def _groups(params: list[torch.nn.Parameter]) -> list[dict[str, Any]]:
    return [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": 0.01},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]


def _adamw(fused: bool) -> Callable:
    return lambda ps: torch.optim.AdamW(_groups(ps), lr=1e-3, fused=fused, foreach=not fused)


def _lamb(fused: bool, grad_as_workspace: bool = True, flat_block: int | None = None) -> Callable:
    def make(ps):
        from colossus.optim import Lamb

        flat = {} if flat_block is None else {"flat": True, "flat_block": flat_block}
        return Lamb(_groups(ps), lr=1e-3, fused=fused, grad_as_workspace=grad_as_workspace, **flat)

    return make


def _lars(fused: bool, flat: bool = False) -> Callable:
    def make(ps):
        from colossus.optim import Lars

        return Lars(_groups(ps), lr=1.0, momentum=0.9, fused=fused, flat=flat)

    return make


def _torch_optimizer_lamb(ps):
    import torch_optimizer  # the per-parameter Python loop, for comparison

    return torch_optimizer.Lamb(_groups(ps), lr=1e-3)


VARIANTS: dict[str, tuple[str, Callable]] = {
    "adamw-fused": ("adamw", _adamw(True)),
    "adamw-foreach": ("adamw", _adamw(False)),
    "lamb-fused": ("lamb", _lamb(True)),
    "lamb-foreach": ("lamb", _lamb(False)),
    "lamb-fused-keep-grad": ("lamb", _lamb(True, grad_as_workspace=False)),
    "lamb-flat": ("lamb", _lamb(True, flat_block=4096)),
    "lamb-flat-16k": ("lamb", _lamb(True, flat_block=16384)),
    "lars-fused": ("lars", _lars(True)),
    "lars-flat": ("lars", _lars(True, flat=True)),
    "lars-foreach": ("lars", _lars(False)),
    "lamb-torch-optimizer": ("lamb", _torch_optimizer_lamb),
}


# variants whose step overwrites the gradients (LAMB's default grad_as_workspace): they get their
# own copy, refreshed before every timed step as a backward pass would (not timed)
CONSUMES_GRADS = {"lamb-fused", "lamb-foreach", "lamb-flat", "lamb-flat-16k"}
# flat LAMB keeps its gradients in one buffer (p.grad are views of it after the first step; the
# refresh copies into those views, as backward accumulates into them): its zero_grad is one
# memset of that buffer instead of AdamW's set_to_none, timed separately (zero_grad column)
FLAT = {"lamb-flat", "lamb-flat-16k", "lars-flat"}


def _build(name: str, shapes, grads: list[torch.Tensor]):
    kind, make = VARIANTS[name]
    g = torch.Generator().manual_seed(0)
    params = []
    for s, gr in zip(shapes, grads):
        p = torch.nn.Parameter(torch.empty(s).uniform_(-0.05, 0.05, generator=g))
        # the others step on the same gradients (shared: less memory)
        p.grad = gr.clone() if name in CONSUMES_GRADS else gr
        params.append(p)
    opt = make(params)
    t = time.perf_counter()
    opt.step()  # warm-up: state allocated and faulted in, fused kernels compiled
    first = time.perf_counter() - t
    return kind, opt, sum(p.numel() for p in params), first, params


def run(args: argparse.Namespace) -> int:
    if args.fresh_cache:
        import tempfile

        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="colossus-inductor-")
    from offload import trust_fused

    shapes = gpt_shapes(args.params, args.hidden)
    g = torch.Generator().manual_seed(1)
    grads = [torch.empty(s).normal_(0, 1e-3, generator=g) for s in shapes]
    built, rows = {}, []
    for name in args.variants:
        try:
            built[name] = _build(name, shapes, grads)
        except ImportError as e:
            rows.append({"name": name, "error": f"not installed: {e.name}"})
    # rounds interleave the variants and a copy-bandwidth probe, so load from other processes on
    # a shared machine hits all of them alike; medians over rounds
    times: dict[str, list[float]] = {n: [] for n in built}
    bws = []
    src = torch.ones(1 << 27)
    dst = torch.empty_like(src)
    dst.copy_(src)
    for _ in range(args.steps):
        for name in CONSUMES_GRADS & set(built):
            torch._foreach_copy_([p.grad for p in built[name][4]], grads)
        t = time.perf_counter()
        dst.copy_(src)  # also evicts the refreshed gradients from the caches
        bws.append(2 * src.nbytes / (time.perf_counter() - t))
        for name, (_, opt, _, _, _) in built.items():
            t = time.perf_counter()
            opt.step()
            times[name].append(time.perf_counter() - t)
    del src, dst
    zero_grad: dict[str, float] = {}
    for name in (FLAT | {"adamw-fused"}) & set(built):
        opt, ts = built[name][1], []
        for _ in range(3):
            t = time.perf_counter()
            opt.zero_grad(set_to_none=True)  # flat: a memset, the gradients stay views
            ts.append(time.perf_counter() - t)
        zero_grad[name] = median(ts)
    bw = median(bws)
    for name, (kind, _, n, first, _) in built.items():
        r = {"name": name, "kind": kind, "params": n, "step_time_s": median(times[name])}
        r["step_time_min_s"] = min(times[name])
        r["first_step_s"] = first
        if name in zero_grad:
            r["zero_grad_s"] = zero_grad[name]
        r["bytes_per_param"] = BYTES_PER_PARAM[kind]
        r["bound_s"] = BYTES_PER_PARAM[kind] * n / bw
        r["x_bound"] = r["step_time_s"] / r["bound_s"]
        rows.append(r)
    built.clear()
    gc.collect()
    ref = next((r for r in rows if r["name"] == "adamw-fused" and "step_time_s" in r), None)
    for r in rows:
        if ref and "step_time_s" in r:
            r["x_adamw_fused"] = r["step_time_s"] / ref["step_time_s"]
            # the same ratio within each round (both steps ran back to back), median over rounds:
            # steadier than the ratio of medians when the load of a shared machine drifts
            per_round = [a / b for a, b in zip(times[r["name"]], times["adamw-fused"])]
            r["x_adamw_fused_rounds"] = median(per_round)
    info = machine_info()
    n = sum(torch.Size(s).numel() for s in shapes)
    title = (
        f"optimizer step, {n / 1e6:.1f}M params in {len(shapes)} tensors, copy bandwidth "
        f"{bw / 1e9:.1f} GB/s (median of {len(bws)}), {info['torch_threads']} threads"
    )
    compile_s = trust_fused.compile_seconds()
    if compile_s:
        title += f"; fused kernels compiled in {compile_s:.1f} s (in the first fused step)"
    print_table(title, rows)
    write_json(
        args.json,
        "optim",
        rows,
        {
            **{k: v for k, v in vars(args).items() if k != "bench_fn"},
            "copy_gbps": bw / 1e9,
            "compile_s": compile_s,
            "load_avg": os.getloadavg(),
        },
    )
    return 0
