"""The one typed schema for a run: YAML recipes, CLI ``--set`` overrides and the Python API.

Example::

    from colossus.config import TrainingConfig
    cfg = TrainingConfig.from_yaml("recipes/gpt2-tiny.yaml", overrides=["optim.lr=3e-4"])
    assert cfg.optim.lr == 3e-4
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ByteSize,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from colossus.errors import ConfigError

ENCODER_TYPES = frozenset(
    {"bert", "roberta", "distilbert", "electra", "deberta", "deberta-v2", "albert"}
)
"""HF model types trained as masked LMs by default."""


class _Section(BaseModel):
    # extra="forbid" is what turns a typo in a recipe into an error instead of a silent default.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


class ModelConfig(_Section):
    arch: str = "gpt2"
    """Hugging Face ``model_type`` (gpt2, bert, llama, ...) used with ``AutoConfig.for_model``."""
    path: str | None = None
    """Local directory for ``from_pretrained``; when set, ``arch`` / ``config`` are ignored."""
    task: Literal["causal_lm", "masked_lm"] | None = None
    """Defaults to masked_lm for encoder architectures (bert, roberta, ...), causal_lm otherwise."""
    config: dict[str, Any] = Field(default_factory=dict)
    """Overrides on the architecture's default config (n_layer, hidden_size, ...)."""
    gradient_checkpointing: bool = False
    lazy_init: bool = False
    """Build the model on the ``meta`` device and let strategy ``chunk`` materialise it chunk by
    chunk straight into its tier, so a model larger than RAM can be created; with ``path``, the
    weights stream from the checkpoint tensor by tensor. Needs ``strategy.name: chunk``."""

    @property
    def resolved_task(self) -> str:
        if self.task:
            return self.task
        return "masked_lm" if self.arch in ENCODER_TYPES else "causal_lm"


class TokenizerConfig(_Section):
    path: str | None = None
    """A local tokenizer directory (``PreTrainedTokenizerFast.from_pretrained``); else one is trained."""
    kind: Literal["bpe", "wordpiece"] | None = None
    """Trained tokenizer type; defaults to byte-level BPE for causal LMs, WordPiece for masked LMs."""
    vocab_size: int = Field(4096, gt=0)


class DataConfig(_Section):
    corpus: str | list[str] = "python-stdlib"
    """``python-stdlib`` (the running interpreter's standard library sources), or paths / globs of
    text files, or ``.jsonl`` files whose ``text_field`` holds the text."""
    text_field: str = "text"
    max_chars: int | None = Field(None, gt=0)
    """Use at most this many characters of the corpus (for quick runs); None = all of it."""
    val_fraction: float = Field(0.05, ge=0.0, lt=1.0)
    block_size: int = Field(128, gt=1)
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig)
    mlm_probability: float = Field(0.15, gt=0.0, lt=1.0)
    cache_dir: str = ".cache/colossus"


_OPTIM_ONLY: dict[str, tuple[str, ...]] = {
    # options that mean something for some optimizers only; setting one for another is an error
    "fused": ("adamw", "lamb", "lars"),
    "flat": ("lamb", "lars"),
    "bias_correction": ("lamb",),
    "phi_min": ("lamb",),
    "phi_max": ("lamb",),
    "trust_clip": ("lamb",),
    "betas": ("adamw", "lamb"),
    "momentum": ("lars",),
    "nesterov": ("lars",),
    "trust_coefficient": ("lars",),
    "larc_clip": ("lars",),
    "lr_inside_momentum": ("lars",),
    "exclude": ("lamb", "lars"),
    "exclude_1d": ("lamb", "lars"),
    "exclude_from_adaptation": ("lamb", "lars"),
    "max_grad_norm": ("lamb", "lars"),
}
_DEFAULT_EPS = {"adamw": 1e-8, "lamb": 1e-6, "lars": 0.0}
_DEFAULT_BETAS = {"adamw": (0.9, 0.95), "lamb": (0.9, 0.999)}


