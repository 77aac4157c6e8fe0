"""Memory tracer: the non-model memory a forward keeps for backward, per module.

Activations are what autograd saves between forward and backward; every such tensor passes
through ``torch.autograd.graph.saved_tensors_hooks``' pack hook, on any device. The tracer counts
each saved storage once (by address), skips the model's own parameter storage (chunk payloads:
model memory, accounted by the tiers), and attributes the bytes to the innermost module running
at that moment (a pre/post forward hook stack). Because nothing saved is freed before backward
starts, the sum at the end of forward is the activation peak of the step. Transient temporaries
inside a module (freed before it returns) are not activations and are not counted; on CUDA the
allocator's peak (``torch.cuda.max_memory_allocated``) bounds them, on CPU they are small next to
what is saved.

Example::

    >>> import torch
    >>> from offload.tracer import ActivationTracer
    >>> model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
    >>> with ActivationTracer(model) as tr:
    ...     loss = model(torch.ones(4, 8)).sum()
    >>> tr.total > 0 and set(tr.by_module) <= {"0", "1", "2"}
    True
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable

import torch
from torch import nn


class ActivationTracer:
    """Context manager around one forward: ``by_module`` (name -> bytes), ``total`` bytes."""

    def __init__(
        self, module: nn.Module, model_storages: Callable[[], Iterable[int]] | None = None
    ) -> None:
        self.module = module
        self.model_storages = model_storages or (
            lambda: (p.untyped_storage().data_ptr() for p in module.parameters())
        )
        self.by_module: dict[str, int] = defaultdict(int)
        self.total = 0
        self._seen: set[int] = set()
        self._stack: list[str] = []
        self._handles: list = []
        self._ctx = None

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        try:
            st = t.untyped_storage()
        except (RuntimeError, NotImplementedError):  # e.g. sparse / meta tensors
            return t
        ptr = st.data_ptr()
        if ptr and ptr not in self._seen and ptr not in self._model:
            self._seen.add(ptr)
            n = st.nbytes()
            self.by_module[self._stack[-1] if self._stack else ""] += n
            self.total += n
        return t

    def __enter__(self) -> ActivationTracer:
        self._model = set(self.model_storages())
        for name, m in self.module.named_modules():
            self._handles.append(m.register_forward_pre_hook(self._push(name)))
            self._handles.append(m.register_forward_hook(self._pop, always_call=True))
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._ctx.__enter__()
        return self

    def _push(self, name: str):
        def hook(module, args):
            self._stack.append(name)
            # chunks gathered for this module are model memory, not activations
            self._model.update(self.model_storages())

        return hook

    def _pop(self, module, args, output) -> None:
        if self._stack:
            self._stack.pop()

    def __exit__(self, *exc: object) -> None:
        if self._ctx is not None:
            self._ctx.__exit__(*exc)
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def top(self, n: int = 5) -> list[tuple[str, int]]:
        return sorted(self.by_module.items(), key=lambda kv: -kv[1])[:n]
