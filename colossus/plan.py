"""``colossus plan``: where a run's memory will live, before running it.

The model is built on the ``meta`` device (nothing allocated), the chunk manager lays out its
chunks and tiers in dry-run mode for the given number of ranks, and the plan reports per tier:
parameters, gradients, optimizer state (+ fp32 masters), staging / working buffers, activations
(an estimate, below), the disk the NVMe tier needs, and an estimate of the step time from the
measured matmul throughput and disk bandwidth. If the placement cannot fit the budgets the plan
says by how much, searches the offload fractions for one that fits, and exits with status 2.

Activations (per rank, fp32, no recomputation) follow Korthikanti et al. 2022 ("Reducing
Activation Recomputation in Large Transformer Models"): per layer ``s*b*h*(34 + 5*a*s/h)`` bytes in
16-bit, doubled for fp32; with activation checkpointing only each layer's input (``s*b*h``
values) is kept, plus one layer's worth during recomputation.

Tensor parallelism (``strategy.tp``, strategies none / ddp): parameters, gradients and AdamW
state per rank are what :func:`parallel.policies.shard_fractions` says each rank keeps of every
parameter (1/tp of the split layers; 1D keeps norms, position embeddings and row biases whole,
the grid modes split everything). Activations per layer follow Korthikanti et al.'s 1D formula
``s*b*h*(10 + 24/t + 5*a*s/(h*t))`` (layer norms, dropout and the layer input stay whole); the
grid modes (Optimus, Tesseract, 3D) split every activation by batch rows and hidden columns, so
``1/t`` of the no-parallelism figure (3D also keeps its gathered operands for backward: more).
The vocabulary-parallel logits are 1/t in every mode. ``--world-size`` counts every process
(dp = world / tp; the default 1 means one tensor-parallel group, world = tp).

Example::

    colossus plan recipes/gpt2-tiny-chunk.yaml --world-size 2
    colossus plan recipes/gpt2-tiny.yaml --set strategy.name=chunk --set strategy.chunk.host_budget=1GiB
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from colossus.config import TrainingConfig
from colossus.errors import ConfigError

GIB = 2**30


@dataclass
class Plan:
    params: int
    world_size: int
    strategy: str
    tiers: dict[str, dict[str, float]] = field(default_factory=dict)  # tier -> what -> bytes
    budgets: dict[str, int | None] = field(default_factory=dict)
    same_memory: bool = False  # CPU-only: device and host are one RAM, the host budget covers both
    step_flops: float = 0.0
    io_bytes_per_step: float = 0.0
    chunks: int = 0
    fractions: dict[str, float] = field(default_factory=dict)  # the placement (auto: chosen)
    ppo_models: list[dict[str, Any]] = field(default_factory=list)  # rlhf.stage=ppo: per model
    ppo_pool: list[dict[str, Any]] = field(default_factory=list)  # ppo under chunk: per model
    tp: int = 1
    tp_mode: str = "1d"
    local_params: float = 0.0  # parameters one rank holds (== params without tp)

    def total(self, tier: str) -> float:
        return sum(self.tiers.get(tier, {}).values())

    def need(self, tier: str) -> float:
        """Bytes the tier's budget must cover."""
        if tier == "host" and self.same_memory:
            return self.total("host") + self.total("device")
        return self.total(tier)

    def over(self) -> dict[str, float]:
        """Tiers whose need exceeds the budget, by how many bytes."""
        return {
            t: self.need(t) - b
            for t, b in self.budgets.items()
            if b is not None and self.need(t) > b
        }


def _meta_model(cfg: TrainingConfig):
    from accelerate import init_empty_weights
    from transformers import AutoConfig

    from colossus.models import _auto_class, build_hf_config

    if model_path_for_plan(cfg):
        hf = AutoConfig.from_pretrained(cfg.model.path)
    else:
        hf = build_hf_config(cfg.model, vocab_size=cfg.data.tokenizer.vocab_size)
    with init_empty_weights():
        model = _auto_class(cfg.model.resolved_task).from_config(hf)
    model.tie_weights()
    return model, hf


