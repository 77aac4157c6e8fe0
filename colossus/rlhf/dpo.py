"""Direct preference optimisation (Rafailov et al. 2023) on the reward model's preference pairs:
``-log sigmoid(beta * ((log pi(c) - log ref(c)) - (log pi(r) - log ref(r))))`` summed over
response tokens. The frozen reference's log-probabilities are computed once before training
(split over ranks), so only the policy runs in the training loop, under any strategy.

Example::

    from colossus.config import TrainingConfig
    from colossus.rlhf.dpo import run_dpo
    summary = run_dpo(TrainingConfig.from_yaml("recipes/rlhf-dpo.yaml", ["train.max_steps=5"]))
    print(summary["eval_reward_margin_before"], summary["eval_reward_margin"])
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from colossus.config import TrainingConfig
from colossus.distributed import init_distributed
from colossus.errors import ConfigError
from colossus.rlhf.data import IGNORE_INDEX, PairCollator, pad_right
from colossus.rlhf.generation import positions
from colossus.rlhf.reward import pair_datasets
from colossus.rlhf.stage import (
    append_metrics,
    broadcast,
    build_policy,
    eval_generation,
    export_dir,
    export_model,
    load_exported_policy,
    load_tokenizer_for,
    pad_id,
    require_model_dir,
    write_summary,
)
from colossus.trainer import Trainer


def sequence_logps(
    model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor
) -> torch.Tensor:
    """``[B]``: sum of log p(token) over the positions whose label is not -100."""
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions(mask)).logits
    logits, tgt = logits[:, :-1].float(), labels[:, 1:]
    keep = tgt != IGNORE_INDEX
    lp = torch.log_softmax(logits, -1).gather(-1, tgt.clamp(min=0)[..., None]).squeeze(-1)
    return (lp * keep).sum(-1)


def _pair_logps(model: nn.Module, batch: dict, pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    n = batch["chosen_input_ids"].shape[0]
    cat = lambda k, v: pad_right([*batch[f"chosen_{k}"], *batch[f"rejected_{k}"]], v)  # noqa: E731
    lp = sequence_logps(
        model, cat("input_ids", pad), cat("attention_mask", 0), cat("labels", IGNORE_INDEX)
    )
    return lp[:n], lp[n:]


def dpo_loss(
    pc: torch.Tensor, pr: torch.Tensor, rc: torch.Tensor, rr: torch.Tensor, beta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, implicit reward margin per pair) from policy / reference log-probs."""
    margin = beta * ((pc - rc) - (pr - rr))
    return -F.logsigmoid(margin).mean(), margin


class DPOLoss(nn.Module):
    """Wraps the policy; forward on a :class:`PairCollator` batch carrying ``ref_chosen`` /
    ``ref_rejected`` log-probs returns the DPO loss and the mean implicit reward margin."""

    def __init__(self, policy: nn.Module, beta: float, pad_token_id: int) -> None:
        super().__init__()
        self.policy = policy
        self.beta = beta
        self.pad = pad_token_id

    def forward(self, **batch: torch.Tensor) -> dict[str, torch.Tensor]:
        pc, pr = _pair_logps(self.policy, batch, self.pad)
        loss, margin = dpo_loss(pc, pr, batch["ref_chosen"], batch["ref_rejected"], self.beta)
        return {"loss": loss, "margin": margin.mean(), "accuracy": (margin > 0).float().mean()}


