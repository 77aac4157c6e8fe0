"""Ring self-attention (RSA; Li et al., "Sequence Parallelism", arXiv 2105.13120): every rank holds
``L/P`` queries, keys and values; the key blocks travel around the ring to fill this rank's
``(L/P) x L`` score strip, the softmax runs over full rows, then the value blocks travel around
to form the output. The strip (the probabilities) is kept for the backward, which is ring passes
as well: values again (for ``dP``, with a ``dV`` accumulator that goes home), then keys again
(for ``dQ``, with a ``dK`` accumulator). Memory per rank therefore grows as ``L^2 / P``; see
:mod:`parallel.sequence.ring_attention` for the variant without a strip.

Masks come from global positions (any layout): causal, and a key padding mask ``(B, L/P)``
(True = attend); query rows with no visible key output 0.

Example (one process)::

    >>> import torch
    >>> from parallel.sequence.ring_self_attention import ring_self_attention
    >>> q, k, v = (torch.randn(1, 2, 6, 4) for _ in range(3))
    >>> out = ring_self_attention(q, k, v, causal=True)
    >>> ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    >>> torch.allclose(out, ref, atol=1e-6)
    True
"""

from __future__ import annotations

import torch

from parallel.sequence._ring import Ring, check_qkv, check_zigzag, gather_key_mask
from parallel.sequence.data import positions


def _strip_keep(ring: Ring, n: int, causal: bool, kpm_all, layout: str, device):
    """Bool mask of the strip (broadcastable to (B, H, n, P*n)); columns in rank-block order."""
    keep = None
    if causal:
        L = n * ring.world
        pos = torch.cat([positions(L, s, ring.world, layout) for s in range(ring.world)])
        pos = pos.to(device)
        mine = pos[ring.rank * n : (ring.rank + 1) * n]
        keep = pos[None, :] <= mine[:, None]
    if kpm_all is not None:
        km = kpm_all.permute(1, 0, 2).reshape(kpm_all.shape[1], 1, 1, -1)  # (B,1,1,P*n)
        keep = km if keep is None else keep & km
    return keep


class _RingSelfAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, group, causal, kpm_all, layout, scale):
        ring = Ring(group)
        n = q.shape[-2]
        strip = torch.empty(*q.shape[:-1], n * ring.world, dtype=q.dtype, device=q.device)

        def scores(src, kb):
            strip[..., src * n : (src + 1) * n] = torch.matmul(q, kb.transpose(-1, -2))

        ring.loop(k, scores)
        strip.mul_(scale)
        keep = _strip_keep(ring, n, causal, kpm_all, layout, q.device)
        if keep is not None:
            strip.masked_fill_(~keep, float("-inf"))
        m = strip.amax(-1, keepdim=True)
        m = torch.where(torch.isneginf(m), torch.zeros_like(m), m)  # empty rows stay 0, not NaN
        probs = strip.sub_(m).exp_()
        probs.div_(probs.sum(-1, keepdim=True).clamp_min(torch.finfo(q.dtype).tiny))
        out = torch.zeros_like(q)

        def weigh(src, vb):
            out.add_(torch.matmul(probs[..., src * n : (src + 1) * n], vb))

        ring.loop(v, weigh)
        ctx.save_for_backward(q, k, v, probs)
        ctx.args = (ring, scale)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, probs = ctx.saved_tensors
        ring, scale = ctx.args
        n = q.shape[-2]
        dout = dout.contiguous()
        dprobs = torch.empty_like(probs)

        def values(src, vb):
            blk = slice(src * n, (src + 1) * n)
            dprobs[..., blk] = torch.matmul(dout, vb.transpose(-1, -2))
            return torch.matmul(probs[..., blk].transpose(-1, -2), dout)  # dV of src's block

        dv = ring.loop(v, values, accumulate=True)
        # softmax backward over full rows: dS = P * (dP - rowsum(P * dP)); masked P are 0
        ds = dprobs.sub_((dprobs * probs).sum(-1, keepdim=True)).mul_(probs).mul_(scale)
        dq = torch.zeros_like(q)

        def keys(src, kb):
            blk = ds[..., src * n : (src + 1) * n]
            dq.add_(torch.matmul(blk, kb))
            return torch.matmul(blk.transpose(-1, -2), q)  # dK of src's block

        dk = ring.loop(k, keys, accumulate=True)
        return dq, dk, dv, None, None, None, None, None


def ring_self_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    group=None,
    *,
    causal: bool = False,
    key_padding_mask: torch.Tensor | None = None,
    layout: str = "zigzag",
    scale: float | None = None,
) -> torch.Tensor:
    """RSA over the sequence of ``group``; same arguments as
    :func:`parallel.sequence.ring_attention.ring_attention` (``q, k, v``: ``(B, H, L/P, D)`` in
    ``layout``; ``key_padding_mask`` ``(B, L/P)`` bool, True = attend). Returns ``(B, H, L/P, D)``."""
    check_qkv(q, k, v, layout)
    ring = Ring(group)
    if ring.world == 1:
        layout = "contiguous"
    check_zigzag(q.shape[-2], ring.world, causal, layout)
    kpm_all = gather_key_mask(key_padding_mask, ring, q.shape[0], q.shape[-2])
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return _RingSelfAttention.apply(q, k, v, group, causal, kpm_all, layout, scale)


__all__ = ["ring_self_attention"]
