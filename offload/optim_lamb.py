"""LAMB and LARS over chunk shards, with trust ratios of whole logical parameters.

A chunk's shard boundary may cut a parameter in two (or more) pieces held by different ranks;
``||w||`` and ``||update||`` must still be the norms of the whole parameter. The step is two-phase:

1. for every owned shard: update the moments and write the update direction (LAMB: into the
   consumed gradient shard, no extra memory; LARS: the gradient itself), then one
   ``_foreach_norm`` over the segment views (``chunk.segments``) of all shards gives each
   parameter's partial squares, summed per parameter into one ``[2, n_params]`` tensor;
2. ONE ``norm_reducer`` call (default: all-reduce over the manager's process group) completes
   every norm at once, for all chunks; then each segment is updated with its parameter's ratio.

The math is :mod:`offload.trust`, shared with ``colossus.optim.Lamb`` / ``Lars``. Weight decay
follows the manager's decay / no-decay chunks (``ChunkConfig.decay_filter``); no-decay
parameters also skip the trust ratio unless ``exclude_from_adaptation=False``. State lives in
the chunks (``exp_avg`` / ``exp_avg_sq`` / ``step``; ``momentum_buffer``) so sharded
checkpoints save it like AdamW's. The NVMe tier (sized and pipelined for AdamW) is refused.

Example::

    >>> import torch
    >>> from offload import ChunkConfig, ChunkManager
    >>> from offload.optim_lamb import ChunkLamb
    >>> mgr = ChunkManager(torch.nn.Linear(4, 4), ChunkConfig(chunk_size=32))
    >>> opt = ChunkLamb(mgr, lr=1e-2)
    >>> mgr.backward(mgr.module(torch.ones(2, 4)).sum()); opt.step()
    True
"""

from __future__ import annotations

from typing import Any

import torch

from . import trust_fused
from .chunk import Chunk
from .manager import ChunkManager
from .optim import ChunkOptimizer
from .trust import (
    NormReducer,
    column_sq_norms,
    lamb_direction_,
    lamb_trust_ratio,
    lars_apply_,
    lars_trust_ratio,
)


