"""3D tensor-parallel linear layer (Bian et al., "Maximizing Parallelism in Distributed Training
for Huge Neural Networks", 2105.14450) on a q x q x q cube.

Rank ``(i, j, l)`` (weight, input, output axes) in layout "a" holds ``X`` rows block
``(i, j)`` (``q^2`` batch blocks) and feature block ``l``, and the weight ``W_lj`` split over
``i``. Forward: all-gather ``X_il`` over the input axis (``j``), all-gather ``W_lj`` over the
weight axis (``i``), multiply, reduce-scatter the partial ``Y_ij`` over the output axis (``l``):
the output has rows block ``(i, l)`` and feature block ``j`` - layout "b", in which the input and
output axes trade roles. A layout-"b" layer maps back to "a", so layers go in pairs (like
Megatron's column/row pairs) and a residual stream stays in "a". Backward, as in the paper (the
gathered ``X_il`` and ``W_lj`` are kept from forward): all-gather ``dY`` over the output axis,
reduce-scatter ``dX = dY W^T`` over the input axis and ``dW = X^T dY`` over the weight axis.

Bytes sent per rank per forward + backward (ring model; ``|.|`` this rank's block, ``1/q^3`` of
the full tensor)::

    2 (q-1) (|X| + |W| + |Y|) + 2 (q^2-1) |b|

Example (a world of one)::

    >>> import torch
    >>> from parallel.tensor import Linear3D, build_grid, split_input, gather_output
    >>> grid = build_grid("3d", [[0]])
    >>> full = torch.nn.Linear(8, 4)
    >>> y = Linear3D.from_full(full, grid)(split_input(torch.ones(2, 8), grid, "a"))
    >>> torch.allclose(gather_output(y, grid, "b"), full(torch.ones(2, 8)))
    True
"""

from __future__ import annotations

import torch

from parallel.tensor.grid import Axis
from parallel.tensor.grid_linear import GridLinear
from parallel.tensor.grid_ops import gather, scatter_sum


class _Matmul3D(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, inp: Axis, wax: Axis, out: Axis):
        x_g = gather(x, [inp], dim=0)
        w_g = gather(w, [wax], dim=0)
        ctx.save_for_backward(x_g, w_g)
        ctx.axes = (inp, wax, out)
        return scatter_sum(torch.matmul(x_g, w_g), [out], dim=0)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x_g, w_g = ctx.saved_tensors
        inp, wax, out = ctx.axes
        dy_g = gather(dy.contiguous(), [out], dim=0)
        dx = dw = None
        if ctx.needs_input_grad[0]:
            dx = scatter_sum(torch.matmul(dy_g, w_g.t()), [inp], dim=0)
        if ctx.needs_input_grad[1]:
            dw_g = x_g.reshape(-1, x_g.shape[-1]).t() @ dy_g.reshape(-1, dy_g.shape[-1])
            dw = scatter_sum(dw_g, [wax], dim=0)
        return dx, dw, None, None, None


class Linear3D(GridLinear):
    """``nn.Linear`` on a 3d grid, from layout ``layout`` ("a" or "b") to the other one."""

    mode = "3d"

    @property
    def output_layout_name(self) -> str:
        return "b" if self.layout == "a" else "a"

    @property
    def w_axes0(self) -> tuple[Axis, ...]:
        # weight rows: the input's feature block (its hidden axis), then piece i (weight axis)
        return (self.in_layout.hidden, self.grid.axes["weight"])

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return _Matmul3D.apply(
            x,
            self.weight,
            self.out_layout.hidden,  # varies the input's row piece: the input axis of layout a
            self.grid.axes["weight"],
            self.in_layout.hidden,  # the contraction blocks are summed over the input's hidden
        )


__all__ = ["Linear3D"]
