"""Mixed precision: dynamic loss scaling for fp16 working chunks (bf16 needs none).

Example::

    >>> from offload.precision import DynamicLossScaler
    >>> s = DynamicLossScaler(init_scale=8.0, growth_interval=2)
    >>> s.update(found_inf=True); s.scale
    4.0
    >>> s.update(False); s.update(False); s.scale
    8.0
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class DynamicLossScaler:
    """Multiply the loss by ``scale``; halve it and skip the step on overflow, grow it back
    after ``growth_interval`` clean steps (the torch.amp.GradScaler policy)."""

    init_scale: float = 2.0**16
    growth_factor: float = 2.0
    backoff_factor: float = 0.5
    growth_interval: int = 2000
    min_scale: float = 1.0

    def __post_init__(self) -> None:
        self.scale = float(self.init_scale)
        self.good_steps = 0
        self.skipped_steps = 0

    def update(self, found_inf: bool) -> None:
        if found_inf:
            self.scale = max(self.min_scale, self.scale * self.backoff_factor)
            self.good_steps = 0
            self.skipped_steps += 1
            return
        self.good_steps += 1
        if self.good_steps >= self.growth_interval:
            self.scale *= self.growth_factor
            self.good_steps = 0

    def state_tensor(self) -> torch.Tensor:
        return torch.tensor([self.scale, self.good_steps, self.skipped_steps], dtype=torch.float64)

    def load_state_tensor(self, t: torch.Tensor) -> None:
        self.scale, good, skipped = (float(x) for x in t.tolist())
        self.good_steps, self.skipped_steps = int(good), int(skipped)
