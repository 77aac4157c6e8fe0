"""RLHF: the demo data, SFT prompt masking, the PPO math against hand-computed numbers, and the
chain SFT -> RM -> PPO (+ DPO) on a tiny GPT-2 driven by the recipes (with shorter runs)."""

import json
import math
from pathlib import Path

import pytest
import torch

from colossus.config import TrainingConfig
from colossus.errors import ConfigError
from colossus.recipe import run_recipe
from colossus.rlhf.data import (
    IGNORE_INDEX,
    PairCollator,
    SFTCollator,
    encode_pair,
    encode_sft,
    parses_in_context,
    read_jsonl,
    write_demo_data,
)
from colossus.rlhf.ppo_math import (
    AdaptiveKL,
    RunningMoments,
    gae,
    kl_penalized_rewards,
    masked_whiten,
    policy_loss,
    value_loss,
)

TINY = [
    "model.config.n_layer=2",
    "model.config.n_embd=64",
    "model.config.n_head=4",
    "logging.progress=false",
    "logging.plot=false",
]


# ---- data -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    d = tmp_path_factory.mktemp("demo")
    return d, write_demo_data(d, n_examples=1500)


def test_demo_data_formats_and_determinism(demo, tmp_path):
    d, files = demo
    pairs = read_jsonl(files["pairs-train"], ("prompt", "chosen", "rejected"))
    assert len(pairs) > 300
    for p in pairs:
        assert p["prompt"].startswith(("def ", "async def ")) and p["prompt"].endswith("\n")
        assert parses_in_context(p["prompt"], p["chosen"]), p
        assert not parses_in_context(p["prompt"], p["rejected"]), p
    sft = read_jsonl(files["sft-eval"], ("prompt", "response"))
    prompts = read_jsonl(files["prompts-eval"], ("prompt",))
    assert [x["prompt"] for x in sft] == [x["prompt"] for x in prompts] and sft
    train = {x["prompt"] for x in read_jsonl(files["prompts-train"], ("prompt",))}
    assert not train & {x["prompt"] for x in prompts}  # held out
    again = write_demo_data(tmp_path, n_examples=1500)
    for k, f in files.items():
        assert f.read_bytes() == again[k].read_bytes(), k


def test_rlhf_data_cli_writes_the_same_files(demo, tmp_path, capsys):
    from colossus.cli import main

    d, files = demo
    assert main(["rlhf-data", str(tmp_path), "--n-examples", "1500"]) == 0
    assert "pairs-train" in capsys.readouterr().out
    for k, f in files.items():
        assert (tmp_path / f.name).read_bytes() == f.read_bytes(), k


def test_jsonl_errors_name_the_line(tmp_path):
    f = tmp_path / "x.jsonl"
    f.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "a"}\n')
    with pytest.raises(ConfigError, match=r"x.jsonl:2: needs string field\(s\) \['response'\]"):
        read_jsonl(f, ("prompt", "response"))


@pytest.fixture(scope="module")
def tok():
    from colossus.data.tokenizer import train_tokenizer

    return train_tokenizer(["def f(x):\n    return x + 1\n"] * 50, "bpe", vocab_size=300)


def test_sft_labels_mask_prompt_tokens(tok):
    prompt, resp = "def f(x):\n", "    return x + 1\n"
    p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    r_ids = tok(resp, add_special_tokens=False)["input_ids"]
    a = encode_sft(tok, prompt, resp, 64, 64)
    b = encode_sft(tok, "def g(y, z):\n", "    return y\n", 64, 64)
    assert a["input_ids"].tolist() == p_ids + r_ids
    assert a["labels"].tolist() == [IGNORE_INDEX] * len(p_ids) + r_ids
    batch = SFTCollator(pad_token_id=0)([a, b])
    n_b = b["input_ids"].numel()
    assert batch["input_ids"].shape == (2, max(len(p_ids) + len(r_ids), n_b))
    # row 1: the prompt and the right padding are -100, the response keeps its ids
    pb = len(tok("def g(y, z):\n", add_special_tokens=False)["input_ids"])
    lab = batch["labels"][1]
    assert (lab[:pb] == IGNORE_INDEX).all() and (lab[n_b:] == IGNORE_INDEX).all()
    assert lab[pb:n_b].tolist() == batch["input_ids"][1, pb:n_b].tolist()
    assert batch["attention_mask"][1].tolist() == [1] * n_b + [0] * (lab.numel() - n_b)
    # truncation keeps the end of a long prompt and the start of a long response
    c = encode_sft(tok, prompt, resp, 2, 3)
    assert c["input_ids"].tolist() == p_ids[-2:] + r_ids[:3]
    pair = PairCollator(0)([encode_pair(tok, prompt, resp, "    return (x\n", 64, 64)])
    assert (pair["rejected_labels"][0, : len(p_ids)] == IGNORE_INDEX).all()


