"""Ring Attention (Liu et al., arXiv 2310.01889): attention over a sequence split across the ranks
of ``group``, with blockwise online softmax, so no rank ever holds an ``(L/P) x L`` score strip.

Each rank keeps its queries; key/value blocks travel around the ring (``P - 1`` sends per rank in
the forward, each started before the current block is computed so the transfer overlaps it).
Per block the partial output and its row log-sum-exp (LSE) are merged into the running ones:
``lse = logaddexp(lse, lse_b); out = out e^(lse_old - lse) + out_b e^(lse_b - lse)``.
The backward stores only ``q, k, v``, the output and the LSE, recomputes each block's
probabilities and adds each block's ``dK, dV`` in place into an accumulator that follows the block
around the ring (one hop between two blocks) and comes home.

Memory per rank (the bench's ``B H (L/P) D`` block as unit; ``colossus bench sp``): the kernel
holds one ``(B, H, tile, nk)`` score tile in the forward and two (``P``, ``dP``) in the backward,
each freed before the next tile's; the ring adds the block being computed on and the next one
being received (two stacked K/V pairs = 4 blocks) to what one process holds, and the dK/dV
accumulator takes the place of one process's dK, dV. Those 4 blocks are what overlapping each
transfer with a block's compute costs: a rank's own ``k, v`` stay alive (they are its inputs).

Causal masking uses the zigzag layout (:mod:`parallel.sequence.data`): rank ``r`` holds chunks
``r`` and ``2P-1-r``, so every rank computes one diagonal block (3/4 of it) and ``P-1`` half
blocks, the same work everywhere; fully masked sub-blocks are skipped. The contiguous layout is
accepted too (rank ``r`` then skips the blocks of ranks after it: correct but unbalanced).

Supported: causal and non-causal, a key padding mask (``(B, L/P)`` bool, True = attend) with
either; query rows with no key to attend to output 0 (as ``scaled_dot_product_attention``).

Example (one process: a ring of one is plain attention)::

    >>> import torch
    >>> from parallel.sequence.ring_attention import ring_attention
    >>> q, k, v = (torch.randn(1, 2, 8, 4) for _ in range(3))
    >>> out = ring_attention(q, k, v, causal=True)
    >>> ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    >>> torch.allclose(out, ref, atol=1e-6)
    True
"""

from __future__ import annotations

import torch

from parallel.sequence._ring import Ring, check_qkv, check_zigzag, gather_key_mask

# Rows of queries computed at once inside a block: the block kernel holds (B, H, tile, n) scores,
# so memory grows linearly in the local length n (the bench's "linear in L/P").
DEFAULT_Q_TILE = 512


def _hide(causal: bool, kpm: torch.Tensor | None, i0: int, t: int, nk: int, device):
    """Bool mask (broadcastable to (B, H, t, nk)) of the scores to drop, or None for none."""
    hide = None
    if causal:  # square, aligned sub-block: key j visible to query i iff j <= i
        hide = (
            torch.arange(nk, device=device)[None, :]
            > torch.arange(i0, i0 + t, device=device)[:, None]
        )
    if kpm is not None:
        km = ~kpm[:, None, None, :]
        hide = km if hide is None else hide | km
    return hide


def _safe(lse: torch.Tensor) -> torch.Tensor:
    # rows with no visible key have lse = -inf; subtracting 0 instead keeps exp() at 0, not NaN
    return torch.where(torch.isneginf(lse), torch.zeros_like(lse), lse)


def _scores(q, kt, causal, kpm, scale, i0, t, nk):
    """The (B, H, t, nk) fp32-or-input-dtype score tile of query rows i0..i0+t, masked at -inf."""
    s = torch.matmul(q[..., i0 : i0 + t, :], kt).mul_(scale)
    hide = _hide(causal, kpm, i0, t, nk, q.device)
    if hide is not None:
        s.masked_fill_(hide, float("-inf"))
    return s


def block_forward(q, k, v, causal: bool, kpm, scale: float, out, lse, tile: int = DEFAULT_Q_TILE):
    """Merge the softmax attention of ``q`` over one key block into the running ``out`` and its
    row log-sum-exp ``lse`` (both updated in place), one query tile at a time: the tile's
    ``(B, H, tile, nk)`` scores are the only large temporary (freed before the next tile), the
    rest is ``(B, H, tile, D)``. Hand-written in plain torch because
    ``scaled_dot_product_attention`` does not return the LSE on CPU through its public API (and
    its private kernels differ per device)."""
    nq, nk = q.shape[-2], k.shape[-2]
    kt = k.transpose(-1, -2)
    for i0 in range(0, nq, tile):
        t = min(tile, nq - i0)
        s = _scores(q, kt, causal, kpm, scale, i0, t, nk)
        m = _safe(s.amax(-1))
        p = s.sub_(m.unsqueeze(-1)).exp_()
        lse_b = p.sum(-1, dtype=lse.dtype).log_().add_(m)  # -inf for rows with no visible key
        o = torch.matmul(p, v).to(out.dtype)  # unnormalised: sum_j e^(s_ij - m_i) v_j
        del s, p
        # out <- out e^(lse - new) + o e^(m - new): o e^(m - new) = (o / l) e^(lse_b - new)
        o_t, lse_t = out[..., i0 : i0 + t, :], lse[..., i0 : i0 + t]
        new = torch.logaddexp(lse_t, lse_b)
        ns = _safe(new)
        o_t.mul_(torch.exp(lse_t - ns).unsqueeze(-1)).add_(o.mul_(torch.exp(m - ns).unsqueeze(-1)))
        lse_t.copy_(new)


