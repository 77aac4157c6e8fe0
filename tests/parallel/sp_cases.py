"""Shared pieces of the sequence-parallel tests: the float64 full-attention reference and the
worker that runs every case of one world size in one spawn."""

from __future__ import annotations

import importlib
import math

import torch
import torch.distributed as dist

from parallel import comm
from parallel.sequence.data import split_sequence

VARIANTS = {
    "ring_attention": ("parallel.sequence.ring_attention", "ring_attention"),
    "ring_self_attention": ("parallel.sequence.ring_self_attention", "ring_self_attention"),
    "ulysses": ("parallel.sequence.ulysses", "ulysses_attention"),
}
B, H, D = 2, 8, 4


def attention_fn(variant: str):
    mod, name = VARIANTS[variant]
    return getattr(importlib.import_module(mod), name)


def full_inputs(length: int, seed: int, masked: bool):
    g = torch.Generator().manual_seed(seed)
    q, k, v, do = (torch.randn(B, H, length, D, generator=g) for _ in range(4))
    kpm = None
    if masked:
        kpm = torch.rand(B, length, generator=g) > 0.3
        kpm[1, : length // 2] = False  # a long run of padding: whole blocks of keys masked
        kpm[0, 0] = False  # causal: query 0 of row 0 sees no key at all (output 0)
    return q, k, v, do, kpm


def reference(q, k, v, do, kpm, causal: bool):
    """Float64 transcription of softmax(q k^T / sqrt(d)) v with masked scores at -inf and rows with
    no visible key set to 0; returns out, dq, dk, dv."""
    q, k, v = (t.double().requires_grad_() for t in (q, k, v))
    n = q.shape[-2]
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    keep = torch.ones(n, n, dtype=torch.bool)
    if causal:
        keep = keep.tril()
    keep = keep.expand(q.shape[0], 1, n, n)
    if kpm is not None:
        keep = keep & kpm[:, None, None, :]
    s = s.masked_fill(~keep, float("-inf"))
    p = torch.softmax(s, -1).nan_to_num(0.0)
    out = p @ v
    grads = torch.autograd.grad(out, (q, k, v), do.double())
    return (out.detach(), *grads)


def run_case(group, variant, length, causal, masked, layout, seed):
    """This rank's out, dq, dk, dv (its tokens) and the comm stats of forward and backward."""
    p, r = dist.get_world_size(group), dist.get_rank(group)
    q, k, v, do, kpm = full_inputs(length, seed, masked)
    # a length zigzag cannot split is split contiguously, so the attention's own check is hit
    split = layout if length % (2 * p) == 0 else "contiguous"
    part = [split_sequence(t, r, p, split, dim=2).clone().requires_grad_() for t in (q, k, v)]
    dol = split_sequence(do, r, p, split, dim=2)
    kpml = None if kpm is None else split_sequence(kpm, r, p, split, dim=1)
    fn = attention_fn(variant)
    comm.reset_stats()
    out = fn(*part, group, causal=causal, key_padding_mask=kpml, layout=layout)
    fwd = comm.stats()
    comm.reset_stats()
    out.backward(dol)
    bwd = comm.stats()
    return {
        "out": out.detach(),
        "grads": [t.grad for t in part],
        "fwd": fwd,
        "bwd": bwd,
    }


def overlap_trace(group) -> list[str]:
    """Order of 'transfer started' and 'block computed' events in a ring-attention forward."""
    import parallel.sequence.ring_attention as ra

    log: list[str] = []
    start, block = comm.batch_isend_irecv, ra.block_forward

    def logged_start(ops):
        log.append("transfer")
        return start(ops)

    def logged_block(*a, **kw):
        log.append("compute")
        return block(*a, **kw)

    comm.batch_isend_irecv, ra.block_forward = logged_start, logged_block
    try:
        x = torch.randn(1, 2, 4, 4)
        ra.ring_attention(x, x, x, group)
    finally:
        comm.batch_isend_irecv, ra.block_forward = start, block
    return log


def worker(cases):
    group = dist.new_group(list(range(dist.get_world_size())))
    comm.register_group(group, "sp")
    res = {}
    for case in cases:
        try:
            res[case] = run_case(group, *case)
        except ValueError as e:  # divisibility errors: the message is what the test checks
            res[case] = {"error": str(e)}
    if dist.get_world_size() == 4:
        res["overlap"] = overlap_trace(group)
    if dist.get_world_size() == 4:  # Ulysses with heads (6) not divisible by sp (4)
        from parallel.sequence.ulysses import ulysses_attention

        x = torch.zeros(1, 6, 2, 4)
        try:
            ulysses_attention(x, x, x, group)
        except ValueError as e:
            res["heads_error"] = str(e)
    return res
