"""Config schema errors name the key and suggest the close match; the CLI exits non-zero."""

import subprocess
import sys
from pathlib import Path

import pytest

from colossus import ConfigError, TrainingConfig
from colossus.cli import main

RECIPES = sorted(Path(__file__).resolve().parents[2].joinpath("recipes").glob("*.yaml"))


def test_unknown_key_names_it_and_suggests(tmp_path):
    with pytest.raises(ConfigError) as e:
        TrainingConfig.from_dict({"optim": {"lrr": 1e-3}})
    assert "unknown key 'optim.lrr'" in str(e.value)
    assert "did you mean 'optim.lr'" in str(e.value)
    with pytest.raises(ConfigError, match=r"unknown key 'trian' \(did you mean 'train'\?\)"):
        TrainingConfig.from_dict({"trian": {}})


def test_wrong_type_says_the_path():
    with pytest.raises(ConfigError, match=r"optim\.lr: .*got 'fast'"):
        TrainingConfig.from_dict({"optim": {"lr": "fast"}})
    with pytest.raises(ConfigError, match=r"train\.batch_size: .*greater than 0"):
        TrainingConfig.from_dict({"train": {"batch_size": 0}})
    with pytest.raises(ConfigError, match=r"strategy\.name: .*'none', 'ddp' or 'chunk'"):
        TrainingConfig.from_dict({"strategy": {"name": "zero9"}})


def test_overrides_parse_values(tmp_path):
    cfg = TrainingConfig().with_overrides(
        ["optim.lr=3e-4", "train.max_steps=7", "optim.betas=[0.8, 0.9]", "model.config.n_layer=3"]
    )
    assert cfg.optim.lr == 3e-4 and cfg.train.max_steps == 7 and cfg.optim.betas == (0.8, 0.9)
    assert cfg.model.config == {"n_layer": 3}
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        cfg.with_overrides(["optim.lr"])
    with pytest.raises(ConfigError, match="unknown key 'optim.learning_rate'"):
        cfg.with_overrides(["optim.learning_rate=1"])


def test_missing_and_malformed_recipe(tmp_path):
    with pytest.raises(ConfigError, match="recipe not found"):
        TrainingConfig.from_yaml(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        TrainingConfig.from_yaml(bad)


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_recipes_validate(recipe):
    cfg = TrainingConfig.from_yaml(recipe)
    assert cfg.name == recipe.stem


def test_cli_errors_exit_nonzero(tmp_path, capsys):
    assert main(["train", str(tmp_path / "missing.yaml")]) == 2
    assert "recipe not found" in capsys.readouterr().err
    r = tmp_path / "typo.yaml"
    r.write_text("train:\n  max_step: 3\n")
    assert main(["train", str(r)]) == 2
    assert "did you mean 'train.max_steps'" in capsys.readouterr().err
    # the installed console script too, as a user would run it
    proc = subprocess.run(
        [sys.executable, "-m", "colossus.cli", "train", str(r)], capture_output=True, text=True
    )
    assert proc.returncode == 2 and "unknown key 'train.max_step'" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_help_lists_examples():
    out = subprocess.run(
        [sys.executable, "-m", "colossus.cli", "--help"], capture_output=True, text=True
    ).stdout
    assert "colossus train recipes/gpt2-tiny.yaml" in out
    for sub in ("train", "generate", "export", "bench"):
        h = subprocess.run(
            [sys.executable, "-m", "colossus.cli", sub, "--help"], capture_output=True, text=True
        ).stdout
        assert "examples:" in h, sub