class OptimConfig(_Section):
    """Optimizer. LAMB / LARS defaults follow the papers; every option on which implementations
    disagree is here (see :mod:`colossus.optim.lamb`, :mod:`colossus.optim.lars`). Setting an
    option of another optimizer (``momentum`` with ``name: lamb``) is an error."""

    name: Literal["adamw", "lamb", "lars"] = "adamw"
    """``adamw`` (torch, fused), ``lamb`` (You et al. 2019), ``lars`` (You et al. 2017)."""
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    """Decoupled weight decay (excluded parameters get 0)."""
    betas: tuple[float, float] | None = None
    """None = (0.9, 0.95) for adamw, the paper's (0.9, 0.999) for lamb."""
    eps: float | None = Field(None, ge=0)
    """None = 1e-8 for adamw, the paper's 1e-6 for lamb, 0 for lars (added to its denominator)."""
    fused: bool | None = None
    """adamw: None = fused kernel where torch has one for the device (CPU and CUDA in torch >= 2.4).
    lamb / lars: the kernels ``torch.compile`` builds (:mod:`offload.trust_fused`: LAMB in two
    passes over memory instead of 14 element accesses per parameter); None = on CPU when they
    compile (else one warning and the multi-tensor path), true = required, false = never."""
    flat: bool | None = None
    """lamb / lars: each param group's parameters, gradients and moments in one flat buffer
    (``Lamb(flat=True)``, :mod:`colossus.optim.flat`): one compiled call per group instead of
    one per tensor, LAMB ~1.44x fused AdamW instead of ~1.75x on CPU (``colossus bench optim``).
    Applies where the fused kernels run (CPU) to groups of plain fp32 tensors (LARS: with
    ``momentum > 0``); other groups silently take the per-tensor path. Same numbers as the
    per-tensor path (a parameter backward does not reach is skipped on both). None (default) =
    on for lamb / lars with strategies none / ddp / sp, off with ``strategy.name: chunk`` (its
    own chunk optimizer) and ``strategy.tp > 1`` (sharded trust ratios) and with ``fused:
    false``; true = on (an error where it does not apply); false = off."""
    # ---- lamb / lars: which parameters are adapted and decayed
    exclude: list[str] = Field(default_factory=lambda: ["bias", "norm", "ln_"])
    """Regexes of parameter names with no weight decay (and, with exclude_from_adaptation, no
    trust ratio); add ``emb`` to exclude embeddings."""
    exclude_1d: bool = True
    """Also exclude every 1-D parameter (biases, norm gains, whatever their names)."""
    exclude_from_adaptation: bool = True
    """Excluded parameters also skip the trust ratio (BERT's LAMB); false: ratio for all
    parameters (torch-optimizer, timm)."""
    max_grad_norm: float | None = Field(None, gt=0)
    """Global-norm pre-normalisation inside the optimizer (NVIDIA FusedLAMB): gradients divided
    by max(1, norm / max_grad_norm). Unlike ``train.max_grad_norm`` (clip before any optimizer)
    it is part of the optimizer's math. None = off (the papers)."""
    # ---- lamb
    bias_correction: bool = True
    """Adam bias correction of m and v (the paper's Algorithm 2; torch-optimizer's default is off)."""
    phi_min: float | None = Field(None, ge=0)
    """Lower clamp of ||w|| in the trust ratio (the paper's gamma_l); None = no clamp."""
    phi_max: float | None = Field(None, gt=0)
    """Upper clamp of ||w|| (gamma_u; torch-optimizer's clamp_value = 10); None = no clamp."""
    trust_clip: float | None = Field(None, gt=0)
    """Cap on the trust ratio itself (LAMBC / timm: 1.0); None = no cap."""
    # ---- lars
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = False
    trust_coefficient: float = Field(0.001, gt=0)
    """LARS eta: local lr = eta * ||w|| / (||g|| + wd * ||w|| + eps)."""
    larc_clip: bool = False
    """LARC clip mode: local lr <- min(local lr / lr, 1)."""
    lr_inside_momentum: bool = True
    """The paper's v = m v + lr * local_lr * (g + wd w); false: lr applied after the buffer
    (timm / torch SGD style)."""

    @model_validator(mode="after")
    def _options_fit_optimizer(self) -> OptimConfig:
        # a value other than the default (not "was set": a dumped config sets every field)
        wrong = [
            k
            for k, names in _OPTIM_ONLY.items()
            if self.name not in names
            and getattr(self, k)
            != type(self).model_fields[k].get_default(call_default_factory=True)
        ]
        if wrong:
            k = sorted(wrong)[0]
            raise ValueError(
                f"optim.{k} applies to {' / '.join(_OPTIM_ONLY[k])} only, not to optim.name="
                f"{self.name}"
            )
        if self.flat and self.fused is False:
            raise ValueError(
                "optim.flat=true runs the fused (compiled) kernels over the flat buffers; it "
                "cannot be combined with optim.fused=false"
            )
        return self

    @property
    def resolved_eps(self) -> float:
        return _DEFAULT_EPS[self.name] if self.eps is None else self.eps

    @property
    def resolved_betas(self) -> tuple[float, float]:
        if self.betas is not None:
            return tuple(self.betas)
        return _DEFAULT_BETAS.get(self.name, (0.9, 0.999))


