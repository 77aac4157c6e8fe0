"""Process set-up from the launcher's environment (torchrun, accelerate launch, mpirun-style).

colossus has no launcher of its own: under ``torchrun`` / ``accelerate launch`` the variables
RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT are set and we join that group; without
them we are one process. We read the environment ourselves rather than through accelerate's
``PartialState`` because PartialState on a CPU box only starts a process group when it detects
an MPI/CCL launch (and resets thread counts), while torchrun's plain env:// works everywhere.

Example::

    from colossus.distributed import init_distributed
    ctx = init_distributed()          # one process: rank 0 of 1, device cuda or cpu
    print(ctx.rank, ctx.world_size, ctx.device)
"""

from __future__ import annotations

import atexit
import contextlib
import os
from dataclasses import dataclass
from datetime import timedelta

import psutil
import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device
    backend: str | None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(*names: str, default: int) -> int:
    for n in names:
        v = os.environ.get(n)
        if v not in (None, ""):
            return int(v)
    return default


def init_distributed(backend: str = "auto", timeout_s: float = 600.0) -> DistContext:
    """Join the launcher's process group (idempotent); a single process when none was launched."""
    world = _env_int("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", default=1)
    rank = _env_int("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", default=0)
    local_rank = _env_int("LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", default=0)
    local_world = _env_int("LOCAL_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE", default=world)
    # accelerate's --cpu launcher exports ACCELERATE_USE_CPU; honour it even when CUDA exists.
    use_cuda = torch.cuda.is_available() and os.environ.get(
        "ACCELERATE_USE_CPU", ""
    ).lower() not in (
        "1",
        "true",
        "yes",
    )
    device = (
        torch.device("cuda", local_rank % torch.cuda.device_count())
        if use_cuda
        else torch.device("cpu")
    )
    if use_cuda:
        torch.cuda.set_device(device)
    elif "OMP_NUM_THREADS" not in os.environ and local_world > 1:
        # N CPU processes on one box: split the cores, or they thrash each other.
        cores = psutil.cpu_count(logical=False) or os.cpu_count() or 1
        torch.set_num_threads(max(1, cores // local_world))

    if world > 1 and not dist.is_initialized():
        if backend == "auto":
            backend = "nccl" if use_cuda else "gloo"
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29500")
        dist.init_process_group(
            backend=backend,
            rank=rank,
            world_size=world,
            timeout=timedelta(seconds=timeout_s),
            **({"device_id": device} if use_cuda else {}),
        )
        atexit.register(_shutdown)
    active = dist.get_backend() if dist.is_initialized() else None
    return DistContext(rank, world, local_rank, local_world, device, active)


def _shutdown() -> None:
    """At exit: meet the other ranks, then tear the process group down. A process that exits
    with its group alive destroys gloo's threads during interpreter teardown, and one whose peer
    is still finishing the last collective aborts there ("terminate called without an active
    exception": exit code -6, which torchrun reports as a failed run). The meeting is bounded
    (gloo's monitored barrier) so a rank that crashed cannot hang the others' exit."""
    if not dist.is_initialized():
        return
    with contextlib.suppress(Exception):
        if dist.get_backend() == "gloo":
            dist.monitored_barrier(timeout=timedelta(seconds=60))
    with contextlib.suppress(Exception):
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """Mean of ``t`` over all ranks (a copy; ``t`` itself is unchanged)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return t.detach().clone()
    out = t.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out / dist.get_world_size()
