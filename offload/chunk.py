"""Chunks: flat buffers of one dtype holding many parameters, with per-parameter slot states.

A :class:`Chunk` owns the storage (this rank's shard, the gathered payload while resident, the
full-size gradient buffer while gradients arrive, the reduced gradient shard, the fp32 master shard
and the optimizer state of the shard). It knows nothing about process groups: the manager does the
collectives and calls back into the chunk to bind / unbind the parameter views.

Example::

    >>> import torch
    >>> from offload.chunk import Chunk, SlotState
    >>> w, b = torch.nn.Parameter(torch.ones(2, 3)), torch.nn.Parameter(torch.zeros(3))
    >>> c = Chunk(0, [("w", w), ("b", b)], capacity=10, dtype=torch.float32)
    >>> c.slots[0].state  # storage is attached by the ChunkManager; until then nothing is resident
    <SlotState.FREE: 'free'>
    >>> c.transition(c.slots[0], SlotState.HOLD); c.transition(c.slots[0], SlotState.COMPUTE)
    >>> c.transition(c.slots[1], SlotState.COMPUTE)  # compute on data that was never gathered
    Traceback (most recent call last):
    ...
    offload.chunk.IllegalTransition: chunk 0, parameter 'b': illegal slot transition FREE -> COMPUTE
    >>> [(s.name, s.offset_in_shard, s.length, s.offset_in_param) for s in c.segments]
    [('w', 0, 6, 0), ('b', 6, 3, 0)]
"""

from __future__ import annotations

import enum
import mmap
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn


class SlotState(enum.Enum):
    """Lifecycle of one parameter slot inside a chunk, within one training step."""

    FREE = "free"  # chunk not resident on this rank: param.data is an empty placeholder
    HOLD = "hold"  # resident, nobody uses it right now
    COMPUTE = "compute"  # resident and in use (a forward is running, or a backward is pending)
    HOLD_AFTER_BWD = "hold_after_bwd"  # some gradient arrived, more contributions expected
    READY_FOR_REDUCE = "ready_for_reduce"  # every expected gradient contribution arrived


S = SlotState
TRANSITIONS: dict[SlotState, frozenset[SlotState]] = {
    # gather makes data resident; nothing may compute on or receive gradients for freed data
    S.FREE: frozenset({S.HOLD}),
    S.HOLD: frozenset(
        {
            S.FREE,  # release / evict
            S.COMPUTE,  # forward starts, or a backward that needs the data is pending
            S.HOLD_AFTER_BWD,  # a gradient arrived for an unpinned resident param (tied use)
            S.READY_FOR_REDUCE,
        }
    ),
    S.COMPUTE: frozenset({S.HOLD, S.HOLD_AFTER_BWD, S.READY_FOR_REDUCE}),
    # reused after a partial gradient (tied weight, recomputation under checkpointing)
    S.HOLD_AFTER_BWD: frozenset({S.COMPUTE, S.HOLD_AFTER_BWD, S.READY_FOR_REDUCE}),
    S.READY_FOR_REDUCE: frozenset(
        {
            S.HOLD,  # reduce-scattered
            S.READY_FOR_REDUCE,  # one more contribution before the chunk was reduced
            S.COMPUTE,  # used again: the learned contribution count was too low, wait again
        }
    ),
}
"""Legal slot transitions. Anything else is a bug in the hooks or in the caller and raises:
e.g. FREE -> COMPUTE (compute on data that was never gathered), READY_FOR_REDUCE -> FREE
(dropping gradients that were never reduced), COMPUTE -> FREE (releasing data in use)."""


class IllegalTransition(RuntimeError):
    """A slot was asked to move along an edge that :data:`TRANSITIONS` does not allow."""


@dataclass(frozen=True)
class Segment:
    """The part of one parameter that lies in one rank's shard of a chunk.

    LAMB/LARS need per-parameter norms; a parameter may straddle shards, so an optimizer sums the
    partial squares of its segments on each rank and all-reduces them.
    """

    name: str
    offset_in_shard: int
    length: int
    offset_in_param: int


@dataclass(eq=False)
class Slot:
    """One parameter inside a chunk."""

    name: str  # canonical name (first in ``named_parameters``)
    param: nn.Parameter
    offset: int  # element offset in the full chunk
    aliases: tuple[str, ...] = ()  # every name this tensor has (tied weights)
    state: SlotState = SlotState.FREE
    fwd_refs: int = 0  # forwards currently running that use it (modules may nest / share)
    pinned: bool = False  # a backward that reads the data is pending
    grad_count: int = 0  # gradient contributions received in the current backward
    expected: int = 1  # contributions to wait for before the chunk may be reduced (learned)
    pending: bool = False  # holds gradient in the chunk's buffer that is not reduced yet
    has_grad: bool = False  # received any gradient since the last zero_grad
    shape: torch.Size = field(default_factory=torch.Size)

    @property
    def numel(self) -> int:
        return self.shape.numel()


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


