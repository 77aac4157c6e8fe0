"""Rank body for the spawned RLHF tests: run PPO recipes in one gloo process group."""

from __future__ import annotations

import os
from typing import Any


def ppo_worker(runs: dict[str, list[str]]) -> dict[str, Any]:
    """Run ``recipes/rlhf-ppo.yaml`` with each list of overrides, in order, on this rank; keep
    the per-iteration history and the memory report."""
    import torch.distributed as dist

    from colossus.config import TrainingConfig
    from colossus.recipe import run_recipe

    n = dist.get_world_size()
    # what a launcher exports: colossus reads the rank layout from the environment
    os.environ.update(
        RANK=str(dist.get_rank()), WORLD_SIZE=str(n), LOCAL_RANK=str(dist.get_rank()),
        LOCAL_WORLD_SIZE=str(n),
    )  # fmt: skip
    out = {}
    for name, sets in runs.items():
        s = run_recipe(TrainingConfig.from_yaml("recipes/rlhf-ppo.yaml", sets))
        out[name] = {k: s.get(k) for k in ("history", "world_size", "memory", "ranks_in_sync")}
    return out
