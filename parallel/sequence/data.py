"""Data path of sequence parallelism: which tokens a rank holds, their position ids, and the loss
averaged over every token of the sequence group.

Two layouts of a length-``L`` sequence over ``P`` ranks:

- ``contiguous``: rank ``r`` holds tokens ``[r L/P, (r+1) L/P)``; needs ``L % P == 0``.
- ``zigzag``: the sequence is cut into ``2P`` chunks; rank ``r`` holds chunks ``r`` and
  ``2P-1-r``, so under a causal mask every rank has the same amount of work (the early chunk
  attends to little, the late one to much); needs ``L % (2P) == 0``.

Causal-LM labels must be shifted on the whole sequence before splitting (the label of a rank's
last token is the first token of another rank), which :func:`shift_labels` does.

Example::

    >>> import torch
    >>> from parallel.sequence.data import positions, split_sequence
    >>> positions(8, rank=1, world=2, layout="zigzag").tolist()
    [2, 3, 4, 5]
    >>> split_sequence(torch.arange(8)[None], rank=0, world=2, layout="zigzag").tolist()
    [[0, 1, 6, 7]]
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F

from parallel import comm

Layout = Literal["contiguous", "zigzag"]
LAYOUTS: tuple[str, ...] = ("contiguous", "zigzag")


def check_length(length: int, world: int, layout: str) -> None:
    """Raise a ``ValueError`` naming the divisibility rule if ``length`` cannot be split."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown sequence layout {layout!r}; expected one of {LAYOUTS}")
    div = 2 * world if layout == "zigzag" else world
    if length % div:
        lo, hi = length - length % div, length - length % div + div
        rule = "L % (2*sp) == 0" if layout == "zigzag" else "L % sp == 0"
        raise ValueError(
            f"sequence length {length} cannot be split over sp={world} ranks with the {layout} "
            f"layout: it needs {rule} (L % {div} == 0); pad or cut to {lo or hi} or {hi}"
        )


def positions(length: int, rank: int, world: int, layout: Layout = "contiguous") -> torch.Tensor:
    """Global position ids (``int64``, ``L / world`` of them) of the tokens ``rank`` holds."""
    check_length(length, world, layout)
    if layout == "contiguous":
        n = length // world
        return torch.arange(rank * n, (rank + 1) * n)
    c = length // (2 * world)
    first = torch.arange(rank * c, (rank + 1) * c)
    second = torch.arange((2 * world - 1 - rank) * c, (2 * world - rank) * c)
    return torch.cat([first, second])


def split_sequence(
    x: torch.Tensor, rank: int, world: int, layout: Layout = "contiguous", dim: int = 1
) -> torch.Tensor:
    """The part of ``x`` (sequence along ``dim``) that ``rank`` holds."""
    idx = positions(x.shape[dim], rank, world, layout).to(x.device)
    return x.index_select(dim, idx)


def gather_sequence(
    parts: list[torch.Tensor], layout: Layout = "contiguous", dim: int = 1
) -> torch.Tensor:
    """Inverse of :func:`split_sequence`: every rank's part (in rank order) -> the sequence."""
    world = len(parts)
    cat = torch.cat(parts, dim=dim)
    pos = torch.cat([positions(cat.shape[dim], r, world, layout) for r in range(world)])
    return cat.index_select(dim, torch.argsort(pos).to(cat.device))


def shift_labels(input_ids: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Next-token labels of the whole sequence (last position ``ignore_index``), to split after."""
    return F.pad(input_ids[..., 1:], (0, 1), value=ignore_index)


def sp_cross_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    group=None,
    ignore_index: int = -100,
    token_loss: Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Mean token cross-entropy over every token of the sequence group.

    ``logits`` (``..., n, V``) and ``labels`` (``..., n``, already shifted) are this rank's
    tokens. The token count is all-reduced (no gradient), so ``backward`` of the returned value
    on every rank and a sum of the parameter gradients over the group give the gradient of the
    global mean. The returned value is the global mean on every rank (the loss sum is all-reduced
    too, outside autograd). ``token_loss(logits_2d, labels_1d, ignore_index)`` gives the summed
    loss of this rank's tokens (default: ``F.cross_entropy``; under tensor parallelism a
    vocabulary-parallel one for logits split by vocabulary)."""
    flat_logits, flat_labels = logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1)
    if token_loss is None:
        loss_sum = F.cross_entropy(
            flat_logits, flat_labels, ignore_index=ignore_index, reduction="sum"
        )
    else:
        loss_sum = token_loss(flat_logits, flat_labels, ignore_index)
    stats = torch.stack([loss_sum.detach(), (labels != ignore_index).sum().to(loss_sum.dtype)])
    comm.all_reduce(stats, group=group)
    total_sum, count = stats[0], stats[1].clamp(min=1)
    # local contribution carries the gradient; the other ranks' sum is a constant offset
    return loss_sum / count + (total_sum - loss_sum.detach()) / count


def split_batch(
    batch: dict[str, torch.Tensor], rank: int, world: int, layout: Layout = "zigzag"
) -> dict[str, torch.Tensor]:
    """A Hugging Face causal-LM batch (``input_ids``, optional ``attention_mask``, optional
    ``labels`` in HF's unshifted convention, default ``input_ids``) -> this rank's part:
    ``input_ids``, ``attention_mask`` (if given), ``position_ids`` (global) and ``labels``
    already shifted on the whole sequence (padding -> -100). Feed the first three to the model
    and compute the loss with :func:`sp_cross_entropy` on ``labels`` (not the model's own loss,
    which would shift inside the rank's slice)."""
    ids = batch["input_ids"]
    check_length(ids.shape[1], world, layout)
    labels = batch.get("labels", ids)
    mask = batch.get("attention_mask")
    if mask is not None:
        labels = labels.masked_fill(mask == 0, -100)
    out = {
        "input_ids": split_sequence(ids, rank, world, layout),
        "position_ids": positions(ids.shape[1], rank, world, layout)
        .to(ids.device)
        .expand(ids.shape[0], -1),
        "labels": split_sequence(shift_labels(labels), rank, world, layout),
    }
    if mask is not None:
        out["attention_mask"] = split_sequence(mask, rank, world, layout)
    return out


__all__ = [
    "LAYOUTS",
    "split_batch",
    "check_length",
    "gather_sequence",
    "positions",
    "shift_labels",
    "split_sequence",
    "sp_cross_entropy",
]
