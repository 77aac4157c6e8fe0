"""LayerNorm on the 2d, 2.5d and 3d grids (Optimus 2104.05343, Tesseract 2105.14500, 3D
2105.14450): the hidden dimension is split over the layout's hidden axis, so the row statistics
are all-reduced over it.

Forward: all-reduce the row sums (mean), then the row sums of squared deviations (variance; two
passes, no ``E[x^2] - E[x]^2`` cancellation). Backward, for ``g = dL/dx_hat``:
``dx = rstd (g - mean(g) - x_hat mean(g x_hat))``, the two means in one all-reduce. ``gamma`` and
``beta`` hold this rank's 1/tp (their hidden block, split over the row axes): all-gathered in
forward, gradients reduce-scattered. Bytes per rank per forward + backward, ``m`` rows here,
hidden ``H`` over ``q``, ``R = tp / q`` row parts::

    2 (q-1)/q (m + m + 2 m) + 2 (R-1) 2 H / tp      (elements; times the element size)

Example (a world of one)::

    >>> import torch
    >>> from parallel.tensor import LayerNorm2D, build_grid, split_input, gather_output
    >>> grid = build_grid("2d", [[0]])
    >>> full = torch.nn.LayerNorm(8)
    >>> x = torch.randn(2, 3, 8)
    >>> y = LayerNorm2D.from_full(full, grid)(split_input(x, grid))
    >>> torch.allclose(gather_output(y, grid), full(x), atol=1e-6)
    True
"""

from __future__ import annotations

import torch
from torch import nn

from parallel import comm
from parallel.tensor.grid import Axis, Grid, Layout
from parallel.tensor.grid_ops import block, gather, gather_axes, gather_param, shard_index


class _NormalizeFn(torch.autograd.Function):
    """``x_hat = (x - mean) / sqrt(var + eps)`` over a hidden dimension split over ``hidden``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, hidden: Axis, n: int, eps: float) -> torch.Tensor:
        ctx.dtype = x.dtype
        x = x.float()  # statistics in fp32 under bf16 / fp16 autocast-free mixed precision
        s = x.sum(-1, keepdim=True)
        comm.all_reduce(s, group=hidden.group)
        xc = x - s / n
        v = (xc * xc).sum(-1, keepdim=True)
        comm.all_reduce(v, group=hidden.group)
        rstd = torch.rsqrt(v / n + eps)
        x_hat = xc * rstd
        ctx.save_for_backward(x_hat, rstd)
        ctx.hidden, ctx.n = hidden, n
        return x_hat.to(ctx.dtype)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        x_hat, rstd = ctx.saved_tensors
        g = g.float()
        st = torch.cat([g.sum(-1, keepdim=True), (g * x_hat).sum(-1, keepdim=True)], -1)
        comm.all_reduce(st, group=ctx.hidden.group)
        st = st / ctx.n
        dx = rstd * (g - st[..., :1] - x_hat * st[..., 1:])
        return dx.to(ctx.dtype), None, None, None


class GridLayerNorm(nn.Module):
    """``nn.LayerNorm(H)`` over the last dimension of a grid activation (see module docstring)."""

    mode: str = ""

    def __init__(
        self,
        normalized_shape: int,
        grid: Grid,
        eps: float = 1e-5,
        elementwise_affine: bool = True,
        bias: bool = True,
        layout: str = "a",
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if grid.mode != self.mode:
            raise ValueError(f"{type(self).__name__} needs a {self.mode} grid; got {grid.mode}")
        if normalized_shape % grid.tp:
            raise ValueError(
                f"{type(self).__name__}: hidden size {normalized_shape} must be divisible by "
                f"tp={grid.tp} (the affine parameters are split 1/tp per rank)"
            )
        self.normalized_shape, self.eps, self.grid, self.layout = (
            normalized_shape,
            eps,
            grid,
            layout,
        )
        self.lay: Layout = grid.layout(layout)
        kw = {"dtype": dtype, "device": device}
        n = normalized_shape // grid.tp
        self.weight = nn.Parameter(torch.ones(n, **kw)) if elementwise_affine else None
        self.bias = nn.Parameter(torch.zeros(n, **kw)) if elementwise_affine and bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _NormalizeFn.apply(x, self.lay.hidden, self.normalized_shape, self.eps)
        params = [p for p in (self.weight, self.bias) if p is not None]
        if not params:
            return y
        # gamma and beta travel in one all-gather
        full = gather_param(torch.stack(params), gather_axes(self.lay.rows), dim=1)
        y = y * full[0]
        return y + full[1] if self.bias is not None else y

    def _shard(self, v: torch.Tensor) -> torch.Tensor:
        v = block(v, 0, self.lay.hidden.size, self.lay.hidden.index, "LayerNorm weight")
        return block(v, 0, *shard_index(self.lay.rows))

    @classmethod
    def from_full(cls, ln: nn.LayerNorm, grid: Grid, layout: str = "a") -> GridLayerNorm:
        """This rank's shard of ``ln`` (a LayerNorm over the last dimension only)."""
        if len(ln.normalized_shape) != 1:
            raise ValueError(f"only LayerNorm over one dimension; got {ln.normalized_shape}")
        w = ln.weight
        m = cls(
            ln.normalized_shape[0],
            grid,
            eps=ln.eps,
            elementwise_affine=w is not None,
            bias=ln.bias is not None,
            layout=layout,
            dtype=w.dtype if w is not None else None,
            device=w.device if w is not None else None,
        )
        with torch.no_grad():
            for mine, full in ((m.weight, ln.weight), (m.bias, ln.bias)):
                if mine is not None:
                    mine.copy_(m._shard(full.detach()))
        return m

    @torch.no_grad()
    def _full(self, p: torch.Tensor | None) -> torch.Tensor | None:
        if p is None:
            return None
        v = gather(p.detach(), gather_axes(self.lay.rows), dim=0)
        return gather(v, [self.lay.hidden], dim=0)

    def full_weight(self) -> torch.Tensor | None:
        """The full ``gamma`` on every rank (collective)."""
        return self._full(self.weight)

    def full_bias(self) -> torch.Tensor | None:
        """The full ``beta`` on every rank (collective)."""
        return self._full(self.bias)

    def extra_repr(self) -> str:
        return f"{self.normalized_shape}, eps={self.eps}, layout={self.layout!r}, tp={self.grid.tp}"