# ---- PPO math, against numbers worked out by hand -----------------------------------------


def test_gae_hand_computed():
    # one sequence of 3 response tokens; gamma = 0.9, lambda = 0.8
    r = torch.tensor([[0.1, -0.2, 1.0]])
    v = torch.tensor([[0.5, 0.4, 0.6]])
    adv, ret = gae(r, v, torch.ones(1, 3), gamma=0.9, lam=0.8)
    # delta_2 = 1.0 + 0.9*0 - 0.6 = 0.4                      A_2 = 0.4
    # delta_1 = -0.2 + 0.9*0.6 - 0.4 = -0.06                 A_1 = -0.06 + 0.72*0.4 = 0.228
    # delta_0 = 0.1 + 0.9*0.4 - 0.5 = -0.04                  A_0 = -0.04 + 0.72*0.228 = 0.12416
    torch.testing.assert_close(adv, torch.tensor([[0.12416, 0.228, 0.4]]))
    torch.testing.assert_close(ret, torch.tensor([[0.62416, 0.628, 1.0]]))
    # a masked tail is ignored: the same row with a padded 4th token gives the same numbers
    adv2, _ = gae(
        torch.tensor([[0.1, -0.2, 1.0, 7.0]]),
        torch.tensor([[0.5, 0.4, 0.6, 9.0]]),
        torch.tensor([[1.0, 1.0, 1.0, 0.0]]),
        0.9,
        0.8,
    )
    torch.testing.assert_close(adv2, torch.tensor([[0.12416, 0.228, 0.4, 0.0]]))


def test_kl_rewards_hand_computed():
    score = torch.tensor([2.0, -1.0])
    logp = torch.tensor([[-1.0, -2.0, -0.5], [-1.0, -1.0, -9.0]])
    ref = torch.tensor([[-1.5, -1.0, -0.5], [-0.5, -1.0, -9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    rewards, kl = kl_penalized_rewards(score, logp, ref, mask, kl_coef=0.1)
    # kl = logp - ref on real tokens: [0.5, -1.0, 0.0], [-0.5, 0.0, (masked) 0]
    torch.testing.assert_close(kl, torch.tensor([[0.5, -1.0, 0.0], [-0.5, 0.0, 0.0]]))
    # reward = -0.1 * kl, plus the score on each row's last real token (index 2 and 1)
    torch.testing.assert_close(rewards, torch.tensor([[-0.05, 0.1, 2.0], [0.05, -1.0, 0.0]]))


def test_clipped_policy_loss_hand_computed():
    old = torch.zeros(1, 4)
    # ratios e^x = 1.5, 0.5, 1.1, 0.9 ; advantages +1, +1, -1, -1 ; clip 0.2
    logp = torch.log(torch.tensor([[1.5, 0.5, 1.1, 0.9]]))
    adv = torch.tensor([[1.0, 1.0, -1.0, -1.0]])
    loss, clip_frac, _ = policy_loss(logp, old, adv, torch.ones(1, 4), clip=0.2)
    # per token max(-A r, -A clip(r)):
    #   A=+1, r=1.5: max(-1.5, -1.2) = -1.2 (clipped)   A=+1, r=0.5: max(-0.5, -0.8) = -0.5
    #   A=-1, r=1.1: max(1.1, 1.1)   = 1.1              A=-1, r=0.9: max(0.9, 0.9)   = 0.9
    # mean = (-1.2 - 0.5 + 1.1 + 0.9) / 4 = 0.075; only the first token is clipped
    assert float(loss) == pytest.approx(0.075, abs=1e-6)
    assert float(clip_frac) == pytest.approx(0.25)
    # the clipped token passes no gradient; the others pass -A * r / 4
    logp = logp.clone().requires_grad_(True)
    policy_loss(logp, old, adv, torch.ones(1, 4), 0.2)[0].backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[0.0, -0.125, 0.275, 0.225]]))