class ScheduleConfig(_Section):
    name: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = Field(0, ge=0)
    min_lr_ratio: float = Field(0.1, ge=0.0, le=1.0)
    """Final LR as a fraction of ``optim.lr`` for cosine / linear decay."""


class ChunkStrategyConfig(_Section):
    """Options of ``strategy.name: chunk`` (the ``offload`` chunk manager, ZeRO-3 sharding).

    Byte budgets take a number of bytes or a size string (``12GiB``, ``500MB``)."""

    chunk_size: int | None = Field(None, gt=0)
    """Elements per chunk; None searches 1-64 Mi elements for the size with the least padding."""
    dtype: Literal["fp32", "bf16", "fp16"] = "fp32"
    """Working dtype of the chunks the model computes with; bf16 / fp16 keep fp32 master shards,
    fp16 adds dynamic loss scaling (a step whose gradients overflow is skipped)."""
    offload_param_frac: float = Field(0.0, ge=0.0, le=1.0)
    """Fraction of chunk bytes (from the first chunk) whose parameter shards live on host."""
    offload_optim_frac: float = Field(0.0, ge=0.0, le=1.0)
    """Fraction of chunk bytes whose fp32 master, gradient shard and optimizer state live on host.
    Must be >= offload_param_frac (a chunk with params on host keeps its optimizer state there)."""
    device_budget: ByteSize | None = None
    """Bytes the compute device may hold; gathered chunks are cached and the one used furthest in
    the future is evicted when it is hit. None = no limit (release chunks right after use)."""
    host_budget: ByteSize | None = None
    """Bytes the host tier may hold; a placement that cannot fit stops before training."""
    keep_gathered: bool = False
    """Keep gathered chunks for the whole step (fewer gathers, ZeRO-2-like memory)."""
    keep_gathered_frac: float = Field(0.0, ge=0.0, le=1.0)
    """Keep only this fraction of the chunk bytes gathered (the last chunks, which backward
    needs first); the rest is re-gathered for backward. ``keep_gathered: true`` means 1.0."""

    nvme_dir: str | None = None
    """Directory (on a fast disk) for the NVMe tier; its files are removed when the run ends."""
    nvme_optim_frac: float = Field(0.0, ge=0.0, le=1.0)
    """Fraction of chunk bytes (from the first chunk) whose AdamW state, and fp32 master where it
    is not the working shard, live on NVMe; stepped on host through a read-ahead / write-behind
    pipeline. Must be <= offload_optim_frac; needs nvme_dir."""
    nvme_param_frac: float = Field(0.0, ge=0.0, le=1.0)
    """Fraction of chunk bytes whose parameter and gradient shards live on NVMe too
    (ZeRO-Infinity), read ahead of use in forward and backward. Must be <= nvme_optim_frac."""
    nvme_prefetch: int = Field(2, ge=0)
    """Chunks whose NVMe state is read ahead while one is being updated."""
    nvme_io_threads: int = Field(8, ge=1)
    """I/O requests in flight (threads issuing O_DIRECT reads / writes)."""
    placement: Literal["static", "auto"] = "static"
    """``static``: the fractions below, as given. ``auto``: ignore them and choose the least
    offloading that fits ``device_budget`` / ``host_budget`` (optimizer state to host first,
    then parameters, then NVMe when ``nvme_dir`` is set), keeping ``activation_reserve`` of the
    device free; ``colossus plan`` prints the choice."""
    activation_reserve: ByteSize | None = None
    """Device bytes ``placement: auto`` keeps for activations; None = the estimate ``colossus
    plan`` prints (Korthikanti et al. for transformers)."""
    gather_prefetch: int = Field(1, ge=0)
    """Several ranks: all-gathers started this many chunks ahead of use (by the access order of
    the first step), overlapping communication with compute; 0 = gather on demand."""
    reduce_in_flight: int = Field(2, ge=0)
    """Several ranks: gradient reduce-scatters left running while backward goes on."""

    @model_validator(mode="after")
    def _param_frac_le_optim_frac(self) -> ChunkStrategyConfig:
        if self.offload_param_frac > self.offload_optim_frac:
            raise ValueError(
                f"offload_param_frac={self.offload_param_frac} > offload_optim_frac="
                f"{self.offload_optim_frac}: a chunk whose parameters live on host keeps its "
                "optimizer state on host too; raise offload_optim_frac"
            )
        if self.nvme_optim_frac > self.offload_optim_frac:
            raise ValueError(
                f"nvme_optim_frac={self.nvme_optim_frac} > offload_optim_frac="
                f"{self.offload_optim_frac}: NVMe-resident optimizer state is stepped on host; "
                "raise offload_optim_frac"
            )
        if self.nvme_param_frac > self.nvme_optim_frac:
            raise ValueError(
                f"nvme_param_frac={self.nvme_param_frac} > nvme_optim_frac={self.nvme_optim_frac}"
                ": a chunk whose parameters live on NVMe keeps its optimizer state there too"
            )
        if self.nvme_optim_frac > 0 and not self.nvme_dir:
            raise ValueError("nvme_optim_frac > 0 needs nvme_dir (a directory on a fast disk)")
        return self


