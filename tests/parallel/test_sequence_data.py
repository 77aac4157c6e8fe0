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
