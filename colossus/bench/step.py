"""``colossus bench step``: tokens/s and peak RSS of one model under a strategy, next to a plain
PyTorch loop doing the same work (forward, backward, clip, fused AdamW) on the same data.

Each variant runs in its own process so that peak RSS (ru_maxrss) belongs to that variant alone.
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

MODELS: dict[str, dict[str, Any]] = {
    # GPT-2 small's shape (124M parameters); the baseline model of the offload benches.
    "gpt2-124m": {
        "arch": "gpt2",
        "config": {
            "n_layer": 12,
            "n_embd": 768,
            "n_head": 12,
            "vocab_size": 50257,
            "n_positions": 1024,
        },
    },
    "gpt2-tiny": {
        "arch": "gpt2",
        "config": {
            "n_layer": 4,
            "n_embd": 256,
            "n_head": 4,
            "vocab_size": 4096,
            "n_positions": 256,
        },
    },
}
VARIANTS = ("pytorch", "colossus-none", "colossus-ddp")


def add_parser(bsub, fmt) -> None:
    p = bsub.add_parser(
        "step",
        help="tokens/s and peak RSS of one training step vs plain PyTorch",
        formatter_class=fmt,
        epilog=(
            "examples:\n"
            "  colossus bench step --model gpt2-124m --batch 4 --seq 128 --steps 8 --json step.json\n"
            "  colossus bench step --model gpt2-tiny --variants pytorch colossus-none colossus-ddp\n"
        ),
    )
    p.add_argument("--model", choices=sorted(MODELS), default="gpt2-124m")
    p.add_argument("--batch", type=int, default=4, help="global batch (sequences per step)")
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--steps", type=int, default=8, help="measured steps (after --warmup)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=["pytorch", "colossus-none"])
    p.add_argument(
        "--ddp-ranks", type=int, default=2, help="processes for colossus-ddp (gloo on CPU)"
    )
    p.add_argument("--json", help="write the results here")
    p.set_defaults(bench_fn=run)


def _build(model_name: str, seed: int = 0):
    import torch

    from colossus.config import ModelConfig
    from colossus.models import build_model

    torch.manual_seed(seed)
    spec = MODELS[model_name]
    return build_model(ModelConfig(arch=spec["arch"], config=spec["config"]))


def _data(n: int, seq: int, vocab: int):
    import torch

    g = torch.Generator().manual_seed(1234)
    return [torch.randint(0, vocab, (seq,), generator=g) for _ in range(n)]


def _worker(variant: str, args: dict[str, Any], out: str) -> None:
    import torch

    from colossus.metrics import peak_rss_gib

    total = args["steps"] + args["warmup"]
    model = _build(args["model"])
    n_params = sum(p.numel() for p in model.parameters())
    data = _data(total * args["batch"], args["seq"], model.config.vocab_size)
    times: list[float] = []
    if variant == "pytorch":
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01, fused=True)
        model.train()
        for s in range(total):
            t0 = time.perf_counter()
            ids = torch.stack(data[s * args["batch"] : (s + 1) * args["batch"]])
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
            opt.step()
            opt.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - t0)
    else:
        from colossus import Trainer, TrainingConfig

        world = int(os.environ.get("WORLD_SIZE", "1"))
        cfg = TrainingConfig(
            name="bench-step",
            optim={"lr": 1e-4},
            schedule={"name": "constant"},
            strategy={"name": "ddp" if variant == "colossus-ddp" else "none"},
            train={
                "max_steps": total,
                "batch_size": args["batch"] // world,
                "run_dir": tempfile.mkdtemp(prefix="bench-step-"),
            },
            checkpoint={"save_final": False},
            logging={"progress": False, "plot": False},
        )

        class Clock:
            last = None

            def on_step_end(self, trainer, record):
                now = time.perf_counter()
                if self.last is not None:
                    times.append(now - self.last)
                self.last = now

        clock = Clock()
        trainer = Trainer(model, cfg, train_dataset=data, callbacks=[clock])
        clock.last = time.perf_counter()
        trainer.train()
        if trainer.ctx.rank != 0:
            return
    measured = times[args["warmup"] :]
    from colossus.bench.common import median

    step_s = median(measured)
    row = {
        "name": variant,
        "params": n_params,
        "step_time_s": step_s,
        "tokens_per_s": args["batch"] * args["seq"] / step_s,
        "peak_rss_gib": peak_rss_gib(),
    }
    Path(out).write_text(json.dumps(row))


def run(ns: argparse.Namespace) -> int:
    from colossus.bench.common import print_table, write_json

    args = {
        k: getattr(ns, k)
        for k in ("model", "batch", "seq", "steps", "warmup", "variants", "ddp_ranks")
    }
    rows = []
    for v in ns.variants:
        with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
            out = f.name
        worker = [
            "-m",
            "colossus.bench.step",
            "--worker",
            v,
            "--args",
            json.dumps(args),
            "--out",
            out,
        ]
        if v == "colossus-ddp":
            cmd = [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                f"--nproc_per_node={ns.ddp_ranks}",
                *worker,
            ]
        else:
            cmd = [sys.executable, *worker]
        print(f"[bench step] running {v} ...", file=sys.stderr, flush=True)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.stderr.write(proc.stdout[-5000:] + proc.stderr[-5000:])
            raise SystemExit(f"bench step: variant {v} failed (exit {proc.returncode})")
        row = json.loads(Path(out).read_text())
        os.unlink(out)
        if v == "colossus-ddp":
            row["name"] = f"colossus-ddp x{ns.ddp_ranks}"
            row["peak_rss_gib_note"] = "rank 0"
        rows.append(row)
    base = next((r for r in rows if r["name"] == "pytorch"), None)
    for r in rows:
        r.pop("peak_rss_gib_note", None)
        if base:
            r["time_vs_pytorch"] = r["step_time_s"] / base["step_time_s"]
            r["rss_vs_pytorch"] = r["peak_rss_gib"] / base["peak_rss_gib"]
    print_table(
        f"bench step: {ns.model}, batch {ns.batch} x seq {ns.seq}, median of {ns.steps} steps", rows
    )
    write_json(ns.json, "step", rows, args)
    return 0


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--worker", required=True)
    ap.add_argument("--args", required=True)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    _worker(a.worker, json.loads(a.args), a.out)