class StrategyConfig(_Section):
    name: Literal["none", "ddp", "chunk"] = "none"
    """``none``: one process. ``ddp``: torch DistributedDataParallel over the launcher's ranks.
    ``chunk``: parameters, gradients and optimizer state in chunks sharded over the ranks
    (ZeRO-3) and placed on device / host tiers (see ``strategy.chunk``)."""
    chunk: ChunkStrategyConfig = Field(default_factory=ChunkStrategyConfig)
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    """Process-group backend; auto = nccl on CUDA, gloo on CPU."""
    sp: int = Field(1, ge=1)
    """Sequence-parallel size: each sequence is split over ``sp`` ranks (``parallel.sequence``);
    the sequence length must be divisible by ``sp`` (by ``2*sp`` for the zigzag causal layout)."""
    sp_mode: Literal["ring_attention", "ring_self_attention", "ulysses"] = "ring_attention"
    """Sequence-parallel attention: ``ring_attention`` (online softmax, memory linear in L/sp),
    ``ring_self_attention`` (RSA, an (L/sp) x L score strip per rank), ``ulysses`` (all-to-all
    over heads; needs heads % sp == 0)."""
    tp: int = Field(1, ge=1)
    """Tensor-parallel size: each layer of the model (GPT-2, BERT, Llama) is split over ``tp``
    consecutive ranks (``parallel.policies``); the rest of the world is data-parallel
    (dp = world size / tp, gradients all-reduced over dp). 1 = no tensor parallelism."""
    tp_mode: Literal["1d", "2d", "2.5d", "3d"] = "1d"
    """How layers are split: ``1d`` (Megatron-LM column/row). 2d needs tp = q^2, 2.5d
    tp = q^2 * tp_depth, 3d tp = q^3."""
    tp_depth: int = Field(1, ge=1)
    """Depth of the 2.5d grid (tp = q^2 * tp_depth); 1 otherwise."""


