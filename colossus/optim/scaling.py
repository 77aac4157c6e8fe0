"""Learning-rate scaling for large batches: given a learning rate tuned at ``base_batch``,
what to use at ``batch``.

* ``linear`` (Goyal et al. 2017, arXiv 1706.02677): ``lr * batch / base_batch``, with warmup;
  the SGD / LARS rule.
* ``sqrt`` (Krizhevsky 2014; the LAMB paper's rule, You et al. 2019):
  ``lr * sqrt(batch / base_batch)``; keeps the variance of the update per sample constant.
* ``none``: keep the learning rate.

Warmup: the large-batch papers warm up over a fixed number of *samples* (epochs), so at
16x the batch the warmup lasts 1/16 the steps; :func:`scale_warmup` does that, never below 1.

Example::

    >>> from colossus.optim.scaling import scale_lr, scale_warmup
    >>> scale_lr(1e-3, base_batch=32, batch=512, rule="sqrt")
    0.004
    >>> scale_lr(0.1, 256, 8192, rule="linear")
    3.2
    >>> scale_warmup(320, base_batch=32, batch=512)
    20
"""

from __future__ import annotations

import math
from typing import Literal

Rule = Literal["linear", "sqrt", "none"]


def scale_lr(lr: float, base_batch: int, batch: int, rule: Rule = "sqrt") -> float:
    """``lr`` tuned at ``base_batch`` scaled to ``batch`` by ``rule``."""
    if base_batch <= 0 or batch <= 0:
        raise ValueError(f"batch sizes must be positive, got base {base_batch}, batch {batch}")
    k = batch / base_batch
    if rule == "linear":
        return lr * k
    if rule == "sqrt":
        return lr * math.sqrt(k)
    if rule == "none":
        return lr
    raise ValueError(f"rule must be 'linear', 'sqrt' or 'none', got {rule!r}")


def scale_warmup(
    warmup_steps: int, base_batch: int, batch: int, keep: Literal["samples", "steps"] = "samples"
) -> int:
    """Warmup steps at ``batch`` for ``warmup_steps`` at ``base_batch``: the same number of
    warmup samples (``keep="samples"``, the papers' choice; at least 1 step if there was any
    warmup) or the same number of steps."""
    if keep == "steps" or warmup_steps == 0:
        return warmup_steps
    if keep != "samples":
        raise ValueError(f"keep must be 'samples' or 'steps', got {keep!r}")
    return max(1, math.ceil(warmup_steps * base_batch / batch))
