"""One memory budget shared by several chunk managers (e.g. the four models of RLHF PPO).

Each member manager keeps its own per-tier accounting, so every model's memory is reported
apart, but its ``device`` / ``host`` tiers are :class:`PooledTier` objects: a tier "fits" when
what *all* members hold together, plus the request, stays within the pool's budget. Members
compute one at a time (PPO: generate with the actor, score with all four, train actor then
critic), so when a member needs device room the pool first releases the idle gathered chunks of
the *other* members (a model idle in this phase keeps only its shards, on the tier its
placement chose: host for the frozen models of PPO), then the member evicts its own chunks by
furthest next use as usual. Only idle chunks (no compute, no unreduced gradient) are released,
the same rule a manager applies to its own chunks.

The check before any work: per tier, the model state of every member (parameter shards,
gradient shards, masters, optimizer state) plus the largest working set of any one member
(gathered chunks, gradient buffers, NVMe staging) must fit the budget; :meth:`MemoryPool.check`
raises with each member's share and the overshoot. Works on dry-run managers too (plans).

Example::

    >>> import torch
    >>> from offload import ChunkAdamW, ChunkConfig, ChunkManager, MemoryPool
    >>> pool = MemoryPool(device_budget=4096)
    >>> net = lambda: torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 1))
    >>> cfg = ChunkConfig(chunk_size=64, device_budget=4096)
    >>> actor = ChunkManager(net(), cfg, pool=pool.member("actor"))
    >>> frozen = ChunkConfig(chunk_size=64, device_budget=4096, offload_param_frac=1.0,
    ...                      offload_optim_frac=1.0)
    >>> ref = ChunkManager(net().requires_grad_(False), frozen, pool=pool.member("reference"))
    >>> pool.check()  # raises if the members cannot share the budget
    >>> with ref.inference():  # no-grad forwards; gathered chunks released at the end
    ...     y = ref.module(torch.randn(2, 8))
    >>> actor.backward(actor.module(torch.randn(2, 8)).sum()); _ = ChunkAdamW(actor).step()
    >>> pool.report()["device"]["peak"] <= 4096
    True
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from .tiers import Tier

if TYPE_CHECKING:  # the manager imports this module
    from .manager import ChunkManager

POOLED = ("device", "host")


class PooledTier(Tier):
    """A member's tier: its own byte accounting, the pool's budget over all members."""

    def __init__(self, name: str, device: torch.device, pool: MemoryPool) -> None:
        super().__init__(name, device, pool.budgets[name])
        self.pool = pool

    def fits(self, nbytes: int) -> bool:
        return self.budget is None or self.pool.used(self.name) + nbytes <= self.budget

    def account(self, category: str, nbytes: int) -> None:
        super().account(category, nbytes)
        self.pool._note(self.name)


@dataclass(frozen=True)
class PoolMember:
    """What a :class:`ChunkManager` takes as ``pool=``: the pool and this member's name."""

    pool: MemoryPool
    name: str


