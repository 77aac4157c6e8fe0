"""Shared by the offload tests: a tiny GPT-2, data, the plain-PyTorch reference loop, the chunk
training loop, and a gloo launcher (``torch.multiprocessing.spawn`` on a free port)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from conftest import assert_params_close, key_bias_mask  # noqa: F401  (re-exported for tests)
from spawn_helpers import free_port, spawn  # noqa: F401  (re-exported for tests)

from offload import ChunkAdamW, ChunkConfig, ChunkManager

LR, WD, CLIP, STEPS, BATCH, SEQ, VOCAB = 3e-3, 0.1, 1.0, 30, 8, 16, 128


def tiny_gpt2(seed: int = 0, checkpointing: bool = False, use_reentrant: bool = False):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(
        n_layer=2,
        n_embd=32,
        n_head=4,
        vocab_size=VOCAB,
        n_positions=32,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
    )
    model = GPT2LMHeadModel(cfg)
    if checkpointing:
        model.activation_checkpointing_enable({"use_reentrant": use_reentrant})
    model.train()
    return model


def batches(steps: int = STEPS, batch: int = BATCH, seq: int = SEQ, seed: int = 1):
    """``steps`` global batches with a learnable pattern (next token = t + 1 mostly)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        start = torch.randint(0, VOCAB, (batch, 1), generator=g)
        ramp = (start + torch.arange(seq)) % VOCAB
        noise = torch.randint(0, VOCAB, (batch, seq), generator=g)
        out.append(torch.where(torch.rand(batch, seq, generator=g) < 0.8, ramp, noise))
    return out


def plain_adamw(model: torch.nn.Module) -> torch.optim.AdamW:
    """The reference optimizer: AdamW(fused=True), weight decay only for ndim >= 2 (the chunk
    manager's default decay filter)."""
    params = list(model.parameters())
    return torch.optim.AdamW(
        [
            {"params": [p for p in params if p.ndim >= 2], "weight_decay": WD},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
        ],
        lr=LR,
        fused=True,
    )


def reference_run(
    steps: int = STEPS,
    checkpointing: bool = False,
    seed: int = 0,
    model: torch.nn.Module | None = None,
):
    """Plain PyTorch: AdamW(fused=True), decay only for ndim >= 2, clip_grad_norm_ (on
    ``model``, default the tiny GPT-2)."""
    model = tiny_gpt2(seed, checkpointing) if model is None else model
    opt = plain_adamw(model)
    losses = []
    for b in batches(steps):
        loss = model(input_ids=b, labels=b).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses, {n: p.detach().clone() for n, p in model.named_parameters()}


def global_loss(loss: torch.Tensor) -> float:
    t = loss.detach().clone()
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return t.item()


def local_slice(b: torch.Tensor) -> torch.Tensor:
    if not dist.is_initialized():
        return b
    n, r = dist.get_world_size(), dist.get_rank()
    k = b.shape[0] // n
    return b[r * k : (r + 1) * k]


def chunk_run(
    cfg: ChunkConfig,
    steps: int = STEPS,
    checkpointing: bool = False,
    seed: int = 0,
    start: int = 0,
    mgr: ChunkManager | None = None,
    opt: ChunkAdamW | None = None,
) -> dict[str, Any]:
    """The same loop through the chunk manager; every rank gets its slice of the global batch."""
    if mgr is None:
        mgr = ChunkManager(tiny_gpt2(seed, checkpointing), cfg)
        opt = ChunkAdamW(mgr, lr=LR, weight_decay=WD)
    assert opt is not None
    losses, model_state = [], None
    for b in batches(start + steps)[start:]:
        b = local_slice(b)
        loss = mgr.module(input_ids=b, labels=b).loss
        mgr.backward(loss)
        model_state = mgr.memory_report()  # kept from the last step: optimizer state exists
        mgr.clip_grad_norm_(CLIP)
        opt.step()
        opt.zero_grad()
        losses.append(global_loss(loss))
    return {
        "losses": losses,
        "params": dict(mgr.iter_full_params()),
        "report_after_backward": model_state,
        "mgr": mgr,
        "opt": opt,
    }


