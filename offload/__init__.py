"""offload: the chunk-based heterogeneous memory manager (device / host / NVMe tiers).

Parameters, gradients and optimizer state are packed into chunks, sharded across data-parallel
ranks and moved between tiers by a planned schedule. See ../shared/DESIGN.md ("offload/").
This package never imports ``colossus``.

Example::

    >>> import torch
    >>> from offload import ChunkAdamW, ChunkConfig, ChunkManager
    >>> model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    >>> mgr = ChunkManager(model, ChunkConfig(chunk_size=32))  # sharded if dist is initialised
    >>> opt = ChunkAdamW(mgr, lr=1e-2, weight_decay=0.01)
    >>> for _ in range(3):
    ...     mgr.backward(mgr.module(torch.randn(4, 8)).pow(2).mean())
    ...     _ = mgr.clip_grad_norm_(1.0)
    ...     _ = opt.step()
    ...     opt.zero_grad()
    >>> sorted(mgr.memory_report())
    ['device', 'host']
"""

TIERS: tuple[str, ...] = ("device", "host", "nvme")
"""Memory tiers, fastest first. On a CPU-only box ``device`` and ``host`` are the same memory."""

from .chunk import TRANSITIONS, Chunk, IllegalTransition, Segment, SlotState  # noqa: E402
from .manager import ChunkConfig, ChunkManager, default_decay_filter  # noqa: E402
from .optim import ChunkAdamW, ChunkOptimizer  # noqa: E402
from .optim_lamb import ChunkLamb, ChunkLars, ChunkTrustOptimizer  # noqa: E402
from .pool import MemoryPool  # noqa: E402
from .precision import DynamicLossScaler  # noqa: E402
from .search import pack, padding_waste, search_chunk_size  # noqa: E402
from .tiers import AccessOrder, Tier, belady_victim, static_placement  # noqa: E402

__all__ = [
    "TIERS",
    "TRANSITIONS",
    "AccessOrder",
    "Chunk",
    "ChunkAdamW",
    "ChunkConfig",
    "ChunkLamb",
    "ChunkLars",
    "ChunkManager",
    "ChunkOptimizer",
    "ChunkTrustOptimizer",
    "DynamicLossScaler",
    "IllegalTransition",
    "MemoryPool",
    "Segment",
    "SlotState",
    "Tier",
    "belady_victim",
    "default_decay_filter",
    "pack",
    "padding_waste",
    "search_chunk_size",
    "static_placement",
]