def test_clipped_value_loss_hand_computed():
    v = torch.tensor([[1.0, 0.0, 0.5]])
    old = torch.tensor([[0.5, 0.5, 0.5]])
    ret = torch.tensor([[2.0, -1.0, 0.0]])
    loss, frac = value_loss(v, old, ret, torch.ones(1, 3), clip=0.2)
    # v_clip = old + clip(v - old, +-0.2) = [0.7, 0.3, 0.5]
    # (v - R)^2 = [1.0, 1.0, 0.25]; (v_clip - R)^2 = [1.69, 1.69, 0.25]; max = [1.69, 1.69, 0.25]
    # loss = 0.5 * mean = 0.5 * 3.63 / 3 = 0.605
    assert float(loss) == pytest.approx(0.605, abs=1e-6)
    assert float(frac) == pytest.approx(2 / 3)
    unclipped, _ = value_loss(v, old, ret, torch.ones(1, 3), clip=None)
    assert float(unclipped) == pytest.approx(0.5 * 2.25 / 3, abs=1e-6)


def test_whitening_kl_controller_and_running_moments():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    w = masked_whiten(x, torch.tensor([[1.0, 1.0, 1.0, 0.0]]))
    # mean 2, population variance 2/3 -> (x - 2) / sqrt(2/3)
    torch.testing.assert_close(w, torch.tensor([[-1.224744, 0.0, 1.224744, 0.0]]))
    ctl = AdaptiveKL(0.1, target=2.0, horizon=100)
    assert ctl.update(kl=4.0, n_samples=10) == pytest.approx(0.1 * (1 + 0.2 * 10 / 100))
    assert AdaptiveKL(0.1, None, 100).update(50.0, 10) == 0.1
    m = RunningMoments()
    m.update(torch.tensor([1.0, 2.0]))
    mean, std = m.update(torch.tensor([3.0, 4.0, 5.0]))
    assert mean == pytest.approx(3.0) and std == pytest.approx(math.sqrt(2.5))


# ---- the chain on a tiny model --------------------------------------------------------------


def _cfg_args(stage: str, tmp: Path, demo_dir: Path, *extra: str) -> list[str]:
    return [
        *TINY,
        f"rlhf.demo.out_dir={demo_dir}",
        "rlhf.demo.n_examples=1500",
        f"rlhf.export_dir={tmp / stage}",
        f"train.run_dir={tmp / ('run-' + stage)}",
        f"data.cache_dir={tmp / 'cache'}",
        f"model.path={tmp / 'sft'}",
        f"rlhf.ppo.reward_model={tmp / 'rm'}",
        "rlhf.eval_samples=32",
        *extra,
    ]


def _cfg(stage: str, tmp: Path, demo_dir: Path, *extra: str) -> TrainingConfig:
    return TrainingConfig.from_yaml(
        f"recipes/rlhf-{stage}.yaml", _cfg_args(stage, tmp, demo_dir, *extra)
    )


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def chain(tmp_path_factory, demo):
    tmp = tmp_path_factory.mktemp("chain")
    demo_dir = demo[0]
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # module-scoped: the autouse fixture above does not cover it
    sft = run_recipe(
        _cfg(
            "sft",
            tmp,
            demo_dir,
            "model.path=null",
            "data.max_chars=300000",
            "data.tokenizer.vocab_size=512",
            "train.max_steps=80",
            "train.eval_interval=null",
        )
    )
    rm = run_recipe(_cfg("rm", tmp, demo_dir, "train.max_steps=300"))
    torch.set_num_threads(n)
    return tmp, demo_dir, sft, rm


@pytest.mark.slow
def test_sft_then_reward_model_accuracy(chain):
    tmp, _, sft, rm = chain
    assert (tmp / "sft" / "config.json").is_file() and (tmp / "sft" / "tokenizer.json").is_file()
    assert sft["parse_rate_after"] >= sft["parse_rate_before"]
    assert sft["eval_loss"] < 5.0
    assert rm["eval_accuracy_before"] < 0.7  # a fresh head is near chance
    assert rm["eval_accuracy"] >= 0.8, rm  # held-out synthetic pairs
    from transformers import AutoModelForSequenceClassification

    loaded = AutoModelForSequenceClassification.from_pretrained(tmp / "rm")
    assert loaded.config.num_labels == 1


