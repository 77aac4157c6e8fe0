"""Process grids of the multi-dimensional tensor-parallel modes: ``2d`` (Optimus, q x q),
``2.5d`` (Tesseract, q x q x depth) and ``3d`` (Bian et al. 2105.14450, q x q x q).

:func:`build_grid` is called on every rank with the global rank lists of *all* tensor-parallel
groups; it creates every sub-group (``dist.new_group`` is collective over the world, so every
rank creates every group in the same order) and returns this rank's grid. Within a tp group the
ranks are taken in ascending order and numbered ``k = 0 .. tp-1``:

- ``2d``: ``(i, j) = divmod(k, q)``; the row group holds the ``q`` ranks of row ``i`` (varying
  ``j``), the column group the ranks of column ``j`` (varying ``i``).
- ``2.5d``: ``(l, i, j)`` with ``k = l q^2 + i q + j``; ``l`` is the depth layer, each a 2D grid;
  row, column and depth groups (the depth group varies ``l`` at fixed ``(i, j)``).
- ``3d``: ``(i, j, l)`` with ``k = i q^2 + j q + l``; the input group varies ``j``, the weight
  group ``i`` and the output group ``l`` (the paper's three directions of the cube).

A grid also names how activations are laid out on it (:class:`Layout`): which group splits the
hidden dimension and which groups split the rows (the batch). In 3D a linear layer maps layout
``"a"`` to ``"b"`` and back (the input and output groups swap roles), so a residual stream stays
in layout ``"a"`` when layers are used in pairs, like Megatron's column/row pairs.

Example (without a process group: a world of one, every group has one rank)::

    >>> from parallel.tensor.grid import build_grid
    >>> g = build_grid("2d", [[0]])
    >>> g.q, g.coords, g.layout().row_parts
    (1, (0, 0), 1)
    >>> build_grid("2d", [list(range(6))])
    Traceback (most recent call last):
    ...
    ValueError: tp_mode=2d needs tp to be a square (1, 4, 9, ...); got 6
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch.distributed as dist

from parallel import comm


@dataclass(frozen=True)
class Axis:
    """One direction of the grid: the process group along it, its size and this rank's index."""

    name: str
    group: object
    size: int
    index: int


@dataclass(frozen=True)
class Layout:
    """Where a ``(batch, ..., hidden)`` activation lives: ``hidden`` splits the last dimension,
    ``rows`` (outermost first) split dimension 0."""

    hidden: Axis
    rows: tuple[Axis, ...]

    @property
    def row_parts(self) -> int:
        return math.prod(a.size for a in self.rows)

    @property
    def row_index(self) -> int:
        """This rank's block of dimension 0, in ``row_parts`` blocks."""
        k = 0
        for a in self.rows:
            k = k * a.size + a.index
        return k


@dataclass
class Grid:
    """This rank's place in a tensor-parallel grid (see the module docstring)."""

    mode: str
    q: int
    depth: int
    ranks: tuple[int, ...]
    """Global ranks of this tensor-parallel group, ascending."""
    axes: dict[str, Axis] = field(default_factory=dict)

    @property
    def tp(self) -> int:
        return len(self.ranks)

    @property
    def coords(self) -> tuple[int, ...]:
        """``(i, j)`` for 2d, ``(i, j, l)`` (l = depth) for 2.5d, ``(i, j, l)`` for 3d."""
        if self.mode == "2d":
            return (self.axes["col"].index, self.axes["row"].index)
        if self.mode == "2.5d":
            return (self.axes["col"].index, self.axes["row"].index, self.axes["dep"].index)
        return (self.axes["weight"].index, self.axes["input"].index, self.axes["output"].index)

    def layout(self, name: str = "a") -> Layout:
        """Activation layout ``"a"`` (layer input) or ``"b"`` (3d only: output of a layout-"a"
        linear layer)."""
        ax = self.axes
        if name not in ("a", "b"):
            raise ValueError(f"layout must be 'a' or 'b'; got {name!r}")
        if self.mode == "2d":
            return Layout(ax["row"], (ax["col"],))
        if self.mode == "2.5d":
            return Layout(ax["row"], (ax["dep"], ax["col"]))
        if name == "a":
            return Layout(ax["output"], (ax["weight"], ax["input"]))
        return Layout(ax["input"], (ax["weight"], ax["output"]))


