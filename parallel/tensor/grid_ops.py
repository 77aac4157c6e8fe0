"""Moving tensors on a tensor-parallel grid: sharded parameters gathered for use (gradients
reduce-scattered back), full batches split in, outputs gathered back.

A parameter of a grid layer is stored split over one or more axes (1/tp of it per rank); before
use it is all-gathered over those axes, and its gradient is reduce-scattered back over the same
axes in reverse order. Under the ring model both cost ``(R - 1) * shard`` bytes per rank for ``R``
ranks over all axes together, the same as the all-reduce of a replicated parameter's gradient,
so keeping parameters at 1/tp costs no extra communication.

Example (a world of one)::

    >>> import torch
    >>> from parallel.tensor.grid import build_grid
    >>> from parallel.tensor.grid_ops import split_input, gather_output
    >>> g = build_grid("2d", [[0]])
    >>> x = torch.randn(2, 3, 4)
    >>> torch.equal(gather_output(split_input(x, g), g), x)
    True
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from parallel import comm
from parallel.tensor.grid import Axis, Grid, Layout


def gather(t: torch.Tensor, axes: Sequence[Axis], dim: int = 0) -> torch.Tensor:
    """All-gather ``t`` along ``dim`` over ``axes`` in order (no autograd)."""
    for a in axes:
        t = comm.all_gather(t, dim=dim, group=a.group) if a.size > 1 else t
    return t


def scatter_sum(t: torch.Tensor, axes: Sequence[Axis], dim: int = 0) -> torch.Tensor:
    """Sum over ranks and keep this rank's block along ``dim``: the adjoint of :func:`gather`
    (reduce-scatter over ``axes`` in reverse order; no autograd)."""
    for a in reversed(axes):
        t = comm.reduce_scatter(t, dim=dim, group=a.group) if a.size > 1 else t
    return t


class _GatherParam(torch.autograd.Function):
    @staticmethod
    def forward(ctx, shard: torch.Tensor, axes: tuple[Axis, ...], dim: int) -> torch.Tensor:
        ctx.axes, ctx.dim = axes, dim
        return gather(shard, axes, dim)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return scatter_sum(grad.contiguous(), ctx.axes, ctx.dim), None, None


def gather_param(shard: torch.Tensor, axes: Sequence[Axis], dim: int = 0) -> torch.Tensor:
    """The full block of a sharded parameter; its gradient is reduce-scattered back."""
    return _GatherParam.apply(shard, tuple(axes), dim)


def block(t: torch.Tensor, dim: int, parts: int, index: int, what: str = "tensor") -> torch.Tensor:
    """Block ``index`` of ``parts`` equal blocks of ``t`` along ``dim`` (clear error if uneven)."""
    if t.shape[dim] % parts:
        raise ValueError(
            f"{what}: dimension {dim} of size {t.shape[dim]} must be divisible by {parts}"
        )
    n = t.shape[dim] // parts
    return t.narrow(dim, index * n, n)


def shard_index(axes: Sequence[Axis]) -> tuple[int, int]:
    """``(parts, index)`` of this rank's shard when a block is split over ``axes`` (outermost
    first), matching the order :func:`gather` reassembles them in (innermost axis first)."""
    parts, index = 1, 0
    for a in axes:
        parts, index = parts * a.size, index * a.size + a.index
    return parts, index


def gather_axes(axes: Sequence[Axis]) -> tuple[Axis, ...]:
    """The order to gather a block split over ``axes`` (outermost first): innermost first."""
    return tuple(reversed(tuple(axes)))


def _layout(grid: Grid | Layout, layout: str) -> Layout:
    return grid if isinstance(grid, Layout) else grid.layout(layout)


def split_input(
    x: torch.Tensor, grid: Grid | Layout, layout: str = "a", hidden: bool = True
) -> torch.Tensor:
    """This rank's part of a full ``(batch, ..., hidden)`` tensor: batch split over the layout's
    row axes, the last dimension over its hidden axis (``hidden=False`` for token ids and
    targets, which have no hidden dimension)."""
    lay = _layout(grid, layout)
    parts, index = lay.row_parts, lay.row_index
    if x.shape[0] % parts:
        raise ValueError(
            f"split_input: batch {x.shape[0]} must be divisible by {parts} "
            f"(the row parts of this {len(lay.rows)}-axis layout)"
        )
    x = block(x, 0, parts, index, "split_input batch")
    if hidden:
        x = block(x, -1 % x.dim(), lay.hidden.size, lay.hidden.index, "split_input hidden")
    return x.contiguous()


class _GatherOutput(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y: torch.Tensor, lay: Layout, hidden: bool) -> torch.Tensor:
        ctx.lay, ctx.hidden = lay, hidden
        if hidden:
            y = gather(y, [lay.hidden], dim=y.dim() - 1)
        return gather(y, gather_axes(lay.rows), dim=0)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        # every rank computes the same loss from the full output: its gradient is the same
        # everywhere and this rank's part of it is its block (Megatron's gather backward)
        return split_input(g, ctx.lay, hidden=ctx.hidden), None, None


def gather_output(
    y: torch.Tensor, grid: Grid | Layout, layout: str = "a", hidden: bool = True
) -> torch.Tensor:
    """The full tensor from every rank's part (the inverse of :func:`split_input`). In 3d, the
    output of a layout-"a" linear layer is in layout ``"b"``. Differentiable for a loss computed
    the same way on every rank from the full tensor (e.g. full logits): the backward keeps this
    rank's block of the gradient, no communication."""
    return _GatherOutput.apply(y, _layout(grid, layout), hidden)


__all__ = [
    "block",
    "gather",
    "gather_axes",
    "gather_output",
    "gather_param",
    "scatter_sum",
    "shard_index",
    "split_input",
]
