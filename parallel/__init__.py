"""parallel: process topology and parallel layers (tensor 1D/2D/2.5D/3D, sequence ring/Ulysses)
on torch.distributed. See ../shared/DESIGN.md ("parallel/"). This package never imports ``colossus``.
"""

TP_MODES: tuple[str, ...] = ("1d", "2d", "2.5d", "3d")
SP_MODES: tuple[str, ...] = ("ring_self_attention", "ring_attention", "ulysses")

__all__ = ["TP_MODES", "SP_MODES"]
