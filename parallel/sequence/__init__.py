"""Sequence parallelism: a sequence split across the ranks of a process group, attention computed
by ring self-attention (RSA, Li et al. 2105.13120), Ring Attention with online softmax (Liu et al.
2310.01889) or DeepSpeed-Ulysses all-to-all; the data path (layouts, position ids, the loss over
all tokens) is in :mod:`parallel.sequence.data`.

The attention functions live in modules of their own name (``parallel.sequence.ring_attention.
ring_attention`` etc.; not re-exported here, which would shadow the modules). Each takes this rank's tokens ``(B, H, L/P, D)`` and an explicit ``group``.
"""

from parallel.sequence.data import (
    gather_sequence,
    positions,
    shift_labels,
    sp_cross_entropy,
    split_sequence,
)

__all__ = [
    "gather_sequence",
    "positions",
    "shift_labels",
    "sp_cross_entropy",
    "split_sequence",
]
