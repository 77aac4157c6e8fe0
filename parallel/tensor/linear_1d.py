"""1D (Megatron-LM) tensor-parallel linear layers over one process group of ``p`` ranks.

``ColumnParallelLinear`` splits the output features: rank ``r`` holds rows ``r`` of ``W``
(``nn.Linear`` layout ``[out, in]``) and of the bias; its input is replicated (``copy_to_tp``:
the input gradient is all-reduced in backward) and its output is this rank's slice of the
features, or the whole output with ``gather_output=True``.

``RowParallelLinear`` splits the input features: rank ``r`` holds columns ``r`` of ``W``; its
input is the matching feature slice (``input_is_parallel=True``, e.g. a column-parallel output)
or the full input which it slices itself; partial products are all-reduced (``reduce_from_tp``)
and the (replicated) bias is added once after the sum.

A column layer followed by a row layer (an MLP, or attention's QKV + output projection) costs
one all-reduce forward and one backward.

Example (a world of one: the layers equal ``nn.Linear``)::

    >>> import torch
    >>> from parallel.tensor.linear_1d import ColumnParallelLinear, RowParallelLinear
    >>> full = torch.nn.Linear(8, 16)
    >>> col = ColumnParallelLinear.from_linear(full, group=None)
    >>> x = torch.randn(2, 8)
    >>> torch.allclose(col(x), full(x))
    True
    >>> torch.equal(col.full_params()["weight"], full.weight)
    True
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from parallel.tensor.mappings import (
    copy_to_tp,
    gather_from_tp,
    group_rank,
    group_size,
    reduce_from_tp,
    scatter_to_tp,
)
from parallel.tensor.sharding import gather_full, mark_sharded, shard_rows


def _check_divisible(what: str, n: int, p: int) -> None:
    if n % p:
        ok = [d for d in range(1, n + 1) if n % d == 0 and d <= 64]
        raise ValueError(
            f"{what} = {n} is not divisible by the tensor-parallel size {p}; "
            f"tp sizes that divide it: {ok}"
        )


def _init_full_linear(out_f: int, in_f: int, bias: bool, dtype, device) -> nn.Linear:
    # the full layer initialised as nn.Linear would (same RNG draws on every rank) and then
    # sliced: a tp run starts from the same weights as a single-process run of the same seed
    return nn.Linear(in_f, out_f, bias=bias, dtype=dtype, device=device)


class ColumnParallelLinear(nn.Module):
    """``y = x W^T + b`` with ``W``'s rows (output features) split over ``group``."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        group: Any = None,
        gather_output: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        _init: bool = True,
    ):
        super().__init__()
        p, r = group_size(group), group_rank(group)
        _check_divisible("out_features", out_features, p)
        self.in_features, self.out_features = in_features, out_features
        self.group, self.tp_size, self.tp_rank = group, p, r
        self.gather_output = gather_output
        local = out_features // p
        kw = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(local, in_features, **kw))
        self.bias = nn.Parameter(torch.empty(local, **kw)) if bias else None
        if _init:
            full = _init_full_linear(out_features, in_features, bias, dtype, device)
            self._load_full(full.weight.data, full.bias.data if bias else None)
        self._mark()

    def _mark(self) -> None:
        p, r, g = self.tp_size, self.tp_rank, self.group
        mark_sharded(self.weight, (self.out_features, self.in_features), 0, g, r, p)
        if self.bias is not None:
            mark_sharded(self.bias, (self.out_features,), 0, g, r, p)

    def _load_full(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        with torch.no_grad():
            self.weight.copy_(shard_rows(weight, 0, self.tp_rank, self.tp_size))
            if self.bias is not None and bias is not None:
                self.bias.copy_(shard_rows(bias, 0, self.tp_rank, self.tp_size))

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, group: Any = None, gather_output: bool = False
    ) -> ColumnParallelLinear:
        """This rank's slice of a full ``nn.Linear`` (its weights copied, the original untouched)."""
        w = linear.weight
        m = cls(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            group=group,
            gather_output=gather_output,
            device=w.device,
            dtype=w.dtype,
            _init=False,
        )
        m._load_full(w.detach(), None if linear.bias is None else linear.bias.detach())
        return m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(copy_to_tp(x, self.group), self.weight, self.bias)
        return gather_from_tp(y, self.group, dim=-1) if self.gather_output else y

    def full_params(self) -> dict[str, torch.Tensor]:
        """The full ``weight`` / ``bias`` (``nn.Linear`` layout); collective over the group."""
        out = {"weight": gather_full(self.weight)}
        if self.bias is not None:
            out["bias"] = gather_full(self.bias)
        return out

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features} "
            f"(local {self.weight.shape[0]}), tp={self.tp_size}, bias={self.bias is not None}, "
            f"gather_output={self.gather_output}"
        )


class RowParallelLinear(nn.Module):
    """``y = x W^T + b`` with ``W``'s columns (input features) split over ``group``."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        group: Any = None,
        input_is_parallel: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        _init: bool = True,
    ):
        super().__init__()
        p, r = group_size(group), group_rank(group)
        _check_divisible("in_features", in_features, p)
        self.in_features, self.out_features = in_features, out_features
        self.group, self.tp_size, self.tp_rank = group, p, r
        self.input_is_parallel = input_is_parallel
        kw = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(out_features, in_features // p, **kw))
        # the bias is added after the all-reduce, so every rank holds it whole (replicated)
        self.bias = nn.Parameter(torch.empty(out_features, **kw)) if bias else None
        if _init:
            full = _init_full_linear(out_features, in_features, bias, dtype, device)
            self._load_full(full.weight.data, full.bias.data if bias else None)
        mark_sharded(self.weight, (out_features, in_features), 1, group, r, p)

    def _load_full(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        with torch.no_grad():
            self.weight.copy_(shard_rows(weight, 1, self.tp_rank, self.tp_size))
            if self.bias is not None and bias is not None:
                self.bias.copy_(bias)

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, group: Any = None, input_is_parallel: bool = True
    ) -> RowParallelLinear:
        w = linear.weight
        m = cls(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            group=group,
            input_is_parallel=input_is_parallel,
            device=w.device,
            dtype=w.dtype,
            _init=False,
        )
        m._load_full(w.detach(), None if linear.bias is None else linear.bias.detach())
        return m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.input_is_parallel:
            x = scatter_to_tp(x, self.group, dim=-1)
        y = reduce_from_tp(F.linear(x, self.weight), self.group)
        return y if self.bias is None else y + self.bias

    def full_params(self) -> dict[str, torch.Tensor]:
        out = {"weight": gather_full(self.weight)}
        if self.bias is not None:
            out["bias"] = self.bias.detach()
        return out

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features} (local {self.weight.shape[1]}), "
            f"out_features={self.out_features}, tp={self.tp_size}, bias={self.bias is not None}, "
            f"input_is_parallel={self.input_is_parallel}"
        )
