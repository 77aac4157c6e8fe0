"""``colossus bench bigmodel``: a GPT far larger than RAM trains for a few full steps.

The model is built on the ``meta`` device and materialised chunk by chunk straight onto the
NVMe tier (parameters, gradients, fp32 AdamW state all on disk; ZeRO-Infinity placement);
forward / backward read parameter shards ahead of use along the recorded access order and the
optimizer streams its state through a read-ahead / write-behind pipeline. The run must keep its
peak RSS under ``--host-budget`` (the manager refuses up front a placement whose host side
cannot fit), and the second step's loss must differ from the first (a real update happened).

The worker runs in its own process so that ``ru_maxrss`` is this run's peak alone.

``--variants deepspeed`` runs the same GPT shape on the same token batches under DeepSpeed
ZeRO-3 with parameters and optimizer state offloaded to NVMe (ZeRO-Infinity; CPU accelerator,
gloo, one process), the model built under ``deepspeed.zero.Init(remote_device="nvme")`` so it
never exists whole in RAM. Its ``read_gb`` / ``written_gb`` are the worker's storage I/O from
``/proc/self/io`` (DeepSpeed keeps no byte counters), not store counters. A variant that fails or
runs past ``--timeout`` gives a row with an ``error`` column instead of stopping the bench.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any

VOCAB = 50257
VARIANTS = ("colossus", "deepspeed")


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
    p.add_argument(
        "--variants",
        nargs="+",
        choices=VARIANTS,
        default=["colossus"],
        help="trainers to run on the same model and batches (deepspeed: ZeRO-3 + NVMe offload)",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=3000.0,
        help="seconds one variant may run (then: error row)",
    )
    p.add_argument("--json", help="write the results here")
    p.set_defaults(bench_fn=run)


def _worker(args: dict[str, Any], out: str) -> None:
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


def ds_config(args: dict[str, Any], nvme_path: str) -> dict[str, Any]:
    """ZeRO-3 with parameters and optimizer state on NVMe (ZeRO-Infinity), fp32, AdamW as ours."""
    shape = gpt_shape(args["params"], seq=args["seq"])
    # a parameter swap buffer holds one whole parameter: the largest is the (tied) embedding
    biggest = VOCAB * shape["n_embd"]
    buffer_size = -(-biggest // 2**20) * 2**20
    return {
        "train_micro_batch_size_per_gpu": args["batch"],
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 1.0,
        "steps_per_print": 10**9,
        "optimizer": {
            "type": "AdamW",
            "params": {"lr": 1e-4, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.01},
        },
        "zero_optimization": {
            "stage": 3,
            "offload_param": {
                "device": "nvme",
                "nvme_path": nvme_path,
                "pin_memory": False,
                # one buffer per parameter in flight: step 2 prefetches along the recorded
                # trace, and with 8 buffers 1e9 failed "Not enough buffers 0 for swapping 1"
                "buffer_count": 12,
                "buffer_size": buffer_size,
            },
            "offload_optimizer": {
                "device": "nvme",
                "nvme_path": nvme_path,
                "pin_memory": False,
                "buffer_count": 4,
            },
            # the optimizer swaps fp32 master + m + v + grad in per sub-group: 16 B/element
            "sub_group_size": int(1e8),
            "stage3_max_live_parameters": int(3e7),
            "stage3_prefetch_bucket_size": int(1e7),
            "stage3_param_persistence_threshold": int(1e5),
            "contiguous_gradients": True,
            "overlap_comm": False,
            "reduce_bucket_size": int(5e7),
        },
        "aio": {
            "block_size": 1048576,
            "queue_depth": 8,
            "thread_count": 1,
            "single_submit": False,
            "overlap_events": True,
        },
    }


def _proc_io() -> tuple[int, int]:
    """(read_bytes, write_bytes) this process made the storage layer do so far."""
    io = dict(
        line.split(": ") for line in Path("/proc/self/io").read_text().splitlines() if ": " in line
    )
    return int(io.get("read_bytes", 0)), int(io.get("write_bytes", 0))


def _du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _ds_worker(args: dict[str, Any], out: str) -> None:
    """The same GPT and batches under DeepSpeed ZeRO-3, params + optimizer on NVMe."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    import deepspeed
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers import initialization as hf_init
    from transformers.integrations.deepspeed import initialize_weights_zero3

    from colossus.metrics import peak_rss_gib

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
    nvme = Path(args["nvme_dir"])
    conf = ds_config(args, str(nvme))
    deepspeed.init_distributed(dist_backend="gloo")
    t0 = time.perf_counter()
    # each parameter is partitioned onto NVMe as its module is built: never whole in RAM. As
    # transformers' own ZeRO-3 path does: skip the init on the (empty) partitions, then gather
    # one module at a time and run the GPT-2 init on it (else wte keeps N(0, 1): loss ~ 300)
    with (
        hf_init.no_init_weights(),
        deepspeed.zero.Init(
            config_dict_or_path=conf, remote_device="nvme", pin_memory=False, dtype=torch.float32
        ),
    ):
        model = GPT2LMHeadModel(cfg)
    initialize_weights_zero3(model)
    model.tie_weights()
    engine, *_ = deepspeed.initialize(
        model=model, model_parameters=[p for p in model.parameters()], config=conf
    )
    engine.train()
    build_s = time.perf_counter() - t0
    print(f"[bigmodel] deepspeed built in {build_s:.1f} s", file=sys.stderr, flush=True)
    g = torch.Generator().manual_seed(1)
    steps = []
    for s in range(args["steps"]):
        ids = torch.randint(0, VOCAB, (args["batch"], args["seq"]), generator=g)
        r0, w0 = _proc_io()
        t = time.perf_counter()
        loss = engine(input_ids=ids, labels=ids).loss
        t_fwd = time.perf_counter()
        engine.backward(loss)
        t_bwd = time.perf_counter()
        engine.step()  # gradient clipping + AdamW on the NVMe-resident state
        t_end = time.perf_counter()
        r1, w1 = _proc_io()
        norm = engine.get_global_grad_norm()
        steps.append(
            {
                "loss": float(loss),
                "grad_norm": None if norm is None else float(norm),
                "step_time_s": t_end - t,
                "forward_s": t_fwd - t,
                "backward_s": t_bwd - t_fwd,
                "optimizer_s": t_end - t_bwd,
                "read_gb": (r1 - r0) / 1e9,
                "written_gb": (w1 - w0) / 1e9,
                "peak_rss_gib": peak_rss_gib(),
            }
        )
        print(f"[bigmodel] step {s + 1}: {json.dumps(steps[-1])}", file=sys.stderr, flush=True)
    row = {
        "name": "deepspeed zero3 (nvme)",
        "params": sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters()),
        "shape": f"{shape['n_layer']}x{shape['n_embd']}",
        "build_s": build_s,
        "nvme_gib": _du(nvme) / 2**30,
        "steps": steps,
        "peak_rss_gib": peak_rss_gib(),
    }
    Path(out).write_text(json.dumps(row))