class Chunk:
    """A flat buffer of ``capacity`` elements of ``dtype`` holding ``params`` back to back.

    ``capacity`` must be a multiple of ``world_size``; shard ``r`` is
    ``[r * shard_size, (r + 1) * shard_size)``. With one rank and the shard on the compute device
    the payload *is* the shard, so the chunk is always resident and gathering copies nothing.
    """

    def __init__(
        self,
        index: int,
        params: Sequence[tuple[str, nn.Parameter]],
        capacity: int,
        dtype: torch.dtype,
        world_size: int = 1,
        rank: int = 0,
        aliases: dict[int, tuple[str, ...]] | None = None,
        requires_grad: bool = True,
        decay: bool = True,
    ) -> None:
        used = sum(p.numel() for _, p in params)
        if capacity % world_size:
            raise ValueError(f"chunk capacity {capacity} is not a multiple of {world_size} ranks")
        if used > capacity:
            raise ValueError(f"chunk {index}: {used} elements do not fit in capacity {capacity}")
        self.index = index
        self.capacity = capacity
        self.dtype = dtype
        self.world_size = world_size
        self.rank = rank
        self.shard_size = capacity // world_size
        self.requires_grad = requires_grad
        self.decay = decay
        self.slots: list[Slot] = []
        off = 0
        for name, p in params:
            al = (aliases or {}).get(id(p), (name,))
            self.slots.append(Slot(name, p, off, al, shape=p.shape, expected=int(requires_grad)))
            off += p.numel()
        self.used = off
        # storage; created and accounted by the manager
        self.payload: torch.Tensor | None = None  # full chunk, working dtype, compute device
        self.payload_is_shard = False  # alias: one rank, shard already on the compute device
        # the payload's huge-page mapping (NVMe params on CPU; its pages are parked on release)
        self.payload_map: mmap.mmap | None = None
        self.payload_tag: tuple[int, int] | None = None  # (index, shard version) it holds
        self.resident = False
        self.shard: torch.Tensor | None = None  # this rank's working-dtype shard
        self.master: torch.Tensor | None = None  # fp32 master shard (may alias ``shard``)
        self.grad_buffer: torch.Tensor | None = None  # full-size grads while they arrive
        self.written: set[int] = set()  # slots (ids) whose range of grad_buffer holds data
        self.spare_grad: torch.Tensor | None = None  # a recycled gradient buffer (one rank)
        self.grad_shard: torch.Tensor | None = None  # reduced, averaged fp32 grad shard
        self.optim_state: dict[str, torch.Tensor] = {}
        self.grad_sq = 0.0  # squared norm of a gradient shard written to NVMe
        self.grad_coef = 1.0  # clipping factor to apply when that shard is read back
        self.keep_gathered = False  # stays gathered for the whole step (set by the manager)
        self.param_tier = "device"
        self.optim_tier = "device"
        self._views: list[torch.Tensor] = []

    # ----------------------------------------------------------------- layout
    @property
    def shard_begin(self) -> int:
        return self.rank * self.shard_size

    def segments_of(self, rank: int) -> list[Segment]:
        """Segment table of ``rank``'s shard: which piece of which parameter lies where."""
        lo, hi = rank * self.shard_size, (rank + 1) * self.shard_size
        out = []
        for s in self.slots:
            a, b = max(lo, s.offset), min(hi, s.offset + s.numel)
            if a < b:
                out.append(Segment(s.name, a - lo, b - a, a - s.offset))
        return out

    @property
    def segments(self) -> list[Segment]:
        return self.segments_of(self.rank)

    # ------------------------------------------------------------ slot states
    def transition(self, slot: Slot, new: SlotState) -> None:
        if new not in TRANSITIONS[slot.state]:
            raise IllegalTransition(
                f"chunk {self.index}, parameter {slot.name!r}: illegal slot transition "
                f"{slot.state.name} -> {new.name}"
            )
        slot.state = new

    def rest_state(self, slot: Slot) -> SlotState:
        """State a resident slot returns to when nothing computes on it."""
        if not slot.pending:
            return SlotState.HOLD
        if slot.grad_count >= slot.expected:
            return SlotState.READY_FOR_REDUCE
        return SlotState.HOLD_AFTER_BWD

    @property
    def idle(self) -> bool:
        """Resident data nobody needs: may be released (no compute, no unreduced gradient)."""
        return all(s.state is SlotState.HOLD for s in self.slots) and self.grad_buffer is None

    @property
    def grads_complete(self) -> bool:
        return self.grad_buffer is not None and all(s.grad_count >= s.expected for s in self.slots)

    # ------------------------------------------------------------------ views
    def bind(self) -> None:
        """Point every parameter's ``.data`` at its slice of the (resident) payload."""
        assert self.payload is not None
        if not self._views:
            self._views = [
                self.payload[s.offset : s.offset + s.numel].view(s.shape) for s in self.slots
            ]
        for s, v in zip(self.slots, self._views):
            s.param.data = v

    def unbind(self, placeholder: torch.Tensor) -> None:
        for s in self.slots:
            s.param.data = placeholder

    def params(self) -> Iterable[nn.Parameter]:
        return (s.param for s in self.slots)

    def __repr__(self) -> str:
        names = ", ".join(s.name for s in self.slots[:3]) + (", ..." if len(self.slots) > 3 else "")
        return (
            f"Chunk({self.index}, capacity={self.capacity}, used={self.used}, "
            f"dtype={self.dtype}, params=[{names}])"
        )
