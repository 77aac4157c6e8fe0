"""Layer factory of the 2d (Optimus), 2.5d (Tesseract) and 3d tensor-parallel modes for the
Hugging Face policies, on the grid layers of :mod:`parallel.tensor` (``make_linear``, ...).

Unlike 1D, a grid mode splits the activations too: the batch over the layout's row axes and the
hidden dimension over its hidden axis (``q`` parts). So the model's inputs are split by batch
rows before its forward (a pre-hook on the top module: ``input_ids`` / masks in layout ``"a"``,
``labels`` in the LM head's output layout), every layer on the residual stream is a grid layer
(embeddings, layer norms, linears; nothing stays replicated), the attention modules see
``n_heads / q`` whole heads of their batch rows, and the loss is the grid's vocabulary-parallel
cross-entropy (the mean over the whole tensor-parallel group's tokens, as in 1D).

In 3d a linear layer maps layout ``"a"`` to ``"b"``: "column" kinds (QKV, fc) take layout
``"a"``, "row" kinds (attention output, fc2) take ``"b"`` and return to ``"a"``.

Limits (each refused with a clear error): tied input / output embeddings (the embedding splits
the hidden dimension, the head the vocabulary: they cannot share one shard), heads that must
return full logits in 3d (BERT), norms other than LayerNorm / RMSNorm, and (3d) padding masks.
BERT (2d / 2.5d) keeps its own loss: its MLM head gathers the logits (differentiably) and the
labels stay whole.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from parallel.policies.base import KeyLayout, LayerFactory, PolicyError, Rule
from parallel.tensor.sharding import mark_sharded

_LAYOUT_KWARGS = ("input_ids", "attention_mask", "position_ids", "token_type_ids")


class LayerFactoryGrid(LayerFactory):
    """Grid layers for ``topology.tp_mode`` in 2d / 2.5d / 3d."""

    supports_tied_embeddings = False

    def __init__(self, topology: Any):
        super().__init__(topology)
        if topology.grid is None:
            raise PolicyError(
                f"tp_mode={topology.tp_mode} needs the topology's grid (torch.distributed up)"
            )
        self.grid = topology.grid
        self.mode = self.grid.mode
        self.row_layout = "b" if self.mode == "3d" else "a"
        self.out_split = self.grid.q  # the hidden axis of every layout has q ranks
        self.head_layout = "a"
        self.split_labels = True  # False when the head gathers full logits for the loss

    def _marked(self, new: nn.Module, full: nn.Module) -> nn.Module:
        # each parameter holds 1/replicas-th of its full tensor's elements; the global norm
        # weighs its square by 1/replicas (parallel.tensor.sharding.TPShard)
        tp = self.tp
        for name, p in new.named_parameters(recurse=False):
            f = getattr(full, name)
            replicas = max(1, tp * p.numel() // f.numel())
            mark_sharded(p, tuple(f.shape), -1, self.topology.tp_group, 0, tp, replicas)
        return new

    def column(self, linear, gather_output=False):
        from parallel.tensor import make_linear

        if gather_output:
            raise NotImplementedError(
                f"tp_mode={self.mode}: a layer that must return full outputs (gather_output)"
            )
        return self._marked(make_linear(self.grid, linear, "a"), linear)

    def row(self, linear):
        from parallel.tensor import make_linear

        return self._marked(make_linear(self.grid, linear, self.row_layout), linear)

    def embedding(self, emb):
        from parallel.tensor import make_embedding

        return self._marked(make_embedding(self.grid, emb, "a"), emb)

    def position(self, emb):
        return self.embedding(emb)  # ids [1, S] broadcast over the batch rows

    DENSE_3D = (
        "tp_mode=3d: a hidden -> hidden dense outside the column/row pairs (BERT's MLM "
        "transform); use 2d or 2.5d"
    )

    def dense(self, linear):
        from parallel.tensor import make_linear

        if self.mode == "3d":  # its output would be in layout "b", off the residual stream
            raise NotImplementedError(self.DENSE_3D)
        return self._marked(make_linear(self.grid, linear, "a"), linear)

    @classmethod
    def shard_fraction(cls, kind, pname, tp):
        # every grid layer (norms and position embeddings too) splits each parameter in tp
        # disjoint blocks: over the q x q (x depth / x q) grid, not replicated anywhere
        return 1.0 / tp

    def head(self, linear, gather_output):
        from parallel.tensor import gather_output as gather
        from parallel.tensor import make_head

        m = make_head(self.grid, linear, "a")
        self.head_layout = m.output_layout_name
        if gather_output:  # the model's own loss needs the full logits (BERT's MLM loss)
            self.split_labels = False
            grid, lay = self.grid, m.output_layout_name
            # differentiable: every rank computes the same loss from the full logits and the
            # backward keeps this rank's block (parallel.tensor.grid_ops.gather_output)
            m.register_forward_hook(lambda _m, _inp, out: gather(out, grid, lay))
        return self._marked(m, linear)

    def norm(self, module):
        from parallel.tensor import make_layernorm

        try:  # LayerNorm or RMSNorm (nn.RMSNorm, LlamaRMSNorm)
            grid_norm = make_layernorm(self.grid, module, "a")
        except TypeError as e:
            raise NotImplementedError(f"tp_mode={self.mode}: {e}") from None
        return self._marked(grid_norm, module)

    def vocab_cross_entropy(self, logits, target, ignore_index=-100, num_items=None):
        from parallel.tensor import cross_entropy

        if num_items is not None:
            raise NotImplementedError(f"tp_mode={self.mode}: num_items_in_batch")
        return cross_entropy(logits, target, self.grid, self.head_layout, ignore_index)

    def layouts(self, rule: Rule, module: nn.Module) -> dict[str, KeyLayout]:
        # dim -1: rebuilt in memory by the layer (full_weight), not by concatenating files
        if rule.kind in ("column", "head", "row") and (rule.parts > 1 or rule.conv1d):
            out = {"weight": KeyLayout(-1, self.out_split, rule.parts, rule.conv1d)}
            if getattr(module, "bias", None) is not None:
                out["bias"] = KeyLayout(-1, self.out_split, rule.parts)
            return out
        return {}

    # ---- inputs ---------------------------------------------------------------------------
    def prepare_inputs(self, model: nn.Module) -> None:
        from parallel.tensor import split_input

        grid, factory, mode = self.grid, self, self.mode

        def split(_mod, args, kwargs):
            kwargs = dict(kwargs)
            if args:  # positional input_ids
                kwargs["input_ids"], args = args[0], args[1:]
            if mode == "3d" and kwargs.get("attention_mask") is not None:
                if not bool(kwargs["attention_mask"].all()):
                    raise NotImplementedError(
                        "tp_mode=3d: padding attention masks (attention runs on the other "
                        "layout's batch rows); pack sequences without padding"
                    )
            for k in _LAYOUT_KWARGS:
                v = kwargs.get(k)
                if torch.is_tensor(v) and v.dim() >= 1 and v.shape[0] > 1:
                    kwargs[k] = split_input(v, grid, "a", hidden=False)
            if torch.is_tensor(kwargs.get("labels")) and factory.split_labels:
                kwargs["labels"] = split_input(
                    kwargs["labels"], grid, factory.head_layout, hidden=False
                )
            return args, kwargs

        model.register_forward_pre_hook(split, with_kwargs=True)