def model_path_for_plan(cfg: TrainingConfig) -> str | None:
    """``model.path``, unless an RLHF stage's input folder is not written yet (the previous
    stage has not run): then the plan uses ``model.arch`` / ``model.config``."""
    from pathlib import Path

    p = cfg.model.path
    if p and cfg.rlhf.stage and not (Path(p).expanduser() / "config.json").is_file():
        return None
    return p


def ppo_model_rows(cfg: TrainingConfig, n: int, hf: Any) -> list[dict[str, Any]]:
    """Per-model memory of PPO (strategy none / ddp: every rank holds all four): the actor and
    critic train (params + grads + AdamW state + activations of one minibatch), the reference
    and reward model only run forward; the actor also holds the KV cache of a rollout batch."""
    r, p = cfg.rlhf, cfg.rlhf.ppo
    seq = r.max_prompt_tokens + r.generation.max_new_tokens
    act = activation_bytes(hf, p.minibatch, seq, cfg.model.gradient_checkpointing)
    h = getattr(hf, "hidden_size", None) or getattr(hf, "n_embd", 0)
    layers = getattr(hf, "num_hidden_layers", None) or getattr(hf, "n_layer", 0)
    kv = 2 * layers * p.rollout_batch * seq * h * 4
    vocab = getattr(hf, "vocab_size", 0)
    n_scalar = n - (vocab * h if not getattr(hf, "tie_word_embeddings", True) else 0) + h
    rows = [
        {
            "name": "actor",
            "params": 4 * n,
            "grads": 4 * n,
            "optim_state": 8 * n,
            "activations": act,
            "kv_cache": kv,
        },
        {
            "name": "critic",
            "params": 4 * n_scalar,
            "grads": 4 * n_scalar,
            "optim_state": 8 * n_scalar,
            "activations": act,
            "kv_cache": 0,
        },
        {
            "name": "reference",
            "params": 4 * n,
            "grads": 0,
            "optim_state": 0,
            "activations": 0,
            "kv_cache": 0,
        },
        {
            "name": "reward",
            "params": 4 * n_scalar,
            "grads": 0,
            "optim_state": 0,
            "activations": 0,
            "kv_cache": 0,
        },
    ]
    for row in rows:
        row["total"] = sum(v for k, v in row.items() if k != "name")
    return rows


def activation_bytes(
    hf: Any, batch: int, seq: int, checkpointing: bool, tp: int = 1, tp_mode: str = "1d"
) -> float:
    """Per-rank activation memory of a transformer step (see the module docstring); ``batch``
    is the micro-batch one tensor-parallel group reads."""
    h = getattr(hf, "hidden_size", None) or getattr(hf, "n_embd", None)
    layers = getattr(hf, "num_hidden_layers", None) or getattr(hf, "n_layer", None)
    heads = getattr(hf, "num_attention_heads", None) or getattr(hf, "n_head", None)
    vocab = getattr(hf, "vocab_size", 0)
    if not (h and layers and heads):
        return 0.0
    grid = tp_mode != "1d"
    if tp > 1 and not grid:  # Korthikanti et al. Table 2, tensor parallel (no sequence par.)
        per_layer = seq * batch * h * (10 + 24 / tp + 5 * heads * seq / (h * tp)) * 2
    else:  # fp32: twice the 16-bit bytes; the grid modes split every activation tp ways
        per_layer = seq * batch * h * (34 + 5 * heads * seq / h) * 2 / (tp if grid else 1)
    logits = 3 * seq * batch * vocab * 4 / tp  # logits, their softmax and its gradient
    if checkpointing:  # the layer inputs: whole in 1D, split in the grid modes
        return layers * seq * batch * h * 4 / (tp if grid else 1) + per_layer + logits
    return layers * per_layer + logits


def tp_world_size(cfg: TrainingConfig, world_size: int) -> int:
    """The world a ``strategy.tp`` run is planned for (1 = one tensor-parallel group)."""
    tp = cfg.strategy.tp
    if world_size == 1:
        return tp
    if world_size % tp:
        ok = [tp * d for d in range(1, 5)]
        raise ConfigError(
            f"strategy.tp={tp} does not divide --world-size {world_size}; use a multiple of "
            f"{tp} ({', '.join(map(str, ok))}, ...)"
        )
    return world_size


