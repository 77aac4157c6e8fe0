"""Recipe -> data -> model -> Trainer: what ``colossus train`` runs, usable from Python too.

Example::

    from colossus.config import TrainingConfig
    from colossus.recipe import run_recipe
    summary = run_recipe(TrainingConfig.from_yaml("recipes/gpt2-tiny.yaml", ["train.max_steps=5"]))
"""

from __future__ import annotations

from typing import Any

from colossus.config import TrainingConfig
from colossus.distributed import barrier, init_distributed
from colossus.models import build_model
from colossus.trainer import Trainer, set_seed


def build_trainer(cfg: TrainingConfig, callbacks=()) -> Trainer:
    from colossus.data import build_data

    ctx = init_distributed(cfg.strategy.backend)
    task = cfg.model.resolved_task
    # rank 0 trains the tokenizer and packs the blocks; the others then read its cache
    if not ctx.is_main:
        barrier()
    bundle = build_data(cfg.data, task)
    if ctx.is_main:
        barrier()
    set_seed(cfg.train.seed)  # same initial weights on every rank
    model = build_model(cfg.model, vocab_size=len(bundle.tokenizer), tokenizer=bundle.tokenizer)
    return Trainer(
        model,
        cfg,
        train_dataset=bundle.train,
        eval_dataset=bundle.eval,
        data_collator=bundle.collator,
        tokenizer=bundle.tokenizer,
        callbacks=callbacks,
    )


def run_recipe(cfg: TrainingConfig, callbacks=()) -> dict[str, Any]:
    if cfg.rlhf.stage is not None:  # an RLHF stage (sft / rm / ppo / dpo): colossus.rlhf
        from colossus.rlhf import run_rlhf

        return run_rlhf(cfg)
    return build_trainer(cfg, callbacks).train()
