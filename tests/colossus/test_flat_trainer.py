"""The Trainer with ``optim.flat`` (``Lamb(flat=True)`` / ``Lars(flat=True)``): checkpoints of
parameters that are views of one buffer, flat vs per-tensor runs, exact resume, accumulation,
and the schema's checks."""

import pytest
import torch
from conftest import tiny_gpt2
from safetensors.torch import load_file, save_model

from colossus import ConfigError, Trainer, TrainingConfig
from colossus.checkpoint import (
    CheckpointWriter,
    latest_checkpoint,
    list_checkpoints,
    load_module,
)
from colossus.optim import Lamb, param_groups
from offload import trust_fused


@pytest.fixture(autouse=True)
def flat_kernels():
    """Compiled when a test here runs, not when the module is collected; the reason is the
    compiler's own error (no C compiler, Inductor unavailable): flat then falls back to the
    per-tensor path, which tests/colossus/test_optim.py covers."""
    if not trust_fused.flat_available():
        pytest.skip(f"no compiled kernels here: {trust_fused._KERNELS.error}")


def cfg(tmp_path, flat=None, name="lamb", **train):
    t = {"max_steps": 5, "batch_size": 8, "run_dir": str(tmp_path / "run"), "seed": 0} | train
    return TrainingConfig(
        name="t",
        optim={"name": name, "lr": 1e-2, "weight_decay": 0.01, "flat": flat},
        schedule={"name": "constant"},
        train=t,
        checkpoint={"save_final": False},
        logging={"progress": False, "plot": False},
    )


def losses(trainer):
    return [r["loss"] for r in trainer.history]


def _is_flat(trainer) -> bool:
    """Every trainable parameter lives in a flat buffer of the optimizer."""
    fgs = trainer.optimizer._live_flat()
    inside = {id(p) for fg in fgs for p in fg.params}
    return bool(fgs) and all(id(p) in inside for p in trainer.model.parameters())


def _flat_model() -> torch.nn.Module:
    """A tiny GPT-2 (lm_head tied to wte) whose parameters are views of Lamb's flat buffers."""
    model = tiny_gpt2()
    opt = Lamb(param_groups(model, 0.01), lr=1e-2, flat=True)
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    opt.zero_grad()
    assert opt._live_flat(), "flat buffers were built"
    return model


def test_save_module_takes_flat_views_and_loads_identical(tmp_path):
    model = _flat_model()
    with pytest.raises(RuntimeError, match="covering the entire storage"):
        save_model(model, str(tmp_path / "refused.safetensors"))  # why save_module has its own
    with CheckpointWriter(tmp_path / "ck", step=1) as w:
        w.save_module("model.safetensors", model)
    f = latest_checkpoint(tmp_path / "ck") / "model.safetensors"
    saved = load_file(str(f))
    assert "transformer.wte.weight" not in saved, "tied weight stored once (as save_model does)"
    for k, v in model.state_dict().items():
        key = "lm_head.weight" if k == "transformer.wte.weight" else k
        assert torch.equal(saved[key], v), k

    fresh = tiny_gpt2(seed=7)  # other values: the load must overwrite every one
    assert load_module(fresh, f) == ([], [])
    for (k, p), q in zip(fresh.state_dict().items(), model.state_dict().values()):
        assert torch.equal(p, q), k
    assert fresh.lm_head.weight is fresh.transformer.wte.weight

    # into a module that is flat itself: copied in place, the views stay views
    other = _flat_model()
    ptrs = [p.data_ptr() for p in other.parameters()]
    assert load_module(other, f) == ([], [])
    assert [p.data_ptr() for p in other.parameters()] == ptrs
    for p, q in zip(other.parameters(), model.parameters()):
        assert torch.equal(p, q)


def test_save_module_of_ordinary_module_is_save_model_byte_for_byte(tmp_path):
    """Checkpoints of per-tensor models stay what safetensors' save_model wrote before."""
    model = tiny_gpt2()
    save_model(model, str(tmp_path / "ref.safetensors"))
    with CheckpointWriter(tmp_path / "ck", step=1) as w:
        w.save_module("model.safetensors", model)
    ours = latest_checkpoint(tmp_path / "ck") / "model.safetensors"
    assert ours.read_bytes() == (tmp_path / "ref.safetensors").read_bytes()


