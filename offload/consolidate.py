"""Full parameters from per-rank chunk shards, offline (no process group), one chunk at a time.

:meth:`ChunkManager.state_dict_shard` gives each rank a flat dict (fp32 master shards, optimizer
state, a JSON ``meta`` with every chunk's layout) that is saved as one safetensors file per rank.
:class:`ShardSet` opens all ranks' files lazily (``safetensors.safe_open``) and rebuilds one chunk
at a time from its N pieces, so consolidating never holds more than one full chunk plus what the
caller keeps: this is how a model too large for one process's RAM is exported.

Example::

    >>> import tempfile, torch
    >>> from safetensors.torch import save_file
    >>> from offload import ChunkConfig, ChunkManager
    >>> from offload.consolidate import ShardSet
    >>> model = torch.nn.Linear(3, 2)
    >>> mgr = ChunkManager(model, ChunkConfig(chunk_size=16))
    >>> path = tempfile.mkdtemp() + "/rank0.safetensors"
    >>> save_file(mgr.state_dict_shard(), path)
    >>> full = dict(ShardSet([path]).iter_params())
    >>> torch.equal(full["weight"], model.weight.detach()), sorted(full)
    (True, ['bias', 'weight'])
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from contextlib import ExitStack
from math import prod
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

SHARD_FORMAT = "offload.chunk_shard/1"


class ShardFormatError(ValueError):
    """The files are not a complete, consistent set of chunk shards."""


def read_meta(handle: Any) -> dict[str, Any]:
    """The layout JSON stored in a shard file opened with ``safe_open``."""
    if "meta" not in handle.keys():
        raise ShardFormatError("no 'meta' tensor: not an offload chunk shard")
    meta = json.loads(bytes(handle.get_tensor("meta").tolist()).decode())
    if meta.get("format") != SHARD_FORMAT:
        raise ShardFormatError(f"shard format {meta.get('format')!r}, expected {SHARD_FORMAT!r}")
    return meta


class ShardSet:
    """All ranks' shard files of one checkpoint, validated as a set; a context manager."""

    def __init__(self, paths: Sequence[str | Path]) -> None:
        if not paths:
            raise ShardFormatError("no shard files given")
        self._stack = ExitStack()
        handles = [self._stack.enter_context(safe_open(str(p), framework="pt")) for p in paths]
        metas = [read_meta(h) for h in handles]
        world = metas[0]["world_size"]
        ranks = sorted(m["rank"] for m in metas)
        if any(m["world_size"] != world for m in metas) or ranks != list(range(world)):
            raise ShardFormatError(
                f"shards are ranks {ranks} of world sizes {sorted({m['world_size'] for m in metas})}; "
                f"a complete set is ranks 0..{world - 1} of one world size"
            )
        by_rank = sorted(zip(metas, handles), key=lambda mh: mh[0]["rank"])
        self.metas = [m for m, _ in by_rank]
        self._handles = [h for _, h in by_rank]
        self.world_size = world
        self.chunks: list[dict[str, Any]] = self.metas[0]["chunks"]
        if any(len(m["chunks"]) != len(self.chunks) for m in self.metas):
            raise ShardFormatError("ranks disagree on the number of chunks")
        if any("slots" not in c for c in self.chunks):
            raise ShardFormatError("shards predate the layout table; cannot consolidate")

    def __enter__(self) -> ShardSet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._stack.close()

    def keys(self, chunk: int) -> list[str]:
        """Per-chunk tensors stored for ``chunk`` (``master``, ``optim.exp_avg``, ...)."""
        pre = f"chunk{chunk:05d}."
        return sorted(
            k[len(pre) :]
            for k in self._handles[0].keys()
            if k.startswith(pre) and k != pre + "segments"
        )

    def full_chunk(self, chunk: int, key: str = "master") -> torch.Tensor:
        """The whole chunk ``key`` tensor: the N rank pieces concatenated (fp32 for masters)."""
        name = f"chunk{chunk:05d}.{key}"
        pieces = [h.get_tensor(name) for h in self._handles]
        if pieces[0].ndim == 0:  # per-shard scalars (Adam's step): every rank holds the same
            return pieces[0]
        full = torch.cat(pieces)
        cap = self.chunks[chunk]["capacity"]
        if full.numel() != cap:
            raise ShardFormatError(f"{name}: pieces add up to {full.numel()}, capacity is {cap}")
        return full

    def iter_params(self, key: str = "master") -> Iterator[tuple[str, torch.Tensor]]:
        """``(name, full tensor)`` of every parameter in chunk order; tied weights once, under
        their first name (like ``named_parameters()``)."""
        for i, c in enumerate(self.chunks):
            full = self.full_chunk(i, key)
            for name, offset, shape, _aliases in c["slots"]:
                n = prod(shape)
                yield name, full[offset : offset + n].view(shape).clone()
            del full

    def aliases(self) -> dict[str, list[str]]:
        """Canonical name -> every name the tensor has (tied weights have several)."""
        return {s[0]: list(s[3]) for c in self.chunks for s in c["slots"]}

    def numel(self) -> int:
        return sum(prod(s[2]) for c in self.chunks for s in c["slots"])
