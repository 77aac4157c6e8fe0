"""Sequence-parallel attention on spawned gloo ranks (fp32) against a float64 full-attention
reference: each variant's output and dQ, dK, dV on every rank within 1e-5, causal and not, with
and without a key padding mask, at sp = 2, 4, 8 on lengths that are not powers of two; the comm
volume of each variant; the divisibility errors."""

from __future__ import annotations

import pytest
import torch
from sp_cases import B, D, H, full_inputs, reference, worker
from spawn_helpers import spawn

from parallel.sequence.data import check_length, split_sequence

LENGTHS = {2: 12, 4: 24, 8: 48}  # L % (2 sp) == 0 for zigzag; none a power of two
VARIANTS = ["ring_attention", "ring_self_attention", "ulysses"]
ATOL = 1e-5


def _cases(world: int, variants: list[str]) -> list[tuple]:
    L = LENGTHS[world]
    cases = []
    for variant in variants:
        for causal in (False, True):
            for masked in (False, True):
                cases.append((variant, L, causal, masked, "zigzag", 7))
        cases.append((variant, L, True, True, "contiguous", 8))
    # local length 3 (odd): zigzag causal cannot split it into two chunks
    cases.append(("ring_attention", 3 * world, True, False, "zigzag", 9))
    return cases


def _check(world: int, res: list[dict], variants: list[str]) -> None:
    for case in _cases(world, variants):
        variant, L, causal, masked, layout, seed = case
        if L % (2 * world) and layout == "zigzag":
            for r in range(world):
                msg = res[r][case]["error"]
                assert "L % (2*sp) == 0" in msg, msg
            continue
        q, k, v, do, kpm = full_inputs(L, seed, masked)
        ref = reference(q, k, v, do, kpm, causal)
        n = L // world
        for r in range(world):
            got = res[r][case]
            assert "error" not in got, (case, got)
            want = [split_sequence(t, r, world, layout, dim=2) for t in ref]
            for name, g, w in zip(("out", "dq", "dk", "dv"), [got["out"], *got["grads"]], want):
                err = (g.double() - w).abs().max().item()
                assert err <= ATOL, (case, r, name, err)
            _check_comm(variant, world, n, masked, got["fwd"], got["bwd"])


def _check_comm(variant, p, n, masked, fwd, bwd):
    block = B * H * n * D * 4  # one rank's K (or V) in bytes
    f, b = fwd["sp"], bwd["sp"]
    if masked:
        assert f["all_gather"]["calls"] == 1  # the small key padding mask, once
    if variant == "ring_attention":
        # forward: P-1 (K,V) blocks; backward: P-1 (K,V) blocks + P (dK,dV) accumulators. The
        # first hop sends K and V as two messages (no stacked copy of the inputs), later hops
        # one stacked message
        assert f["send"]["calls"] == p and f["send"]["payload"] == (p - 1) * 2 * block
        assert b["send"]["calls"] == 2 * p
        assert b["send"]["payload"] == (2 * p - 1) * 2 * block
    elif variant == "ring_self_attention":
        # forward: K ring then V ring; backward: V ring (+dV home) then K ring (+dK home)
        assert f["send"]["calls"] == 2 * (p - 1) and f["send"]["payload"] == 2 * (p - 1) * block
        assert b["send"]["calls"] == 2 * (2 * p - 1)
        assert b["send"]["payload"] == 2 * (2 * p - 1) * block
    else:
        # forward: q, k, v to heads (one fused call) and the output back; backward: reversed
        assert f["all_to_all"]["calls"] == 2 and f["all_to_all"]["payload"] == 4 * block
        assert b["all_to_all"]["calls"] == 2 and b["all_to_all"]["payload"] == 4 * block
        assert f["all_to_all"]["sent"] == 4 * block * (p - 1) / p


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4, 8])
def test_sequence_parallel_attention_matches_full(tmp_path, world):
    res = spawn(worker, world, tmp_path, _cases(world, VARIANTS))
    _check(world, res, VARIANTS)
    if world == 4:
        for r in range(world):
            # each next block's transfer is started before the current block is computed
            assert res[r]["overlap"] == ["transfer", "compute"] * 3 + ["compute"]
            msg = res[r]["heads_error"]
            assert "heads=6, sp=4" in msg and "valid sp for 6 heads: [1, 2, 3, 6]" in msg, msg


def test_divisibility_rules():
    check_length(24, 4, "zigzag")
    with pytest.raises(ValueError, match=r"L % \(2\*sp\) == 0 \(L % 8 == 0\)"):
        check_length(20, 4, "zigzag")
    with pytest.raises(ValueError, match=r"L % sp == 0 \(L % 3 == 0\); pad or cut to 9 or 12"):
        check_length(10, 3, "contiguous")
    with pytest.raises(ValueError, match="unknown sequence layout"):
        check_length(8, 2, "striped")


def test_one_process_is_plain_attention():
    """A group of one: every variant is full attention (no communication)."""
    from sp_cases import attention_fn

    q, k, v, do, kpm = full_inputs(10, 3, True)
    for variant in VARIANTS:
        for causal in (False, True):
            qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
            out = attention_fn(variant)(qq, kk, vv, causal=causal, key_padding_mask=kpm)
            out.backward(do)
            ref = reference(q, k, v, do, kpm, causal)
            for g, w in zip([out, qq.grad, kk.grad, vv.grad], ref):
                assert torch.allclose(g.double(), w, atol=ATOL), variant
