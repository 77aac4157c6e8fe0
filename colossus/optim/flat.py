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

A parameter that backward does not reach is skipped, as on the per-tensor path where its
gradient stays None: a post-accumulate-grad hook per parameter marks the ones backward wrote
since :meth:`FlatGroup.zero_grad` (``set_to_none=True``, torch's default); the others keep their
moments and weight exactly. With ``set_to_none=False`` every parameter is stepped, a zero
gradient included (weight decay, moment decay), as in torch's optimizers. A gradient written
into ``p.grad`` in place without backward (not assigned) is not seen after a
``set_to_none=True`` zero_grad: assign it (``p.grad = g``) instead; it is then copied into its
slot.

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
    >>> b.sum().backward(); fg.adopt_grads()  # only b was reached by backward
    [1]
    >>> fg.current(), a.data_ptr() == fg.w.data_ptr(), float(b.detach().sum())
    (True, True, 8.0)
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch

from offload import trust_fused


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
        self,
        params: Sequence[torch.nn.Parameter],
        block: int,
        state: dict[Any, Any],
        keys: tuple[str, ...] = ("exp_avg", "exp_avg_sq"),
        step: bool = True,
    ) -> None:
        self.params = list(params)
        self.block = block
        self.keys = keys  # the state tensors held flat (LAMB's moments, LARS's buffer)
        self.step = step  # whether new state gets a "step" count
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
        self.bufs = {k: torch.zeros_like(self.w) for k in keys}
        self.w_views = self._views(self.w)
        self.g_views = self._views(self.g)
        self.buf_views = {k: self._views(b) for k, b in self.bufs.items()}
        # LAMB's names for its two moments
        self.m, self.v = self.bufs.get("exp_avg"), self.bufs.get("exp_avg_sq")
        with torch.no_grad():
            for p, wv, gv in zip(self.params, self.w_views, self.g_views):
                wv.copy_(p)
                p.data = wv  # the parameter object stays (module references, tied weights)
                if p.grad is not None:
                    gv.copy_(p.grad)
                    p.grad = gv
        # which parameters backward wrote since zero_grad (hooks; see the module docstring)
        self.reached = bytearray(p.grad is not None for p in self.params)
        self.skip_unreached = False  # True after zero_grad(set_to_none=True)
        hooks = [
            p.register_post_accumulate_grad_hook(_mark(self.reached, j))
            for j, p in enumerate(self.params)
            if p.requires_grad
        ]
        self._unhook = weakref.finalize(self, _remove_hooks, hooks)
        self.bind_state(state)

    def close(self) -> None:
        """Remove the hooks from the parameters (the group is no longer used)."""
        self._unhook()

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

    def zero_grad(self, set_to_none: bool = True) -> None:
        """One memset of the gradient buffer; every ``p.grad`` becomes its (zero) slot view,
        so the next backward accumulates into the buffer (no ``None`` gradients in flat mode).
        ``set_to_none``: parameters that backward then does not reach count as having no
        gradient (skipped); False: as a zero gradient."""
        self.g.zero_()
        self.reached[:] = bytes(len(self.params))
        self.skip_unreached = set_to_none
        for p, gv in zip(self.params, self.g_views):
            if p.grad is not gv:
                p.grad = gv

    def adopt_grads(self) -> list[int]:
        """Indices of the parameters with a gradient; a gradient that is not its slot view
        (backward after ``set_to_none``, or one assigned by hand) is copied into the slot and
        ``p.grad`` re-pointed there. The slots of parameters without one (None, or not reached
        by backward since ``zero_grad(set_to_none=True)``) are zeroed (their rows are skipped:
        moments untouched, update 0)."""
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
            elif self.skip_unreached and not self.reached[j]:
                gv.zero_()  # a zero view backward did not write: no gradient this step
                continue
            active.append(j)
        return active

    def bind_state(self, state: dict[Any, Any], only: Sequence[int] | None = None) -> None:
        """Make the state tensors (``keys``) views of the flat buffers: tensors held elsewhere
        (``load_state_dict``, a rebuild) are copied into the slots; parameters ``only`` that
        have no state yet get it, with zeroed slots."""
        create = set(only or ())
        for j, p in enumerate(self.params):
            st = state.get(p)
            if not st:
                if j not in create:
                    continue
                state[p] = st = {}
                if self.step:
                    st["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                for key in self.keys:
                    st[key] = self.buf_views[key][j].zero_()
                continue
            for key in self.keys:
                view, t = self.buf_views[key][j], st.get(key)
                if t is view:
                    continue
                if t is None:
                    view.zero_()
                elif t.data_ptr() != view.data_ptr():
                    view.copy_(t.reshape(view.shape))
                st[key] = view


def _mark(reached: bytearray, j: int) -> Callable[[torch.Tensor], None]:
    # the hook holds the flag array only (not the FlatGroup): no reference cycle through it
    def hook(_: torch.Tensor) -> None:
        reached[j] = 1

    return hook


def _remove_hooks(hooks: list[Any]) -> None:
    for h in hooks:
        h.remove()


class FlatMixin(torch.optim.Optimizer):
    """The flat-buffer bookkeeping shared by ``Lamb`` and ``Lars`` (``flat=True``): one
    :class:`FlatGroup` per eligible param group, built on the first step, rebuilt when its
    parameters left their slots; ``zero_grad`` and ``load_state_dict`` that keep the views.

    Example::

        >>> from colossus.optim import Lamb, Lars
        >>> issubclass(Lamb, FlatMixin) and issubclass(Lars, FlatMixin)
        True
        >>> (Lamb._flat_keys, Lars._flat_keys)
        (('exp_avg', 'exp_avg_sq'), ('momentum_buffer',))
    """

    flat: bool
    flat_block: int
    _flat: dict[int, FlatGroup]
    _flat_keys: tuple[str, ...] = ("exp_avg", "exp_avg_sq")
    _flat_step = True

    def _flat_wanted(self, group: dict[str, Any]) -> bool:
        """Whether this group's options allow the flat path (the subclass's conditions)."""
        return True

    def _flat_kernel(self) -> bool:
        """Whether the flat kernels compile here."""
        return False

    def _groups_to_step(self) -> list[tuple[dict[str, Any], list[torch.Tensor], Any, list[int]]]:
        """Per param group with gradients: ``(group, its params with a gradient, its flat
        group or None, their indices in it)``. A flat group first takes in gradients that are
        not views of its buffer and binds the state of the params it steps."""
        out = []
        fused: bool | None = None
        for gi, group in enumerate(self.param_groups):
            fg, idx = None, []
            if self.flat and group["params"]:
                if fused is None:
                    fused = trust_fused.want_fused(self.fused, group["params"][0].device)
                fg = self._flat_group(gi, group, fused)
            if fg is not None:
                idx = fg.adopt_grads()  # foreign gradients copied into the buffer
                fg.bind_state(self.state, only=idx)
                ps = [fg.params[j] for j in idx]
            else:
                ps = [p for p in group["params"] if p.grad is not None]
            if ps:
                out.append((group, ps, fg, idx))
        return out

    def _flat_group(self, gi: int, group: dict[str, Any], fused: bool) -> FlatGroup | None:
        """The flat buffers of group ``gi``, built (or rebuilt, when the parameters left their
        slots or the group changed) on demand; None = this group takes the per-tensor path."""
        ps = group["params"]
        fg = self._flat.get(gi)
        if fg is not None and fg.same_params(ps) and fg.current():
            return fg
        stale = self._flat.pop(gi, None)  # the state keeps its views (copied on a rebuild)
        if stale is not None:
            stale.close()
        if not (fused and self._flat_wanted(group) and flat_eligible(ps)):
            return None
        if not self._flat_kernel():
            return None
        fg = FlatGroup(ps, self.flat_block, self.state, self._flat_keys, self._flat_step)
        self._flat[gi] = fg
        return fg

    def _live_flat(self) -> list[FlatGroup]:
        return [
            fg
            for gi, fg in self._flat.items()
            if gi < len(self.param_groups)
            and fg.same_params(self.param_groups[gi]["params"])
            and fg.current()
        ]

    def zero_grad(self, set_to_none: bool = True) -> None:
        """As ``torch.optim.Optimizer.zero_grad``, except for the groups in flat buffers
        (``flat=True``, after the first step): their gradient buffer is zeroed in place (one
        memset) and every ``p.grad`` stays its view, whatever ``set_to_none`` says, so that
        backward accumulates into the buffer (as DDP's ``gradient_as_bucket_view``); with
        ``None`` gradients the next backward would allocate new ones, which the step then
        copies into the buffer (correct, one copy slower). A parameter that backward does not
        reach is still skipped after ``set_to_none=True`` (hooks note which ones backward wrote),
        and stepped with a zero gradient after ``set_to_none=False``, as in torch."""
        live = self._live_flat()
        if not live:
            return super().zero_grad(set_to_none)
        done = set()
        for fg in live:
            fg.zero_grad(set_to_none)
            done.update(id(p) for p in fg.params)
        for group in self.param_groups:
            for p in group["params"]:
                if id(p) in done or p.grad is None:
                    continue
                if set_to_none:
                    p.grad = None
                else:
                    if p.grad.grad_fn is not None:
                        p.grad.detach_()
                    else:
                        p.grad.requires_grad_(False)
                    p.grad.zero_()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """As ``torch.optim.Optimizer.load_state_dict``; in flat mode the loaded state tensors
        are then copied into the flat buffers and the state points at their views again."""
        super().load_state_dict(state_dict)
        for fg in self._live_flat():
            fg.bind_state(self.state)
