"""Tiny GPT-2 (learned positions) and tiny Llama (rotary, grouped K/V heads) trained 10 AdamW
steps with sp=4 on gloo, each variant, match the single-process losses within 1e-4 on every rank
(GPT-2 on right-padded batches); and dp=2 x sp=2 from parallel.topology."""

from __future__ import annotations

import pytest
from sp_hf_cases import reference_losses, worker
from spawn_helpers import spawn

MODES = ["ring_attention", "ring_self_attention", "ulysses"]
# GPT-2 on right-padded batches (key padding mask + ignored labels), Llama unpadded
CASES = [(arch, mode, arch == "gpt2") for arch in ("gpt2", "llama") for mode in MODES]


@pytest.mark.slow
def test_sp4_training_matches_single_process(tmp_path):
    res = spawn(worker, 4, tmp_path, CASES)
    refs = {(a, pad): reference_losses(a, pad) for a, _, pad in CASES}
    for case in CASES:
        ref = refs[(case[0], case[2])]
        assert ref[-1] < ref[0]  # it trains
        for r, got in enumerate(res):
            err = max(abs(a - b) for a, b in zip(got[case], ref))
            assert err <= 1e-4, (case, r, err, got[case], ref)
    # dp=2 x sp=2 through parallel.topology: the same losses as one process on both rows
    ref = reference_losses("gpt2", False)
    for r, got in enumerate(res):
        err = max(abs(a - b) for a, b in zip(got["dp2_sp2"], ref))
        assert err <= 1e-4, ("dp2_sp2", r, err)


def test_policy_refusals():
    from sp_hf_cases import build
    from transformers import BertConfig, BertModel

    from parallel.sequence.hf_attention import apply_sequence_parallel

    with pytest.raises(ValueError, match="policy for .*gpt2.*not model_type='bert'"):
        apply_sequence_parallel(
            BertModel(BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                 intermediate_size=32, vocab_size=32))
        )  # fmt: skip
    with pytest.raises(ValueError, match="unknown sp_mode 'ring'"):
        apply_sequence_parallel(build("gpt2"), mode="ring")


def test_trainer_checks():
    from parallel.sequence.hf_attention import check_sequence_parallel

    check_sequence_parallel(4, "ulysses", seq_len=64, heads=8)
    check_sequence_parallel(4, "ring_attention", seq_len=24, heads=6, tp=2)
    with pytest.raises(ValueError, match=r"L % \(2\*sp\) == 0"):
        check_sequence_parallel(4, "ring_attention", seq_len=20)
    with pytest.raises(
        ValueError, match=r"heads=8, tp=2 -> 4 heads per rank.*valid sp: \[1, 2, 4\]"
    ):
        check_sequence_parallel(8, "ulysses", heads=8, tp=2)
    with pytest.raises(ValueError, match="no attention dropout"):
        check_sequence_parallel(2, attn_dropout=0.1)