def block_backward(q, k, v, do, lse, delta, causal, kpm, scale, dq, dk, dv, tile=DEFAULT_Q_TILE):
    """Add one block's gradients into ``dq`` (rows of ``q``), ``dk``, ``dv`` (rows of the key
    block), recomputing the probabilities from the final ``lse`` of each query row. Two score
    tiles are alive at once (``P`` and ``dP``); each is freed before the next tile's."""
    nq, nk = q.shape[-2], k.shape[-2]
    kt = k.transpose(-1, -2)
    for i0 in range(0, nq, tile):
        t = min(tile, nq - i0)
        qi, doi = q[..., i0 : i0 + t, :], do[..., i0 : i0 + t, :]
        s = _scores(q, kt, causal, kpm, scale, i0, t, nk)
        p = s.sub_(_safe(lse[..., i0 : i0 + t]).unsqueeze(-1)).exp_()
        dv.add_(torch.matmul(p.transpose(-1, -2), doi))
        dp = torch.matmul(doi, v.transpose(-1, -2))
        ds = p.mul_(dp.sub_(delta[..., i0 : i0 + t].unsqueeze(-1))).mul_(scale)
        del dp
        dq[..., i0 : i0 + t, :].add_(torch.matmul(ds, k))
        dk.add_(torch.matmul(ds.transpose(-1, -2), qi))
        del s, p, ds


def block_plan(rank: int, src: int, n: int, causal: bool, layout: str):
    """Which (query rows, key rows, causal-within) sub-blocks of the block (queries of ``rank``,
    keys of ``src``) have anything visible."""
    full = slice(0, n)
    if not causal:
        return [(full, full, False)]
    if layout == "contiguous":
        if src < rank:
            return [(full, full, False)]
        return [(full, full, True)] if src == rank else []
    c = n // 2
    h0, h1 = slice(0, c), slice(c, n)
    if src == rank:  # chunks (r, 2P-1-r) against themselves
        return [(h0, h0, True), (h1, h0, False), (h1, h1, True)]
    if src < rank:  # both query chunks see key chunk src, neither sees chunk 2P-1-src
        return [(full, h0, False)]
    return [(h1, full, False)]  # only chunk 2P-1-r sees anything of a later rank: all of it


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, group, causal, kpm_all, layout, scale, tile):
        ring = Ring(group)
        n = q.shape[-2]
        # the running output and LSE are merged P times: kept in fp32 for bf16 / fp16 inputs
        # (an LSE rounded to bf16 is off by up to 2^-8 |lse|, which exp(s - lse) amplifies)
        acc = torch.promote_types(q.dtype, torch.float32)
        out = torch.zeros(q.shape, dtype=acc, device=q.device)
        lse = torch.full(q.shape[:-1], float("-inf"), dtype=acc, device=q.device)

        def step(src, kv):
            kpm = None if kpm_all is None else kpm_all[src]
            for qs, ks, c in block_plan(ring.rank, src, n, causal, layout):
                block_forward(
                    q[..., qs, :],
                    kv[0][..., ks, :],
                    kv[1][..., ks, :],
                    c,
                    None if kpm is None else kpm[:, ks],
                    scale,
                    out[..., qs, :],
                    lse[..., qs],
                    tile,
                )

        if ring.world == 1:  # computes on k, v themselves: no stacked copy
            step(0, (k, v))
        else:  # K, V travel as one stacked block
            ring.loop([k, v], step)
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.args = (ring, causal, kpm_all, layout, scale, tile)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        ring, causal, kpm_all, layout, scale, tile = ctx.args
        n = q.shape[-2]
        dout = dout.contiguous()
        delta = (dout * out).sum(-1, dtype=lse.dtype)
        dq = torch.zeros(q.shape, dtype=lse.dtype, device=q.device)

        def step(src, kv, dkv):
            kpm = None if kpm_all is None else kpm_all[src]
            for qs, ks, c in block_plan(ring.rank, src, n, causal, layout):
                block_backward(
                    q[..., qs, :],
                    kv[0][..., ks, :],
                    kv[1][..., ks, :],
                    dout[..., qs, :],
                    lse[..., qs],
                    delta[..., qs],
                    c,
                    None if kpm is None else kpm[:, ks],
                    scale,
                    dq[..., qs, :],
                    dkv[0][..., ks, :],
                    dkv[1][..., ks, :],
                    tile,
                )

        dkv = ring.loop_into([k, v], step)  # dK, dV accumulated in place as they travel
        return dq.to(q.dtype), dkv[0], dkv[1], None, None, None, None, None, None


def ring_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    group=None,
    *,
    causal: bool = False,
    key_padding_mask: torch.Tensor | None = None,
    layout: str = "zigzag",
    scale: float | None = None,
    q_tile: int = DEFAULT_Q_TILE,
) -> torch.Tensor:
    """Attention of this rank's queries over the whole sequence of ``group``.

    ``q, k, v``: ``(B, H, L/P, D)``, this rank's tokens in ``layout`` (``zigzag`` default,
    ``contiguous``; the layout only matters when ``causal``). ``key_padding_mask``: ``(B, L/P)``
    bool, True = attend; pass one on every rank of the group or on none (it is all-gathered).
    ``scale`` defaults to ``D ** -0.5``. Returns ``(B, H, L/P, D)``."""
    check_qkv(q, k, v, layout)
    ring = Ring(group)
    if ring.world == 1:
        layout = "contiguous"  # one rank holds the sequence in order
    check_zigzag(q.shape[-2], ring.world, causal, layout)
    kpm_all = gather_key_mask(key_padding_mask, ring, q.shape[0], q.shape[-2])
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return _RingAttention.apply(q, k, v, group, causal, kpm_all, layout, scale, q_tile)


__all__ = ["ring_attention", "block_forward", "block_backward", "block_plan", "DEFAULT_Q_TILE"]
