"""Embedding on the 2d, 2.5d and 3d grids: the output is an activation in the grid's layout
(batch over the row axes, hidden over the hidden axis), as the first layer of a model needs.

The table ``E`` (``V x H``) is split by hidden block over the layout's hidden axis and each block
further over the row axes (1/tp per rank, as the 2D/2.5D/3D embeddings of Colossal-AI split
the embedding dimension). Forward: all-gather this rank's hidden block ``E[:, block]`` over the
row axes and look up this rank's token ids (batch block); backward: the dense gradient of the
block is reduce-scattered back. Bytes per rank per forward + backward: ``2 (R-1) V H / tp``
elements, ``R = tp / q``.

Example (a world of one)::

    >>> import torch
    >>> from parallel.tensor import Embedding2D, build_grid, split_input, gather_output
    >>> grid = build_grid("2d", [[0]])
    >>> full = torch.nn.Embedding(10, 8)
    >>> ids = torch.randint(0, 10, (2, 3))
    >>> y = Embedding2D.from_full(full, grid)(split_input(ids, grid, hidden=False))
    >>> torch.equal(gather_output(y, grid), full(ids))
    True
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from parallel.tensor.grid import Grid, Layout
from parallel.tensor.grid_ops import block, gather, gather_axes, gather_param, shard_index


class GridEmbedding(nn.Module):
    """``nn.Embedding`` whose output is a grid activation (see the module docstring)."""

    mode: str = ""

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        grid: Grid,
        padding_idx: int | None = None,
        layout: str = "a",
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if grid.mode != self.mode:
            raise ValueError(f"{type(self).__name__} needs a {self.mode} grid; got {grid.mode}")
        if embedding_dim % grid.tp:
            raise ValueError(
                f"{type(self).__name__}: embedding_dim={embedding_dim} must be divisible by "
                f"tp={grid.tp}"
            )
        if padding_idx is not None and padding_idx < 0:
            padding_idx += num_embeddings
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.padding_idx, self.grid, self.layout = padding_idx, grid, layout
        self.lay: Layout = grid.layout(layout)
        self.weight = nn.Parameter(
            torch.randn(num_embeddings, embedding_dim // grid.tp, dtype=dtype, device=device)
        )
        if padding_idx is not None:
            with torch.no_grad():
                self.weight[padding_idx].zero_()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        table = gather_param(self.weight, gather_axes(self.lay.rows), dim=1)
        return F.embedding(ids, table, self.padding_idx)

    @classmethod
    def from_full(cls, emb: nn.Embedding, grid: Grid, layout: str = "a") -> GridEmbedding:
        """This rank's shard of ``emb``."""
        m = cls(
            emb.num_embeddings,
            emb.embedding_dim,
            grid,
            padding_idx=emb.padding_idx,
            layout=layout,
            dtype=emb.weight.dtype,
            device=emb.weight.device,
        )
        with torch.no_grad():
            w = block(emb.weight.detach(), 1, m.lay.hidden.size, m.lay.hidden.index)
            m.weight.copy_(block(w, 1, *shard_index(m.lay.rows)))
        return m

    @torch.no_grad()
    def full_weight(self) -> torch.Tensor:
        """The full ``V x H`` table on every rank (collective)."""
        w = gather(self.weight.detach(), gather_axes(self.lay.rows), dim=1)
        return gather(w, [self.lay.hidden], dim=1)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, layout={self.layout!r}"


class Embedding2D(GridEmbedding):
    """Embedding on a 2d grid."""

    mode = "2d"


class Embedding2p5D(GridEmbedding):
    """Embedding on a 2.5d grid."""

    mode = "2.5d"


class Embedding3D(GridEmbedding):
    """Embedding on a 3d grid (output in layout "a" by default)."""

    mode = "3d"


__all__ = ["Embedding2D", "Embedding2p5D", "Embedding3D", "GridEmbedding"]
