"""``colossus bench nvme`` end to end at a small size: a probe row per in-flight setting, one row
per measured training step with the tier's bandwidth and the step-vs-bound ratios (raw, and
with compute slowed by the I/O beside it), and their median."""

import json
import math

import pytest

from colossus.cli import main


@pytest.mark.slow
def test_bench_nvme_small(tmp_path):
    out = tmp_path / "nvme.json"
    argv = ["bench", "nvme", "--nvme-dir", str(tmp_path / "d"), "--probe-gib", "0.0625"]
    argv += ["--params", "2e7", "--seq", "32", "--steps", "2", "--json", str(out)]
    assert main(argv) == 0
    rows = json.loads(out.read_text())["rows"]
    probes = [r for r in rows if r["name"].startswith("probe")]
    steps = [r for r in rows if r["name"].startswith("training step")]
    (med,) = [r for r in rows if r["name"] == "training, median of steps 1-2"]
    (ctx,) = [r for r in rows if r["name"].startswith("matmul time while")]
    assert ctx["compute_x_writing"] > 0 and ctx["compute_x_reading"] > 0
    assert len(probes) == 5 and len(steps) == 2  # 1 in flight; many: 3 times + median
    for r in probes:
        assert r["read_gbps"] > 0 and r["write_gbps"] > 0 and r["mixed_gbps"] > 0
    for s in steps:
        assert s["read_gb"] > 0 and s["written_gb"] > 0 and s["tier_gbps"] > 0
        assert math.isfinite(s["step_vs_bound"]) and s["step_vs_bound"] > 0
        # compute slowed by I/O is at least the compute alone: a bound as large or larger
        assert 0 < s["step_vs_contended_bound"] <= s["step_vs_bound"]
    for k in ("step_time_s", "step_vs_bound", "step_vs_contended_bound"):
        assert med[k] == pytest.approx((steps[0][k] + steps[1][k]) / 2), k
    s = steps[-1]
    # params, grads and Adam state all on NVMe: the step moves what the plan says it must
    # (each parameter shard read once but those the update pass hands over, grads written and
    # read back, master/m/v read and written), plus the re-read of the chunk holding the tied
    # embedding (first and last module of forward: released in between) and the 4 KiB
    # alignment of each extent. This model's pass is short, so the read-ahead takes most
    # optimizer state from the last pass's write-back buffers (counted in the minimum too):
    # the fixed re-read weighs ~18 % of what is left
    assert 1.0 <= s["moved_vs_min"] <= 1.25, s
    assert list((tmp_path / "d").iterdir()) == []  # probe and training stores cleaned up