class ChunkTrustOptimizer(ChunkOptimizer):
    """Base of the layer-wise adaptive chunk optimizers: the two-phase step (see the module
    docstring). Subclasses implement :meth:`direction` (phase 1, per group) and :meth:`apply`
    (phase 2, per group)."""

    def __init__(
        self,
        mgr: ChunkManager,
        defaults: dict[str, Any],
        exclude_from_adaptation: bool = True,
        max_grad_norm: float | None = None,
        norm_reducer: NormReducer | None = None,
        fused: bool | None = None,
    ) -> None:
        nvme = [c.index for c in mgr.chunks if "nvme" in (c.optim_tier, c.param_tier)]
        if nvme:
            raise ValueError(
                f"{type(self).__name__}: chunks {nvme[:5]} keep optimizer state on NVMe, which is "
                "sized and pipelined for AdamW; use nvme_optim_frac=0 with LAMB / LARS"
            )
        if max_grad_norm is not None and max_grad_norm <= 0:
            raise ValueError(f"max_grad_norm must be positive or None, got {max_grad_norm}")
        defaults = {**defaults, "exclude_from_adaptation": False}
        super().__init__(mgr, defaults)
        for g in self.param_groups:
            if g["name"] == "no_decay":
                g["exclude_from_adaptation"] = exclude_from_adaptation
        self.max_grad_norm = max_grad_norm
        self.fused = fused
        self.norm_reducer = norm_reducer or (lambda sq, columns: mgr._all_reduce(sq))
        self.columns = [s.name for c in mgr.chunks if c.requires_grad for s in c.slots]
        self._col = {n: i for i, n in enumerate(self.columns)}

    def direction(self, chunks: list[Chunk], group: dict[str, Any]) -> list[torch.Tensor]:
        """Phase 1: update state, return per chunk the tensor whose norm goes in row 1."""
        raise NotImplementedError  # pragma: no cover

    def phase1(self, chunks: list[Chunk], group: dict[str, Any]) -> tuple:
        """Phase 1 of one group: ``(segs, w, d, sq, ctx)``, per segment its weight view ``w``
        and either the view ``d`` whose norm goes in row 1 (``sq`` None) or, from a fused
        kernel, its partial squares ``sq`` (``d`` None); ``ctx`` goes to :meth:`apply`.
        Default: :meth:`direction` over whole shards, norms of the segment views."""
        ds = self.direction(chunks, group)
        segs, w, d = [], [], []
        for c, dt in zip(chunks, ds):
            for s in c.segments:
                a, b = s.offset_in_shard, s.offset_in_shard + s.length
                segs.append(s)
                w.append(c.master[a:b])
                d.append(dt[a:b])
        return segs, w, d, [None] * len(segs), None

    def apply(self, chunks, group, segs, w, d, ratio, ctx=None) -> None:
        """Phase 2: update the segment views ``w`` (with ``d`` from phase 1) by ``ratio``."""
        raise NotImplementedError  # pragma: no cover

    @torch.no_grad()
    def step(self, closure: Any = None) -> bool:  # type: ignore[override]
        """Two-phase update of every owned shard; False when skipped (fp16 overflow)."""
        todo = self._begin_step(closure)
        if todo is None:
            return False
        mgr = self.mgr
        if self.max_grad_norm is not None:  # global pre-normalisation: a second all-reduce
            total = mgr.clip_grad_norm_(None)
            coef = self.max_grad_norm / total.clamp(min=self.max_grad_norm)
            torch._foreach_mul_([c.grad_shard for c in todo], coef)
        # params without a gradient this step stay untouched, as torch skips grad=None params
        saved = {}
        for c in todo:
            unused = self._unused_segments(c)
            saved[c.index] = (unused, self._save(c, unused))
        by_group: dict[int, tuple[dict[str, Any], list[Chunk]]] = {}
        for c in todo:
            g = self._group_of[c.index]
            by_group.setdefault(id(g), (g, []))[1].append(c)
        # phase 1: directions and the partial squares of every segment of every shard
        plan = []
        w_views, d_views, cols, fused_sq, fused_cols = [], [], [], [], []
        for g, cs in by_group.values():
            segs, w, d, part, ctx = self.phase1(cs, g)
            for s, wv, dv, sq2 in zip(segs, w, d, part):
                if sq2 is None:
                    w_views.append(wv)
                    d_views.append(dv)
                    cols.append(self._col[s.name])
                else:
                    fused_sq.append(sq2)
                    fused_cols.append(self._col[s.name])
            plan.append((g, cs, segs, w, d, ctx))
        if w_views:
            index = torch.tensor(cols, device=w_views[0].device)
            sq = column_sq_norms([w_views, d_views], index, len(self.columns))
        else:
            sq = torch.zeros(2, len(self.columns), device=mgr.device)
        if fused_sq:
            sq = sq.to(fused_sq[0].device)
            idx = torch.tensor(fused_cols, device=sq.device)
            sq.index_add_(1, idx, torch.stack(fused_sq, 1))
        self.norm_reducer(sq, self.columns)  # ONE collective completes every norm
        # phase 2: each segment with its whole parameter's ratio
        for g, cs, segs, w, d, ctx in plan:
            if not segs:
                continue
            idx = torch.tensor([self._col[s.name] for s in segs], device=sq.device)
            ratio = self.ratio(sq[0], sq[1], g)
            ratio = torch.ones(len(segs), device=sq.device) if ratio is None else ratio[idx]
            self.apply(cs, g, segs, w, d, ratio, ctx)
        for c in todo:
            unused, vals = saved[c.index]
            self._restore(c, unused, vals)
        mgr.after_step()
        return True

    def ratio(self, w_sq: torch.Tensor, d_sq: torch.Tensor, group) -> torch.Tensor | None:
        """Per-column trust ratio; None = 1 everywhere (excluded from adaptation)."""
        raise NotImplementedError  # pragma: no cover


