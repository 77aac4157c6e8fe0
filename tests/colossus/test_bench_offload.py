"""``colossus bench offload`` end to end on the tiny model: every variant runs in its own process
(twice: ``--rounds 2``),
the JSON holds one row per variant with sane figures, and the variants did the same work (same
init, same data, no dropout: equal losses). DeepSpeed is left out: its cpu_adam JIT build can take
minutes on a fresh machine."""

import json
import math

from colossus.cli import main

VARIANTS = ["pytorch", "chunk", "fsdp2"]


def test_bench_offload_tiny(tmp_path, capsys):
    out = tmp_path / "offload.json"
    argv = ["bench", "offload", "--model", "gpt2-tiny", "--steps", "1", "--warmup", "1"]
    argv += ["--rounds", "2"]
    argv += ["--variants", *VARIANTS, "--json", str(out)]
    assert main(argv) == 0

    doc = json.loads(out.read_text())
    assert doc["bench"] == "offload"
    assert doc["machine"]["cores"] >= 1
    assert doc["args"]["model"] == "gpt2-tiny" and doc["args"]["variants"] == VARIANTS
    assert doc["args"]["loss_warnings"] == []
    rows = {r["name"]: r for r in doc["rows"]}
    assert list(rows) == VARIANTS
    for name, r in rows.items():
        assert "error" not in r, f"{name}: {r.get('error')}"
        assert r["ranks"] == 1 and r["threads_per_rank"] >= 1
        assert r["params"] == rows["pytorch"]["params"] > 4_000_000
        assert math.isfinite(r["step_time_s"]) and 0 < r["step_time_s"] < 60, name
        toks = r["tokens_per_s"]
        assert toks == doc["args"]["batch"] * doc["args"]["seq"] / r["step_time_s"]
        assert 0 < r["peak_rss_gib_max_rank"] <= r["peak_rss_gib_sum_ranks"] < 16, name
        assert math.isfinite(r["time_vs_pytorch"]) and r["time_vs_pytorch"] > 0
        assert math.isfinite(r["rss_vs_pytorch"]) and r["rss_vs_pytorch"] > 0
        # random tokens over a 4096 vocabulary: the loss starts near ln(4096) = 8.3
        assert 7.5 < r["first_loss"] < 9.5 and math.isfinite(r["final_loss"]), name
    assert rows["pytorch"]["time_vs_pytorch"] == 1.0
    # two rounds: each variant ran twice; the ratio is the median of the per-round ratios
    assert doc["args"]["rounds"] == 2
    for name, r in rows.items():
        rs, base = r["round_step_s"], rows["pytorch"]["round_step_s"]
        assert len(rs) == 2 and len(r["step_times_s"]) == 2, name
        ratios = [a / b for a, b in zip(rs, base)]
        assert math.isclose(r["time_vs_pytorch"], sum(ratios) / 2), name
    # same init, same data, same AdamW arithmetic: the same losses before and after an update
    for name in ("chunk", "fsdp2"):
        assert abs(rows[name]["first_loss"] - rows["pytorch"]["first_loss"]) < 1e-4, name
        assert abs(rows[name]["final_loss"] - rows["pytorch"]["final_loss"]) < 1e-4, name
    assert rows["pytorch"]["final_loss"] != rows["pytorch"]["first_loss"]  # an update happened

    table = capsys.readouterr().out
    assert "bench offload: gpt2-tiny" in table
    for name in VARIANTS:
        assert name in table


def test_failed_variant_gives_error_row(tmp_path, monkeypatch):
    """A variant that cannot run becomes a row with the cause in ``error`` (here: both ranks of a
    2-rank run fail before their first collective), not a failed bench."""
    import tempfile

    from colossus.bench.offload import _spawn

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the failed run's logs stay there

    args = {"model": "no-such-model", "batch": 4, "seq": 8, "steps": 1, "warmup": 0}
    row = _spawn("chunk", {**args, "threads": 1}, ranks=2, timeout=120)
    assert row["name"] == "chunk" and row["ranks"] == 2
    assert "no-such-model" in row["error"]
    assert "step_time_s" not in row
    (logs,) = tmp_path.glob("bench-offload-chunk-*")
    assert "no-such-model" in (logs / "rank0.log").read_text()
