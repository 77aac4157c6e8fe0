"""`colossus export` writes a folder that from_pretrained loads with identical logits."""

import pytest
import torch
from conftest import tiny_gpt2, token_blocks
from transformers import AutoModelForCausalLM

from colossus import ConfigError, Trainer, TrainingConfig
from colossus.checkpoint import latest_checkpoint
from colossus.cli import main


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    cfg = TrainingConfig(
        name="exp",
        train={"max_steps": 4, "batch_size": 8, "run_dir": str(run)},
        logging={"progress": False, "plot": False},
    )
    t = Trainer(tiny_gpt2(), cfg, train_dataset=token_blocks())
    t.train()
    return t, latest_checkpoint(t.checkpoint_root)


def test_export_loads_with_from_pretrained_same_logits(tmp_path, trained):
    t, ck = trained
    out = tmp_path / "hf"
    assert main(["export", str(ck), str(out)]) == 0
    hf = AutoModelForCausalLM.from_pretrained(out)
    ids = torch.stack(token_blocks(4, seed=5))
    t.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, t.model(ids).logits, rtol=0, atol=0)
    # tied weights stay tied through save / export / load
    assert hf.lm_head.weight.data_ptr() == hf.transformer.wte.weight.data_ptr()


def test_export_refuses_non_empty_target(tmp_path, trained):
    _, ck = trained
    out = tmp_path / "busy"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not empty"):
        from colossus.export import export_checkpoint

        export_checkpoint(ck, out)
    assert (out / "keep.txt").read_text() == "mine"
