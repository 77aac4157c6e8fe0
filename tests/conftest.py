import os

import pytest
import torch

# Tests run on 2 cores; spawned ranks each get one thread so they do not thrash.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def tiny_gpt2(vocab: int = 128, seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(
        n_layer=2,
        n_embd=32,
        n_head=4,
        vocab_size=vocab,
        n_positions=32,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
    )
    return GPT2LMHeadModel(cfg)


def token_blocks(n: int = 64, seq: int = 16, vocab: int = 128, seed: int = 1):
    """Random blocks with a learnable pattern (each token predicts the next: t+1 mod vocab half
    the time), so loss visibly falls in a few dozen steps."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        start = torch.randint(0, vocab, (1,), generator=g)
        ramp = (start + torch.arange(seq)) % vocab
        noise = torch.randint(0, vocab, (seq,), generator=g)
        keep = torch.rand(seq, generator=g) < 0.8
        out.append(torch.where(keep, ramp, noise))
    return out


@pytest.fixture
def blocks():
    return token_blocks()