@torch.no_grad()
def reference_logps(ref: nn.Module, items: list, collator, batch_size: int = 32) -> list:
    """``items`` with ``ref_chosen`` / ``ref_rejected`` added; each rank computes a slice and
    the slices are exchanged (all_gather_object)."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    ref.eval()
    dev = next(ref.parameters()).device
    mine: dict[int, tuple[float, float]] = {}
    idx = list(range(rank, len(items), world))
    for i in range(0, len(idx), batch_size):
        part = idx[i : i + batch_size]
        batch = {k: v.to(dev) for k, v in collator([items[j] for j in part]).items()}
        pc, pr = _pair_logps(ref, batch, collator.sft.pad_token_id)
        mine.update({j: (float(a), float(b)) for j, a, b in zip(part, pc, pr)})
    if world > 1:
        allp: list = [None] * world
        dist.all_gather_object(allp, mine)
        for m in allp:
            mine.update(m)
    return [
        {**x, "ref_chosen": torch.tensor(mine[j][0]), "ref_rejected": torch.tensor(mine[j][1])}
        for j, x in enumerate(items)
    ]


@torch.no_grad()
def eval_margin(policy: nn.Module, items: list, collator, beta: float) -> dict[str, float]:
    """Mean implicit reward margin, preference accuracy and log-prob margin (chosen - rejected)
    of ``policy`` on items carrying reference log-probs."""
    policy.eval()
    dev = next(policy.parameters()).device
    tot = {"reward_margin": 0.0, "accuracy": 0.0, "logp_margin": 0.0}
    for i in range(0, len(items), 32):
        batch = {k: v.to(dev) for k, v in collator(items[i : i + 32]).items()}
        pc, pr = _pair_logps(policy, batch, collator.sft.pad_token_id)
        _, m = dpo_loss(pc, pr, batch["ref_chosen"], batch["ref_rejected"], beta)
        tot["reward_margin"] += float(m.sum())
        tot["accuracy"] += float((m > 0).float().sum())
        tot["logp_margin"] += float((pc - pr).sum())
    return {k: v / max(len(items), 1) for k, v in tot.items()}


def run_dpo(cfg: TrainingConfig) -> dict[str, Any]:
    ctx = init_distributed(cfg.strategy.backend)
    if not cfg.model.path:
        raise ConfigError("rlhf.stage=dpo needs model.path: the SFT stage's export dir")
    beta = cfg.rlhf.dpo.beta
    tok = load_tokenizer_for(cfg, ctx)
    collator = PairCollator(pad_id(tok))
    train, evals = pair_datasets(cfg, tok)
    ref_path = require_model_dir(cfg.rlhf.dpo.reference or cfg.model.path, "rlhf.dpo.reference")
    ref = load_exported_policy(ref_path, ctx.device)
    train = reference_logps(ref, train, collator)
    evals = reference_logps(ref, evals, collator) if evals else []
    policy = build_policy(cfg, tok)
    eval_prompts = [
        tok.decode(x["chosen_input_ids"][x["chosen_labels"] == IGNORE_INDEX]) for x in evals
    ]
    before = broadcast(eval_margin(ref, evals, collator, beta) if ctx.is_main and evals else {})
    gen_before = eval_generation(ref, tok, eval_prompts, cfg)
    del ref
    trainer = Trainer(
        DPOLoss(policy, beta, pad_id(tok)),
        cfg,
        train_dataset=train,
        data_collator=collator,
        tokenizer=tok,
    )
    summary = trainer.train()
    out = export_model(trainer.strategy, policy, tok, export_dir(cfg, trainer.run_dir), "policy.")
    trained = load_exported_policy(out, ctx.device)
    after = broadcast(eval_margin(trained, evals, collator, beta) if ctx.is_main and evals else {})
    gen_after = eval_generation(trained, tok, eval_prompts, cfg)
    summary |= {"stage": "dpo", "export_dir": str(out)}
    summary |= {f"eval_{k}_before": v for k, v in before.items()}
    summary |= {f"eval_{k}": v for k, v in after.items()}
    summary |= {
        "parse_rate_before": gen_before.get("parse_rate"),
        "parse_rate_after": gen_after.get("parse_rate"),
    }
    append_metrics(
        trainer.run_dir, {"step": trainer.step, **{f"eval_{k}": v for k, v in after.items()}}
    )
    write_summary(trainer.run_dir, summary)
    return summary
