"""Norm reducers: how partial squared norms of split parameters become whole-tensor norms.

An optimizer with per-parameter norms (:class:`~colossus.optim.Lamb`,
:class:`~colossus.optim.Lars`) stacks the partial squares of every parameter it holds into one
tensor ``sq`` of shape ``[rows, n_params]`` and calls ``norm_reducer(sq, params)`` ONCE per step;
the reducer sums the pieces over the ranks that hold them, in place, in one collective.

Tensor parallelism hook: a parameter split across a tensor-parallel group is marked with
``param.tensor_model_parallel = True`` (Megatron's attribute; or pass ``is_sharded``). Its
partial squares are summed over the group; a replicated parameter (LayerNorm gains under 1D
TP) is counted once (only group rank 0 contributes), so every rank ends with the same norms.

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


def default_is_sharded(param: torch.Tensor) -> bool:
    """Megatron's convention: split parameters carry ``tensor_model_parallel = True``."""
    return bool(getattr(param, "tensor_model_parallel", False))


class ShardedNormReducer:
    """Sum partial squares over ``group`` (None: the default group) in one all-reduce through
    :mod:`parallel.comm` (counted); replicated columns contribute from group rank 0 only."""

    def __init__(
        self, group=None, is_sharded: Callable[[torch.Tensor], bool] = default_is_sharded
    ) -> None:
        self.group = group
        self.is_sharded = is_sharded
        self._mask: tuple[tuple[int, ...], torch.Tensor] | None = None

    def __call__(self, sq: torch.Tensor, columns: Sequence) -> None:
        if not (dist.is_available() and dist.is_initialized()):
            return
        if dist.get_world_size(self.group) == 1:
            return
        if dist.get_rank(self.group) != 0:
            key = tuple(id(c) for c in columns)
            if self._mask is None or self._mask[0] != key:
                m = [1.0 if self.is_sharded(c) else 0.0 for c in columns]
                self._mask = (key, torch.tensor(m, device=sq.device))
            sq.mul_(self._mask[1])
        comm.all_reduce(sq, group=self.group)
