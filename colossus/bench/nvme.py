"""``colossus bench nvme``: how fast the NVMe tier is, raw and while training.

1. Probe: the directory's raw bandwidth through :class:`offload.nvme.NvmeStore` (O_DIRECT,
   preallocated file), one request at a time and with ``--inflight`` requests in flight:
   write, read, and read and write side by side (``mixed_gbps``, both directions counted).
2. Training: a GPT (``--params``) with parameters, gradients and AdamW state on NVMe runs a few
   steps; per step the bytes moved, the tier's achieved bandwidth (bytes / time with a request
   in flight) and its ratio to the probe (goal >= 0.8).
3. Bound: the same model trained with everything in RAM gives the compute time; the I/O time is
   the bytes moved at the probe's bandwidth (:func:`io_bound_s`: the faster of serial reads +
   writes and the mixed rate); the step time is compared with
   max(compute, I/O) (goal <= 1.15x: I/O and compute overlap); the last row is the median
   over the measured steps, as the compute time is a median over the in-RAM steps.
   ``step_vs_contended_bound`` bounds by the compute time as slowed by the I/O beside it
   (:func:`contended_compute_s`, from the context row below) instead.
4. Context: a matmul loop timed alone and while the disk writes / reads (:func:`compute_under_io`):
   how much the I/O itself slows compute on this machine, which the bound does not count.

Each training run is its own process (clean peak RSS, no page cache or allocator carry-over).
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

from colossus.bench.bigmodel import VOCAB, gpt_shape


def add_parser(bsub, fmt) -> None:
    p = bsub.add_parser(
        "nvme",
        help="NVMe tier: raw probe, bandwidth while training, step time vs max(compute, I/O)",
        formatter_class=fmt,
        epilog=(
            "examples:\n"
            "  colossus bench nvme --nvme-dir /nvme --json nvme.json\n"
            "  colossus bench nvme --nvme-dir /tmp --probe-gib 1 --params 5e7 --steps 2\n"
        ),
    )
    p.add_argument("--nvme-dir", default=".cache/colossus/nvme", help="directory to measure")
    p.add_argument("--probe-gib", type=float, default=2.0, help="bytes written + read by the probe")
    p.add_argument("--inflight", type=int, default=8, help="requests in flight in the probe")
    p.add_argument("--request-mib", type=int, default=4)
    p.add_argument("--params", type=float, default=3e8, help="model trained on the tier")
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=3, help="measured steps (after one warm-up)")
    p.add_argument("--json", help="write the results here")
    p.set_defaults(bench_fn=run)


def probe(directory: str, nbytes: int, threads: int, request: int) -> dict[str, float]:
    """Through a fresh store: write ``nbytes``, read them back, then read them while writing
    another ``nbytes`` (what a training step does: parameter and state reads beside gradient
    and state writes). GB/s of each; ``mixed_gbps`` counts both directions."""
    import torch

    from offload.nvme import NEEDED, NvmeStore

    store = NvmeStore(directory, 2 * nbytes, io_threads=threads, request_bytes=request)
    try:
        buf = store.empty(nbytes // 4, torch.float32)
        buf.fill_(1.0)  # fault the pages in before timing
        other = store.empty(nbytes // 4, torch.float32)
        other.fill_(2.0)
        ext, ext2 = store.alloc(buf.nbytes), store.alloc(buf.nbytes)
        store.write(ext2, other).result()  # allocate the blocks the mixed phase overwrites
        os.fsync(store.fd)
        t = time.perf_counter()
        store.write(ext, buf).result()
        os.fsync(store.fd)
        w = buf.nbytes / (time.perf_counter() - t) / 1e9
        t = time.perf_counter()
        store.read(ext, buf).result()
        r = buf.nbytes / (time.perf_counter() - t) / 1e9
        t = time.perf_counter()
        # same priority: both directions in flight together, as in a step
        futs = [store.read(ext, buf, NEEDED), store.write(ext2, other, NEEDED)]
        for f in futs:
            f.result()
        os.fsync(store.fd)
        m = 2 * buf.nbytes / (time.perf_counter() - t) / 1e9
        return {"write_gbps": w, "read_gbps": r, "mixed_gbps": m, "direct": store.direct}
    finally:
        store.close()


def compute_under_io(directory: str, nbytes: int, threads: int, request: int) -> dict[str, float]:
    """How much slower compute runs while the disk works: the time of a fixed fp32 matmul loop
    (2 threads, as training) alone and while ``nbytes`` are written (then read) over and over
    with ``threads`` requests in flight. On a VM the host's disk emulation and DMA share the
    machine: the training bound max(compute, I/O) assumes they cost compute nothing."""
    import threading

    import torch

    from offload.nvme import NvmeStore

    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)

    def matmuls() -> float:
        t = time.perf_counter()
        for _ in range(40):
            a @ b
        return time.perf_counter() - t

    matmuls()
    alone = min(matmuls() for _ in range(3))
    store = NvmeStore(directory, nbytes, io_threads=threads, request_bytes=request)
    out = {"compute_alone_s": alone}
    try:
        buf = store.empty(nbytes // 4, torch.float32)
        buf.fill_(1.0)
        ext = store.alloc(buf.nbytes)
        store.write(ext, buf).result()
        for kind, op in (("writing", store.write), ("reading", store.read)):
            stop = threading.Event()

            def stream(op=op, stop=stop) -> None:
                while not stop.is_set():
                    op(ext, buf).result()

            th = threading.Thread(target=stream, daemon=True)
            th.start()
            time.sleep(0.2)  # requests in flight before timing
            out[f"compute_x_{kind}"] = min(matmuls() for _ in range(3)) / alone
            stop.set()
            th.join()
    finally:
        store.close()
    return out


def io_bound_s(read_gb: float, written_gb: float, probe: dict[str, float]) -> float:
    """The least time the disk needs for these bytes by the probe: reads and writes one after
    the other at their own rates, or side by side at the mixed rate, whichever is faster (the
    tighter bound)."""
    serial = read_gb / probe["read_gbps"] + written_gb / probe["write_gbps"]
    mixed = (read_gb + written_gb) / probe["mixed_gbps"]
    return min(serial, mixed)


def contended_compute_s(compute: float, step: dict[str, Any], x: dict[str, float]) -> float:
    """The in-RAM compute time as slowed by the I/O beside it: ``compute_under_io``'s factors
    (weighted by the step's bytes written and read) applied for the share of the step the
    disk was busy. A second bound beside max(compute, I/O), which assumes I/O costs compute
    nothing; on this VM it does (the host's disk emulation shares the machine)."""
    moved = step["read_gb"] + step["written_gb"]
    if moved <= 0:
        return compute
    factor = (
        step["written_gb"] * x["compute_x_writing"] + step["read_gb"] * x["compute_x_reading"]
    ) / moved
    busy = min(1.0, step["io_busy_s"] / max(step["step_time_s"], 1e-9))
    return compute * (1.0 + max(0.0, factor - 1.0) * busy)


def _worker(args: dict[str, Any], out: str) -> None:
    import torch
    from accelerate import init_empty_weights
    from transformers import GPT2Config, GPT2LMHeadModel

    from colossus.metrics import peak_rss_gib
    from offload import ChunkAdamW, ChunkConfig, ChunkManager

    torch.manual_seed(0)
    shape = gpt_shape(args["params"], seq=args["seq"])
    cfg = GPT2Config(vocab_size=VOCAB, n_positions=args["seq"], **shape)
    with init_empty_weights():
        model = GPT2LMHeadModel(cfg)
    model.tie_weights()
    nvme = args["where"] == "nvme"
    kw = (
        dict(
            offload_param_frac=1.0,
            offload_optim_frac=1.0,
            nvme_optim_frac=1.0,
            nvme_param_frac=1.0,
            nvme_dir=args["nvme_dir"],
        )
        if nvme
        else {}
    )
    mgr = ChunkManager(model, ChunkConfig(**kw))
    opt = ChunkAdamW(mgr, lr=1e-4, betas=(0.9, 0.999))
    g = torch.Generator().manual_seed(1)
    rows = []
    for s in range(args["steps"] + 1):
        ids = torch.randint(0, VOCAB, (args["batch"], args["seq"]), generator=g)
        st = mgr.swapper.store if nvme else None
        r0, w0, b0 = (st.bytes_read, st.bytes_written, st.busy_s) if st else (0, 0, 0.0)
        t = time.perf_counter()
        loss = mgr.module(input_ids=ids, labels=ids).loss
        t1 = time.perf_counter()
        mgr.backward(loss)
        t2 = time.perf_counter()
        mgr.clip_grad_norm_(1.0)
        opt.step()
        opt.zero_grad()
        t3 = time.perf_counter()
        dt = t3 - t
        row = {
            "step": s,
            "step_time_s": dt,
            "forward_s": t1 - t,
            "backward_s": t2 - t1,
            "optimizer_s": t3 - t2,
            "loss": float(loss.detach()),
        }
        if st:
            row |= {
                "read_gb": (st.bytes_read - r0) / 1e9,
                "written_gb": (st.bytes_written - w0) / 1e9,
                "io_busy_s": st.busy_s - b0,
            }
        rows.append(row)
    if nvme:
        mgr.close()
    Path(out).write_text(
        json.dumps(
            {
                "rows": rows,
                "params": sum(c.used for c in mgr.chunks),
                "rss": peak_rss_gib(),
                "min_gb": mgr.min_nvme_bytes_per_step() / 1e9,
            }
        )
    )


def _train(args: dict[str, Any], where: str) -> dict[str, Any]:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = f.name
    cmd = [
        sys.executable,
        "-m",
        "colossus.bench.nvme",
        "--args",
        json.dumps(args | {"where": where}),
    ]
    print(f"[bench nvme] training with the model on {where} ...", file=sys.stderr, flush=True)
    subprocess.run([*cmd, "--out", out], check=True, stdout=sys.stderr)
    res = json.loads(Path(out).read_text())
    os.unlink(out)
    return res


def run(ns: argparse.Namespace) -> int:
    from statistics import median

    from colossus.bench.common import print_table, write_json

    d = Path(ns.nvme_dir).expanduser()
    d.mkdir(parents=True, exist_ok=True)
    nbytes = int(ns.probe_gib * 2**30)
    req = ns.request_mib << 20
    print(f"[bench nvme] probing {d} ...", file=sys.stderr, flush=True)
    one = probe(str(d), nbytes, 1, req)
    print("[bench nvme] compute while the disk works ...", file=sys.stderr, flush=True)
    contention = compute_under_io(str(d), min(nbytes, 1 << 30), ns.inflight, req)
    # a shared (virtual) disk's bandwidth drifts with its host: probe before, between and
    # after the training runs, and bound by the median of the three
    many_runs = [probe(str(d), nbytes, ns.inflight, req)]
    args = {
        "nvme_dir": str(d),
        "params": ns.params,
        "seq": ns.seq,
        "batch": ns.batch,
        "steps": ns.steps,
    }
    on_disk = _train(args, "nvme")
    many_runs.append(probe(str(d), nbytes, ns.inflight, req))
    in_ram = _train(args, "ram")
    many_runs.append(probe(str(d), nbytes, ns.inflight, req))
    many = {k: median(r[k] for r in many_runs) for k in ("read_gbps", "write_gbps", "mixed_gbps")}
    many["direct"] = many_runs[0]["direct"]
    steps = on_disk["rows"][1:]  # the first step zero-fills Adam state instead of reading it
    compute = median(r["step_time_s"] for r in in_ram["rows"][1:])
    rows = [
        {
            "name": "probe, 1 request in flight",
            "read_gbps": one["read_gbps"],
            "write_gbps": one["write_gbps"],
            "mixed_gbps": one["mixed_gbps"],
        },
        *(
            {
                "name": f"probe, {ns.inflight} requests in flight, {when}",
                "read_gbps": r["read_gbps"],
                "write_gbps": r["write_gbps"],
                "mixed_gbps": r["mixed_gbps"],
            }
            for when, r in zip(("before", "between", "after"), many_runs)
        ),
        {
            "name": f"probe, {ns.inflight} requests in flight, median (the bound)",
            "read_gbps": many["read_gbps"],
            "write_gbps": many["write_gbps"],
            "mixed_gbps": many["mixed_gbps"],
        },
        {
            "name": "matmul time while the disk writes / reads (x alone; context, not bound)",
            "compute_x_writing": contention["compute_x_writing"],
            "compute_x_reading": contention["compute_x_reading"],
        },
    ]
    for r in steps:
        moved = r["read_gb"] + r["written_gb"]
        io_bound = io_bound_s(r["read_gb"], r["written_gb"], many)
        achieved = moved / max(r["io_busy_s"], 1e-9)
        probe_mix = moved / io_bound  # the probe's bandwidth for this read/write mix
        slowed = contended_compute_s(compute, r, contention)
        rows.append(
            {
                "name": f"training step {r['step']}",
                "step_time_s": r["step_time_s"],
                "fwd_bwd_opt_s": "/".join(
                    f"{r[k]:.2f}" for k in ("forward_s", "backward_s", "optimizer_s")
                ),
                "read_gb": r["read_gb"],
                "written_gb": r["written_gb"],
                "min_gb": on_disk["min_gb"],
                "moved_vs_min": moved / max(on_disk["min_gb"], 1e-12),
                "tier_gbps": achieved,
                "tier_vs_probe": achieved / probe_mix,
                "compute_s": compute,
                "io_bound_s": io_bound,
                "step_vs_bound": r["step_time_s"] / max(compute, io_bound),
                "step_vs_contended_bound": r["step_time_s"] / max(slowed, io_bound),
            }
        )
    trained = [r for r in rows if r["name"].startswith("training step")]
    if len(trained) > 1:
        # the figure against the goals: the compute bound is a median of steps too
        rows.append(
            {
                "name": f"training, median of steps 1-{len(trained)}",
                **{
                    k: median(r[k] for r in trained)
                    for k in (
                        "step_time_s",
                        "read_gb",
                        "written_gb",
                        "min_gb",
                        "moved_vs_min",
                        "tier_gbps",
                        "tier_vs_probe",
                        "compute_s",
                        "io_bound_s",
                        "step_vs_bound",
                        "step_vs_contended_bound",
                    )
                },
            }
        )
    print_table(
        f"bench nvme: {d} ({'O_DIRECT' if many['direct'] else 'buffered'}), "
        f"GPT {on_disk['params'] / 1e9:.2f} B params on NVMe",
        rows,
    )
    write_json(
        ns.json, "nvme", rows, args | {"inflight": ns.inflight, "request_mib": ns.request_mib}
    )
    return 0


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--args", required=True)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    _worker(json.loads(a.args), a.out)
