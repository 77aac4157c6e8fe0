"""Batch collators: token blocks -> model inputs for causal and masked language modelling.

Example::

    batch = CausalLMCollator()([blocks[0], blocks[1]])
    batch = MaskedLMCollator(tokenizer)([blocks[0], blocks[1]])  # BERT 80/10/10 masking
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from colossus.errors import ConfigError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100
"""Label value that Hugging Face losses skip."""


def _stack(examples: Sequence[torch.Tensor], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack examples into ``[B, T]`` ids and an attention mask; right-pads unequal lengths."""
    if not examples:
        raise ValueError("cannot collate an empty batch")
    rows = [torch.as_tensor(e, dtype=torch.long).reshape(-1) for e in examples]
    length = max(r.numel() for r in rows)
    if all(r.numel() == length for r in rows):  # packed blocks: the common, copy-once path
        ids = torch.stack(rows)
        return ids, torch.ones_like(ids)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, : r.numel()] = r
        mask[i, : r.numel()] = 1
    return ids, mask


class CausalLMCollator:
    """``input_ids``, ``attention_mask`` and ``labels`` (a copy of the ids: HF models shift them
    internally). Unequal lengths are right-padded with ``pad_token_id``, labelled -100."""

    def __init__(self, pad_token_id: int = 0) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, examples: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
        ids, mask = _stack(examples, self.pad_token_id)
        labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


class MaskedLMCollator:
    """BERT masking: each non-special token is chosen with ``mlm_probability``; a chosen token
    becomes ``[MASK]`` 80% of the time, a random non-special token 10%, and stays itself 10%.
    ``labels`` hold the original id at chosen positions and -100 elsewhere; every batch has at
    least one chosen token (so the loss is never NaN).

    Randomness comes from torch's global RNG, so a run that saves and restores it (as the
    Trainer does on resume) masks identically; pass ``generator`` to use a private stream
    instead (e.g. a fixed-seed one for evaluation).
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        mlm_probability: float = 0.15,
        generator: torch.Generator | None = None,
    ) -> None:
        if tokenizer.mask_token_id is None:
            raise ConfigError(
                "masked_lm needs a tokenizer with a mask token; use a WordPiece tokenizer "
                "(data.tokenizer.kind=wordpiece) or one that defines [MASK]"
            )
        if not 0.0 < mlm_probability < 1.0:
            raise ConfigError(f"mlm_probability must be in (0, 1), got {mlm_probability}")
        self.mlm_probability = mlm_probability
        self.mask_token_id = int(tokenizer.mask_token_id)
        pad = tokenizer.pad_token_id
        self.pad_token_id = int(pad) if pad is not None else 0
        vocab = len(tokenizer)
        self.special_ids = torch.tensor(sorted(set(tokenizer.all_special_ids)), dtype=torch.long)
        is_special = torch.zeros(vocab, dtype=torch.bool)
        is_special[self.special_ids[self.special_ids < vocab]] = True
        # Random replacements come from ordinary tokens only: a random [CLS] or [PAD] inside a
        # sentence teaches nothing useful.
        self.replacement_ids = torch.nonzero(~is_special).flatten()
        self.generator = generator

    def __call__(self, examples: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
        ids, mask = _stack(examples, self.pad_token_id)
        g = self.generator
        special = torch.isin(ids, self.special_ids) | (mask == 0)
        probs = torch.full(ids.shape, self.mlm_probability).masked_fill_(special, 0.0)
        chosen = torch.bernoulli(probs, generator=g).bool()
        if not chosen.any():
            candidates = torch.nonzero(~special.flatten()).flatten()
            if candidates.numel():
                pick = candidates[torch.randint(candidates.numel(), (1,), generator=g)]
                chosen.view(-1)[pick] = True
        labels = ids.masked_fill(~chosen, IGNORE_INDEX)
        inputs = ids.clone()
        to_mask = torch.bernoulli(torch.full(ids.shape, 0.8), generator=g).bool() & chosen
        inputs[to_mask] = self.mask_token_id
        to_random = (
            torch.bernoulli(torch.full(ids.shape, 0.5), generator=g).bool() & chosen & ~to_mask
        )
        n_random = int(to_random.sum())
        if n_random:
            pick = torch.randint(len(self.replacement_ids), (n_random,), generator=g)
            inputs[to_random] = self.replacement_ids[pick]
        return {
            "input_ids": inputs,
            "attention_mask": mask,
            "token_type_ids": torch.zeros_like(inputs),
            "labels": labels,
        }
