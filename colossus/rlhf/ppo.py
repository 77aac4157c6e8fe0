"""PPO for language models with four models: the actor (trained policy), the critic (trained
per-token value head), the frozen reference (the SFT model) and the frozen reward model.

Each iteration: sample a batch of prompts, generate responses with the actor (HF ``generate``,
KV cache, ``rlhf.generation`` sampling), score them with the reward model (normalised by
``rlhf.ppo.reward_norm``), subtract the per-token KL penalty to the reference, estimate
advantages with GAE, then run ``ppo_epochs`` passes of minibatches with the clipped policy and
value losses. The actor and critic each run under ``strategy`` (``none`` or ``ddp``: rollouts
are per rank, gradients averaged; the frozen models sit on each rank's device; ``chunk``: all
four models are chunk managers sharing one budget, see :mod:`colossus.rlhf.ppo_memory`). Every
iteration logs reward, KL, entropy, clip fraction and value loss (``RUN_DIR/metrics.jsonl``,
console progress) and, for code prompts, the share of responses that parse.

Example::

    from colossus.config import TrainingConfig
    from colossus.rlhf.ppo import run_ppo
    summary = run_ppo(TrainingConfig.from_yaml("recipes/rlhf-ppo.yaml", ["train.max_steps=3"]))
    print(summary["reward_first"], summary["reward_last"], summary["kl_max"])
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from colossus.config import TrainingConfig
from colossus.distributed import all_reduce_mean, init_distributed
from colossus.errors import ConfigError
from colossus.metrics import RunLogger, peak_rss_gib
from colossus.rlhf.data import PROMPT_KEYS, encode_prompt, read_jsonl, resolve_files
from colossus.rlhf.generation import Rollout, decode_responses, parse_rate, sample
from colossus.rlhf.ppo_math import (
    AdaptiveKL,
    RunningMoments,
    entropy_from_logits,
    gae,
    kl_penalized_rewards,
    masked_mean,
    masked_whiten,
    policy_loss,
    value_loss,
)
from colossus.rlhf.ppo_memory import check_pool, chunk_frozen, new_pool, plan_pool
from colossus.rlhf.reward import load_scalar_model, sequence_scores, token_values
from colossus.rlhf.stage import (
    broadcast,
    build_policy,
    export_dir,
    export_model,
    load_exported_policy,
    load_tokenizer_for,
    require_model_dir,
    write_summary,
)
from colossus.schedule import build_scheduler
from colossus.strategy import make_strategy
from colossus.trainer import Trainer, set_seed

LOGGED = ("reward", "kl", "entropy", "clip_frac", "value_loss")


class ValueModel(nn.Module):
    """The critic: a scalar-head model whose forward returns per-token values ``[B, T]``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask) -> torch.Tensor:
        return token_values(self.model, input_ids, attention_mask)


def _response_slice(x: torch.Tensor, roll: Rollout) -> torch.Tensor:
    """Outputs at the positions that predict the response tokens (P-1 .. P+R-2)."""
    return x[:, roll.prompt_len - 1 : -1]


