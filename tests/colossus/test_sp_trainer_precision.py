"""strategy.sp with activation checkpointing and with bf16 autocast (tiny GPT-2, sp=2 on 2 gloo
ranks, ring attention and Ulysses): the per-step losses of every rank match the single-process
Trainer's.

- ``model.gradient_checkpointing`` (built through ``colossus.models.build_model``, the CLI's
  path), fp32: within 1e-4 of single-process training without checkpointing (recomputation
  changes no math), and the ring's forward really ran twice per step (counted sends).
- ``train.mixed_precision=bf16``: within ``BF16_TOL`` = 2e-3 of the single-process bf16
  Trainer. Both round every matmul to bf16 (relative step 2**-8), at different places: ring
  attention merges per-block softmax results (LSE and output kept in fp32), Ulysses runs SDPA on
  gathered heads, and the sp loss is a sum of two ranks' token sums. Measured here: bf16 itself
  moves one process's losses by ~1.3e-3 from fp32 within these 4 steps (asserted > 1e-4, so
  autocast really changed the arithmetic), and sp in bf16 differs from one process in bf16 by
  <= ~3.5e-4. The bar is about the size of bf16's own effect: an sp run rounding in its own
  places stays inside it; the fp32 cases (1e-4) catch errors of the sp math itself. The bytes
  the ring sends (half of fp32's) show K and V really travel in bf16.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from conftest import token_blocks
from spawn_helpers import spawn

from colossus import Trainer, TrainingConfig
from colossus.models import build_model
from parallel import comm

BF16_TOL = 2e-3
GPT2 = {"n_layer": 2, "n_embd": 32, "n_head": 4, "vocab_size": 128, "n_positions": 32,
        "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}  # fmt: skip
# (sp_mode, gradient_checkpointing, mixed_precision, steps)
CASES = [
    ("ring_attention", True, "no", 6),
    ("ring_attention", False, "bf16", 4),
    ("ulysses", False, "bf16", 4),
]


def _model(ckpt: bool):
    torch.manual_seed(0)
    return build_model(TrainingConfig(model={"config": GPT2, "gradient_checkpointing": ckpt}).model)


def _config(run_dir: Path, steps: int, sp: int = 1, mode="ring_attention", mp="no"):
    return TrainingConfig(
        name="sp-precision",
        model={"config": GPT2},
        optim={"lr": 3e-3, "weight_decay": 0.01},
        strategy={"name": "ddp" if sp > 1 else "none", "sp": sp, "sp_mode": mode},
        train={
            "max_steps": steps,
            "batch_size": 2,
            "max_grad_norm": 0.5,
            "seed": 0,
            "mixed_precision": mp,
            "run_dir": str(run_dir),
        },  # fmt: skip
        checkpoint={"save_final": False},
        logging={"progress": False, "plot": False},
    )


def _worker(out: str):
    r, w = dist.get_rank(), dist.get_world_size()
    os.environ.update(RANK=str(r), WORLD_SIZE=str(w), LOCAL_RANK=str(r), LOCAL_WORLD_SIZE=str(w))
    res = {}
    for i, (mode, ckpt, mp, steps) in enumerate(CASES):
        model = _model(ckpt)
        t = Trainer(
            model,
            _config(Path(out) / f"c{i}", steps, sp=2, mode=mode, mp=mp),
            train_dataset=token_blocks(16),
        )
        comm.reset_stats()
        t.train()
        sent = comm.stats().get("sp", {}).get("send", {}).get("payload", 0)
        res[i] = ([h["loss"] for h in t.history], model.is_gradient_checkpointing, sent)
    return res


@pytest.mark.slow
def test_sp2_trainer_checkpointing_and_bf16_match_single_process(tmp_path):
    refs = {}
    for mp, steps in (("no", 6), ("bf16", 4)):
        t = Trainer(
            _model(False),
            _config(tmp_path / f"ref-{mp}", steps, mp=mp),
            train_dataset=token_blocks(16),
        )
        t.train()
        refs[mp] = [h["loss"] for h in t.history]
    gap = max(abs(a - b) for a, b in zip(refs["bf16"], refs["no"][:4], strict=False))
    assert gap > 1e-4, gap  # bf16 autocast really changed the arithmetic
    res = spawn(_worker, 2, tmp_path / "spawn", str(tmp_path / "spawn"))
    for rank, got in enumerate(res):
        for i, (mode, ckpt, mp, steps) in enumerate(CASES):
            losses, is_ckpt, sent = got[i]
            tol = 1e-4 if mp == "no" else BF16_TOL
            assert losses == pytest.approx(refs[mp][:steps], abs=tol), (rank, mode, mp, losses)
            assert is_ckpt == ckpt, (rank, i)
            if mode == "ring_attention":
                # K/V blocks sent per layer and step (batch 2 x 4 heads x 8 tokens x 8 dims:
                # 2 KiB in fp32, 1 KiB in bf16, the dtype autocast gives K and V): K, V forward;
                # K, V and the dK, dV accumulator's two hops backward; K, V again when
                # checkpointing recomputes the forward
                blocks = steps * GPT2["n_layer"] * (10 if ckpt else 8)
                assert sent == blocks * (2048 if mp == "no" else 1024), (rank, i, sent)
