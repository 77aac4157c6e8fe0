"""Errors a user can act on. Each message says what was wrong and what would be valid."""


class ColossusError(Exception):
    """Base class: the CLI prints these without a traceback and exits with status 2."""


class ConfigError(ColossusError):
    """A recipe, override or argument is invalid (unknown key, wrong type, missing file)."""


class StorageError(ColossusError):
    """A memory tier's storage failed during training (disk full, I/O error on the NVMe tier);
    the run stopped, and checkpoints already published are untouched."""


class CheckpointError(ColossusError):
    """A checkpoint is missing, partial, or does not match its manifest; nothing was loaded."""
