"""BERT (``BertModel``, ``BertForMaskedLM`` and other heads built on ``BertModel``).

Per layer: ``attention.self.{query,key,value}`` are column-parallel (whole heads per rank),
``attention.output.dense`` row-parallel; ``intermediate.dense`` column, ``output.dense`` row.
``embeddings.word_embeddings`` is vocabulary-parallel; position / token-type embeddings, layer
norms, the pooler and the MLM transform are replicated (1D; in 2d / 2.5d they are grid layers,
with untied input / output embeddings; 3d is refused). The MLM decoder (tied to the word
embeddings, with its bias tied to ``cls.predictions.bias``) is a vocabulary-parallel head that
GATHERS its logits: ``BertForMaskedLM.forward`` computes ``CrossEntropyLoss`` on
``prediction_scores.view(-1, vocab_size)`` itself, so it needs the full logits.
"""

from __future__ import annotations

from torch import nn

from parallel.policies.base import Rule, require_divisible


class BertPolicy:
    arch = "bert"
    vocab_parallel_loss = False  # see the module docstring: the model's own loss needs full logits

    def check(self, model: nn.Module, tp: int) -> None:
        c = model.config
        if getattr(c, "is_decoder", False) or getattr(c, "add_cross_attention", False):
            raise NotImplementedError("bert as a decoder / with cross-attention: not under tp > 1")
        require_divisible(
            "bert",
            {
                "num_attention_heads": c.num_attention_heads,
                "intermediate_size": c.intermediate_size,
                "vocab_size": c.vocab_size,
            },
            tp,
        )

    def rules(self, model: nn.Module) -> list[Rule]:
        from transformers.models.bert.modeling_bert import (
            BertAttention,
            BertEmbeddings,
            BertIntermediate,
            BertLMPredictionHead,
            BertOutput,
            BertPredictionHeadTransform,
        )

        rules = []
        for name, mod in model.named_modules():
            p = f"{name}." if name else ""
            if isinstance(mod, BertEmbeddings):
                rules.append(Rule(f"{p}word_embeddings", "embedding"))
                rules.append(Rule(f"{p}position_embeddings", "position"))
                rules.append(Rule(f"{p}token_type_embeddings", "position"))
                rules.append(Rule(f"{p}LayerNorm", "norm"))
            elif isinstance(mod, BertAttention):
                for proj in ("query", "key", "value"):
                    rules.append(Rule(f"{p}self.{proj}", "column"))
                rules.append(Rule(f"{p}output.dense", "row"))
                rules.append(Rule(f"{p}output.LayerNorm", "norm"))
            elif isinstance(mod, BertIntermediate):
                rules.append(Rule(f"{p}dense", "column"))
            elif isinstance(mod, BertOutput):
                rules.append(Rule(f"{p}dense", "row"))
                rules.append(Rule(f"{p}LayerNorm", "norm"))
            elif isinstance(mod, BertPredictionHeadTransform):
                rules.append(Rule(f"{p}dense", "dense"))
                rules.append(Rule(f"{p}LayerNorm", "norm"))
            elif isinstance(mod, BertLMPredictionHead):
                rules.append(Rule(f"{p}decoder", "head", gather_output=True))
        return rules

    def adjust(self, model: nn.Module, tp: int) -> None:
        from transformers.models.bert.modeling_bert import BertSelfAttention

        for mod in model.modules():
            if isinstance(mod, BertSelfAttention):  # forward infers heads from the shape
                mod.num_attention_heads //= tp
                mod.all_head_size //= tp