def tp_local_params(model: Any, cfg: TrainingConfig) -> float:
    """Parameters one rank holds under ``cfg.strategy.tp`` (a tied weight once)."""
    from parallel.policies import PolicyError, shard_fractions
    from parallel.topology import TopologyError

    s = cfg.strategy
    try:
        frac = shard_fractions(model, s.tp, s.tp_mode, s.tp_depth)
    except (PolicyError, TopologyError, NotImplementedError) as e:
        raise ConfigError(f"strategy.tp={s.tp} ({s.tp_mode}): {e}") from None
    return sum(p.numel() * frac[n] for n, p in model.named_parameters())


def matmul_flops(seconds: float = 0.3) -> float:
    """fp32 matmul throughput of this process (FLOP/s), measured for ``seconds``."""
    a = torch.randn(1024, 1024)
    b = torch.randn(1024, 1024)
    a @ b
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        n += 1
    return n * 2 * 1024**3 / (time.perf_counter() - t0)


def make_plan(cfg: TrainingConfig, world_size: int = 1) -> Plan:
    model, hf = _meta_model(cfg)
    n = sum(p.numel() for p in model.parameters())
    tc = cfg.train
    tokens = tc.batch_size * cfg.data.block_size  # per rank per micro-batch
    ckpt = cfg.model.gradient_checkpointing
    tp, mode = cfg.strategy.tp, cfg.strategy.tp_mode
    if tp > 1 and cfg.strategy.name == "chunk":
        raise ConfigError(
            "strategy.tp > 1 does not compose with strategy.name=chunk yet; use "
            "strategy.name=ddp (data parallel over world / tp)"
        )
    if tp > 1:
        world_size = tp_world_size(cfg, world_size)
    plan = Plan(params=n, world_size=world_size, strategy=cfg.strategy.name, tp=tp, tp_mode=mode)
    plan.local_params = tp_local_params(model, cfg) if tp > 1 else n
    # per rank: a tensor-parallel group shares one micro-batch's work tp ways
    plan.step_flops = (8 if ckpt else 6) * n * tokens * tc.grad_accum / tp
    act = activation_bytes(hf, tc.batch_size, cfg.data.block_size, ckpt, tp, mode)
    if cfg.rlhf.stage == "ppo":  # four models, each whole on every rank (none / ddp)
        plan.ppo_models = ppo_model_rows(cfg, n, hf)
        if cfg.strategy.name == "chunk":
            return _ppo_chunk_plan(cfg, plan)
        parts = ("params", "grads", "optim_state", "activations", "kv_cache")
        plan.tiers["device"] = {k: sum(r[k] for r in plan.ppo_models) for k in parts}
        plan.budgets = {"device": None}
        return plan
    if cfg.strategy.name != "chunk":  # everything on the device, replicated on every dp rank
        m = plan.local_params
        plan.tiers["device"] = {
            "params": 4 * m,
            "grads": 4 * m,
            "optim_state": 8 * m,
            "activations": act,
        }
        plan.budgets = {"device": None}
        return plan
    from colossus.chunk_strategy import chunk_config

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sc = cfg.strategy.chunk
    auto = sc.placement == "auto"
    from offload import ChunkManager

    try:  # auto placement reserves the activation estimate on the device
        cc = chunk_config(sc, dev, activation_bytes=int(act) if auto else 0)
        mgr = ChunkManager(model, cc, dry_run_world_size=world_size)
    except ValueError:
        if not auto:
            raise
        # nothing fits: show the most offloading auto could choose, so the table says by how much
        most = {"placement": "static", "offload_param_frac": 1.0, "offload_optim_frac": 1.0}
        if sc.nvme_dir:
            most |= {"nvme_optim_frac": 1.0, "nvme_param_frac": 1.0}
        mgr = ChunkManager(
            model, chunk_config(sc.model_copy(update=most), dev), dry_run_world_size=world_size
        )
    plan.fractions = dict(mgr.fractions)
    plan.chunks = len(mgr.chunks)
    plan.same_memory = mgr.tiers["device"].device == mgr.tiers["host"].device
    by_tier: dict[str, dict[str, float]] = {t: {} for t in mgr.tiers}
    for c in mgr.chunks:
        w = mgr.dtype.itemsize
        _add(by_tier, c.param_tier, "params", c.shard_size * w)
        if c.requires_grad:
            grad_tier = "nvme" if c.param_tier == "nvme" else mgr._otier(c).name
            _add(by_tier, grad_tier, "grads", c.shard_size * 4)
            sep = mgr._separate_master(c)
            _add(by_tier, c.optim_tier, "optim_state", c.shard_size * 4 * (2 + int(sep)))
    for t, total in mgr.plan.items():  # what the manager adds: staging, gathered working set
        rest = total - sum(by_tier.get(t, {}).values())
        if t == "device":
            rest -= mgr.config.activation_bytes  # reported as activations below
        if rest > 0:
            _add(by_tier, t, "staging+working", rest)
    _add(by_tier, "device", "activations", act)
    plan.tiers = by_tier
    plan.budgets = {t: tier.budget for t, tier in mgr.tiers.items()}
    plan.budgets["nvme"] = None
    # bytes the NVMe tier moves per step (after the first): the manager's minimum
    io = mgr.min_nvme_bytes_per_step()
    plan.io_bytes_per_step = io
    return plan


