"""DeepSpeed-Ulysses attention (Jacobs et al., arXiv 2309.14509): one all-to-all turns this
rank's ``L/P`` tokens of all ``H`` heads into all ``L`` tokens of ``H/P`` heads, attention runs
locally on whole sequences (``scaled_dot_product_attention``), and a second all-to-all turns the
output back. Needs ``heads % sp == 0``. Per rank and direction it sends ``(P-1)/P`` of its
``q, k, v`` (fused into one all-to-all) and of its output, independent of the ring.

Masks: causal (the gathered tokens are put in position order first, so any layout works and
the unmasked causal case runs SDPA's ``is_causal`` kernel), and a key padding mask
``(B, L/P)`` bool (True = attend), all-gathered once; rows with no visible key output 0.

Example (one process)::

    >>> import torch
    >>> from parallel.sequence.ulysses import ulysses_attention
    >>> q, k, v = (torch.randn(1, 2, 6, 4) for _ in range(3))
    >>> out = ulysses_attention(q, k, v, causal=True)
    >>> ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    >>> torch.allclose(out, ref, atol=1e-6)
    True
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from parallel import comm
from parallel.sequence._ring import Ring, check_qkv, check_zigzag, gather_key_mask
from parallel.sequence.data import positions


def _seq_to_head(x: torch.Tensor, group, p: int) -> torch.Tensor:
    """(G, H, n, D) this rank's tokens -> (G, H/P, P*n, D) this rank's heads, rank-block order."""
    g, h, n, d = x.shape
    inp = x.reshape(g, p, h // p, n, d).permute(1, 0, 2, 3, 4).contiguous()
    out = torch.empty_like(inp)
    comm.all_to_all_single(out, inp, group=group)
    return out.permute(1, 2, 0, 3, 4).reshape(g, h // p, p * n, d)


def _head_to_seq(y: torch.Tensor, group, p: int) -> torch.Tensor:
    """Inverse of :func:`_seq_to_head`."""
    g, hp, L, d = y.shape
    inp = y.reshape(g, hp, p, L // p, d).permute(2, 0, 1, 3, 4).contiguous()
    out = torch.empty_like(inp)
    comm.all_to_all_single(out, inp, group=group)
    return out.permute(1, 0, 2, 3, 4).reshape(g, hp * p, L // p, d)


class _SeqToHead(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, p):
        ctx.args = (group, p)
        return _seq_to_head(x, group, p)

    @staticmethod
    def backward(ctx, dy):
        return _head_to_seq(dy.contiguous(), *ctx.args), None, None


class _HeadToSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, group, p):
        ctx.args = (group, p)
        return _head_to_seq(y, group, p)

    @staticmethod
    def backward(ctx, dx):
        return _seq_to_head(dx.contiguous(), *ctx.args), None, None


def ulysses_attention(
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
    """Ulysses over the sequence of ``group``; same arguments as
    :func:`parallel.sequence.ring_attention.ring_attention`. Returns ``(B, H, L/P, D)``."""
    check_qkv(q, k, v, layout)
    ring = Ring(group)
    p, (b, h, n, d) = ring.world, q.shape
    if h % p:
        divisors = [s for s in range(1, h + 1) if h % s == 0]
        raise ValueError(
            f"ulysses needs the number of heads divisible by sp: heads={h}, sp={p}; "
            f"valid sp for {h} heads: {divisors} (or use ring_attention)"
        )
    if p == 1:
        layout = "contiguous"
    check_zigzag(n, p, causal, layout)
    kpm_all = gather_key_mask(key_padding_mask, ring, b, n)
    qkv = _SeqToHead.apply(torch.stack([q, k, v]).reshape(3 * b, h, n, d), group, p)
    qh, kh, vh = qkv.reshape(3, b, h // p, p * n, d).unbind(0)
    L = p * n
    order = None  # gathered (rank-block) order -> position order, so causal is a plain tril
    if layout != "contiguous":
        pos = torch.cat([positions(L, s, p, layout) for s in range(p)]).to(q.device)
        order = torch.argsort(pos)
        qh, kh, vh = (t.index_select(2, order) for t in (qh, kh, vh))
    mask = None
    if kpm_all is not None:
        km = kpm_all.permute(1, 0, 2).reshape(b, L)
        if order is not None:
            km = km.index_select(1, order)
        mask = km[:, None, None, :]
        if causal:
            mask = mask & torch.ones(L, L, dtype=torch.bool, device=q.device).tril()
    out = F.scaled_dot_product_attention(
        qh, kh, vh, attn_mask=mask, is_causal=causal and mask is None, scale=scale
    )
    if order is not None:
        out = out.index_select(2, pos)  # position order -> gathered order (pos inverts order)
    return _HeadToSeq.apply(out.contiguous(), group, p)


__all__ = ["ulysses_attention"]