@pytest.mark.slow
def test_ppo_raises_reward_within_kl_bound(chain):
    tmp, demo_dir, _, _ = chain
    cfg = _cfg(
        "ppo",
        tmp,
        demo_dir,
        "train.max_steps=10",
        "rlhf.ppo.rollout_batch=16",
        "rlhf.ppo.minibatch=8",
    )
    s = run_recipe(cfg)
    rewards = [h["reward"] for h in s["history"]]
    assert sum(rewards[-3:]) / 3 > sum(rewards[:3]) / 3, rewards
    bound = cfg.rlhf.ppo.kl_max
    assert all(h["kl"] <= bound for h in s["history"]), [h["kl"] for h in s["history"]]
    recs = [json.loads(x) for x in (tmp / "run-ppo" / "metrics.jsonl").read_text().splitlines()]
    for k in ("reward", "kl", "entropy", "clip_frac", "value_loss", "parse_rate"):
        assert len([r for r in recs if k in r]) == 10, k
    assert (tmp / "ppo" / "config.json").is_file()


@pytest.mark.slow
def test_dpo_raises_margin(chain):
    tmp, demo_dir, _, _ = chain
    # a smaller pair set (the reference log-probs of every pair are computed up front)
    small = tmp / "demo-small"
    s = run_recipe(
        _cfg(
            "dpo",
            tmp,
            demo_dir,
            "train.max_steps=30",
            f"rlhf.demo.out_dir={small}",
            "rlhf.demo.n_examples=400",
            "rlhf.eval_samples=16",
        )
    )
    assert s["eval_reward_margin_before"] == pytest.approx(0.0, abs=1e-4)  # policy == reference
    assert s["eval_reward_margin"] > 0.05, s
    assert s["eval_logp_margin"] > s["eval_logp_margin_before"]
    assert s["eval_accuracy"] > 0.6


PPO_CHUNK = ["strategy.name=chunk", "strategy.chunk.chunk_size=65536"]
BUDGETS = ["strategy.chunk.device_budget=8MiB", "strategy.chunk.host_budget=16MiB"]


@pytest.mark.slow
def test_ppo_under_chunk_matches_none_within_one_shared_budget(chain, tmp_path):
    tmp, demo_dir, _, _ = chain
    short = ["train.max_steps=3", "rlhf.ppo.rollout_batch=8", "rlhf.ppo.minibatch=4"]
    short += ["rlhf.eval_samples=8"]
    out = {}
    nvme = ["strategy.chunk.offload_optim_frac=1.0", "strategy.chunk.nvme_optim_frac=1.0"]
    nvme += [f"strategy.chunk.nvme_dir={tmp_path}"]
    for name, extra in (
        ("none", []),
        ("chunk", [*PPO_CHUNK, *BUDGETS]),
        ("nvme", [*PPO_CHUNK, *BUDGETS, *nvme]),  # actor / critic AdamW state in NVMe files
    ):
        cfg = _cfg(
            "ppo",
            tmp,
            demo_dir,
            *short,
            *extra,
            f"rlhf.export_dir={tmp_path / name}",
            f"train.run_dir={tmp_path / ('run-' + name)}",
        )
        out[name] = run_recipe(cfg)
    # Same seed, same fp32 ops on the same weights: the rollouts are the same tokens (so the
    # frozen reward model gives the same scores). The updates differ only in the order the
    # clipping norm is summed (per chunk shard vs per parameter, ~1e-7 relative), which moves
    # log-probs, KL and losses by ~1e-6 relative after an update (measured: <= 2e-7 absolute).
    for run in ("chunk", "nvme"):
        for a, b in zip(out["none"]["history"], out[run]["history"], strict=True):
            assert b["reward"] == a["reward"] and b["parse_rate"] == a["parse_rate"]
            assert b["response_tokens"] == a["response_tokens"]
            for k in ("kl", "policy_loss", "value_loss", "entropy", "clip_frac", "approx_kl"):
                assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-5), (run, k)
    assert out["nvme"]["memory"]["host"]["members"]["actor"]["optim_state"] <= 64  # steps only
    assert out["chunk"]["eval_reward_before"] == out["none"]["eval_reward_before"]
    # the pool's report: every model's chunks within the one budget (a CPU box: device and host
    # are one RAM, so the host budget covers both)
    mem = out["chunk"]["memory"]
    dev, host = mem["device"], mem["host"]
    assert dev["budget"] == 8 << 20 and host["budget"] == 16 << 20
    assert 0 < dev["peak"] <= dev["budget"] and dev["peak"] + host["peak"] <= host["budget"]
    for h in out["chunk"]["history"]:
        assert h["pool_device_peak_mib"] <= 8
    assert set(dev["members"]) == {"actor", "critic", "reference", "reward"}
    for m in ("actor", "critic"):  # trained: params, fp32 grads and AdamW state on the device
        r = dev["members"][m]
        assert r["param_shard"] > 0  # AdamW: m and v per element, a 4-byte step per chunk
        assert 0 <= r["optim_state"] - 2 * r["param_shard"] <= 4 * 64
    for m in ("reference", "reward"):  # frozen: parameters only, on the host tier
        r = host["members"][m]
        assert r["param_shard"] > 0 and r["model_state"] == r["param_shard"]
        assert dev["members"][m]["model_state"] == 0
    assert (tmp_path / "chunk" / "config.json").is_file()
    # a budget the four models cannot share: refused before anything is loaded, by how much
    with pytest.raises(ConfigError, match=r"host budget 4194304 B is \d+ B short"):
        run_recipe(
            _cfg("ppo", tmp, demo_dir, *short, *PPO_CHUNK, "strategy.chunk.host_budget=4MiB")
        )