def _ppo_chunk_plan(cfg: TrainingConfig, plan: Plan) -> Plan:
    """PPO under chunk: the four models' chunk managers laid out in dry-run in one memory pool
    (colossus.rlhf.ppo_memory): every model's state, plus the largest working set, plus the
    activations / KV cache of the model computing (one at a time), against the shared budgets."""
    from colossus.rlhf.ppo_memory import plan_pool

    pool = plan_pool(cfg, plan.world_size)
    needs = pool.needs()
    extra = {r["name"]: r for r in plan.ppo_models}
    for name, r in needs.items():
        act = {k: extra[name][k] for k in ("activations", "kv_cache")}
        plan.ppo_pool.append({"name": name, **r, **act})
    rows = needs.values()
    plan.tiers = {
        "device": {
            "model_state": sum(r["device_state"] for r in rows),
            "working (largest)": max(r["device_working"] for r in rows),
            "activations+kv": max(r["activations"] + r["kv_cache"] for r in plan.ppo_models),
        },
        "host": {
            "model_state": sum(r["host_state"] for r in rows),
            "working (largest)": max(r["host_working"] for r in rows),
        },
    }
    nvme = sum(r["nvme_state"] for r in rows)
    if nvme:
        plan.tiers["nvme"] = {"model_state": nvme}
    plan.budgets = dict(pool.budgets)
    plan.same_memory = pool._same_memory()
    plan.chunks = sum(len(m.chunks) for m in pool.members.values())
    return plan


def _add(d: dict[str, dict[str, float]], tier: str, what: str, nbytes: float) -> None:
    d.setdefault(tier, {})
    d[tier][what] = d[tier].get(what, 0) + nbytes


def suggest(cfg: TrainingConfig, world_size: int) -> str | None:
    """The least offloading that fits the budgets. With a GPU: offload fractions up in steps of
    0.25 first (device -> host), then NVMe; on a CPU-only box device and host are the same RAM,
    so only moving state to NVMe (``strategy.chunk.nvme_dir`` must be set) can help."""
    if cfg.strategy.name != "chunk":
        return None
    steps = [0.25, 0.5, 0.75, 1.0]
    oo, op = "strategy.chunk.offload_optim_frac=1.0", "strategy.chunk.offload_param_frac=1.0"
    trials: list[list[str]] = []
    if torch.cuda.is_available():
        trials += [[f"strategy.chunk.offload_optim_frac={f}"] for f in steps]
        trials += [[oo, f"strategy.chunk.offload_param_frac={f}"] for f in steps]
    if cfg.strategy.chunk.nvme_dir:
        trials += [[oo, f"strategy.chunk.nvme_optim_frac={f}"] for f in steps]
        nv = "strategy.chunk.nvme_optim_frac=1.0"
        trials += [[oo, op, nv, f"strategy.chunk.nvme_param_frac={f}"] for f in steps]
    for t in trials:
        try:
            c = cfg.with_overrides(t)
        except Exception:  # an invalid combination: skip it
            continue
        if not make_plan(c, world_size).over():
            return " ".join(f"--set {x}" for x in t)
    return None


