"""2.5D tensor-parallel linear layer (Tesseract, Wang et al. 2105.14500): ``depth`` layers of a
q x q SUMMA grid.

The batch is split over ``depth x q`` (depth layer ``l``, grid row ``i``), features over the
``q`` grid columns, so each depth layer runs 2D SUMMA (:mod:`parallel.tensor.linear_2d`) on its
own slice of the batch with the same weight ``W_ij``. The paper keeps ``W_ij`` replicated over
the depth layers and all-reduces its gradient over them; here ``W_ij`` is additionally split over
the depth (1/tp per rank) and all-gathered over the depth before the column all-gather, its
gradient reduce-scattered back: under the ring model that is exactly the bytes of the paper's
depth all-reduce (``2 (d-1)/d |W_ij|``), split between forward and backward. Per rank per
forward + backward, with ``|.|`` this rank's block::

    3 (q-1) |X| + 3 (q d - 1) |W| + 2 (q d - 1) |b|

(``|X| = M N / (d q^2)``, ``|W| = N K / (d q^2)``, ``|b| = K / (d q^2)`` elements.)

Example (a world of one)::

    >>> import torch
    >>> from parallel.tensor import Linear2p5D, build_grid, split_input, gather_output
    >>> grid = build_grid("2.5d", [[0]], depth=1)
    >>> full = torch.nn.Linear(8, 4)
    >>> y = gather_output(Linear2p5D.from_full(full, grid)(split_input(torch.ones(2, 8), grid)), grid)
    >>> torch.allclose(y, full(torch.ones(2, 8)))
    True
"""

from __future__ import annotations

import torch

from parallel.tensor.grid import Axis
from parallel.tensor.grid_linear import GridLinear
from parallel.tensor.grid_ops import gather_axes
from parallel.tensor.linear_2d import _SummaMatmul


class Linear2p5D(GridLinear):
    """``nn.Linear`` on a 2.5d grid; input and output in layout "a": batch over (depth, column),
    features over the row axis."""

    mode = "2.5d"

    @property
    def w_axes0(self) -> tuple[Axis, ...]:
        # weight rows: block i of the column axis, then piece l of the depth
        return (self.grid.axes["col"], self.grid.axes["dep"])

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return _SummaMatmul.apply(x, self.weight, self.in_layout.hidden, gather_axes(self.w_axes0))


__all__ = ["Linear2p5D"]
