"""The one layer every collective of ``parallel`` goes through: it counts calls and bytes per
named process group, so tests and benches can check communication volume against the closed-form
figures of the papers (Megatron, Optimus 2104.05343, Tesseract 2105.14500, 3D 2105.14450).

Two byte counts are kept per (group, op):

- ``payload``: bytes of the tensor this rank hands to the collective (its input; for all-gather
  its shard, for reduce-scatter its full input, for P2P what it sends).
- ``sent``: bytes this rank puts on the wire under the bandwidth-optimal (ring) algorithm, the
  model the papers use: all-reduce ``2 (p-1)/p n``, all-gather ``(p-1) n_shard``, reduce-scatter
  ``(p-1)/p n``, all-to-all ``(p-1)/p n``, broadcast ``n`` on the root and ``0`` elsewhere
  (a tree broadcast is counted as the root sending once), P2P send ``n``. ``n`` is bytes.
  A group of one rank sends nothing and the collective is skipped (no call is counted).

Example::

    >>> import torch
    >>> from parallel import comm
    >>> comm.reset_stats()
    >>> t = torch.ones(4)
    >>> comm.all_reduce(t)  # no process group: a world of one, nothing happens
    >>> comm.stats()
    {}
"""

from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

# torch >= 2.13 renames {all_gather_into,reduce_scatter}_tensor -> *_single (old names warn)
_all_gather_fused = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_fused = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


@dataclass
class OpStats:
    calls: int = 0
    payload: int = 0
    """Bytes of the tensors this rank handed to the op."""
    sent: float = 0.0
    """Bytes this rank sends under the ring model (see the module docstring)."""


_lock = threading.Lock()
_stats: dict[str, dict[str, OpStats]] = defaultdict(lambda: defaultdict(OpStats))
_names: dict[int, str] = {}


def register_group(group: dist.ProcessGroup | None, name: str) -> None:
    """Name a process group in the statistics (``tp_row``, ``sp``, ...)."""
    _names[id(group)] = name


def group_name(group: dist.ProcessGroup | None) -> str:
    if id(group) in _names:
        return _names[id(group)]
    return "world" if group is None or group is dist.group.WORLD else f"group@{id(group):x}"


def stats() -> dict[str, dict[str, dict[str, float]]]:
    """``{group: {op: {"calls", "payload", "sent"}}}`` since the last :func:`reset_stats`."""
    with _lock:
        return {
            g: {
                op: {"calls": s.calls, "payload": s.payload, "sent": s.sent}
                for op, s in ops.items()
            }
            for g, ops in _stats.items()
        }


def sent_bytes(group: str | None = None) -> float:
    """Total ring-model bytes this rank sent (in one group, or over all groups)."""
    with _lock:
        groups = [group] if group is not None else list(_stats)
        return sum(s.sent for g in groups for s in _stats.get(g, {}).values())


def reset_stats() -> None:
    with _lock:
        _stats.clear()


def _world(group) -> int:
    if not dist.is_available() or not dist.is_initialized():
        return 1
    return dist.get_world_size(group)


def _count(group, op: str, payload: int, sent: float) -> None:
    with _lock:
        s = _stats[group_name(group)][op]
        s.calls += 1
        s.payload += payload
        s.sent += sent


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


# ---- collectives -------------------------------------------------------------------------


def all_reduce(t: torch.Tensor, group=None, op=None, async_op: bool = False):
    """In-place sum (or ``op``) over the group."""
    p = _world(group)
    if p == 1:
        return None
    n = _nbytes(t)
    _count(group, "all_reduce", n, 2 * (p - 1) * n / p)
    return dist.all_reduce(t, op=op or dist.ReduceOp.SUM, group=group, async_op=async_op)


def all_gather_into(out: torch.Tensor, shard: torch.Tensor, group=None, async_op: bool = False):
    """``out`` (``p`` times ``shard`` along dim 0, flat order) ``[r] = shard of rank r``."""
    p = _world(group)
    if p == 1:
        out.copy_(shard.reshape(out.shape))
        return None
    n = _nbytes(shard)
    _count(group, "all_gather", n, (p - 1) * n)
    try:
        # flat views: gloo's fused all-gather checks out.shape[0] == p * shard.shape[0]
        return _all_gather_fused(
            out.view(-1), shard.contiguous().view(-1), group=group, async_op=async_op
        )
    except (RuntimeError, NotImplementedError):
        # a backend without the fused form: list all_gather into views of ``out``
        return dist.all_gather(
            list(out.view(p, -1).unbind(0)),
            shard.contiguous().view(-1),
            group=group,
            async_op=async_op,
        )


