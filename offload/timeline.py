"""Memory timeline of one training step as a PNG: bytes per tier over time, NVMe I/O marks.

The data comes from :meth:`offload.ChunkManager.record_timeline` (every accounting change of
every tier, and every NVMe request's start / end). matplotlib is imported only here.

Example::

    >>> import tempfile, torch
    >>> from offload import ChunkAdamW, ChunkConfig, ChunkManager
    >>> from offload.timeline import plot_timeline
    >>> mgr = ChunkManager(torch.nn.Linear(8, 8), ChunkConfig(chunk_size=32))
    >>> opt = ChunkAdamW(mgr)
    >>> _ = mgr.record_timeline(True)
    >>> mgr.backward(mgr.module(torch.ones(2, 8)).sum()); _ = opt.step(); opt.zero_grad()
    >>> data = mgr.record_timeline(False)
    >>> sorted(data["tiers"])
    ['device', 'host']
    >>> plot_timeline(data, tempfile.mkdtemp() + "/memory.png").suffix
    '.png'
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

GIB = 2**30


def plot_timeline(data: dict[str, Any], path: str | Path, title: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t0 = data["t0"]
    io = data.get("io", [])
    fig, (ax, ax_io) = plt.subplots(
        2, 1, figsize=(9, 5), sharex=True, gridspec_kw={"height_ratios": [4, 1]}
    )
    end = max([t for pts in data["tiers"].values() for t, _ in pts] + [b for _, b, *_ in io] + [t0])
    peak = max([b for pts in data["tiers"].values() for _, b in pts] + [1])
    unit, scale = ("GiB", GIB) if peak >= GIB else ("MiB", 2**20)
    for name, points in data["tiers"].items():
        if not points:
            continue
        points = [*points, (end, points[-1][1])]  # hold the last value to the end of the step
        xs = [t - t0 for t, _ in points]
        ys = [b / scale for _, b in points]
        ax.step(xs, ys, where="post", label=f"{name} (peak {max(ys):.3g} {unit})", lw=1.2)
    ax.set_ylabel(f"accounted bytes ({unit})")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right", fontsize=8)
    read = sum(n for *_, w, n in io if w == "read")
    written = sum(n for *_, w, n in io if w == "write")
    ax.set_title(
        title
        or f"memory per tier over one step; NVMe read {read / 2**20:.1f} MiB, "
        f"written {written / 2**20:.1f} MiB"
    )
    for row, kind, color in ((1, "read", "tab:blue"), (0, "write", "tab:red")):
        spans = [(a - t0, b - a) for a, b, w, _ in io if w == kind]
        if spans:
            ax_io.broken_barh(spans, (row, 0.8), color=color, alpha=0.5)
    ax_io.set_yticks([0.4, 1.4], ["write", "read"])
    ax_io.set_xlabel("seconds into the step")
    ax_io.set_ylabel("NVMe I/O")
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
