"""parallel.sequence.data: layouts partition the sequence, gather inverts split, labels are
shifted on the whole sequence, and the sp loss over a group of one is the plain mean."""

import pytest
import torch
import torch.nn.functional as F

from parallel.sequence.data import (
    gather_sequence,
    positions,
    shift_labels,
    sp_cross_entropy,
    split_batch,
    split_sequence,
)


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_layouts_partition_and_invert(layout, world):
    L = 2 * world * 3
    pos = torch.cat([positions(L, r, world, layout) for r in range(world)])
    assert sorted(pos.tolist()) == list(range(L))
    x = torch.arange(2 * L).view(2, L)
    parts = [split_sequence(x, r, world, layout) for r in range(world)]
    assert all(torch.equal(p, x[:, positions(L, r, world, layout)]) for r, p in enumerate(parts))
    assert torch.equal(gather_sequence(parts, layout), x)


def test_zigzag_balances_causal_work():
    """Visible (query, key) pairs under a causal mask are the same on every rank."""
    L, world = 32, 4
    work = [sum(int(q) + 1 for q in positions(L, r, world, "zigzag")) for r in range(world)]
    assert len(set(work)) == 1
    contiguous = [sum(int(q) + 1 for q in positions(L, r, world)) for r in range(world)]
    assert len(set(contiguous)) == world  # the contiguous layout is unbalanced


def test_shift_labels_and_loss_of_one_rank():
    ids = torch.tensor([[5, 6, 7, 8]])
    assert shift_labels(ids).tolist() == [[6, 7, 8, -100]]
    logits = torch.randn(1, 4, 10, requires_grad=True)
    labels = shift_labels(ids)
    loss = sp_cross_entropy(logits, labels)
    ref = F.cross_entropy(logits.view(-1, 10), labels.view(-1), ignore_index=-100)
    assert torch.allclose(loss, ref)
    (g,) = torch.autograd.grad(loss, logits)
    (gr,) = torch.autograd.grad(ref, logits)
    assert torch.allclose(g, gr)


def test_split_batch():
    ids = torch.arange(16).view(2, 8)
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, 6:] = 0
    got = split_batch({"input_ids": ids, "attention_mask": mask}, rank=1, world=2)
    pos = [2, 3, 4, 5]  # zigzag: chunks 1 and 2 of 4
    assert got["input_ids"].tolist() == [[2, 3, 4, 5], [10, 11, 12, 13]]
    assert got["position_ids"].tolist() == [pos, pos]
    assert got["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 1, 1]]
    # labels: the next token of the whole sequence; padding and the last position ignored
    assert got["labels"].tolist() == [[3, 4, 5, 6], [11, 12, 13, -100]]
    with pytest.raises(ValueError, match=r"L % \(2\*sp\) == 0"):
        split_batch({"input_ids": torch.zeros(1, 6, dtype=torch.long)}, 0, 2)
