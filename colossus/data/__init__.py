"""Data: a text corpus -> a locally trained tokenizer -> packed token blocks -> collators.

Example::

    from colossus.config import DataConfig
    from colossus.data import build_data
    data = build_data(DataConfig(max_chars=1_000_000, block_size=64), task="causal_lm")
    batch = data.collator([data.train[0], data.train[1]])

Everything built is cached under ``cfg.cache_dir`` and reused; several ranks on one machine may
call ``build_data`` at once (one builds under a lock, the others wait and read its files).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

from transformers import PreTrainedTokenizerFast

from colossus.config import DataConfig
from colossus.data.blocks import PackedBlocks, build_packed_blocks, tokenizer_fingerprint
from colossus.data.collators import CausalLMCollator, MaskedLMCollator
from colossus.data.corpus import corpus_fingerprint, load_documents, stdlib_files
from colossus.data.tokenizer import get_tokenizer, load_tokenizer, train_tokenizer
from colossus.errors import ConfigError

__all__ = [
    "CausalLMCollator",
    "DataBundle",
    "MaskedLMCollator",
    "PackedBlocks",
    "build_data",
    "build_packed_blocks",
    "corpus_fingerprint",
    "get_tokenizer",
    "load_documents",
    "load_tokenizer",
    "stdlib_files",
    "tokenizer_fingerprint",
    "train_tokenizer",
]

TASKS = ("causal_lm", "masked_lm")


@dataclass
class DataBundle:
    """What a Trainer needs from the data side."""

    train: PackedBlocks
    eval: PackedBlocks | None
    """None when the split left no validation documents (or too few tokens for one block)."""
    tokenizer: PreTrainedTokenizerFast
    collator: CausalLMCollator | MaskedLMCollator


def build_data(cfg: DataConfig, task: str, cache_root: str | Path | None = None) -> DataBundle:
    """Load the corpus, get the tokenizer, pack train / eval blocks and pick the collator.

    ``task`` is ``causal_lm`` or ``masked_lm`` (``ModelConfig.resolved_task``); ``cache_root``
    defaults to ``cfg.cache_dir``.
    """
    if task not in TASKS:
        raise ConfigError(f"task {task!r} is not one of: {', '.join(TASKS)}")
    root = Path(cache_root if cache_root is not None else cfg.cache_dir).expanduser()
    train_docs, val_docs = load_documents(cfg)
    if not train_docs:
        raise ConfigError(f"data.corpus {cfg.corpus!r}: the split left no training documents")
    tokenizer = get_tokenizer(cfg, task, train_docs, root)
    if task == "masked_lm":
        collator: CausalLMCollator | MaskedLMCollator = MaskedLMCollator(
            tokenizer, cfg.mlm_probability
        )
    else:
        pad = tokenizer.pad_token_id
        pad = pad if pad is not None else tokenizer.eos_token_id
        collator = CausalLMCollator(pad_token_id=int(pad) if pad is not None else 0)

    fp = corpus_fingerprint(cfg)
    blocks_dir = root / "blocks"
    train = build_packed_blocks(train_docs, tokenizer, cfg.block_size, blocks_dir, f"{fp}/train")
    eval_blocks = None
    if val_docs:
        try:
            eval_blocks = build_packed_blocks(
                val_docs, tokenizer, cfg.block_size, blocks_dir, f"{fp}/val"
            )
        except ConfigError as e:
            # A short validation split should not stop a run that has enough training data.
            warnings.warn(f"no eval set: validation split too small ({e})", stacklevel=2)
    return DataBundle(train=train, eval=eval_blocks, tokenizer=tokenizer, collator=collator)
