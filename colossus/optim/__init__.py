"""Optimizers: LAMB and LARS (layer-wise adaptive, sharding-aware trust ratios), AdamW, the
param-group helper that applies name-based exclusions, and large-batch LR scaling.

``build_optimizer(model, cfg, device)`` turns the schema's ``optim`` section
(:class:`colossus.config.OptimConfig`) into an optimizer for strategies ``none`` / ``ddp``;
strategy ``chunk`` builds the chunk versions (:mod:`offload.optim_lamb`) from the same section.

Example::

    >>> import torch
    >>> from colossus.config import OptimConfig
    >>> from colossus.optim import build_optimizer
    >>> opt = build_optimizer(torch.nn.Linear(4, 4), OptimConfig(name="lamb", lr=1e-3), torch.device("cpu"))
    >>> type(opt).__name__, [g["name"] for g in opt.param_groups]
    ('Lamb', ['decay', 'no_decay'])
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from colossus.optim.groups import DEFAULT_EXCLUDE, is_excluded, param_groups
from colossus.optim.lamb import Lamb
from colossus.optim.lars import Lars
from colossus.optim.reducer import ShardedNormReducer, shard_weight
from colossus.optim.scaling import scale_lr, scale_warmup
from offload.trust import NormReducer

if TYPE_CHECKING:
    from colossus.config import OptimConfig

__all__ = [
    "DEFAULT_EXCLUDE",
    "Lamb",
    "Lars",
    "NormReducer",
    "ShardedNormReducer",
    "build_optimizer",
    "is_excluded",
    "param_groups",
    "scale_lr",
    "scale_warmup",
    "shard_weight",
]


def build_optimizer(
    model: nn.Module,
    cfg: OptimConfig,
    device: torch.device,
    norm_reducer: NormReducer | None = None,
) -> torch.optim.Optimizer:
    """The optimizer ``cfg.name`` names, over ``model``'s trainable parameters.

    AdamW keeps the project's ndim >= 2 decay rule and the fused kernel; LAMB / LARS group
    parameters by ``cfg.exclude`` patterns (:func:`param_groups`). ``cfg.flat`` None (auto) =
    flat buffers unless the norms are sharded (``norm_reducer``: tensor parallelism) or the
    fused kernels are off."""
    if cfg.name == "adamw":
        from colossus.strategy import build_adamw

        return build_adamw(model, cfg, device)
    flat = cfg.flat if cfg.flat is not None else norm_reducer is None and cfg.fused is not False
    groups = param_groups(
        model,
        cfg.weight_decay,
        exclude=tuple(cfg.exclude),
        exclude_1d=cfg.exclude_1d,
        exclude_from_adaptation=cfg.exclude_from_adaptation,
    )
    if cfg.name == "lamb":
        return Lamb(
            groups,
            lr=cfg.lr,
            betas=cfg.resolved_betas,
            eps=cfg.resolved_eps,
            weight_decay=cfg.weight_decay,
            bias_correction=cfg.bias_correction,
            phi_min=cfg.phi_min,
            phi_max=cfg.phi_max,
            trust_clip=cfg.trust_clip,
            max_grad_norm=cfg.max_grad_norm,
            norm_reducer=norm_reducer,
            fused=cfg.fused,
            flat=flat,
        )
    return Lars(
        groups,
        lr=cfg.lr,
        momentum=cfg.momentum,
        weight_decay=cfg.weight_decay,
        trust_coefficient=cfg.trust_coefficient,
        eps=cfg.resolved_eps,
        nesterov=cfg.nesterov,
        larc_clip=cfg.larc_clip,
        lr_inside_momentum=cfg.lr_inside_momentum,
        max_grad_norm=cfg.max_grad_norm,
        norm_reducer=norm_reducer,
        fused=cfg.fused,
        flat=flat,
    )
