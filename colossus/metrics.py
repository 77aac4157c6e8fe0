"""What a user sees of a run: a progress bar (step, loss, tokens/s, LR, peak RSS), one JSON line
per logged step in ``RUN_DIR/metrics.jsonl``, a summary table and ``RUN_DIR/loss.png``.

Only rank 0 prints and writes; other ranks get a silent logger.
"""

from __future__ import annotations

import json
import resource
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table


def peak_rss_gib() -> float:
    """Peak resident set size of this process so far (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


class RunLogger:
    def __init__(
        self,
        run_dir: Path,
        total_steps: int,
        enabled: bool,
        progress: bool,
        plot: bool,
        start_step: int = 0,
    ):
        self.run_dir = run_dir
        self.enabled = enabled
        self.plot = plot
        self.total = total_steps
        self.console = Console(stderr=True)
        self.records: list[dict[str, Any]] = []
        self._progress: Progress | None = None
        self._task = None
        self._t0 = time.perf_counter()
        if not enabled:
            return
        self.metrics_path = run_dir / "metrics.jsonl"
        if start_step == 0:
            self.metrics_path.write_text("")
        else:  # resumed: keep the records of steps already done, drop any past the checkpoint
            kept = (
                [r for r in read_metrics(self.metrics_path) if r.get("step", 0) <= start_step]
                if self.metrics_path.exists()
                else []
            )
            self.metrics_path.write_text("".join(json.dumps(r) + "\n" for r in kept))
            self.records = kept
        if progress and self.console.is_terminal:
            self._progress = Progress(
                TextColumn("[bold]train"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[info]}"),
                TimeRemainingColumn(),
                console=self.console,
            )
            self._progress.start()
            self._task = self._progress.add_task(
                "train", total=total_steps, completed=start_step, info=""
            )
        self._plain_progress = progress and self._progress is None

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {k: (round(v, 6) if isinstance(v, float) else v) for k, v in record.items()}
        self.records.append(record)
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if "eval_loss" in record:
            msg = f"eval step {record['step']}: loss {record['eval_loss']:.4f}  ppl {record['eval_ppl']:.2f}"
            (self._progress.console if self._progress else self.console).print(msg)
            return
        info = (
            f"loss {record['loss']:.4f}  {record['tokens_per_s']:,.0f} tok/s  "
            f"lr {record['lr']:.2e}  rss {record['peak_rss_gib']:.2f} GiB"
        )
        tiers = [
            (k[4:-4], v)
            for k, v in record.items()
            if k.startswith("mem_") and k.endswith("_gib") and "peak" not in k and "plan" not in k
        ]
        if tiers:  # model state per tier (strategy chunk)
            info += "  " + " ".join(f"{t} {v:.2f}" for t, v in tiers) + " GiB"
        if self._progress is not None:
            self._progress.update(self._task, completed=record["step"], info=info)
        elif self._plain_progress:
            self.console.print(f"step {record['step']}/{self.total}  {info}", highlight=False)

    def close(self, summary: dict[str, Any]) -> None:
        if not self.enabled:
            return
        if self._progress is not None:
            self._progress.stop()
        table = Table(title=f"run summary ({self.run_dir})")
        table.add_column("metric")
        table.add_column("value", justify="right")
        for k, v in summary.items():
            table.add_row(k, f"{v:.4g}" if isinstance(v, float) else str(v))
        self.console.print(table)
        if self.plot:
            self.save_loss_plot(self.run_dir / "loss.png")

    def save_loss_plot(self, path: Path) -> None:
        train = [r for r in self.records if "loss" in r]
        evals = [r for r in self.records if "eval_loss" in r]
        if not train:
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4))
        ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss", lw=1)
        if evals:
            ax.plot(
                [r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", label="eval loss"
            )
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss")
        ax.set_title(self.run_dir.name)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
