"""Tokenizers trained locally with Hugging Face ``tokenizers`` (no download), cached on disk.

Example::

    from colossus.data.tokenizer import train_tokenizer
    tok = train_tokenizer(["def f(x):\\n    return x\\n"] * 100, "bpe", vocab_size=300)
    assert tok.decode(tok.encode("def f(x):")) == "def f(x):"
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

from tokenizers import (
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)
from transformers import PreTrainedTokenizerFast

from colossus.config import DataConfig
from colossus.data._cache import file_lock, stable_hash
from colossus.data.corpus import corpus_fingerprint
from colossus.errors import ConfigError

EOT = "<|endoftext|>"
BERT_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")

# Bumped when training settings change, so tokenizers cached by older code are not reused.
_TOKENIZER_FORMAT = 1


def _bpe(vocab_size: int) -> tuple[Tokenizer, trainers.Trainer]:
    tok = Tokenizer(models.BPE())
    # No prefix space and no offset trimming: decode(encode(x)) == x exactly, whitespace included.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodable: no unknowns
        show_progress=False,
    )
    return tok, trainer


def _wordpiece(vocab_size: int) -> tuple[Tokenizer, trainers.Trainer]:
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    # Code is case-sensitive, so keep case (BERT's uncased default would merge Name and name).
    tok.normalizer = normalizers.BertNormalizer(lowercase=False, strip_accents=False)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size, special_tokens=list(BERT_SPECIALS), show_progress=False
    )
    return tok, trainer


def train_tokenizer(
    texts: Iterable[str], kind: Literal["bpe", "wordpiece"], vocab_size: int
) -> PreTrainedTokenizerFast:
    """Train a tokenizer on ``texts`` and wrap it for ``transformers``.

    ``bpe``: GPT-2 style byte-level BPE; ``<|endoftext|>`` is bos, eos, unk and pad.
    ``wordpiece``: BERT style (cased) with ``[PAD] [UNK] [CLS] [SEP] [MASK]``; encoding a text
    adds ``[CLS] ... [SEP]`` unless ``add_special_tokens=False``.
    Byte-level BPE always holds the 256 bytes plus ``<|endoftext|>``, so its vocabulary is at
    least 257 whatever ``vocab_size`` says; use ``len(tokenizer)`` for the model's vocabulary.
    """
    if kind == "bpe":
        tok, trainer = _bpe(vocab_size)
    elif kind == "wordpiece":
        tok, trainer = _wordpiece(vocab_size)
    else:
        raise ConfigError(f"tokenizer kind {kind!r} is not one of: bpe, wordpiece")
    tok.train_from_iterator(texts, trainer=trainer)

    if kind == "bpe":
        return PreTrainedTokenizerFast(
            tokenizer_object=tok,
            bos_token=EOT,
            eos_token=EOT,
            unk_token=EOT,
            pad_token=EOT,
            clean_up_tokenization_spaces=False,
        )
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="[PAD]",
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        clean_up_tokenization_spaces=False,
    )


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerFast:
    """Load a tokenizer directory (``save_pretrained`` output); a missing one is a ConfigError."""
    p = Path(path).expanduser()
    if not p.is_dir():
        raise ConfigError(f"data.tokenizer.path: {path!r} is not a directory")
    try:
        return PreTrainedTokenizerFast.from_pretrained(str(p))
    except (OSError, ValueError) as e:
        raise ConfigError(
            f"data.tokenizer.path: cannot load a fast tokenizer from {p}: {e}"
        ) from None


def resolve_kind(cfg: DataConfig, task: str) -> str:
    """The tokenizer kind for a run: the configured one, else WordPiece for masked LMs."""
    return cfg.tokenizer.kind or ("wordpiece" if task == "masked_lm" else "bpe")


def get_tokenizer(
    cfg: DataConfig, task: str, train_texts: list[str], cache_root: Path
) -> PreTrainedTokenizerFast:
    """The run's tokenizer: ``cfg.tokenizer.path`` if set, else one trained on ``train_texts``.

    A trained tokenizer is cached under ``cache_root/tokenizers/<key>``, the key hashing the
    corpus fingerprint, kind and vocab size, and is reused when present. Concurrent callers
    (ranks on one machine) wait on a lock and all load the one directory that was written.
    """
    if cfg.tokenizer.path:
        return load_tokenizer(cfg.tokenizer.path)
    kind = resolve_kind(cfg, task)
    vocab_size = cfg.tokenizer.vocab_size
    key = stable_hash(_TOKENIZER_FORMAT, corpus_fingerprint(cfg), kind, vocab_size)
    root = Path(cache_root).expanduser() / "tokenizers"
    final = root / key
    if not (final / "tokenizer.json").is_file():
        with file_lock(root / f".{key}.lock"):
            if not (final / "tokenizer.json").is_file():  # another rank may have built it
                tok = train_tokenizer(train_texts, kind, vocab_size)  # type: ignore[arg-type]
                tmp = Path(tempfile.mkdtemp(prefix=f".{key}.tmp-", dir=root))
                try:
                    tok.save_pretrained(str(tmp))
                    try:
                        os.replace(tmp, final)
                    except OSError:
                        # rename onto a non-empty directory fails: another writer won the race
                        # (only without flock), and everyone must use its tokenizer, not ours.
                        if not (final / "tokenizer.json").is_file():
                            raise
                finally:
                    shutil.rmtree(tmp, ignore_errors=True)
    # Load from disk even right after training, so every rank holds byte-identical tokenizers.
    return PreTrainedTokenizerFast.from_pretrained(str(final))