class TrainConfig(_Section):
    max_steps: int | None = Field(None, gt=0)
    """Optimizer steps to run; wins over ``epochs`` when set."""
    epochs: float = Field(1.0, gt=0)
    """Passes over the training set, used when ``max_steps`` is None."""
    batch_size: int = Field(8, gt=0)
    """Micro-batch per process; global batch = batch_size * grad_accum * world size."""
    grad_accum: int = Field(1, gt=0)
    max_grad_norm: float | None = Field(1.0, gt=0)
    seed: int = 0
    eval_interval: int | None = Field(None, gt=0)
    """Evaluate every N optimizer steps (and at the end) when an eval set exists; None = only at the end."""
    eval_batches: int | None = Field(20, gt=0)
    """Batches per evaluation; None = the whole eval set."""
    mixed_precision: Literal["no", "bf16"] = "no"
    run_dir: str | None = None
    """Defaults to ``runs/<name>-<timestamp>``."""


class CheckpointConfig(_Section):
    interval: int | None = Field(None, gt=0)
    """Save every N optimizer steps; None = only at the end (if ``save_final``)."""
    keep_last: int = Field(2, gt=0)
    save_final: bool = True
    resume_from: str | None = None
    """A checkpoint directory, or ``latest`` for the newest valid one under the run dir."""


class LoggingConfig(_Section):
    interval: int = Field(1, gt=0)
    """Log every N optimizer steps."""
    progress: bool = True
    plot: bool = True


class DemoDataConfig(_Section):
    """The built-in RLHF demo task (``rlhf.data: demo``), see :mod:`colossus.rlhf.data`."""

    out_dir: str = ".cache/colossus/rlhf-demo"
    """Where the JSONL files are written (reused when they exist with the same settings)."""
    n_examples: int = Field(3000, gt=0)
    eval_fraction: float = Field(0.1, gt=0.0, lt=1.0)
    seed: int = 0


