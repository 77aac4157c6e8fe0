"""Sequence parallelism for Hugging Face GPT-2 and Llama: a policy that swaps the models' attention
for one of the sequence-parallel variants, without touching the model code.

transformers dispatches attention through a registry (``AttentionInterface``; the model reads
``config._attn_implementation``) and builds masks through a second one
(``AttentionMaskInterface``). We register ``"colossus_sp"`` in both: the mask function hands the
2D key padding mask through unchanged (the local causal mask HF would build is wrong for a rank's
slice of the sequence; causality comes from global positions inside the variant), and the
attention function calls the variant with the process group and layout that
:func:`apply_sequence_parallel` attached to each attention module.

The caller feeds each rank its tokens and their global ``position_ids`` (learned positions of
GPT-2 and rotary positions of Llama both read them), computes the loss with
:func:`parallel.sequence.data.sp_cross_entropy`, and sums parameter gradients over the group
(parameters are replicated). Attention dropout is not supported (refused when training).

Example (one process; a group of one is plain attention)::

    >>> import torch
    >>> from transformers import GPT2Config, GPT2LMHeadModel
    >>> from parallel.sequence.hf_attention import apply_sequence_parallel
    >>> cfg = GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32, attn_pdrop=0.0,
    ...                  bos_token_id=0, eos_token_id=0)
    >>> model = GPT2LMHeadModel(cfg).eval()
    >>> ids = torch.randint(0, 32, (1, 8))
    >>> ref = model(ids).logits
    >>> _ = apply_sequence_parallel(model, mode="ring_attention")
    >>> torch.allclose(model(ids).logits, ref, atol=1e-5)
    True
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from parallel import SP_MODES
from parallel.sequence.data import LAYOUTS

IMPLEMENTATION = "colossus_sp"
SUPPORTED_MODELS = ("gpt2", "llama")


@dataclass(frozen=True)
class SequenceParallelAttention:
    """What one attention module runs: the variant, its process group and the token layout."""

    mode: str = "ring_attention"
    group: object = None
    layout: str = "zigzag"

    def fn(self):
        if self.mode == "ring_attention":
            from parallel.sequence.ring_attention import ring_attention

            return ring_attention
        if self.mode == "ring_self_attention":
            from parallel.sequence.ring_self_attention import ring_self_attention

            return ring_self_attention
        from parallel.sequence.ulysses import ulysses_attention

        return ulysses_attention


def _repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    # grouped-query attention: the variants take as many K/V heads as query heads
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def sp_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
):
    """The ``AttentionInterface`` function: (B, H, n, D) in, (B, n, H, D) out, no weights."""
    sp: SequenceParallelAttention | None = getattr(module, "_colossus_sp", None)
    if sp is None:
        raise RuntimeError(
            f"attn_implementation={IMPLEMENTATION!r} on a module that apply_sequence_parallel "
            f"did not prepare ({type(module).__name__})"
        )
    if dropout:
        raise ValueError(
            "sequence-parallel attention does not implement attention dropout; "
            "set the model's attention dropout to 0"
        )
    if attention_mask is not None and attention_mask.dim() != 2:
        raise ValueError(
            f"sequence-parallel attention takes a 2D key padding mask, got {attention_mask.dim()}D"
        )
    # no "all ones -> None" shortcut: whether a mask is passed must agree on every rank of the
    # group (it is all-gathered), and a rank whose tokens are all real would skip the collective
    kpm = None if attention_mask is None else attention_mask.bool()
    groups = query.shape[1] // key.shape[1]
    key, value = _repeat_kv(key, groups), _repeat_kv(value, groups)
    causal = kwargs.get("is_causal")
    causal = getattr(module, "is_causal", True) if causal is None else causal
    out = sp.fn()(
        query,
        key,
        value,
        sp.group,
        causal=bool(causal),
        key_padding_mask=kpm,
        layout=sp.layout,
        scale=scaling,
    )
    return out.transpose(1, 2).contiguous(), None


def sp_mask(*args, attention_mask: torch.Tensor | None = None, **kwargs):
    """The ``AttentionMaskInterface`` function: the 2D padding mask as it came (or None)."""
    return attention_mask


def register() -> None:
    """Register ``"colossus_sp"`` with transformers' attention and mask registries (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(IMPLEMENTATION, sp_attention_forward)
    AttentionMaskInterface.register(IMPLEMENTATION, sp_mask)


