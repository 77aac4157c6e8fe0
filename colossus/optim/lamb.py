"""LAMB (You et al., "Large Batch Optimization for Deep Learning: Training BERT in 76 minutes",
arXiv 1904.00962, Algorithm 2) as a ``torch.optim.Optimizer``.

Per parameter (layer) ``l``, step ``t``::

    m = b1 m + (1 - b1) g          v = b2 v + (1 - b2) g^2
    r = m_hat / (sqrt(v_hat) + eps)            (m_hat = m / (1 - b1^t), v_hat likewise)
    u = r + wd w                               (decoupled weight decay)
    w = w - lr * phi(||w||) / ||u|| * u        (trust ratio; 1 when a norm is 0)

Implementations disagree on details; each is an option, the paper's choice the default:

=====================  ========================  ===============================================
option                 default (paper)           others
=====================  ========================  ===============================================
``bias_correction``    True (Alg. 2, final v.)   False: arXiv v3, torch-optimizer ``debias=False``
``phi_min/phi_max``    None (phi = identity)     torch-optimizer ``clamp_value=10`` = phi_max 10
``trust_clip``         None                      1.0: LAMBC / timm ``trust_clip=True``
``max_grad_norm``      None                      1.0: NVIDIA FusedLAMB global-norm pre-normalisation
``exclude_from_        per group (param_groups   False everywhere: torch-optimizer, timm
adaptation``           : bias / norm True)       (BERT's LAMB skips the ratio for no-decay params)
``eps``                1e-6                      1e-8 (apex)
=====================  ========================  ===============================================

A step is a few passes over memory. Fused path (``fused``, default on CPU where
``torch.compile`` works): per large fp32 tensor, pass 1 updates the moments, returns
``||w||^2, ||u||^2`` and (``grad_as_workspace``, the default) stores ``d = -u`` into the
gradient; ONE call of ``norm_reducer`` (sharded parameters, see :mod:`colossus.optim.reducer`);
pass 2 is one native ``torch._foreach_addcmul_`` over all parameters, ``w += lr * ratio * d``
(10 element accesses per parameter, 7 of them in pass 1 like fused AdamW:
:mod:`offload.trust_fused`). With ``grad_as_workspace=False`` pass 1 leaves the gradient alone and
a compiled pass 2 per tensor recomputes ``u`` from ``m, v, w`` (also 10 accesses; slower, see
``docs/benchmarks.md``). Multi-tensor path (small tensors, or ``fused=False``): one
``torch._fused_adamw_`` call per group computes the moments and the Adam direction into a
workspace (the gradients; with ``grad_as_workspace=False`` one fp32 buffer per parameter, kept
between steps, not part of the state dict, starting as a copy of w with weight decay), one
``_foreach_norm`` over weights and updates, the same single reducer call, one
``_foreach_addcmul_`` applies the scaled update (14 accesses; 15 with the gradient as workspace
and weight decay: the decay is a separate pass there). No per-parameter ``.item()`` on
either path.

Flat path (``flat=True``; CPU, with the fused kernels; the trainer's default for lamb): each
param group's parameters, gradients and moments live in flat buffers of ``[rows, flat_block]``
(:mod:`colossus.optim.flat`: ``p.data``, ``p.grad`` and the state's moments are views), so a
step is ONE compiled pass 1 per group (per-row sums of ``w^2`` and ``u^2`` in the same loop), a
segment sum of the row sums into per-parameter norms, the same single reducer call, and ONE
native ``addcmul_`` per group: the same 10 element accesses without the per-tensor compiled
calls' fixed costs (``docs/benchmarks.md``, ``colossus bench optim``, variant ``lamb-flat``).
The parameters then share one storage, which ``safetensors.torch.save_model`` refuses ("None is
covering the entire storage"); the trainer's checkpoints use
:meth:`colossus.checkpoint.CheckpointWriter.save_module`, which takes them. That is why the
class keeps ``flat=False`` as its own default. ``zero_grad`` keeps the gradients as zeroed views
(see :meth:`Lamb.zero_grad`); parameters that backward does not reach are still skipped.

Example::

    >>> import torch
    >>> from colossus.optim import Lamb, param_groups
    >>> model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 1))
    >>> opt = Lamb(param_groups(model, weight_decay=0.01), lr=1e-2)
    >>> for _ in range(3):
    ...     model(torch.randn(4, 8)).pow(2).mean().backward()
    ...     opt.step(); opt.zero_grad()
    >>> sorted(opt.state[model[0].weight])
    ['exp_avg', 'exp_avg_sq', 'step']
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from colossus.optim.flat import FlatGroup, FlatMixin
from offload import trust_fused
from offload.trust import NormReducer, column_sq_norms, lamb_direction_, lamb_trust_ratio


class Lamb(FlatMixin):
    """LAMB with decoupled weight decay; see the module docstring for the options.

    Param-group keys: ``lr``, ``betas``, ``eps``, ``weight_decay``, ``bias_correction``,
    ``phi_min``, ``phi_max``, ``trust_clip``, ``exclude_from_adaptation`` (build groups by
    name with :func:`colossus.optim.param_groups`). ``max_grad_norm`` and ``norm_reducer`` are
    per optimizer. All parameters must be on one device.

    ``fused``: the two-pass compiled kernels of :mod:`offload.trust_fused` (10 element accesses
    per parameter instead of 14) for fp32 tensors of at least ``FUSED_MIN_NUMEL`` elements.
    None (default) = on CPU when they compile (else one warning and the multi-tensor path);
    True = required (error if they do not compile); False = the multi-tensor path only.

    ``grad_as_workspace`` (default True): the step overwrites each ``p.grad`` with its update
    direction (the gradient is dead after the step in a training loop that zeroes or frees
    gradients after ``step()``, as ``Trainer`` does); it saves a pass (fused) or a buffer the
    size of the model (multi-tensor path). False keeps ``p.grad`` as it was (needed when
    gradients are read after the step, e.g. accumulated over steps on purpose, or logged)."""

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.01,
        bias_correction: bool = True,
        phi_min: float | None = None,
        phi_max: float | None = None,
        trust_clip: float | None = None,
        exclude_from_adaptation: bool = False,
        max_grad_norm: float | None = None,
        norm_reducer: NormReducer | None = None,
        fused: bool | None = None,
        grad_as_workspace: bool = True,
        flat: bool = False,
        flat_block: int = 4096,
    ) -> None:
        if lr <= 0 or eps < 0 or weight_decay < 0:
            raise ValueError(
                f"need lr > 0, eps >= 0, weight_decay >= 0; got {lr}, {eps}, {weight_decay}"
            )
        if not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"betas must be in [0, 1), got {betas}")
        if max_grad_norm is not None and max_grad_norm <= 0:
            raise ValueError(f"max_grad_norm must be positive or None, got {max_grad_norm}")
        if flat and not grad_as_workspace:
            raise ValueError(
                "flat=True stores the update into the gradient buffer: it needs "
                "grad_as_workspace=True"
            )
        if flat_block < 1:
            raise ValueError(f"flat_block must be positive, got {flat_block}")
        defaults = dict(
            lr=lr,
            betas=tuple(betas),
            eps=eps,
            weight_decay=weight_decay,
            bias_correction=bias_correction,
            phi_min=phi_min,
            phi_max=phi_max,
            trust_clip=trust_clip,
            exclude_from_adaptation=exclude_from_adaptation,
        )
        super().__init__(params, defaults)
        self.max_grad_norm = max_grad_norm
        self.norm_reducer = norm_reducer
        self.fused = fused
        self.grad_as_workspace = grad_as_workspace
        self.flat = flat
        self.flat_block = flat_block
        self._work: dict[torch.Tensor, torch.Tensor] = {}
        self._flat: dict[int, FlatGroup] = {}  # param group index -> its flat buffers

    def _workspace(self, p: torch.Tensor) -> torch.Tensor:
        w = self._work.get(p)
        if w is None or w.shape != p.shape:
            w = self._work[p] = torch.zeros_like(p, memory_format=torch.contiguous_format)
        return w

    def _flat_wanted(self, group: dict[str, Any]) -> bool:
        # eps > 0: the zero padding's update is 0 / -eps (0 / 0 without it)
        return group["eps"] > 0

    def _flat_kernel(self) -> bool:
        return trust_fused.flat_available()

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        todo = self._groups_to_step()
        for _, ps, fg, _ in todo:
            if fg is not None:
                continue
            for p in ps:
                if p.grad.is_sparse:
                    raise RuntimeError("Lamb does not support sparse gradients")
                st = self.state[p]
                if not st:
                    st["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                    st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        if not todo:
            return loss
        params = [p for _, ps, _, _ in todo for p in ps]
        grad_scale = None
        if self.max_grad_norm is not None:  # NVIDIA's pre-normalisation: g / max(1, |g| / max)
            gsq = column_sq_norms([[p.grad for p in params]])
            if self.norm_reducer is not None:
                self.norm_reducer(gsq, params)
            grad_scale = (gsq.sum().sqrt() / self.max_grad_norm).clamp(min=1.0)
        fused = trust_fused.want_fused(self.fused, params[0].device)
        scratch = self.grad_as_workspace
        pass1 = trust_fused.lamb_pass1_into_grad_ if scratch else trust_fused.lamb_pass1_
        n_all = len(params)
        dev = params[0].device
        plan = []  # per group: (group, ps, foreach positions, fused positions, hp, coefs, flat)
        works, small_pos, parts, big_pos = [], [], [], []
        flat_sq = []  # (positions, [2, k] squares) of the flat groups
        i = 0
        for group, ps, fg, idx in todo:
            steps = [self.state[p]["step"] for p in ps]
            torch._foreach_add_(steps, 1.0)
            b1, b2 = group["betas"]
            if fg is not None:  # pass 1: ONE compiled call over the group's rows
                hp = trust_fused.lamb_hparams(
                    b1, b2, group["eps"], group["weight_decay"], grad_scale, dev
                )
                coefs = trust_fused.lamb_bias_coefs(
                    torch.stack(steps), b1, b2, group["bias_correction"]
                )
                rc = _flat_row_coefs(fg, idx, hp, coefs)
                wsq, dsq = trust_fused.lamb_flat_pass1_(fg.w, fg.g, fg.m, fg.v, rc)
                sq_p = torch.zeros(2, len(fg.params), device=dev)
                sq_p.index_add_(1, fg.owner, torch.stack([wsq, dsq]))  # rows -> parameters
                flat_sq.append((list(range(i, i + len(ps))), sq_p[:, idx]))
                plan.append((group, ps, [], [], None, None, fg, idx))
                i += len(ps)
                continue
            big = [
                j
                for j, p in enumerate(ps)
                if fused
                and trust_fused.fusable(
                    p, p.grad, self.state[p]["exp_avg"], self.state[p]["exp_avg_sq"]
                )
            ]
            small = sorted(set(range(len(ps))) - set(big)) if big else list(range(len(ps)))
            hp = coefs = None
            if big:  # pass 1: moments and both norms in one read of g, m, v, w
                hp = trust_fused.lamb_hparams(
                    b1, b2, group["eps"], group["weight_decay"], grad_scale, ps[0].device
                )
                coefs = trust_fused.lamb_bias_coefs(
                    torch.stack([steps[j] for j in big]), b1, b2, group["bias_correction"]
                ).unbind()
                for j, c in zip(big, coefs):
                    st = self.state[ps[j]]
                    parts.append(pass1(ps[j], ps[j].grad, st["exp_avg"], st["exp_avg_sq"], hp, c))
                big_pos += [i + j for j in big]
            if small:
                sp = [ps[j] for j in small]
                work = [p.grad if scratch else self._workspace(p) for p in sp]
                grads = [p.grad for p in sp]
                g_scale = grad_scale
                if grad_scale is not None and not scratch:
                    # torch._fused_adamw_ divides its gradients by grad_scale in place
                    grads, g_scale = torch._foreach_div(grads, grad_scale), None
                lamb_direction_(
                    work,
                    grads,
                    [self.state[p]["exp_avg"] for p in sp],
                    [self.state[p]["exp_avg_sq"] for p in sp],
                    sp,
                    [steps[j] for j in small],
                    beta1=b1,
                    beta2=b2,
                    eps=group["eps"],
                    weight_decay=group["weight_decay"],
                    bias_correction=group["bias_correction"],
                    grad_scale=g_scale,
                )
                works += work
                small_pos += [i + j for j in small]
            plan.append((group, ps, small, big, hp, coefs, None, idx))
            i += len(ps)
        # [2, n]: ||w||^2, ||u||^2 per parameter (partial if split), in parameter order
        if not big_pos and not flat_sq:
            sq = column_sq_norms([params, works])
        else:
            sq = torch.zeros(2, n_all, device=dev)
            if big_pos:
                sq[:, big_pos] = torch.stack(parts, 1)
            for pos, part in flat_sq:
                sq[:, pos] = part
            if small_pos:
                sq[:, small_pos] = column_sq_norms([[params[k] for k in small_pos], works])
        if self.norm_reducer is not None:
            self.norm_reducer(sq, params)  # the one collective of the step
        i, k = 0, 0
        scales: list[torch.Tensor] = []
        rest: list[torch.Tensor] = []  # the parameters of the final multi-tensor axpy
        for group, ps, small, big, hp, coefs, fg, idx in plan:
            n = len(ps)
            if group["exclude_from_adaptation"]:
                ratio = torch.ones(n, device=sq.device)
            else:
                ratio = lamb_trust_ratio(
                    sq[0, i : i + n],
                    sq[1, i : i + n],
                    group["phi_min"],
                    group["phi_max"],
                    group["trust_clip"],
                )
            scale = (ratio * group["lr"]).to(ps[0].dtype)
            i += n
            if fg is not None:  # pass 2: w += lr * ratio[owner] * d over the group's rows
                per_param = torch.zeros(len(fg.params), device=dev)
                per_param[idx] = scale  # skipped parameters: 0 (their d is 0 too)
                fg.w.addcmul_(fg.g, per_param.index_select(0, fg.owner).unsqueeze(1))
                continue
            scale = scale.unbind()
            if scratch:  # every gradient holds d = -u now: one axpy over all, below
                scales += scale
                rest += ps
                continue
            for j, c in zip(big, coefs or ()):  # pass 2: w -= lr * ratio * u, u recomputed
                st = self.state[ps[j]]
                trust_fused.lamb_pass2_(ps[j], st["exp_avg"], st["exp_avg_sq"], hp, c, scale[j])
            if small:
                # work holds -(r + wd w): w += lr * ratio * work
                torch._foreach_addcmul_(
                    [ps[j] for j in small], works[k : k + len(small)], [scale[j] for j in small]
                )
                k += len(small)
        if rest:  # pass 2: w += lr * ratio * d, 3 element accesses, one native call
            torch._foreach_addcmul_(rest, [p.grad for p in rest], scales)
        return loss


def _flat_row_coefs(
    fg: FlatGroup, idx: list[int], hp: torch.Tensor, coefs: torch.Tensor
) -> torch.Tensor:
    """``[rows, 8]`` coefficients of :func:`offload.trust_fused.lamb_flat_pass1_`: the same
    values as the per-tensor kernel's (``hp`` from ``lamb_hparams``, ``coefs`` the bias
    corrections of the parameters ``idx`` that have a gradient). A parameter without one gets
    1, 0, 1, 0 (moments kept exactly: ``m * 1 + 0 * 0``), 0 and -1 (``d = 0 / -1 = 0``)."""
    k = len(idx)
    act = torch.cat(
        [
            hp[[0, 7, 2, 8]].expand(k, 4),
            coefs[:, :1],
            -coefs[:, 1:],
            (-hp[4]).expand(k, 1),
            hp[5].expand(k, 1),
        ],
        1,
    )
    if k == len(fg.params):
        per_param = act
    else:
        per_param = torch.tensor(
            [1.0, 0.0, 1.0, 0.0, 0.0, 0.0, -1.0, 0.0], device=hp.device
        ).repeat(len(fg.params), 1)
        per_param[idx] = act
    return per_param.index_select(0, fg.owner)