@pytest.mark.parametrize("name", ["lamb", "lars"])
def test_flat_matches_per_tensor(tmp_path, blocks, name):
    """Independent reference: the same run on the per-tensor path (only sums' order differs);
    the default (optim.flat None) runs flat."""
    runs = []
    for flat in (False, None):
        c = cfg(tmp_path / str(flat), flat=flat, name=name)
        if name == "lars":
            c = c.with_overrides(["optim.lr=1.0"])
        t = Trainer(tiny_gpt2(), c, train_dataset=blocks)
        t.train()
        assert _is_flat(t) == (flat is None)
        runs.append(t)
    assert losses(runs[1]) == pytest.approx(losses(runs[0]), abs=1e-5)
    for p, q in zip(runs[0].model.parameters(), runs[1].model.parameters()):
        torch.testing.assert_close(q, p, atol=1e-5, rtol=1e-5)


class StopAfter:
    def __init__(self, n):
        self.n = n
        self.at_checkpoint = None

    def on_save(self, trainer, path):
        self.at_checkpoint = {k: v.clone() for k, v in trainer.model.state_dict().items()}

    def on_step_end(self, trainer, record):
        if trainer.step == self.n:
            raise KeyboardInterrupt  # a kill right after the checkpoint at step n - 1


def test_flat_resume_is_exact(tmp_path, blocks):
    n = 3
    straight = Trainer(tiny_gpt2(), cfg(tmp_path / "s", max_steps=2 * n), train_dataset=blocks)
    straight.train()

    c = cfg(tmp_path / "r", max_steps=2 * n).with_overrides([f"checkpoint.interval={n}"])
    stop = StopAfter(n + 1)
    first = Trainer(tiny_gpt2(), c, train_dataset=blocks, callbacks=[stop])
    with pytest.raises(KeyboardInterrupt):
        first.train()
    assert _is_flat(first)
    assert [p.name for p in list_checkpoints(first.checkpoint_root)] == [f"step-{n:08d}"]

    second = Trainer(
        tiny_gpt2(seed=123), c.with_overrides(["checkpoint.resume_from=latest"]), blocks
    )
    assert second.step == n
    for k, v in second.model.state_dict().items():  # loading gives identical weights
        assert torch.equal(v, stop.at_checkpoint[k]), k
    second.train()
    assert _is_flat(second)
    assert losses(straight)[:n] == losses(first)[:n]
    assert losses(straight)[n:] == losses(second), "resumed losses must be bit-identical"
    for p, q in zip(straight.model.parameters(), second.model.parameters()):
        assert torch.equal(p, q)


def test_flat_grad_accumulation_equals_big_batch(tmp_path, blocks):
    """Two micro-batches accumulate into the flat gradient views (after zero_grad keeps them
    as zeroed views) exactly as one batch of twice the size."""
    a = Trainer(tiny_gpt2(), cfg(tmp_path / "a", batch_size=8), train_dataset=blocks)
    b = Trainer(tiny_gpt2(), cfg(tmp_path / "b", batch_size=4, grad_accum=2), blocks)
    a.train()
    b.train()
    assert _is_flat(b)
    assert losses(b) == pytest.approx(losses(a), abs=1e-5)
    for p, q in zip(a.model.parameters(), b.model.parameters()):
        torch.testing.assert_close(q, p, atol=1e-5, rtol=1e-4)


def test_flat_schema_checks():
    base = {"optim": {"name": "lamb", "flat": True}}
    assert TrainingConfig.from_dict(base).optim.flat
    assert TrainingConfig().optim.flat is None, "documented default: auto"
    # auto is accepted where flat does not apply (the strategy builds its own optimizer)
    for strategy in ({"name": "chunk"}, {"tp": 2}):
        c = TrainingConfig.from_dict({"optim": {"name": "lamb"}, "strategy": strategy})
        assert c.optim.flat is None
    with pytest.raises(ConfigError, match="optim.flat applies to lamb / lars only"):
        TrainingConfig.from_dict({"optim": {"name": "adamw", "flat": True}})
    with pytest.raises(ConfigError, match="optim.fused=false"):
        TrainingConfig.from_dict({"optim": {"name": "lars", "flat": True, "fused": False}})
    with pytest.raises(ConfigError, match="does not apply to strategy.name=chunk"):
        TrainingConfig.from_dict(base | {"strategy": {"name": "chunk"}})
    with pytest.raises(ConfigError, match="strategy.tp > 1"):
        TrainingConfig.from_dict(base | {"strategy": {"tp": 2}})
    with pytest.raises(ConfigError, match=r"did you mean 'optim.flat'"):
        TrainingConfig.from_dict({"optim": {"name": "lamb", "flatt": True}})
