"""``colossus bench sp``: per-rank memory and communication of sequence-parallel attention
(ring attention, ring self-attention, Ulysses) for a grid of lengths ``L`` and sizes ``sp``.

Each ``sp`` runs on ``sp`` gloo ranks spawned here (no launcher needed); every rank holds
``L/sp`` tokens of ``q, k, v`` (``B x H x L/sp x D``, fp32, zigzag layout) and runs one attention
forward + backward (causal by default). Per rank it reports:

- ``peak``: the most bytes of tensors alive at once during the forward + backward, inputs
  ``q, k, v, dO`` included. On CPU there is no allocator statistic, so this is measured with
  PyTorch's ``torch.distributed._tools.mem_tracker.MemTracker``, a ``TorchDispatchMode`` that
  sees every tensor an op creates and follows its storage with a weak reference until it is
  freed (receive buffers of the ring and all-to-all included); it counts tensor storage bytes,
  not allocator slack or gloo's internal buffers.
- ``sent``: bytes this rank sent (:mod:`parallel.comm`, ring model) next to the closed form,
  with ``n = B H (L/sp) D * 4`` bytes (one rank's K):
  ring attention ``2 (sp-1) n`` forward (K, V blocks) + ``2 (2 sp - 1) n`` backward (blocks again
  and the dK, dV accumulators, which travel one extra hop home) = ``(6 sp - 4) n``; RSA the same
  (K ring, V ring forward; V + dV and K + dK rings backward); Ulysses ``8 n (sp-1)/sp`` (q, k, v
  and the output through all-to-all, forward and backward).
- ``time``: wall seconds of the forward + backward under the tracker, slowest rank.

Skipped (with the reason in the row): a length the zigzag layout cannot split
(``L % (2 sp)``), Ulysses with ``heads % sp != 0``, RSA whose ``(L/sp) x L`` strip per rank
exceeds ``--max-strip-mib`` (it would need that several times over), and configs whose score
elements per rank (``H (L/sp) L``) exceed ``--max-work`` (too slow for a few-minute run on 2 CPU
cores; every rank of a config shares the same cores).
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

VARIANTS = ("ring_attention", "ring_self_attention", "ulysses")


def add_parser(bsub, fmt) -> None:
    p = bsub.add_parser(
        "sp",
        help="sequence parallelism: per-rank peak memory and bytes sent of ring attention, "
        "RSA and Ulysses vs sequence length and sp",
        formatter_class=fmt,
        epilog=(
            "examples:\n"
            "  colossus bench sp --json docs/bench-sp.json --plot docs/bench-sp.png\n"
            "  colossus bench sp --lengths 256 1024 --sps 1 2 --variants ring_attention\n"
        ),
    )
    p.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192, 32768])
    p.add_argument("--sps", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--heads", type=int, default=4, help="attention heads H")
    p.add_argument("--head-dim", type=int, default=16, help="head dimension D")
    p.add_argument("--batch", type=int, default=1, help="batch B")
    p.add_argument(
        "--q-tile",
        type=int,
        default=256,
        help="ring attention: query rows per score tile (its memory is ~ tile * L/sp)",
    )
    p.add_argument("--non-causal", action="store_true", help="full (non-causal) attention")
    p.add_argument(
        "--max-strip-mib",
        type=float,
        default=256.0,
        help="skip RSA when its per-rank score strip is larger (MiB)",
    )
    p.add_argument(
        "--max-work",
        type=float,
        default=2**29,
        help="skip configs with more score elements H*(L/sp)*L per rank (time cap)",
    )
    p.add_argument("--json", help="write the results here")
    p.add_argument("--plot", help="draw per-rank peak memory and bytes sent here (png)")
    p.set_defaults(bench_fn=run)


def formula_sent_bytes(variant: str, sp: int, n_bytes: int) -> float:
    """Closed-form bytes sent per rank, forward + backward (module docstring)."""
    if sp == 1:
        return 0.0
    if variant == "ulysses":
        return 8 * n_bytes * (sp - 1) / sp
    return float((6 * sp - 4) * n_bytes)


def skip_reason(variant: str, L: int, sp: int, ns: argparse.Namespace) -> str | None:
    n = L // sp
    if L % (2 * sp):
        return f"L % (2*sp) != 0 (zigzag layout needs L divisible by {2 * sp})"
    if variant == "ulysses" and ns.heads % sp:
        return f"ulysses needs heads % sp == 0 (heads={ns.heads})"
    if variant == "ring_self_attention":
        strip = ns.batch * ns.heads * n * L * 4 / 2**20
        if strip > ns.max_strip_mib:
            return f"RSA strip {strip:,.0f} MiB/rank > --max-strip-mib {ns.max_strip_mib:g}"
    work = ns.heads * n * L
    if work > ns.max_work:
        return f"H*(L/sp)*L = {work:.2e} > --max-work {ns.max_work:.2e} (time cap)"
    return None


# ---- one rank ---------------------------------------------------------------------------------


def _measure(cfg: dict[str, Any]) -> dict[str, Any]:
    import torch
    import torch.distributed as dist
    from torch.distributed._tools.mem_tracker import MemTracker

    from parallel import comm

    mod = {
        "ring_attention": "parallel.sequence.ring_attention",
        "ring_self_attention": "parallel.sequence.ring_self_attention",
        "ulysses": "parallel.sequence.ulysses",
    }[cfg["variant"]]
    fn_name = "ulysses_attention" if cfg["variant"] == "ulysses" else cfg["variant"]
    fn = getattr(__import__(mod, fromlist=[fn_name]), fn_name)
    sp = dist.get_world_size()
    n = cfg["L"] // sp
    g = torch.Generator().manual_seed(dist.get_rank())
    shape = (cfg["batch"], cfg["heads"], n, cfg["head_dim"])
    q, k, v, do = (torch.randn(shape, generator=g) for _ in range(4))
    for t in (q, k, v):
        t.requires_grad_()
    dist.barrier()
    comm.reset_stats()
    mt = MemTracker()
    mt.track_external(q, k, v, do)
    t0 = time.perf_counter()
    kw = {"q_tile": cfg["q_tile"]} if cfg["variant"] == "ring_attention" else {}
    with mt:
        out = fn(q, k, v, None, causal=cfg["causal"], **kw)
        out.backward(do)
        del out
    dt = time.perf_counter() - t0
    peak = sum(s["Total"] for s in mt.get_tracker_snapshot("peak").values())
    stats = comm.stats()
    calls = sum(o["calls"] for ops in stats.values() for o in ops.values())
    dist.barrier()
    return {"peak_bytes": peak, "sent": comm.sent_bytes(), "calls": calls, "time_s": dt}


def _worker(rank: int, world: int, port: int, cfgs: list[dict[str, Any]], out: str) -> None:
    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        res = [_measure(c) for c in cfgs]
        torch.save(res, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(cfgs: list[dict[str, Any]], world: int) -> list[list[dict[str, Any]]]:
    """Per config, every rank's result."""
    import torch
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as out:
        mp.spawn(_worker, args=(world, _free_port(), cfgs, out), nprocs=world, join=True)
        ranks = [torch.load(Path(out) / f"rank{r}.pt", weights_only=False) for r in range(world)]
    return [[ranks[r][c] for r in range(world)] for c in range(len(cfgs))]


