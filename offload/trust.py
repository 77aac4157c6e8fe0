"""Layer-wise adaptive (LAMB / LARS) update math on lists of tensors, shared by the chunk
optimizers here and by ``colossus.optim`` (``offload`` never imports ``colossus``, so the math
lives on this side and both use it; nothing is duplicated).

Every function works on lists of tensors with multi-tensor (``torch._foreach_*``) or fused
kernels: a step costs a few passes over memory, never a Python loop of kernels per tensor and
never a host sync. A *column* is one logical parameter; per-column norms are combined from
partial sums of squares, so a parameter split over ranks (chunk shards, tensor-parallel
shards) gets the trust ratio of the whole logical tensor after one all-reduce of the stacked
partials (see :func:`column_sq_norms`).

Notation (You et al., LAMB arXiv 1904.00962 Alg. 2; LARS arXiv 1708.03888 Alg. 1): ``w``
weights, ``g`` gradient, ``m`` / ``v`` first / second moment, ``r = m_hat / (sqrt(v_hat) + eps)``
the Adam direction, ``u = r + wd * w`` the LAMB update, ``phi`` the clamp on ``||w||``.

Example::

    >>> import torch
    >>> from offload.trust import lamb_direction_, column_sq_norms, lamb_trust_ratio
    >>> w, g = [torch.ones(4)], [torch.full((4,), 0.5)]
    >>> m, v, d = [torch.zeros(4)], [torch.zeros(4)], [torch.zeros(4)]
    >>> lamb_direction_(d, g, m, v, w, step=1, beta1=0.9, beta2=0.999, eps=1e-6, weight_decay=0.0)
    >>> d[0]  # minus the bias-corrected Adam direction: -g / (|g| + eps)
    tensor([-1.0000, -1.0000, -1.0000, -1.0000])
    >>> sq = column_sq_norms([w, d])  # rows: ||w||^2, ||d||^2 per column
    >>> lamb_trust_ratio(sq[0], sq[1]).round(decimals=4)  # ||w|| / ||u||
    tensor([1.])
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

NormReducer = Callable[[torch.Tensor, Sequence], None]
"""``reducer(sq, columns)``: sum the partial squares ``sq`` (shape ``[rows, len(columns)]``,
one column per logical parameter) over the ranks that hold pieces of them, in place, in ONE
collective. ``columns`` names what each column is (parameters or parameter names) so a reducer
can treat replicated and sharded parameters differently."""


def column_sq_norms(
    rows: Sequence[Sequence[torch.Tensor]],
    index: torch.Tensor | None = None,
    columns: int | None = None,
) -> torch.Tensor:
    """Squared 2-norms, ``out[r, j] = sum over pieces i with index[i] == j of ||rows[r][i]||^2``.

    ``rows`` are equally long lists of tensors (e.g. ``[weights, updates]``); one
    ``_foreach_norm`` over all of them. Without ``index`` each piece is its own column. The
    result is fp32 on the device of the first tensor; padding or empty lists give zeros."""
    n = len(rows[0])
    dev = rows[0][0].device if n else torch.device("cpu")
    if index is None:
        columns = n
    if n == 0:
        return torch.zeros(len(rows), columns or 0, device=dev)
    flat = [t for row in rows for t in row]
    sq = torch.stack(torch._foreach_norm(flat)).float().square().view(len(rows), n)
    if index is None:
        return sq
    out = torch.zeros(len(rows), columns, device=sq.device)
    return out.index_add_(1, index.to(sq.device), sq)


def lamb_direction_(
    out: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avg: list[torch.Tensor],
    exp_avg_sq: list[torch.Tensor],
    weights: list[torch.Tensor],
    step: int | torch.Tensor | list[torch.Tensor],
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    bias_correction: bool = True,
    grad_scale: torch.Tensor | None = None,
    fused: bool | None = None,
) -> None:
    """Update the moments in place and write ``out = -(r + weight_decay * w)``, minus the LAMB
    update before its trust ratio and learning rate.

    ``out[i]`` may be ``grads[i]`` itself (the gradient is read before it is overwritten): the
    chunk optimizer uses the consumed gradient shard as workspace. ``step`` is the step count
    *after* incrementing (tensor(s) on the fused path). ``grad_scale``: gradients are divided by
    it (global-norm pre-normalisation); a 0-d fp32 tensor, or None.

    With bias correction on fp32 CPU / CUDA tensors this is one ``torch._fused_adamw_`` call
    (lr = 1 and weight decay 1 turn "param" into ``0 * out - r``: the Adam direction, moments
    updated, one pass; with weight decay, ``out`` starts as a copy of ``w`` and the kernel's
    decay 1 + wd leaves ``-wd w - r``). A workspace ``out`` must hold finite values (it is
    multiplied by 0). Otherwise a multi-tensor fallback (``torch._foreach_*``). ``fused``
    forces one or the other (None: fused where it applies)."""
    if not out:
        return
    can_fuse = (
        bias_correction
        and all(t.dtype == torch.float32 for t in (*out, *grads, *exp_avg, *exp_avg_sq))
        and out[0].device.type in ("cpu", "cuda")
    )
    if can_fuse if fused is None else fused:
        steps = _step_list(step, len(out), out[0].device)
        aliased = any(o is g for o, g in zip(out, grads))
        decay = 1.0
        if weight_decay and not aliased:
            # "param" = w and weight decay 1 + wd: w * (1 - (1 + wd)) - r = -(r + wd w) in the
            # same pass; the copy costs 2 element accesses, a separate decay pass 3
            torch._foreach_copy_(out, weights)
            decay += weight_decay
        # else "param" is multiplied by 1 - 1 = 0: a workspace only needs to be finite
        torch._fused_adamw_(
            out,
            grads,
            exp_avg,
            exp_avg_sq,
            [],
            steps,
            lr=1.0,
            beta1=beta1,
            beta2=beta2,
            weight_decay=decay,
            eps=eps,
            amsgrad=False,
            maximize=False,
            grad_scale=grad_scale,
        )
        if weight_decay and aliased:
            torch._foreach_add_(out, weights, alpha=-weight_decay)
        return
    else:
        g = grads
        if grad_scale is not None:
            g = torch._foreach_div(grads, grad_scale)
        torch._foreach_lerp_(exp_avg, g, 1.0 - beta1)
        torch._foreach_mul_(exp_avg_sq, beta2)
        torch._foreach_addcmul_(exp_avg_sq, g, g, 1.0 - beta2)
        denom = torch._foreach_sqrt(exp_avg_sq)
        if bias_correction:  # per-tensor corrections as 0-d tensors: no host sync
            steps = _step_list(step, len(out), out[0].device)
            bc1 = torch._foreach_add(torch._foreach_neg(torch._foreach_pow(beta1, steps)), 1.0)
            bc2 = torch._foreach_add(torch._foreach_neg(torch._foreach_pow(beta2, steps)), 1.0)
            torch._foreach_div_(denom, torch._foreach_sqrt(bc2))
            torch._foreach_add_(denom, eps)
            r = torch._foreach_div(exp_avg, denom)
            torch._foreach_div_(r, torch._foreach_neg(bc1))
        else:
            torch._foreach_add_(denom, eps)
            r = torch._foreach_div(exp_avg, denom)
            torch._foreach_neg_(r)
        torch._foreach_copy_(out, r)
        if weight_decay:
            torch._foreach_add_(out, weights, alpha=-weight_decay)


def _step_list(step, n: int, device) -> list[torch.Tensor]:
    if isinstance(step, list):
        return [t.float() for t in step]
    t = step.float() if isinstance(step, torch.Tensor) else torch.tensor(float(step), device=device)
    return [t] * n


def lamb_trust_ratio(
    w_sq: torch.Tensor,
    u_sq: torch.Tensor,
    phi_min: float | None = None,
    phi_max: float | None = None,
    trust_clip: float | None = None,
) -> torch.Tensor:
    """``phi(||w||) / ||u||`` per column, 1 where either norm is 0 (the convention every
    implementation shares: a zero-initialised parameter still moves). ``phi`` clamps
    ``||w||`` to ``[phi_min, phi_max]`` (the paper's gamma_l, gamma_u; identity by default;
    torch-optimizer's ``clamp_value=10`` is ``phi_max=10``). ``trust_clip`` caps the ratio
    itself (timm's ``trust_clip``, LAMBC: 1.0)."""
    wn, un = w_sq.sqrt(), u_sq.sqrt()
    phi = wn.clamp(min=phi_min, max=phi_max) if (phi_min, phi_max) != (None, None) else wn
    ratio = torch.where((wn > 0) & (un > 0), phi / un, torch.ones_like(wn))
    if trust_clip is not None:
        ratio = ratio.clamp(max=trust_clip)
    return ratio


def lars_trust_ratio(
    w_sq: torch.Tensor,
    g_sq: torch.Tensor,
    trust_coefficient: float,
    weight_decay: float | torch.Tensor,
    eps: float = 0.0,
) -> torch.Tensor:
    """LARS local learning rate ``eta * ||w|| / (||g|| + wd * ||w|| + eps)`` per column
    (``||g||`` of the raw gradient, weight decay not included), 1 where a norm is 0."""
    wn, gn = w_sq.sqrt(), g_sq.sqrt()
    ratio = trust_coefficient * wn / (gn + weight_decay * wn + eps)
    return torch.where((wn > 0) & (gn > 0), ratio, torch.ones_like(wn))


def lars_apply_(
    weights: list[torch.Tensor],
    grads: list[torch.Tensor],
    bufs: list[torch.Tensor] | None,
    scale: list[torch.Tensor],
    weight_decay: float,
    momentum: float,
    nesterov: bool,
    lr_outside: float = 1.0,
) -> None:
    """``buf = momentum * buf + scale * (g + wd * w)``; ``w -= lr_outside * buf`` (Nesterov:
    ``w -= lr_outside * (scale * (g + wd * w) + momentum * buf)``). ``scale`` is one 0-d
    tensor per tensor (learning rate times trust ratio, or the trust ratio alone when the
    learning rate stays outside the buffer: ``lr_outside``). No temporaries of model size."""
    if not weights:
        return
    if momentum == 0.0 or bufs is None:  # plain SGD step: w = w * (1 - s * wd) - s * g
        neg = torch._foreach_mul(scale, -lr_outside)
        if weight_decay:
            torch._foreach_mul_(
                weights, torch._foreach_add(torch._foreach_mul(neg, weight_decay), 1.0)
            )
        torch._foreach_addcmul_(weights, grads, neg)
        return
    torch._foreach_mul_(bufs, momentum)
    torch._foreach_addcmul_(bufs, grads, scale)
    if weight_decay:
        torch._foreach_addcmul_(bufs, weights, torch._foreach_mul(scale, weight_decay))
    if nesterov:
        neg = torch._foreach_mul(scale, -lr_outside)
        if weight_decay:  # w * (1 - lr * s * wd): the decay term of this step's gradient
            torch._foreach_mul_(
                weights, torch._foreach_add(torch._foreach_mul(neg, weight_decay), 1.0)
            )
        torch._foreach_addcmul_(weights, grads, neg)
        torch._foreach_add_(weights, bufs, alpha=-lr_outside * momentum)
    else:
        torch._foreach_add_(weights, bufs, alpha=-lr_outside)
