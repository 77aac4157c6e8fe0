"""The four autograd-aware tensor-parallel mappings of Megatron-LM (Shoeybi et al. 1909.08053,
section 3): each is a collective in forward and its adjoint in backward.

=====================  ======================  ===========================
function               forward                 backward
=====================  ======================  ===========================
``copy_to_tp``         identity                all-reduce (sum)
``reduce_from_tp``     all-reduce (sum)        identity
``gather_from_tp``     all-gather along dim    keep this rank's slice
``scatter_to_tp``      keep this rank's slice  all-gather along dim
=====================  ======================  ===========================

Hand-written ``torch.autograd.Function``s rather than ``torch.distributed.nn.functional``
because every collective must go through :mod:`parallel.comm` (counted per named group), and
because the reduce's backward is an identity (``dist.nn.all_reduce`` all-reduces the gradient
again, which is wrong for this use). A group of one rank makes every mapping an identity.

Example (a world of one)::

    >>> import torch
    >>> from parallel.tensor.mappings import copy_to_tp, reduce_from_tp
    >>> x = torch.ones(2, requires_grad=True)
    >>> reduce_from_tp(copy_to_tp(x, None), None).sum().backward()
    >>> x.grad
    tensor([1., 1.])
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from parallel import comm


def group_size(group: Any) -> int:
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


def group_rank(group: Any) -> int:
    if not (dist.is_available() and dist.is_initialized()):
        return 0
    return dist.get_rank(group)


def _all_reduce(x: torch.Tensor, group: Any) -> torch.Tensor:
    out = x.clone()  # never reduce a tensor autograd may still hold
    comm.all_reduce(out, group=group)
    return out


def _split(x: torch.Tensor, dim: int, group: Any) -> torch.Tensor:
    p = group_size(group)
    if x.shape[dim] % p:
        raise ValueError(
            f"cannot split dim {dim} of size {x.shape[dim]} over {p} tensor-parallel ranks"
        )
    return x.chunk(p, dim=dim)[group_rank(group)].contiguous()


def _gather(x: torch.Tensor, dim: int, group: Any) -> torch.Tensor:
    return comm.all_gather(x.contiguous(), dim=dim % x.dim(), group=group)


class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return _all_reduce(g, ctx.group), None


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        return _all_reduce(x, group)

    @staticmethod
    def backward(ctx, g):
        return g, None


class _GatherFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim = group, dim
        return _gather(x, dim, group)

    @staticmethod
    def backward(ctx, g):
        return _split(g, ctx.dim, ctx.group), None, None


class _ScatterToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim = group, dim
        return _split(x, dim, group)

    @staticmethod
    def backward(ctx, g):
        return _gather(g, ctx.dim, ctx.group), None, None


def copy_to_tp(x: torch.Tensor, group: Any) -> torch.Tensor:
    """Enter a tensor-parallel region: identity forward, all-reduced gradient."""
    return x if group_size(group) == 1 else _CopyToTP.apply(x, group)


def reduce_from_tp(x: torch.Tensor, group: Any) -> torch.Tensor:
    """Leave a tensor-parallel region by summing partial results; identity backward."""
    return x if group_size(group) == 1 else _ReduceFromTP.apply(x, group)


def gather_from_tp(x: torch.Tensor, group: Any, dim: int = -1) -> torch.Tensor:
    """Concatenate the ranks' slices along ``dim``; backward keeps this rank's slice."""
    return x if group_size(group) == 1 else _GatherFromTP.apply(x, group, dim)


def scatter_to_tp(x: torch.Tensor, group: Any, dim: int = -1) -> torch.Tensor:
    """Keep this rank's slice along ``dim``; backward all-gathers the gradient."""
    return x if group_size(group) == 1 else _ScatterToTP.apply(x, group, dim)
