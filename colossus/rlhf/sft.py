"""Supervised fine-tuning on prompt / response pairs: the Trainer with a causal LM whose labels
are -100 on the prompt tokens, so the loss is the response's alone.

Example::

    from colossus.config import TrainingConfig
    from colossus.rlhf.sft import run_sft
    summary = run_sft(TrainingConfig.from_yaml("recipes/rlhf-sft.yaml", ["train.max_steps=5"]))
    print(summary["parse_rate_before"], summary["parse_rate_after"])
"""

from __future__ import annotations

from typing import Any

from colossus.config import TrainingConfig
from colossus.distributed import init_distributed
from colossus.rlhf.data import SFT_KEYS, SFTCollator, encode_sft, read_jsonl, resolve_files
from colossus.rlhf.stage import (
    append_metrics,
    build_policy,
    eval_generation,
    export_dir,
    export_model,
    load_exported_policy,
    load_tokenizer_for,
    pad_id,
    write_summary,
)
from colossus.trainer import Trainer


def sft_datasets(cfg: TrainingConfig, tok) -> tuple[list, list, list[str]]:
    """(train items, eval items, eval prompts) of the SFT JSONL files."""
    r = cfg.rlhf
    train_f, eval_f = resolve_files(r, "sft")
    enc = lambda rec: encode_sft(  # noqa: E731
        tok, rec["prompt"], rec["response"], r.max_prompt_tokens, r.max_response_tokens
    )
    train = [enc(x) for x in read_jsonl(train_f, SFT_KEYS)]
    evals = read_jsonl(eval_f, SFT_KEYS) if eval_f else []
    return train, [enc(x) for x in evals], [x["prompt"] for x in evals]


def run_sft(cfg: TrainingConfig, callbacks=()) -> dict[str, Any]:
    ctx = init_distributed(cfg.strategy.backend)
    tok = load_tokenizer_for(cfg, ctx)
    train, evals, eval_prompts = sft_datasets(cfg, tok)
    model = build_policy(cfg, tok)
    before = eval_generation(model.to(ctx.device), tok, eval_prompts, cfg)
    trainer = Trainer(
        model,
        cfg,
        train_dataset=train,
        eval_dataset=evals or None,
        data_collator=SFTCollator(pad_id(tok)),
        tokenizer=tok,
        callbacks=callbacks,
    )
    summary = trainer.train()
    out = export_model(trainer.strategy, model, tok, export_dir(cfg, trainer.run_dir))
    after = eval_generation(load_exported_policy(out, ctx.device), tok, eval_prompts, cfg)
    summary |= {
        "stage": "sft",
        "export_dir": str(out),
        "parse_rate_before": before.get("parse_rate"),
        "parse_rate_after": after.get("parse_rate"),
        "samples_after": after.get("samples"),
    }
    append_metrics(
        trainer.run_dir,
        {"step": trainer.step, **{k: v for k, v in summary.items() if k.startswith("parse")}},
    )
    write_summary(trainer.run_dir, summary)
    return summary