def all_gather(t: torch.Tensor, dim: int = 0, group=None) -> torch.Tensor:
    """Concatenate every rank's ``t`` along ``dim`` (equal shapes)."""
    p = _world(group)
    if p == 1:
        return t
    t = t.contiguous()
    out = torch.empty((p, *t.shape), dtype=t.dtype, device=t.device)
    all_gather_into(out, t, group=group)
    if dim == 0:
        return out.reshape(p * t.shape[0], *t.shape[1:])
    return torch.cat(out.unbind(0), dim=dim)


def reduce_scatter_into(out: torch.Tensor, full: torch.Tensor, group=None, async_op: bool = False):
    """``out = sum over ranks of full[rank-th slice along dim 0]``."""
    p = _world(group)
    if p == 1:
        out.copy_(full.reshape(out.shape))
        return None
    n = _nbytes(full)
    _count(group, "reduce_scatter", n, (p - 1) * n / p)
    full = full.contiguous()
    try:
        # flat views: gloo's fused reduce-scatter checks full.shape[0] == p * out.shape[0]
        return _reduce_scatter_fused(
            out.view(-1), full.view(-1), op=dist.ReduceOp.SUM, group=group, async_op=async_op
        )
    except (RuntimeError, NotImplementedError):
        # gloo builds without reduce_scatter: all-reduce a copy, keep our slice (same sum)
        tmp = full.clone()
        dist.all_reduce(tmp, group=group)
        r = dist.get_rank(group)
        out.copy_(tmp.view(p, -1)[r].view(out.shape))
        return None


def reduce_scatter(t: torch.Tensor, dim: int = 0, group=None) -> torch.Tensor:
    """Sum over ranks, then keep this rank's ``1/p`` slice along ``dim`` (divisible)."""
    p = _world(group)
    if p == 1:
        return t
    if t.shape[dim] % p:
        raise ValueError(f"reduce_scatter: dim {dim} of size {t.shape[dim]} not divisible by {p}")
    parts = torch.stack(t.chunk(p, dim=dim)).contiguous()
    out = torch.empty_like(parts[0])
    reduce_scatter_into(out, parts, group=group)
    return out


def broadcast(t: torch.Tensor, src: int, group=None, async_op: bool = False):
    """In place from global rank ``src``."""
    p = _world(group)
    if p == 1:
        return None
    n = _nbytes(t)
    _count(group, "broadcast", n, n if dist.get_rank() == src else 0)
    return dist.broadcast(t, src=src, group=group, async_op=async_op)


def all_to_all_single(
    out: torch.Tensor,
    inp: torch.Tensor,
    group=None,
    out_splits: Sequence[int] | None = None,
    in_splits: Sequence[int] | None = None,
    async_op: bool = False,
):
    """``inp`` split in ``p`` parts along dim 0, part ``j`` to rank ``j``; ``out`` gathers them."""
    p = _world(group)
    if p == 1:
        out.copy_(inp)
        return None
    n = _nbytes(inp)
    if in_splits is None:
        sent = (p - 1) * n / p
    else:
        row = n // max(inp.shape[0], 1)
        me = dist.get_rank(group)
        sent = sum(s * row for j, s in enumerate(in_splits) if j != me)
    _count(group, "all_to_all", n, sent)
    return dist.all_to_all_single(
        out,
        inp.contiguous(),
        output_split_sizes=out_splits,
        input_split_sizes=in_splits,
        group=group,
        async_op=async_op,
    )


def batch_isend_irecv(ops: list[dist.P2POp]) -> list:
    """Batched point-to-point (ring passes): counts what this rank sends, returns the works."""
    for o in ops:
        if o.op in (dist.isend, getattr(dist, "isend", None)):
            n = _nbytes(o.tensor)
            _count(o.group, "send", n, n)
    return dist.batch_isend_irecv(ops) if ops else []


def ring_pass(
    send: torch.Tensor, recv: torch.Tensor, group=None, ranks: Sequence[int] | None = None
) -> list:
    """Start sending ``send`` to the next rank of the ring while receiving ``recv`` from the
    previous one; returns works to ``wait()``. ``ranks`` are the group's global ranks in ring
    order (default: the group's ranks)."""
    p = _world(group)
    if p == 1:
        recv.copy_(send)
        return []
    ranks = (
        list(ranks)
        if ranks is not None
        else dist.get_process_group_ranks(group or dist.group.WORLD)
    )
    me = ranks.index(dist.get_rank())
    ops = [
        dist.P2POp(dist.isend, send.contiguous(), ranks[(me + 1) % p], group),
        dist.P2POp(dist.irecv, recv, ranks[(me - 1) % p], group),
    ]
    return batch_isend_irecv(ops)
