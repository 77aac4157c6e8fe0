"""Trainer: loss falls, matches a plain PyTorch loop, accumulation, seeding, resume, checkpoints."""

import json
import math
import shutil

import pytest
import torch
from conftest import tiny_gpt2, token_blocks

from colossus import CheckpointError, Trainer, TrainingConfig
from colossus.checkpoint import (
    CheckpointWriter,
    latest_checkpoint,
    list_checkpoints,
    verify_checkpoint,
)


def cfg(tmp_path, **train):
    t = {"max_steps": 30, "batch_size": 8, "run_dir": str(tmp_path / "run"), "seed": 0} | train
    return TrainingConfig(
        name="t",
        optim={"lr": 3e-3, "weight_decay": 0.01},
        schedule={"name": "constant"},
        train=t,
        checkpoint={"save_final": False},
        logging={"progress": False, "plot": False},
    )


def losses(trainer):
    return [r["loss"] for r in trainer.history]


def test_loss_falls_and_eval_is_finite(tmp_path, blocks):
    t = Trainer(
        tiny_gpt2(), cfg(tmp_path), train_dataset=blocks, eval_dataset=token_blocks(16, seed=9)
    )
    before = t.evaluate()
    summary = t.train()
    after = t.evaluate()
    ls = losses(t)
    assert len(ls) == 30
    assert sum(ls[-5:]) / 5 < sum(ls[:5]) / 5 - 0.5, ls
    assert math.isfinite(after["eval_ppl"]) and after["eval_loss"] < before["eval_loss"] - 0.5
    assert summary["steps"] == 30 and summary["tokens_per_s"] > 0
    recs = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train_recs = [r for r in recs if "loss" in r]
    assert {"step", "loss", "lr", "tokens_per_s", "peak_rss_gib"} <= set(train_recs[0])
    assert any("eval_loss" in r for r in recs)


