"""``colossus bench bigmodel``: a GPT far larger than RAM trains for a few full steps.

The model is built on the ``meta`` device and materialised chunk by chunk straight onto the
NVMe tier (parameters, gradients, fp32 AdamW state all on disk; ZeRO-Infinity placement);
forward / backward read parameter shards ahead of use along the recorded access order and the
optimizer streams its state through a read-ahead / write-behind pipeline. The run must keep its
peak RSS under ``--host-budget`` (the manager refuses up front a placement whose host side
cannot fit), and the second step's loss must differ from the first (a real update happened).

The worker runs in its own process so that ``ru_maxrss`` is this run's peak alone.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

VOCAB = 50257


def gpt_shape(params: float, vocab: int = VOCAB, seq: int = 128) -> dict[str, int]:
    """GPT-2-style (n_embd, n_layer, n_head) of about ``params`` parameters: the narrowest width
    (head size 128) whose depth stays at most n_embd / 32 (GPT-2 XL: 1600 wide, 48 deep)."""
    for d in (512, 768, 1024, 1536, 2048, 2560, 3072, 4096, 5120, 6144, 8192):
        per_layer = 12 * d * d + 13 * d
        layers = max(1, round((params - (vocab + seq) * d - 2 * d) / per_layer))
        if layers <= d // 32:
            return {"n_embd": d, "n_layer": layers, "n_head": max(1, d // 128)}
    raise ValueError(f"--params {params:.3g} is beyond the shapes this bench knows")


def count(shape: dict[str, int], vocab: int = VOCAB, seq: int = 128) -> int:
    d, n = shape["n_embd"], shape["n_layer"]
    return n * (12 * d * d + 13 * d) + (vocab + seq) * d + 2 * d


def add_parser(bsub, fmt) -> None:
    p = bsub.add_parser(
        "bigmodel",
        help="a GPT larger than RAM: full training steps with params + optimizer on NVMe",
        formatter_class=fmt,
        epilog=(
            "examples:\n"
            "  colossus bench bigmodel --params 4e9 --host-budget 12GiB --nvme-dir /nvme "
            "--json big.json\n"
            "  colossus bench bigmodel --params 2e8 --host-budget 2GiB --nvme-dir /tmp  # quick\n"
        ),
    )
    p.add_argument("--params", type=float, default=4e9, help="model size (parameters)")
    p.add_argument("--host-budget", default="12GiB", help="host (RAM) budget, e.g. 12GiB")
    p.add_argument("--nvme-dir", default=".cache/colossus/nvme", help="directory for the NVMe tier")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument(
        "--chunk-size", type=int, default=None, help="elements per chunk (default: searched)"
    )
    p.add_argument("--prefetch", type=int, default=2, help="chunks read ahead")
    p.add_argument("--json", help="write the results here")
    p.set_defaults(bench_fn=run)


def _worker(args: dict[str, Any], out: str) -> None:
    import signal

    import torch

    # a killed run must still remove its NVMe files (finalizers run on a normal exit)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    from accelerate import init_empty_weights
    from transformers import GPT2Config, GPT2LMHeadModel

    from colossus.metrics import peak_rss_gib
    from offload import ChunkAdamW, ChunkConfig, ChunkManager

    torch.manual_seed(0)
    shape = gpt_shape(args["params"], seq=args["seq"])
    cfg = GPT2Config(
        vocab_size=VOCAB,
        n_positions=args["seq"],
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        **shape,
    )
    t0 = time.perf_counter()
    with init_empty_weights():  # parameters on meta: nothing allocated yet
        model = GPT2LMHeadModel(cfg)
    model.tie_weights()
    mgr = ChunkManager(
        model,
        ChunkConfig(
            chunk_size=args["chunk_size"],
            offload_param_frac=1.0,
            offload_optim_frac=1.0,
            nvme_optim_frac=1.0,
            nvme_param_frac=1.0,
            nvme_dir=args["nvme_dir"],
            nvme_prefetch=args["prefetch"],
            host_budget=args["host_budget"],
        ),
    )
    build_s = time.perf_counter() - t0
    opt = ChunkAdamW(mgr, lr=1e-4, betas=(0.9, 0.999), weight_decay=0.01)
    g = torch.Generator().manual_seed(1)
    steps = []
    store = mgr.swapper.store
    for s in range(args["steps"]):
        ids = torch.randint(0, VOCAB, (args["batch"], args["seq"]), generator=g)
        r0, w0, io0 = store.bytes_read, store.bytes_written, mgr.swapper.io_wait_s
        t = time.perf_counter()
        loss = mgr.module(input_ids=ids, labels=ids).loss
        t_fwd = time.perf_counter()
        mgr.backward(loss)
        t_bwd = time.perf_counter()
        norm = mgr.clip_grad_norm_(1.0)
        opt.step()
        opt.zero_grad()
        t_end = time.perf_counter()
        steps.append(
            {
                "loss": float(loss),
                "grad_norm": float(norm),
                "step_time_s": t_end - t,
                "forward_s": t_fwd - t,
                "backward_s": t_bwd - t_fwd,
                "optimizer_s": t_end - t_bwd,
                "read_gb": (store.bytes_read - r0) / 1e9,
                "written_gb": (store.bytes_written - w0) / 1e9,
                "io_wait_s": mgr.swapper.io_wait_s - io0,
                "peak_rss_gib": peak_rss_gib(),
            }
        )
        print(f"[bigmodel] step {s + 1}: {json.dumps(steps[-1])}", file=sys.stderr, flush=True)
    rep = mgr.memory_report()
    row = {
        "name": "colossus chunk (nvme)",
        "params": sum(c.used for c in mgr.chunks),
        "shape": f"{shape['n_layer']}x{shape['n_embd']}",
        "chunks": len(mgr.chunks),
        "build_s": build_s,
        "nvme_gib": rep["nvme"]["total"] / 2**30,
        "steps": steps,
        "peak_rss_gib": peak_rss_gib(),
        "fetch_hits": mgr.fetcher.hits,
        "fetch_misses": mgr.fetcher.misses,
    }
    mgr.swapper.close()
    Path(out).write_text(json.dumps(row))


def run(ns: argparse.Namespace) -> int:
    from pydantic import ByteSize, TypeAdapter

    from colossus.bench.common import print_table, write_json

    budget = int(TypeAdapter(ByteSize).validate_python(ns.host_budget))
    nvme = Path(ns.nvme_dir).expanduser()
    nvme.mkdir(parents=True, exist_ok=True)
    args = {
        "params": ns.params,
        "host_budget": budget,
        "nvme_dir": str(nvme),
        "steps": ns.steps,
        "batch": ns.batch,
        "seq": ns.seq,
        "chunk_size": ns.chunk_size,
        "prefetch": ns.prefetch,
    }
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = f.name
    cmd = [
        sys.executable,
        "-m",
        "colossus.bench.bigmodel",
        "--worker",
        "--args",
        json.dumps(args),
        "--out",
        out,
    ]
    shape = gpt_shape(ns.params, seq=ns.seq)
    print(
        f"[bench bigmodel] GPT {shape['n_layer']} layers x {shape['n_embd']} "
        f"({count(shape, seq=ns.seq) / 1e9:.2f} B params), host budget "
        f"{budget / 2**30:.1f} GiB, NVMe dir {nvme}",
        file=sys.stderr,
        flush=True,
    )
    proc = subprocess.run(cmd, stdout=sys.stderr)
    if proc.returncode != 0:
        raise SystemExit(f"bench bigmodel: the run failed (exit {proc.returncode})")
    row = json.loads(Path(out).read_text())
    os.unlink(out)
    steps = row.pop("steps")
    rows = []
    for i, s in enumerate(steps):
        rows.append({"name": f"{row['name']} step {i + 1}", **s})
    losses = [s["loss"] for s in steps]
    summary = {
        "name": row["name"],
        "params": row["params"],
        "shape": row["shape"],
        "build_s": row["build_s"],
        "nvme_gib": row["nvme_gib"],
        "peak_rss_gib": row["peak_rss_gib"],
        "host_budget_gib": budget / 2**30,
        "under_budget": row["peak_rss_gib"] * 2**30 <= budget,
        "losses_finite": all(x == x and abs(x) < float("inf") for x in losses),
        "loss_changed": len(losses) > 1 and losses[-1] != losses[0],
    }
    print_table(f"bench bigmodel: {row['params'] / 1e9:.2f} B params, steps", rows)
    print_table("bench bigmodel: summary", [summary])
    write_json(ns.json, "bigmodel", [summary, *rows], args)
    return 0 if summary["under_budget"] and summary["losses_finite"] else 1


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--worker", action="store_true")
    ap.add_argument("--args", required=True)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    _worker(json.loads(a.args), a.out)
