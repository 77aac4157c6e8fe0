"""The reward model: a scalar head on the base model (HF ``AutoModelForSequenceClassification``
with ``num_labels=1``, initialised from the SFT export), trained on preference pairs with the
pairwise loss ``-log sigmoid(r_chosen - r_rejected)``; accuracy = share of held-out pairs where
``r_chosen > r_rejected``.

The score of a sequence is the head's output at its last real token. We index that token from
the attention mask ourselves (HF's pooling looks for the pad id, which for a byte-level BPE
tokenizer is also eos) and pass mask-derived positions, so right-padded pairs here and
left-padded PPO rollouts are scored alike. The same per-token head gives the PPO critic's values.

Example::

    rm = load_scalar_model("runs/rlhf/sft")
    loss = PairwiseRewardLoss(rm)(**PairCollator(pad)(items))["loss"]
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from colossus.config import TrainingConfig
from colossus.distributed import init_distributed
from colossus.errors import ConfigError
from colossus.rlhf.data import (
    PAIR_KEYS,
    PairCollator,
    encode_pair,
    pad_right,
    read_jsonl,
    resolve_files,
)
from colossus.rlhf.generation import positions
from colossus.rlhf.stage import (
    append_metrics,
    broadcast,
    export_dir,
    export_model,
    load_tokenizer_for,
    pad_id,
    require_model_dir,
    write_summary,
)
from colossus.trainer import Trainer, set_seed


def load_scalar_model(path: str | Path, seed: int = 0) -> nn.Module:
    """A scalar-head model from a folder: a reward model as saved, or a causal LM's base with a
    fresh head (seeded, so every rank builds the same one)."""
    from transformers import AutoModelForSequenceClassification

    p = require_model_dir(str(path), "reward model / critic path")
    set_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(p, num_labels=1, dtype=torch.float32)
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = model.config.eos_token_id
    _head(model)
    return model


def _head(model: nn.Module) -> nn.Module:
    head = getattr(model, "score", None)
    if head is None:
        raise ConfigError(
            f"{type(model).__name__} has no per-token scalar head ('score'): use a decoder "
            "architecture (gpt2, llama, ...) for reward models and critics"
        )
    return head


def token_values(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``[B, T]``: the scalar head applied to every position's last hidden state."""
    h = model.base_model(
        input_ids=ids, attention_mask=mask, position_ids=positions(mask)
    ).last_hidden_state
    return _head(model)(h).squeeze(-1)


def last_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of each row's last 1 in ``mask`` ``[B, T]``."""
    t = torch.arange(mask.shape[1], device=mask.device)
    return (t * mask.long()).argmax(-1)


def sequence_scores(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    v = token_values(model, ids, mask)
    return v.gather(1, last_index(mask)[:, None]).squeeze(1)


def _both(batch: dict[str, torch.Tensor], key: str, pad: int) -> torch.Tensor:
    c, r = batch[f"chosen_{key}"], batch[f"rejected_{key}"]
    return pad_right([*c, *r], pad)


class PairwiseRewardLoss(nn.Module):
    """Wraps a scalar-head model; forward on a :class:`PairCollator` batch returns the pairwise
    loss, accuracy and mean margin (chosen and rejected go through one forward)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, **batch: torch.Tensor) -> dict[str, torch.Tensor]:
        n = batch["chosen_input_ids"].shape[0]
        ids = _both(batch, "input_ids", int(self.model.config.pad_token_id or 0))
        mask = _both(batch, "attention_mask", 0)
        r = sequence_scores(self.model, ids, mask)
        rc, rr = r[:n], r[n:]
        return {
            "loss": -F.logsigmoid(rc - rr).mean(),
            "accuracy": (rc > rr).float().mean(),
            "margin": (rc - rr).mean(),
        }


@torch.no_grad()
def pair_accuracy(model: nn.Module, items: list, collator, batch_size: int = 32) -> dict:
    """Accuracy and mean margin of a scalar-head model on preference items (rank 0)."""
    wrap = PairwiseRewardLoss(model).eval()
    dev = next(model.parameters()).device
    acc = margin = 0.0
    for i in range(0, len(items), batch_size):
        chunk = items[i : i + batch_size]
        out = wrap(**{k: v.to(dev) for k, v in collator(chunk).items()})
        acc += float(out["accuracy"]) * len(chunk)
        margin += float(out["margin"]) * len(chunk)
    return {"accuracy": acc / max(len(items), 1), "margin": margin / max(len(items), 1)}


def pair_datasets(cfg: TrainingConfig, tok) -> tuple[list, list]:
    r = cfg.rlhf
    train_f, eval_f = resolve_files(r, "pairs")
    enc = lambda x: encode_pair(  # noqa: E731
        tok, x["prompt"], x["chosen"], x["rejected"], r.max_prompt_tokens, r.max_response_tokens
    )
    train = [enc(x) for x in read_jsonl(train_f, PAIR_KEYS)]
    evals = [enc(x) for x in read_jsonl(eval_f, PAIR_KEYS)] if eval_f else []
    return train, evals


def run_reward_model(cfg: TrainingConfig) -> dict[str, Any]:
    ctx = init_distributed(cfg.strategy.backend)
    if not cfg.model.path:
        raise ConfigError("rlhf.stage=rm needs model.path: the SFT stage's export dir")
    tok = load_tokenizer_for(cfg, ctx)
    train, evals = pair_datasets(cfg, tok)
    collator = PairCollator(pad_id(tok))
    rm = load_scalar_model(cfg.model.path, cfg.train.seed)
    rm.config.pad_token_id = pad_id(tok)
    before = broadcast(pair_accuracy(rm, evals, collator) if ctx.is_main and evals else {})
    trainer = Trainer(
        PairwiseRewardLoss(rm), cfg, train_dataset=train, data_collator=collator, tokenizer=tok
    )
    summary = trainer.train()
    out = export_model(trainer.strategy, rm, tok, export_dir(cfg, trainer.run_dir), "model.")
    after = {}
    if evals and ctx.is_main:
        after = pair_accuracy(load_scalar_model(out).to(ctx.device), evals, collator)
    after = broadcast(after)
    summary |= {
        "stage": "rm",
        "export_dir": str(out),
        "eval_accuracy_before": before.get("accuracy"),
        "eval_accuracy": after.get("accuracy"),
        "eval_margin": after.get("margin"),
    }
    append_metrics(trainer.run_dir, {"step": trainer.step, "eval_accuracy": after.get("accuracy")})
    write_summary(trainer.run_dir, summary)
    return summary
