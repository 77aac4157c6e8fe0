"""``colossus plan``: the placement before a run, a clear refusal with a fix when it cannot fit,
and predictions that hold: after a real run the measured peak per tier stays within the plan."""

import re

import pytest
from conftest import tiny_gpt2, token_blocks

from colossus import Trainer, TrainingConfig
from colossus.cli import main
from colossus.plan import make_plan

RECIPE = "recipes/gpt2-tiny-chunk.yaml"
SMALL_CHUNKS = "strategy.chunk.chunk_size=65536"


def test_plan_fits_and_lists_every_tier(capsys):
    assert main(["plan", RECIPE, "--world-size", "2"]) == 0
    out = capsys.readouterr().out
    assert "fits the budgets" in out
    for word in ("device", "host", "params_gib", "grads_gib", "optim_state_gib", "activations"):
        assert word in out
    assert "step_estimate_s" in out


def test_plan_sharding_divides_model_state():
    cfg = TrainingConfig.from_yaml(RECIPE, [SMALL_CHUNKS])
    one, four = make_plan(cfg, 1), make_plan(cfg, 4)
    state = lambda p: sum(p.tiers["host"].get(k, 0) for k in ("grads", "optim_state"))  # noqa: E731
    assert state(four) == pytest.approx(state(one) / 4, rel=0.02)  # ZeRO-3: 1/N per rank


def test_plan_refuses_with_how_much_and_a_fix(tmp_path, capsys):
    nvme = tmp_path / "nvme"
    nvme.mkdir()
    # RAM on this CPU box = device + host tiers; batch 1 keeps activations out of the way
    base = [SMALL_CHUNKS, "train.batch_size=1", "strategy.chunk.host_budget=80MiB"]
    assert main(["plan", RECIPE, *sum((["--set", s] for s in base), [])]) == 2
    out = capsys.readouterr().out
    assert re.search(
        r"the host tier needs [\d.]+ MiB, its budget is 80.00 MiB \([\d.]+ MiB more\)", out
    )
    assert "strategy.chunk.nvme_dir" in out  # the only way out on a CPU box
    withdir = [*base, f"strategy.chunk.nvme_dir={nvme}"]
    assert (
        main(["plan", RECIPE, "--disk-gbps", "2", *sum((["--set", s] for s in withdir), [])]) == 2
    )
    out = capsys.readouterr().out
    fix = re.search(r"would fit: (.*)", out).group(1).split()
    fixed = [*withdir, *[x for x in fix if x != "--set"]]
    assert main(["plan", RECIPE, "--disk-gbps", "2", *sum((["--set", s] for s in fixed), [])]) == 0
    assert "fits the budgets" in capsys.readouterr().out


def test_plan_auto_placement_chooses_what_fits(tmp_path, capsys):
    nvme = tmp_path / "nvme"
    nvme.mkdir()
    base = [SMALL_CHUNKS, "train.batch_size=1", "strategy.chunk.host_budget=80MiB"]
    auto = [*base, "strategy.chunk.placement=auto", f"strategy.chunk.nvme_dir={nvme}"]
    args = ["plan", RECIPE, "--disk-gbps", "2", *sum((["--set", s] for s in auto), [])]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "fits the budgets" in out
    chosen = dict(re.findall(r"(\w+_frac)=([\d.]+)", out.split("placement=auto chose:")[1]))
    assert 0 < float(chosen["nvme_optim_frac"])  # the state that did not fit went to NVMe
    # without an NVMe directory nothing fits: refused, by how much
    args = [
        "plan",
        RECIPE,
        *sum((["--set", s] for s in [*base, "strategy.chunk.placement=auto"]), []),
    ]
    assert main(args) == 2
    assert re.search(r"the host tier needs .* more\)", capsys.readouterr().out)


def test_measured_peak_stays_within_the_plan(tmp_path):
    cfg = TrainingConfig(
        name="p",
        strategy={"name": "chunk", "chunk": {"chunk_size": 1500, "offload_optim_frac": 1.0}},
        train={"max_steps": 3, "batch_size": 8, "run_dir": str(tmp_path)},
        checkpoint={"save_final": False},
        logging={"progress": False, "plot": False},
    )
    summary = Trainer(tiny_gpt2(), cfg, train_dataset=token_blocks()).train()
    for tier in ("device", "host"):
        planned, peak = summary[f"mem_{tier}_plan_gib"], summary[f"mem_{tier}_peak_gib"]
        assert 0 < peak <= planned * 1.001 + 1e-9 or (peak == 0 and planned >= 0), (
            tier,
            peak,
            planned,
        )