class ChunkLamb(ChunkTrustOptimizer):
    """LAMB over chunk shards (options as ``colossus.optim.Lamb``; the paper's defaults).

    One ``torch._fused_adamw_`` call per param group over all its shards writes the Adam
    direction into the gradient shards (consumed: the manager frees them at ``zero_grad``)."""

    state_keys = ("exp_avg", "exp_avg_sq")

    def __init__(
        self,
        mgr: ChunkManager,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.01,
        bias_correction: bool = True,
        phi_min: float | None = None,
        phi_max: float | None = None,
        trust_clip: float | None = None,
        exclude_from_adaptation: bool = True,
        max_grad_norm: float | None = None,
        norm_reducer: NormReducer | None = None,
        fused: bool | None = None,
    ) -> None:
        super().__init__(
            mgr,
            dict(
                lr=lr,
                betas=tuple(betas),
                eps=eps,
                weight_decay=weight_decay,
                bias_correction=bias_correction,
                phi_min=phi_min,
                phi_max=phi_max,
                trust_clip=trust_clip,
            ),
            exclude_from_adaptation,
            max_grad_norm,
            norm_reducer,
            fused,
        )

    def phase1(self, chunks, group):
        """Fused path: pass 1 of :mod:`offload.trust_fused` on every large segment (moments,
        partial squares and ``d = -u`` into the consumed gradient shard in one loop); the
        small segments go through one multi-tensor :func:`lamb_direction_` call. Either way
        :meth:`apply` is then one native axpy."""
        if not chunks or not trust_fused.want_fused(self.fused, chunks[0].master.device):
            return super().phase1(chunks, group)
        mgr = self.mgr
        steps = [mgr.alloc_state(c, "step") for c in chunks]
        torch._foreach_add_(steps, 1.0)
        b1, b2 = group["betas"]
        hp = trust_fused.lamb_hparams(
            b1, b2, group["eps"], group["weight_decay"], device=chunks[0].master.device
        )
        coefs = trust_fused.lamb_bias_coefs(
            torch.stack(steps), b1, b2, group["bias_correction"]
        ).unbind()
        segs, w, d, part = [], [], [], []
        small: list[list] = [[], [], [], [], []]  # grads, m, v, w, steps
        for c, st, cf in zip(chunks, steps, coefs):
            m, v = mgr.alloc_state(c, "exp_avg"), mgr.alloc_state(c, "exp_avg_sq")
            for s in c.segments:
                a, b = s.offset_in_shard, s.offset_in_shard + s.length
                views = (c.master[a:b], c.grad_shard[a:b], m[a:b], v[a:b])
                segs.append(s)
                w.append(views[0])
                d.append(views[1])  # the gradient shard is consumed: d = -(r + wd w) into it
                if trust_fused.fusable(*views):
                    part.append(trust_fused.lamb_pass1_into_grad_(*views, hp, cf))
                else:
                    part.append(None)  # written in place below
                    for lst, x in zip(small, (views[1], views[2], views[3], views[0], st)):
                        lst.append(x)
        if small[0]:
            lamb_direction_(
                small[0],
                small[0],
                small[1],
                small[2],
                small[3],
                small[4],
                beta1=b1,
                beta2=b2,
                eps=group["eps"],
                weight_decay=group["weight_decay"],
                bias_correction=group["bias_correction"],
            )
        return segs, w, d, part, None

    def direction(self, chunks, group):
        steps = []
        for c in chunks:
            st = self.mgr.alloc_state(c, "step")
            steps.append(st)
        torch._foreach_add_(steps, 1.0)
        grads = [c.grad_shard for c in chunks]
        b1, b2 = group["betas"]
        lamb_direction_(
            grads,  # written in place: d = -(r + wd w)
            grads,
            [self.mgr.alloc_state(c, "exp_avg") for c in chunks],
            [self.mgr.alloc_state(c, "exp_avg_sq") for c in chunks],
            [c.master for c in chunks],
            steps,
            beta1=b1,
            beta2=b2,
            eps=group["eps"],
            weight_decay=group["weight_decay"],
            bias_correction=group["bias_correction"],
        )
        return grads

    def ratio(self, w_sq, d_sq, group):
        if group["exclude_from_adaptation"]:
            return None
        return lamb_trust_ratio(w_sq, d_sq, group["phi_min"], group["phi_max"], group["trust_clip"])

    def apply(self, chunks, group, segs, w, d, ratio, ctx=None) -> None:
        # every segment's gradient view holds d = -u (fused pass 1 or the multi-tensor path):
        # w += lr * ratio * d in one native call
        torch._foreach_addcmul_(w, d, list((ratio * group["lr"]).unbind()))


