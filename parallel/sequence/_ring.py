"""Shared pieces of the sequence-parallel attentions: the ring loop with overlapped transfers, the
all-gathered key padding mask, and argument checks."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist

from parallel import comm
from parallel.sequence.data import LAYOUTS

# distinct tags: a block and an accumulator may be in flight; parts of one message add 0, 1, ...
_TAG_PAYLOAD, _TAG_ACC = 16, 32


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

    def start(
        self,
        send: torch.Tensor | Sequence[torch.Tensor],
        recv: torch.Tensor | Sequence[torch.Tensor],
        tag: int,
    ) -> list:
        """Send ``send`` to the next rank and receive ``recv`` from the previous one (started,
        not waited: the caller computes while the bytes move). A sequence is sent part by part
        (one message each), so a payload of separate tensors needs no stacked copy."""
        nxt = self.ranks[(self.rank + 1) % self.world]
        prv = self.ranks[(self.rank - 1) % self.world]
        sends = [send] if isinstance(send, torch.Tensor) else send
        recvs = [recv] if isinstance(recv, torch.Tensor) else recv
        return comm.batch_isend_irecv(
            [dist.P2POp(dist.isend, t.contiguous(), nxt, self.group, tag + i)
             for i, t in enumerate(sends)]
            + [dist.P2POp(dist.irecv, t, prv, self.group, tag + i) for i, t in enumerate(recvs)]
        )  # fmt: skip

    def loop(
        self,
        payload: torch.Tensor | Sequence[torch.Tensor],
        fn: Callable[[int, torch.Tensor], torch.Tensor | None],
        accumulate: bool = False,
    ) -> torch.Tensor | None:
        """Call ``fn(src, block)`` once per rank ``src`` of the ring with ``src``'s ``payload``
        (this rank's first; a sequence of tensors is computed on and sent part by part at the
        first step, so it is never copied, and travels stacked after that). The transfer of the next block is started before ``fn`` runs, so
        it overlaps the compute; ``P - 1`` blocks are sent per rank. Two buffers ping-pong: the
        one just computed on receives the block after next.

        With ``accumulate``, ``fn`` returns a contribution for the block's owner; contributions
        travel with an accumulator that visits every rank and comes home after one extra pass
        (``P`` accumulator sends per rank, each overlapping the next ``fn``). Returns this
        rank's accumulated total (the sum over all ranks of their contribution to it)."""
        p, r = self.world, self.rank
        cur = payload if isinstance(payload, torch.Tensor) else tuple(payload)
        spare = None  # the buffer computed on last step: free, receives the block after next
        acc, acc_works, acc_in = None, [], None
        for step in range(p):
            src = (r - step) % p
            works, nxt = [], None
            if step < p - 1:
                nxt = spare if spare is not None else _empty_pair(cur)
                spare = None
                recv = nxt if isinstance(cur, torch.Tensor) else list(nxt)
                works = self.start(cur, recv, _TAG_PAYLOAD)
            out = fn(src, cur)
            if accumulate:
                for w in acc_works:
                    w.wait()
                acc = out if acc_in is None else acc_in.add_(out)
                del out  # the contribution is in acc now: free it before the next block
                if p > 1:
                    acc_in = torch.empty_like(acc)
                    acc_works = self.start(acc, acc_in, _TAG_ACC)
            for w in works:
                w.wait()
            # the buffer just computed on is free unless it is the caller's payload: it receives
            # the block after next (if any; else it is freed now)
            mine = isinstance(cur, torch.Tensor) and cur is not payload
            spare = cur if mine and step + 2 < p else None
            cur = nxt
        if not accumulate:
            return None
        for w in acc_works:
            w.wait()
        return acc_in if p > 1 else acc

    def loop_into(
        self,
        payload: Sequence[torch.Tensor],
        fn: Callable[[int, torch.Tensor, torch.Tensor], None],
    ) -> torch.Tensor:
        """Backward ring with the accumulator updated in place: ``fn(src, block, acc)`` adds this
        rank's contribution to ``src``'s block into ``acc`` (shaped like the stacked payload),
        which arrived from the previous rank with every earlier rank's contributions in it and
        goes home after one extra hop. Returns this rank's accumulated total.

        Memory: while ``fn`` runs, a rank holds up to three stacked buffers besides its inputs
        (the block computed on, from the second step on; the next block being received; the
        accumulator); one process holds the accumulator only. The next block's transfer overlaps ``fn``; the accumulator hop runs
        between two blocks (it cannot start before ``fn`` has finished adding into it, and a
        second accumulator to overlap it with would cost one more stacked buffer). Each buffer
        is reused: the block just computed on receives the next accumulator, the accumulator
        just sent receives the block after next. ``P - 1`` block and ``P`` accumulator sends."""
        p, r = self.world, self.rank
        if p == 1:  # nothing travels: no stacked copy of the payload
            acc = _empty_pair(payload, zero=True)
            fn(r, payload, acc)
            return acc
        cur = tuple(payload)  # step 0 computes on (and sends) the payload itself: no copy
        acc = _empty_pair(cur, zero=True)
        spare = None  # the accumulator sent last: free, receives the block after next
        for step in range(p):
            works, nxt = [], None
            if step < p - 1:
                nxt = spare if spare is not None else _empty_pair(cur)
                spare = None
                recv = nxt if isinstance(cur, torch.Tensor) else list(nxt)  # parts at step 0
                works = self.start(cur, recv, _TAG_PAYLOAD)
            fn((r - step) % p, cur, acc)
            for w in works:
                w.wait()
            # the block just computed on takes the accumulator (not the caller's own payload)
            home = cur if isinstance(cur, torch.Tensor) else _empty_pair(cur)
            for w in self.start(acc, home, _TAG_ACC):
                w.wait()
            # the accumulator just sent receives the block after next (if any: else freed now)
            spare, acc, cur = (acc if step + 2 < p else None), home, nxt
        return acc


def _empty_pair(like: torch.Tensor | Sequence[torch.Tensor], zero: bool = False) -> torch.Tensor:
    """A receive buffer for ``like``: the same tensor shape, or its parts stacked."""
    t = like if isinstance(like, torch.Tensor) else like[0]
    shape = t.shape if isinstance(like, torch.Tensor) else (len(like), *t.shape)
    return (torch.zeros if zero else torch.empty)(shape, dtype=t.dtype, device=t.device)


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
