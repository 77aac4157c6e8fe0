"""Chunk size: packing parameters into chunks, and searching the size that wastes least padding.

Packing is greedy in execution order (a parameter goes into the open chunk if it fits, otherwise
the chunk is closed and a new one opened); this keeps parameters that are used together in the
same chunk, so one gather serves several consecutive modules. A parameter larger than the chunk
size gets a chunk of its own and the open chunk stays open. Capacities are rounded up to a
multiple of the data-parallel size so every rank owns an equal shard; the last chunk of a group
is trimmed to what it holds (nothing reuses chunk buffers across sizes, so a uniform last chunk
would only be padding).

Example::

    >>> from offload.search import pack, search_chunk_size
    >>> pack([4, 4, 10, 3], chunk_size=8, world_size=2)
    [([0, 1], 8), ([2], 10), ([3], 4)]
    >>> search_chunk_size([[3, 5, 3, 5]], candidates=range(4, 17), world_size=1)
    (8, 0)
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from .chunk import round_up


def pack(sizes: Sequence[int], chunk_size: int, world_size: int = 1) -> list[tuple[list[int], int]]:
    """Greedy packing of parameter ``sizes`` (numels, in order) into chunks.

    Returns ``(indices, capacity)`` per chunk, ordered by the first parameter each holds.
    """
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    full = round_up(chunk_size, world_size)
    out: list[tuple[list[int], int]] = []
    cur: list[int] = []
    used = 0
    for i, n in enumerate(sizes):
        if n > chunk_size:  # oversize: a private chunk; the open chunk stays open
            out.append(([i], round_up(n, world_size)))
            continue
        if used + n > chunk_size:
            out.append((cur, full))
            cur, used = [], 0
        cur.append(i)
        used += n
    if cur:
        out.append((cur, round_up(used, world_size)))
    out.sort(key=lambda c: c[0][0])
    return out


def padding_waste(sizes: Sequence[int], chunk_size: int, world_size: int = 1) -> int:
    """Elements allocated but holding no parameter when packing ``sizes`` at ``chunk_size``."""
    return sum(cap for _, cap in pack(sizes, chunk_size, world_size)) - sum(sizes)


def search_chunk_size(
    groups: Sequence[Sequence[int]],
    candidates: Iterable[int],
    world_size: int = 1,
) -> tuple[int, int]:
    """Candidate chunk size with the least total padding over all parameter ``groups``.

    Ties go to the smallest size (finer-grained memory movement). Returns ``(size, waste)``.
    """
    best: tuple[int, int] | None = None
    for cs in candidates:
        w = sum(padding_waste(g, cs, world_size) for g in groups)
        if best is None or w < best[1]:
            best = (cs, w)
    if best is None:
        raise ValueError("no candidate chunk sizes to search")
    return best


def default_candidates(groups: Sequence[Sequence[int]], lo: int, hi: int, step: int) -> range:
    """Search range clipped to the model: no point searching far above the largest group."""
    biggest = max((sum(g) for g in groups), default=lo)
    hi = max(lo, min(hi, round_up(biggest, step)))
    return range(lo, hi + 1, step)
