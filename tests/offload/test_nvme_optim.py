"""Optimizer state (and separate fp32 masters) on the NVMe tier: the same training as plain
PyTorch (fp32: losses within 1e-5, parameters within 1e-5 but the key-bias noise, see
conftest.key_bias_mask), the bytes each tier holds, the bytes the pipeline moves, save/load."""

from __future__ import annotations

import pytest
import torch
from offload_helpers import STEPS, assert_params_close, chunk_run, reference_run, spawn

from offload import ChunkConfig
from offload.nvme import round_up

CHUNK = 1500


@pytest.fixture(scope="module")
def reference():
    return reference_run()


def nvme_cfg(path, **kw) -> dict:
    base = {
        "chunk_size": CHUNK,
        "offload_optim_frac": 1.0,
        "nvme_optim_frac": 1.0,
        "nvme_dir": str(path),
    }
    return base | kw


def _pages_move() -> bool:
    """Whether this kernel moves pages between mappings (MREMAP_DONTUNMAP, Linux >= 5.7)."""
    from offload import staging

    return staging.move_pages(staging.huge_mapping(4096), staging.huge_mapping(4096))


CASES = {
    "optim-on-nvme": {},
    "params-on-host": {"offload_param_frac": 1.0},
    "half-on-nvme": {"nvme_optim_frac": 0.5},
    "no-prefetch": {"nvme_prefetch": 0, "nvme_io_threads": 1},
    "deep-prefetch": {"nvme_prefetch": 4},
}


@pytest.mark.parametrize("case", list(CASES))
def test_matches_pytorch(tmp_path, reference, case):
    ref_losses, ref_params = reference
    res = chunk_run(ChunkConfig(**nvme_cfg(tmp_path, **CASES[case])))
    assert max(abs(a - b) for a, b in zip(ref_losses, res["losses"])) <= 1e-5
    assert_params_close(ref_params, res["params"])
    mgr = res["mgr"]
    on_nvme = [c for c in mgr.chunks if c.optim_tier == "nvme"]
    assert on_nvme and all(not c.optim_state.keys() - {"step"} for c in on_nvme)  # not in RAM
    if case == "half-on-nvme":
        assert len(on_nvme) < sum(c.requires_grad for c in mgr.chunks)
    # the file really holds the state: Adam's m and v, 4 B each per shard element
    rep = mgr.memory_report()
    assert rep["nvme"]["optim_state"] == sum(2 * round_up(4 * c.shard_size) for c in on_nvme)
    host_state = rep["host"]["optim_state"] + rep["device"]["optim_state"]
    assert host_state == 4 * len(mgr.chunks) + sum(
        8 * c.shard_size for c in mgr.chunks if c.requires_grad and c.optim_tier != "nvme"
    )  # only the step counters and the chunks kept in RAM
    # every step reads each NVMe shard's m and v once and writes them once
    per_step = sum(mgr.swapper.nbytes(c) for c in on_nvme)
    assert mgr.swapper.store.bytes_written >= STEPS * per_step
    assert mgr.swapper.store.bytes_read == (STEPS - 1) * per_step  # step 1 starts from zeros
    mgr.swapper.close()


def test_bf16_master_on_nvme_is_bit_identical_to_in_memory(tmp_path):
    """The fp32 master of a bf16 chunk lives on NVMe; the math must not change at all."""
    base = {"chunk_size": CHUNK, "dtype": torch.bfloat16, "offload_optim_frac": 1.0}
    mem = chunk_run(ChunkConfig(**base), steps=8)
    nv = chunk_run(ChunkConfig(**base, nvme_optim_frac=1.0, nvme_dir=str(tmp_path)), steps=8)
    assert mem["losses"] == nv["losses"]
    for n, p in mem["params"].items():
        assert torch.equal(p, nv["params"][n]), n
    mgr = nv["mgr"]
    assert all(c.master is None for c in mgr.chunks)  # masters are on disk between steps
    assert mgr.memory_report()["nvme"]["master"] >= sum(4 * c.shard_size for c in mgr.chunks)


