"""Vocabulary-parallel cross-entropy on the 2d, 2.5d and 3d grids.

The logits come from an LM head (a grid linear layer without bias, ``H -> V``): rank-local
logits hold a batch block (the layout's row axes) and a vocabulary block (its hidden axis). The
softmax needs the row max and the row sum of exponentials over the whole vocabulary, and the
target's logit lives on one rank of the hidden axis: one all-reduce (max) and one all-reduce
(sum of exponentials and target logit together) over the hidden axis, then one all-reduce of
(loss sum, token count) over each row axis for the mean. The backward is local:
``(softmax - onehot) / count``. Bytes per rank (``m`` local rows)::

    2 (q-1)/q (m + 2 m) + sum over row axes of 2 (r-1)/r * 2      (elements)

Example (a world of one)::

    >>> import torch
    >>> from parallel.tensor import build_grid, split_input
    >>> from parallel.tensor.cross_entropy_nd import cross_entropy
    >>> grid = build_grid("2d", [[0]])
    >>> logits, target = torch.randn(2, 3, 10), torch.randint(0, 10, (2, 3))
    >>> loss = cross_entropy(split_input(logits, grid), split_input(target, grid, hidden=False), grid)
    >>> torch.allclose(loss, torch.nn.functional.cross_entropy(logits.flatten(0, 1), target.flatten()))
    True
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from parallel import comm
from parallel.tensor.grid import Axis, Grid, Layout


class _VocabParallelCE(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        logits: torch.Tensor,
        target: torch.Tensor,
        hidden: Axis,
        rows: tuple[Axis, ...],
        ignore_index: int,
        num_items: float | None,
    ) -> torch.Tensor:
        ctx.dtype = logits.dtype
        logits = logits.float()  # softmax statistics in fp32 whatever the logits' dtype
        v_local = logits.shape[-1]
        start = hidden.index * v_local
        m = logits.detach().amax(-1, keepdim=True)
        comm.all_reduce(m, group=hidden.group, op=dist.ReduceOp.MAX)
        z = logits - m
        e = z.exp()
        t = target.unsqueeze(-1) - start
        inside = (t >= 0) & (t < v_local)
        t = t.clamp(0, v_local - 1)
        st = torch.cat([e.sum(-1, keepdim=True), torch.gather(z, -1, t) * inside], -1)
        comm.all_reduce(st, group=hidden.group)
        loss_row = st[..., 0].log() - st[..., 1]
        valid = target != ignore_index
        tot = torch.stack([(loss_row * valid).sum(), valid.sum().to(loss_row.dtype)])
        for a in rows:
            comm.all_reduce(tot, group=a.group)
        if num_items is not None:  # e.g. the tokens of all micro-batches of an accumulated step
            tot[1] = num_items
        ctx.save_for_backward(e / st[..., :1], t, inside, valid, tot[1])
        return tot[0] / tot[1]

    @staticmethod
    def backward(ctx, dl: torch.Tensor):
        p, t, inside, valid, count = ctx.saved_tensors
        g = p.scatter_add(-1, t, -inside.to(p.dtype))
        g = g * (valid.to(p.dtype) * (dl / count)).unsqueeze(-1)
        return g.to(ctx.dtype), None, None, None, None, None


def cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    grid: Grid | Layout,
    layout: str = "a",
    ignore_index: int = -100,
    num_items: float | None = None,
) -> torch.Tensor:
    """Mean cross-entropy over all tokens of the tensor-parallel group (the same scalar on every
    rank), equal to ``F.cross_entropy`` of the full logits and targets. ``logits``: this rank's
    ``(batch block, ..., vocab block)``; ``target``: the same batch block (``split_input(...,
    hidden=False)`` in the logits' layout: in 3d the head's output layout, usually ``"b"``).
    ``num_items``: divide the summed loss by this instead of the count of non-ignored targets."""
    lay = grid if isinstance(grid, Layout) else grid.layout(layout)
    if logits.shape[:-1] != target.shape:
        raise ValueError(
            f"cross_entropy: logits {tuple(logits.shape)} and target {tuple(target.shape)} "
            "must agree on every dimension but the last"
        )
    return _VocabParallelCE.apply(logits, target, lay.hidden, lay.rows, ignore_index, num_items)


__all__ = ["cross_entropy"]
