"""A gloo launcher for distributed tests: ``spawn(fn, world, out_dir, *args)`` runs ``fn(*args)``
on ``world`` CPU ranks (``torch.multiprocessing.spawn`` on a free port) and returns each rank's
return value; a failing rank's traceback is raised in the test."""

from __future__ import annotations

import os
import socket
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, fn: Callable, out: str, args: tuple) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        res = fn(*args)
        torch.save(res, Path(out) / f"rank{rank}.pt")
        # every rank done before any tears down: a rank destroying its group while a peer's
        # last (async) collective is still in flight aborted that peer once in CI
        # ("terminate called without an active exception", SIGABRT, no Python error)
        dist.barrier()
    except BaseException:
        (Path(out) / f"rank{rank}.err").write_text(traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()


def spawn(fn: Callable, world: int, out: Path, *args: Any) -> list[Any]:
    """Run ``fn(*args)`` on ``world`` gloo ranks; returns each rank's return value."""
    out.mkdir(parents=True, exist_ok=True)
    try:
        torch.multiprocessing.spawn(
            _entry, args=(world, free_port(), fn, str(out), args), nprocs=world, join=True
        )
    except Exception as e:
        errs = "\n".join(p.read_text() for p in sorted(out.glob("rank*.err")))
        raise AssertionError(f"worker failed:\n{errs}") from e
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(world)]
