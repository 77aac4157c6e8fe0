"""2D tensor-parallel linear layer (Optimus, Xu et al. 2104.05343): SUMMA on a q x q grid.

``Y = X W``: rank ``(i, j)`` holds ``X_ij`` (batch block ``i``, feature block ``j``), ``W_ij``
and produces ``Y_ij``. Forward: ``Y_ij = sum_k X_ik W_kj`` - the ``X_ik`` of row ``i`` and the
``W_kj`` of column ``j`` are what SUMMA's ``q`` broadcasts deliver; they are issued here as one
all-gather along the row and one along the column (the same blocks, the same bytes under the ring
model, ``q`` times fewer calls). Backward, as in the paper, communicates the operands again
rather than keeping the gathered blocks (activation memory stays ``1/q^2``):

- ``dX_ij = sum_k dY_ik W_jk^T``: all-gather ``W`` along the column, multiply, reduce-scatter
  along the row (SUMMA's broadcast + reduce steps for ``A B^T``);
- ``dW_ij = sum_k X_ki^T dY_kj``: all-gather ``X`` along the row, multiply, reduce-scatter along
  the column (``A^T B``).

Bytes sent per rank per forward + backward (ring model; ``|.|`` = bytes of this rank's block)::

    3 (q-1) |X_ij| + 3 (q-1) |W_ij| + 2 (q-1) |b_ij|

The bias block of column ``j`` is split over the column (1/q^2 per rank): all-gathered in
forward, its gradient reduce-scattered.

Example (a world of one; on 4 ranks the same code runs with ``q = 2``)::

    >>> import torch
    >>> from parallel.tensor import Linear2D, build_grid, split_input, gather_output
    >>> grid = build_grid("2d", [[0]])
    >>> full = torch.nn.Linear(8, 4)
    >>> layer = Linear2D.from_full(full, grid)
    >>> x = torch.randn(2, 8)
    >>> y = gather_output(layer(split_input(x, grid)), grid)
    >>> torch.allclose(y, full(x))
    True
"""

from __future__ import annotations

import torch

from parallel.tensor.grid import Axis
from parallel.tensor.grid_linear import GridLinear
from parallel.tensor.grid_ops import gather, gather_axes, scatter_sum


class _SummaMatmul(torch.autograd.Function):
    """``X W`` on a (q x q [x depth]) grid; ``w_axes`` in gather order."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, row: Axis, w_axes: tuple[Axis, ...]):
        ctx.save_for_backward(x, w)
        ctx.row, ctx.w_axes = row, w_axes
        x_row = gather(x, [row], dim=x.dim() - 1)
        w_col = gather(w, w_axes, dim=0)
        return torch.matmul(x_row, w_col)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, w = ctx.saved_tensors
        dy = dy.contiguous()
        dx = dw = None
        if ctx.needs_input_grad[0]:
            w_col = gather(w, ctx.w_axes, dim=0)
            dx = scatter_sum(torch.matmul(dy, w_col.t()), [ctx.row], dim=dy.dim() - 1)
        if ctx.needs_input_grad[1]:
            x_row = gather(x, [ctx.row], dim=x.dim() - 1)
            dw_col = x_row.reshape(-1, x_row.shape[-1]).t() @ dy.reshape(-1, dy.shape[-1])
            dw = scatter_sum(dw_col, ctx.w_axes, dim=0)
        return dx, dw, None, None


class Linear2D(GridLinear):
    """``nn.Linear`` on a 2d grid (see the module docstring); input and output in layout "a":
    batch over the column axis, features over the row axis."""

    mode = "2d"

    @property
    def w_axes0(self) -> tuple[Axis, ...]:
        return (self.grid.axes["col"],)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return _SummaMatmul.apply(x, self.weight, self.in_layout.hidden, gather_axes(self.w_axes0))


__all__ = ["Linear2D"]
