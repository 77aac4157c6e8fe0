"""Sampling responses with Hugging Face ``generate`` (KV cache) and the demo task's parse rate.

Prompts are left-padded so every response starts at the same column; positions follow the
attention mask (as ``generate`` computes them), and every later forward over the same sequences
passes the same ``position_ids`` so log-probabilities match the sampling distribution.

Example::

    roll = sample(model, tok, [tok("def f(x):\\n")["input_ids"]], GenerationConfig())
    texts = decode_responses(tok, roll)
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

from colossus.config import GenerationConfig
from colossus.rlhf.data import pad_left, parses_in_context


@dataclass
class Rollout:
    sequences: torch.Tensor
    """``[B, P + R]``: left-padded prompts then responses (padded after their end)."""
    attention_mask: torch.Tensor
    """``[B, P + R]``: 1 on prompt and response tokens."""
    prompt_len: int
    """P: the padded prompt width."""

    @property
    def response_mask(self) -> torch.Tensor:
        return self.attention_mask[:, self.prompt_len :]

    @property
    def position_ids(self) -> torch.Tensor:
        return positions(self.attention_mask)


def positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids that skip left padding (what ``generate`` uses)."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


@lru_cache(maxsize=8)
def _stop_ids(tok, stop: str | None) -> tuple[int, ...]:
    ids = {tok.eos_token_id} if tok.eos_token_id is not None else set()
    if stop:
        for t in range(len(tok)):
            if stop in tok.decode([t]):
                ids.add(t)
    return tuple(sorted(ids))


def stop_token_ids(tok, stop: str | None) -> list[int]:
    """Token ids that end a response: eos and every token whose text contains ``stop``."""
    return list(_stop_ids(tok, stop))


@torch.no_grad()
def sample(
    model,
    tok,
    prompts: list[list[int]],
    gen: GenerationConfig,
    greedy: bool = False,
    synced: bool = False,
) -> Rollout:
    """One response per prompt (sampled with ``gen``, or greedy), cut after the stop token.
    ``synced``: every rank keeps running forwards until all ranks are done (ZeRO-3 sharded
    weights are gathered by collectives, so the ranks must run the same number)."""
    device = next(model.parameters()).device
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    rows = [torch.tensor(p, dtype=torch.long) for p in prompts]
    ids = pad_left(rows, pad).to(device)
    mask = pad_left([torch.ones_like(r) for r in rows], 0).to(device)
    stops = stop_token_ids(tok, gen.stop)
    was_training = model.training
    model.eval()
    out = model.generate(
        input_ids=ids,
        attention_mask=mask,
        do_sample=not greedy,
        temperature=None if greedy else gen.temperature,
        top_k=0 if greedy or gen.top_k is None else gen.top_k,
        top_p=None if greedy else gen.top_p,
        max_new_tokens=gen.max_new_tokens,
        eos_token_id=stops,
        pad_token_id=pad,
        use_cache=True,
        synced_gpus=synced,
    )
    model.train(was_training)
    resp = out[:, ids.shape[1] :]
    is_stop = torch.isin(resp, torch.tensor(stops, device=resp.device))
    # everything up to and including the first stop token belongs to the response
    after = (is_stop.long().cumsum(-1) - is_stop.long()) > 0
    rmask = (~after).long()
    return Rollout(out, torch.cat([mask, rmask], dim=1), ids.shape[1])


def decode_responses(tok, roll: Rollout, stop: str | None = "\n") -> list[str]:
    """Response texts, cut after the first ``stop`` (kept, as in the training data)."""
    texts = []
    for row, m in zip(roll.sequences[:, roll.prompt_len :], roll.response_mask):
        t = tok.decode(row[m.bool()].tolist(), skip_special_tokens=True)
        if stop and stop in t:
            t = t[: t.index(stop) + len(stop)]
        texts.append(t)
    return texts


def parse_rate(prompts: list[str], responses: list[str]) -> float:
    """Share of responses whose first line completes their prompt into valid Python."""
    if not prompts:
        return float("nan")
    return sum(parses_in_context(p, r) for p, r in zip(prompts, responses)) / len(prompts)
