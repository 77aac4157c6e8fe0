"""Sequence parallelism: a sequence split across the ranks of a process group, attention computed
by ring self-attention (RSA, Li et al. 2105.13120), Ring Attention with online softmax (Liu et al.
2310.01889) or DeepSpeed-Ulysses all-to-all; the data path (layouts, position ids, the loss over
all tokens) is in :mod:`parallel.sequence.data`.

The attention functions live in modules of their own name (``parallel.sequence.ring_attention.
ring_attention`` etc.; not re-exported here, which would shadow the modules). Each takes this
rank's tokens ``(B, H, L/P, D)`` and an explicit ``group``.

What each variant supports (tested in fp32 on gloo; autograd through all of them)::

    variant              causal  non-causal  key padding  layouts             sp limit
    ring_attention       yes     yes         yes          zigzag, contiguous  L % sp (2 sp zigzag)
    ring_self_attention  yes     yes         yes          zigzag, contiguous  L % sp (2 sp zigzag)
    ulysses              yes     yes         yes          zigzag, contiguous  + heads % sp == 0

Per-rank memory: ring attention ~ L/sp (one query tile x L/sp scores at a time), RSA ~ L^2/sp
(the score strip), Ulysses ~ L/sp (SDPA on whole sequences of H/sp heads). Not supported:
attention dropout, KV caches (training only), a key padding mask given on some ranks only.
Composes with data parallelism (use ``parallel.topology.Topology(dp, sp).sp_group`` and reduce
gradients over sp then dp); with tensor parallelism only where the attention heads a rank holds
after tp are what the variant sees (Ulysses then needs ``(heads / tp) % sp == 0``) - not wired
in the Trainer yet.
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
