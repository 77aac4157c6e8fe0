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


def _tp_cfg(*sets: str) -> TrainingConfig:
    return TrainingConfig.from_yaml("recipes/gpt2-tiny.yaml", ["strategy.name=ddp", *sets])


def test_plan_tensor_parallel_splits_model_state(capsys):
    """strategy.tp: params / grads / AdamW state per rank follow the layers each mode splits
    (a closed form for GPT-2 in 1D; everything 1/tp in 2d), activations and compute shrink.
    That the plan equals the measured bytes per rank is checked in test_tp_strategy.py."""
    one = make_plan(_tp_cfg(), 1)
    t2 = make_plan(_tp_cfg("strategy.tp=2"), 4)
    h, L, V, P, t = 256, 4, 4096, 128, 2  # the recipe's GPT-2 (wte tied to lm_head)
    # 1D: c_attn, c_fc (weight + bias), both c_proj weights and wte split; the c_proj biases,
    # layer norms and wpe whole on every rank
    local = L * (12 * h * h + 7 * h) / t + L * 6 * h + V * h / t + P * h + 2 * h
    assert (t2.params, t2.local_params, t2.tp, t2.world_size) == (one.params, local, 2, 4)
    dev = t2.tiers["device"]
    assert (dev["params"], dev["grads"], dev["optim_state"]) == (4 * local, 4 * local, 8 * local)
    assert t2.step_flops == one.step_flops / 2
    assert dev["activations"] < one.tiers["device"]["activations"]
    untied = "model.config.tie_word_embeddings=false"
    g = make_plan(_tp_cfg(untied, "strategy.tp=4", "strategy.tp_mode=2d"), 1)  # world = tp
    full = make_plan(_tp_cfg(untied), 1)
    assert g.world_size == 4 and g.local_params == full.params / 4
    assert g.tiers["device"]["activations"] == full.tiers["device"]["activations"] / 4
    assert (
        main(["plan", "recipes/gpt2-tiny.yaml", "--set", "strategy.tp=2", "--world-size", "4"]) == 0
    )
    assert "tp=2 (1d) x dp=2" in capsys.readouterr().out.replace("\n", " ")


@pytest.mark.parametrize(
    ("sets", "world", "msg"),
    [
        (["strategy.tp=4"], 6, "strategy.tp=4 does not divide --world-size 6; use a multiple of 4"),
        (["strategy.tp=4", "strategy.tp_mode=2d"], 4, "build the model with tie_word_embeddings=False"),
        (["strategy.tp=2", "strategy.tp_mode=2d"], 2, "tp_mode=2d needs tp to be a square"),
        (["strategy.tp=3"], 3, "does not divide n_head=4"),
        (["strategy.tp=2", "strategy.name=chunk"], 2, "does not compose with strategy.name=chunk"),
    ],
)  # fmt: skip
def test_plan_tensor_parallel_refuses_what_training_would(sets, world, msg):
    from colossus.errors import ConfigError

    with pytest.raises(ConfigError, match=re.escape(msg)):
        make_plan(_tp_cfg(*sets), world)


def test_plan_llama_head_dim_follows_hidden_size():
    """model.config overrides of hidden_size / heads re-derive Llama's head_dim (the planned
    model is the one a direct LlamaConfig builds, not one with the 4096/32 default head_dim)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    kw = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
          "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 128}  # fmt: skip
    cfg = TrainingConfig(model={"arch": "llama", "config": kw})
    want = sum(p.numel() for p in LlamaForCausalLM(LlamaConfig(**kw)).parameters())
    assert make_plan(cfg, 1).params == want
