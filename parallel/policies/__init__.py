"""Tensor-parallel policies for Hugging Face models: :func:`parallelize` swaps a model's layers
for tensor-parallel ones IN PLACE (slicing its current, e.g. pretrained, weights) following the
policy of its architecture (``gpt2``, ``bert``, ``llama``); :func:`gather_state_dict` rebuilds
the full Hugging Face state dict (same keys, same layouts, GPT-2 ``Conv1D`` included), so
``save_pretrained`` / ``from_pretrained`` work on the result. The model's code is untouched.

Under a vocabulary-parallel LM head the logits a causal LM returns are this rank's slice of the
vocabulary (the loss never gathers them); :func:`full_logits` gathers them when needed.

Example (a world of one; under torchrun every rank runs the same lines)::

    >>> import torch
    >>> from transformers import GPT2Config, GPT2LMHeadModel
    >>> from parallel.policies import gather_state_dict, parallelize
    >>> from parallel.topology import Topology
    >>> cfg = GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32, n_positions=8, bos_token_id=0, eos_token_id=0)
    >>> model = GPT2LMHeadModel(cfg)
    >>> before = {k: v.clone() for k, v in model.state_dict().items()}
    >>> model = parallelize(model, Topology.from_world(tp=1))
    >>> after = gather_state_dict(model)
    >>> all(torch.equal(before[k], after[k]) for k in before)
    True
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from parallel.policies.base import (
    FACTORIES,
    KeyLayout,
    LayerFactory,
    LayerFactory1D,
    PolicyError,
    Rule,
    TPPlan,
    VocabParallelCausalLMLoss,
    apply_plan,
    consolidate,
    gather_state_dict,
    make_factory,
    register_factory,
)
from parallel.policies.bert import BertPolicy
from parallel.policies.gpt2 import GPT2Policy
from parallel.policies.grid_factory import LayerFactoryGrid
from parallel.policies.llama import LlamaPolicy
from parallel.tensor.mappings import gather_from_tp

POLICIES: dict[str, Any] = {"gpt2": GPT2Policy, "bert": BertPolicy, "llama": LlamaPolicy}
for _mode in ("2d", "2.5d", "3d"):
    register_factory(_mode, LayerFactoryGrid)


def policy_for(model: nn.Module) -> Any:
    mt = getattr(getattr(model, "config", None), "model_type", None)
    if mt not in POLICIES:
        raise PolicyError(
            f"no tensor-parallel policy for model_type {mt!r}; supported: {', '.join(POLICIES)}"
        )
    return POLICIES[mt]()


def parallelize(model: nn.Module, topology: Any, gather_logits: bool = False) -> nn.Module:
    """Split ``model`` over ``topology``'s tensor-parallel group in place; returns it.

    Every rank must hold the same full weights when this is called (same seed, or the same
    checkpoint). ``gather_logits=True`` makes the LM head return full logits and keeps the
    model's own loss (costs an all-gather of ``V`` values per token)."""
    if getattr(model, "_colossus_tp", None) is not None:
        raise PolicyError("the model is already parallelized")
    policy = policy_for(model)
    factory = make_factory(topology)
    _check(policy, model, topology.tp_mode, factory.out_split)
    rules = policy.rules(model)
    vocab_loss = policy.vocab_parallel_loss and not gather_logits
    if not vocab_loss:
        rules = [
            Rule(r.path, r.kind, r.parts, r.conv1d, True) if r.kind == "head" else r for r in rules
        ]
    try:
        plan = apply_plan(model, rules, topology, factory)
    except ValueError as e:  # a grid layer's block shape (PolicyError is a ValueError too)
        if isinstance(e, PolicyError):
            raise
        raise PolicyError(f"{policy.arch} under tp={topology.tp} ({topology.tp_mode}): {e}") from e
    policy.adjust(model, plan.factory.out_split)  # heads per rank = heads / out_split
    plan.factory.prepare_inputs(model)
    if vocab_loss and any(r.kind == "head" for r in rules):
        model.loss_function = VocabParallelCausalLMLoss(plan.factory)
    # set through object: nn.Module would not register a plain object, but be explicit
    object.__setattr__(model, "_colossus_tp", plan)
    return model


