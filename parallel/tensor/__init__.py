"""Tensor-parallel layers.

1D (Megatron-LM): :class:`ColumnParallelLinear`, :class:`RowParallelLinear`,
:class:`VocabParallelEmbedding`, :func:`vocab_parallel_cross_entropy` and the autograd mappings
they are built from (:mod:`parallel.tensor.mappings`).

Multi-dimensional modes (``2d`` Optimus, ``2.5d`` Tesseract, ``3d``):
a :class:`Grid` from :func:`build_grid`, layers built from full ``nn`` modules (``from_full``,
gathered back with ``full_weight()``), and one factory per layer kind that picks the class for
the grid's mode, for policies that swap layers into a model.

In 3d, a linear layer maps activation layout ``"a"`` to ``"b"`` and a layout-``"b"`` layer maps
back; use them in pairs (QKV/fc1 on ``"a"``, out-projection/fc2 on ``"b"``), keep LayerNorm and
embeddings on ``"a"``, and take the cross-entropy in the head's output layout
(``head.output_layout_name``). In 2d and 2.5d everything is layout ``"a"``.

Example (a world of one)::

    >>> import torch
    >>> from parallel.tensor import build_grid, make_linear, split_input, gather_output
    >>> grid = build_grid("3d", [[0]])
    >>> full = torch.nn.Linear(8, 8)
    >>> fc = make_linear(grid, full, layout="a")
    >>> y = fc(split_input(torch.ones(2, 8), grid, fc.layout))
    >>> torch.allclose(gather_output(y, grid, fc.output_layout_name), full(torch.ones(2, 8)))
    True
"""

from __future__ import annotations

from torch import nn

from parallel.tensor.cross_entropy_1d import vocab_parallel_cross_entropy
from parallel.tensor.cross_entropy_nd import cross_entropy
from parallel.tensor.embedding_1d import VocabParallelEmbedding
from parallel.tensor.embedding_nd import Embedding2D, Embedding2p5D, Embedding3D, GridEmbedding
from parallel.tensor.grid import Grid, Layout, build_grid, check_shape
from parallel.tensor.grid_linear import GridLinear
from parallel.tensor.grid_ops import gather_output, split_input
from parallel.tensor.layernorm_nd import (
    GridLayerNorm,
    GridRMSNorm,
    LayerNorm2D,
    LayerNorm2p5D,
    LayerNorm3D,
)
from parallel.tensor.linear_1d import ColumnParallelLinear, RowParallelLinear
from parallel.tensor.linear_2d import Linear2D
from parallel.tensor.linear_2p5d import Linear2p5D
from parallel.tensor.linear_3d import Linear3D
from parallel.tensor.sharding import TPShard, gather_full, tp_shard

LINEAR: dict[str, type[GridLinear]] = {"2d": Linear2D, "2.5d": Linear2p5D, "3d": Linear3D}
LAYERNORM: dict[str, type[GridLayerNorm]] = {
    "2d": LayerNorm2D,
    "2.5d": LayerNorm2p5D,
    "3d": LayerNorm3D,
}
EMBEDDING: dict[str, type[GridEmbedding]] = {
    "2d": Embedding2D,
    "2.5d": Embedding2p5D,
    "3d": Embedding3D,
}


def _cls(table: dict, grid: Grid):
    if grid.mode not in table:
        raise ValueError(f"no grid layer for tp mode {grid.mode!r}; grid modes: {list(table)}")
    return table[grid.mode]


def make_linear(grid: Grid, linear: nn.Linear, layout: str = "a", parts: int = 1) -> GridLinear:
    """The grid version of ``linear`` for ``grid.mode`` (its weights sliced); ``parts`` packed
    output blocks (fused q|k|v) are split each on its own (see ``GridLinear``)."""
    return _cls(LINEAR, grid).from_full(linear, grid, layout, parts)


def make_layernorm(grid: Grid, ln: nn.Module, layout: str = "a") -> GridLayerNorm | GridRMSNorm:
    """The grid version of a LayerNorm, or of an RMSNorm (``nn.RMSNorm``, ``LlamaRMSNorm``:
    anything without a ``bias`` attribute but with ``variance_epsilon`` or of type RMSNorm)."""
    if isinstance(ln, nn.LayerNorm):
        return _cls(LAYERNORM, grid).from_full(ln, grid, layout)
    if isinstance(ln, nn.RMSNorm) or hasattr(ln, "variance_epsilon"):
        _cls(LAYERNORM, grid)  # same mode check
        return GridRMSNorm.from_full(ln, grid, layout)
    raise TypeError(f"make_layernorm: no grid version of {type(ln).__name__}")


def make_embedding(grid: Grid, emb: nn.Embedding, layout: str = "a") -> GridEmbedding:
    return _cls(EMBEDDING, grid).from_full(emb, grid, layout)


def make_head(grid: Grid, head: nn.Linear, layout: str = "a") -> GridLinear:
    """An LM head / classifier ``H -> V``: a grid linear layer whose output is vocabulary-parallel
    (the vocabulary split over the output layout's hidden axis), to feed :func:`cross_entropy`
    with ``layout=head.output_layout_name``. Needs ``V`` divisible by ``q`` (pad the vocabulary)."""
    return make_linear(grid, head, layout)


__all__ = [
    "ColumnParallelLinear",
    "RowParallelLinear",
    "TPShard",
    "VocabParallelEmbedding",
    "gather_full",
    "tp_shard",
    "vocab_parallel_cross_entropy",
    "Embedding2D",
    "Embedding2p5D",
    "Embedding3D",
    "Grid",
    "GridEmbedding",
    "GridLayerNorm",
    "GridLinear",
    "GridRMSNorm",
    "LayerNorm2D",
    "LayerNorm2p5D",
    "LayerNorm3D",
    "Layout",
    "Linear2D",
    "Linear2p5D",
    "Linear3D",
    "build_grid",
    "check_shape",
    "cross_entropy",
    "gather_output",
    "make_embedding",
    "make_head",
    "make_layernorm",
    "make_linear",
    "split_input",
]
