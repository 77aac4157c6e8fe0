"""Tiny GPT-2 / Llama trained a few steps with sequence parallelism (per rank) or on one process
(the reference): same initialisation, same batches, AdamW; per-step losses are returned."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from parallel import comm
from parallel.sequence.data import (
    positions,
    shift_labels,
    sp_cross_entropy,
    split_batch,
    split_sequence,
)

VOCAB, SEQ, BATCH, STEPS, LR = 64, 16, 2, 10, 1e-2


def build(arch: str):
    torch.manual_seed(0)
    if arch == "gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel

        cfg = GPT2Config(
            n_layer=2, n_embd=32, n_head=4, vocab_size=VOCAB, n_positions=SEQ,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
        )  # fmt: skip
        return GPT2LMHeadModel(cfg)
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=SEQ,
        bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )  # fmt: skip
    return LlamaForCausalLM(cfg)


def batches(padded: bool):
    g = torch.Generator().manual_seed(5)
    out = []
    for _ in range(STEPS):
        # ramps (each token predicts the next) with 20% noise: the loss falls within 10 steps
        start = torch.randint(0, VOCAB, (BATCH, 1), generator=g)
        ids = (start + torch.arange(SEQ)) % VOCAB
        noise = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
        ids = torch.where(torch.rand(BATCH, SEQ, generator=g) < 0.8, ids, noise)
        mask = torch.ones(BATCH, SEQ, dtype=torch.long)
        if padded:  # right padding of row 1: padded keys masked, padded labels ignored
            mask[1, SEQ - 5 :] = 0
        labels = shift_labels(ids.masked_fill(mask == 0, -100))
        out.append((ids, mask, labels))
    return out


def reference_losses(arch: str, padded: bool) -> list[float]:
    model = build(arch)
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    losses = []
    for ids, mask, labels in batches(padded):
        logits = model(input_ids=ids, attention_mask=mask if padded else None).logits
        loss = F.cross_entropy(logits.reshape(-1, VOCAB), labels.reshape(-1), ignore_index=-100)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def sp_losses(arch: str, mode: str, padded: bool, group, layout: str = "zigzag") -> list[float]:
    from parallel.sequence.hf_attention import apply_sequence_parallel

    p, r = dist.get_world_size(group), dist.get_rank(group)
    model = apply_sequence_parallel(build(arch), group, mode=mode, layout=layout)
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    losses = []
    for ids, mask, _ in batches(padded):
        full = {"input_ids": ids} | ({"attention_mask": mask} if padded else {})
        part = split_batch(full, r, p, layout)  # shifts labels on the whole sequence
        labels = part.pop("labels")
        loss = sp_cross_entropy(model(**part).logits, labels, group)
        opt.zero_grad()
        loss.backward()
        # replicated parameters: sum the ranks' contributions (one flat all-reduce)
        grads = [prm.grad for prm in model.parameters()]
        flat = torch._utils._flatten_dense_tensors(grads)
        comm.all_reduce(flat, group=group)
        for g, f in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
            g.copy_(f)
        opt.step()
        losses.append(loss.item())
    return losses


def dp_sp_losses(arch: str, mode: str, layout: str = "zigzag") -> list[float]:
    """dp=2 x sp=2 (parallel.topology): each data-parallel rank trains one row of the batch with
    its sequence split over its sp group; gradients summed over sp, averaged over dp."""
    from parallel.sequence.hf_attention import apply_sequence_parallel
    from parallel.topology import Topology

    topo = Topology(dp=2, sp=2)
    p, r = topo.sp, topo.sp_rank
    model = apply_sequence_parallel(build(arch), topo.sp_group, mode=mode, layout=layout)
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    pos = positions(SEQ, r, p, layout)[None]
    losses = []
    for ids, _, labels in batches(False):
        row = slice(topo.dp_rank, topo.dp_rank + 1)
        ids, labels = (split_sequence(t[row], r, p, layout) for t in (ids, labels))
        loss = sp_cross_entropy(
            model(input_ids=ids, position_ids=pos).logits, labels, topo.sp_group
        )
        opt.zero_grad()
        loss.backward()
        grads = [prm.grad for prm in model.parameters()]
        flat = torch._utils._flatten_dense_tensors(grads)
        comm.all_reduce(flat, group=topo.sp_group)  # sum of the sequence shares
        comm.all_reduce(flat, group=topo.dp_group)  # mean over the rows (equal token counts)
        flat /= topo.dp
        for g, f in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
            g.copy_(f)
        opt.step()
        both = loss.detach().clone()
        comm.all_reduce(both, group=topo.dp_group)
        losses.append(both.item() / topo.dp)
    return losses


def worker(cases):
    group = dist.new_group(list(range(dist.get_world_size())))
    comm.register_group(group, "sp")
    out = {c: sp_losses(*c, group=group) for c in cases}
    out["dp2_sp2"] = dp_sp_losses("gpt2", "ring_attention")
    return out