def test_plan_and_check_of_ppo_under_chunk(capsys):
    from colossus.cli import main
    from colossus.rlhf.ppo_memory import check_pool, plan_pool

    cfg = TrainingConfig.from_yaml(
        "recipes/rlhf-ppo.yaml", [*PPO_CHUNK, "strategy.chunk.host_budget=4MiB"]
    )
    pool = plan_pool(cfg, world_size=1)
    rows = pool.needs()
    assert list(rows) == ["actor", "critic", "reference", "reward"]
    need = pool.need()
    # one RAM on a CPU box: all four models' state + the largest single working set
    state = sum(r["device_state"] + r["host_state"] for r in rows.values())
    work = max(r["device_working"] + r["host_working"] for r in rows.values())
    assert need["host"] == state + work > 4 << 20
    assert rows["reference"]["device_state"] == 0 < rows["reference"]["host_state"]
    short = need["host"] - (4 << 20)
    with pytest.raises(ConfigError, match=rf"host budget 4194304 B is {short} B short"):
        check_pool(pool)
    sets = sum((["--set", x] for x in PPO_CHUNK), [])
    assert main(["plan", "recipes/rlhf-ppo.yaml", *sets]) == 0
    txt = capsys.readouterr().out
    assert "PPO memory per model" in txt and "shared" in txt and "reference" in txt


def test_ppo_refuses_auto_placement_and_bad_minibatch(tmp_path):
    auto = [*PPO_CHUNK, "strategy.chunk.placement=auto"]
    with pytest.raises(ConfigError, match="placement=static"):
        run_recipe(TrainingConfig.from_yaml("recipes/rlhf-ppo.yaml", auto))
    with pytest.raises(ConfigError, match="must divide"):
        run_recipe(TrainingConfig.from_yaml("recipes/rlhf-ppo.yaml", ["rlhf.ppo.minibatch=5"]))
    with pytest.raises(ConfigError, match="not a model folder"):
        run_recipe(TrainingConfig.from_yaml("recipes/rlhf-rm.yaml", [f"model.path={tmp_path}"]))
    with pytest.raises(ConfigError, match="unknown key 'rlhf.ppo.kl_cof'"):
        TrainingConfig.from_yaml("recipes/rlhf-ppo.yaml", ["rlhf.ppo.kl_cof=0.1"])


