"""Several chunk managers sharing one budget (offload.pool): a trained and a frozen tiny GPT-2,
HF generate through the hooks, cross-model release under the shared device budget, and the
error when the members cannot fit."""

import pytest
import torch
from offload_helpers import CLIP, LR, WD, batches, plain_adamw, spawn, tiny_gpt2

from offload import ChunkAdamW, ChunkConfig, ChunkManager, MemoryPool

CHUNK = 8192  # elements: a tiny GPT-2 (~30 k params) spans 5 chunks
KIB = 1024


def _cfg(budget, host=None, offload=1.0):
    return ChunkConfig(
        chunk_size=CHUNK,
        device_budget=budget,
        host_budget=host,
        offload_param_frac=offload,
        offload_optim_frac=offload,
    )


pytestmark = pytest.mark.usefixtures("one_thread")


def pool_worker() -> dict:
    """A trained and a frozen tiny GPT-2 in one pool, against plain PyTorch copies. Every rank
    gets the same batch, so the averaged gradient equals the single-process one."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    world = dist.get_world_size() if dist.is_initialized() else 1
    budget = 200 * KIB  # both models gathered whole: 2 x 5 chunks x 32 KiB = 320 KiB
    pool = MemoryPool(device_budget=budget)
    actor = ChunkManager(tiny_gpt2(0), _cfg(budget), pool=pool.member("actor"))
    ref = ChunkManager(tiny_gpt2(0).requires_grad_(False), _cfg(budget), pool=pool.member("ref"))
    pool.check()
    opt = ChunkAdamW(actor, lr=LR, weight_decay=WD)
    plain = tiny_gpt2(0)
    frozen = tiny_gpt2(0).eval()
    popt = plain_adamw(plain)
    prompt = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
    out: dict = {"tokens_equal": [], "loss_diff": [], "logits_diff": [], "order_kept": []}
    for step, b in enumerate(batches(3)):
        # HF generate (no-grad forwards with a KV cache) through the actor's hooks: same tokens
        gen = {"max_new_tokens": 6, "do_sample": True, "top_k": 0, "pad_token_id": 0}
        order = list(actor.order.sequence)
        torch.manual_seed(step)
        with actor.inference():
            got = actor.module.generate(
                prompt, attention_mask=torch.ones_like(prompt), synced_gpus=world > 1, **gen
            )
        torch.manual_seed(step)
        with torch.no_grad():
            want = plain.generate(prompt, attention_mask=torch.ones_like(prompt), **gen)
        out["tokens_equal"].append(torch.equal(got, want))
        if step:  # the training step's recorded order is untouched by generation
            out["order_kept"].append(actor.order.sequence == order and actor.order.frozen)
        # the frozen model scores through its hooks (plain no_grad: its chunks stay cached)
        with torch.no_grad():
            d = ref.module(input_ids=b).logits - frozen(input_ids=b).logits
        out["logits_diff"].append(float(d.abs().max()))
        # a training step of the actor: the pool releases the idle frozen model's chunks
        loss = actor.module(input_ids=b, labels=b).loss
        actor.backward(loss)
        actor.clip_grad_norm_(CLIP)
        opt.step()
        opt.zero_grad()
        pl = plain(input_ids=b, labels=b).loss
        pl.backward()
        torch.nn.utils.clip_grad_norm_(plain.parameters(), CLIP)
        popt.step()
        popt.zero_grad()
        out["loss_diff"].append(abs(loss.item() - pl.item()))
    out["releases"] = pool.releases
    out["report"] = pool.report()
    out["frozen_state_bytes"] = sum(
        t.bytes[k] + t.peak_bytes["grad_buffer"]
        for t in ref.tiers.values()
        for k in ("grad_shard", "master", "optim_state")
    )
    out["frozen_has_state"] = any(c.grad_shard is not None or c.optim_state for c in ref.chunks)
    try:
        ChunkAdamW(ref)
        out["frozen_optimizer_error"] = None
    except ValueError as e:
        out["frozen_optimizer_error"] = str(e)
    with ref.inference():
        ref.module(input_ids=prompt)
    out["resident_after_phase"] = sum(c.resident and not c.payload_is_shard for c in ref.chunks)
    named = dict(plain.named_parameters())
    out["param_diff"] = max(
        float((p - named[n].detach()).abs().max()) for n, p in actor.iter_full_params()
    )
    return out


def _check(out: dict, world: int) -> None:
    assert all(out["tokens_equal"]) and all(out["order_kept"]) and len(out["order_kept"]) == 2
    assert max(out["logits_diff"]) == 0.0  # same fp32 ops on the same values
    # clipping norms are summed in another order (per shard vs per parameter): AdamW turns the
    # ~1e-7 relative difference into parameter differences of a few 1e-6 after 3 steps
    assert max(out["loss_diff"]) < 1e-6 and out["param_diff"] < 2e-5
    rep = out["report"]["device"]
    assert rep["peak"] <= rep["budget"]
    if world > 1:  # gathered copies exist (one rank on a CPU: the shard is the payload)
        assert out["releases"] > 0  # the frozen model's cached chunks made room for the actor
        assert rep["members"]["ref"]["peak"] > 0 and rep["members"]["actor"]["peak"] > 0
    # frozen: parameters only, no gradients, masters or optimizer state anywhere
    assert out["frozen_state_bytes"] == 0 and not out["frozen_has_state"]
    assert "no trainable chunks" in out["frozen_optimizer_error"]
    assert out["resident_after_phase"] == 0  # released when the phase ends


def test_trained_and_frozen_models_share_the_budget_one_process():
    _check(pool_worker(), 1)


def test_trained_and_frozen_models_share_the_budget_two_ranks(tmp_path):
    for out in spawn(pool_worker, 2, tmp_path):
        _check(out, 2)


def test_pool_check_says_by_how_much():
    budget = 100 * KIB
    pool = MemoryPool(device_budget=budget)
    for name in ("actor", "critic"):  # parameters and AdamW state on the device
        ChunkManager(tiny_gpt2(0), _cfg(budget, offload=0.0), dry_run_world_size=1,
                     pool=pool.member(name))  # fmt: skip
    need = pool.need()["device"]
    assert need > budget
    with pytest.raises(ValueError, match=rf"device budget {budget} B is {need - budget} B short"):
        pool.check()
    with pytest.raises(ValueError, match="already has a member named 'actor'"):
        pool.member("actor")
    with pytest.raises(ValueError, match="must be the pool's"):
        ChunkManager(tiny_gpt2(0), _cfg(None), pool=MemoryPool(4096).member("x"))