def test_matches_plain_pytorch_loop(tmp_path, blocks):
    """Independent reference: the same model trained by a hand-written AdamW loop."""
    t = Trainer(tiny_gpt2(), cfg(tmp_path, max_steps=10, max_grad_norm=1.0), train_dataset=blocks)
    t.train()

    ref = tiny_gpt2()
    decay = [p for p in ref.parameters() if p.ndim >= 2]
    no_decay = [p for p in ref.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
        lr=3e-3,
        betas=(0.9, 0.95),
        eps=1e-8,
        fused=True,  # the same kernel family, so params agree to 1e-5 (not just the losses)
    )
    ref_losses = []
    for step in range(10):
        perm = torch.randperm(
            len(blocks), generator=torch.Generator().manual_seed(0 * 1_000_003 + step // 8)
        )
        idx = perm[(step % 8) * 8 : (step % 8) * 8 + 8]
        ids = torch.stack([blocks[i] for i in idx])
        loss = ref(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        ref_losses.append(loss.item())
    assert losses(t) == pytest.approx(ref_losses, abs=1e-5)
    for (n, p), q in zip(t.model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, atol=1e-5, rtol=1e-5, msg=lambda m, n=n: f"{n}: {m}")


def test_grad_accumulation_equals_big_batch(tmp_path, blocks):
    a = Trainer(tiny_gpt2(), cfg(tmp_path / "a", max_steps=6, batch_size=8), train_dataset=blocks)
    b = Trainer(
        tiny_gpt2(),
        cfg(tmp_path / "b", max_steps=6, batch_size=2, grad_accum=4),
        train_dataset=blocks,
    )
    a.train()
    b.train()
    assert losses(a) == pytest.approx(losses(b), abs=1e-5)


def test_same_seed_same_losses_other_seed_differs(tmp_path, blocks):
    runs = []
    for i, seed in enumerate([3, 3, 4]):
        torch.manual_seed(seed)
        t = Trainer(
            tiny_gpt2(seed=seed),
            cfg(tmp_path / str(i), max_steps=5, seed=seed),
            train_dataset=blocks,
        )
        t.train()
        runs.append(losses(t))
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


class StopAfter:
    def __init__(self, n):
        self.n = n

    def on_step_end(self, trainer, record):
        if trainer.step == self.n:
            raise KeyboardInterrupt  # a kill right after the checkpoint at step n


def test_resume_is_exact(tmp_path, blocks):
    n = 6
    straight = Trainer(tiny_gpt2(), cfg(tmp_path / "s", max_steps=2 * n), train_dataset=blocks)
    straight.train()

    c = cfg(tmp_path / "r", max_steps=2 * n).with_overrides([f"checkpoint.interval={n}"])
    first = Trainer(tiny_gpt2(), c, train_dataset=blocks, callbacks=[StopAfter(n + 1)])
    with pytest.raises(KeyboardInterrupt):
        first.train()
    assert [p.name for p in list_checkpoints(first.checkpoint_root)] == [f"step-{n:08d}"]

    # a fresh process would build a fresh model with another init: resume must overwrite it all
    c2 = c.with_overrides(["checkpoint.resume_from=latest"])
    second = Trainer(tiny_gpt2(seed=123), c2, train_dataset=blocks)
    assert second.step == n
    second.train()
    assert losses(straight)[:n] == losses(first)[:n]
    assert losses(straight)[n:] == losses(second), "resumed losses must be bit-identical"
    for p, q in zip(straight.model.parameters(), second.model.parameters()):
        assert torch.equal(p, q)
    steps = [
        json.loads(x)["step"]
        for x in (tmp_path / "r" / "run" / "metrics.jsonl").read_text().splitlines()
    ]
    assert steps == list(range(1, 2 * n + 1)), "metrics.jsonl continues without duplicates"


def _trained_checkpoint(tmp_path, blocks):
    t = Trainer(
        tiny_gpt2(),
        cfg(tmp_path, max_steps=3).with_overrides(["checkpoint.save_final=true"]),
        train_dataset=blocks,
    )
    t.train()
    return t, latest_checkpoint(t.checkpoint_root)


def test_corrupt_checkpoints_are_refused(tmp_path, blocks):
    t, ck = _trained_checkpoint(tmp_path, blocks)
    verify_checkpoint(ck)

    trunc = tmp_path / "trunc"
    shutil.copytree(ck, trunc)
    f = trunc / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="truncated"):
        Trainer(
            tiny_gpt2(),
            cfg(tmp_path / "x").with_overrides([f"checkpoint.resume_from={trunc}"]),
            train_dataset=blocks,
        )

    flipped = tmp_path / "flipped"
    shutil.copytree(ck, flipped)
    f = flipped / "optimizer.safetensors"
    data = bytearray(f.read_bytes())
    data[-10] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256"):
        verify_checkpoint(flipped)

    partial = tmp_path / "partial"
    shutil.copytree(ck, partial)
    (partial / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match="incomplete"):
        verify_checkpoint(partial)

    with pytest.raises(CheckpointError, match="does not exist"):
        verify_checkpoint(tmp_path / "nope")


def test_interrupted_save_is_invisible(tmp_path, blocks):
    t, ck = _trained_checkpoint(tmp_path, blocks)
    with pytest.raises(RuntimeError):
        with CheckpointWriter(t.checkpoint_root, step=99) as w:
            w.save_json("trainer_state.json", {"step": 99})
            raise RuntimeError("killed mid-save")
    assert latest_checkpoint(t.checkpoint_root) == ck
    assert not (t.checkpoint_root / "step-00000099").exists()


def test_keep_last(tmp_path, blocks):
    c = cfg(tmp_path, max_steps=8).with_overrides(
        ["checkpoint.interval=2", "checkpoint.keep_last=2"]
    )
    t = Trainer(tiny_gpt2(), c, train_dataset=blocks)
    t.train()
    assert [p.name for p in list_checkpoints(t.checkpoint_root)] == [
        "step-00000006",
        "step-00000008",
    ]


def test_resume_with_other_global_batch_is_refused(tmp_path, blocks):
    t, ck = _trained_checkpoint(tmp_path, blocks)
    c = cfg(tmp_path / "y", batch_size=4).with_overrides([f"checkpoint.resume_from={ck}"])
    with pytest.raises(CheckpointError, match="global batch"):
        Trainer(tiny_gpt2(), c, train_dataset=blocks)


def test_dict_returning_module(tmp_path):
    """Any nn.Module whose forward returns a dict with 'loss' trains."""

    class Reg(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 1)

        def forward(self, x, y):
            return {"loss": torch.nn.functional.mse_loss(self.lin(x).squeeze(-1), y)}

    torch.manual_seed(0)
    w = torch.tensor([1.0, -2.0, 0.5, 3.0])
    xs = torch.randn(64, 4)
    data = [{"x": x, "y": x @ w} for x in xs]
    c = cfg(tmp_path, max_steps=60).with_overrides(["optim.lr=0.05", "optim.weight_decay=0"])
    t = Trainer(Reg(), c, train_dataset=data)
    t.train()
    assert losses(t)[-1] < 0.05 * losses(t)[0]


def test_gradient_checkpointing_gives_same_losses(tmp_path, blocks):
    from colossus.config import ModelConfig
    from colossus.models import build_model

    runs = []
    for gc in (False, True):
        torch.manual_seed(0)
        mc = ModelConfig(
            arch="gpt2",
            config={
                "n_layer": 2,
                "n_embd": 32,
                "n_head": 4,
                "n_positions": 32,
                "resid_pdrop": 0.0,
                "embd_pdrop": 0.0,
                "attn_pdrop": 0.0,
            },
            gradient_checkpointing=gc,
        )
        model = build_model(mc, vocab_size=128)
        assert getattr(model, "is_activation_checkpointing", None) == gc
        t = Trainer(model, cfg(tmp_path / str(gc), max_steps=5), train_dataset=blocks)
        t.train()
        runs.append(losses(t))
    assert runs[0] == pytest.approx(runs[1], abs=1e-6)


def test_bf16_autocast_trains_close_to_fp32(tmp_path, blocks):
    """bf16 matmuls are ~100x slower than fp32 on this CPU: a tiny model, few steps, correctness only."""
    fp32 = Trainer(tiny_gpt2(), cfg(tmp_path / "a", max_steps=4), train_dataset=blocks)
    bf16 = Trainer(
        tiny_gpt2(), cfg(tmp_path / "b", max_steps=4, mixed_precision="bf16"), train_dataset=blocks
    )
    fp32.train()
    bf16.train()
    assert losses(bf16) == pytest.approx(losses(fp32), abs=0.05)
    assert all(p.dtype == torch.float32 for p in bf16.model.parameters()), (
        "master weights stay fp32"
    )


def test_run_dir_outputs_and_plot(tmp_path, blocks):
    c = cfg(tmp_path, max_steps=6).with_overrides(
        ["logging.plot=true", "logging.interval=2", "train.eval_interval=3"]
    )
    t = Trainer(tiny_gpt2(), c, train_dataset=blocks, eval_dataset=token_blocks(8, seed=9))
    t.train()
    run = tmp_path / "run"
    png = (run / "loss.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs if "loss" in r] == [2, 4, 6]
    assert [r["step"] for r in recs if "eval_loss" in r] == [3, 6]
