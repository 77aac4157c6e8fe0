"""Cache helpers shared by the tokenizer and block builders: stable hashes and a file lock.

Several distributed ranks on one machine may build the same cache entry at once. Each entry is
written under a temporary name and renamed into place, so a reader never sees half of one, and
an exclusive lock around build-if-missing makes the others wait for the first builder instead of
repeating its work (WordPiece training is not even deterministic, so repeating it could give
ranks different vocabularies).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: no flock; atomic renames alone still keep entries whole
    fcntl = None  # type: ignore[assignment]


def stable_hash(*parts: object, size: int = 16) -> str:
    """Hex digest of ``parts`` joined by NUL; the same in every process (unlike ``hash()``)."""
    h = hashlib.blake2b(digest_size=size)
    for p in parts:
        h.update(str(p).encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive advisory lock on ``path`` (created if missing) for the block."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if fcntl is None:
        yield
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