def _attention_modules(model: nn.Module) -> list[nn.Module]:
    mt = getattr(model.config, "model_type", None)
    if mt not in SUPPORTED_MODELS:
        raise ValueError(
            f"sequence parallelism has a policy for {SUPPORTED_MODELS}, not model_type={mt!r}"
        )
    from transformers.models.gpt2.modeling_gpt2 import GPT2Attention
    from transformers.models.llama.modeling_llama import LlamaAttention

    cls = GPT2Attention if mt == "gpt2" else LlamaAttention
    mods = [m for m in model.modules() if isinstance(m, cls)]
    if mt == "gpt2" and any(getattr(m, "is_cross_attention", False) for m in mods):
        raise ValueError("sequence parallelism does not support GPT-2 cross-attention")
    if mt == "gpt2" and model.config.reorder_and_upcast_attn:
        raise ValueError("sequence parallelism does not support reorder_and_upcast_attn=True")
    return mods


def check_sequence_parallel(
    sp: int,
    mode: str = "ring_attention",
    *,
    seq_len: int | None = None,
    heads: int | None = None,
    tp: int = 1,
    layout: str = "zigzag",
    attn_dropout: float = 0.0,
) -> None:
    """Raise ``ValueError`` (saying what would be valid) when ``sp`` cannot run ``mode``: the
    checks a trainer makes before any work starts. ``heads`` is the model's attention heads;
    with tensor parallelism each rank holds ``heads / tp`` of them, which Ulysses splits again."""
    if sp < 1:
        raise ValueError(f"sp must be >= 1, got {sp}")
    if mode not in SP_MODES:
        raise ValueError(f"unknown sp_mode {mode!r}; expected one of {SP_MODES}")
    if seq_len is not None:
        from parallel.sequence.data import check_length

        check_length(seq_len, sp, layout)
    if mode == "ulysses" and heads is not None and sp > 1:
        if heads % tp or (heads // tp) % sp:
            local = heads // tp if heads % tp == 0 else heads / tp
            ok = [s for s in range(1, heads + 1) if heads % tp == 0 and (heads // tp) % s == 0]
            raise ValueError(
                f"ulysses splits each rank's heads over sp: heads={heads}, tp={tp} -> {local} "
                f"heads per rank, not divisible by sp={sp}; valid sp: {ok} (or use ring_attention)"
            )
    if attn_dropout and sp > 1:
        raise ValueError(
            f"sequence-parallel attention has no attention dropout (got {attn_dropout}); set it to 0"
        )


def apply_sequence_parallel(
    model: nn.Module, group=None, mode: str = "ring_attention", layout: str = "zigzag"
) -> nn.Module:
    """Make ``model`` (GPT-2 or Llama) run its attention with the ``mode`` variant over
    ``group``; returns ``model`` (changed in place). ``mode`` in ``parallel.SP_MODES``,
    ``layout`` in ``contiguous | zigzag`` (how the caller split the tokens)."""
    if mode not in SP_MODES:
        raise ValueError(f"unknown sp_mode {mode!r}; expected one of {SP_MODES}")
    if layout not in LAYOUTS:
        raise ValueError(f"unknown sequence layout {layout!r}; expected one of {LAYOUTS}")
    mods = _attention_modules(model)
    if mode == "ulysses":
        from parallel import comm

        check_sequence_parallel(comm._world(group), mode, heads=model.config.num_attention_heads)
    register()
    sp = SequenceParallelAttention(mode=mode, group=group, layout=layout)
    for m in mods:
        m._colossus_sp = sp
    model.set_attn_implementation(IMPLEMENTATION)
    return model


__all__ = [
    "IMPLEMENTATION",
    "SequenceParallelAttention",
    "apply_sequence_parallel",
    "check_sequence_parallel",
    "register",
]
