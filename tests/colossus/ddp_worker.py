"""Run by tests under torchrun / accelerate launch: tiny GPT-2, strategy ddp, global batch 8.
Writes each rank's losses and final parameters to OUT_DIR/rank{r}.pt. An optional third
argument names the optimizer (default adamw; lamb / lars take their default flat path)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ for conftest helpers

import torch  # noqa: E402
from conftest import tiny_gpt2, token_blocks  # noqa: E402

from colossus import Trainer, TrainingConfig  # noqa: E402

out_dir, world_expected = Path(sys.argv[1]), int(sys.argv[2])
optim = sys.argv[3] if len(sys.argv) > 3 else "adamw"
cfg = TrainingConfig(
    name="ddp",
    optim={"name": optim, "lr": 3e-3},
    schedule={"name": "cosine", "warmup_steps": 2},
    strategy={"name": "ddp"},
    train={
        "max_steps": 8,
        "batch_size": 8 // world_expected,
        "run_dir": str(out_dir / "run"),
        "seed": 0,
    },
    checkpoint={"save_final": True},
    logging={"progress": False, "plot": False},
)
trainer = Trainer(
    tiny_gpt2(), cfg, train_dataset=token_blocks(), eval_dataset=token_blocks(16, seed=9)
)
assert trainer.ctx.world_size == world_expected, trainer.ctx
trainer.train()
ev = trainer.evaluate()
torch.save(
    {
        "rank": trainer.ctx.rank,
        "world": trainer.ctx.world_size,
        "losses": [r["loss"] for r in trainer.history],
        "flat": bool(getattr(trainer.optimizer, "_live_flat", list)()),
        "eval_loss": ev["eval_loss"],
        "params": {n: p.detach().clone() for n, p in trainer.model.named_parameters()},
    },
    out_dir / f"rank{trainer.ctx.rank}.pt",
)
