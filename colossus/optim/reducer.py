"""Norm reducers: how partial squared norms of split parameters become whole-tensor norms.

An optimizer with per-parameter norms (:class:`~colossus.optim.Lamb`,
:class:`~colossus.optim.Lars`) stacks the partial squares of every parameter it holds into one
tensor ``sq`` of shape ``[rows, n_params]`` and calls ``norm_reducer(sq, params)`` ONCE per step;
the reducer sums the pieces over the ranks that hold them, in place, in one collective.

Tensor parallelism: a parameter split across the group carries ``param.tp_shard``
(:class:`parallel.tensor.sharding.TPShard`, set by ``parallel``'s layers); its partial squares
are summed over the group, each weighted ``1 / tp_shard.replicas`` where a 2D layout holds the
same block on several ranks. A parameter without ``tp_shard`` is replicated on every rank (a
LayerNorm gain under 1D TP) and counted once: only group rank 0 contributes. Megatron's
``param.tensor_model_parallel = True`` is read as a plain split too.

Example (a world of one: nothing to reduce)::

    >>> import torch
    >>> from colossus.optim import Lamb, ShardedNormReducer
    >>> w = torch.nn.Parameter(torch.ones(4, 4))
    >>> opt = Lamb([w], lr=0.1, norm_reducer=ShardedNormReducer(group=None))
    >>> w.grad = torch.ones(4, 4); opt.step()
    >>> round(w[0, 0].item(), 4)  # the step has norm lr * ||w||: 0.1 per element here
    0.9
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist

from parallel import comm
from parallel.tensor.sharding import tp_shard


def shard_weight(param: torch.Tensor, rank: int) -> float:
    """Weight of ``param``'s partial squares on group rank ``rank`` so that the group sum is the
    whole tensor's: ``1 / replicas`` for a split parameter, rank 0 only for a replicated one."""
    info = tp_shard(param)
    if info is not None:
        return 1.0 / info.replicas
    if getattr(param, "tensor_model_parallel", False):
        return 1.0
    return 1.0 if rank == 0 else 0.0


class ShardedNormReducer:
    """Sum partial squares over ``group`` (None: the default group) in one all-reduce through
    :mod:`parallel.comm` (counted), each column weighted by ``weight(param, rank)``
    (:func:`shard_weight`). The weights are cached per list of parameters."""

    def __init__(
        self, group=None, weight: Callable[[torch.Tensor, int], float] = shard_weight
    ) -> None:
        self.group = group
        self.weight = weight
        self._mask: tuple[tuple[int, ...], torch.Tensor | None] | None = None

    def __call__(self, sq: torch.Tensor, columns: Sequence) -> None:
        if not (dist.is_available() and dist.is_initialized()):
            return
        if dist.get_world_size(self.group) == 1:
            return
        key = tuple(id(c) for c in columns)
        if self._mask is None or self._mask[0] != key:
            rank = dist.get_rank(self.group)
            w = [self.weight(c, rank) for c in columns]
            mask = None if all(x == 1.0 for x in w) else torch.tensor(w, device=sq.device)
            self._mask = (key, mask)
        if self._mask[1] is not None:
            sq.mul_(self._mask[1])
        comm.all_reduce(sq, group=self.group)