class LayerNorm2D(GridLayerNorm):
    """LayerNorm on a 2d grid (Optimus)."""

    mode = "2d"


class LayerNorm2p5D(GridLayerNorm):
    """LayerNorm on a 2.5d grid (Tesseract)."""

    mode = "2.5d"


class LayerNorm3D(GridLayerNorm):
    """LayerNorm on a 3d grid, in layout "a" or "b"."""

    mode = "3d"


class _RMSNormalizeFn(torch.autograd.Function):
    """``x_hat = x / sqrt(mean(x^2) + eps)`` over a hidden dimension split over ``hidden``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, hidden: Axis, n: int, eps: float) -> torch.Tensor:
        ctx.dtype = x.dtype
        x = x.float()
        ss = (x * x).sum(-1, keepdim=True)
        comm.all_reduce(ss, group=hidden.group)
        rstd = torch.rsqrt(ss / n + eps)
        x_hat = x * rstd
        ctx.save_for_backward(x_hat, rstd)
        ctx.hidden, ctx.n = hidden, n
        return x_hat.to(ctx.dtype)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        x_hat, rstd = ctx.saved_tensors
        g = g.float()
        m = (g * x_hat).sum(-1, keepdim=True)
        comm.all_reduce(m, group=ctx.hidden.group)
        return (rstd * (g - x_hat * m / ctx.n)).to(ctx.dtype), None, None, None


class GridRMSNorm(nn.Module):
    """RMSNorm (``nn.RMSNorm``, Llama's ``LlamaRMSNorm``) on any grid: one all-reduce of the row
    sums of squares over the hidden axis in forward, one in backward; the weight split 1/tp
    like :class:`GridLayerNorm`'s.

    Example (a world of one)::

        >>> import torch
        >>> from parallel.tensor import GridRMSNorm, build_grid
        >>> full = torch.nn.RMSNorm(8, eps=1e-6)
        >>> x = torch.randn(2, 8)
        >>> torch.allclose(GridRMSNorm.from_full(full, build_grid("3d", [[0]]))(x), full(x))
        True
    """

    def __init__(
        self,
        normalized_shape: int,
        grid: Grid,
        eps: float = 1e-6,
        layout: str = "a",
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if normalized_shape % grid.tp:
            raise ValueError(
                f"GridRMSNorm: hidden size {normalized_shape} must be divisible by tp={grid.tp}"
            )
        self.normalized_shape, self.eps, self.grid, self.layout = (
            normalized_shape,
            eps,
            grid,
            layout,
        )
        self.lay: Layout = grid.layout(layout)
        self.weight = nn.Parameter(
            torch.ones(normalized_shape // grid.tp, dtype=dtype, device=device)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _RMSNormalizeFn.apply(x, self.lay.hidden, self.normalized_shape, self.eps)
        return y * gather_param(self.weight, gather_axes(self.lay.rows))

    @classmethod
    def from_full(cls, norm: nn.Module, grid: Grid, layout: str = "a") -> GridRMSNorm:
        """From ``nn.RMSNorm`` or any RMSNorm with ``weight`` and ``eps`` / ``variance_epsilon``
        (``eps=None`` in ``nn.RMSNorm`` means the dtype's machine epsilon, as there)."""
        w = norm.weight.detach()
        eps = getattr(norm, "eps", None)
        if eps is None:
            eps = getattr(norm, "variance_epsilon", None)
        if eps is None:
            eps = torch.finfo(w.dtype).eps
        m = cls(w.shape[-1], grid, eps=eps, layout=layout, dtype=w.dtype, device=w.device)
        with torch.no_grad():
            v = block(w, 0, m.lay.hidden.size, m.lay.hidden.index, "RMSNorm weight")
            m.weight.copy_(block(v, 0, *shard_index(m.lay.rows)))
        return m

    @torch.no_grad()
    def full_weight(self) -> torch.Tensor:
        """The full weight on every rank (collective)."""
        v = gather(self.weight.detach(), gather_axes(self.lay.rows), dim=0)
        return gather(v, [self.lay.hidden], dim=0)

    def extra_repr(self) -> str:
        return f"{self.normalized_shape}, eps={self.eps}, layout={self.layout!r}, tp={self.grid.tp}"


__all__ = ["GridLayerNorm", "GridRMSNorm", "LayerNorm2D", "LayerNorm2p5D", "LayerNorm3D"]
