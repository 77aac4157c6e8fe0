"""Parameter groups by name: which parameters get weight decay and a trust ratio.

torch optimizers never see parameter names, so the exclusion rule (biases, LayerNorm gains,
optionally embeddings: no decay, no layer-wise adaptation; the BERT LAMB recipe) is applied
here, from ``model.named_parameters()``, into two param groups with per-group flags
``weight_decay`` and ``exclude_from_adaptation`` that :class:`~colossus.optim.Lamb` and
:class:`~colossus.optim.Lars` read.

Example::

    >>> import torch
    >>> from colossus.optim import param_groups
    >>> model = torch.nn.ModuleDict(
    ...     {"emb": torch.nn.Embedding(10, 4), "norm": torch.nn.LayerNorm(4), "out": torch.nn.Linear(4, 2)}
    ... )
    >>> [(g["name"], g["names"]) for g in param_groups(model, weight_decay=0.01)]
    [('decay', ['emb.weight', 'out.weight']), ('no_decay', ['norm.weight', 'norm.bias', 'out.bias'])]
    >>> [len(g["params"]) for g in param_groups(model, 0.01, exclude=("bias", "norm", "emb"))]
    [1, 4]
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from torch import nn

DEFAULT_EXCLUDE: tuple[str, ...] = ("bias", "norm", "ln_")
"""Regular expressions (searched, case-insensitive) of parameter names excluded from weight
decay and adaptation: biases, LayerNorm / RMSNorm gains (``LayerNorm``, ``layer_norm``,
GPT-2's ``ln_1`` / ``ln_f``). Add ``"emb"`` to exclude embeddings too (they are decayed and
adapted by default, as in the BERT LAMB recipe)."""


def is_excluded(
    name: str,
    param: nn.Parameter,
    exclude: Sequence[str] = DEFAULT_EXCLUDE,
    exclude_1d: bool = True,
) -> bool:
    """True when ``name`` matches a pattern of ``exclude``, or ``param`` is 1-D and
    ``exclude_1d`` (every bias and norm gain is 1-D whatever its module calls it)."""
    if exclude_1d and param.ndim < 2:
        return True
    return any(re.search(p, name, re.IGNORECASE) for p in exclude)


def param_groups(
    model: nn.Module,
    weight_decay: float,
    exclude: Sequence[str] = DEFAULT_EXCLUDE,
    exclude_1d: bool = True,
    exclude_from_adaptation: bool = True,
) -> list[dict[str, Any]]:
    """Two groups of ``model``'s trainable parameters: ``decay`` (``weight_decay``, adapted)
    and ``no_decay`` (weight decay 0; ``exclude_from_adaptation`` says whether they also skip
    the trust ratio, i.e. take plain Adam / SGD-momentum steps: True in the BERT LAMB code,
    False in torch-optimizer and timm). Empty groups are left out. Each group carries
    ``names`` (for logs and tests; optimizers ignore it)."""
    dec, nodec = [], []
    for n, p in model.named_parameters():
        if p.requires_grad:
            (nodec if is_excluded(n, p, exclude, exclude_1d) else dec).append((n, p))
    groups = []
    if dec:
        groups.append(
            {
                "name": "decay",
                "params": [p for _, p in dec],
                "names": [n for n, _ in dec],
                "weight_decay": weight_decay,
                "exclude_from_adaptation": False,
            }
        )
    if nodec:
        groups.append(
            {
                "name": "no_decay",
                "params": [p for _, p in nodec],
                "names": [n for n, _ in nodec],
                "weight_decay": 0.0,
                "exclude_from_adaptation": exclude_from_adaptation,
            }
        )
    return groups