# ---- parent -----------------------------------------------------------------------------------


def longest_within(rows: list[dict[str, Any]], variant: str, sp: int) -> dict[str, Any] | None:
    """The headline: the longest L run at ``sp`` whose per-rank peak fits in the peak of the
    longest L run on one process; their ratio."""
    ok = [r for r in rows if r["variant"] == variant and r.get("peak_mib") is not None]
    one = [r for r in ok if r["sp"] == 1]
    many = [r for r in ok if r["sp"] == sp]
    best = None
    for base in one:
        fit = [r for r in many if r["peak_mib"] <= base["peak_mib"]]
        if fit:
            top = max(fit, key=lambda r: r["L"])
            cand = {
                "variant": variant,
                "sp": sp,
                "budget_mib": base["peak_mib"],
                "L_one_process": base["L"],
                "L_at_sp": top["L"],
                "peak_mib_at_sp": top["peak_mib"],
                "ratio": top["L"] / base["L"],
            }
            if best is None or cand["ratio"] > best["ratio"]:
                best = cand
    return best


def same_tokens_per_rank(rows: list[dict[str, Any]], variant: str) -> list[dict[str, Any]]:
    """Pairs (L at sp > 1, L/sp on one process): the per-rank peak of the sp run over the
    one-process peak with as many tokens (1.0 = memory depends on L/sp only)."""
    ok = {(r["L"], r["sp"]): r for r in rows if r["variant"] == variant and "peak_mib" in r}
    out = []
    for (L, sp), r in sorted(ok.items()):
        base = ok.get((L // sp, 1))
        if sp > 1 and base is not None:
            out.append({"variant": variant, "L": L, "sp": sp, "peak_mib": r["peak_mib"],
                        "one_process_L": L // sp, "one_process_peak_mib": base["peak_mib"],
                        "peak_ratio": r["peak_mib"] / base["peak_mib"]})  # fmt: skip
    return out


def plot(rows: list[dict[str, Any]], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.5))
    markers = {1: "o", 2: "s", 4: "^", 8: "D"}
    for variant, color in zip(VARIANTS, ("C0", "C1", "C2"), strict=True):
        done = sorted(
            (r for r in rows if r["variant"] == variant and r.get("peak_mib") is not None),
            key=lambda r: (r["sp"], r["L"]),
        )
        for sp in sorted({r["sp"] for r in done}):
            pts = [r for r in done if r["sp"] == sp]
            xs = [r["L"] / sp for r in pts]
            a.plot(xs, [r["peak_mib"] for r in pts], "-", marker=markers.get(sp, "x"),
                   color=color, label=f"{variant} sp={sp}", alpha=0.85)  # fmt: skip
            if sp > 1:
                b.plot([r["L"] for r in pts], [r["sent_mib"] for r in pts], "-",
                       marker=markers.get(sp, "x"), color=color, label=f"{variant} sp={sp}")  # fmt: skip
    a.set_xlabel("tokens per rank L/sp")
    a.set_ylabel("peak MiB per rank (forward + backward)")
    a.set_title("per-rank peak: ring attention ~ L/sp, RSA ~ L^2/sp")
    b.set_xlabel("sequence length L")
    b.set_ylabel("MiB sent per rank (forward + backward)")
    b.set_title("bytes sent per rank")
    for ax in (a, b):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
    a.legend(fontsize=6, ncol=2)
    b.legend(fontsize=6, ncol=2)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(ns: argparse.Namespace) -> int:
    from colossus.bench.common import print_table, write_json

    causal = not ns.non_causal
    rows: list[dict[str, Any]] = []
    for sp in ns.sps:
        cfgs, idx = [], []
        for variant in ns.variants:
            for L in ns.lengths:
                row = {"name": f"{variant} L={L} sp={sp}", "variant": variant, "L": L, "sp": sp}
                reason = skip_reason(variant, L, sp, ns)
                if reason:
                    rows.append({**row, "skipped": reason})
                    continue
                idx.append(len(rows))
                rows.append(row)
                cfgs.append({"variant": variant, "L": L, "heads": ns.heads,
                             "head_dim": ns.head_dim, "batch": ns.batch, "causal": causal,
                             "q_tile": ns.q_tile})  # fmt: skip
        if not cfgs:
            continue
        print(f"[bench sp] sp={sp}: {len(cfgs)} configs ...", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        for i, cfg, ranks in zip(idx, cfgs, _spawn(cfgs, sp), strict=True):
            n_bytes = ns.batch * ns.heads * (cfg["L"] // sp) * ns.head_dim * 4
            formula = formula_sent_bytes(cfg["variant"], sp, n_bytes)
            sent = [r["sent"] for r in ranks]
            peak = max(r["peak_bytes"] for r in ranks)
            rows[i].update(
                peak_mib=peak / 2**20,
                peak_kib_per_token=peak / 1024 / (cfg["L"] // sp),
                sent_mib=max(sent) / 2**20,
                formula_sent_mib=formula / 2**20,
                sent_equals_formula=all(s == formula for s in sent),
                comm_calls=max(r["calls"] for r in ranks),
                time_s=max(r["time_s"] for r in ranks),
            )
        print(f"[bench sp] sp={sp} took {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    print_table(
        f"attention forward + backward, B={ns.batch} H={ns.heads} D={ns.head_dim}, fp32, "
        f"{'causal (zigzag)' if causal else 'non-causal'}: per rank",
        rows,
    )
    headline = [
        h for v in ns.variants for sp in ns.sps if sp > 1 if (h := longest_within(rows, v, sp))
    ]
    pairs = [p for v in ns.variants for p in same_tokens_per_rank(rows, v)]
    for p in pairs:
        print(
            f"[bench sp] {p['variant']}: L={p['L']} at sp={p['sp']} needs {p['peak_mib']:.1f} "
            f"MiB/rank = {p['peak_ratio']:.2f}x one process at L={p['one_process_L']} "
            f"({p['one_process_peak_mib']:.1f} MiB)"
        )
    for h in headline:
        print(
            f"[bench sp] {h['variant']}: at sp={h['sp']}, L={h['L_at_sp']} fits in "
            f"{h['peak_mib_at_sp']:.1f} MiB/rank <= {h['budget_mib']:.1f} MiB that one process "
            f"needs for L={h['L_one_process']}: {h['ratio']:g}x longer"
        )
    args = {k: getattr(ns, k) for k in ("lengths", "sps", "variants", "heads", "head_dim",
                                        "batch", "q_tile", "max_strip_mib", "max_work")}  # fmt: skip
    write_json(
        ns.json,
        "sp",
        rows,
        args | {"causal": causal, "headline": headline, "same_tokens_per_rank": pairs},
    )
    if ns.plot:
        plot(rows, ns.plot, f"B={ns.batch} H={ns.heads} D={ns.head_dim} fp32, "
             f"{'causal' if causal else 'non-causal'}, gloo CPU")  # fmt: skip
    bad = [r["name"] for r in rows if r.get("sent_equals_formula") is False]
    if bad:
        print(f"[bench sp] bytes sent differ from the closed form: {bad}", file=sys.stderr)
        return 1
    return 0


__all__ = [
    "add_parser",
    "formula_sent_bytes",
    "longest_within",
    "run",
    "same_tokens_per_rank",
    "skip_reason",
]
