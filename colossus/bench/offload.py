"""``colossus bench offload``: one training step of the same model on the same data under four
memory managers, side by side:

* ``pytorch``: the plain loop (forward, backward, ``clip_grad_norm_(1.0)``, fused AdamW);
* ``chunk``: :class:`offload.ChunkManager` + :class:`offload.ChunkAdamW`, parameters and optimizer
  state placed on the ``host`` tier (``offload_param_frac=1.0``, ``offload_optim_frac=1.0``);
* ``fsdp2``: ``torch.distributed.fsdp.fully_shard`` per transformer block and the root, with
  ``CPUOffloadPolicy(pin_memory=False)``, gloo, torch AdamW;
* ``deepspeed``: ZeRO-3 with ``offload_optimizer: {device: cpu}`` (DeepSpeedCPUAdam),
  ``DS_ACCELERATOR=cpu``, gloo. A variant that cannot run gives a row with an ``error`` column.

Every variant runs in its own process(es) so that peak RSS (ru_maxrss) belongs to that variant.
The distributed ones (chunk, fsdp2, deepspeed) run ``--ranks N`` processes (gloo); the global
batch stays ``--batch``, split across ranks. All use lr 1e-4, betas (0.9, 0.999), eps 1e-8 and
weight decay 0.01 on matrices and embeddings (ndim >= 2), none on biases and norm gains (the
chunk manager's ``default_decay_filter``), so every variant does the same arithmetic. Dropout is
set to 0 so that the losses can be compared: the step-1 loss (before any update) must agree
across variants to 1e-4, else a warning is printed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

from colossus.bench.step import MODELS, _build, _data

VARIANTS = ("pytorch", "chunk", "fsdp2", "deepspeed")
DISTRIBUTED = frozenset({"chunk", "fsdp2", "deepspeed"})
LR, BETAS, EPS, WEIGHT_DECAY, MAX_NORM = 1e-4, (0.9, 0.999), 1e-8, 0.01, 1.0
LOSS_TOL = 1e-4


def add_parser(bsub, fmt) -> None:
    p = bsub.add_parser(
        "offload",
        help="step time and peak RSS: plain PyTorch vs offload.ChunkManager vs FSDP2 vs DeepSpeed",
        formatter_class=fmt,
        epilog=(
            "examples:\n"
            "  colossus bench offload --model gpt2-124m --json bench-offload.json\n"
            "  colossus bench offload --model gpt2-tiny --steps 2 --variants pytorch chunk fsdp2\n"
            "  colossus bench offload --ranks 2 --variants pytorch chunk fsdp2 deepspeed\n"
        ),
    )
    p.add_argument("--model", choices=sorted(MODELS), default="gpt2-124m")
    p.add_argument("--batch", type=int, default=4, help="global batch (sequences per step)")
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--steps", type=int, default=8, help="measured steps (after --warmup)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    p.add_argument(
        "--ranks",
        type=int,
        default=1,
        help="processes for chunk, fsdp2 and deepspeed (gloo); pytorch always runs one",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch/OpenMP threads per process (default: cores // processes of the variant)",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=1800.0,
        help="seconds a variant may run (DeepSpeed JIT-builds cpu_adam on first use) before it "
        "is killed and its row gets an error",
    )
    p.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="run every variant this many times, in a rotated order each round, so drifting "
        "load from other jobs hits all alike; step time = median over all rounds' steps, "
        "time_vs_pytorch = median of the per-round ratios",
    )
    p.add_argument("--json", help="write the results here")
    p.set_defaults(bench_fn=run)


# ===================================================================== worker (one rank)
def _param_groups(model) -> list[dict[str, Any]]:
    """Decay matrices and embeddings, not biases / norm gains: ChunkManager's default split."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    return [
        {"params": decay, "weight_decay": WEIGHT_DECAY},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def _worker(variant: str, args: dict[str, Any], out: str) -> None:
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    try:
        row = _measure(variant, args, rank, world)
    except BaseException as e:  # the parent turns this into the row's ``error``
        msg = "".join(traceback.format_exception_only(type(e), e)).strip().splitlines()
        Path(out).write_text(json.dumps({"error": msg[-1] if msg else type(e).__name__}))
        raise
    Path(out).write_text(json.dumps(row))


