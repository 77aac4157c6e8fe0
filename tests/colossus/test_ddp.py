"""DDP with 2 gloo processes equals 1 process at the same global batch, under torchrun and
under accelerate launch. Tolerance: 1e-5 absolute on losses and parameters (fp32; the only
difference is the order of the gradient sum)."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_gpt2, token_blocks

from colossus import Trainer, TrainingConfig

WORKER = Path(__file__).with_name("ddp_worker.py")
VENV_BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _single(run: Path, optim: dict) -> dict:
    cfg = TrainingConfig(
        name="ddp",
        optim={"lr": 3e-3} | optim,
        schedule={"name": "cosine", "warmup_steps": 2},
        train={"max_steps": 8, "batch_size": 8, "run_dir": str(run), "seed": 0},
        checkpoint={"save_final": False},
        logging={"progress": False, "plot": False},
    )
    t = Trainer(
        tiny_gpt2(), cfg, train_dataset=token_blocks(), eval_dataset=token_blocks(16, seed=9)
    )
    t.train()
    return {
        "losses": [r["loss"] for r in t.history],
        "eval_loss": t.evaluate()["eval_loss"],
        "params": {n: p.detach().clone() for n, p in t.model.named_parameters()},
    }


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    return _single(tmp_path_factory.mktemp("single"), {})


def _check_ranks(out: Path, single, world: int) -> None:
    for r in range(world):
        res = torch.load(out / f"rank{r}.pt")
        assert res["world"] == world and res["rank"] == r
        assert res["losses"] == pytest.approx(single["losses"], abs=1e-5), f"rank {r}"
        assert res["eval_loss"] == pytest.approx(single["eval_loss"], abs=1e-5), f"rank {r}"
        for n, p in single["params"].items():
            torch.testing.assert_close(
                res["params"][n],
                p,
                atol=1e-5,
                rtol=1e-5,
                msg=lambda m, n=n, r=r: f"rank {r} {n}: {m}",
            )
    # every rank wrote its RNG state into the one published checkpoint
    ck = out / "run" / "checkpoints" / "step-00000008"
    assert all((ck / f"rng-rank{r}.safetensors").is_file() for r in range(world))


def _env():
    env = dict(os.environ)
    env.pop("WORLD_SIZE", None)
    env["OMP_NUM_THREADS"] = "1"
    return env


def _torchrun_worker(out: Path, *worker_args: str) -> None:
    """The worker under torchrun with 2 processes, writing into ``out``."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    cmd += [str(WORKER), str(out), "2", *worker_args]
    proc = subprocess.run(cmd, env=_env(), timeout=300, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_ddp_torchrun_matches_single_process(tmp_path, single):
    _torchrun_worker(tmp_path)
    _check_ranks(tmp_path, single, 2)


def test_ddp_accelerate_launch_matches_single_process(tmp_path, single):
    # `accelerate launch --cpu --num_processes N` starts ONE process; --multi_gpu with
    # ACCELERATE_USE_CPU=1 starts N gloo processes on a CPU-only box.
    cmd = [
        str(VENV_BIN / "accelerate"),
        "launch",
        "--multi_gpu",
        "--num_processes=2",
        "--num_machines=1",
        "--mixed_precision=no",
        "--dynamo_backend=no",
        f"--main_process_port={_free_port()}",
        str(WORKER),
        str(tmp_path),
        "2",
    ]
    env = _env() | {"ACCELERATE_USE_CPU": "1"}
    proc = subprocess.run(cmd, env=env, timeout=300, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _check_ranks(tmp_path, single, 2)


def test_ddp_lamb_flat_matches_single_process_per_tensor(tmp_path):
    """LAMB under DDP takes the flat path by default (optim.flat None): parameters re-pointed
    into the optimizer's flat buffer after DDP wrapped the model, gradients averaged by DDP into
    the flat gradient views. Reference: one process, per-tensor LAMB (optim.flat false)."""
    from offload import trust_fused

    if not trust_fused.flat_available():
        pytest.skip(f"no compiled kernels here: {trust_fused._KERNELS.error}")
    single = _single(tmp_path / "single", {"name": "lamb", "flat": False})
    _torchrun_worker(tmp_path, "lamb")
    _check_ranks(tmp_path, single, 2)
    for r in range(2):
        assert torch.load(tmp_path / f"rank{r}.pt")["flat"], f"rank {r} did not run flat"