class ChunkLars(ChunkTrustOptimizer):
    """LARS over chunk shards (options as ``colossus.optim.Lars``; the paper's defaults)."""

    state_keys = ("momentum_buffer",)

    def __init__(
        self,
        mgr: ChunkManager,
        lr: float = 1.0,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        trust_coefficient: float = 0.001,
        eps: float = 0.0,
        nesterov: bool = False,
        larc_clip: bool = False,
        lr_inside_momentum: bool = True,
        exclude_from_adaptation: bool = True,
        max_grad_norm: float | None = None,
        norm_reducer: NormReducer | None = None,
        fused: bool | None = None,
    ) -> None:
        if nesterov and momentum == 0:
            raise ValueError("nesterov needs momentum > 0")
        super().__init__(
            mgr,
            dict(
                lr=lr,
                momentum=momentum,
                weight_decay=weight_decay,
                trust_coefficient=trust_coefficient,
                eps=eps,
                nesterov=nesterov,
                larc_clip=larc_clip,
                lr_inside_momentum=lr_inside_momentum,
            ),
            exclude_from_adaptation,
            max_grad_norm,
            norm_reducer,
            fused,
        )

    def direction(self, chunks, group):
        return [c.grad_shard for c in chunks]  # LARS: ||g|| of the raw gradient

    def ratio(self, w_sq, d_sq, group):
        if group["exclude_from_adaptation"]:
            return None
        r = lars_trust_ratio(
            w_sq, d_sq, group["trust_coefficient"], group["weight_decay"], group["eps"]
        )
        return (r / group["lr"]).clamp(max=1.0) if group["larc_clip"] else r

    def apply(self, chunks, group, segs, w, d, ratio, ctx=None) -> None:
        lr = group["lr"]
        scale, outside = (ratio * lr, 1.0) if group["lr_inside_momentum"] else (ratio, lr)
        scale = list(scale.unbind())
        bufs = None
        rest = list(range(len(w)))
        if group["momentum"]:
            full = {c.index: self.mgr.alloc_state(c, "momentum_buffer") for c in chunks}
            bufs = []
            for c in chunks:
                for s in c.segments:
                    a = s.offset_in_shard
                    bufs.append(full[c.index][a : a + s.length])
            if w and trust_fused.want_fused(self.fused, w[0].device):
                hp = trust_fused.lars_hparams(
                    group["momentum"],
                    group["weight_decay"],
                    outside,
                    group["nesterov"],
                    w[0].device,
                )
                big = [k for k in rest if trust_fused.fusable(w[k], d[k], bufs[k])]
                for k in big:
                    trust_fused.lars_apply_fused_(w[k], d[k], bufs[k], hp, scale[k])
                rest = sorted(set(rest) - set(big))
        if not rest:
            return
        lars_apply_(
            [w[k] for k in rest],
            [d[k] for k in rest],
            None if bufs is None else [bufs[k] for k in rest],
            [scale[k] for k in rest],
            group["weight_decay"],
            group["momentum"],
            group["nesterov"],
            outside,
        )
