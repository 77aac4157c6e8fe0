"""Chunk optimizers: one fused kernel call per owned shard, on the tier that holds its state.

The optimizer holds no tensors of its own: the fp32 master shard, gradient shard and state of
each chunk live in the :class:`~offload.chunk.Chunk` (so the manager accounts, saves and moves
them). Subclasses implement :meth:`ChunkOptimizer.update_shard`; an optimizer that needs
per-parameter quantities (LAMB/LARS trust ratios) reads ``chunk.segments`` (name, offset in
shard, length, offset in param), sums partial squares per parameter and all-reduces them, since
a parameter may straddle shards.

Example::

    >>> import torch
    >>> from offload import ChunkAdamW, ChunkConfig, ChunkManager
    >>> mgr = ChunkManager(torch.nn.Linear(4, 4), ChunkConfig(chunk_size=32))
    >>> opt = ChunkAdamW(mgr, lr=1e-3)
    >>> mgr.backward(mgr.module(torch.ones(2, 4)).sum()); opt.step()
    True
"""

from __future__ import annotations

from typing import Any

import torch

from .chunk import Chunk
from .manager import ChunkManager


class ChunkOptimizer(torch.optim.Optimizer):
    """Base: param groups ``decay`` / ``no_decay``, so torch LR schedulers work unchanged (they
    set ``group["lr"]``). A group's params are one empty token tensor per chunk: the shards
    themselves may live on NVMe between steps. Subclasses list their per-element fp32 state
    tensors in ``state_keys`` (so NVMe chunks get a home for them)."""

    state_keys: tuple[str, ...] = ()

    def __init__(self, mgr: ChunkManager, defaults: dict[str, Any]) -> None:
        self.mgr = mgr
        self._tokens: dict[int, torch.Tensor] = {}
        groups: list[dict[str, Any]] = []
        for decay in (True, False):
            tokens = []
            for c in mgr.chunks:
                if c.requires_grad and c.decay == decay:
                    tokens.append(self._tokens.setdefault(c.index, torch.empty(0)))
            if tokens:
                g: dict[str, Any] = {"params": tokens, "name": "decay" if decay else "no_decay"}
                if not decay:
                    g["weight_decay"] = 0.0
                groups.append(g)
        if not groups:
            raise ValueError("the manager has no trainable chunks")
        super().__init__(groups, defaults)
        self._group_of = {
            c.index: g
            for g in self.param_groups
            for c in mgr.chunks
            if c.index in self._tokens and any(t is self._tokens[c.index] for t in g["params"])
        }
        mgr.declare_state(self.state_keys)

    def update_shard(self, c: Chunk, group: dict[str, Any]) -> None:  # pragma: no cover
        raise NotImplementedError

    def _begin_step(self, closure: Any) -> list[Chunk] | None:
        """Shared prologue of a step: reduced, unscaled gradients; None when fp16 overflowed
        (the step is skipped and the loss scale lowered), else the chunks to update: those
        with a gradient (like torch, no update without one)."""
        if closure is not None:
            raise ValueError("closures are not supported")
        mgr = self.mgr
        mgr._prepare_grads()
        if mgr.scaler is not None:
            found = mgr.found_inf()
            mgr.scaler.update(found)
            if found:
                mgr.after_step()
                return None
        return [c for c in mgr.chunks if c.index in self._group_of and mgr.has_grad(c)]

    @torch.no_grad()
    def step(self, closure: Any = None) -> bool:  # type: ignore[override]
        """Update every owned shard; returns False when the step was skipped (fp16 overflow)."""
        todo = self._begin_step(closure)
        if todo is None:
            return False
        mgr = self.mgr
        # chunks without a gradient are not even swapped in; NVMe state is read ahead and
        # written behind
        for c in mgr.optim_pass(todo):
            unused = self._unused_segments(c)
            saved = self._save(c, unused)
            self.update_shard(c, self._group_of[c.index])
            self._restore(c, unused, saved)
        mgr.after_step()
        return True

    def _unused_segments(self, c: Chunk) -> list:
        """Segments of ``c``'s shard whose parameter got no gradient this step."""
        without = {s.name for s in c.slots if not s.has_grad}
        return [g for g in c.segments if g.name in without]

    def _save(self, c: Chunk, segs) -> list[list[torch.Tensor]]:
        # params with no gradient this step are left untouched, as torch skips grad=None params
        # (weight decay and moment decay would otherwise move them)
        ts = [c.master, *[t for t in c.optim_state.values() if t.ndim]]
        return [
            [t[g.offset_in_shard : g.offset_in_shard + g.length].clone() for t in ts] for g in segs
        ]

    def _restore(self, c: Chunk, segs, saved) -> None:
        if not segs:
            return
        ts = [c.master, *[t for t in c.optim_state.values() if t.ndim]]
        for g, vals in zip(segs, saved):
            for t, v in zip(ts, vals):
                if v.numel() == g.length:
                    t[g.offset_in_shard : g.offset_in_shard + g.length].copy_(v)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.mgr.zero_grad()


class ChunkAdamW(ChunkOptimizer):
    """AdamW over flat fp32 master shards: one ``torch._fused_adamw_`` call per shard.

    Same math as ``torch.optim.AdamW(fused=True)`` with param groups {ndim >= 2: weight_decay,
    else: 0} (the manager's ``decay_filter``). The step counter is per shard: it can differ from
    torch's per-parameter counter only for parameters that are unused in some steps.
    """

    def __init__(
        self,
        mgr: ChunkManager,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
    ) -> None:
        super().__init__(mgr, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})

    state_keys = ("exp_avg", "exp_avg_sq")

    def update_shard(self, c: Chunk, group: dict[str, Any]) -> None:
        m = c.master
        assert m is not None and c.grad_shard is not None
        ea = self.mgr.alloc_state(c, "exp_avg")
        eas = self.mgr.alloc_state(c, "exp_avg_sq")
        step = self.mgr.alloc_state(c, "step")
        step += 1  # torch's fused path increments before the kernel
        beta1, beta2 = group["betas"]
        torch._fused_adamw_(
            [m],
            [c.grad_shard],
            [ea],
            [eas],
            [],
            [step],
            lr=group["lr"],
            beta1=beta1,
            beta2=beta2,
            weight_decay=group["weight_decay"],
            eps=group["eps"],
            amsgrad=False,
            maximize=False,
        )