def test_state_dict_round_trip_through_nvme(tmp_path, reference):
    ref_losses, ref_params = reference
    cfg = ChunkConfig(**nvme_cfg(tmp_path))
    half = STEPS // 2
    first = chunk_run(cfg, steps=half)
    sd = first["mgr"].state_dict_shard()
    assert any(k.endswith(".optim.exp_avg") for k in sd)
    from offload_helpers import LR, WD, tiny_gpt2

    from offload import ChunkAdamW, ChunkManager

    mgr = ChunkManager(tiny_gpt2(seed=5), cfg)
    opt = ChunkAdamW(mgr, lr=LR, weight_decay=WD)
    mgr.load_state_dict_shard(sd)
    second = chunk_run(cfg, steps=STEPS - half, start=half, mgr=mgr, opt=opt)
    losses = first["losses"] + second["losses"]
    assert max(abs(a - b) for a, b in zip(ref_losses, losses)) <= 1e-5
    assert_params_close(ref_params, second["params"])


def test_nvme_config_errors(tmp_path):
    with pytest.raises(ValueError, match="needs nvme_dir"):
        ChunkConfig(offload_optim_frac=1.0, nvme_optim_frac=0.5)
    with pytest.raises(ValueError, match="raise offload_optim_frac"):
        ChunkConfig(nvme_optim_frac=0.5, nvme_dir=str(tmp_path))
    from offload_helpers import tiny_gpt2

    from offload import ChunkManager
    from offload.nvme import NvmeError

    with pytest.raises(NvmeError, match="does not exist"):
        ChunkManager(tiny_gpt2(), ChunkConfig(**nvme_cfg(tmp_path / "nope")))


def _two_rank_body(path: str):
    out = {}
    for name, kw in {"optim": {}, "params": {"nvme_param_frac": 1.0}}.items():
        res = chunk_run(ChunkConfig(**nvme_cfg(path + f"/r{torch.distributed.get_rank()}", **kw)))
        res["mgr"].swapper.close()
        out[name] = {
            "losses": res["losses"],
            "params": res["params"],
            "reclaimed": res["mgr"].reclaimed_gathers,  # never: ranks would all-gather apart
        }
    return out


@pytest.mark.slow
def test_two_ranks_match_pytorch(tmp_path, reference):
    ref_losses, ref_params = reference
    for r in range(2):
        (tmp_path / f"r{r}").mkdir()
    for rank, results in enumerate(spawn(_two_rank_body, 2, tmp_path / "out", str(tmp_path))):
        for name, res in results.items():
            diff = max(abs(a - b) for a, b in zip(ref_losses, res["losses"]))
            assert diff <= 1e-5, (rank, name, diff)
            assert_params_close(ref_params, res["params"])
            assert res["reclaimed"] == 0, (rank, name)
    assert list(tmp_path.glob("r*/colossus-nvme-*")) == []  # files removed


PARAM_CASES = {
    "params-on-nvme": {"nvme_param_frac": 1.0},
    "half-params-on-nvme": {"nvme_param_frac": 0.5, "offload_param_frac": 0.3},
    "params-no-prefetch": {"nvme_param_frac": 1.0, "nvme_prefetch": 0},
}


