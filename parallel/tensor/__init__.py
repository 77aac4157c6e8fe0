"""Tensor-parallel layers. 1D (Megatron-LM): :class:`ColumnParallelLinear`,
:class:`RowParallelLinear`, :class:`VocabParallelEmbedding`, :func:`vocab_parallel_cross_entropy`
and the autograd mappings they are built from (:mod:`parallel.tensor.mappings`)."""

from parallel.tensor.cross_entropy_1d import vocab_parallel_cross_entropy
from parallel.tensor.embedding_1d import VocabParallelEmbedding
from parallel.tensor.linear_1d import ColumnParallelLinear, RowParallelLinear
from parallel.tensor.sharding import TPShard, gather_full, tp_shard

__all__ = [
    "ColumnParallelLinear",
    "RowParallelLinear",
    "VocabParallelEmbedding",
    "vocab_parallel_cross_entropy",
    "TPShard",
    "tp_shard",
    "gather_full",
]
