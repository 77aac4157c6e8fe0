"""``colossus bench bigmodel --variants``: the DeepSpeed ZeRO-Infinity baseline's config, error
rows for a variant that fails or runs too long, and (when DeepSpeed's async_io op is already
built: a cold build takes minutes) a small end-to-end DeepSpeed run."""

import glob
import importlib.util
import json
import os

import pytest

from colossus.bench.bigmodel import VOCAB, ds_config, gpt_shape
from colossus.cli import main


def test_ds_config_is_zero_infinity():
    args = {"params": 1e9, "seq": 128, "batch": 1}
    conf = ds_config(args, "/nvme")
    z = conf["zero_optimization"]
    assert z["stage"] == 3
    assert z["offload_param"]["device"] == z["offload_optimizer"]["device"] == "nvme"
    assert z["offload_param"]["nvme_path"] == z["offload_optimizer"]["nvme_path"] == "/nvme"
    # one parameter swap buffer must hold the largest parameter, the embedding
    assert z["offload_param"]["buffer_size"] >= VOCAB * gpt_shape(1e9)["n_embd"]
    assert conf["optimizer"]["type"] == "AdamW" and conf["gradient_clipping"] == 1.0
    assert conf["optimizer"]["params"]["weight_decay"] == 0.01 and "aio" in conf


def test_timeout_gives_an_error_row(tmp_path):
    out = tmp_path / "big.json"
    argv = ["bench", "bigmodel", "--params", "3e7", "--host-budget", "3GiB", "--seq", "32"]
    argv += ["--nvme-dir", str(tmp_path / "nvme"), "--timeout", "0.5", "--json", str(out)]
    assert main(argv) == 1  # no crash: a row saying what happened, and a failing status
    (summary,) = json.loads(out.read_text())["rows"]
    assert summary["name"] == "colossus chunk (nvme)" and "timeout" in summary["error"]


def _async_io_built() -> bool:
    root = os.environ.get("TORCH_EXTENSIONS_DIR", os.path.expanduser("~/.cache/torch_extensions"))
    return bool(glob.glob(os.path.join(root, "*", "async_io", "async_io*.so")))


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("deepspeed") is None or not _async_io_built(),
    reason="needs deepspeed with its async_io op already built",
)
def test_deepspeed_variant_small_run(tmp_path):
    out = tmp_path / "big.json"
    nvme = tmp_path / "nvme"
    argv = ["bench", "bigmodel", "--params", "3e7", "--host-budget", "6GiB", "--seq", "32"]
    argv += ["--nvme-dir", str(nvme), "--variants", "deepspeed", "--json", str(out)]
    assert main(argv) == 0
    summary, *steps = json.loads(out.read_text())["rows"]
    assert summary["name"] == "deepspeed zero3 (nvme)" and "error" not in summary
    assert summary["losses_finite"] and summary["loss_changed"] and summary["nvme_gib"] > 0
    assert len(steps) == 2 and all(s["step_time_s"] > 0 for s in steps)
    assert list(nvme.iterdir()) == []  # its NVMe subfolder was removed
