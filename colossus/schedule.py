"""Learning-rate schedules: linear warmup, then cosine / linear decay to ``min_lr_ratio`` or constant."""

from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LambdaLR

from colossus.config import ScheduleConfig


def lr_factor(step: int, cfg: ScheduleConfig, total_steps: int) -> float:
    """Multiplier on the base LR for optimizer step ``step`` (0-based)."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.name == "constant":
        return 1.0
    span = max(1, total_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    if cfg.name == "linear":
        shape = 1.0 - progress
    else:
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * shape


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: ScheduleConfig, total_steps: int
) -> LambdaLR:
    return LambdaLR(optimizer, lambda s: lr_factor(s, cfg, total_steps))
