"""Shared pieces of ``colossus bench``: machine description, the printed table, the JSON file.

JSON layout: ``{"bench": NAME, "machine": {...}, "args": {...}, "rows": [{"name": ..., <metric>: value}]}``
with units in metric names (``step_time_s``, ``peak_rss_gib``, ``tokens_per_s``)."""

from __future__ import annotations

import json
import os
import platform
import statistics
from pathlib import Path
from typing import Any

import psutil
import torch
from rich.console import Console
from rich.table import Table


def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {
        "cores": psutil.cpu_count(logical=False) or os.cpu_count(),
        "logical_cores": os.cpu_count(),
        "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "cpu": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    return info


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def print_table(title: str, rows: list[dict[str, Any]]) -> None:
    cols: list[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols]
    table = Table(title=title)
    for c in cols:
        table.add_column(c, justify="left" if c == "name" else "right", no_wrap=True)
    for r in rows:
        table.add_row(*[_fmt(r.get(c)) for c in cols])
    # a pipe or CI log is not a terminal: rich would wrap at 80 columns and cut the names
    console = Console()
    if not console.is_terminal:
        console = Console(width=200)
    console.print(table)


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.4g}"
    return str(v)


def write_json(
    path: str | Path | None, bench: str, rows: list[dict[str, Any]], args: dict[str, Any]
) -> None:
    if not path:
        return
    doc = {"bench": bench, "machine": machine_info(), "args": args, "rows": rows}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(doc, indent=1) + "\n")
