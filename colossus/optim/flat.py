"""Flat parameter, gradient and moment buffers for one param group (``Lamb(flat=True)``).

A step of the fused LAMB path over many tensors pays, per tensor, a compiled call's fixed cost
(Dynamo guards, wrappers, an OpenMP fork/join: 0.1-0.4 ms on a loaded 2-core box) on top of
its memory time. Here the group's parameters live in ONE buffer laid out in blocks: each
parameter starts at a block boundary and is padded with zeros to a multiple of ``block``
elements, so the buffer is ``[rows, block]`` and every row belongs to exactly one parameter
(``owner[row]``). ``p.data`` is a view of its slot; ``p.grad`` a view of the same slot in the
gradient buffer (as DDP's ``gradient_as_bucket_view``: backward accumulates into the bucket
once the gradients are these views, which :meth:`FlatGroup.zero_grad` makes them); the moments
``exp_avg`` / ``exp_avg_sq`` of ``Optimizer.state`` are views of two more flat buffers, so
``state_dict()`` stays per parameter. Pass 1 is then one compiled call over the rows (per-row
sums of ``w^2`` and ``u^2`` taken in the same loop), the per-parameter norms a segment sum of
the row sums, and pass 2 one native ``addcmul_`` with a per-row scale.

The padding stays zero: its gradient is never written (backward writes the views, a foreign
gradient is copied into its slot only), so its moments and update are 0 (``eps > 0``, which the
optimizer checks) and its weight stays 0.

Example::

    >>> import torch
    >>> from colossus.optim.flat import FlatGroup
    >>> a, b = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.full((2, 2), 2.0))
    >>> fg = FlatGroup([a, b], block=2, state={})
    >>> fg.w.shape, fg.owner.tolist()  # a: 2 rows (1 padding element), b: 2 rows
    (torch.Size([4, 2]), [0, 0, 1, 1])
    >>> fg.zero_grad(); a.grad.data_ptr() == fg.g.data_ptr()
    True
    >>> fg.current(), a.data_ptr() == fg.w.data_ptr(), float(b.sum())
    (True, True, 8.0)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


def flat_eligible(params: Sequence[torch.Tensor]) -> bool:
    """Parameters one flat group can hold: plain fp32 tensors (no tensor subclass such as
    DTensor), contiguous, on one device, none empty."""
    if not params:
        return False
    dev = params[0].device
    return all(
        type(p) in (torch.Tensor, torch.nn.Parameter)
        and p.dtype == torch.float32
        and p.device == dev
        and p.is_contiguous()
        and p.numel() > 0
        and (p.grad is None or not p.grad.is_sparse)
        for p in params
    )


class FlatGroup:
    """The flat buffers of one param group; building it moves every parameter's values (and
    gradient, and any moments already in ``state``) into its slot and points ``p.data`` (and
    ``p.grad``, the state's ``exp_avg`` / ``exp_avg_sq``) at the slot views."""

    def __init__(
        self, params: Sequence[torch.nn.Parameter], block: int, state: dict[Any, Any]
    ) -> None:
        self.params = list(params)
        self.block = block
        dev = self.params[0].device
        rows = [-(-p.numel() // block) for p in self.params]
        self.starts: list[int] = []
        r = 0
        for n in rows:
            self.starts.append(r * block)
            r += n
        self.rows = r
        self.owner = torch.repeat_interleave(
            torch.arange(len(rows), device=dev), torch.tensor(rows, device=dev)
        )
        self.w = torch.zeros(r, block, device=dev)
        self.g = torch.zeros_like(self.w)
        self.m = torch.zeros_like(self.w)
        self.v = torch.zeros_like(self.w)
        self.w_views = self._views(self.w)
        self.g_views = self._views(self.g)
        self.m_views = self._views(self.m)
        self.v_views = self._views(self.v)
        with torch.no_grad():
            for p, wv, gv in zip(self.params, self.w_views, self.g_views):
                wv.copy_(p)
                p.data = wv  # the parameter object stays (module references, tied weights)
                if p.grad is not None:
                    gv.copy_(p.grad)
                    p.grad = gv
        self.bind_state(state)

    def _views(self, buf: torch.Tensor) -> list[torch.Tensor]:
        flat = buf.view(-1)
        return [flat[s : s + p.numel()].view(p.shape) for p, s in zip(self.params, self.starts)]

    def current(self) -> bool:
        """Whether every parameter still lives in its slot (False after ``model.to(...)`` to
        another device or dtype, or ``p.data = ...``: the owner then rebuilds or falls back)."""
        return all(
            p.data_ptr() == wv.data_ptr() and p.shape == wv.shape and p.dtype == wv.dtype
            for p, wv in zip(self.params, self.w_views)
        )

    def same_params(self, params: Sequence[torch.Tensor]) -> bool:
        return len(params) == len(self.params) and all(a is b for a, b in zip(params, self.params))

    def zero_grad(self) -> None:
        """One memset of the gradient buffer; every ``p.grad`` becomes its (zero) slot view,
        so the next backward accumulates into the buffer (no ``None`` gradients in flat mode)."""
        self.g.zero_()
        for p, gv in zip(self.params, self.g_views):
            if p.grad is not gv:
                p.grad = gv

    def adopt_grads(self) -> list[int]:
        """Indices of the parameters with a gradient; a gradient that is not its slot view
        (backward after ``set_to_none``, or one assigned by hand) is copied into the slot and
        ``p.grad`` re-pointed there. The slots of parameters without one are zeroed (their
        rows are skipped: moments untouched, update 0)."""
        active = []
        for j, (p, gv) in enumerate(zip(self.params, self.g_views)):
            g = p.grad
            if g is None:
                gv.zero_()
                continue
            if g.is_sparse:
                raise RuntimeError("Lamb does not support sparse gradients")
            if g is not gv and (g.data_ptr() != gv.data_ptr() or g.shape != gv.shape):
                gv.copy_(g)
                p.grad = gv
            active.append(j)
        return active

    def bind_state(self, state: dict[Any, Any], only: Sequence[int] | None = None) -> None:
        """Make the moments of ``state`` views of the flat buffers: moments held elsewhere
        (``load_state_dict``, a rebuild) are copied into the slots, a parameter without state
        gets zeroed slots when its state is created (``only``: create it for these)."""
        create = set(only or ())
        for j, p in enumerate(self.params):
            st = state.get(p)
            mv, vv = self.m_views[j], self.v_views[j]
            if not st:
                if j not in create:
                    continue
                mv.zero_()
                vv.zero_()
                state[p] = st = {"step": torch.zeros((), dtype=torch.float32, device=p.device)}
                st["exp_avg"], st["exp_avg_sq"] = mv, vv
                continue
            for key, view in (("exp_avg", mv), ("exp_avg_sq", vv)):
                t = st.get(key)
                if t is view:
                    continue
                if t is None:
                    view.zero_()
                elif t.data_ptr() != view.data_ptr():
                    view.copy_(t.reshape(view.shape))
                st[key] = view