def report_rows(plan: Plan) -> list[dict[str, Any]]:
    rows = []
    for tier, parts in plan.tiers.items():
        row: dict[str, Any] = {"name": tier}
        for k, v in parts.items():
            row[f"{k}_gib"] = v / GIB
        row["total_gib"] = plan.total(tier) / GIB
        b = plan.budgets.get(tier)
        row["budget_gib"] = "-" if b is None else b / GIB
        rows.append(row)
    return rows


def run_plan(cfg: TrainingConfig, world_size: int, disk_gbps: float | None) -> int:
    from colossus.bench.common import print_table

    plan = make_plan(cfg, world_size)
    tp = ""
    if plan.tp > 1:
        tp = (
            f", tp={plan.tp} ({plan.tp_mode}) x dp={plan.world_size // plan.tp}: "
            f"{plan.local_params / 1e9:.3f} B params per rank"
        )
    print_table(
        f"plan: {cfg.name}, {plan.params / 1e9:.3f} B params, strategy {plan.strategy}, "
        f"{plan.world_size} rank(s){tp}, {plan.chunks} chunks (per rank)",
        report_rows(plan),
    )
    if cfg.strategy.name == "chunk" and cfg.strategy.chunk.placement == "auto":
        chosen = " ".join(f"{k}={v:.3f}" for k, v in plan.fractions.items())
        print(f"placement=auto chose: {chosen}")
    if plan.ppo_pool:
        print_table(
            "plan: PPO memory per model under strategy chunk (GiB per rank; the four models "
            "share one budget, and compute one at a time)",
            [{k: v / GIB if k != "name" else v for k, v in r.items()} for r in plan.ppo_pool],
        )
        need = {t: _size(plan.need(t)) for t in ("device", "host")}
        budget = {t: "none" if b is None else _size(b) for t, b in plan.budgets.items()}
        print(
            f"shared budget: device needs {need['device']} (budget {budget['device']}), host "
            f"needs {need['host']} (budget {budget['host']})"
            + (" - one RAM here: the host budget covers both" if plan.same_memory else "")
        )
    elif plan.ppo_models:
        print_table(
            "plan: PPO memory per model (GiB, on every rank)",
            [{k: v / GIB if k != "name" else v for k, v in r.items()} for r in plan.ppo_models],
        )
    if cfg.model.path and not model_path_for_plan(cfg):
        print(
            f"note: {cfg.model.path} is not written yet (previous stage); planned with model.config"
        )
    flops = matmul_flops()
    compute = plan.step_flops / flops
    est = {"compute_s": compute, "matmul_gflops": flops / 1e9}
    if plan.io_bytes_per_step:
        bw = disk_gbps or _probe_disk(cfg)
        io = plan.io_bytes_per_step / (bw * 1e9)
        est |= {"nvme_gb_per_step": plan.io_bytes_per_step / 1e9, "disk_gbps": bw, "io_s": io}
        est["step_estimate_s"] = max(compute, io)
        est["nvme_disk_needed_gib"] = plan.total("nvme") / GIB
    else:
        est["step_estimate_s"] = compute
    print_table("plan: step estimate (compute and I/O overlap: max of the two)", [est])
    over = plan.over()
    if not over:
        print("fits the budgets.")
        return 0
    for t, extra in over.items():
        print(
            f"does not fit: the {t} tier needs {_size(plan.need(t))}, its budget is "
            f"{_size(plan.budgets[t])} ({_size(extra)} more)."
        )
    fix = suggest(cfg, world_size)
    if fix:
        print(f"would fit: {fix}")
    else:
        print(
            "no offload fraction fits: raise the budgets, add ranks"
            + (
                ""
                if cfg.strategy.chunk.nvme_dir
                else ", or set strategy.chunk.nvme_dir to use the NVMe tier"
            )
            + "."
        )
    return 2


def _size(n: float) -> str:
    for unit, k in (("GiB", GIB), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= k:
            return f"{n / k:.2f} {unit}"
    return f"{n:.0f} B"


def _probe_disk(cfg: TrainingConfig) -> float:
    from colossus.bench.nvme import probe

    d = cfg.strategy.chunk.nvme_dir
    if not d:
        return 2.0
    return probe(d, 256 << 20, 8, 4 << 20)["read_gbps"]
