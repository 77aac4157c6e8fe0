"""The pure math of PPO for language models (no models, no I/O): per-token KL-penalised
rewards, generalised advantage estimation, the clipped policy and value losses, whitening, an
adaptive KL coefficient and running reward statistics. Written out here rather than taken from
a library because each is a few lines whose exact conventions (masking, where the score lands,
the value-clip form) the tests pin against hand-computed numbers.

Conventions: tensors are ``[B, T]`` over response tokens; ``mask`` is 1 on real response tokens
(a prefix of each row). References: Schulman et al. 2017 (PPO), 2015 (GAE); Ziegler et al. 2019
(KL penalty and adaptive controller).

Example::

    >>> import torch
    >>> r = torch.tensor([[0.0, 0.0, 1.0]]); v = torch.tensor([[0.5, 0.5, 0.5]])
    >>> adv, ret = gae(r, v, torch.ones(1, 3), gamma=1.0, lam=1.0)
    >>> adv.tolist()
    [[0.5, 0.5, 0.5]]
"""

from __future__ import annotations

import torch


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Zero mean, unit (population) variance over the masked entries; 0 elsewhere."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    return (x - mean) * torch.rsqrt(var + eps) * mask


def kl_penalized_rewards(
    score: torch.Tensor,
    logp: torch.Tensor,
    ref_logp: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rewards ``[B, T]``, per-token KL ``[B, T]``): ``-kl_coef * (logp - ref_logp)`` on every
    response token, plus the sequence ``score`` ``[B]`` on its last token."""
    kl = (logp - ref_logp) * mask
    rewards = -kl_coef * kl
    last = (torch.arange(mask.shape[1], device=mask.device) * mask.long()).argmax(-1)
    rewards[torch.arange(mask.shape[0]), last] += score
    return rewards, kl


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, returns): ``delta_t = r_t + gamma V_{t+1} - V_t`` (V past the end = 0),
    ``A_t = delta_t + gamma lam A_{t+1}``, returns = A + V; masked positions are 0."""
    values = values * mask
    adv = torch.zeros_like(rewards)
    last = torch.zeros_like(rewards[:, 0])
    T = rewards.shape[1]
    for t in reversed(range(T)):
        nxt = values[:, t + 1] if t + 1 < T else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * nxt - values[:, t]
        last = (delta + gamma * lam * last) * mask[:, t]
        adv[:, t] = last
    return adv, (adv + values) * mask


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    adv: torch.Tensor,
    mask: torch.Tensor,
    clip: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, clip fraction, approximate KL to the rollout policy): the clipped surrogate
    ``mean(max(-A r, -A clip(r, 1-eps, 1+eps)))`` with ``r = exp(logp - old_logp)``."""
    log_ratio = logp - old_logp
    ratio = torch.exp(log_ratio)
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - clip, 1.0 + clip)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    clip_frac = masked_mean((clipped > unclipped).float(), mask)
    approx_kl = masked_mean(0.5 * log_ratio**2, mask)
    return loss, clip_frac, approx_kl


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip: float | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, clip fraction): ``0.5 * mean(max((V - R)^2, (V_clip - R)^2))`` with
    ``V_clip = V_old + clip(V - V_old, -c, c)``; plain ``0.5 * mean((V - R)^2)`` if clip is None."""
    err = (values - returns) ** 2
    if clip is None:
        return 0.5 * masked_mean(err, mask), torch.zeros(())
    v_clip = old_values + torch.clamp(values - old_values, -clip, clip)
    err_clip = (v_clip - returns) ** 2
    return 0.5 * masked_mean(torch.maximum(err, err_clip), mask), masked_mean(
        (err_clip > err).float(), mask
    )


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """``[B, T]`` entropy of the softmax over the last dimension."""
    logp = torch.log_softmax(logits.float(), -1)
    return -(logp.exp() * logp).sum(-1)


class AdaptiveKL:
    """Ziegler et al. 2019: ``coef *= 1 + clip(kl / target - 1, -0.2, 0.2) * n / horizon``."""

    def __init__(self, coef: float, target: float | None, horizon: int) -> None:
        self.coef, self.target, self.horizon = coef, target, horizon

    def update(self, kl: float, n_samples: int) -> float:
        if self.target is not None:
            err = min(max(kl / self.target - 1.0, -0.2), 0.2)
            self.coef *= 1.0 + err * n_samples / self.horizon
        return self.coef


class RunningMoments:
    """Mean and std of every value seen so far (Chan et al.'s parallel update)."""

    def __init__(self) -> None:
        self.n, self.mean, self.m2 = 0, 0.0, 0.0

    def update(self, x: torch.Tensor) -> tuple[float, float]:
        n = x.numel()
        mean = float(x.mean())
        m2 = float(((x - mean) ** 2).sum())
        tot = self.n + n
        delta = mean - self.mean
        self.mean += delta * n / tot
        self.m2 += m2 + delta**2 * self.n * n / tot
        self.n = tot
        return self.mean, self.std

    @property
    def std(self) -> float:
        return (self.m2 / max(self.n - 1, 1)) ** 0.5 if self.n > 1 else 1.0
