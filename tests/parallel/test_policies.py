"""Policies on real Hugging Face models against single-process training: tiny GPT-2 and Llama
(grouped-query attention) trained 10 AdamW steps under tp=2 give the losses of the unsplit model
within 1e-4 on every rank, and the gathered state dict, saved with save_pretrained, loads with
from_pretrained and gives the reference logits; BERT masked-LM forward loss and every gathered
gradient equal the unsplit model's. Per-rank parameter memory of the split layers is 1/tp.
One 2-rank spawn runs every case."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from spawn_helpers import spawn

from parallel.policies import PolicyError, full_logits, gather_state_dict, parallelize, tp_plan
from parallel.tensor.sharding import gather_full, tp_shard
from parallel.topology import Topology

VOCAB, SEQ = 128, 16


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=VOCAB, n_positions=32,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0,
                     eos_token_id=0)  # fmt: skip
    return GPT2LMHeadModel(cfg)


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                      max_position_embeddings=32, bos_token_id=0, eos_token_id=0,
                      pad_token_id=None, tie_word_embeddings=False)  # fmt: skip
    return LlamaForCausalLM(cfg)


def _bert():
    from transformers import BertConfig, BertForMaskedLM

    cfg = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, vocab_size=VOCAB, max_position_embeddings=32,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)  # fmt: skip
    return BertForMaskedLM(cfg)


def _batches(n, b=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (b, SEQ), generator=g) for _ in range(n)]


def _train(model, batches):
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    losses = []
    for ids in batches:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def _split_param_bytes(model):
    split = sum(p.numel() for p in model.parameters() if tp_shard(p) is not None)
    full = sum(
        torch.Size(tp_shard(p).full_shape).numel()
        for p in model.parameters()
        if tp_shard(p) is not None
    )
    return split, full


def _causal_case(build, name, out_dir, topo):
    torch.manual_seed(0)
    model = build()
    ref = copy.deepcopy(model)
    batches = _batches(10)
    ref_losses = _train(ref, batches)
    parallelize(model, topo)
    split, full = _split_param_bytes(model)
    losses = _train(model, batches)
    res = {
        "loss_diff": max(abs(a - b) for a, b in zip(losses, ref_losses)),
        "mem_ratio": split / full,
        "n_split": split,
    }
    ids = batches[0]
    with torch.no_grad():
        ref_logits = ref(input_ids=ids).logits
        res["logits_diff"] = float(
            (full_logits(model, model(input_ids=ids).logits) - ref_logits).abs().max()
        )
    sd = gather_state_dict(model)
    ref_sd = ref.state_dict()
    res["keys_equal"] = set(sd) == set(ref_sd)
    res["sd_diff"] = max(
        float((sd[k] - ref_sd[k]).abs().max()) for k in ref_sd if "c_attn.bias" not in k
    )
    if dist.get_rank() == 0:  # an HF folder: from_pretrained must load it as is
        from transformers import AutoModelForCausalLM

        fresh = type(ref)(ref.config)
        fresh.load_state_dict(sd)
        fresh.save_pretrained(out_dir / name)
        loaded = AutoModelForCausalLM.from_pretrained(out_dir / name)
        with torch.no_grad():
            res["export_logits_diff"] = float(
                (loaded(input_ids=ids).logits - ref_logits).abs().max()
            )
    return res


def _bert_case(topo):
    torch.manual_seed(0)
    model = _bert()
    ref = copy.deepcopy(model)
    ids = _batches(1)[0]
    labels = ids.clone()
    labels[:, ::3] = -100
    ref_out = ref(input_ids=ids, labels=labels)
    ref_out.loss.backward()
    parallelize(model, topo)
    out = model(input_ids=ids, labels=labels)
    out.loss.backward()
    ref_grads = {n: p.grad for n, p in ref.named_parameters()}
    diffs = {}
    for n, p in model.named_parameters():
        diffs[n] = float(gather_full(p.grad, like=p).sub(ref_grads[n]).abs().max())
    split, full = _split_param_bytes(model)
    return {
        "loss_diff": abs(out.loss.item() - ref_out.loss.item()),
        "logits_diff": float((out.logits - ref_out.logits).abs().max()),
        "grad_diff": max(diffs.values()),
        "n_grads": len(diffs),
        "mem_ratio": split / full,
        "tied": model.cls.predictions.decoder.weight
        is model.bert.embeddings.word_embeddings.weight,
    }


def _worker(out_dir):
    out_dir = Path(out_dir)
    topo = Topology.from_world(tp=dist.get_world_size())
    res = {
        "gpt2": _causal_case(_gpt2, "gpt2", out_dir, topo),
        "llama": _causal_case(_llama, "llama", out_dir, topo),
        "bert": _bert_case(topo),
    }
    m = _gpt2()
    parallelize(m, topo)
    res["gpt2_tied"] = m.lm_head.weight is m.transformer.wte.weight
    res["gpt2_heads"] = m.transformer.h[0].attn.num_heads
    res["plan_rules"] = len(tp_plan(m).rules)
    return res


@pytest.mark.slow
def test_policies_match_single_process(tmp_path):
    res = spawn(_worker, 2, tmp_path, tmp_path)
    for rank, r in enumerate(res):
        for arch in ("gpt2", "llama"):
            c = r[arch]
            assert c["loss_diff"] < 1e-4, (rank, arch, c)
            assert c["logits_diff"] < 1e-4, (rank, arch, c)
            assert c["keys_equal"] and c["sd_diff"] < 1e-4, (rank, arch, c)
            assert c["mem_ratio"] == 0.5 and c["n_split"] > 0, (rank, arch, c)
            if rank == 0:
                assert c["export_logits_diff"] < 1e-4, (arch, c)
        b = r["bert"]
        assert b["loss_diff"] < 1e-5 and b["logits_diff"] < 1e-5, b
        assert b["grad_diff"] < 1e-5 and b["n_grads"] > 20, b
        assert b["mem_ratio"] == 0.5 and b["tied"], b
        assert r["gpt2_tied"] and r["gpt2_heads"] == 2
        assert r["plan_rules"] == 2 * 6 + 4  # 6 per block + wte, wpe, ln_f, lm_head


@pytest.mark.parametrize(
    ("build", "tp", "msg"),
    [
        (_gpt2, 3, "gpt2: tensor-parallel size tp=3 does not divide n_head=4, n_inner=128, vocab_size=128; tp values that divide all of n_head, n_inner, vocab_size: [1, 2, 4]"),
        (_llama, 4, "llama: tensor-parallel size tp=4 does not divide num_key_value_heads=2"),
        (_bert, 3, "pad_to_multiple_of=3"),
    ],
)  # fmt: skip
def test_indivisible_shapes_say_what_works(build, tp, msg):
    model = build()
    with pytest.raises(PolicyError) as e:
        parallelize(model, Topology(dp=None, tp=tp, world_size=tp))
    assert msg in str(e.value)
