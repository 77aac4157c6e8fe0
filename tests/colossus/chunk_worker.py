"""Run under torchrun by test_chunk_strategy.py: the Trainer with strategy chunk on a tiny GPT-2
at global batch 8 over N gloo ranks, for several placements in one process group (spawning and
importing transformers cost far more than the tiny runs). Writes OUT_DIR/rank{r}.pt."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ for conftest helpers

import torch  # noqa: E402
from conftest import tiny_gpt2, token_blocks  # noqa: E402

from colossus import Trainer, TrainingConfig  # noqa: E402

STEPS = 30


def config(run_dir: Path, world: int, chunk: dict, checkpoint=None, **train) -> TrainingConfig:
    return TrainingConfig(
        name="chunk",
        optim={"lr": 3e-3, "weight_decay": 0.01},
        schedule={"name": "constant"},
        strategy={"name": "chunk", "chunk": chunk},
        train={
            "max_steps": STEPS,
            "batch_size": 8 // world,
            "max_grad_norm": 1.0,
            "run_dir": str(run_dir),
            "seed": 0,
        }
        | train,
        checkpoint=checkpoint or {"save_final": False},
        logging={"progress": False, "plot": False},
    )


def losses(t: Trainer) -> list[float]:
    return [r["loss"] for r in t.history]


def main() -> None:
    out, world = Path(sys.argv[1]), int(sys.argv[2])
    cases = json.loads(sys.argv[3])
    extras = len(sys.argv) > 4 and sys.argv[4] == "extras"
    res: dict = {}
    rank = 0
    for name, chunk in cases.items():
        t = Trainer(tiny_gpt2(), config(out / name, world, chunk), train_dataset=token_blocks())
        rank = t.ctx.rank
        assert t.ctx.world_size == world, t.ctx
        t.train()
        res[name] = {
            "losses": losses(t),
            "params": t.strategy.full_state_dict(),  # collective: gathered chunk by chunk
            "model_state_bytes": t.strategy.mgr.memory_report(),
            "tied": t.model.lm_head.weight is t.model.transformer.wte.weight,
        }
    if extras:
        first = next(iter(cases.values()))
        # 30 steps straight with a checkpoint at 15, then a new Trainer resumes from 15 -> 30
        straight = Trainer(
            tiny_gpt2(),
            config(out / "resume", world, first, checkpoint={"interval": 15}),
            train_dataset=token_blocks(),
        )
        straight.train()
        ck = out / "resume" / "checkpoints" / "step-00000015"
        resumed = Trainer(
            tiny_gpt2(seed=7),  # other init: everything must come from the checkpoint
            config(out / "resume", world, first, checkpoint={"resume_from": str(ck)}),
            train_dataset=token_blocks(),
        )
        assert resumed.step == 15
        resumed.train()
        res["resume"] = {
            "straight": losses(straight),
            "resumed": losses(resumed),
            "final_ckpt": str(out / "resume" / "checkpoints" / f"step-{STEPS:08d}"),
            "params": resumed.strategy.full_state_dict(),
        }
    torch.save({"rank": rank, "world": world, "res": res}, out / f"rank{rank}.pt")


if __name__ == "__main__":
    main()
