"""What every RLHF stage shares: the tokenizer and models it starts from, the parse-rate
evaluation, the export the next stage reads, and ``run_rlhf`` (the dispatch of
``colossus train`` on a recipe with ``rlhf.stage`` set).

Stages are chained by paths: each writes a ``from_pretrained`` folder (weights, config,
tokenizer) to ``rlhf.export_dir``, which the next stage names as ``model.path`` (or
``rlhf.ppo.reward_model``).

Example::

    from colossus.config import TrainingConfig
    from colossus.rlhf import run_rlhf
    summary = run_rlhf(TrainingConfig.from_yaml("recipes/rlhf-sft.yaml", ["train.max_steps=5"]))
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from colossus.config import TrainingConfig
from colossus.distributed import DistContext, barrier, init_distributed
from colossus.errors import ConfigError
from colossus.trainer import set_seed


def load_tokenizer_for(cfg: TrainingConfig, ctx: DistContext):
    """The tokenizer of ``model.path`` (or ``data.tokenizer.path``); with neither, one trained
    on ``data.corpus`` like an ordinary run (rank 0 trains it, the others read its cache)."""
    from colossus.data import get_tokenizer, load_documents, load_tokenizer

    if cfg.data.tokenizer.path:
        return load_tokenizer(cfg.data.tokenizer.path)
    if cfg.model.path:
        return load_tokenizer(require_model_dir(cfg.model.path, "model.path"))
    if not ctx.is_main:
        barrier()
    train_docs, _ = load_documents(cfg.data)
    tok = get_tokenizer(cfg.data, "causal_lm", train_docs, Path(cfg.data.cache_dir))
    if ctx.is_main:
        barrier()
    return tok


def require_model_dir(path: str, key: str) -> Path:
    p = Path(path).expanduser()
    if not (p / "config.json").is_file():
        raise ConfigError(
            f"{key}: {p} is not a model folder (no config.json); run the previous stage first "
            "(its rlhf.export_dir is this stage's input)"
        )
    return p


def build_policy(cfg: TrainingConfig, tok) -> nn.Module:
    """A causal LM: ``model.path`` loaded, or built from ``model.arch`` / ``model.config``."""
    from colossus.models import build_model

    if cfg.model.resolved_task != "causal_lm":
        raise ConfigError("rlhf stages train causal LMs: set model.task=causal_lm (or leave it)")
    if cfg.model.path:
        require_model_dir(cfg.model.path, "model.path")
    set_seed(cfg.train.seed)  # same initial weights on every rank
    model = build_model(cfg.model, vocab_size=len(tok), tokenizer=tok)
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = pad_id(tok)
    return model


def pad_id(tok) -> int:
    p = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    return int(p) if p is not None else 0


def export_dir(cfg: TrainingConfig, run_dir: Path) -> Path:
    return Path(cfg.rlhf.export_dir) if cfg.rlhf.export_dir else run_dir / "export"


def export_model(strategy, hf_model: nn.Module, tok, out: Path, prefix: str = "") -> Path:
    """Write ``hf_model``'s trained weights (gathered by the strategy: collective) as a
    ``save_pretrained`` folder, atomically (temp dir then rename). ``prefix`` is stripped from
    the state-dict keys of a wrapper module."""
    state = strategy.full_state_dict()
    if prefix:
        state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    if _is_main():
        tmp = out.with_name(f".{out.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.parent.mkdir(parents=True, exist_ok=True)
        hf_model.save_pretrained(tmp, state_dict=state, safe_serialization=True)
        tok.save_pretrained(tmp)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    barrier()
    return out


def _is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def broadcast(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def eval_generation(model: nn.Module, tok, prompts: list[str], cfg: TrainingConfig) -> dict:
    """Parse rate (and mean response length) of sampled responses to held-out prompts, with a
    fixed seed so before / after numbers are comparable. Runs on rank 0, shared with all."""
    from colossus.rlhf.data import encode_prompt
    from colossus.rlhf.generation import decode_responses, parse_rate, sample

    r = cfg.rlhf
    out: dict[str, float] = {}
    if _is_main() and prompts and r.eval_samples:
        ps = prompts[: r.eval_samples]
        ids = [encode_prompt(tok, p, r.max_prompt_tokens) for p in ps]
        texts: list[str] = []
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.train.seed + 12345)
            for i in range(0, len(ids), 32):
                roll = sample(model, tok, ids[i : i + 32], r.generation)
                texts += decode_responses(tok, roll, r.generation.stop)
        out = {
            "parse_rate": parse_rate(ps, texts),
            "response_chars": sum(map(len, texts)) / len(texts),
        }
        out["samples"] = [{"prompt": p, "response": t} for p, t in zip(ps[:8], texts[:8])]
    return broadcast(out)


def load_exported_policy(path: Path, device: torch.device):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device)


def write_summary(run_dir: Path, summary: dict[str, Any]) -> None:
    if _is_main():
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "rlhf_summary.json").write_text(json.dumps(summary, indent=1, default=str))


def append_metrics(run_dir: Path, record: dict[str, Any]) -> None:
    if _is_main():
        with open(run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps({k: v for k, v in record.items() if k != "samples"}) + "\n")


def run_rlhf(cfg: TrainingConfig) -> dict[str, Any]:
    """Run the stage ``cfg.rlhf.stage`` names; returns its summary."""
    stage = cfg.rlhf.stage
    init_distributed(cfg.strategy.backend)
    if stage == "sft":
        from colossus.rlhf.sft import run_sft

        return run_sft(cfg)
    if stage == "rm":
        from colossus.rlhf.reward import run_reward_model

        return run_reward_model(cfg)
    if stage == "dpo":
        from colossus.rlhf.dpo import run_dpo

        return run_dpo(cfg)
    if stage == "ppo":
        from colossus.rlhf.ppo import run_ppo

        return run_ppo(cfg)
    raise ConfigError(f"rlhf.stage: {stage!r} is not one of sft, rm, ppo, dpo")
