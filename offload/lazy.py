"""Lazy initialisation: create a model larger than RAM by materialising it chunk by chunk.

Build the model with its parameters on the ``meta`` device (``accelerate.init_empty_weights()``,
which leaves buffers real) and hand it to :class:`~offload.ChunkManager`. Each chunk's meta
parameters are replaced by real ones (the same new ``nn.Parameter`` everywhere a tied weight is
used) only when that chunk is built, straight before it goes to its tier (device, host or NVMe):
the whole model never exists in memory at once. Initialisers that reach parameters of later
chunks touch meta tensors, which costs and changes nothing.

Values come from a ``source`` (name -> tensor, e.g. :class:`SafetensorsSource` streaming a
``save_pretrained`` folder tensor by tensor) or else from ``init_fn(module)`` applied to the
modules that own the parameters and their ancestors, deepest first (the order of Hugging Face's
own initialisation; for HF models the default is ``model._init_weights``, otherwise each module's
``reset_parameters``). A parameter that no initialiser touched is an error, not garbage.

Example::

    >>> import torch
    >>> from accelerate import init_empty_weights
    >>> from offload import ChunkConfig, ChunkManager
    >>> with init_empty_weights():
    ...     model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    >>> model[0].weight.is_meta
    True
    >>> mgr = ChunkManager(model, ChunkConfig(chunk_size=64))  # materialised chunk by chunk
    >>> bool(torch.isfinite(model(torch.ones(1, 4))).all())
    True
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn


def has_meta_params(module: nn.Module) -> bool:
    return any(p.is_meta for p in module.parameters())


def default_init_fn(root: nn.Module) -> Callable[[nn.Module], None]:
    init = getattr(root, "_init_weights", None)
    if callable(init):  # Hugging Face PreTrainedModel
        return init

    def reset(m: nn.Module) -> None:
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()

    return reset


class SafetensorsSource:
    """Tensors of a ``save_pretrained`` folder (one ``model.safetensors`` or an index of shards),
    read one at a time. ``prefix`` handling: a model with ``base_model_prefix`` finds
    ``transformer.h.0...`` under ``h.0...`` too, as ``from_pretrained`` does."""

    def __init__(self, path: str | Path, prefix: str = "") -> None:
        from safetensors import safe_open

        p = Path(path)
        index = p / "model.safetensors.index.json"
        if index.is_file():
            wm = json.loads(index.read_text())["weight_map"]
            files = sorted(set(wm.values()))
        elif (p / "model.safetensors").is_file():
            files = ["model.safetensors"]
        else:
            raise FileNotFoundError(f"{p}: no model.safetensors or model.safetensors.index.json")
        self._handles = [safe_open(str(p / f), framework="pt") for f in files]
        self._where = {k: h for h in self._handles for k in h.keys()}
        self.prefix = prefix

    def keys(self) -> set[str]:
        return set(self._where)

    def get(self, names: tuple[str, ...]) -> torch.Tensor | None:
        for n in names:
            cands = [n]
            if self.prefix and n.startswith(self.prefix + "."):
                cands.append(n[len(self.prefix) + 1 :])
            elif self.prefix:
                cands.append(f"{self.prefix}.{n}")
            for k in cands:
                if k in self._where:
                    return self._where[k].get_tensor(k)
        return None


class Materializer:
    """Replaces meta parameters by real ones chunk by chunk (see the module docstring).

    Only the parameters of the chunk being built become real. Initialisers run on the modules
    that own them and on their ancestors, deepest first; a sibling parameter of one of those
    modules that lives in another chunk is (or is made, for the call) a meta tensor of its
    shape, so ``reset_parameters`` can read shapes and writes to it cost nothing: each
    parameter is set exactly when its own chunk is built."""

    def __init__(
        self,
        root: nn.Module,
        init_fn: Callable[[nn.Module], None] | None = None,
        source: Any = None,
    ) -> None:
        self.init_fn = init_fn or default_init_fn(root)
        self.source = source
        self.depth: dict[nn.Module, int] = {}
        self.parent: dict[nn.Module, nn.Module | None] = {}
        self.owners: dict[int, list[tuple[nn.Module, str]]] = {}
        self.names: dict[int, tuple[str, ...]] = {}  # every full name of a meta parameter
        self.done: dict[int, torch.Size] = {}  # materialised (then chunked) param id -> shape

        def walk(m: nn.Module, d: int, parent: nn.Module | None, prefix: str) -> None:
            self.depth[m], self.parent[m] = d, parent
            for name, p in m._parameters.items():
                if p is not None and p.is_meta:
                    self.owners.setdefault(id(p), []).append((m, name))
                    self.names[id(p)] = (*self.names.get(id(p), ()), prefix + name)
            for cname, c in m.named_children():
                walk(c, d + 1, m, f"{prefix}{cname}.")

        walk(root, 0, None, "")

    def _swap(self, old: nn.Parameter, data: torch.Tensor) -> nn.Parameter:
        new = nn.Parameter(data, requires_grad=old.requires_grad)
        for m, name in self.owners.pop(id(old)):
            m._parameters[name] = new
        self.done[id(new)] = old.shape
        return new

    @torch.no_grad()
    def materialize(self, slots: list[Any]) -> None:
        """Give every meta parameter among ``slots`` (objects with ``param``, ``aliases``,
        ``shape``) real fp32 data on CPU; ``slot.param`` becomes the new parameter."""
        meta = [s for s in slots if s.param.is_meta]
        if not meta:
            return
        units = {m for s in meta for m, _ in self.owners[id(s.param)]}
        pending: list[tuple[str, nn.Parameter]] = []
        loaded: list[tuple[nn.Parameter, torch.Tensor]] = []
        for s in meta:
            aliases = self.names[id(s.param)]
            t = self.source.get(aliases) if self.source is not None else None
            if t is not None:
                if tuple(t.shape) != tuple(s.shape):
                    raise ValueError(
                        f"{aliases[0]}: checkpoint tensor has shape {tuple(t.shape)}, the model "
                        f"expects {tuple(s.shape)}"
                    )
                s.param = self._swap(s.param, t.to(torch.float32).contiguous())
                loaded.append((s.param, s.param.data.clone()))
            else:
                s.param = self._swap(s.param, torch.full(tuple(s.shape), float("nan")))
                pending.append((aliases[0], s.param))
        if not pending:
            return
        mine = {id(s.param) for s in meta}
        stand_ins = []  # siblings already chunked: a meta tensor of their shape for the call
        for m in units:
            for name, p in m._parameters.items():
                if p is not None and id(p) in self.done and id(p) not in mine:
                    stand = torch.empty(self.done[id(p)], device="meta")
                    m._parameters[name] = nn.Parameter(stand, requires_grad=p.requires_grad)
                    stand_ins.append((m, name, p))
        mods: set[nn.Module] = set()
        for m in units:
            while m is not None:
                mods.add(m)
                m = self.parent[m]
        try:
            for m in sorted(mods, key=lambda m: -self.depth[m]):  # deepest first, like HF
                self.init_fn(m)
        finally:
            for m, name, p in stand_ins:
                m._parameters[name] = p
        for q, t in loaded:  # a unit with some weights in the checkpoint: those win
            q.data.copy_(t)
        bad = [n for n, q in pending if not bool(torch.isfinite(q.data).all())]
        if bad:
            raise ValueError(
                f"lazy init left parameters uninitialised: {bad[:5]} (the init function does "
                "not cover their modules; pass init_fn or a checkpoint source)"
            )