def check_shape(mode: str, tp: int, depth: int = 1) -> int:
    """``q`` for a grid of ``tp`` ranks, or a ValueError saying what would be valid."""
    if mode == "2d":
        q = math.isqrt(tp)
        if q * q != tp:
            raise ValueError(f"tp_mode=2d needs tp to be a square (1, 4, 9, ...); got {tp}")
        return q
    if mode == "2.5d":
        q = math.isqrt(tp // depth) if depth >= 1 else 0
        if depth < 1 or q * q * depth != tp:
            ok = ", ".join(str(q * q * max(depth, 1)) for q in range(1, 5))
            raise ValueError(
                f"tp_mode=2.5d needs tp = q^2 * depth; got tp={tp}, depth={depth} "
                f"(with depth={max(depth, 1)}: tp in {ok}, ...)"
            )
        return q
    if mode == "3d":
        q = round(tp ** (1 / 3))
        if q**3 != tp:
            raise ValueError(f"tp_mode=3d needs tp = q^3 (1, 8, 27, ...); got {tp}")
        return q
    raise ValueError(f"unknown grid mode {mode!r}; use one of '2d', '2.5d', '3d'")


def _coords(mode: str, q: int, depth: int, k: int) -> dict[str, int]:
    """Coordinates of tp-local rank ``k`` by axis name."""
    if mode == "2d":
        i, j = divmod(k, q)
        return {"col": i, "row": j}  # the row axis is indexed by j (it varies along a row)
    if mode == "2.5d":
        dep, r = divmod(k, q * q)
        i, j = divmod(r, q)
        return {"col": i, "row": j, "dep": dep}
    i, r = divmod(k, q * q)
    j, out = divmod(r, q)
    return {"weight": i, "input": j, "output": out}


_AXES = {"2d": ("row", "col"), "2.5d": ("row", "col", "dep"), "3d": ("input", "weight", "output")}


def build_grid(mode: str, tp_rank_lists: Sequence[Sequence[int]], depth: int = 1) -> Grid:
    """Create the row/column/depth (2d, 2.5d) or input/weight/output (3d) groups of every
    tensor-parallel group in ``tp_rank_lists`` and return this rank's :class:`Grid`.

    Must be called on every rank with the same arguments. Groups are registered with
    :func:`parallel.comm.register_group` as ``tp_<axis>`` (``tp_row``, ``tp_col``, ``tp_dep``,
    ``tp_input``, ``tp_weight``, ``tp_output``)."""
    lists = [sorted(int(r) for r in ranks) for ranks in tp_rank_lists]
    if not lists or len({len(r) for r in lists}) != 1:
        raise ValueError(f"tp_rank_lists must be non-empty lists of equal length; got {lists}")
    flat = [r for ranks in lists for r in ranks]
    if len(set(flat)) != len(flat):
        raise ValueError(f"tp_rank_lists overlap: {lists}")
    tp = len(lists[0])
    if mode != "2.5d" and depth != 1:
        raise ValueError(f"depth={depth} applies to tp_mode=2.5d only (mode {mode})")
    q = check_shape(mode, tp, depth)
    me = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    if max(flat) >= world:
        raise ValueError(f"tp_rank_lists name rank {max(flat)} in a world of {world}")
    grid: Grid | None = None
    for ranks in lists:
        coords = [_coords(mode, q, depth, k) for k in range(tp)]
        mine = ranks.index(me) if me in ranks else None
        if mine is not None:
            grid = Grid(mode, q, depth, tuple(ranks))
        for axis in _AXES[mode]:
            # members of one group along ``axis``: same coordinates on every other axis
            keyed: dict[tuple, list[int]] = {}
            for k, c in enumerate(coords):
                key = tuple(v for a, v in sorted(c.items()) if a != axis)
                keyed.setdefault(key, []).append(k)
            for members in keyed.values():
                group_ranks = [ranks[k] for k in members]  # ascending: members ascend in k
                g = dist.new_group(group_ranks) if dist.is_initialized() else None
                if mine is not None and mine in members:
                    if g is not None:
                        comm.register_group(g, f"tp_{axis}")
                    idx = coords[mine][axis]
                    size = len(members)
                    assert members.index(mine) == idx  # group rank order == coordinate
                    grid.axes[axis] = Axis(axis, g, size, idx)
    if grid is None:
        raise ValueError(f"rank {me} is in none of tp_rank_lists {lists}")
    return grid


__all__ = ["Axis", "Grid", "Layout", "build_grid", "check_shape"]