class MemoryPool:
    """A device and a host budget (bytes, None = unlimited) shared by its member managers."""

    def __init__(self, device_budget: int | None = None, host_budget: int | None = None) -> None:
        self.budgets: dict[str, int | None] = {"device": device_budget, "host": host_budget}
        self.members: dict[str, ChunkManager] = {}
        self.peak = dict.fromkeys(POOLED, 0)
        self.releases = 0  # chunks of idle members released to make room for another

    def member(self, name: str) -> PoolMember:
        if name in self.members:
            raise ValueError(f"the pool already has a member named {name!r}")
        return PoolMember(self, name)

    def join(self, name: str, mgr: ChunkManager) -> dict[str, Tier]:
        """Called by the manager's constructor: its tiers, with the budgets of the pool."""
        mine = {"device": mgr.config.device_budget, "host": mgr.config.host_budget}
        if mine != self.budgets:
            raise ValueError(
                f"pool member {name!r}: its ChunkConfig budgets {mine} must be the pool's "
                f"{self.budgets} (they decide caching and gradient-buffer reuse)"
            )
        self.members[name] = mgr
        return {t: PooledTier(t, mgr.tiers[t].device, self) for t in POOLED}

    def used(self, tier: str) -> int:
        return sum(m.tiers[tier].used for m in self.members.values())

    def _note(self, tier: str) -> None:
        self.peak[tier] = max(self.peak[tier], self.used(tier))

    def make_room(self, requester: ChunkManager, nbytes: int) -> None:
        """Release idle gathered chunks of the other members until ``nbytes`` more fit on the
        device (or they have none left; the requester then evicts its own)."""
        dev = requester.tiers["device"]
        for m in self.members.values():
            if dev.fits(nbytes):
                return
            if m is not requester:
                self.releases += m.release_gathered()

    # ------------------------------------------------------------------ planning
    def needs(self) -> dict[str, dict[str, int]]:
        """Per member and tier: ``state`` (model state, held all the time) and ``working`` (the
        rest of the member's predicted peak: gathered chunks, gradient buffers, staging)."""
        out = {}
        for name, m in self.members.items():
            state = model_state_bytes(m)
            row = {}
            for t in POOLED:
                row[f"{t}_state"] = state.get(t, 0)
                row[f"{t}_working"] = max(0, m.plan.get(t, 0) - state.get(t, 0))
            row["nvme_state"] = m.plan.get("nvme", 0)  # files: not budgeted
            out[name] = row
        return out

    def need(self) -> dict[str, int]:
        """Bytes each tier's budget must cover: every member's state + the largest working set
        (on a CPU-only box device and host are one RAM: the host budget covers both)."""
        rows = list(self.needs().values())
        same = self._same_memory()
        need = {}
        for t in POOLED:
            both = (t,) + (("device",) if t == "host" and same else ())
            need[t] = sum(r[f"{x}_state"] for r in rows for x in both) + max(
                (sum(r[f"{x}_working"] for x in both) for r in rows), default=0
            )
        return need

    def _same_memory(self) -> bool:
        m = next(iter(self.members.values()), None)
        return m is not None and m.tiers["device"].device == m.tiers["host"].device

    def over(self) -> dict[str, int]:
        need = self.need()
        return {t: need[t] - b for t, b in self.budgets.items() if b is not None and need[t] > b}

    def check(self) -> None:
        """Raise ``ValueError`` naming each member's share if the members cannot share the
        budgets."""
        over = self.over()
        if not over:
            return
        need, rows = self.need(), self.needs()
        same = self._same_memory()
        parts = []
        for t, more in over.items():
            both = (t,) + (("device",) if t == "host" and same else ())
            share = ", ".join(
                f"{n} {sum(r[f'{x}_state'] for x in both)} B" for n, r in rows.items()
            )
            work = max(sum(r[f"{x}_working"] for x in both) for r in rows.values())
            where = " (device + host: one RAM here)" if len(both) > 1 else ""
            parts.append(
                f"{t} budget {self.budgets[t]} B is {more} B short{where}: the {len(rows)} models "
                f"need {need[t]} B together (model state: {share}; plus the largest working "
                f"set, {work} B)"
            )
        raise ValueError(
            "; ".join(parts) + ". Raise the budget, offload more of the trained models "
            "(offload_param_frac / offload_optim_frac, NVMe), use more ranks or a smaller "
            "chunk_size."
        )

    def report(self) -> dict[str, Any]:
        """Bytes per tier: ``used`` / ``peak`` of all members together, the ``budget``, and each
        member's ``memory_report()`` tier (its own current, peak and model-state bytes)."""
        out: dict[str, Any] = {}
        for t in POOLED:
            out[t] = {
                "used": self.used(t),
                "peak": self.peak[t],
                "budget": self.budgets[t],
                "members": {n: m.tiers[t].report() for n, m in self.members.items()},
            }
        out["releases"] = self.releases
        return out


def model_state_bytes(mgr: ChunkManager) -> dict[str, int]:
    """Bytes of model state per tier from the chunk layout (valid for dry-run managers too):
    parameter shards, and for trainable chunks the fp32 gradient shard, master (when separate)
    and two AdamW states."""
    out: dict[str, int] = {}
    for c in mgr.chunks:
        out[c.param_tier] = out.get(c.param_tier, 0) + c.shard_size * mgr.dtype.itemsize
        if c.requires_grad:
            grad_tier = "nvme" if c.param_tier == "nvme" else mgr._otier(c).name
            out[grad_tier] = out.get(grad_tier, 0) + c.shard_size * 4
            sep = int(mgr._separate_master(c))
            out[c.optim_tier] = out.get(c.optim_tier, 0) + c.shard_size * 4 * (2 + sep)
    return out
