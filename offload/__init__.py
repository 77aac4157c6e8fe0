"""offload: the chunk-based heterogeneous memory manager (device / host / NVMe tiers).

Parameters, gradients and optimizer state are packed into chunks, sharded across data-parallel
ranks and moved between tiers by a planned schedule. See ../shared/DESIGN.md ("offload/").
This package never imports ``colossus``.
"""

TIERS: tuple[str, ...] = ("device", "host", "nvme")
"""Memory tiers, fastest first. On a CPU-only box ``device`` and ``host`` are the same memory."""

__all__ = ["TIERS"]
