"""``colossus bench sp`` end to end on tiny sizes: the JSON holds a row per (variant, L, sp), the
bytes sent equal the closed forms on every rank, sp=2 needs less memory per rank than one
process for ring attention (and at most 4 blocks more than one process with as many tokens),
impossible configs are rows with the reason, and the plot is drawn."""

import json

import pytest

from colossus.cli import main


@pytest.mark.slow
def test_bench_sp_tiny(tmp_path):
    out, png = tmp_path / "sp.json", tmp_path / "sp.png"
    argv = ["bench", "sp", "--lengths", "256", "512", "12", "--sps", "1", "2", "--heads", "3"]
    argv += ["--head-dim", "8", "--q-tile", "32", "--json", str(out), "--plot", str(png)]
    assert main(argv) == 0
    doc = json.loads(out.read_text())
    assert doc["bench"] == "sp" and doc["args"]["causal"] is True
    rows = {(r["variant"], r["L"], r["sp"]): r for r in doc["rows"]}
    assert len(rows) == 3 * 3 * 2
    # 12 % (2*2) == 0 but heads=3 is not divisible by sp=2
    assert "heads % sp == 0" in rows[("ulysses", 512, 2)]["skipped"]
    assert "L % (2*sp)" not in str(rows[("ring_attention", 12, 2)].get("skipped"))
    for key, r in rows.items():
        if "skipped" in r:
            continue
        assert r["sent_equals_formula"], key
        assert r["peak_mib"] > 0 and r["time_s"] > 0, key
        if key[2] == 1:
            assert r["sent_mib"] == 0
    for L in (256, 512):
        one, two = rows[("ring_attention", L, 1)], rows[("ring_attention", L, 2)]
        assert two["peak_mib"] < one["peak_mib"]
        # (6 sp - 4) blocks of B H (L/sp) D fp32: 8 * 1 * 3 * L/2 * 8 * 4 bytes
        assert two["sent_mib"] * 2**20 == 8 * 3 * (L // 2) * 8 * 4
    # per-rank peak of ring attention with n = 256 tokens per rank, in blocks of B H n D fp32:
    # one process holds q, k, v, dO, out, dQ, dK, dV (8 blocks), row vectors (LSE, delta: 1/8
    # block each) and, in the backward, two (B, H, tile, n) score tiles (P and dP; a stale tile
    # kept from the previous query tile would add a third); the ring adds the K/V pair computed
    # on and the next one being received (4 blocks), the dK/dV accumulator replaces dK, dV
    blk, tile = 3 * 256 * 8 * 4, 3 * 32 * 256 * 4
    one = rows[("ring_attention", 256, 1)]["peak_mib"] * 2**20
    two = rows[("ring_attention", 512, 2)]["peak_mib"] * 2**20
    assert one <= 8 * blk + 2 * tile + blk / 2, one / blk
    assert two <= one + 4 * blk, (two - one) / blk
    assert png.stat().st_size > 10_000