def train_worker(configs: dict[str, ChunkConfig], steps: int = STEPS, checkpointing: bool = False):
    """Rank body: train each config from the same init; keep only what is picklable."""
    out = {}
    for name, cfg in configs.items():
        r = chunk_run(cfg, steps=steps, checkpointing=checkpointing)
        mgr = r["mgr"]
        out[name] = {
            "losses": r["losses"],
            "params": r["params"],
            "report": r["report_after_backward"],
            "capacities": [c.capacity for c in mgr.chunks],
            "numel": sum(c.used for c in mgr.chunks),
            "straddling": sum(
                1 for c in mgr.chunks for s in c.slots if len({*_shards_of(c, s)}) > 1
            ),
            "evictions": mgr.evictions,
            "gathers": mgr.gathers,
            "prefetches": mgr.prefetches,
        }
    return out


def _shards_of(c, s):
    return (i // c.shard_size for i in (s.offset, s.offset + s.numel - 1))


class WithUnused(torch.nn.Module):
    """GPT-2 plus a module that runs every step but whose output never reaches the loss."""

    def __init__(self, seed: int = 0):
        super().__init__()
        self.lm = tiny_gpt2(seed)
        self.side = torch.nn.Linear(32, 32)

    def forward(self, input_ids, labels):
        self.side(torch.ones(2, 32))  # computed, unused
        return self.lm(input_ids=input_ids, labels=labels)


def _summary(res: dict[str, Any]) -> dict[str, Any]:
    mgr = res["mgr"]
    return {
        "losses": res["losses"],
        "params": res["params"],
        "report": res["report_after_backward"],
        "end_report": mgr.memory_report(),
        "capacities": [c.capacity for c in mgr.chunks],
        "n_chunks": len(mgr.chunks),
        "numel": sum(c.used for c in mgr.chunks),
        "straddling": [s.name for c in mgr.chunks for s in c.slots if len({*_shards_of(c, s)}) > 1],
        "evictions": mgr.evictions,
        "gathers": mgr.gathers,
        "prefetches": mgr.prefetches,
        "tied": mgr.module.lm_head.weight is mgr.module.transformer.wte.weight,
    }


def dist_suite(configs: dict[str, dict[str, Any]], out: str, extras: bool) -> dict[str, Any]:
    """Rank body for the distributed tests: one process group, many cases (spawning and
    importing transformers costs far more than 30 tiny steps)."""
    from safetensors.torch import load_file, save_file

    res: dict[str, Any] = {}
    for name, kw in configs.items():
        res[name] = _summary(chunk_run(ChunkConfig(**kw)))
    if not extras:
        return res
    base = configs["all-device"]
    res["checkpointing"] = _summary(chunk_run(ChunkConfig(**base), checkpointing=True))
    # save after 15 steps, load into a differently initialised model, train 15 more
    half = STEPS // 2
    first = chunk_run(ChunkConfig(**base), steps=half)
    path = Path(out) / f"shard-rank{dist.get_rank()}.safetensors"
    save_file(first["mgr"].state_dict_shard(), path)
    mgr = ChunkManager(tiny_gpt2(seed=123), ChunkConfig(**base))
    opt = ChunkAdamW(mgr, lr=LR, weight_decay=WD)
    mgr.load_state_dict_shard(load_file(path))
    second = chunk_run(ChunkConfig(**base), steps=STEPS - half, start=half, mgr=mgr, opt=opt)
    res["resumed"] = {
        "losses": first["losses"] + second["losses"],
        "tied": mgr.module.lm_head.weight is mgr.module.transformer.wte.weight,
    }
    # unused parameter: no hang, untouched
    model = WithUnused()
    side0 = model.side.weight.detach().clone()
    mgr = ChunkManager(model, ChunkConfig(**base))
    opt = ChunkAdamW(mgr, lr=LR, weight_decay=WD)
    for b in batches(3):
        b = local_slice(b)
        mgr.module(input_ids=b, labels=b).loss.backward()
        mgr.clip_grad_norm_(CLIP)
        opt.step()
        opt.zero_grad()
    full = dict(mgr.iter_full_params())
    res["unused"] = {"side": full["side.weight"], "side0": side0}
    # per-parameter norms from the segment tables (params straddle shards): what LAMB needs
    norms = mgr.per_param_sq_norms("param")
    res["norms"] = {n: (v.item(), full[n].double().pow(2).sum().item()) for n, v in norms.items()}
    return res
