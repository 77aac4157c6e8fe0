"""Llama (``LlamaModel`` / ``LlamaForCausalLM``), grouped-query attention included.

Per layer: ``self_attn.{q,k,v}_proj`` are column-parallel: rank ``r`` holds query heads
``r n_heads/tp ...`` and key/value heads ``r n_kv_heads/tp ...`` (so the query heads of a rank
use exactly its key/value heads: both counts must be divisible by tp); ``o_proj`` is row-parallel;
``mlp.{gate,up}_proj`` column, ``down_proj`` row. ``embed_tokens`` is vocabulary-parallel and
``lm_head`` a vocabulary-parallel head whose logits stay split (vocabulary-parallel loss).
RMSNorms are replicated in 1D (grid RMSNorms in 2d / 2.5d / 3d, where heads split over the
grid side q instead of tp); the rotary embedding stays local (it acts per head).
The attention modules need no change: they infer the head count from the projections' shapes
and ``num_key_value_groups`` (heads per kv head) is the same on every rank.
"""

from __future__ import annotations

from torch import nn

from parallel.policies.base import Rule, require_divisible


class LlamaPolicy:
    arch = "llama"
    vocab_parallel_loss = True

    def check(self, model: nn.Module, tp: int) -> None:
        c = model.config
        require_divisible(
            "llama",
            {
                "num_attention_heads": c.num_attention_heads,
                "num_key_value_heads": c.num_key_value_heads or c.num_attention_heads,
                "intermediate_size": c.intermediate_size,
                "vocab_size": c.vocab_size,
            },
            tp,
        )

    def rules(self, model: nn.Module) -> list[Rule]:
        from transformers.models.llama.modeling_llama import (
            LlamaAttention,
            LlamaDecoderLayer,
            LlamaMLP,
            LlamaModel,
        )

        rules = []
        for name, mod in model.named_modules():
            p = f"{name}." if name else ""
            if isinstance(mod, LlamaModel):
                rules.append(Rule(f"{p}embed_tokens", "embedding"))
                rules.append(Rule(f"{p}norm", "norm"))
            elif isinstance(mod, LlamaDecoderLayer):
                rules.append(Rule(f"{p}input_layernorm", "norm"))
                rules.append(Rule(f"{p}post_attention_layernorm", "norm"))
            elif isinstance(mod, LlamaAttention):
                for proj in ("q_proj", "k_proj", "v_proj"):
                    rules.append(Rule(f"{p}{proj}", "column"))
                rules.append(Rule(f"{p}o_proj", "row"))
            elif isinstance(mod, LlamaMLP):
                rules.append(Rule(f"{p}gate_proj", "column"))
                rules.append(Rule(f"{p}up_proj", "column"))
                rules.append(Rule(f"{p}down_proj", "row"))
        if isinstance(getattr(model, "lm_head", None), nn.Linear):
            rules.append(Rule("lm_head", "head"))
        return rules

    def adjust(self, model: nn.Module, tp: int) -> None:
        pass
