"""What the grid linear layers (2d, 2.5d, 3d) share: how the weight and bias are sharded, built
from a full ``nn.Linear`` and gathered back. Each mode supplies the matmul with its collectives.

The weight is kept in math layout ``W = linear.weight.T`` (``in x out``): dimension 0 is split
over ``w_axes0`` (outermost first), dimension 1 over ``w_axes1``. The bias is split like the
hidden dimension of the output: its block of the output's hidden axis, further split over the
output layout's row axes (1/tp per rank in every mode).

``parts``: the output features are ``parts`` packed blocks (a fused q|k|v projection); each is
split over the output's hidden axis separately, so a rank's output block holds a slice of every
part (whole heads of q, k and v when the head count divides by the axis size).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from parallel.tensor.grid import Axis, Grid, Layout
from parallel.tensor.grid_ops import block, gather, gather_axes, gather_param, shard_index


class GridLinear(nn.Module):
    """Base of :class:`~parallel.tensor.linear_2d.Linear2D`, ``Linear2p5D`` and ``Linear3D``."""

    mode: str = ""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        grid: Grid,
        bias: bool = True,
        layout: str = "a",
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        parts: int = 1,
    ) -> None:
        super().__init__()
        if grid.mode != self.mode:
            raise ValueError(f"{type(self).__name__} needs a {self.mode} grid; got {grid.mode}")
        self.in_features, self.out_features = in_features, out_features
        self.grid, self.layout, self.parts = grid, layout, parts
        self.in_layout: Layout = grid.layout(layout)
        self.out_layout: Layout = grid.layout(self.output_layout_name)
        p0, _ = shard_index(self.w_axes0)
        p1, _ = shard_index(self.w_axes1)
        pb, _ = shard_index(self.b_axes)
        name = type(self).__name__
        for n, div, what in (
            (in_features, p0, "in_features"),
            (out_features, p1 * parts, "out_features" + (f" ({parts} parts)" if parts > 1 else "")),
            (in_features, self.in_layout.hidden.size, "in_features"),
        ):
            if n % div:
                raise ValueError(
                    f"{name}: {what}={n} must be divisible by {div} on a {grid.mode} grid "
                    f"of {grid.tp} ranks (q={grid.q})"
                )
        if bias and out_features % (p1 * pb):
            raise ValueError(
                f"{name}: out_features={out_features} must be divisible by {p1 * pb} "
                f"(tp={grid.tp}) to shard the bias"
            )
        kw = {"dtype": dtype, "device": device}
        self.weight = nn.Parameter(torch.empty(in_features // p0, out_features // p1, **kw))
        self.bias = nn.Parameter(torch.empty(out_features // (p1 * pb), **kw)) if bias else None
        # nn.Linear's default init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weight and bias
        bound = 1 / math.sqrt(in_features)
        with torch.no_grad():
            self.weight.uniform_(-bound, bound)
            if self.bias is not None:
                self.bias.uniform_(-bound, bound)

    # ---- what a mode defines -----------------------------------------------------------------

    @property
    def output_layout_name(self) -> str:
        return self.layout

    @property
    def w_axes0(self) -> tuple[Axis, ...]:
        raise NotImplementedError

    @property
    def w_axes1(self) -> tuple[Axis, ...]:
        return (self.out_layout.hidden,)

    @property
    def b_axes(self) -> tuple[Axis, ...]:
        return self.out_layout.rows

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    # ---- shared ------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.matmul(x)
        if self.bias is not None:
            y = y + gather_param(self.bias, gather_axes(self.b_axes))
        return y

    @classmethod
    def from_full(
        cls, linear: nn.Linear, grid: Grid, layout: str = "a", parts: int = 1
    ) -> GridLinear:
        """This rank's shard of ``linear`` (the same full layer on every rank)."""
        m = cls(
            linear.in_features,
            linear.out_features,
            grid,
            bias=linear.bias is not None,
            layout=layout,
            dtype=linear.weight.dtype,
            device=linear.weight.device,
            parts=parts,
        )
        with torch.no_grad():
            m.weight.copy_(m.shard_weight(linear.weight.detach().t()))
            if linear.bias is not None:
                m.bias.copy_(m.shard_bias(linear.bias.detach()))
        return m

    def _pack(self, t: torch.Tensor, dim: int, undo: bool = False) -> torch.Tensor:
        """Output features ``[p0 | p1 | ...]`` <-> ``[p0_0 p1_0 ... | p0_1 p1_1 ... | ...]`` (the
        ``q`` blocks of the output's hidden axis each hold a slice of every part)."""
        n = self.w_axes1[0].size if self.w_axes1 else 1
        if self.parts == 1 or n == 1:
            return t
        t = t.movedim(dim, 0)
        shape = (n, self.parts) if undo else (self.parts, n)
        t = t.reshape(*shape, -1, *t.shape[1:]).transpose(0, 1).reshape(t.shape)
        return t.movedim(0, dim).contiguous()

    def shard_weight(self, w: torch.Tensor) -> torch.Tensor:
        """This rank's shard of a full ``in x out`` weight."""
        p0, i0 = shard_index(self.w_axes0)
        p1, i1 = shard_index(self.w_axes1)
        return block(block(self._pack(w, 1), 0, p0, i0), 1, p1, i1)

    def shard_bias(self, b: torch.Tensor) -> torch.Tensor:
        p1, i1 = shard_index(self.w_axes1)
        pb, ib = shard_index(self.b_axes)
        return block(block(self._pack(b, 0), 0, p1, i1), 0, pb, ib)

    @torch.no_grad()
    def full_weight(self) -> torch.Tensor:
        """The full weight in ``nn.Linear`` layout ``(out, in)``, on every rank (collective)."""
        w = gather(self.weight.detach(), gather_axes(self.w_axes0), dim=0)
        w = gather(w, gather_axes(self.w_axes1), dim=1)
        return self._pack(w, 1, undo=True).t().contiguous()

    @torch.no_grad()
    def full_bias(self) -> torch.Tensor | None:
        if self.bias is None:
            return None
        b = gather(self.bias.detach(), gather_axes(self.b_axes), dim=0)
        return self._pack(gather(b, gather_axes(self.w_axes1), dim=0), 0, undo=True)

    def to_full(self) -> nn.Linear:
        """A plain ``nn.Linear`` with the gathered weights (collective)."""
        w, b = self.full_weight(), self.full_bias()
        lin = nn.Linear(self.in_features, self.out_features, bias=b is not None)
        lin.to(dtype=w.dtype, device=w.device)
        with torch.no_grad():
            lin.weight.copy_(w)
            if b is not None:
                lin.bias.copy_(b)
        return lin

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, layout={self.layout!r}, tp={self.grid.tp}"
            + (f", parts={self.parts}" if self.parts > 1 else "")
        )


__all__ = ["GridLinear"]
