"""GPT-2 (``GPT2Model`` / ``GPT2LMHeadModel`` and heads built on ``GPT2Model``).

Per block (1D): ``attn.c_attn`` (a ``Conv1D`` packing q, k, v: ``[H, 3H]``) is column-parallel with
its three parts split separately, so rank ``r`` holds heads ``r n_head/tp ...`` of q, k and v;
``attn.c_proj`` is row-parallel; ``mlp.c_fc`` column, ``mlp.c_proj`` row. ``wte`` is
vocabulary-parallel and ``lm_head`` (tied to it) is a vocabulary-parallel head whose logits stay
split: the loss is the vocabulary-parallel cross-entropy. Position embeddings and layer norms are
replicated (1D; in 2d / 2.5d / 3d they are grid layers too, and the input / output embeddings
must be untied). Each attention module's ``num_heads`` / ``split_size`` become the per-rank
values.
"""

from __future__ import annotations

from torch import nn

from parallel.policies.base import Rule, require_divisible


class GPT2Policy:
    arch = "gpt2"
    vocab_parallel_loss = True
    """The LM head's logits stay split; ``model.loss_function`` becomes vocabulary-parallel."""

    def check(self, model: nn.Module, tp: int) -> None:
        c = model.config
        if getattr(c, "add_cross_attention", False):
            raise NotImplementedError("gpt2 with cross-attention is not supported under tp > 1")
        require_divisible(
            "gpt2",
            {
                "n_head": c.n_head,
                "n_inner": c.n_inner or 4 * c.n_embd,
                "vocab_size": c.vocab_size,
            },
            tp,
        )

    def rules(self, model: nn.Module) -> list[Rule]:
        from transformers.models.gpt2.modeling_gpt2 import (
            GPT2MLP,
            GPT2Attention,
            GPT2Block,
            GPT2Model,
        )

        rules = []
        for name, mod in model.named_modules():
            p = f"{name}." if name else ""
            if isinstance(mod, GPT2Model):
                rules.append(Rule(f"{p}wte", "embedding"))
                rules.append(Rule(f"{p}wpe", "position"))
                rules.append(Rule(f"{p}ln_f", "norm"))
            elif isinstance(mod, GPT2Block):
                rules.append(Rule(f"{p}ln_1", "norm"))
                rules.append(Rule(f"{p}ln_2", "norm"))
            elif isinstance(mod, GPT2Attention):
                rules.append(Rule(f"{p}c_attn", "column", parts=3, conv1d=True))
                rules.append(Rule(f"{p}c_proj", "row", conv1d=True))
            elif isinstance(mod, GPT2MLP):
                rules.append(Rule(f"{p}c_fc", "column", conv1d=True))
                rules.append(Rule(f"{p}c_proj", "row", conv1d=True))
        if isinstance(getattr(model, "lm_head", None), nn.Linear):
            rules.append(Rule("lm_head", "head"))
        return rules

    def adjust(self, model: nn.Module, parts: int) -> None:
        from transformers.models.gpt2.modeling_gpt2 import GPT2Attention

        for mod in model.modules():
            if isinstance(mod, GPT2Attention):
                # forward splits c_attn's output in split_size pieces and infers heads from shape
                mod.num_heads //= parts
                mod.split_size //= parts