class GenerationConfig(_Section):
    """Sampling for PPO rollouts and for the parse-rate evaluation (HF ``generate``, KV cache)."""

    max_new_tokens: int = Field(24, gt=0)
    temperature: float = Field(1.0, gt=0.0)
    top_k: int | None = Field(None, gt=0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: str | None = "\n"
    """A response ends at the first token whose text contains this string (or at eos)."""


class PPOConfig(_Section):
    """``rlhf.stage: ppo``: actor and reference from ``model.path``, reward model and critic from
    ``reward_model``; ``train.max_steps`` is the number of rollout iterations."""

    reward_model: str | None = None
    """The reward model (the ``rm`` stage's export dir); frozen."""
    critic: str | None = None
    """Initial critic (a scalar-head model dir); None = a copy of ``reward_model``."""
    rollout_batch: int = Field(16, gt=0)
    """Prompts per rank per iteration."""
    minibatch: int = Field(8, gt=0)
    """Rollouts per optimizer step (per rank)."""
    ppo_epochs: int = Field(4, gt=0)
    """Passes over each rollout batch."""
    gamma: float = Field(1.0, ge=0.0, le=1.0)
    lam: float = Field(0.95, ge=0.0, le=1.0)
    """GAE lambda."""
    clip_range: float = Field(0.2, gt=0.0)
    """Policy ratio clip (PPO's epsilon)."""
    value_clip: float | None = Field(0.2, gt=0.0)
    """Clip of the new values around the rollout values; None = unclipped value loss."""
    critic_lr: float | None = Field(None, gt=0.0)
    """Critic learning rate; None = ``optim.lr``."""
    kl_coef: float = Field(0.05, ge=0.0)
    """Per-token penalty ``kl_coef * (log p_actor - log p_ref)`` added to the reward."""
    kl_target: float | None = Field(None, gt=0.0)
    """Adaptive KL controller (Ziegler et al. 2019): moves ``kl_coef`` to keep the mean KL per
    sequence near this; None = fixed ``kl_coef``."""
    kl_horizon: int = Field(10000, gt=0)
    kl_max: float | None = Field(None, gt=0.0)
    """Stop an iteration's PPO epochs early once a minibatch's KL to the reference (nats per
    sequence) exceeds this bound."""
    reward_norm: Literal["none", "running", "batch"] = "running"
    """Normalise reward-model scores by a running (over iterations) or per-batch mean / std."""
    reward_clip: float | None = Field(5.0, gt=0.0)
    """Clip normalised scores to [-reward_clip, reward_clip]."""
    whiten_advantages: bool = True
    entropy_coef: float = Field(0.0, ge=0.0)
    offload_frozen: bool = True
    """Strategy chunk: keep the frozen reference and reward models' parameters on the host tier,
    gathered to the device chunk by chunk only while they score (False: their chunks follow
    ``strategy.chunk`` like the actor's). The four models share ``strategy.chunk``'s budgets."""


class DPOConfig(_Section):
    """``rlhf.stage: dpo``: the policy and the frozen reference both start from ``model.path``."""

    beta: float = Field(0.1, gt=0.0)
    """Strength of the implicit KL constraint (Rafailov et al. 2023)."""
    reference: str | None = None
    """Reference model dir; None = ``model.path``."""


class RLHFConfig(_Section):
    """The RLHF stages, run by ``colossus train`` when ``stage`` is set (see colossus/rlhf/)."""

    stage: Literal["sft", "rm", "ppo", "dpo"] | None = None
    """None: ordinary language-model training."""
    data: str = "demo"
    """``demo`` (the built-in task) or a JSONL file in the stage's format (see README)."""
    eval_data: str | None = None
    """JSONL of held-out records (for ``demo``: its eval split)."""
    demo: DemoDataConfig = Field(default_factory=DemoDataConfig)
    max_prompt_tokens: int = Field(64, gt=0)
    """Longer prompts keep their last tokens."""
    max_response_tokens: int = Field(32, gt=0)
    """Longer responses are cut."""
    export_dir: str | None = None
    """Where the trained model is written as a ``from_pretrained`` folder for the next stage;
    None = ``RUN_DIR/export``."""
    eval_samples: int = Field(64, ge=0)
    """Held-out prompts sampled to measure the parse rate (demo) before and after the stage."""
    generation: GenerationConfig = Field(default_factory=GenerationConfig)
    ppo: PPOConfig = Field(default_factory=PPOConfig)
    dpo: DPOConfig = Field(default_factory=DPOConfig)


class TrainingConfig(_Section):
    """Everything a run needs. Build from YAML (`from_yaml`), a dict (`from_dict`), or kwargs.

    Example::

        cfg = TrainingConfig(name="demo", train={"max_steps": 10, "batch_size": 4})
        cfg = cfg.with_overrides(["optim.lr=3e-4", "strategy.name=ddp"])
    """

    name: str = "run"
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    strategy: StrategyConfig = Field(default_factory=StrategyConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    rlhf: RLHFConfig = Field(default_factory=RLHFConfig)

    @model_validator(mode="after")
    def _flat_fits_strategy(self) -> TrainingConfig:
        if self.optim.flat is not True:  # None: resolved by the strategy (off where n/a)
            return self
        if self.strategy.name == "chunk":
            raise ValueError(
                "optim.flat=true does not apply to strategy.name=chunk: its optimizer "
                "(ChunkLamb / ChunkLars) already steps whole chunks; remove optim.flat"
            )
        if self.strategy.tp > 1:
            raise ValueError(
                "optim.flat=true is not supported with strategy.tp > 1 (tensor-parallel "
                "shards: the flat path is not tested across tensor-parallel ranks); remove "
                "optim.flat"
            )
        return self

    @field_validator("name")
    @classmethod
    def _name_is_a_path_part(cls, v: str) -> str:
        if not v or "/" in v or v.startswith("."):
            raise ValueError("must be a plain name (no '/', not starting with '.')")
        return v

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> TrainingConfig:
        if not isinstance(data, dict):
            raise ConfigError(
                f"{source}: expected a mapping at the top level, got {type(data).__name__}"
            )
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            raise ConfigError(format_validation_error(e, source)) from None

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: list[str] | None = None) -> TrainingConfig:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"recipe not found: {p}")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML: {e}") from None
        if isinstance(data, dict):
            data.setdefault("name", p.stem)
        for ov in overrides or []:
            data = apply_override(data, ov)
        return cls.from_dict(data, source=str(p))

    def with_overrides(self, overrides: list[str]) -> TrainingConfig:
        data = self.model_dump(mode="json")
        for ov in overrides:
            data = apply_override(data, ov)
        return TrainingConfig.from_dict(data, source="--set")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


