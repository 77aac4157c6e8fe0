"""Large-batch experiment: does LAMB keep a 16x larger batch as sample-efficient as batch B?

Masked-LM with the tiny BERT of ``recipes/bert-tiny-lamb.yaml`` on the built-in corpus, at batch
B and 16B with the same number of samples seen, AdamW vs LAMB; the learning rate follows the
square-root scaling rule from B to 16B (``colossus.optim.scale_lr``), times a small grid; warmup
covers the same number of samples at both batch sizes, then linear decay to 0. For every run:
validation loss (fixed masks) at fixed sample counts, and the steps / samples it needs to reach a
target loss (by default the best final loss at batch B, plus 2 %). Then a LARS run: a small CNN on
procedurally generated shapes (synthetic, no download), SGD-momentum vs LARS, batch 32 vs 512.

    python examples/large_batch_lamb.py --out docs/large-batch.json --plot docs/large-batch.png

Time-boxed for a CPU box: about ten minutes on 2 cores with the defaults.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from colossus.config import OptimConfig, TrainingConfig
from colossus.data import build_data
from colossus.models import build_model
from colossus.optim import build_optimizer, scale_lr, scale_warmup

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "bert-tiny-lamb.yaml"


def lr_lambda(warmup: int, total: int):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))

    return f


@torch.no_grad()
def evaluate(model, val_batches) -> float:
    model.eval()
    losses = [model(**b).loss.item() for b in val_batches]
    model.train()
    return sum(losses) / len(losses)


def mlm_run(cfg, data, val_batches, name, lr, batch, samples, warmup_samples, evals):
    torch.manual_seed(0)
    model = build_model(cfg.model, vocab_size=len(data.tokenizer), tokenizer=data.tokenizer)
    model.train()
    # flat=False: the recorded numbers (docs/benchmarks.md) were taken on the per-tensor path
    # (flat buffers, the trainer's default, agree up to fp32 summation order)
    per_tensor = {} if name == "adamw" else {"flat": False}
    opt = build_optimizer(
        model, OptimConfig(name=name, lr=lr, weight_decay=0.01, **per_tensor), torch.device("cpu")
    )
    steps = samples // batch
    warmup = scale_warmup(warmup_samples, 1, batch)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(warmup, steps))
    g = torch.Generator().manual_seed(1)  # the same sample order for every run
    order = torch.randperm(len(data.train), generator=g)
    curve = [(0, evaluate(model, val_batches))]
    every = samples // evals
    t0 = time.time()
    for step in range(steps):
        idx = order[(step * batch + torch.arange(batch)) % len(order)]
        torch.manual_seed(1000 + step)  # masking
        b = data.collator([data.train[int(i)] for i in idx])
        loss = model(**b).loss
        if not torch.isfinite(loss):
            curve.append(((step + 1) * batch, float("nan")))
            break
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        seen = (step + 1) * batch
        if seen % every == 0:
            curve.append((seen, evaluate(model, val_batches)))
            print(
                f"  {name} B={batch} lr={lr:.1e} {seen} samples: val {curve[-1][1]:.3f}", flush=True
            )
    return {
        "optim": name,
        "lr": lr,
        "batch": batch,
        "steps": steps,
        "curve": curve,
        "time_s": time.time() - t0,
    }


# ------------------------------------------------------------------ LARS: synthetic shapes
def shapes_dataset(n: int, seed: int, size: int = 16):
    """Images of 4 classes (horizontal bar, vertical bar, square outline, diagonal) at random
    positions and sizes, with Gaussian noise."""
    g = torch.Generator().manual_seed(seed)
    x = torch.zeros(n, 1, size, size)
    y = torch.randint(0, 4, (n,), generator=g)
    for i in range(n):
        a = int(torch.randint(2, 7, (1,), generator=g))
        r, c = (int(v) for v in torch.randint(0, size - a, (2,), generator=g))
        k = int(y[i])
        if k == 0:
            x[i, 0, r + a // 2, c : c + a] = 1
        elif k == 1:
            x[i, 0, r : r + a, c + a // 2] = 1
        elif k == 2:
            x[i, 0, r, c : c + a] = x[i, 0, r + a - 1, c : c + a] = 1
            x[i, 0, r : r + a, c] = x[i, 0, r : r + a, c + a - 1] = 1
        else:
            for j in range(a):
                x[i, 0, r + j, c + j] = 1
    x += 0.3 * torch.randn(x.shape, generator=g)
    return x, y


def cnn():
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 16, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(16, 32, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.MaxPool2d(2),
        torch.nn.Flatten(),
        torch.nn.Linear(32 * 16, 4),
    )


def lars_run(name, lr, batch, samples, data, val):
    torch.manual_seed(0)
    model = cnn()
    if name == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    else:
        opt = build_optimizer(
            model,
            OptimConfig(name="lars", lr=lr, weight_decay=5e-4, trust_coefficient=0.02, flat=False),
            torch.device("cpu"),
        )
    steps = samples // batch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(scale_warmup(1024, 1, batch), steps))
    x, y = data
    g = torch.Generator().manual_seed(2)
    order = torch.randperm(len(x), generator=g)
    curve = []
    for step in range(steps):
        idx = order[(step * batch + torch.arange(batch)) % len(x)]
        loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()
        if ((step + 1) * batch) % (samples // 16) == 0:
            with torch.no_grad():
                acc = (model(val[0]).argmax(1) == val[1]).float().mean().item()
            curve.append(((step + 1) * batch, acc))
    return {"optim": name, "lr": lr, "batch": batch, "steps": steps, "curve": curve}


def first_reach(curve, batch, target, higher=False):
    for seen, v in curve:
        if (v >= target) if higher else (v <= target):
            return {"samples": seen, "steps": seen // batch}
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=16, help="small batch B (the large is 16B)")
    ap.add_argument("--samples", type=int, default=8192, help="samples seen by every run")
    ap.add_argument("--evals", type=int, default=8, help="validation points per run")
    ap.add_argument("--adamw-lrs", type=float, nargs="+", default=[5e-4, 1e-3, 2e-3])
    ap.add_argument("--lamb-lrs", type=float, nargs="+", default=[1e-3, 2e-3, 4e-3])
    ap.add_argument("--target", type=float, help="validation loss target (default: see above)")
    ap.add_argument(
        "--large-only",
        action="store_true",
        help="only the 16B runs of the grids, no LARS part (extend a grid; --target needed)",
    )
    ap.add_argument("--out", default="large-batch.json")
    ap.add_argument("--plot", default="large-batch.png")
    args = ap.parse_args()
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))

    cfg = TrainingConfig.from_yaml(RECIPE)
    data = build_data(cfg.data, task="masked_lm")
    torch.manual_seed(123)
    val_idx = list(range(min(64, len(data.eval))))
    val_batches = [
        data.collator([data.eval[i] for i in val_idx[k : k + 16]]) for k in (0, 16, 32, 48)
    ]
    B, big = args.batch, 16 * args.batch
    warmup_samples = args.samples // 10
    runs = []
    for name, lrs in (("adamw", args.adamw_lrs), ("lamb", args.lamb_lrs)):
        for base_lr in lrs:
            for batch in (big,) if args.large_only else (B, big):
                lr = scale_lr(base_lr, B, batch, "sqrt")
                r = mlm_run(
                    cfg,
                    data,
                    val_batches,
                    name,
                    lr,
                    batch,
                    args.samples,
                    warmup_samples,
                    args.evals,
                )
                r["base_lr"] = base_lr
                runs.append(r)
                print(
                    f"{name:5s} B={batch:4d} lr={lr:.2e}: final val {r['curve'][-1][1]:.3f} "
                    f"({r['time_s']:.0f} s)",
                    flush=True,
                )
    small_final = [r["curve"][-1][1] for r in runs if r["batch"] == B]
    target = args.target or 1.02 * min(v for v in small_final if math.isfinite(v))
    summary = []
    for name in ("adamw", "lamb"):
        for batch in (B, big):
            cand = [r for r in runs if r["optim"] == name and r["batch"] == batch]
            if not cand:
                continue
            best = min(
                cand, key=lambda r: r["curve"][-1][1] if math.isfinite(r["curve"][-1][1]) else 1e9
            )
            hit = first_reach(best["curve"], batch, target)
            summary.append(
                {
                    "optim": name,
                    "batch": batch,
                    "best_lr": best["lr"],
                    "final_val_loss": best["curve"][-1][1],
                    "steps_to_target": hit and hit["steps"],
                    "samples_to_target": hit and hit["samples"],
                    "total_steps": best["steps"],
                }
            )
    for s in summary:
        print(s)
    if args.large_only:
        Path(args.out).write_text(
            json.dumps(
                {"target_val_loss": target, "mlm_summary": summary, "mlm_runs": runs}, indent=1
            )
        )
        return

    # LARS on synthetic shapes
    train = shapes_dataset(8192, 0)
    val = shapes_dataset(1024, 1)
    lars_runs = []
    for name, grid in (("sgd", [0.05, 0.1]), ("lars", [1.0, 2.0])):
        for base_lr in grid:
            for batch in (32, 512):
                lr = scale_lr(base_lr, 32, batch, "linear" if name == "sgd" else "sqrt")
                r = lars_run(name, lr, batch, 8192, train, val)
                r["base_lr"] = base_lr
                lars_runs.append(r)
                print(
                    f"{name:4s} B={batch:3d} lr={lr:.3g}: final acc {r['curve'][-1][1]:.3f}",
                    flush=True,
                )
    lars_summary = []
    for name in ("sgd", "lars"):
        for batch in (32, 512):
            cand = [r for r in lars_runs if r["optim"] == name and r["batch"] == batch]
            best = max(cand, key=lambda r: r["curve"][-1][1])
            hit = first_reach(best["curve"], batch, 0.95, higher=True)
            lars_summary.append(
                {
                    "optim": name,
                    "batch": batch,
                    "best_lr": best["lr"],
                    "final_val_acc": best["curve"][-1][1],
                    "steps_to_95pct": hit and hit["steps"],
                    "samples_to_95pct": hit and hit["samples"],
                }
            )
    for s in lars_summary:
        print(s)
    Path(args.out).write_text(
        json.dumps(
            {
                "target_val_loss": target,
                "mlm_summary": summary,
                "mlm_runs": runs,
                "lars_summary": lars_summary,
                "lars_runs": lars_runs,
                "args": vars(args),
            },
            indent=1,
        )
    )
    plot(runs, lars_runs, summary, lars_summary, target, B, big, args.plot)


def plot(runs, lars_runs, summary, lars_summary, target, B, big, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(12, 4.5))
    colors = {"adamw": "tab:blue", "lamb": "tab:red", "sgd": "tab:green", "lars": "tab:purple"}
    for s in summary:
        r = next(
            r
            for r in runs
            if (r["optim"], r["batch"], r["lr"]) == (s["optim"], s["batch"], s["best_lr"])
        )
        xs, ys = zip(*r["curve"])
        ax[0].plot(
            xs,
            ys,
            color=colors[s["optim"]],
            ls="-" if s["batch"] == B else "--",
            marker="o",
            ms=3,
            label=f"{s['optim']} batch {s['batch']} (lr {s['best_lr']:.1e})",
        )
    ax[0].axhline(target, color="gray", lw=0.8, ls=":", label=f"target {target:.2f}")
    ax[0].set(xlabel="samples seen", ylabel="validation MLM loss", title="tiny BERT masked-LM")
    ax[0].legend(fontsize=8)
    for s in lars_summary:
        r = next(
            r
            for r in lars_runs
            if (r["optim"], r["batch"], r["lr"]) == (s["optim"], s["batch"], s["best_lr"])
        )
        xs, ys = zip(*r["curve"])
        ax[1].plot(
            xs,
            ys,
            color=colors[s["optim"]],
            ls="-" if s["batch"] == 32 else "--",
            marker="o",
            ms=3,
            label=f"{s['optim']} batch {s['batch']} (lr {s['best_lr']:.2g})",
        )
    ax[1].set(xlabel="samples seen", ylabel="validation accuracy", title="CNN on synthetic shapes")
    ax[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
