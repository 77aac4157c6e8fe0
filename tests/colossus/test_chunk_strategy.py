"""Trainer with strategy ``chunk``.

Reference: a plain PyTorch loop (torch AdamW, fused, decay on ndim >= 2, clip 1.0) over the
Trainer's data order at the same global batch. Tolerances (fp32): losses within 1e-5 absolute,
final parameters within 1e-5, except the attention key bias, whose gradient is identically zero
so its value is Adam-normalised rounding noise (see conftest.key_bias_mask; 1e-3). Every rank is
checked. Resume is compared bit for bit; exported checkpoints give identical logits.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import assert_params_close, tiny_gpt2, token_blocks
from transformers import AutoModelForCausalLM

from colossus import CheckpointError, ConfigError, Trainer, TrainingConfig
from colossus.export import export_checkpoint, load_checkpoint_model

WORKER = Path(__file__).with_name("chunk_worker.py")
STEPS = 30
CHUNK = 1500  # small enough that parameters straddle chunk and shard boundaries
PLACEMENTS = {
    "all-device": {"chunk_size": CHUNK},
    "all-host": {"chunk_size": CHUNK, "offload_param_frac": 1.0, "offload_optim_frac": 1.0},
    "mixed": {
        "chunk_size": CHUNK,
        "offload_param_frac": 0.3,
        "offload_optim_frac": 0.6,
        "keep_gathered_frac": 0.5,
    },
}


def config(tmp_path, chunk, world=1, **kw):
    base = dict(
        name="chunk",
        optim={"lr": 3e-3, "weight_decay": 0.01},
        schedule={"name": "constant"},
        strategy={"name": "chunk", "chunk": chunk},
        train={
            "max_steps": STEPS,
            "batch_size": 8 // world,
            "max_grad_norm": 1.0,
            "run_dir": str(tmp_path),
            "seed": 0,
        },
        checkpoint={"save_final": False},
        logging={"progress": False, "plot": False},
    )
    return TrainingConfig(**(base | kw))


@pytest.fixture(scope="module")
def reference():
    blocks = token_blocks()
    model = tiny_gpt2()
    opt = torch.optim.AdamW(
        [
            {"params": [p for p in model.parameters() if p.ndim >= 2], "weight_decay": 0.01},
            {"params": [p for p in model.parameters() if p.ndim < 2], "weight_decay": 0.0},
        ],
        lr=3e-3,
        betas=(0.9, 0.95),
        eps=1e-8,
        fused=True,
    )
    losses = []
    for step in range(STEPS):  # the Trainer's order: a seeded permutation per epoch of 8 steps
        perm = torch.randperm(64, generator=torch.Generator().manual_seed(step // 8))
        ids = torch.stack([blocks[i] for i in perm[(step % 8) * 8 : (step % 8) * 8 + 8]])
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses, {n: p.detach().clone() for n, p in model.named_parameters()}


def check_same_training(losses, params, reference, what):
    ref_losses, ref_params = reference
    assert len(losses) == STEPS
    diff = max(abs(a - b) for a, b in zip(losses, ref_losses))
    assert diff <= 1e-5, f"{what}: max loss diff {diff}"
    assert_params_close(ref_params, params)
    assert ref_losses[-1] < ref_losses[0] - 0.5  # it really trained


# ---------------------------------------------------------------------------- 1 process
@pytest.mark.parametrize("placement", list(PLACEMENTS))
def test_one_process_matches_pytorch(tmp_path, reference, placement):
    t = Trainer(tiny_gpt2(), config(tmp_path, PLACEMENTS[placement]), train_dataset=token_blocks())
    t.train()
    check_same_training(
        [r["loss"] for r in t.history], t.strategy.full_state_dict(), reference, placement
    )
    assert t.model.lm_head.weight is t.model.transformer.wte.weight  # still tied
    rec = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert rec["mem_device_gib"] >= 0 and rec["mem_host_gib"] >= 0
    rep = t.strategy.mgr.memory_report()
    if placement == "all-host":  # all model state on host (the device may hold a grad buffer)
        assert rep["device"]["model_state"] == 0 and rec["mem_host_gib"] > 0
        assert rec["mem_host_gib"] == pytest.approx(rep["host"]["total"] / 2**30, abs=1e-6)


# ---------------------------------------------------------------------------- N ranks
def _torchrun(out: Path, world: int, cases: dict, extras: bool = False) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK")}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={world}",
        str(WORKER),
        str(out),
        str(world),
        json.dumps(cases),
        *(["extras"] if extras else []),
    ]
    proc = subprocess.run(cmd, env=env, timeout=600, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    results = [torch.load(out / f"rank{r}.pt") for r in range(world)]
    assert [r["rank"] for r in results] == list(range(world))
    return [r["res"] for r in results]


@pytest.fixture(scope="module")
def world2(tmp_path_factory):
    out = tmp_path_factory.mktemp("chunk2")
    return out, _torchrun(out, 2, PLACEMENTS, extras=True)


@pytest.fixture(scope="module")
def world4(tmp_path_factory):
    out = tmp_path_factory.mktemp("chunk4")
    # the Trainer path on 4 ranks, one placement (tests/offload covers all of them on 4 ranks)
    return out, _torchrun(out, 4, {"mixed": PLACEMENTS["mixed"]})


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
def test_ranks_match_pytorch(request, reference, world):
    _, results = request.getfixturevalue(f"world{world}")
    for rank, res in enumerate(results):
        for placement, r in res.items():
            if placement == "resume":
                continue
            check_same_training(r["losses"], r["params"], reference, f"rank {rank} {placement}")
            assert r["tied"]


@pytest.mark.slow
def test_resume_is_exact_on_two_ranks(world2):
    _, results = world2
    for rank, res in enumerate(results):
        r = res["resume"]
        assert len(r["resumed"]) == STEPS // 2
        assert r["resumed"] == r["straight"][STEPS // 2 :], f"rank {rank}"  # bit-identical
        for n, p in res["all-device"]["params"].items():
            assert torch.equal(r["params"][n], p), f"rank {rank} {n}"


@pytest.mark.slow
def test_sharded_checkpoint_exports_and_loads(tmp_path, world2):
    _, results = world2
    ck = Path(results[0]["resume"]["final_ckpt"])
    shards = sorted(p.name for p in ck.glob("chunks-rank*.safetensors"))
    assert shards == [
        "chunks-rank00000-of-00002.safetensors",
        "chunks-rank00001-of-00002.safetensors",
    ]
    trained = tiny_gpt2()
    trained.load_state_dict(results[0]["resume"]["params"], strict=False)
    trained.eval()
    ids = torch.stack(token_blocks(4, seed=5))
    with torch.no_grad():
        want = trained(ids).logits
    # small weight files: the streaming writer must split and index them
    out = export_checkpoint(ck, tmp_path / "hf", max_shard_bytes=64 << 10)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    hf = AutoModelForCausalLM.from_pretrained(out)
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, want, rtol=0, atol=0)
    assert hf.lm_head.weight.data_ptr() == hf.transformer.wte.weight.data_ptr()
    one = export_checkpoint(ck, tmp_path / "hf1")  # default size: a single model.safetensors
    assert (one / "model.safetensors").is_file() and (one / "config.json").is_file()
    model, _ = load_checkpoint_model(ck)  # what `colossus generate` uses
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, want, rtol=0, atol=0)


@pytest.mark.slow
def test_sharded_checkpoint_refusals(tmp_path, world2):
    _, results = world2
    ck = Path(results[0]["resume"]["final_ckpt"])
    # written by 2 ranks, resumed by 1: a clear error, not garbage
    cfg = config(tmp_path / "a", PLACEMENTS["all-device"], checkpoint={"resume_from": str(ck)})
    with pytest.raises(CheckpointError, match="2 ranks"):
        Trainer(tiny_gpt2(), cfg, train_dataset=token_blocks())
    # a chunk checkpoint into strategy none: formats differ, say so
    cfg = cfg.with_overrides(["strategy.name=none", f"train.run_dir={tmp_path / 'b'}"])
    with pytest.raises(CheckpointError, match="strategy 'chunk'"):
        Trainer(tiny_gpt2(), cfg, train_dataset=token_blocks())
    # a corrupt shard is refused by the manifest check
    bad = tmp_path / "bad"
    shutil.copytree(ck, bad)
    f = bad / "chunks-rank00001-of-00002.safetensors"
    data = bytearray(f.read_bytes())
    data[-10] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256"):
        export_checkpoint(bad, tmp_path / "never")
    assert not (tmp_path / "never").exists()


# ---------------------------------------------------------------------------- config
def test_chunk_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="did you mean 'strategy.chunk.offload_param_frac'"):
        TrainingConfig(name="x").with_overrides(["strategy.chunk.ofload_param_frac=0.5"])
    with pytest.raises(ConfigError, match="raise offload_optim_frac"):
        TrainingConfig(name="x").with_overrides(["strategy.chunk.offload_param_frac=0.5"])
    cfg = TrainingConfig(name="x").with_overrides(["strategy.chunk.host_budget=12GiB"])
    assert cfg.strategy.chunk.host_budget == 12 * 2**30
    # a model that cannot fit its budget stops before training and says by how much
    small = config(tmp_path, {"offload_optim_frac": 1.0, "host_budget": "10KiB"})
    with pytest.raises(ConfigError, match=r"host budget 10240 B is too small.*B more"):
        Trainer(tiny_gpt2(), small, train_dataset=token_blocks())


def test_fp16_chunks_scale_the_loss(tmp_path):
    cfg = config(tmp_path, {"chunk_size": CHUNK, "dtype": "fp16"})
    cfg = cfg.with_overrides(["train.max_steps=4"])
    t = Trainer(tiny_gpt2(), cfg, train_dataset=token_blocks())
    t.train()
    rec = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert rec["mem_loss_scale"] > 0 and "mem_skipped_steps" in rec
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in t.history)


def test_auto_placement_reserves_activations(tmp_path, reference):
    """placement=auto through the Trainer: the activation estimate of the batch shape is kept
    free, the optimizer state that does not fit in the host budget goes to NVMe, and training
    is unchanged."""
    nvme = tmp_path / "nvme"
    nvme.mkdir()
    auto = {"chunk_size": CHUNK, "placement": "auto", "nvme_dir": str(nvme), "nvme_prefetch": 1}
    roomy_cfg = config(tmp_path / "a", auto | {"host_budget": 1 << 40})
    roomy = Trainer(tiny_gpt2(), roomy_cfg, train_dataset=token_blocks())
    reserve = roomy.strategy.mgr.config.activation_bytes
    assert reserve > 0  # from the batch shape (colossus.plan.activation_bytes)
    assert roomy.strategy.mgr.swapper is None  # a roomy budget: nothing leaves RAM
    need = sum(roomy.strategy.mgr.plan[t] for t in ("device", "host"))
    roomy.strategy.close()
    tight = auto | {"host_budget": need - 1}  # one byte short of everything in RAM
    t = Trainer(tiny_gpt2(), config(tmp_path / "b", tight), train_dataset=token_blocks())
    assert 0 < t.strategy.mgr.fractions["nvme_optim_frac"] < 1.0
    t.train()
    check_same_training(
        [r["loss"] for r in t.history], t.strategy.full_state_dict(), reference, "auto"
    )
    with pytest.raises(ConfigError, match="no placement fits"):
        Trainer(
            tiny_gpt2(),
            config(tmp_path / "c", auto | {"host_budget": reserve}),
            train_dataset=token_blocks(),
        )


def test_optimizer_state_on_nvme(tmp_path, reference):
    nvme = tmp_path / "nvme"
    nvme.mkdir()
    chunk = PLACEMENTS["all-host"] | {"nvme_optim_frac": 1.0, "nvme_dir": str(nvme)}
    t = Trainer(tiny_gpt2(), config(tmp_path / "run", chunk), train_dataset=token_blocks())
    t.train()
    check_same_training(
        [r["loss"] for r in t.history], t.strategy.full_state_dict(), reference, "nvme"
    )
    rec = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert rec["mem_nvme_gib"] > 0
    # per step: Adam's m and v read and written once each, the least this placement allows;
    # above it only by the 4 KiB alignment of each extent (shards here are ~6 KB)
    mgr = t.strategy.mgr
    min_bytes = 4 * 4 * sum(c.shard_size for c in mgr.chunks)
    assert rec["mem_nvme_min_gb"] * 1e9 == pytest.approx(min_bytes, rel=1e-2)  # metrics round
    assert rec["mem_nvme_min_gb"] <= rec["mem_nvme_gb"] <= 1.4 * rec["mem_nvme_min_gb"]
    assert 0.0 <= rec["mem_io_overlap"] <= 1.0 and rec["mem_io_busy_s"] > 0
    missing = chunk | {"nvme_dir": str(tmp_path / "absent")}
    with pytest.raises(ConfigError, match="does not exist"):
        Trainer(tiny_gpt2(), config(tmp_path / "run2", missing), train_dataset=token_blocks())


NVME_ALL = {
    "chunk_size": CHUNK,
    "offload_param_frac": 1.0,
    "offload_optim_frac": 1.0,
    "nvme_optim_frac": 1.0,
    "nvme_param_frac": 1.0,
}


def test_lazy_init_from_checkpoint_onto_nvme(tmp_path, reference):
    """model.lazy_init + model.path: built on meta, weights streamed from the checkpoint
    straight into NVMe-resident chunks; trains exactly like plain PyTorch on the same weights."""
    from colossus.config import ModelConfig
    from colossus.models import build_model

    tiny_gpt2().save_pretrained(tmp_path / "ckpt")  # the reference's initial weights
    model = build_model(ModelConfig(path=str(tmp_path / "ckpt"), lazy_init=True))
    assert model.transformer.h[0].attn.c_attn.weight.is_meta
    (tmp_path / "nvme").mkdir()
    chunk = NVME_ALL | {"nvme_dir": str(tmp_path / "nvme")}
    t = Trainer(model, config(tmp_path / "run", chunk), train_dataset=token_blocks())
    t.train()
    check_same_training(
        [r["loss"] for r in t.history], t.strategy.full_state_dict(), reference, "lazy+nvme"
    )
    with pytest.raises(ConfigError, match="meta device"):
        lazy = build_model(ModelConfig(path=str(tmp_path / "ckpt"), lazy_init=True))
        Trainer(lazy, config(tmp_path / "r2", {}).with_overrides(["strategy.name=none"]))


def test_disk_full_during_training_stops_cleanly(tmp_path, reference, monkeypatch):
    """ENOSPC injected at the I/O layer at step 7: a clear StorageError, the step-5 checkpoint
    stays valid, resuming from it (disk fixed) finishes with the reference's losses, and the
    NVMe files are gone."""
    import errno
    import os

    from colossus import StorageError
    from colossus.checkpoint import latest_checkpoint, verify_checkpoint

    nvme = tmp_path / "nvme"
    nvme.mkdir()
    chunk = NVME_ALL | {"nvme_dir": str(nvme)}
    run = tmp_path / "run"
    cfg = config(run, chunk, checkpoint={"interval": 5, "save_final": False})
    real = os.pwritev
    broken = [False]

    def pwritev(fd, bufs, off):
        if broken[0]:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, bufs, off)

    class BreakDisk:
        def on_step_end(self, trainer, record):
            broken[0] = trainer.step >= 6

    monkeypatch.setattr(os, "pwritev", pwritev)
    t = Trainer(tiny_gpt2(), cfg, train_dataset=token_blocks(), callbacks=[BreakDisk()])
    with pytest.raises(StorageError, match="ENOSPC.*disk is full.*checkpoints already written"):
        t.train()
    assert 6 <= t.step < STEPS
    ck = latest_checkpoint(run / "checkpoints")
    assert ck is not None and ck.name == "step-00000005"
    verify_checkpoint(ck)  # intact
    assert list(nvme.iterdir()) == []  # the failed run released its NVMe files
    monkeypatch.setattr(os, "pwritev", real)
    resumed = Trainer(
        tiny_gpt2(seed=9), config(run, chunk, checkpoint={"resume_from": str(ck)}), token_blocks()
    )
    resumed.train()
    ref_losses, _ = reference
    got = [r["loss"] for r in resumed.history]
    assert max(abs(a - b) for a, b in zip(got, ref_losses[5:])) <= 1e-5


def test_memory_timeline_plot(tmp_path):
    """RUN_DIR/memory.png: bytes per tier over the second step, with the NVMe reads and writes."""
    nvme = tmp_path / "nvme"
    nvme.mkdir()
    cfg = config(
        tmp_path / "run",
        NVME_ALL | {"nvme_dir": str(nvme)},
        logging={"progress": False, "plot": True},
    ).with_overrides(["train.max_steps=3"])
    t = Trainer(tiny_gpt2(), cfg, train_dataset=token_blocks())
    t.train()
    png = tmp_path / "run" / "memory.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    data = t.strategy._timeline
    assert len(data["tiers"]["nvme"]) >= 1 and len(data["tiers"]["device"]) > 10
    kinds = {w for *_, w, _ in data["io"]}
    assert kinds == {"read", "write"}  # the step read shards and wrote gradients and state