# ---- helpers ------------------------------------------------------------------------------


def _fields_at(path: tuple[str | int, ...]) -> list[str]:
    """Valid field names of the schema section at ``path`` (for 'did you mean' hints)."""
    model: Any = TrainingConfig
    for part in path:
        if not isinstance(part, str) or not (
            isinstance(model, type) and issubclass(model, BaseModel)
        ):
            return []
        field = model.model_fields.get(part)
        if field is None:
            return []
        model = field.annotation
    if isinstance(model, type) and issubclass(model, BaseModel):
        return list(model.model_fields)
    return []


def format_validation_error(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        loc = tuple(x for x in e["loc"] if not (isinstance(x, str) and "[" in x))
        dotted = ".".join(str(x) for x in loc)
        if e["type"] == "extra_forbidden":
            key = str(loc[-1])
            valid = _fields_at(loc[:-1])
            hint = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
            msg = f"unknown key '{dotted}'"
            msg += f" (did you mean '{'.'.join([*map(str, loc[:-1]), hint[0]])}'?)" if hint else ""
            if valid:
                msg += f"; valid keys here: {', '.join(valid)}"
            lines.append(msg)
        else:
            got = e.get("input")
            got_s = repr(got) if not isinstance(got, dict) else "a mapping"
            lines.append(f"{dotted}: {e['msg'].lower()}, got {got_s}")
    return f"{source}: invalid config:\n  " + "\n  ".join(lines)


def apply_override(data: dict[str, Any], override: str) -> dict[str, Any]:
    """Apply ``a.b.c=value`` (value parsed as YAML, so ``3e-4``, ``true``, ``[1,2]`` work)."""
    if "=" not in override:
        raise ConfigError(f"--set {override!r}: expected KEY=VALUE, e.g. optim.lr=3e-4")
    key, raw = override.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"--set {override!r}: empty key segment")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    # YAML 1.1 reads "3e-4" as a string; numbers written that way are meant as floats.
    if isinstance(value, str):
        try:
            value = float(value) if any(c in value for c in "eE.") else value
        except ValueError:
            pass
    node = data
    for i, part in enumerate(parts[:-1]):
        nxt = node.get(part)
        if nxt is None:
            nxt = node[part] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(f"--set {override!r}: '{'.'.join(parts[: i + 1])}' is not a section")
        node = nxt
    node[parts[-1]] = value
    return data
