"""Cross-entropy over vocabulary-parallel logits, without gathering them (Megatron-LM): rank
``r`` holds logits ``[..., r V/p : (r+1) V/p]``. Three all-reduces of one value per token (the
max, the target's logit, the sum of exponentials) replace an all-gather of ``V`` values per
token; the backward (``softmax - one_hot``) is local.

Example (a world of one: equals ``F.cross_entropy``)::

    >>> import torch, torch.nn.functional as F
    >>> from parallel.tensor.cross_entropy_1d import vocab_parallel_cross_entropy
    >>> logits, target = torch.randn(5, 16), torch.tensor([1, 2, -100, 15, 0])
    >>> torch.allclose(vocab_parallel_cross_entropy(logits, target, None), F.cross_entropy(logits, target))
    True
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from parallel import comm
from parallel.tensor.mappings import group_rank, group_size


class _VocabParallelCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, group, ignore_index):
        p, r = group_size(group), group_rank(group)
        per = logits.shape[-1]
        start = r * per
        x = logits.float()
        lmax = x.max(dim=-1).values
        if p > 1:
            comm.all_reduce(lmax, group=group, op=dist.ReduceOp.MAX)
        x = x - lmax.unsqueeze(-1)
        ignored = target == ignore_index
        outside = (target < start) | (target >= start + per) | ignored
        local_t = (target - start).masked_fill(outside, 0)
        picked = x.gather(-1, local_t.unsqueeze(-1)).squeeze(-1).masked_fill(outside, 0.0)
        exp = x.exp_()  # x is a fresh tensor: reuse it for exp
        sum_exp = exp.sum(dim=-1)
        if p > 1:
            both = torch.stack([picked, sum_exp])  # one all-reduce for the two sums
            comm.all_reduce(both, group=group)
            picked, sum_exp = both[0], both[1]
        loss = (torch.log(sum_exp) - picked).masked_fill(ignored, 0.0)
        exp.div_(sum_exp.unsqueeze(-1))  # softmax, kept for backward
        ctx.save_for_backward(exp, local_t, outside, ignored)
        ctx.in_dtype = logits.dtype
        return loss

    @staticmethod
    def backward(ctx, g):
        softmax, local_t, outside, ignored = ctx.saved_tensors
        grad = softmax  # reused in place: backward runs once
        grad.scatter_add_(-1, local_t.unsqueeze(-1), (~outside).to(grad.dtype).neg().unsqueeze(-1))
        grad.mul_(g.masked_fill(ignored, 0.0).unsqueeze(-1))
        return grad.to(ctx.in_dtype), None, None, None


def vocab_parallel_cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    group: Any,
    ignore_index: int = -100,
    reduction: str = "mean",
    num_items: torch.Tensor | int | None = None,
) -> torch.Tensor:
    """Cross-entropy of ``target`` (global vocabulary ids) under logits split by vocabulary.

    ``logits``: ``[..., V/p]`` (this rank's slice, rank order); ``target``: ``[...]``. Targets
    equal to ``ignore_index`` contribute nothing. ``reduction``: ``mean`` (over non-ignored
    targets, as ``F.cross_entropy``), ``sum`` or ``none``; ``num_items`` divides the sum instead
    (Hugging Face's ``num_items_in_batch`` for gradient accumulation). Computed in fp32."""
    if logits.shape[:-1] != target.shape:
        raise ValueError(
            f"logits {tuple(logits.shape)} and target {tuple(target.shape)} disagree: logits "
            "must be target's shape plus the local vocabulary dimension"
        )
    loss = _VocabParallelCE.apply(logits, target, group, ignore_index)
    if reduction == "none":
        return loss
    total = loss.sum()
    if num_items is not None:
        return total / num_items
    if reduction == "sum":
        return total
    if reduction != "mean":
        raise ValueError(f"reduction must be mean, sum or none; got {reduction!r}")
    return total / (target != ignore_index).sum()
