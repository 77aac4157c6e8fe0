"""colossus: train models larger than your memory, from one CPU box to a GPU cluster.

Example::

    from colossus import Trainer, TrainingConfig
    cfg = TrainingConfig.from_yaml("recipes/gpt2-tiny.yaml")
"""

from colossus.config import TrainingConfig
from colossus.errors import CheckpointError, ColossusError, ConfigError, StorageError
from colossus.trainer import Trainer

__all__ = [
    "Trainer",
    "TrainingConfig",
    "ColossusError",
    "ConfigError",
    "CheckpointError",
    "StorageError",
]
__version__ = "0.1.0"