def token_logps(
    model: nn.Module, roll: Rollout, rows=slice(None)
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p of each response token ``[B, R]``, entropy ``[B, R]``) under ``model``."""
    seq, mask = roll.sequences[rows], roll.attention_mask[rows]
    logits = model(input_ids=seq, attention_mask=mask, position_ids=roll.position_ids[rows]).logits
    logits = _response_slice(logits, roll).float()
    tgt = seq[:, roll.prompt_len :]
    lp = torch.log_softmax(logits, -1).gather(-1, tgt[..., None]).squeeze(-1)
    return lp, entropy_from_logits(logits)


def _frozen(model: nn.Module, device: torch.device) -> nn.Module:
    model = model.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


class _Learner:
    """One trained model under its own strategy instance (optimizer, clipping, DDP sync; under
    chunk a member of the four models' memory pool)."""

    def __init__(
        self, cfg: TrainingConfig, ctx, model: nn.Module, lr: float, total: int, member=None
    ):
        self.strategy = make_strategy(cfg.strategy, ctx, cfg.optim)
        if member is not None:
            self.strategy.pool = member
        self.engine = self.strategy.prepare_model(model)
        self.model = self.strategy.model
        self.opt = self.strategy.build_optimizer(cfg.optim.model_copy(update={"lr": lr}))
        self.sched = build_scheduler(self.opt, cfg.schedule, total)
        self.max_norm = cfg.train.max_grad_norm
        self.mgr = getattr(self.strategy, "mgr", None)  # strategy chunk: its ChunkManager

    def step(self, loss: torch.Tensor) -> float:
        self.strategy.backward(loss)
        norm = self.strategy.clip_grad_norm(self.max_norm)
        self.strategy.optimizer_step()
        self.sched.step()
        return float(norm)


class PPOLogger(RunLogger):
    """The Trainer's logger with the PPO quantities on the progress line."""

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {k: (round(v, 6) if isinstance(v, float) else v) for k, v in record.items()}
        self.records.append(record)
        with open(self.metrics_path, "a") as f:
            import json

            f.write(json.dumps(record) + "\n")
        info = "  ".join(f"{k} {record[k]:.3f}" for k in (*LOGGED, "parse_rate") if k in record)
        if self._progress is not None:
            self._progress.update(self._task, completed=record["step"], info=info)
        elif self._plain_progress:
            self.console.print(f"iter {record['step']}/{self.total}  {info}", highlight=False)


def _prompt_batch(prompts: list, it: int, per_rank: int, ctx, seed: int) -> list:
    """This rank's prompts of iteration ``it``: a seeded permutation per epoch over prompts."""
    n = len(prompts)
    glob = per_rank * ctx.world_size
    per_epoch = max(1, n // glob)
    epoch, pos = divmod(it, per_epoch)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 7919 + epoch))
    start = pos * glob + ctx.rank * per_rank
    return [prompts[int(i)] for i in perm[start : start + per_rank]]


def _phase(mgr):
    """A no-grad phase of one model: under chunk its ``inference()`` (gathered chunks released
    at the end, the training step's access order untouched)."""
    return mgr.inference() if mgr is not None else torch.no_grad()


def _check(cfg: TrainingConfig) -> None:
    p = cfg.rlhf.ppo
    if cfg.strategy.name == "chunk" and cfg.strategy.chunk.placement == "auto":
        raise ConfigError(
            "rlhf.stage=ppo under strategy chunk needs strategy.chunk.placement=static: auto "
            "would place each of the four models against the whole shared budget. Set the "
            "offload fractions; `colossus plan` shows each model's memory and the shared need"
        )
    if not cfg.model.path:
        raise ConfigError("rlhf.stage=ppo needs model.path: the SFT stage's export dir")
    if not p.reward_model:
        raise ConfigError("rlhf.stage=ppo needs rlhf.ppo.reward_model: the RM stage's export dir")
    if p.minibatch > p.rollout_batch or p.rollout_batch % p.minibatch:
        raise ConfigError(
            f"rlhf.ppo.minibatch={p.minibatch} must divide rlhf.ppo.rollout_batch={p.rollout_batch}"
        )


