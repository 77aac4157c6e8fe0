"""Documents -> one token stream -> fixed-length blocks in a memory-mapped file.

Example::

    blocks = build_packed_blocks(docs, tokenizer, block_size=128, cache_dir=Path(".cache"), key="x")
    x = blocks[0]  # LongTensor[128]
"""

from __future__ import annotations

import json
import operator
import os
import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from tokenizers import Tokenizer

from colossus.data._cache import file_lock, stable_hash
from colossus.errors import ConfigError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

# Bumped when the packing layout changes, so blocks cached by older code are not reused.
_BLOCKS_FORMAT = 1
_ENCODE_BATCH = 256  # documents per encode call: bounds the memory held by Encoding objects


class PackedBlocks(torch.utils.data.Dataset):
    """Fixed-length token blocks read from a flat binary file of ``n * block_size`` token ids.

    The file is memory-mapped read-only, so ranks and DataLoader workers share the page cache
    instead of each holding a copy.
    """

    def __init__(self, path: str | Path, block_size: int, n_blocks: int, dtype: str) -> None:
        self.path = Path(path)
        self.block_size = block_size
        self.n_blocks = n_blocks
        self.dtype = np.dtype(dtype)
        self._mm: np.memmap | None = None

    def _blocks(self) -> np.memmap:
        if self._mm is None:  # opened lazily, so a pickled copy (DataLoader worker) reopens it
            self._mm = np.memmap(
                self.path, dtype=self.dtype, mode="r", shape=(self.n_blocks, self.block_size)
            )
        return self._mm

    def __len__(self) -> int:
        return self.n_blocks

    def __getitem__(self, i: int) -> torch.Tensor:
        i = operator.index(i)  # also accepts numpy ints and 0-d tensors (torch.randperm)
        if not -self.n_blocks <= i < self.n_blocks:
            raise IndexError(f"block {i} out of range for {self.n_blocks} blocks")
        return torch.from_numpy(self._blocks()[i].astype(np.int64))

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_mm"] = None  # pickling a memmap would copy the whole array
        return state

    @property
    def num_tokens(self) -> int:
        return self.n_blocks * self.block_size

    def __repr__(self) -> str:
        return f"PackedBlocks({self.n_blocks} x {self.block_size}, {self.dtype}, {self.path})"


def _separator_id(tokenizer) -> int | None:
    """The token placed after each document: [SEP] for BERT-style vocabularies, else eos."""
    has_mask = getattr(tokenizer, "mask_token_id", None) is not None
    order = ("sep_token_id", "eos_token_id") if has_mask else ("eos_token_id", "sep_token_id")
    for attr in order:
        tid = getattr(tokenizer, attr, None)
        if tid is not None:
            return int(tid)
    return None


def _backend(tokenizer) -> Tokenizer:
    # A private copy with truncation and padding off, whatever a loaded tokenizer.json set.
    backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    backend.no_truncation()
    backend.no_padding()
    return backend


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """A hash of the tokenizer's full serialization (vocabulary, merges, pipeline)."""
    return stable_hash(tokenizer.backend_tokenizer.to_str(), len(tokenizer))


def _read_sidecar(meta_path: Path, expect: dict[str, Any]) -> dict[str, Any] | None:
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError):
        return None
    if any(meta.get(k) != v for k, v in expect.items()):
        return None
    return meta


def build_packed_blocks(
    texts: list[str], tokenizer: PreTrainedTokenizerBase, block_size: int, cache_dir: Path, key: str
) -> PackedBlocks:
    """Tokenize ``texts``, join them with a separator, and cut the stream into blocks.

    No special tokens are added per document except the separator (eos for byte-level BPE,
    ``[SEP]`` for BERT-style vocabularies) after each one; the tail shorter than a block is
    dropped. The result is cached as ``cache_dir/blocks-<h>.bin`` plus a ``.json`` sidecar,
    ``h`` hashing ``key``, the tokenizer and ``block_size``; a cached file whose sidecar matches
    is reused without tokenizing anything.
    """
    cache_dir = Path(cache_dir).expanduser()
    sep = _separator_id(tokenizer)
    vocab = len(tokenizer)
    dtype = "uint16" if vocab < 2**16 else "int32"
    h = stable_hash(_BLOCKS_FORMAT, key, tokenizer_fingerprint(tokenizer), block_size, sep)
    path = cache_dir / f"blocks-{h}.bin"
    meta_path = cache_dir / f"blocks-{h}.json"
    expect = {"format": _BLOCKS_FORMAT, "block_size": block_size, "dtype": dtype}

    def cached() -> PackedBlocks | None:
        meta = _read_sidecar(meta_path, expect)
        itemsize = np.dtype(dtype).itemsize
        if meta is None or not path.is_file():
            return None
        if path.stat().st_size != meta["n_blocks"] * block_size * itemsize:
            return None
        return PackedBlocks(path, block_size, meta["n_blocks"], dtype)

    found = cached()
    if found is not None:
        return found
    with file_lock(cache_dir / f".blocks-{h}.lock"):
        found = cached()  # another rank may have built it while we waited
        if found is not None:
            return found
        if sep is None:
            warnings.warn(
                "the tokenizer has neither an eos nor a sep token; documents are packed "
                "back to back with no separator",
                stacklevel=2,
            )
        n_tokens = _write_stream(texts, tokenizer, sep, dtype, block_size, path, meta_path)
        meta = _read_sidecar(meta_path, expect)
        if meta is None:
            raise ConfigError(
                f"corpus has {n_tokens} tokens, fewer than block_size={block_size}: "
                "use more text (data.max_chars / data.corpus) or a smaller data.block_size"
            )
        return PackedBlocks(path, block_size, meta["n_blocks"], dtype)


def _write_stream(
    texts: list[str],
    tokenizer,
    sep: int | None,
    dtype: str,
    block_size: int,
    path: Path,
    meta_path: Path,
) -> int:
    """Write the packed file and its sidecar atomically; return the total token count.

    Nothing is written when the stream holds less than one block.
    """
    backend = _backend(tokenizer)
    encode = getattr(backend, "encode_batch_fast", backend.encode_batch)  # fast: no offsets
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    n_tokens = 0
    try:
        with os.fdopen(fd, "wb") as f:
            for start in range(0, len(texts), _ENCODE_BATCH):
                batch = texts[start : start + _ENCODE_BATCH]
                pieces: list[int] = []
                for enc in encode(batch, add_special_tokens=False):
                    pieces.extend(enc.ids)
                    if sep is not None:
                        pieces.append(sep)
                arr = np.asarray(pieces, dtype=dtype)
                f.write(arr.tobytes())
                n_tokens += arr.size
            n_blocks = n_tokens // block_size
            f.truncate(n_blocks * block_size * np.dtype(dtype).itemsize)  # drop the tail
            f.flush()
            os.fsync(f.fileno())
        if n_blocks == 0:
            return n_tokens
        meta = {
            "format": _BLOCKS_FORMAT,
            "block_size": block_size,
            "dtype": dtype,
            "n_blocks": n_blocks,
            "n_tokens": n_tokens,
            "n_docs": len(texts),
            "vocab_size": len(tokenizer),
            "separator_id": sep,
        }
        # The data file goes into place first; the sidecar, renamed last, is what marks it valid.
        os.replace(tmp, path)
        tmp_meta = meta_path.with_name(f".{meta_path.name}.tmp-{os.getpid()}")
        tmp_meta.write_text(json.dumps(meta, indent=1))
        os.replace(tmp_meta, meta_path)
        return n_tokens
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