def _check(policy: Any, model: nn.Module, mode: str, out_split: int) -> None:
    # heads (and 1D's splits) must divide by the parts a column layer's outputs are split in:
    # tp in 1D, q in the grid modes (whose layers check their own block shapes)
    try:
        policy.check(model, out_split)
    except PolicyError as e:
        if mode == "1d":
            raise
        raise PolicyError(
            f"tp_mode={mode} splits heads over the grid side q={out_split}, "
            f"so 'tp' below means q: {e}"
        ) from None


def shard_fractions(
    model: nn.Module, tp: int, tp_mode: str = "1d", tp_depth: int = 1
) -> dict[str, float]:
    """Per parameter name (``model.named_parameters()``, a tied weight once): the fraction of it
    one rank holds after :func:`parallelize` over ``tp`` ranks in ``tp_mode`` (1.0 =
    replicated). Needs no process group and no memory (``model`` may be on ``meta``): it is
    what ``colossus plan`` uses. Raises what :func:`parallelize` would refuse: a bad grid shape
    (``TopologyError``), sizes ``tp`` does not divide or tied embeddings in a grid mode
    (:class:`PolicyError`), a layer kind the mode lacks (``NotImplementedError``).

    >>> from transformers import GPT2Config, GPT2LMHeadModel
    >>> cfg = GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32, n_positions=8)
    >>> f = shard_fractions(GPT2LMHeadModel(cfg), tp=2)
    >>> f["transformer.h.0.attn.c_attn.weight"], f["transformer.h.0.attn.c_proj.bias"]
    (0.5, 1.0)
    """
    from parallel.tensor.grid import check_shape
    from parallel.topology import check_tp_shape

    check_tp_shape(tp, tp_mode, tp_depth)  # no Topology: it would build process groups
    cls = FACTORIES[tp_mode]
    policy = policy_for(model)
    _check(policy, model, tp_mode, tp if tp_mode == "1d" else check_shape(tp_mode, tp, tp_depth))
    fractions = {n: 1.0 for n, _ in model.named_parameters()}
    names = {id(p): n for n, p in model.named_parameters()}
    ruled: dict[int, str] = {}
    for rule in policy.rules(model):
        if rule.kind == "dense" and tp_mode == "3d":
            raise NotImplementedError(LayerFactoryGrid.DENSE_3D)
        for pname, p in model.get_submodule(rule.path).named_parameters(recurse=False):
            key = f"{rule.path}.{pname}"
            if id(p) in ruled and not cls.supports_tied_embeddings:
                raise PolicyError(
                    f"tp_mode={tp_mode}: {ruled[id(p)]} is tied to {key}, but this mode "
                    "splits them differently; build the model with tie_word_embeddings=False "
                    "(or use tp_mode=1d)"
                )
            ruled[id(p)] = key
            fractions[names[id(p)]] = cls.shard_fraction(rule.kind, pname, tp)
    return fractions


def tp_plan(model: nn.Module) -> TPPlan | None:
    """What :func:`parallelize` did to ``model`` (None if it was not parallelized)."""
    return getattr(model, "_colossus_tp", None)


def full_logits(model: nn.Module, logits: torch.Tensor) -> torch.Tensor:
    """Gather vocabulary-split logits of a parallelized causal LM (identity otherwise)."""
    plan = tp_plan(model)
    if plan is None or logits.shape[-1] == model.config.vocab_size:
        return logits
    if plan.topology.tp_mode != "1d":
        from parallel.tensor import gather_output

        return gather_output(logits, plan.topology.grid, plan.factory.head_layout)
    return gather_from_tp(logits, plan.topology.tp_group, dim=-1)


__all__ = [
    "parallelize",
    "gather_state_dict",
    "consolidate",
    "full_logits",
    "shard_fractions",
    "tp_plan",
    "policy_for",
    "register_factory",
    "POLICIES",
    "FACTORIES",
    "KeyLayout",
    "LayerFactory",
    "LayerFactory1D",
    "PolicyError",
    "Rule",
    "TPPlan",
]
