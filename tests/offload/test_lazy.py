"""Lazy init: a model built on the meta device is materialised chunk by chunk into its tier.

* From a checkpoint (SafetensorsSource): parameters equal the saved ones exactly, and training
  equals plain PyTorch training of ``from_pretrained`` (fp32, losses within 1e-5).
* From the model's own initialiser: HF's init distributions (GPT-2's scaled residual init), tied
  weights stay tied, and peak memory stays near one chunk, not the model.
"""

from __future__ import annotations

import math

import psutil
import pytest
import torch
from accelerate import init_empty_weights
from offload_helpers import CLIP, LR, WD, assert_params_close, batches, reference_run, tiny_gpt2
from transformers import GPT2Config, GPT2LMHeadModel

from offload import ChunkAdamW, ChunkConfig, ChunkManager
from offload.lazy import SafetensorsSource


def meta_gpt2(cfg: GPT2Config) -> GPT2LMHeadModel:
    with init_empty_weights():
        model = GPT2LMHeadModel(cfg)
    model.tie_weights()
    return model


def train(mgr: ChunkManager, steps: int = 10) -> list[float]:
    opt = ChunkAdamW(mgr, lr=LR, weight_decay=WD)
    losses = []
    for b in batches(steps):
        loss = mgr.module(input_ids=b, labels=b).loss
        mgr.backward(loss)
        mgr.clip_grad_norm_(CLIP)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("tier", ["device", "nvme"])
def test_from_checkpoint_streams_exact_weights_and_trains_like_pytorch(tmp_path, tier):
    src = tiny_gpt2(seed=3)
    src.save_pretrained(tmp_path / "ckpt")
    want = {n: p.detach().clone() for n, p in src.named_parameters()}
    model = meta_gpt2(src.config)
    assert model.transformer.h[0].attn.c_attn.weight.is_meta
    extra = {}
    if tier == "nvme":
        (tmp_path / "nvme").mkdir()
        extra = dict(
            offload_optim_frac=1.0,
            nvme_optim_frac=1.0,
            nvme_param_frac=1.0,
            nvme_dir=str(tmp_path / "nvme"),
        )
    mgr = ChunkManager(
        model,
        ChunkConfig(chunk_size=1500, param_source=SafetensorsSource(tmp_path / "ckpt"), **extra),
    )
    got = dict(mgr.iter_full_params())
    assert set(got) == set(want)
    for n, t in want.items():
        assert torch.equal(got[n], t), n
    assert mgr.module.lm_head.weight is mgr.module.transformer.wte.weight
    # the reference: plain PyTorch on from_pretrained of the same folder
    ref_losses, ref_params = reference_run(steps=10, seed=3)
    losses = train(mgr, 10)
    assert max(abs(a - b) for a, b in zip(losses, ref_losses)) <= 1e-5
    assert_params_close(ref_params, dict(mgr.iter_full_params()))


def test_own_initialiser_distributions_and_ties():
    cfg = GPT2Config(n_layer=4, n_embd=256, n_head=4, vocab_size=1024, n_positions=64)
    torch.manual_seed(0)
    mgr = ChunkManager(meta_gpt2(cfg), ChunkConfig(chunk_size=1 << 16))
    full = dict(mgr.iter_full_params())
    std = cfg.initializer_range
    assert full["transformer.wte.weight"].std().item() == pytest.approx(std, rel=0.05)
    assert full["transformer.h.0.attn.c_attn.weight"].std().item() == pytest.approx(std, rel=0.05)
    scaled = std / math.sqrt(2 * cfg.n_layer)  # GPT-2's residual-projection init
    assert full["transformer.h.2.mlp.c_proj.weight"].std().item() == pytest.approx(scaled, rel=0.05)
    assert torch.all(full["transformer.h.1.ln_1.weight"] == 1)
    assert torch.all(full["transformer.h.1.attn.c_attn.bias"] == 0)
    assert mgr.module.lm_head.weight is mgr.module.transformer.wte.weight
    losses = train(mgr, 3)
    assert all(math.isfinite(x) for x in losses)


def test_uncovered_parameter_is_an_error():
    class Custom(torch.nn.Module):  # no reset_parameters, no HF _init_weights
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.empty(4, 4))

        def forward(self, x):
            return x @ self.w

    with init_empty_weights():
        m = Custom()
    with pytest.raises(ValueError, match=r"uninitialised: \['w'\]"):
        ChunkManager(m, ChunkConfig(chunk_size=64))
    with init_empty_weights():
        m = Custom()
    mgr = ChunkManager(
        m,
        ChunkConfig(
            chunk_size=64, init_fn=lambda mod: torch.nn.init.ones_(mod.w) if mod is m else None
        ),
    )
    assert torch.equal(dict(mgr.iter_full_params())["w"], torch.ones(4, 4))


@pytest.mark.slow
def test_peak_memory_is_about_one_chunk_not_the_model(tmp_path):
    """~113M parameters (450 MB fp32) built straight onto NVMe: RSS grows by far less."""
    cfg = GPT2Config(n_layer=16, n_embd=768, n_head=12, vocab_size=1024, n_positions=128)
    proc = psutil.Process()
    before = proc.memory_info().rss
    model = meta_gpt2(cfg)
    mgr = ChunkManager(
        model,
        ChunkConfig(
            chunk_size=4 << 20,
            offload_optim_frac=1.0,
            nvme_optim_frac=1.0,
            nvme_param_frac=1.0,
            nvme_dir=str(tmp_path),
        ),
    )
    grown = proc.memory_info().rss - before
    model_bytes = 4 * sum(c.used for c in mgr.chunks)
    assert model_bytes > 400e6
    assert grown < 0.35 * model_bytes, (grown, model_bytes)
    assert mgr.memory_report()["nvme"]["param_shard"] >= model_bytes
    mgr.swapper.close()
