"""The two collectives ZeRO-3 needs, with a fallback for backends that lack the fused forms.

``all_gather_into_tensor`` gathers equal shards into one flat buffer; ``reduce_scatter_tensor``
sums full buffers and leaves each rank its shard. Both exist on gloo in recent torch; where a
backend does not implement one, the fallback is slower but exact (same sum, same shard).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

# torch >= 2.13 renames {all_gather_into,reduce_scatter}_tensor -> *_single (old names warn)
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def all_gather_into(out: torch.Tensor, shard: torch.Tensor, group=None, async_op: bool = False):
    """``out[r * n:(r + 1) * n] = shard of rank r`` on every rank; with ``async_op`` returns a
    work to ``wait()`` (else None)."""
    try:
        return _all_gather(out, shard, group=group, async_op=async_op)
    except (RuntimeError, NotImplementedError):
        # backend without the fused collective: list all_gather into views of ``out``
        n = shard.numel()
        return dist.all_gather(list(out.split(n)), shard, group=group, async_op=async_op)


def reduce_scatter_sum(out: torch.Tensor, full: torch.Tensor, group=None, async_op: bool = False):
    """``out = sum over ranks of full[rank * n:(rank + 1) * n]``; with ``async_op`` may return a
    work to ``wait()`` (None when it already completed)."""
    try:
        return _reduce_scatter(out, full, op=dist.ReduceOp.SUM, group=group, async_op=async_op)
    except (RuntimeError, NotImplementedError):
        # gloo builds without reduce_scatter: all_reduce the whole buffer, keep our shard.
        # Same result (the sum is identical), N times the traffic.
        n, r = out.numel(), dist.get_rank(group)
        tmp = full.clone()
        dist.all_reduce(tmp, op=dist.ReduceOp.SUM, group=group)
        out.copy_(tmp[r * n : (r + 1) * n])
        return None