def run_ppo(cfg: TrainingConfig) -> dict[str, Any]:
    _check(cfg)
    ctx = init_distributed(cfg.strategy.backend)
    r, p = cfg.rlhf, cfg.rlhf.ppo
    iters = cfg.train.max_steps or 20
    tok = load_tokenizer_for(cfg, ctx)
    train_f, eval_f = resolve_files(r, "prompts")
    prompts = [x["prompt"] for x in read_jsonl(train_f, PROMPT_KEYS)]
    eval_prompts = [x["prompt"] for x in read_jsonl(eval_f, PROMPT_KEYS)] if eval_f else []
    dev = ctx.device
    chunked = cfg.strategy.name == "chunk"
    pool = None
    if chunked:  # the four models' memory, checked on meta models before anything is loaded
        check_pool(plan_pool(cfg, ctx.world_size, dev))
        pool = new_pool(cfg)

    actor = build_policy(cfg, tok)
    # under chunk the manager copies parameters chunk by chunk into their tier: load on CPU
    load_dev = torch.device("cpu") if chunked else dev
    ref_dir = require_model_dir(cfg.model.path, "model.path")
    ref = load_exported_policy(ref_dir, load_dev)
    reward = load_scalar_model(p.reward_model, cfg.train.seed)
    ref_mgr = reward_mgr = None
    if chunked:
        ref_mgr = chunk_frozen(ref, cfg, "reference", pool, dev)
        reward_mgr = chunk_frozen(reward, cfg, "reward", pool, dev)
    else:
        ref, reward = _frozen(ref, dev), _frozen(reward, dev)
    critic = ValueModel(load_scalar_model(p.critic or p.reward_model, cfg.train.seed))
    opt_steps = iters * p.ppo_epochs * (p.rollout_batch // p.minibatch)
    member = (lambda name: pool.member(name)) if chunked else (lambda name: None)
    actor_l = _Learner(cfg, ctx, actor, cfg.optim.lr, opt_steps, member("actor"))
    critic_l = _Learner(cfg, ctx, critic, p.critic_lr or cfg.optim.lr, opt_steps, member("critic"))
    if pool is not None:
        check_pool(pool)  # the real layout (the same as the dry run's)
    synced = chunked and ctx.world_size > 1  # ZeRO-3: every rank runs as many forwards
    # the run directory, seeding and logging of an ordinary run
    run_dir = Trainer._resolve_run_dir(_RunDirOnly(cfg, ctx))
    set_seed(cfg.train.seed + ctx.rank)  # per-rank sampling

    reward_before = _eval_reward(
        actor_l.model, reward, tok, eval_prompts, cfg, actor_l.mgr, reward_mgr
    )
    logger = PPOLogger(run_dir, iters, ctx.is_main, cfg.logging.progress, False)
    kl_ctl = AdaptiveKL(p.kl_coef, p.kl_target, p.kl_horizon)
    moments = RunningMoments()
    history: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    for it in range(iters):
        t_it = time.perf_counter()
        texts = _prompt_batch(prompts, it, p.rollout_batch, ctx, cfg.train.seed)
        ids = [encode_prompt(tok, t, r.max_prompt_tokens) for t in texts]
        with _phase(actor_l.mgr):
            roll = sample(actor_l.model, tok, ids, r.generation, synced=synced)
            old_logp, _ = token_logps(actor_l.model, roll)
        rmask = roll.response_mask.float()
        with _phase(ref_mgr):
            ref_logp, _ = token_logps(ref, roll)
        with _phase(critic_l.mgr):
            old_values = _response_slice(critic_l.model(roll.sequences, roll.attention_mask), roll)
        with _phase(reward_mgr):
            score = sequence_scores(reward, roll.sequences, roll.attention_mask)
        with torch.no_grad():
            norm_score = _normalise(score, moments, p)
            rewards, kl = kl_penalized_rewards(norm_score, old_logp, ref_logp, rmask, kl_ctl.coef)
            adv, returns = gae(rewards, old_values, rmask, p.gamma, p.lam)
            if p.whiten_advantages:
                adv = masked_whiten(adv, rmask)
        stats = {
            k: []
            for k in (
                "policy_loss",
                "value_loss",
                "clip_frac",
                "value_clip_frac",
                "entropy",
                "approx_kl",
            )
        }
        stopped_early = 0.0
        for _ in range(p.ppo_epochs):
            order = torch.randperm(p.rollout_batch)
            for s in range(0, p.rollout_batch, p.minibatch):
                rows = order[s : s + p.minibatch]
                m = rmask[rows]
                logp, ent = token_logps(actor_l.engine, roll, rows)
                pl, cf, akl = policy_loss(logp, old_logp[rows], adv[rows], m, p.clip_range)
                entropy = masked_mean(ent, m)
                actor_l.step(pl - p.entropy_coef * entropy)
                v = _response_slice(
                    critic_l.engine(roll.sequences[rows], roll.attention_mask[rows]), roll
                )
                vl, vcf = value_loss(v, old_values[rows], returns[rows], m, p.value_clip)
                critic_l.step(vl)
                for k, x in zip(stats, (pl, vl, cf, vcf, entropy, akl)):
                    stats[k].append(float(x.detach()))
            if p.kl_max is not None:
                # KL to the reference of the updated policy on this batch (nats per sequence)
                with _phase(actor_l.mgr):
                    new_logp, _ = token_logps(actor_l.model, roll)
                kl_now = float(all_reduce_mean(((new_logp - ref_logp) * rmask).sum(-1).mean()))
                if kl_now > p.kl_max:
                    stopped_early = 1.0
                    break
        responses = decode_responses(tok, roll, r.generation.stop)
        local = {
            "reward": float(score.mean()),
            "reward_normalized": float(norm_score.mean()),
            "kl": float(kl.sum(-1).mean()),
            "response_tokens": float(rmask.sum(-1).mean()),
            "parse_rate": parse_rate(texts, responses),
            **{k: sum(v) / len(v) for k, v in stats.items()},
        }
        rec = {k: float(all_reduce_mean(torch.tensor(v))) for k, v in local.items()}
        coef = kl_ctl.coef
        kl_ctl.update(rec["kl"], p.rollout_batch * ctx.world_size)
        rec = {
            "step": it + 1,
            **rec,
            "kl_coef": coef,
            "stopped_early": stopped_early,
            "lr": actor_l.sched.get_last_lr()[0],
            "peak_rss_gib": peak_rss_gib(),
            **_pool_peaks(pool),
            "iter_s": time.perf_counter() - t_it,
            "time_s": time.perf_counter() - t0,
        }
        if not math.isfinite(rec["policy_loss"]) or not math.isfinite(rec["value_loss"]):
            raise FloatingPointError(f"PPO losses are not finite at iteration {it + 1}: {rec}")
        history.append(rec)
        logger.log(rec)

    # chunk (ZeRO-3) keeps one sharded copy: nothing to compare across ranks
    in_sync = None if chunked else _ranks_agree(actor_l.model) and _ranks_agree(critic_l.model)
    out = export_model(actor_l.strategy, actor_l.model, tok, export_dir(cfg, run_dir))
    trained = load_exported_policy(out, dev)
    reward_after = _eval_reward(trained, reward, tok, eval_prompts, cfg, None, reward_mgr)
    summary: dict[str, Any] = {
        "stage": "ppo",
        "iterations": len(history),
        "reward_first": history[0]["reward"],
        "reward_last": history[-1]["reward"],
        "kl_max": max(h["kl"] for h in history),
        "parse_rate_first": history[0]["parse_rate"],
        "parse_rate_last": history[-1]["parse_rate"],
        "eval_reward_before": reward_before.get("reward"),
        "eval_reward_after": reward_after.get("reward"),
        "parse_rate_before": reward_before.get("parse_rate"),
        "parse_rate_after": reward_after.get("parse_rate"),
        "time_s": time.perf_counter() - t0,
        "world_size": ctx.world_size,
        "ranks_in_sync": in_sync,
        "export_dir": str(out),
        "run_dir": str(run_dir),
        "history": history,
    }
    if pool is not None:  # bytes per tier: all four together (peak) and per model
        summary["memory"] = pool.report()
        summary |= _pool_peaks(pool)
    for m in (actor_l.strategy, critic_l.strategy, ref_mgr, reward_mgr):
        if m is not None:
            m.close()  # NVMe files
    logger.close({k: v for k, v in summary.items() if k not in ("history", "memory")})
    if ctx.is_main and cfg.logging.plot:
        plot_ppo(history, run_dir / "ppo.png")
    write_summary(run_dir, summary)
    return summary


def plot_ppo(history: list[dict[str, Any]], path: Path) -> None:
    """Reward, KL to the reference, parse rate and entropy per iteration, one panel each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [("reward", "reward-model score"), ("kl", "KL(actor || ref), nats / seq")]
    keys += [("parse_rate", "share of responses that parse"), ("entropy", "entropy / token")]
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.2))
    it = [h["step"] for h in history]
    for ax, (k, title) in zip(axes, keys):
        ax.plot(it, [h[k] for h in history], marker=".")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("PPO iteration")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _ranks_agree(model: nn.Module) -> bool:
    """Whether every rank holds rank 0's weights (data-parallel training must keep them equal)."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return True
    flat = torch.cat([p.detach().reshape(-1).float() for p in model.parameters()])
    ref = flat.clone()
    dist.broadcast(ref, src=0)
    diff = torch.tensor([float((flat - ref).abs().max())])
    dist.all_reduce(diff, op=dist.ReduceOp.MAX)
    return float(diff) == 0.0


class _RunDirOnly:
    """Just enough of a Trainer for ``Trainer._resolve_run_dir`` (one run-dir rule for all)."""

    def __init__(self, cfg: TrainingConfig, ctx) -> None:
        self.config, self.ctx = cfg, ctx


def _normalise(score: torch.Tensor, moments: RunningMoments, p) -> torch.Tensor:
    if p.reward_norm == "running":
        mean, std = moments.update(_gathered(score))
        score = (score - mean) / max(std, 1e-6)
    elif p.reward_norm == "batch":
        s = _gathered(score)
        score = (score - s.mean()) / s.std().clamp(min=1e-6)
    if p.reward_clip is not None:
        score = score.clamp(-p.reward_clip, p.reward_clip)
    return score


def _gathered(x: torch.Tensor) -> torch.Tensor:
    """``x`` from every rank, concatenated (the statistics must agree across ranks)."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def _pool_peaks(pool) -> dict[str, float]:
    if pool is None:
        return {}
    rep = pool.report()
    return {f"pool_{t}_peak_mib": rep[t]["peak"] / 2**20 for t in ("device", "host")}


@torch.no_grad()
def _eval_reward(
    policy, reward, tok, prompts: list[str], cfg: TrainingConfig, policy_mgr=None, reward_mgr=None
) -> dict:
    """Mean reward-model score and parse rate of sampled responses to held-out prompts (rank 0,
    fixed seed): the before / after figures of the stage. Under chunk with several ranks every
    rank runs it (the chunk managers' forwards are collectives) and rank 0's figures are kept."""
    r = cfg.rlhf
    out: dict[str, float] = {}
    import torch.distributed as dist

    multi = dist.is_initialized() and dist.get_world_size() > 1
    everyone = multi and reward_mgr is not None
    if (everyone or not multi or dist.get_rank() == 0) and prompts and r.eval_samples:
        ps = prompts[: r.eval_samples]
        scores, texts = [], []
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.train.seed + 12345)
            for i in range(0, len(ps), 32):
                ids = [encode_prompt(tok, t, r.max_prompt_tokens) for t in ps[i : i + 32]]
                with _phase(policy_mgr):
                    roll = sample(policy, tok, ids, r.generation, synced=everyone)
                with _phase(reward_mgr):
                    scores.append(sequence_scores(reward, roll.sequences, roll.attention_mask))
                texts += decode_responses(tok, roll, r.generation.stop)
        out = {"reward": float(torch.cat(scores).mean()), "parse_rate": parse_rate(ps, texts)}
    return broadcast(out)


__all__ = ["run_ppo", "ValueModel", "token_logps", "plot_ppo"]