def _measure(variant: str, args: dict[str, Any], rank: int, world: int) -> dict[str, Any]:
    import torch

    from colossus.metrics import peak_rss_gib

    torch.set_num_threads(args["threads"])
    batch, seq = args["batch"], args["seq"]
    if batch % world:
        raise ValueError(f"--batch {batch} is not divisible by {world} ranks")
    local = batch // world
    total = args["steps"] + args["warmup"]
    model = _build(args["model"])
    for m in model.modules():  # no dropout: every variant must compute the same losses
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    n_params = sum(p.numel() for p in model.parameters())
    data = _data(total * batch, seq, model.config.vocab_size)
    if variant in DISTRIBUTED:
        import torch.distributed as dist

        if variant == "deepspeed":
            import deepspeed

            deepspeed.init_distributed(dist_backend="gloo")
        else:
            dist.init_process_group("gloo")

    def batch_of(s: int) -> torch.Tensor:
        rows = data[s * batch : (s + 1) * batch]
        return torch.stack(rows[rank * local : (rank + 1) * local])

    model.train()
    if variant == "pytorch":
        opt = torch.optim.AdamW(_param_groups(model), lr=LR, betas=BETAS, eps=EPS, fused=True)

        def step(ids):
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM, foreach=True)
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss

    elif variant == "chunk":
        from offload import ChunkAdamW, ChunkConfig, ChunkManager

        mgr = ChunkManager(model, ChunkConfig(offload_param_frac=1.0, offload_optim_frac=1.0))
        copt = ChunkAdamW(mgr, lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY)

        def step(ids):
            loss = mgr.module(input_ids=ids, labels=ids).loss
            mgr.backward(loss)
            mgr.clip_grad_norm_(MAX_NORM)
            copt.step()
            copt.zero_grad()
            return loss

    elif variant == "fsdp2":
        from torch.distributed.fsdp import CPUOffloadPolicy, fully_shard

        policy = CPUOffloadPolicy(pin_memory=False)
        for block in model.transformer.h:
            fully_shard(block, offload_policy=policy)
        fully_shard(model, offload_policy=policy)
        # fused=True: the fused CPU AdamW kernel accepts FSDP2's offloaded parameters (DTensors
        # whose local shards are plain CPU tensors), so this is the same kernel as ``pytorch``.
        fopt = torch.optim.AdamW(_param_groups(model), lr=LR, betas=BETAS, eps=EPS, fused=True)

        def step(ids):
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM, foreach=True)
            fopt.step()
            fopt.zero_grad(set_to_none=True)
            return loss

    elif variant == "deepspeed":
        import deepspeed

        config = {
            "train_batch_size": batch,
            "train_micro_batch_size_per_gpu": local,
            "gradient_accumulation_steps": 1,
            "gradient_clipping": MAX_NORM,
            "zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}},
            # "AdamW" + offload_optimizer -> DeepSpeedCPUAdam(adamw_mode=True); the param groups
            # below carry the per-group weight decay
            "optimizer": {
                "type": "AdamW",
                "params": {
                    "lr": LR,
                    "betas": list(BETAS),
                    "eps": EPS,
                    "weight_decay": WEIGHT_DECAY,
                },
            },
            "steps_per_print": 1 << 30,
            "wall_clock_breakdown": False,
        }
        engine, _, _, _ = deepspeed.initialize(
            model=model, model_parameters=_param_groups(model), config=config
        )

        def step(ids):
            loss = engine(input_ids=ids, labels=ids).loss
            engine.backward(loss)
            engine.step()  # clips (gradient_clipping), steps the optimizer, zeroes grads
            return loss

    else:
        raise ValueError(f"unknown variant {variant!r}")

    times: list[float] = []
    losses: list[float] = []
    for s in range(total):
        ids = batch_of(s)
        t0 = time.perf_counter()
        loss = step(ids)
        times.append(time.perf_counter() - t0)
        loss = loss.detach().float().reshape(1)
        if world > 1:  # mean over ranks = mean over the global batch (equal token counts)
            import torch.distributed as dist

            dist.all_reduce(loss)
            loss /= world
        losses.append(float(loss))
    if variant in DISTRIBUTED:
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()
    return {
        "rank": rank,
        "params": n_params,
        "times": times,
        "losses": losses,
        "peak_rss_gib": peak_rss_gib(),
        "torch_threads": torch.get_num_threads(),
    }


# ================================================================ parent (spawn, collect)
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _kill(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGKILL)  # its own session: the rank and its children
            except ProcessLookupError:
                pass
    for p in procs:
        p.wait()


