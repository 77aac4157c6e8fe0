"""Train a Hugging Face model with the colossus Trainer from a script (no recipe file).

python examples/train_with_trainer.py                     # one process
torchrun --nproc_per_node 2 examples/train_with_trainer.py --ddp
ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 examples/train_with_trainer.py --ddp
"""

import argparse

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from colossus import Trainer, TrainingConfig
from colossus.config import DataConfig
from colossus.data import build_data

ap = argparse.ArgumentParser()
ap.add_argument("--ddp", action="store_true", help="strategy ddp (run under torchrun / accelerate)")
ap.add_argument("--steps", type=int, default=60)
args = ap.parse_args()

# The built-in corpus (this Python's standard library), a BPE tokenizer trained locally, packed blocks.
data = build_data(
    DataConfig(max_chars=1_000_000, block_size=64, tokenizer={"vocab_size": 2048}), task="causal_lm"
)

torch.manual_seed(0)
model = GPT2LMHeadModel(
    GPT2Config(n_layer=2, n_embd=128, n_head=4, n_positions=64, vocab_size=len(data.tokenizer))
)
config = TrainingConfig(
    name="example",
    optim={"lr": 2e-3},
    schedule={"name": "cosine", "warmup_steps": 10},
    strategy={"name": "ddp" if args.ddp else "none"},
    train={"max_steps": args.steps, "batch_size": 8, "eval_interval": 30},
    logging={"interval": 5},
)
trainer = Trainer(
    model,
    config,
    train_dataset=data.train,
    eval_dataset=data.eval,
    data_collator=data.collator,
    tokenizer=data.tokenizer,
)
summary = trainer.train()
if trainer.ctx.is_main:
    print(
        f"final loss {summary['final_loss']:.3f}, eval perplexity {summary['eval_ppl']:.1f}, run dir {trainer.run_dir}"
    )
