"""What a tensor-parallel parameter holds: its logical (full) shape, the dimension it is split
along and over which group. Kept in one place (``param.tp_shard``) because clipping, optimizers
with per-parameter norms and checkpoint export all ask the same question.

Example::

    >>> import torch
    >>> from parallel.tensor.sharding import TPShard, mark_sharded, tp_shard
    >>> w = torch.nn.Parameter(torch.zeros(4, 8))
    >>> mark_sharded(w, full_shape=(8, 8), dim=0, group=None, rank=0, world=2)
    >>> tp_shard(w)
    TPShard(full_shape=(8, 8), dim=0, rank=0, world=2, replicas=1)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from parallel import comm


@dataclass(frozen=True)
class TPShard:
    """This rank holds block ``rank`` of ``world`` equal blocks of the full tensor along ``dim``.

    ``replicas`` counts the ranks of the tensor-parallel group holding the same elements (1 for a
    plain split; 2D layouts can replicate a split tensor over a grid axis): a global norm adds
    each element once by weighting its square with ``1 / replicas``."""

    full_shape: tuple[int, ...]
    dim: int
    rank: int
    world: int
    replicas: int = 1
    group: Any = field(default=None, compare=False, repr=False)


def mark_sharded(
    p: torch.Tensor,
    full_shape: tuple[int, ...],
    dim: int,
    group: Any,
    rank: int,
    world: int,
    replicas: int = 1,
) -> None:
    p.tp_shard = TPShard(tuple(full_shape), dim, rank, world, replicas, group)


def tp_shard(p: torch.Tensor) -> TPShard | None:
    """The split of ``p``, or None for a parameter every tensor-parallel rank holds whole."""
    return getattr(p, "tp_shard", None)


def shard_rows(full: torch.Tensor, dim: int, rank: int, world: int) -> torch.Tensor:
    """Block ``rank`` of ``world`` along ``dim`` (a copy, so the full tensor can be freed)."""
    if full.shape[dim] % world:
        raise ValueError(f"dim {dim} of size {full.shape[dim]} is not divisible by {world}")
    return full.chunk(world, dim=dim)[rank].clone().contiguous()


def gather_full(p: torch.Tensor, like: torch.Tensor | None = None) -> torch.Tensor:
    """The full tensor of a sharded parameter (collective over its group), else ``p`` itself.
    ``like``: take the split from that parameter (to gather ``param.grad``, say)."""
    info = tp_shard(like if like is not None else p)
    if info is None or info.world == 1:
        return p.detach()
    if info.dim < 0:
        raise ValueError(
            "this parameter is a grid (2d / 2.5d / 3d) shard: gather it with its layer's "
            "full_weight() / full_bias()"
        )
    return comm.all_gather(p.detach(), dim=info.dim, group=info.group)
