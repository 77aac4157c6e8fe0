"""Shared pieces of the sequence-parallel attentions: the ring loop with overlapped transfers, the
all-gathered key padding mask, and argument checks."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist

from parallel import comm
from parallel.sequence.data import LAYOUTS

_TAG_PAYLOAD, _TAG_ACC = 11, 12  # distinct tags: a block and an accumulator may be in flight


class Ring:
    """This rank's place in the ring of ``group`` (all ranks when ``None``)."""

    def __init__(self, group=None):
        self.group = group
        self.world = comm._world(group)
        if self.world == 1:
            self.rank, self.ranks = 0, [0]
        else:
            self.rank = dist.get_rank(group)
            self.ranks = dist.get_process_group_ranks(group or dist.group.WORLD)

    def start(self, send: torch.Tensor, recv: torch.Tensor, tag: int) -> list:
        """Send ``send`` to the next rank and receive ``recv`` from the previous one (started,
        not waited: the caller computes while the bytes move)."""
        nxt = self.ranks[(self.rank + 1) % self.world]
        prv = self.ranks[(self.rank - 1) % self.world]
        return comm.batch_isend_irecv(
            [
                dist.P2POp(dist.isend, send, nxt, self.group, tag),
                dist.P2POp(dist.irecv, recv, prv, self.group, tag),
            ]
        )

    def loop(
        self,
        payload: torch.Tensor,
        fn: Callable[[int, torch.Tensor], torch.Tensor | None],
        accumulate: bool = False,
    ) -> torch.Tensor | None:
        """Call ``fn(src, block)`` once per rank ``src`` of the ring with ``src``'s ``payload``
        (this rank's first). The transfer of the next block is started before ``fn`` runs, so
        it overlaps the compute; ``P - 1`` blocks are sent per rank.

        With ``accumulate``, ``fn`` returns a contribution for the block's owner; contributions
        travel with an accumulator that visits every rank and comes home after one extra pass
        (``P`` accumulator sends per rank, each overlapping the next ``fn``). Returns this
        rank's accumulated total (the sum over all ranks of their contribution to it)."""
        p, r = self.world, self.rank
        cur = payload.contiguous()
        acc, acc_works, acc_in = None, [], None
        for step in range(p):
            src = (r - step) % p
            works, nxt = [], None
            if step < p - 1:
                nxt = torch.empty_like(cur)
                works = self.start(cur, nxt, _TAG_PAYLOAD)
            out = fn(src, cur)
            if accumulate:
                for w in acc_works:
                    w.wait()
                acc = out if acc_in is None else acc_in.add_(out)
                if p > 1:
                    acc_in = torch.empty_like(acc)
                    acc_works = self.start(acc.contiguous(), acc_in, _TAG_ACC)
            for w in works:
                w.wait()
            if nxt is not None:
                cur = nxt
        if not accumulate:
            return None
        for w in acc_works:
            w.wait()
        return acc_in if p > 1 else acc


def gather_key_mask(
    key_padding_mask: torch.Tensor | None, ring: Ring, batch: int, n: int
) -> torch.Tensor | None:
    """Every rank's key padding mask, ``(P, B, n)`` bool (True = attend), in rank order.
    One small all-gather instead of sending the mask with every block."""
    if key_padding_mask is None:
        return None
    if key_padding_mask.shape != (batch, n):
        raise ValueError(
            f"key_padding_mask must be (batch, local_len) = {(batch, n)} bool, "
            f"got {tuple(key_padding_mask.shape)}"
        )
    m = key_padding_mask.to(torch.uint8).contiguous()
    return comm.all_gather(m.unsqueeze(0), dim=0, group=ring.group).bool()


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: str) -> None:
    if q.dim() != 4 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(
            "q, k, v must all be (batch, heads, local_len, head_dim) of the same shape, got "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)} (repeat grouped K/V heads first)"
        )
    if layout not in LAYOUTS:
        raise ValueError(f"unknown sequence layout {layout!r}; expected one of {LAYOUTS}")


def check_zigzag(n: int, world: int, causal: bool, layout: str) -> None:
    if causal and layout == "zigzag" and n % 2:
        raise ValueError(
            f"zigzag causal attention needs an even local length (L % (2*sp) == 0), got local "
            f"length {n} on sp={world} (L={n * world}); use L divisible by {2 * world}"
        )
