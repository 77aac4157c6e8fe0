"""Process topology: every process group of a (data x sequence x tensor) parallel layout, built
once on torch.distributed.

Rank layout (row-major, ``tp`` innermost): ``rank = (dp_rank * sp + sp_rank) * tp + tp_rank``.
Tensor-parallel ranks are consecutive (on a multi-GPU node they share the fastest links), then
sequence-parallel, then data-parallel. Every rank creates every group in the same order (a
torch.distributed requirement), and each group is named in :mod:`parallel.comm` (``tp``, ``sp``,
``dp``) so communication volume is counted per group.

For ``tp_mode`` 2d / 2.5d / 3d the tensor-parallel group is further arranged into a grid by
:func:`parallel.tensor.grid.build_grid` (row / column / depth groups); ``topology.grid`` holds
this rank's grid.

Example (one process, no torch.distributed: every size is 1)::

    >>> from parallel.topology import Topology
    >>> t = Topology()
    >>> (t.dp, t.tp, t.sp, t.tp_rank, t.dp_rank)
    (1, 1, 1, 0, 0)
    >>> Topology(tp=6, tp_mode="2d", world_size=6)
    Traceback (most recent call last):
    ...
    parallel.topology.TopologyError: tp_mode=2d needs tp to be a square (1, 4, 9, 16, ...); got 6 (nearest valid: 4 or 9)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch.distributed as dist

from parallel import TP_MODES, comm


class TopologyError(ValueError):
    """An impossible parallel layout; the message says what would be valid."""


def _is_power(n: int, k: int) -> int | None:
    """``q`` with ``q**k == n``, or None."""
    q = round(n ** (1.0 / k))
    for c in (q - 1, q, q + 1):
        if c >= 1 and c**k == n:
            return c
    return None


def check_tp_shape(tp: int, tp_mode: str, tp_depth: int = 1) -> None:
    """Raise :class:`TopologyError` when ``tp`` cannot be laid out in ``tp_mode``."""
    if tp_mode not in TP_MODES:
        raise TopologyError(f"tp_mode must be one of {', '.join(TP_MODES)}; got {tp_mode!r}")
    if tp < 1:
        raise TopologyError(f"tp must be >= 1; got {tp}")
    if tp_depth < 1:
        raise TopologyError(f"tp_depth must be >= 1; got {tp_depth}")
    if tp_mode != "2.5d" and tp_depth != 1:
        raise TopologyError(f"tp_depth is only used by tp_mode=2.5d; got tp_depth={tp_depth}")
    if tp_mode == "2d" and _is_power(tp, 2) is None:
        raise TopologyError(
            f"tp_mode=2d needs tp to be a square (1, 4, 9, 16, ...); got {tp}"
            + _nearest(tp, [q * q for q in range(1, 9)])
        )
    if tp_mode == "2.5d":
        if tp % tp_depth or _is_power(tp // tp_depth, 2) is None:
            valid = [q * q * tp_depth for q in range(1, 6)]
            raise TopologyError(
                f"tp_mode=2.5d needs tp = q^2 * tp_depth; got tp={tp}, tp_depth={tp_depth} "
                f"(with tp_depth={tp_depth}: tp in {valid}"
                + (
                    f"; with tp={tp}: tp_depth in "
                    f"{[d for d in range(1, tp + 1) if tp % d == 0 and _is_power(tp // d, 2)]}"
                )
                + ")"
            )
    if tp_mode == "3d" and _is_power(tp, 3) is None:
        raise TopologyError(
            f"tp_mode=3d needs tp to be a cube (1, 8, 27, 64, ...); got {tp}"
            + _nearest(tp, [q**3 for q in range(1, 6)])
        )


def _nearest(n: int, valid: list[int]) -> str:
    lo = max((v for v in valid if v < n), default=None)
    hi = min((v for v in valid if v > n), default=None)
    near = [str(v) for v in (lo, hi) if v is not None]
    return f" (nearest valid: {' or '.join(near)})" if near else ""


def _layouts(world: int, tp: int, sp: int) -> str:
    """Valid (dp, tp, sp) products for ``world`` near the one asked for."""
    ok = []
    for t in range(1, world + 1):
        if world % t:
            continue
        for s in range(1, world // t + 1):
            if (world // t) % s == 0:
                ok.append((world // (t * s), t, s))
    ok.sort(key=lambda x: (abs(x[1] - tp) + abs(x[2] - sp), x))
    return ", ".join(f"dp={d} tp={t} sp={s}" for d, t, s in ok[:6])


@dataclass
class Topology:
    """Sizes and process groups of a dp x sp x tp layout (see the module docstring).

    ``dp=None`` means "whatever the world size leaves": ``world / (tp * sp)``. ``world_size``
    defaults to torch.distributed's (1 without a process group); giving it without a process
    group only validates the shape (no groups are built), which the doctest above uses.
    """

    dp: int | None = 1
    tp: int = 1
    tp_mode: str = "1d"
    tp_depth: int = 1
    sp: int = 1
    world_size: int | None = None

    rank: int = field(init=False, default=0)
    dp_rank: int = field(init=False, default=0)
    tp_rank: int = field(init=False, default=0)
    sp_rank: int = field(init=False, default=0)
    dp_ranks: list[int] = field(init=False, default_factory=list)
    """Global ranks of this rank's data-parallel group (ordered by dp rank); likewise below."""
    tp_ranks: list[int] = field(init=False, default_factory=list)
    sp_ranks: list[int] = field(init=False, default_factory=list)
    dp_group: Any = field(init=False, default=None, repr=False)
    tp_group: Any = field(init=False, default=None, repr=False)
    sp_group: Any = field(init=False, default=None, repr=False)
    grid: Any = field(init=False, default=None, repr=False)
    """This rank's 2d / 2.5d / 3d grid (``parallel.tensor.grid``); None for 1d."""

    def __post_init__(self) -> None:
        up = dist.is_available() and dist.is_initialized()
        actual = dist.get_world_size() if up else 1
        world = self.world_size or actual
        if up and world != actual:
            raise TopologyError(f"world_size={world} but torch.distributed has {actual} ranks")
        self.world_size = world
        check_tp_shape(self.tp, self.tp_mode, self.tp_depth)
        if self.sp < 1:
            raise TopologyError(f"sp must be >= 1; got {self.sp}")
        if self.dp is None:
            if world % (self.tp * self.sp):
                raise TopologyError(
                    f"tp*sp = {self.tp * self.sp} does not divide the world size {world}; "
                    f"valid layouts: {_layouts(world, self.tp, self.sp)}"
                )
            self.dp = world // (self.tp * self.sp)
        if self.dp < 1 or self.dp * self.tp * self.sp != world:
            raise TopologyError(
                f"dp*tp*sp = {self.dp}*{self.tp}*{self.sp} = {self.dp * self.tp * self.sp} but the "
                f"world size is {world}; valid layouts: {_layouts(world, self.tp, self.sp)}"
            )
        if not up:  # one process: no groups (comm treats group None as a world of one)
            self.dp_ranks, self.tp_ranks, self.sp_ranks = [0], [0], [0]
            self.tp_rank_lists = [[0]]
            return  # world > 1 without a process group: a shape check only
        self._build_groups()

    @classmethod
    def from_world(
        cls, tp: int = 1, tp_mode: str = "1d", tp_depth: int = 1, sp: int = 1
    ) -> Topology:
        """dp = world size / (tp * sp), from torch.distributed (a world of one without it)."""
        return cls(dp=None, tp=tp, tp_mode=tp_mode, tp_depth=tp_depth, sp=sp)

    # ---- groups ---------------------------------------------------------------------------
    def rank_of(self, dp_rank: int, sp_rank: int, tp_rank: int) -> int:
        return (dp_rank * self.sp + sp_rank) * self.tp + tp_rank

    def _build_groups(self) -> None:
        dp, sp, tp = self.dp, self.sp, self.tp
        self.rank = dist.get_rank()
        self.dp_rank, rest = divmod(self.rank, sp * tp)
        self.sp_rank, self.tp_rank = divmod(rest, tp)
        tp_lists = [
            [self.rank_of(d, s, t) for t in range(tp)] for d in range(dp) for s in range(sp)
        ]
        sp_lists = [
            [self.rank_of(d, s, t) for s in range(sp)] for d in range(dp) for t in range(tp)
        ]
        dp_lists = [
            [self.rank_of(d, s, t) for d in range(dp)] for s in range(sp) for t in range(tp)
        ]
        # the same order on every rank: tp groups, then sp, then dp
        self.tp_group, self.tp_ranks = self._new_groups(tp_lists, "tp")
        self.sp_group, self.sp_ranks = self._new_groups(sp_lists, "sp")
        self.dp_group, self.dp_ranks = self._new_groups(dp_lists, "dp")
        self.tp_rank_lists = tp_lists
        if self.tp_mode != "1d":
            self.grid = self._build_grid(tp_lists)

    def _new_groups(self, lists: list[list[int]], name: str) -> tuple[Any, list[int]]:
        mine, ranks = None, []
        for ranks_ in lists:
            g = dist.new_group(ranks_)
            if self.rank in ranks_:
                mine, ranks = g, ranks_
        comm.register_group(mine, name)
        return mine, ranks

    def _build_grid(self, tp_lists: list[list[int]]) -> Any:
        try:  # the 2d / 2.5d / 3d grids live with their layers (parallel.tensor.grid)
            from parallel.tensor.grid import build_grid
        except ImportError:
            raise NotImplementedError(
                f"tp_mode={self.tp_mode}: the 2D / 2.5D / 3D grids (parallel.tensor.grid) are not "
                "available in this build; use tp_mode=1d"
            ) from None
        return build_grid(self.tp_mode, tp_lists, self.tp_depth)

    # ---- conveniences ----------------------------------------------------------------------
    @property
    def grid_side(self) -> int:
        """``q`` of a 2d (q x q), 2.5d (q x q x depth) or 3d (q x q x q) grid; ``tp`` for 1d."""
        if self.tp_mode == "1d":
            return self.tp
        if self.tp_mode == "3d":
            return _is_power(self.tp, 3) or 1
        return math.isqrt(self.tp // self.tp_depth)

    def describe(self) -> str:
        return (
            f"dp={self.dp} x sp={self.sp} x tp={self.tp} ({self.tp_mode}"
            + (f", depth {self.tp_depth}" if self.tp_mode == "2.5d" else "")
            + f"); rank {self.rank}: dp {self.dp_rank}, sp {self.sp_rank}, tp {self.tp_rank}"
        )