_NAMES = {"colossus": "colossus chunk (nvme)", "deepspeed": "deepspeed zero3 (nvme)"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_variant(variant: str, args: dict[str, Any], timeout: float) -> dict[str, Any]:
    """One variant in its own process (its own ``ru_maxrss``); a failure or a run past
    ``timeout`` comes back as ``{"name", "error"}`` instead of raising."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = f.name
    env = dict(os.environ)
    nvme = Path(args["nvme_dir"])
    if variant == "deepspeed":
        # its own subfolder of the NVMe dir, removed afterwards whatever happened
        nvme = nvme / f"deepspeed-{os.getpid()}"
        nvme.mkdir(parents=True, exist_ok=True)
        args = {**args, "nvme_dir": str(nvme)}
        env.update(
            DS_ACCELERATOR="cpu",
            RANK="0",
            WORLD_SIZE="1",
            LOCAL_RANK="0",
            LOCAL_WORLD_SIZE="1",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(_free_port()),
        )
    cmd = [sys.executable, "-m", "colossus.bench.bigmodel", "--worker", "--variant", variant]
    cmd += ["--args", json.dumps(args), "--out", out]
    tail: collections.deque[str] = collections.deque(maxlen=40)
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
        text=True,
        errors="replace",
        start_new_session=True,  # a timeout stops the worker and anything it started
    )

    def forward() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            sys.stderr.write(line)
            sys.stderr.flush()
            tail.append(line)

    reader = threading.Thread(target=forward, daemon=True)
    reader.start()
    timed_out = False
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        os.killpg(proc.pid, signal.SIGTERM)  # the worker removes its NVMe files on SIGTERM
        try:
            rc = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            rc = proc.wait()
    reader.join(timeout=10)
    try:
        text = Path(out).read_text()
        row = json.loads(text) if text.strip() else {}
    except (OSError, ValueError):
        row = {}
    finally:
        if os.path.exists(out):
            os.unlink(out)
        if variant == "deepspeed":
            shutil.rmtree(nvme, ignore_errors=True)
    if timed_out:
        return {"name": _NAMES[variant], "error": f"timeout: ran past --timeout {timeout:g} s"}
    if "error" in row:
        return {"name": _NAMES[variant], "error": row["error"]}
    if rc != 0 or "steps" not in row:
        last = next((x.strip() for x in reversed(tail) if x.strip()), "")
        return {"name": _NAMES[variant], "error": f"{last} (exit {rc})".strip()}
    return row


def run(ns: argparse.Namespace) -> int:
    from pydantic import ByteSize, TypeAdapter

    from colossus.bench.common import print_table, write_json

    budget = int(TypeAdapter(ByteSize).validate_python(ns.host_budget))
    nvme = Path(ns.nvme_dir).expanduser()
    nvme.mkdir(parents=True, exist_ok=True)
    variants = list(dict.fromkeys(getattr(ns, "variants", None) or ["colossus"]))
    timeout = getattr(ns, "timeout", 3000.0)
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
    shape = gpt_shape(ns.params, seq=ns.seq)
    n_params = count(shape, seq=ns.seq)
    print(
        f"[bench bigmodel] GPT {shape['n_layer']} layers x {shape['n_embd']} "
        f"({n_params / 1e9:.2f} B params), host budget "
        f"{budget / 2**30:.1f} GiB, NVMe dir {nvme}, variants {' '.join(variants)}",
        file=sys.stderr,
        flush=True,
    )
    summaries, rows = [], []
    for variant in variants:
        print(f"[bench bigmodel] variant {variant}", file=sys.stderr, flush=True)
        row = _run_variant(variant, args, timeout)
        if "error" in row:
            print(f"[bench bigmodel] {variant} failed: {row['error']}", file=sys.stderr, flush=True)
            summaries.append(
                {
                    "name": row["name"],
                    "params": n_params,
                    "shape": f"{shape['n_layer']}x{shape['n_embd']}",
                    "host_budget_gib": budget / 2**30,
                    "error": row["error"],
                }
            )
            continue
        steps = row.pop("steps")
        for i, s in enumerate(steps):
            rows.append({"name": f"{row['name']} step {i + 1}", **s})
        losses = [s["loss"] for s in steps]
        summaries.append(
            {
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
        )
    if rows:
        print_table(f"bench bigmodel: {n_params / 1e9:.2f} B params, steps", rows)
    print_table("bench bigmodel: summary", summaries)
    write_json(ns.json, "bigmodel", [*summaries, *rows], {**args, "variants": variants})
    # the exit status is ours: colossus must fit the budget; a baseline only has to run
    ours = [s for s in summaries if s["name"] == _NAMES["colossus"]]
    if ours:
        return 0 if all(s.get("under_budget") and s.get("losses_finite") for s in ours) else 1
    return 0 if all("error" not in s and s["losses_finite"] for s in summaries) else 1


def _main_worker(variant: str, args: dict[str, Any], out: str) -> None:
    try:
        (_ds_worker if variant == "deepspeed" else _worker)(args, out)
    except BaseException as e:  # the parent reports the last line as the row's error
        if isinstance(e, SystemExit) and e.code in (0, None):
            raise
        last = traceback.format_exception_only(type(e), e)[-1].strip()
        traceback.print_exc()
        Path(out).write_text(json.dumps({"error": last}))
        raise SystemExit(1) from None


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--worker", action="store_true")
    ap.add_argument("--variant", choices=VARIANTS, default="colossus")
    ap.add_argument("--args", required=True)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    _main_worker(a.variant, json.loads(a.args), a.out)
