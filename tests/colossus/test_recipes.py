"""Every recipe validates and builds its plan (`colossus plan`, nothing allocated: the model is
built on the meta device), including the 7B one on this small machine."""

from pathlib import Path

import pytest

from colossus.cli import main
from colossus.config import TrainingConfig
from colossus.plan import make_plan

RECIPES = sorted(Path("recipes").glob("*.yaml"))


def test_the_issue_recipes_exist():
    names = {p.stem for p in RECIPES}
    want = {"gpt2-tiny", "gpt2-small", "gpt2-xl-offload", "llama-7b-nvme", "bert-tiny-mlm"}
    want |= {"bert-base-lamb"}
    want |= {f"rlhf-{s}" for s in ("sft", "rm", "ppo", "dpo")}
    assert want <= names, want - names


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_recipe_validates_and_plans(recipe):
    cfg = TrainingConfig.from_yaml(recipe)
    plan = make_plan(cfg, world_size=1)
    assert plan.params > 0 and plan.total("device") > 0
    if cfg.rlhf.stage == "ppo":
        names = [r["name"] for r in plan.ppo_models]
        assert names == ["actor", "critic", "reference", "reward"]


def test_plan_7b_on_nvme_here(capsys):
    # --disk-gbps skips probing the (absent) NVMe directory
    assert main(["plan", "recipes/llama-7b-nvme.yaml", "--disk-gbps", "3"]) == 0
    out = capsys.readouterr().out
    assert "6.738 B params" in out and "nvme" in out and "fits the budgets" in out


def test_plan_shows_ppo_memory_per_model(capsys):
    assert main(["plan", "recipes/rlhf-ppo.yaml"]) == 0
    out = capsys.readouterr().out
    assert "PPO memory per model" in out
    for name in ("actor", "critic", "reference", "reward", "kv_cache"):
        assert name in out
