"""LARS (You, Gitman, Ginsburg, "Large Batch Training of Convolutional Networks",
arXiv 1708.03888, Algorithm 1) as a ``torch.optim.Optimizer``.

Per parameter (layer) ``l``::

    local_lr = eta * ||w|| / (||g|| + wd * ||w|| + eps)     (1 when a norm is 0)
    v = m v + lr * local_lr * (g + wd w)
    w = w - v

Options where implementations disagree (paper's choice default):

==========================  ============  ===========================================================
option                      default       others
==========================  ============  ===========================================================
``trust_coefficient`` eta   0.001         0.02 (NVIDIA LARC), 0.001 (timm)
``eps``                     0.0           1e-8 (timm, LARC) in the denominator
``lr_inside_momentum``      True          False: ``v = m v + local_lr (g + wd w); w -= lr v`` (timm,
                                          torch-SGD style); differs once the lr changes over steps
``nesterov``                False         True: ``w -= (s (g + wd w) + m v)`` as in torch SGD
``larc_clip``               False         True: LARC clip mode, ``local_lr <- min(local_lr / lr, 1)``
``exclude_from_adaptation`` per group     False everywhere (timm applies it to all params)
``max_grad_norm``           None          global-norm pre-normalisation of the gradients
==========================  ============  ===========================================================

A step: one ``_foreach_norm`` over weights and gradients, ONE ``norm_reducer`` call, then
the momentum buffers and weights are updated: one compiled pass per large tensor (``fused``,
:mod:`offload.trust_fused`) or multi-tensor updates; no per-parameter host syncs.

Example::

    >>> import torch
    >>> from colossus.optim import Lars, param_groups
    >>> model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    >>> opt = Lars(param_groups(model, weight_decay=5e-4), lr=1.0, momentum=0.9)
    >>> x, y = torch.randn(16, 8), torch.randint(0, 3, (16,))
    >>> for _ in range(3):
    ...     torch.nn.functional.cross_entropy(model(x), y).backward()
    ...     opt.step(); opt.zero_grad()
    >>> sorted(opt.state[model[0].weight])
    ['momentum_buffer']
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from colossus.optim.flat import FlatGroup, FlatMixin
from offload import trust_fused
from offload.trust import NormReducer, column_sq_norms, lars_apply_, lars_trust_ratio


class Lars(FlatMixin):
    """LARS with momentum; see the module docstring for the options.

    Param-group keys: ``lr``, ``momentum``, ``weight_decay``, ``trust_coefficient``, ``eps``,
    ``nesterov``, ``larc_clip``, ``lr_inside_momentum``, ``exclude_from_adaptation``.

    ``fused`` (with momentum): the one-pass compiled apply of :mod:`offload.trust_fused` for
    large fp32 tensors (5 element accesses instead of 11); None = on CPU when it compiles,
    True = required, False = the multi-tensor path only.

    ``flat`` (default False; with momentum and the fused kernels): each group of plain fp32
    contiguous tensors on one device in flat ``[rows, flat_block]`` buffers (parameters,
    gradients, momentum buffers; :mod:`colossus.optim.flat`, the same bookkeeping and caveats
    as ``Lamb(flat=True)``), so the apply is ONE compiled call per group instead of one per
    tensor; the norms stay one ``_foreach_norm`` over the parameter views."""

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1.0,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        trust_coefficient: float = 0.001,
        eps: float = 0.0,
        nesterov: bool = False,
        larc_clip: bool = False,
        lr_inside_momentum: bool = True,
        exclude_from_adaptation: bool = False,
        max_grad_norm: float | None = None,
        norm_reducer: NormReducer | None = None,
        fused: bool | None = None,
        flat: bool = False,
        flat_block: int = 4096,
    ) -> None:
        if lr <= 0 or momentum < 0 or weight_decay < 0 or eps < 0 or trust_coefficient <= 0:
            raise ValueError(
                "need lr > 0, momentum >= 0, weight_decay >= 0, eps >= 0, trust_coefficient > 0; "
                f"got {lr}, {momentum}, {weight_decay}, {eps}, {trust_coefficient}"
            )
        if nesterov and momentum == 0:
            raise ValueError("nesterov needs momentum > 0")
        if flat_block < 1:
            raise ValueError(f"flat_block must be positive, got {flat_block}")
        defaults = dict(
            lr=lr,
            momentum=momentum,
            weight_decay=weight_decay,
            trust_coefficient=trust_coefficient,
            eps=eps,
            nesterov=nesterov,
            larc_clip=larc_clip,
            lr_inside_momentum=lr_inside_momentum,
            exclude_from_adaptation=exclude_from_adaptation,
        )
        super().__init__(params, defaults)
        self.max_grad_norm = max_grad_norm
        self.norm_reducer = norm_reducer
        self.fused = fused
        self.flat = flat
        self.flat_block = flat_block
        self._flat: dict[int, FlatGroup] = {}  # param group index -> its flat buffers

    _flat_keys = ("momentum_buffer",)
    _flat_step = False

    def _flat_wanted(self, group: dict[str, Any]) -> bool:
        return group["momentum"] > 0  # the flat apply updates a momentum buffer

    def _flat_kernel(self) -> bool:
        return trust_fused.flat_available("larsf")

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        todo = self._groups_to_step()
        if not todo:
            return loss
        params = [p for _, ps, _, _ in todo for p in ps]
        fused = trust_fused.want_fused(self.fused, params[0].device)
        grads = [p.grad for p in params]
        if any(g.is_sparse for g in grads):
            raise RuntimeError("Lars does not support sparse gradients")
        # [2, n]: ||w||^2, ||g||^2 (partial if split), in parameter order
        if not any(fg is not None for _, _, fg, _ in todo):
            sq = column_sq_norms([params, grads])
        else:
            sq = torch.zeros(2, len(params), device=params[0].device)
            i, rest = 0, []
            for _, ps, fg, idx in todo:
                if fg is None:
                    rest += range(i, i + len(ps))
                else:  # row norms over the flat buffers (2 calls), summed per parameter
                    rows = torch.stack(
                        [
                            torch.linalg.vector_norm(fg.w, dim=1),
                            torch.linalg.vector_norm(fg.g, dim=1),
                        ]
                    ).square()
                    per = torch.zeros(2, len(fg.params), device=sq.device)
                    sq[:, i : i + len(ps)] = per.index_add_(1, fg.owner, rows)[:, idx]
                i += len(ps)
            if rest:
                sq[:, rest] = column_sq_norms([[params[k] for k in rest], [grads[k] for k in rest]])
        if self.norm_reducer is not None:
            self.norm_reducer(sq, params)  # the one collective of the step
        coef = None
        if self.max_grad_norm is not None:
            # the reduced per-parameter squares sum to the global squared norm: no extra call
            coef = (sq[1].sum().sqrt() / self.max_grad_norm).clamp(min=1.0)
            sq[1] /= coef**2
        i = 0
        for group, ps, fg, idx in todo:
            n = len(ps)
            gs = grads[i : i + n]
            lr, wd = group["lr"], group["weight_decay"]
            if group["exclude_from_adaptation"]:  # plain SGD with momentum
                ratio = torch.ones(n, device=sq.device)
            else:
                ratio = lars_trust_ratio(
                    sq[0, i : i + n], sq[1, i : i + n], group["trust_coefficient"], wd, group["eps"]
                )
                if group["larc_clip"]:  # LARC: the local lr never exceeds the global one
                    ratio = (ratio / lr).clamp(max=1.0)
            if group["lr_inside_momentum"]:
                scale, outside = ratio * lr, 1.0
            else:
                scale, outside = ratio, lr
            if fg is not None:  # the apply: ONE compiled call over the group's rows
                rc = _flat_row_coefs(fg, idx, scale, group, outside, coef)
                trust_fused.lars_flat_apply_(fg.w, fg.g, fg.bufs["momentum_buffer"], rc)
                i += n
                continue
            if coef is not None:
                gs = torch._foreach_div(gs, coef)  # new tensors: p.grad stays as it was
            bufs = None
            if group["momentum"]:
                bufs = []
                for p in ps:
                    st = self.state[p]
                    if "momentum_buffer" not in st:
                        st["momentum_buffer"] = torch.zeros_like(
                            p, memory_format=torch.preserve_format
                        )
                    bufs.append(st["momentum_buffer"])
            scale = list(scale.to(ps[0].dtype).unbind())
            rest = range(n)
            if fused and bufs is not None:
                big = [j for j in rest if trust_fused.fusable(ps[j], gs[j], bufs[j])]
                hp = trust_fused.lars_hparams(
                    group["momentum"], wd, outside, group["nesterov"], ps[0].device
                )
                for j in big:
                    trust_fused.lars_apply_fused_(ps[j], gs[j], bufs[j], hp, scale[j])
                rest = sorted(set(rest) - set(big))
            if rest:
                lars_apply_(
                    [ps[j] for j in rest],
                    [gs[j] for j in rest],
                    None if bufs is None else [bufs[j] for j in rest],
                    [scale[j] for j in rest],
                    wd,
                    group["momentum"],
                    group["nesterov"],
                    outside,
                )
            i += n
        return loss


def _flat_row_coefs(
    fg: FlatGroup,
    idx: list[int],
    scale: torch.Tensor,
    group: dict[str, Any],
    outside: float,
    coef: torch.Tensor | None,
) -> torch.Tensor:
    """``[rows, 6]`` coefficients of :func:`offload.trust_fused.lars_flat_apply_` for the
    parameters ``idx`` that have a gradient (``scale[k]`` for ``idx[k]``); a parameter without
    one gets scale 0, momentum 1 and lr 0 outside: buffer and weight kept exactly."""
    dev = fg.w.device
    k, n = len(idx), len(fg.params)
    per = torch.tensor([0.0, 0.0, 1.0, 0.0, 0.0, 1.0], device=dev).repeat(n, 1)
    const = torch.tensor(
        [group["weight_decay"], group["momentum"], outside, float(group["nesterov"])],
        device=dev,
    )
    gdiv = torch.ones(k, 1, device=dev) if coef is None else coef.float().expand(k, 1)
    per[idx] = torch.cat([scale.float().unsqueeze(1), const.expand(k, 4), gdiv], 1)
    return per.index_select(0, fg.owner)