@pytest.mark.slow
def test_sft_and_ppo_under_accelerate_launch_two_gloo_ranks(chain, tmp_path):
    # `accelerate launch --cpu --num_processes N` starts ONE process; --multi_gpu with
    # ACCELERATE_USE_CPU=1 starts N gloo processes on a CPU-only box.
    import os
    import socket
    import subprocess
    import sys

    tmp, demo_dir, _, _ = chain

    def launch(stage: str, *sets: str) -> dict:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cfg = _cfg(stage, tmp, demo_dir)  # the same overrides, as --set arguments
        run = tmp_path / stage
        args = [
            *TINY,
            f"rlhf.demo.out_dir={demo_dir}",
            "rlhf.demo.n_examples=1500",
            f"rlhf.export_dir={run / 'export'}",
            f"data.cache_dir={tmp / 'cache'}",
            f"model.path={cfg.model.path}",
            f"rlhf.ppo.reward_model={cfg.rlhf.ppo.reward_model}",
            "rlhf.eval_samples=8",
            "strategy.name=ddp",
            *sets,
        ]
        cmd = [
            str(Path(sys.executable).parent / "accelerate"),
            "launch",
            "--multi_gpu",
            "--num_processes=2",
            "--num_machines=1",
            "--mixed_precision=no",
            "--dynamo_backend=no",
            f"--main_process_port={port}",
            "-m",
            "colossus.cli",
            "train",
            f"recipes/rlhf-{stage}.yaml",
            "--run-dir",
            str(run),
            *sum((["--set", a] for a in args), []),
        ]
        env = dict(os.environ) | {"ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
        env.pop("WORLD_SIZE", None)
        proc = subprocess.run(cmd, env=env, timeout=600, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert (run / "export" / "config.json").is_file()
        return json.loads((run / "rlhf_summary.json").read_text())

    sft = launch(
        "sft",
        "model.path=null",
        "data.max_chars=300000",
        "data.tokenizer.vocab_size=512",
        "train.max_steps=6",
        "train.eval_interval=null",
    )
    assert sft["world_size"] == 2 and sft["global_batch"] == 2 * 16
    ppo = launch("ppo", "train.max_steps=2", "rlhf.ppo.rollout_batch=8", "rlhf.ppo.minibatch=4")
    assert ppo["world_size"] == 2 and ppo["iterations"] == 2
    assert ppo["ranks_in_sync"]  # DDP kept actor and critic identical on both ranks


def test_ppo_math_doctest():
    import doctest

    import colossus.rlhf.ppo_math as m

    res = doctest.testmod(m)
    assert res.attempted > 0 and res.failed == 0


@pytest.mark.slow
def test_sft_under_chunk_exports_the_same_model_as_none(demo, tmp_path):
    from safetensors.torch import load_file

    tmp, demo_dir = tmp_path, demo[0]
    out = {}
    for strategy in ("none", "chunk"):
        s = run_recipe(
            _cfg(
                "sft",
                tmp,
                demo_dir,
                "model.path=null",
                "data.max_chars=300000",
                "data.tokenizer.vocab_size=512",
                "train.max_steps=3",
                "train.eval_interval=null",
                "rlhf.eval_samples=0",
                f"strategy.name={strategy}",
                f"rlhf.export_dir={tmp_path / strategy}",
                f"train.run_dir={tmp_path / ('run-' + strategy)}",
            )
        )
        out[strategy] = (s["final_loss"], load_file(tmp_path / strategy / "model.safetensors"))
    assert out["chunk"][0] == pytest.approx(out["none"][0], abs=1e-5)
    ref, got = out["none"][1], out["chunk"][1]
    assert set(ref) == set(got)
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], atol=1e-4, rtol=1e-4, msg=k)


@pytest.mark.slow
def test_ppo_under_chunk_two_gloo_ranks_matches_ddp(chain, tmp_path):
    from rlhf_worker import ppo_worker
    from spawn_helpers import spawn

    tmp, demo_dir, _, _ = chain
    base = _cfg_args("ppo", tmp, demo_dir)
    base += ["train.max_steps=2", "rlhf.ppo.rollout_batch=8", "rlhf.ppo.minibatch=4"]
    runs = {}
    budgets = ["strategy.chunk.device_budget=4MiB", "strategy.chunk.host_budget=16MiB"]
    for name, extra in (("ddp", ["strategy.name=ddp"]), ("chunk", [*PPO_CHUNK, *budgets])):
        runs[name] = [
            *base,
            *extra,
            f"rlhf.export_dir={tmp_path / name}",
            f"train.run_dir={tmp_path / ('run-' + name)}",
        ]
    for r in spawn(ppo_worker, 2, tmp_path / "spawn", runs):
        assert r["chunk"]["world_size"] == 2 and r["ddp"]["ranks_in_sync"]
        # ZeRO-3 (reduce-scatter of the chunk gradients) vs DDP (all-reduce): the same averaged
        # gradients; rollouts identical, the rest within the clipping-norm summation order
        for a, b in zip(r["ddp"]["history"], r["chunk"]["history"], strict=True):
            assert b["reward"] == a["reward"] and b["response_tokens"] == a["response_tokens"]
            for k in ("kl", "policy_loss", "value_loss", "entropy"):
                assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-5), k
        dev = r["chunk"]["memory"]["device"]
        assert 0 < dev["peak"] <= dev["budget"] == 4 << 20
        for m in ("reference", "reward"):  # gathered to the device only while they score
            assert dev["members"][m]["peak"] > 0 and dev["members"][m]["total"] == 0
