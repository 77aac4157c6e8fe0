#!/usr/bin/env bash
# Two gloo processes on a CPU-only box under accelerate. Note: `accelerate launch --cpu
# --num_processes 2` would start ONE process (it expects an MPI hostfile for multi-CPU);
# ACCELERATE_USE_CPU=1 with --multi_gpu starts two and colossus picks gloo.
set -euo pipefail
cd "$(dirname "$0")/.."
ACCELERATE_USE_CPU=1 .venv/bin/accelerate launch --multi_gpu --num_processes 2 --num_machines 1 \
  --mixed_precision no --dynamo_backend no \
  -m colossus.cli train recipes/gpt2-tiny.yaml --set strategy.name=ddp --set train.batch_size=8 "$@"
