"""strategy.sp: the Trainer with sequence parallelism gives the per-step losses and (clipped)
global gradient norms of single-process training at the same global batch within 1e-4, on every
rank: tiny GPT-2 and tiny Llama (GQA), each sp_mode, sp=2 on 2 gloo ranks (with 2 accumulation
micro-steps), dp=2 x sp=2 and tp=2 x sp=2 on 4; evaluation gives the same loss; resuming from a
step-5 checkpoint (sp, and tp x sp) continues with the same losses; `colossus export` of the sp
and tp x sp checkpoints is a from_pretrained folder with the reference model's logits; the CLI
under `accelerate launch` logs the single-process losses. Refusals come before any work."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from conftest import tiny_gpt2, token_blocks
from spawn_helpers import free_port, spawn

from colossus import Trainer, TrainingConfig
from colossus.errors import ConfigError
from colossus.export import export_checkpoint

STEPS = 10


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=128, max_position_embeddings=32,
        bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )  # fmt: skip
    return LlamaForCausalLM(cfg)


MODELS = {"gpt2": tiny_gpt2, "llama": tiny_llama}
# world -> (model, sp_mode, batch per data rank, grad_accum, tp); sp=2, global batch 4 everywhere
CASES = {
    2: [
        ("gpt2", "ring_attention", 2, 2, 1),
        ("gpt2", "ring_self_attention", 4, 1, 1),
        ("llama", "ulysses", 4, 1, 1),
        ("llama", "ring_attention", 4, 1, 1),
    ],
    4: [  # dp=2 x sp=2, then tp=2 x sp=2 (dp=1)
        ("gpt2", "ring_attention", 1, 2, 1),
        ("llama", "ulysses", 2, 1, 1),
        ("gpt2", "ring_attention", 4, 1, 2),
        ("llama", "ulysses", 4, 1, 2),
    ],
}


def _config(
    run_dir: Path, batch: int, sp: int = 1, mode: str = "ring_attention", accum=1, tp=1, **ck
):
    return TrainingConfig(
        name="sp",
        optim={"lr": 3e-3, "weight_decay": 0.01},
        schedule={"name": "cosine", "warmup_steps": 2},
        strategy={"name": "ddp" if sp > 1 else "none", "sp": sp, "sp_mode": mode, "tp": tp},
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


def _refusal(fn) -> str:
    try:
        fn()
    except ConfigError as e:
        return str(e)
    return "no error"


def _worker(out: str):
    out = Path(out)
    r, w = dist.get_rank(), dist.get_world_size()
    os.environ.update(RANK=str(r), WORLD_SIZE=str(w), LOCAL_RANK=str(r), LOCAL_WORLD_SIZE=str(w))
    res = {}
    for i, (arch, mode, batch, accum, tp) in enumerate(CASES[w]):
        first = i == 0
        save = first or (tp > 1 and arch == "gpt2")
        t = Trainer(
            MODELS[arch](),
            _config(
                out / f"c{i}",
                batch,
                sp=2,
                mode=mode,
                accum=accum,
                tp=tp,
                save_final=save,
                interval=5 if save else None,
            ),  # fmt: skip
            train_dataset=token_blocks(),
            **({"eval_dataset": token_blocks(16, seed=9)} if first else {}),
        )
        t.train()
        res[(arch, mode, tp)] = _hist(t)
        res[(arch, mode, tp, "dims")] = (
            t.strategy.data_rank,
            t.strategy.data_world,
            t.global_batch,
        )
        res[(arch, mode, tp, "attn")] = t.model.config._attn_implementation
        if first:
            res["eval"] = t.evaluate()["eval_loss"]
    i = 0 if w == 2 else 2  # sp (2 ranks) or tp x sp (4 ranks) checkpoint of GPT-2
    arch, mode, batch, accum, tp = CASES[w][i]
    resumed = Trainer(
        MODELS[arch](seed=5),  # other weights: everything must come from the checkpoint
        _config(
            out / "resumed",
            batch,
            sp=2,
            mode=mode,
            accum=accum,
            tp=tp,
            resume_from=str(out / f"c{i}/checkpoints/step-00000005"),
        ),  # fmt: skip
        train_dataset=token_blocks(),
    )
    resumed.train()
    res["resumed"] = _hist(resumed)["loss"]
    if w != 2:
        return res
    cfg = _config(out / "x", 2, sp=2)
    bert_cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"arch": "bert"})})
    from transformers import BertConfig, BertForMaskedLM, GPT2Config, GPT2LMHeadModel

    bert = BertForMaskedLM(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                      intermediate_size=32, vocab_size=128))  # fmt: skip
    res["refuse_bert"] = _refusal(lambda: Trainer(bert, bert_cfg, train_dataset=token_blocks()))
    res["refuse_len"] = _refusal(
        lambda: Trainer(tiny_gpt2(), cfg, train_dataset=token_blocks(seq=18))
    )
    three = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=24, n_head=3, vocab_size=128,
                                       attn_pdrop=0.0, n_positions=32))  # fmt: skip
    ucfg = _config(out / "x", 2, sp=2, mode="ulysses")
    res["refuse_heads"] = _refusal(lambda: Trainer(three, ucfg, train_dataset=token_blocks()))
    drop = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=128))
    res["refuse_dropout"] = _refusal(lambda: Trainer(drop, cfg, train_dataset=token_blocks()))
    return res


def _reference(tmp: Path, arch: str, eval_too: bool = False):
    t = Trainer(MODELS[arch](), _config(tmp / f"ref-{arch}", batch=4), train_dataset=token_blocks())
    t.train()
    ev = t.evaluate(token_blocks(16, seed=9))["eval_loss"] if eval_too else None
    return t, _hist(t), ev


def _check(res, refs, world: int) -> None:
    for rank, got in enumerate(res):
        for arch, mode, _, _, tp in CASES[world]:
            want = refs[arch]
            assert got[(arch, mode, tp)]["loss"] == pytest.approx(want["loss"], abs=1e-4), (
                rank,
                arch,
                mode,
            )
            assert got[(arch, mode, tp)]["grad_norm"] == pytest.approx(
                want["grad_norm"], rel=1e-4
            ), (
                rank,
                arch,
                mode,
            )
            dp = world // (2 * tp)
            assert got[(arch, mode, tp, "dims")] == (rank // (2 * tp), dp, 4)
            assert got[(arch, mode, tp, "attn")] == "colossus_sp"


@pytest.mark.slow
def test_sp2_trainer_matches_single_process(tmp_path):
    ref, want_gpt2, want_eval = _reference(tmp_path, "gpt2", eval_too=True)
    _, want_llama, _ = _reference(tmp_path, "llama")
    assert max(want_gpt2["grad_norm"]) > 0.5  # clipping was exercised
    res = spawn(_worker, 2, tmp_path / "spawn", str(tmp_path / "spawn"))
    _check(res, {"gpt2": want_gpt2, "llama": want_llama}, 2)
    for got in res:  # resumed from step 5: the same losses as the uninterrupted run
        assert got["resumed"] == pytest.approx(want_gpt2["loss"][5:], abs=1e-4)
    for rank, got in enumerate(res):
        assert got["eval"] == pytest.approx(want_eval, abs=1e-4), rank
        assert "not model_type='bert'" in got["refuse_bert"], got["refuse_bert"]
        assert "L % (2*sp) == 0" in got["refuse_len"], got["refuse_len"]
        assert "pad or cut to 16 or 20" in got["refuse_len"], got["refuse_len"]
        assert "valid sp: [1, 3]" in got["refuse_heads"], got["refuse_heads"]
        assert "attention dropout" in got["refuse_dropout"], got["refuse_dropout"]
    # rank 0 wrote a normal HF checkpoint: export it and compare with the reference model
    from transformers import AutoModelForCausalLM

    ck = tmp_path / "spawn/c0/checkpoints/step-00000010"
    loaded = AutoModelForCausalLM.from_pretrained(export_checkpoint(ck, tmp_path / "exported"))
    ids = token_blocks(2)[0][None]
    with torch.no_grad():
        diff = (loaded(input_ids=ids).logits - ref.model(input_ids=ids).logits).abs().max()
    assert diff < 1e-4, float(diff)


@pytest.mark.slow
def test_dp2_sp2_and_tp2_sp2_trainer_match_single_process(tmp_path):
    ref, want_gpt2, _ = _reference(tmp_path, "gpt2")
    refs = {"gpt2": want_gpt2, "llama": _reference(tmp_path, "llama")[1]}
    res = spawn(_worker, 4, tmp_path / "spawn", str(tmp_path / "spawn"))
    _check(res, refs, 4)
    for got in res:  # tp x sp resumed from step 5: the same losses as the uninterrupted run
        assert got["resumed"] == pytest.approx(want_gpt2["loss"][5:], abs=1e-4)
    # tp x sp: sp rank 0 of each tp rank wrote its shard; export consolidates them
    ck = tmp_path / "spawn/c2/checkpoints/step-00000010"
    assert sorted(p.name for p in ck.glob("tp-rank*")) == [
        "tp-rank00000-of-00002.safetensors",
        "tp-rank00001-of-00002.safetensors",
    ]
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(export_checkpoint(ck, tmp_path / "exported"))
    ids = token_blocks(2)[0][None]
    with torch.no_grad():
        diff = (loaded(input_ids=ids).logits - ref.model(input_ids=ids).logits).abs().max()
    assert diff < 1e-4, float(diff)


def test_sp_refusals_before_any_work(tmp_path):
    with pytest.raises(
        ConfigError, match=r"strategy.sp=2 x strategy.tp=1 = 2 does not divide the 1"
    ):
        Trainer(tiny_gpt2(), _config(tmp_path, 2, sp=2), train_dataset=token_blocks())
    cfg = _config(tmp_path, 2, sp=2, tp=4).with_overrides(["strategy.tp_mode=2d"])
    with pytest.raises(ConfigError, match="composes with tp_mode=1d only"):
        Trainer(tiny_gpt2(), cfg, train_dataset=token_blocks())
    cfg = _config(tmp_path, 2, sp=2).with_overrides(["strategy.name=chunk"])
    with pytest.raises(ConfigError, match="does not compose with strategy.name=chunk"):
        Trainer(tiny_gpt2(), cfg, train_dataset=token_blocks())


SMALL = [
    "strategy.name=ddp",
    "data.max_chars=200000",
    "data.block_size=32",
    "data.tokenizer.vocab_size=512",
    "model.config.n_layer=1",
    "model.config.n_embd=32",
    "model.config.n_positions=32",
    "train.max_steps=4",
    "train.batch_size=2",
    "train.eval_batches=2",
    "logging.interval=1",
]


@pytest.mark.slow
def test_sp_cli_under_accelerate_launch(tmp_path):
    """`accelerate launch -m colossus.cli train RECIPE --set strategy.sp=2` (2 gloo processes)
    logs the losses of the same recipe on one process, and its checkpoint exports."""
    import json
    import subprocess
    import sys

    from colossus.recipe import run_recipe

    recipe = Path(__file__).resolve().parents[2] / "recipes" / "gpt2-tiny.yaml"
    small = SMALL + [f"data.cache_dir={tmp_path / 'cache'}"]
    ref = TrainingConfig.from_yaml(recipe, small + ["strategy.name=none"])
    ref = ref.with_overrides([f"train.run_dir={tmp_path / 'ref'}", "logging.progress=false"])
    run_recipe(ref)  # also builds the tokenizer / blocks cache the launched ranks read
    port = free_port()
    cmd = [str(Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu",
           "--num_processes=2", "--num_machines=1", "--mixed_precision=no",
           "--dynamo_backend=no", f"--main_process_port={port}", "-m", "colossus.cli", "train",
           str(recipe), "--run-dir", str(tmp_path / "sp")]  # fmt: skip
    for kv in small + ["strategy.sp=2", "logging.progress=false"]:
        cmd += ["--set", kv]
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK")}
    env |= {"ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, timeout=400, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]

    def losses(run: Path) -> list[float]:
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        return [r["loss"] for r in rows if "loss" in r]

    want = losses(tmp_path / "ref")
    assert len(want) == 4
    assert losses(tmp_path / "sp") == pytest.approx(want, abs=1e-4)
    state = json.loads((tmp_path / "sp/checkpoints/step-00000004/trainer_state.json").read_text())
    assert state["strategy"] == "sp" and state["world_size"] == 2
    exported = export_checkpoint(tmp_path / "sp/checkpoints/step-00000004", tmp_path / "exp")
    assert (exported / "model.safetensors").is_file()