def _error_line(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for ln in reversed(lines):
        head = ln.split(":", 1)[0]
        if head.endswith(("Error", "Exception", "Interrupt", "Exit")) and " " not in head:
            return ln[:300]
    return lines[-1][:300] if lines else "no output"


def _spawn(variant: str, args: dict[str, Any], ranks: int, timeout: float) -> dict[str, Any]:
    """Run ``ranks`` worker processes; return the combined row (or one with ``error``)."""
    tmp = Path(tempfile.mkdtemp(prefix=f"bench-offload-{variant}-"))
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = str(args["threads"])
    if variant == "deepspeed":
        env["DS_ACCELERATOR"] = "cpu"
    port = _free_port()
    procs, logs = [], []
    for r in range(ranks):
        renv = dict(env)
        if variant in DISTRIBUTED:
            renv.update(
                RANK=str(r),
                LOCAL_RANK=str(r),
                WORLD_SIZE=str(ranks),
                LOCAL_WORLD_SIZE=str(ranks),
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=str(port),
            )
        log = open(tmp / f"rank{r}.log", "w")  # noqa: SIM115 (closed below)
        logs.append(log)
        cmd = [sys.executable, "-m", "colossus.bench.offload", "--worker", variant]
        cmd += ["--args", json.dumps(args), "--out", str(tmp / f"rank{r}.json")]
        procs.append(
            subprocess.Popen(
                cmd, env=renv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        )
    deadline = time.monotonic() + timeout
    error = None
    try:
        while any(p.poll() is None for p in procs):
            if any(p.returncode not in (None, 0) for p in procs):
                break  # a rank died: the others would wait in a collective until gloo times out
            if time.monotonic() > deadline:
                error = f"timed out after {timeout:.0f} s"
                if variant == "deepspeed":
                    error += " (a stale lock under ~/.cache/torch_extensions can hang the build)"
                break
            time.sleep(0.2)
    finally:
        _kill(procs)
        for log in logs:
            log.close()
    outs = [
        json.loads(f.read_text()) if (f := tmp / f"rank{r}.json").exists() else None
        for r in range(ranks)
    ]
    if error is None:
        # the cause, not a symptom: a rank's own exception first, then a rank that exited by
        # itself (not killed by us after another rank failed)
        errs = [o["error"] for o in outs if o and "error" in o]
        bad = [r for r, p in enumerate(procs) if p.returncode != 0 or outs[r] is None]
        bad.sort(key=lambda r: procs[r].returncode == -signal.SIGKILL)
        if errs:
            error = errs[0]
        elif bad:
            text = (tmp / f"rank{bad[0]}.log").read_text(errors="replace")
            error = f"rank {bad[0]} exit {procs[bad[0]].returncode}: {_error_line(text)}"
        if error is not None:
            for r in bad:
                sys.stderr.write((tmp / f"rank{r}.log").read_text(errors="replace")[-4000:])
    if error is not None:
        print(f"[bench offload] {variant} failed: {error} (logs: {tmp})", file=sys.stderr)
        return {"name": variant, "ranks": ranks, "error": error}
    for f in tmp.iterdir():
        f.unlink()
    tmp.rmdir()
    n_steps = len(outs[0]["times"])
    # ranks move in lockstep (collectives); a step takes as long as its slowest rank
    per_step = [max(o["times"][s] for o in outs) for s in range(n_steps)]
    from colossus.bench.common import median

    step_s = median(per_step[args["warmup"] :])
    rss = [o["peak_rss_gib"] for o in outs]
    return {
        "name": variant,
        "ranks": ranks,
        "threads_per_rank": outs[0]["torch_threads"],
        "params": outs[0]["params"],
        "step_time_s": step_s,
        "tokens_per_s": args["batch"] * args["seq"] / step_s,
        "peak_rss_gib_max_rank": max(rss),
        "peak_rss_gib_sum_ranks": sum(rss),
        "first_loss": outs[0]["losses"][0],
        "final_loss": outs[0]["losses"][-1],
        "step_times_s": per_step,  # every step, warmup included (JSON only, not the table)
    }


def _merge_rounds(rs: list[dict[str, Any]], warmup: int, tokens: int) -> dict[str, Any]:
    """One row per variant from its rounds: step time = median of every measured step of every
    round; peak RSS = the largest; losses from the first round (every round computes the
    same ones); ``round_step_s`` keeps each round's median for the per-round ratios."""
    from colossus.bench.common import median

    bad = [r for r in rs if "error" in r]
    if bad:
        return bad[0]
    out = dict(rs[0])
    steps = [t for r in rs for t in r["step_times_s"][warmup:]]
    out["step_time_s"] = median(steps)
    out["tokens_per_s"] = tokens / out["step_time_s"]
    for k in ("peak_rss_gib_max_rank", "peak_rss_gib_sum_ranks"):
        out[k] = max(r[k] for r in rs)
    out["round_step_s"] = [r["step_time_s"] for r in rs]
    out["step_times_s"] = [r["step_times_s"] for r in rs] if len(rs) > 1 else rs[0]["step_times_s"]
    return out


def _table_row(r: dict[str, Any]) -> dict[str, Any]:
    """The printed row: no per-step lists; losses with 6 decimals so that agreement shows."""
    out = {k: v for k, v in r.items() if k not in ("step_times_s", "round_step_s")}
    for k in ("first_loss", "final_loss"):
        if isinstance(out.get(k), float):
            out[k] = f"{out[k]:.6f}"
    return out


def run(ns: argparse.Namespace) -> int:
    from colossus.bench.common import machine_info, print_table, write_json

    cores = machine_info()["cores"] or 1
    args = {
        k: getattr(ns, k)
        for k in ("model", "batch", "seq", "steps", "warmup", "variants", "ranks", "threads")
    }
    if ns.steps < 1 or ns.warmup < 0 or ns.ranks < 1 or ns.rounds < 1:
        raise SystemExit(
            "bench offload: need --steps >= 1, --warmup >= 0, --ranks >= 1, --rounds >= 1"
        )
    if ns.batch % ns.ranks:
        raise SystemExit(f"bench offload: --batch {ns.batch} must divide by --ranks {ns.ranks}")
    load_before = os.getloadavg()
    runs: dict[str, list[dict[str, Any]]] = {v: [] for v in ns.variants}
    for rnd in range(ns.rounds):
        k = rnd % len(ns.variants)  # rotated: no variant always runs first or last
        for v in ns.variants[k:] + ns.variants[:k]:
            ranks = ns.ranks if v in DISTRIBUTED else 1
            # N ranks on C cores: C // N threads each so they do not oversubscribe the cores
            threads = ns.threads or max(1, cores // ranks)
            print(
                f"[bench offload] round {rnd + 1}/{ns.rounds}: running {v} x{ranks} ...",
                file=sys.stderr,
                flush=True,
            )
            runs[v].append(_spawn(v, {**args, "threads": threads}, ranks, ns.timeout))
    rows = [_merge_rounds(runs[v], ns.warmup, ns.batch * ns.seq) for v in ns.variants]

    ok = [r for r in rows if "error" not in r]
    base = next((r for r in ok if r["name"] == "pytorch"), None)
    for r in ok:
        r["time_vs_pytorch"] = None
        if base:  # per round, then the median: a slow round slows both sides of its ratio
            from colossus.bench.common import median

            ratios = [a / b for a, b in zip(r["round_step_s"], base["round_step_s"])]
            r["time_vs_pytorch"] = median(ratios)
        r["rss_vs_pytorch"] = (
            r["peak_rss_gib_sum_ranks"] / base["peak_rss_gib_sum_ranks"] if base else None
        )
    ref = base or (ok[0] if ok else None)
    warnings = []
    for r in ok:
        d = abs(r["first_loss"] - ref["first_loss"])
        if not math.isfinite(r["first_loss"]) or d > LOSS_TOL:
            warnings.append(
                f"WARNING: {r['name']} step-1 loss {r['first_loss']:.6f} differs from "
                f"{ref['name']} {ref['first_loss']:.6f} by {d:.2e} (> {LOSS_TOL}): not the same work"
            )
    order = [
        "name",
        "ranks",
        "threads_per_rank",
        "params",
        "step_time_s",
        "tokens_per_s",
        "peak_rss_gib_max_rank",
        "peak_rss_gib_sum_ranks",
        "time_vs_pytorch",
        "rss_vs_pytorch",
        "first_loss",
        "final_loss",
        "error",
    ]
    rows = [
        {k: r[k] for k in order if k in r} | {k: r[k] for k in r if k not in order} for r in rows
    ]
    print_table(
        f"bench offload: {ns.model}, batch {ns.batch} x seq {ns.seq}, median of {ns.steps} steps "
        f"after {ns.warmup} warmup, {ns.ranks} rank(s) for chunk/fsdp2/deepspeed, "
        f"{ns.rounds} round(s)",
        [_table_row(r) for r in rows],
    )
    for w in warnings:
        print(w, file=sys.stderr)
    # other work on the box skews the times: the 1-minute load average before and after says so
    extra = {"load_avg_1m_before": load_before[0], "load_avg_1m_after": os.getloadavg()[0]}
    extra["rounds"] = ns.rounds
    write_json(ns.json, "offload", rows, args | extra | {"loss_warnings": warnings})
    return 0


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--worker", required=True, choices=VARIANTS)
    ap.add_argument("--args", required=True)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    _worker(a.worker, json.loads(a.args), a.out)
