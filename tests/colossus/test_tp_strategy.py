"""strategy.tp: the Trainer with tensor parallelism (tp=2 x dp=2 with 2 accumulation steps,
tp=4, and tp_mode=2d at tp=4 on an untied GPT-2) on 4 gloo ranks gives the per-step losses and
(clipped) global gradient norms of single-process training at the same global batch within 1e-4,
on every rank (LAMB at tp=4 too); evaluation gives the same loss; resuming from a step-5 checkpoint continues with
the same losses; `colossus export` of the tp checkpoint is a from_pretrained folder with the
reference model's logits; each rank holds 1/tp of every split layer, and the parameter and
AdamW bytes per rank `colossus plan` predicts are the measured ones. One 4-rank spawn.
And tp_mode=2d (tp=4) x dp=2 on 8 ranks for GPT-2 and Llama (one 8-rank spawn)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from conftest import tiny_gpt2, token_blocks
from spawn_helpers import spawn

from colossus import Trainer, TrainingConfig
from colossus.errors import ConfigError
from colossus.export import export_checkpoint
from parallel.tensor.sharding import tp_shard

STEPS = 10


def _untied_gpt2():
    model = tiny_gpt2()
    model.config.tie_word_embeddings = False
    torch.manual_seed(0)
    return type(model)(model.config)


def _config(
    run_dir: Path, batch: int, tp: int = 1, mode: str = "1d", accum: int = 1, optim="adamw", **ck
) -> TrainingConfig:
    return TrainingConfig(
        name="tp",
        optim={"name": optim, "lr": 3e-3, "weight_decay": 0.01},
        schedule={"name": "cosine", "warmup_steps": 2},
        strategy={"name": "ddp" if tp > 1 else "none", "tp": tp, "tp_mode": mode},
        train={
            "max_steps": STEPS,
            "batch_size": batch,
            "grad_accum": accum,
            "max_grad_norm": 0.5,  # small enough that most steps are clipped
            "run_dir": str(run_dir),
            "seed": 0,
        },
        checkpoint={"save_final": False} | ck,
        logging={"progress": False, "plot": False},
    )


def _hist(t: Trainer) -> dict:
    return {
        "loss": [r["loss"] for r in t.history],
        "grad_norm": [r["grad_norm"] for r in t.history],
    }


def _measured_bytes(t: Trainer) -> tuple[int, int]:
    """(parameter bytes, AdamW state bytes) this rank holds."""
    params = sum(p.numel() * p.element_size() for p in t.model.parameters())
    state = sum(
        v.numel() * v.element_size()
        for st in t.optimizer.state.values()
        for k, v in st.items()
        if torch.is_tensor(v) and k != "step"
    )
    return params, state


TINY = {  # the test models as `model:` config sections, for `colossus plan`
    "gpt2": {"n_layer": 2, "n_embd": 32, "n_head": 4, "vocab_size": 128, "n_positions": 32},
    "llama": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 128,
              "max_position_embeddings": 32, "tie_word_embeddings": False},
}  # fmt: skip


def _planned_bytes(arch: str, tp: int, mode: str, world: int, tied: bool = True):
    """(parameter bytes, optimizer state bytes) per rank that `colossus plan` predicts."""
    from colossus.plan import make_plan

    model = {"arch": arch, "config": TINY[arch] | ({} if tied else {"tie_word_embeddings": False})}
    cfg = TrainingConfig(model=model, strategy={"name": "ddp", "tp": tp, "tp_mode": mode})
    dev = make_plan(cfg, world).tiers["device"]
    return dev["params"], dev["optim_state"]


def _worker(out: str):
    out = Path(out)
    r, w = dist.get_rank(), dist.get_world_size()
    os.environ.update(RANK=str(r), WORLD_SIZE=str(w), LOCAL_RANK=str(r), LOCAL_WORLD_SIZE=str(w))
    res = {}
    a = Trainer(
        tiny_gpt2(),
        _config(out / "a", batch=1, accum=2, tp=2, interval=5),  # DDP no_sync on micro-step 1
        train_dataset=token_blocks(),
    )
    a.train()
    res["a"] = _hist(a)
    res["a_eval"] = a.evaluate(token_blocks(16, seed=9))["eval_loss"]
    res["a_dims"] = (a.strategy.data_rank, a.strategy.data_world, a.global_batch)
    split = [p for p in a.model.parameters() if tp_shard(p) is not None]
    res["a_split_ratio"] = sum(p.numel() for p in split) / sum(
        torch.Size(tp_shard(p).full_shape).numel() for p in split
    )
    res["a_full_keys"] = sorted(a.strategy.full_state_dict())
    b = Trainer(tiny_gpt2(), _config(out / "b", batch=4, tp=4), train_dataset=token_blocks())
    b.train()
    res["b"] = _hist(b)
    res["b_bytes"] = _measured_bytes(b)
    c = Trainer(
        tiny_gpt2(seed=5),  # other weights: everything must come from the checkpoint
        _config(
            out / "c", batch=1, accum=2, tp=2, resume_from=str(out / "a/checkpoints/step-00000005")
        ),
        train_dataset=token_blocks(),
    )
    c.train()
    res["c"] = _hist(c)
    d = Trainer(  # 2d (Optimus) grid layers, q=2, through the same strategy
        _untied_gpt2(),
        _config(out / "d", batch=4, tp=4, mode="2d"),
        train_dataset=token_blocks(),
    )
    d.train()
    res["d"] = _hist(d)
    res["d_bytes"] = _measured_bytes(d)
    e = Trainer(  # LAMB: trust ratios from whole-parameter norms (summed over the tp group)
        tiny_gpt2(), _config(out / "e", batch=4, tp=4, optim="lamb"), train_dataset=token_blocks()
    )
    e.train()
    res["e"] = _hist(e)
    return res


@pytest.mark.slow
def test_tp_trainer_matches_single_process(tmp_path):
    ref = Trainer(tiny_gpt2(), _config(tmp_path / "ref", batch=4), train_dataset=token_blocks())
    ref.train()
    want = _hist(ref)
    want_eval = ref.evaluate(token_blocks(16, seed=9))["eval_loss"]
    ref_d = Trainer(_untied_gpt2(), _config(tmp_path / "rd", batch=4), train_dataset=token_blocks())
    ref_d.train()
    want_d = _hist(ref_d)
    ref_e = Trainer(
        tiny_gpt2(), _config(tmp_path / "re", batch=4, optim="lamb"), train_dataset=token_blocks()
    )
    ref_e.train()
    want_e = _hist(ref_e)
    res = spawn(_worker, 4, tmp_path / "spawn", str(tmp_path / "spawn"))
    # `colossus plan` predicts each rank's parameter and AdamW bytes exactly (a tied wte once)
    plan_b = _planned_bytes("gpt2", 4, "1d", 4)
    plan_d = _planned_bytes("gpt2", 4, "2d", 4, tied=False)
    assert plan_b[0] < _planned_bytes("gpt2", 1, "1d", 1)[0] / 2
    for rank, got in enumerate(res):
        assert got["b_bytes"] == plan_b and got["d_bytes"] == plan_d, (rank, plan_b, plan_d)
        for run in ("a", "b"):
            assert got[run]["loss"] == pytest.approx(want["loss"], abs=1e-4), (rank, run)
            assert got[run]["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-4), (rank, run)
        assert got["c"]["loss"] == pytest.approx(want["loss"][5:], abs=1e-4), rank
        assert got["d"]["loss"] == pytest.approx(want_d["loss"], abs=1e-4), rank
        assert got["d"]["grad_norm"] == pytest.approx(want_d["grad_norm"], rel=1e-4), rank
        assert got["e"]["loss"] == pytest.approx(want_e["loss"], abs=1e-4), rank
        assert got["a_eval"] == pytest.approx(want_eval, abs=1e-4), rank
        assert got["a_dims"] == (rank // 2, 2, 4)
        assert got["a_split_ratio"] == 0.5
        assert got["a_full_keys"] == sorted(ref.model.state_dict())
    assert max(want["grad_norm"]) > 0.5  # clipping was exercised
    ck = tmp_path / "spawn/a/checkpoints/step-00000010"
    assert sorted(p.name for p in ck.glob("tp-rank*")) == [
        "tp-rank00000-of-00002.safetensors",
        "tp-rank00001-of-00002.safetensors",
    ]
    from transformers import AutoModelForCausalLM

    exported = export_checkpoint(ck, tmp_path / "exported")
    loaded = AutoModelForCausalLM.from_pretrained(exported)
    ids = token_blocks(2)[0][None]
    with torch.no_grad():
        diff = (loaded(input_ids=ids).logits - ref.model(input_ids=ids).logits).abs().max()
    assert diff < 1e-4, float(diff)


def test_tp_needs_enough_ranks(tmp_path):
    with pytest.raises(ConfigError, match="strategy.tp=2 does not divide the 1 launched"):
        Trainer(tiny_gpt2(), _config(tmp_path, batch=2, tp=2), train_dataset=token_blocks())


def _untied_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                      max_position_embeddings=32, bos_token_id=0, eos_token_id=0,
                      pad_token_id=None, tie_word_embeddings=False)  # fmt: skip
    return LlamaForCausalLM(cfg)


GRID_DP_MODELS = {"gpt2": _untied_gpt2, "llama": _untied_llama}


def _grid_dp_worker(out: str):
    out = Path(out)
    r, w = dist.get_rank(), dist.get_world_size()
    os.environ.update(RANK=str(r), WORLD_SIZE=str(w), LOCAL_RANK=str(r), LOCAL_WORLD_SIZE=str(w))
    res = {}
    for arch, build in GRID_DP_MODELS.items():
        # 8 ranks = dp 2 x (2d grid of tp=4); batch 2 per replica (one row per grid row), global 4
        t = Trainer(
            build(), _config(out / arch, batch=2, tp=4, mode="2d", interval=STEPS),
            train_dataset=token_blocks(),
        )  # fmt: skip
        t.train()
        res[arch] = _hist(t) | {
            "dims": (t.strategy.data_rank, t.strategy.data_world, t.global_batch),
            "eval": t.evaluate(token_blocks(16, seed=9))["eval_loss"],
            "ddp": type(t.engine).__name__,
            "bytes": _measured_bytes(t),
        }
    return res


@pytest.mark.slow
def test_tp_2d_times_dp2_eight_ranks(tmp_path):
    """tp_mode=2d (tp=4) x dp=2 on 8 ranks: the Trainer's losses, clipped global gradient norms
    and eval loss equal single-process training (global batch 4) on every rank for an untied
    GPT-2 and a Llama (GQA, RMSNorm, rotary); the step-10 checkpoint exports through
    `colossus export` to a from_pretrained folder with the reference logits."""
    from transformers import AutoModelForCausalLM

    refs = {}
    for arch, build in GRID_DP_MODELS.items():
        ref = Trainer(
            build(), _config(tmp_path / f"ref-{arch}", batch=4), train_dataset=token_blocks()
        )
        ref.train()
        refs[arch] = (ref, _hist(ref), ref.evaluate(token_blocks(16, seed=9))["eval_loss"])
    res = spawn(_grid_dp_worker, 8, tmp_path / "spawn", str(tmp_path / "spawn"))
    ids = token_blocks(2)[0][None]
    for arch, (ref, want, want_eval) in refs.items():
        for rank, got in enumerate(res):
            g = got[arch]
            assert g["loss"] == pytest.approx(want["loss"], abs=1e-4), (rank, arch)
            assert g["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-4), (rank, arch)
            assert g["eval"] == pytest.approx(want_eval, abs=1e-4), (rank, arch)
            assert g["dims"] == (rank // 4, 2, 4) and g["ddp"] == "DistributedDataParallel"
            assert g["bytes"] == _planned_bytes(arch, 4, "2d", 8, tied=False), (rank, arch)
        ck = tmp_path / f"spawn/{arch}/checkpoints/step-{STEPS:08d}"
        assert sorted(p.name for p in ck.glob("tp-rank*")) == [
            f"tp-rank{i:05d}-of-00004.safetensors" for i in range(4)
        ]
        loaded = AutoModelForCausalLM.from_pretrained(export_checkpoint(ck, tmp_path / f"x-{arch}"))
        with torch.no_grad():
            diff = (loaded(input_ids=ids).logits - ref.model(input_ids=ids).logits).abs().max()
        assert diff < 1e-4, (arch, float(diff))
