"""The machinery every architecture policy shares.

A policy decides WHICH module of a Hugging Face model becomes WHAT kind of tensor-parallel layer
(:class:`Rule`: ``column``, ``row``, ``embedding``, ``head``, ``norm``); a per-mode
:class:`LayerFactory` decides HOW that kind is built (1D: Megatron's column / row layers; the 2D /
2.5D / 3D modes register their own factory). :func:`apply_plan` swaps the modules in place,
slicing the pretrained weights, re-ties shared weights and records, per Hugging Face state-dict
key, how to rebuild the full tensor (:class:`KeyLayout`), which :func:`gather_state_dict`
(collective, in memory) and :func:`consolidate` (offline, from per-rank files) use.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from parallel.tensor.cross_entropy_1d import vocab_parallel_cross_entropy
from parallel.tensor.embedding_1d import VocabParallelEmbedding
from parallel.tensor.linear_1d import ColumnParallelLinear, RowParallelLinear

KINDS = ("column", "row", "embedding", "position", "dense", "head", "norm")


class PolicyError(ValueError):
    """A model that cannot be split this way; the message says what would work."""


@dataclass(frozen=True)
class Rule:
    """Module at ``path`` becomes a ``kind`` layer.

    ``parts``: the output features are ``parts`` packed blocks (GPT-2's ``c_attn`` = q, k, v),
    each split over the ranks separately so every rank gets whole heads of q, k and v.
    ``conv1d``: the module is GPT-2's ``Conv1D`` (weight stored ``[in, out]``).
    ``gather_output``: a ``head`` whose caller needs the full logits."""

    path: str
    kind: str
    parts: int = 1
    conv1d: bool = False
    gather_output: bool = False


@dataclass(frozen=True)
class KeyLayout:
    """How the per-rank tensors of one state-dict key rebuild the Hugging Face tensor:
    concatenate the ``tp`` ranks' tensors along ``dim``, undo the ``parts`` packing
    (dim 0), then transpose when Hugging Face stores it ``[in, out]`` (``Conv1D``)."""

    dim: int
    tp: int
    parts: int = 1
    transpose: bool = False

    def to_hf(self, full: torch.Tensor) -> torch.Tensor:
        """Full tensor in ``nn.Linear`` rank order -> the Hugging Face tensor."""
        if self.parts > 1 and self.tp > 1:
            full = _unpack(full, self.parts, self.tp)
        return full.t().contiguous() if self.transpose else full


def _pack(t: torch.Tensor, parts: int, tp: int) -> torch.Tensor:
    """Rows ``[p0 | p1 | p2]`` -> ``[p0_r0 p1_r0 p2_r0 | p0_r1 ...]`` so contiguous rank slices
    hold one block of every part."""
    rest = t.shape[1:]
    return t.reshape(parts, tp, -1, *rest).transpose(0, 1).reshape(t.shape).contiguous()


def _unpack(t: torch.Tensor, parts: int, tp: int) -> torch.Tensor:
    rest = t.shape[1:]
    return t.reshape(tp, parts, -1, *rest).transpose(0, 1).reshape(t.shape).contiguous()


# ---- layer factories ------------------------------------------------------------------------


class LayerFactory:
    """Builds the parallel layer of each kind from the full module (interface)."""

    mode = "?"
    supports_tied_embeddings = True

    def __init__(self, topology: Any):
        self.topology = topology
        self.tp = topology.tp
        self.out_split = topology.tp
        """Parts the output features of a column layer are split into (heads per rank =
        heads / out_split)."""

    def column(self, linear: nn.Linear, gather_output: bool = False) -> nn.Module:
        raise NotImplementedError

    def row(self, linear: nn.Linear) -> nn.Module:
        raise NotImplementedError

    def embedding(self, emb: nn.Embedding) -> nn.Module:
        raise NotImplementedError

    def head(self, linear: nn.Linear, gather_output: bool) -> nn.Module:
        raise NotImplementedError

    def norm(self, module: nn.Module) -> nn.Module:
        return module

    def position(self, emb: nn.Embedding) -> nn.Module:
        """Position embeddings (1D: replicated, the module itself)."""
        return emb

    def dense(self, linear: nn.Linear) -> nn.Module:
        """A hidden -> hidden linear outside the column/row pairs (BERT's MLM transform) that
        must return the residual stream's layout (1D: replicated, the module itself)."""
        return linear

    def prepare_inputs(self, model: nn.Module) -> None:
        """Hook the model's inputs where the mode splits activations (1D: nothing)."""

    def vocab_cross_entropy(self, logits, target, ignore_index=-100, num_items=None):
        raise NotImplementedError

    def layouts(self, rule: Rule, module: nn.Module) -> dict[str, KeyLayout]:
        """Per parameter name of the built module: how ranks' tensors rebuild the full one."""
        raise NotImplementedError

    @classmethod
    def shard_fraction(cls, kind: str, pname: str, tp: int) -> float:
        """Fraction of parameter ``pname`` of a ``kind`` layer one rank holds (1.0: replicated);
        answered without building anything, for memory plans (``colossus plan``)."""
        raise NotImplementedError


class LayerFactory1D(LayerFactory):
    """Megatron-LM 1D: column / row linears, vocabulary-parallel embedding and head."""

    mode = "1d"

    def __init__(self, topology: Any):
        super().__init__(topology)
        self.group = topology.tp_group

    def column(self, linear, gather_output=False):
        return ColumnParallelLinear.from_linear(linear, self.group, gather_output=gather_output)

    def row(self, linear):
        return RowParallelLinear.from_linear(linear, self.group, input_is_parallel=True)

    def embedding(self, emb):
        return VocabParallelEmbedding.from_embedding(emb, self.group)

    def head(self, linear, gather_output):
        return self.column(linear, gather_output=gather_output)

    def vocab_cross_entropy(self, logits, target, ignore_index=-100, num_items=None):
        return vocab_parallel_cross_entropy(
            logits, target, self.group, ignore_index=ignore_index, num_items=num_items
        )

    def layouts(self, rule, module):
        tp = self.tp
        if rule.kind in ("column", "head"):
            out = {"weight": KeyLayout(0, tp, rule.parts, rule.conv1d)}
            if getattr(module, "bias", None) is not None:
                out["bias"] = KeyLayout(0, tp, rule.parts)
            return out
        if rule.kind == "row":  # the bias is replicated
            return {"weight": KeyLayout(1, tp, 1, rule.conv1d)}
        if rule.kind == "embedding":
            return {"weight": KeyLayout(0, tp)}
        return {}

    @classmethod
    def shard_fraction(cls, kind, pname, tp):
        # as layouts(): column / head / embedding split every parameter, row only its weight
        if kind in ("column", "head", "embedding") or (kind == "row" and pname == "weight"):
            return 1.0 / tp
        return 1.0


FACTORIES: dict[str, type[LayerFactory]] = {"1d": LayerFactory1D}


def register_factory(mode: str, cls: type[LayerFactory]) -> None:
    """Plug in the layer factory of a tensor-parallel mode (2d, 2.5d, 3d)."""
    FACTORIES[mode] = cls


def make_factory(topology: Any) -> LayerFactory:
    mode = topology.tp_mode
    if mode not in FACTORIES:
        raise NotImplementedError(
            f"tp_mode={mode}: no layer factory for Hugging Face policies yet "
            f"(available: {', '.join(sorted(FACTORIES))})"
        )
    return FACTORIES[mode](topology)


# ---- checks ---------------------------------------------------------------------------------


def require_divisible(arch: str, sizes: dict[str, int], tp: int) -> None:
    """One error naming every size ``tp`` does not divide and the tp values that divide all."""
    bad = {k: v for k, v in sizes.items() if v % tp}
    if not bad:
        return
    g = 0
    for v in sizes.values():
        g = math.gcd(g, v)
    ok = [d for d in range(1, min(g, 64) + 1) if g % d == 0]
    msg = (
        f"{arch}: tensor-parallel size tp={tp} does not divide "
        + ", ".join(f"{k}={v}" for k, v in bad.items())
        + f"; tp values that divide all of {', '.join(sizes)}: {ok}"
    )
    if any("vocab" in k for k in bad):
        msg += (
            f" (or pad the vocabulary: model.resize_token_embeddings(len(tokenizer), "
            f"pad_to_multiple_of={tp}))"
        )
    raise PolicyError(msg)


# ---- applying a plan ------------------------------------------------------------------------


def conv1d_to_linear(conv: nn.Module) -> nn.Linear:
    """GPT-2's ``Conv1D`` (``y = x W + b`` with ``W: [in, out]``) as the equal ``nn.Linear``."""
    n_in, n_out = conv.weight.shape
    lin = nn.Linear(n_in, n_out, bias=conv.bias is not None, device="meta")
    lin.weight = nn.Parameter(conv.weight.detach().t())
    if conv.bias is not None:
        lin.bias = nn.Parameter(conv.bias.detach())
    return lin


def _packed(lin: nn.Linear, parts: int, tp: int) -> nn.Linear:
    if parts == 1 or tp == 1:
        return lin
    out = nn.Linear(lin.in_features, lin.out_features, bias=lin.bias is not None, device="meta")
    out.weight = nn.Parameter(_pack(lin.weight.detach(), parts, tp))
    if lin.bias is not None:
        out.bias = nn.Parameter(_pack(lin.bias.detach(), parts, tp))
    return out


@dataclass
class TPPlan:
    """What :func:`apply_plan` did to a model (kept on it as ``model._colossus_tp``)."""

    topology: Any = field(repr=False)
    factory: LayerFactory = field(repr=False)
    rules: list[Rule]
    layouts: dict[str, KeyLayout]
    """Hugging Face state-dict key -> how to rebuild it; keys absent here are replicated."""
    aliases: dict[str, str] = field(default_factory=dict)
    """Keys of tied weights -> the key whose tensor they share (gathered once)."""

    def layout_json(self) -> dict[str, Any]:
        return {
            "tp": self.topology.tp,
            "keys": {k: asdict(v) for k, v in self.layouts.items()},
            "aliases": dict(self.aliases),
        }


def apply_plan(
    model: nn.Module, rules: list[Rule], topology: Any, factory: LayerFactory | None = None
) -> TPPlan:
    """Swap every ruled module for its parallel layer (in place) and re-tie shared weights."""
    factory = factory or make_factory(topology)
    tp = factory.out_split
    # shared parameters (GPT-2 lm_head / wte): remember who shares what before swapping
    owners: dict[int, list[tuple[str, str]]] = {}
    for mname, mod in model.named_modules(remove_duplicate=False):
        for pname, p in mod.named_parameters(recurse=False):
            owners.setdefault(id(p), []).append((mname, pname))
    swapped: dict[tuple[str, str], nn.Parameter] = {}
    old_ids: dict[tuple[str, str], int] = {}
    layouts: dict[str, KeyLayout] = {}
    for rule in rules:
        if rule.kind not in KINDS:
            raise ValueError(f"unknown rule kind {rule.kind!r} (one of {KINDS})")
        parent_name, _, attr = rule.path.rpartition(".")
        parent = model.get_submodule(parent_name)
        old = getattr(parent, attr)
        for pname, p in old.named_parameters(recurse=False):
            old_ids[(rule.path, pname)] = id(p)
        src = conv1d_to_linear(old) if rule.conv1d else old
        if rule.kind == "column":
            new = factory.column(_packed(src, rule.parts, tp), gather_output=rule.gather_output)
        elif rule.kind == "row":
            new = factory.row(src)
        elif rule.kind == "embedding":
            new = factory.embedding(src)
        elif rule.kind == "position":
            new = factory.position(src)
        elif rule.kind == "dense":
            new = factory.dense(src)
        elif rule.kind == "head":
            new = factory.head(_packed(src, rule.parts, tp), gather_output=rule.gather_output)
        else:
            new = factory.norm(src)
        setattr(parent, attr, new)
        for pname, p in new.named_parameters(recurse=False):
            swapped[(rule.path, pname)] = p
        for pname, lay in factory.layouts(rule, new).items():
            layouts[f"{rule.path}.{pname}"] = lay
    # re-tie: every (module, name) that shared a swapped parameter gets the first swapped copy,
    # and its state-dict key becomes an alias (gathered once, copied on export)
    aliases: dict[str, str] = {}
    for (path, pname), pid in old_ids.items():
        sharers = owners.get(pid, [])
        first = (path, pname)
        if len(sharers) < 2 or first != next(s for s in sharers if s in swapped):
            continue
        tgt = swapped[first]
        swapped_sharers = [s for s in sharers if s in swapped and s != first]
        if swapped_sharers and not factory.supports_tied_embeddings:
            others = ", ".join(f"{m}.{n}" for m, n in swapped_sharers)
            raise PolicyError(
                f"tp_mode={factory.mode}: {path}.{pname} is tied to {others}, but this mode "
                "splits them differently; build the model with tie_word_embeddings=False "
                "(or use tp_mode=1d)"
            )
        for s in sharers:
            if s == first:
                continue
            mod = model.get_submodule(s[0])
            if s in swapped and swapped[s].shape != tgt.shape:
                raise PolicyError(
                    f"tied weights {path}.{pname} and {s[0]}.{s[1]} are split differently"
                )
            setattr(mod, s[1], tgt)
            aliases[f"{s[0]}.{s[1]}"] = f"{path}.{pname}"
            layouts.pop(f"{s[0]}.{s[1]}", None)
    return TPPlan(topology, factory, list(rules), layouts, aliases)


def gather_state_dict(model: nn.Module, to_cpu: bool = True) -> dict[str, torch.Tensor]:
    """The full Hugging Face state dict of a parallelized model (collective over its tensor-
    parallel group: every rank must call it; every rank gets the whole dict)."""
    plan: TPPlan | None = getattr(model, "_colossus_tp", None)
    sd = model.state_dict()
    if plan is None:
        return {k: (v.detach().cpu() if to_cpu else v.detach()) for k, v in sd.items()}
    gathered: dict[str, torch.Tensor] = {}
    for rule in plan.rules:
        mod = model.get_submodule(rule.path)
        if hasattr(mod, "full_params"):
            fulls = mod.full_params()
        elif hasattr(mod, "full_weight"):  # the grid layers (parallel.tensor, 2d / 2.5d / 3d)
            fulls = {"weight": mod.full_weight()}
            if getattr(mod, "bias", None) is not None:
                fulls["bias"] = mod.full_bias()
        else:
            continue
        for pname, full in fulls.items():
            key = f"{rule.path}.{pname}"
            if key in plan.aliases:
                continue
            lay = plan.layouts.get(key)
            gathered[key] = lay.to_hf(full) if lay is not None else full
    out = {}
    for k, v in sd.items():
        t = gathered.get(plan.aliases.get(k, k))
        t = v.detach() if t is None else t
        out[k] = t.cpu() if to_cpu else t
    return out


def consolidate(
    rank_state_dicts: list[dict[str, torch.Tensor]], layout: dict[str, Any]
) -> dict[str, torch.Tensor]:
    """The full Hugging Face state dict from the per-tensor-parallel-rank state dicts (rank
    order) and :meth:`TPPlan.layout_json`; no process group needed (``colossus export``)."""
    keys = {k: KeyLayout(**v) for k, v in layout["keys"].items()}
    if len(rank_state_dicts) != layout["tp"]:
        raise ValueError(
            f"layout is for tp={layout['tp']} ranks, got {len(rank_state_dicts)} state dicts"
        )
    aliases = layout.get("aliases", {})
    dicts = []
    for sd in rank_state_dicts:  # a file may hold a tied tensor under either of its names
        sd = dict(sd)
        for alias, src in aliases.items():
            if alias in sd:
                sd.setdefault(src, sd[alias])
                del sd[alias]
        dicts.append(sd)
    out = {}
    for k, v in dicts[0].items():
        lay = keys.get(k)
        if lay is None:
            out[k] = v
        else:
            out[k] = lay.to_hf(torch.cat([sd[k] for sd in dicts], dim=lay.dim))
    for alias, src in aliases.items():
        if src in out:  # a tied weight the per-rank files stored once
            out[alias] = out[src]
    return out


class VocabParallelCausalLMLoss:
    """Drop-in for Hugging Face's ``ForCausalLMLoss`` (``model.loss_function``) over logits
    split by vocabulary: the same label shift and ``ignore_index``, no gather of the logits."""

    def __init__(self, factory: LayerFactory):
        self.factory = factory

    def __call__(
        self,
        logits: torch.Tensor,
        labels: torch.Tensor,
        vocab_size: int | None = None,
        num_items_in_batch: torch.Tensor | None = None,
        ignore_index: int = -100,
        shift_labels: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        if shift_labels is None:
            labels = torch.nn.functional.pad(labels, (0, 1), value=ignore_index)
            shift_labels = labels[..., 1:]
        shift_labels = shift_labels.to(logits.device).contiguous()
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(logits.device)
        return self.factory.vocab_cross_entropy(
            logits.float(), shift_labels, ignore_index=ignore_index, num_items=num_items_in_batch
        )