@pytest.mark.parametrize("case", list(PARAM_CASES))
def test_params_on_nvme_match_pytorch(tmp_path, reference, case):
    """ZeRO-Infinity: parameter shards, gradients and optimizer state all on NVMe."""
    ref_losses, ref_params = reference
    res = chunk_run(ChunkConfig(**nvme_cfg(tmp_path, **PARAM_CASES[case])))
    assert max(abs(a - b) for a, b in zip(ref_losses, res["losses"])) <= 1e-5
    assert_params_close(ref_params, res["params"])
    mgr = res["mgr"]
    on_disk = [c for c in mgr.chunks if c.param_tier == "nvme"]
    assert on_disk and all(c.shard is None and c.master is None for c in on_disk)
    rep = mgr.memory_report()
    assert rep["nvme"]["param_shard"] == sum(round_up(4 * c.shard_size) for c in on_disk)
    assert rep["nvme"]["grad_shard"] == rep["nvme"]["param_shard"]
    assert rep["device"]["param_gathered"] == 0  # everything released after the step
    if PARAM_CASES[case].get("nvme_prefetch", 2) > 0 and case == "params-on-nvme":
        # after the first step the recorded order predicts every read
        assert mgr.fetcher.hits > mgr.fetcher.misses
    # a chunk gathered again at the same shard version (backward after forward) takes back
    # its own parked pages instead of reading the shard (losses above: never a stale one)
    assert mgr.reclaimed_gathers > 0
    assert mgr.module.lm_head.weight is mgr.module.transformer.wte.weight
    mgr.swapper.close()


@pytest.mark.parametrize("movable", [True, False], ids=["parked", "dontneed"])
def test_released_nvme_payload_pages_parked_or_released(tmp_path, reference, monkeypatch, movable):
    """A released NVMe parameter chunk parks its pages in the staging pool (reused by the
    next gather) or, where pages cannot move (another OS, an old kernel), gives them to the
    kernel: same training either way."""
    from offload import staging

    if not movable:
        monkeypatch.setattr(staging, "_mremap", False)
    ref_losses, ref_params = reference
    res = chunk_run(ChunkConfig(**nvme_cfg(tmp_path, nvme_param_frac=1.0)))
    assert max(abs(a - b) for a, b in zip(ref_losses, res["losses"])) <= 1e-5
    assert_params_close(ref_params, res["params"])
    pool = res["mgr"].swapper.store.staging
    if movable and _pages_move():
        assert pool.parked_bytes > 0, "released payloads should have parked their pages"
        # parked pages are host memory: counted (as staging) as soon as they are parked,
        # here right after a forward that released its chunks
        from offload_helpers import batches

        mgr, b = res["mgr"], batches()[0]
        mgr.backward(mgr.module(input_ids=b, labels=b).loss)
        assert pool.parked_bytes > 0
        assert mgr.memory_report()["host"]["staging"] >= pool.parked_bytes
    if not movable:
        assert pool.parked_bytes == 0
    res["mgr"].swapper.close()


def test_params_on_nvme_with_gradient_checkpointing(tmp_path, reference):
    """Recomputation in backward fetches the NVMe shards a third time; same training."""
    ref_losses, ref_params = reference
    res = chunk_run(ChunkConfig(**nvme_cfg(tmp_path, nvme_param_frac=1.0)), checkpointing=True)
    assert max(abs(a - b) for a, b in zip(ref_losses, res["losses"])) <= 1e-5
    assert_params_close(ref_params, res["params"])
    res["mgr"].swapper.close()


