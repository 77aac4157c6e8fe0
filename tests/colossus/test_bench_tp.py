"""``colossus bench tp`` at a tiny size: every config's measured bytes per rank equal the closed
form (these are counts), parameter bytes equal theirs, and the tensor-parallel layer's output
equals the single-process layer's."""

import json

import pytest

from colossus.bench.tp import formula_sent_bytes
from colossus.cli import main


def test_closed_forms_agree_where_modes_meet():
    # 2.5d with depth 1 is 2d; a grid of one rank sends nothing
    assert formula_sent_bytes("2.5d", 4, 1, 64, 32) == formula_sent_bytes("2d", 4, 1, 64, 32)
    for mode in ("1d", "2d", "3d"):
        assert formula_sent_bytes(mode, 1, 1, 64, 32) == 0


@pytest.mark.slow
def test_bench_tp_small(tmp_path):
    out, png = tmp_path / "tp.json", tmp_path / "tp.png"
    argv = ["bench", "tp", "--hidden", "32", "--heads", "8", "--seq", "8", "--iters", "1"]
    argv += ["--shared-world", "--json", str(out), "--plot", str(png)]
    assert main(argv) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["mode"], r["P"]) for r in rows] == [
        ("1d", 4),
        ("1d", 8),
        ("2d", 4),
        ("2.5d", 8),
        ("3d", 8),
    ]
    for r in rows:
        assert r["sent_equals_formula"], r["name"]
        assert r["sent_bytes_per_rank"] == r["sent_bytes_min_rank"] == r["formula_sent_bytes"] > 0
        assert r["param_bytes_per_rank"] == r["formula_param_bytes"]
        assert r["max_abs_err_vs_1proc"] < 1e-5
        assert r["act_bytes_per_rank"] > 0
    assert png.stat().st_size > 10_000
