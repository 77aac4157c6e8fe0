"""Vocabulary-parallel embedding (Megatron-LM): rank ``r`` of ``p`` holds rows
``[r V/p, (r+1) V/p)`` of the ``[V, H]`` table. Each rank looks up the ids it owns, writes zeros
for the others, and one all-reduce sums the partial results; the backward is local (each rank's
rows get the gradient of the positions whose ids it owns).

Example (a world of one: equals ``nn.Embedding``)::

    >>> import torch
    >>> from parallel.tensor.embedding_1d import VocabParallelEmbedding
    >>> full = torch.nn.Embedding(16, 4)
    >>> emb = VocabParallelEmbedding.from_embedding(full, group=None)
    >>> ids = torch.tensor([[1, 15, 3]])
    >>> torch.equal(emb(ids), full(ids))
    True
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from parallel.tensor.linear_1d import _check_divisible
from parallel.tensor.mappings import group_rank, group_size, reduce_from_tp
from parallel.tensor.sharding import gather_full, mark_sharded, shard_rows


class VocabParallelEmbedding(nn.Module):
    """``nn.Embedding(num_embeddings, embedding_dim)`` with its rows split over ``group``."""

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        padding_idx: int | None = None,
        group: Any = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        _init: bool = True,
    ):
        super().__init__()
        p, r = group_size(group), group_rank(group)
        _check_divisible("the vocabulary size (num_embeddings)", num_embeddings, p)
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.padding_idx = padding_idx
        self.group, self.tp_size, self.tp_rank = group, p, r
        per = num_embeddings // p
        self.vocab_start, self.vocab_end = r * per, (r + 1) * per
        self.weight = nn.Parameter(torch.empty(per, embedding_dim, device=device, dtype=dtype))
        if _init:
            full = nn.Embedding(
                num_embeddings, embedding_dim, padding_idx, device=device, dtype=dtype
            )
            self._load_full(full.weight.data)
        mark_sharded(self.weight, (num_embeddings, embedding_dim), 0, group, r, p)

    @property
    def _local_padding_idx(self) -> int | None:
        pi = self.padding_idx
        if pi is None:
            return None
        pi = pi % self.num_embeddings
        return pi - self.vocab_start if self.vocab_start <= pi < self.vocab_end else None

    def _load_full(self, weight: torch.Tensor) -> None:
        with torch.no_grad():
            self.weight.copy_(shard_rows(weight, 0, self.tp_rank, self.tp_size))

    @classmethod
    def from_embedding(cls, emb: nn.Embedding, group: Any = None) -> VocabParallelEmbedding:
        if emb.max_norm is not None or emb.sparse or emb.scale_grad_by_freq:
            raise ValueError(
                "VocabParallelEmbedding supports plain lookups only (no max_norm, sparse or "
                "scale_grad_by_freq)"
            )
        m = cls(
            emb.num_embeddings,
            emb.embedding_dim,
            emb.padding_idx,
            group=group,
            device=emb.weight.device,
            dtype=emb.weight.dtype,
            _init=False,
        )
        m._load_full(emb.weight.detach())
        return m

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return F.embedding(ids, self.weight, self._local_padding_idx)
        outside = (ids < self.vocab_start) | (ids >= self.vocab_end)
        local = (ids - self.vocab_start).masked_fill(outside, 0)
        out = F.embedding(local, self.weight, self._local_padding_idx)
        # zeroing the rows of foreign ids also zeroes their gradient into local row 0
        out = out.masked_fill(outside.unsqueeze(-1), 0.0)
        return reduce_from_tp(out, self.group)

    def full_params(self) -> dict[str, torch.Tensor]:
        return {"weight": gather_full(self.weight)}

    def extra_repr(self) -> str:
        return (
            f"{self.num_embeddings}, {self.embedding_dim}, rows [{self.vocab_start}, "
            f"{self.vocab_end}), tp={self.tp_size}, padding_idx={self.padding_idx}"
        )