def test_step_io_overlaps_backward_and_next_forward(tmp_path, reference):
    """Once the access order is recorded: when backward has no parameter read left, the update
    pass's first optimizer-state reads start (the disk is idle while backward computes); the
    pass visits the chunks the next forward needs first last and hands their updated masters to
    the parameter fetcher (no read back), its last write-backs stay pending (a read of the same
    key waits for them). Same training as plain PyTorch."""
    from offload_helpers import CLIP, LR, WD, batches, tiny_gpt2

    from offload import ChunkAdamW, ChunkManager

    ref_losses, ref_params = reference
    mgr = ChunkManager(tiny_gpt2(0), ChunkConfig(**nvme_cfg(tmp_path, nvme_param_frac=1.0)))
    opt = ChunkAdamW(mgr, lr=LR, weight_decay=WD)
    sw, depth = mgr.swapper, mgr.config.nvme_prefetch
    trained = [c for c in mgr.chunks if c.requires_grad]
    losses, handed = [], []
    for step, b in enumerate(batches()):
        hits, misses = mgr.fetcher.hits, mgr.fetcher.misses
        loss = mgr.module(input_ids=b, labels=b).loss
        if handed:  # the forward took the handed-over masters as hits, nothing mispredicted
            assert mgr.fetcher.hits >= hits + len(handed) and mgr.fetcher.misses == misses
        mgr.backward(loss)
        if step >= 1:
            order = mgr._pass_order(trained)
            assert set(sw._early) == {c.index for c in order[: depth + 1]}, step
            assert all("grad" not in futs for _, futs in sw._early.values())
        mgr.clip_grad_norm_(CLIP)
        opt.step()
        if step >= 1:
            handed = mgr._hand_over(trained)
            assert handed and set(mgr.fetcher.inflight) == set(handed), step
            # as many as `depth` full shards hold, in the next forward's order: a small
            # chunk does not take a whole slot
            first = mgr._first_use()
            mine = sorted((c for c in trained if c.index in first), key=lambda c: first[c.index])
            room = depth * max(c.shard_size for c in mgr.chunks)
            sizes = [c.shard_size for c in mine]
            k = len(handed)
            assert handed == [c.index for c in mine[:k]] and sum(sizes[:k]) <= room
            assert k == len(mine) or sum(sizes[: k + 1]) > room
            assert any(k == "master" for _, k in sw.pending)  # write-backs left running
        opt.zero_grad()
        losses.append(float(loss.detach()))
    assert max(abs(a - b) for a, b in zip(ref_losses, losses)) <= 1e-5
    assert_params_close(ref_params, dict(mgr.iter_full_params()))
    mgr.close()


def _wide_gpt2():
    """Chunks of 2 MiB and more (staging pool slabs): 2 layers of width 256, 1.6 M params."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(
        n_layer=2, n_embd=256, n_head=4, vocab_size=128, n_positions=32,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    return GPT2LMHeadModel(cfg).train()


def test_nvme_shard_pages_become_the_payload_without_a_copy(tmp_path, monkeypatch):
    """One rank, fp32: a parameter shard read from NVMe into a pool buffer becomes the gathered
    payload by moving its pages (the buffer is refilled with parked pages), except while a
    write-back still reads it; training equals the copying path bit for bit and plain
    PyTorch within 1e-5."""
    from offload_helpers import LR, WD

    from offload import ChunkAdamW, ChunkManager, staging

    if not _pages_move():
        pytest.skip("this kernel cannot move pages (MREMAP_DONTUNMAP, Linux >= 5.7)")
    steps = 4
    ref, ref_params = reference_run(steps, model=_wide_gpt2())

    def run(path):
        path.mkdir()
        cfg = ChunkConfig(**nvme_cfg(path, chunk_size=1 << 20, nvme_param_frac=1.0))
        mgr = ChunkManager(_wide_gpt2(), cfg)
        copt = ChunkAdamW(mgr, lr=LR, weight_decay=WD)
        assert max(c.capacity for c in mgr.chunks) * 4 >= staging.HUGE_PAGE
        out = chunk_run(cfg, steps=steps, mgr=mgr, opt=copt)
        mgr.close()
        return out

    moved = run(tmp_path / "moved")
    assert moved["mgr"].moved_gathers > 0, "no shard became its payload without a copy"
    assert max(abs(a - b) for a, b in zip(ref, moved["losses"])) <= 1e-5
    assert_params_close(ref_params, moved["params"], n_embd=256)
    monkeypatch.setattr(staging.StagingPool, "hand_pages", lambda *a: False)
    copied = run(tmp_path / "copied")
    assert copied["mgr"].moved_gathers == 0
    assert moved["losses"] == copied["losses"]
    for name, p in copied["params"].items():
        assert torch.equal(p, moved["params"][name]), name
