"""The Trainer: a training loop around any Hugging Face model (or ``nn.Module`` whose forward
returns an object / dict with ``loss``), parameterised by a strategy.

Example::

    import torch
    from transformers import GPT2Config, GPT2LMHeadModel
    from colossus import Trainer, TrainingConfig

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=256, n_positions=32))
    data = [torch.randint(0, 256, (32,)) for _ in range(64)]
    cfg = TrainingConfig(name="demo", train={"max_steps": 5, "batch_size": 4}, logging={"progress": False})
    trainer = Trainer(model, cfg, train_dataset=data)
    summary = trainer.train()
    print(summary["final_loss"], trainer.evaluate(data[:8]))
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import default_collate

from colossus.checkpoint import (
    CheckpointWriter,
    latest_checkpoint,
    load_json,
    load_tensors,
    verify_checkpoint,
)
from colossus.config import ENCODER_TYPES, TrainingConfig
from colossus.distributed import DistContext, all_reduce_mean, init_distributed
from colossus.errors import CheckpointError, ConfigError, StorageError
from colossus.metrics import RunLogger, peak_rss_gib
from colossus.schedule import build_scheduler
from colossus.strategy import Strategy, make_strategy


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _default_collator(items: list[Any]) -> dict[str, torch.Tensor]:
    """Token blocks (1-D LongTensors) become a causal-LM batch; dicts are stacked as they are."""
    if isinstance(items[0], torch.Tensor):
        ids = torch.stack(items)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    return default_collate(items)


def _loss_of(out: Any) -> torch.Tensor:
    loss = out["loss"] if isinstance(out, dict) else getattr(out, "loss", None)
    if loss is None:
        raise ConfigError(
            "the model's forward returned no 'loss': pass labels in the batch or return a loss"
        )
    return loss


def _batch_tokens(batch: dict[str, Any]) -> int:
    """Tokens in a batch (non-padding where a mask says so); samples for non-token models."""
    if "attention_mask" in batch:
        return int(batch["attention_mask"].sum())
    if "input_ids" in batch:
        return batch["input_ids"].numel()
    first = next((v for v in batch.values() if isinstance(v, torch.Tensor)), None)
    return int(first.shape[0]) if first is not None and first.ndim else 1


def _predicted_tokens(batch: dict[str, torch.Tensor], causal: bool) -> int:
    labels = batch.get("labels")
    if labels is None:
        return _batch_tokens(batch)
    if causal:  # HF shifts labels by one inside the model
        labels = labels[..., 1:]
    return int((labels != -100).sum())


def _sequence_length(dataset: Sequence[Any] | None, collator: Callable) -> int | None:
    """Token length of the first training batch's sequences (None when it has no input_ids)."""
    if not dataset:
        return None
    ids = collator([dataset[0]]).get("input_ids")
    return int(ids.shape[-1]) if isinstance(ids, torch.Tensor) and ids.ndim == 2 else None


class Trainer:
    """Train / evaluate / save / resume a model under one strategy (see ``colossus.strategy``).

    ``callbacks`` are objects with any of ``on_step_end(trainer, record)``,
    ``on_evaluate(trainer, metrics)``, ``on_save(trainer, path)``, ``on_train_end(trainer, summary)``;
    setting ``trainer.should_stop = True`` ends training after the current step.
    """

    def __init__(
        self,
        model: nn.Module,
        config: TrainingConfig | dict[str, Any] | None = None,
        train_dataset: Sequence[Any] | None = None,
        eval_dataset: Sequence[Any] | None = None,
        data_collator: Callable[[list[Any]], dict[str, torch.Tensor]] | None = None,
        tokenizer: Any = None,
        callbacks: Sequence[Any] = (),
    ):
        if config is None:
            config = TrainingConfig()
        elif isinstance(config, dict):
            config = TrainingConfig.from_dict(config)
        self.config = config
        self.ctx: DistContext = init_distributed(config.strategy.backend)
        self.train_dataset = train_dataset
        self.eval_dataset = eval_dataset
        self.collator = data_collator or _default_collator
        self.tokenizer = tokenizer
        self.callbacks = list(callbacks)
        self.should_stop = False
        tc = config.train
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        self.causal = not (config.model.task == "masked_lm" or model_type in ENCODER_TYPES)

        self.run_dir = self._resolve_run_dir()
        self.strategy: Strategy = make_strategy(config.strategy, self.ctx, config.optim)
        if hasattr(self.strategy, "activation_estimate"):  # placement=auto reserves it
            from colossus.plan import activation_bytes

            self.strategy.activation_estimate = activation_bytes(
                getattr(model, "config", None),
                tc.batch_size,
                config.data.block_size,
                config.model.gradient_checkpointing,
            )
        if hasattr(self.strategy, "seq_len"):  # sequence parallel checks the split up front
            self.strategy.seq_len = _sequence_length(train_dataset, self.collator)
        # per-data-rank randomness (dropout, masking) after model init; ranks that split one
        # model (tensor parallel) share it, so their replicated activations stay identical
        set_seed(tc.seed + self.strategy.data_rank)
        self.engine = self.strategy.prepare_model(model)
        self.model = self.strategy.model
        self.optimizer = self.strategy.build_optimizer(config.optim)
        self.global_batch = tc.batch_size * tc.grad_accum * self.strategy.data_world
        self.total_steps = self._total_steps()
        self.scheduler = build_scheduler(self.optimizer, config.schedule, self.total_steps)
        self.step = 0
        self._eval_step: int | None = None
        self.history: list[dict[str, Any]] = []
        if config.checkpoint.resume_from:
            self.resume(config.checkpoint.resume_from)

    # ---- set-up helpers -------------------------------------------------------------------
    def _resolve_run_dir(self) -> Path:
        tc = self.config.train
        if tc.run_dir:
            run_dir = Path(tc.run_dir)
        elif self.config.checkpoint.resume_from and self.config.checkpoint.resume_from != "latest":
            run_dir = Path(self.config.checkpoint.resume_from).resolve().parent.parent
        else:
            stamp = [time.strftime("%Y%m%d-%H%M%S")]
            if dist.is_initialized():  # every rank must agree on one directory
                dist.broadcast_object_list(stamp, src=0)
            run_dir = Path("runs") / f"{self.config.name}-{stamp[0]}"
        if self.ctx.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
        return run_dir

    def _total_steps(self) -> int:
        tc = self.config.train
        if tc.max_steps is not None:
            return tc.max_steps
        if self.train_dataset is None:
            raise ConfigError(
                "train.max_steps is not set and there is no train_dataset to count epochs over"
            )
        per_epoch = len(self.train_dataset) // self.global_batch
        if per_epoch == 0:
            raise ConfigError(
                f"the train set has {len(self.train_dataset)} samples, fewer than one global batch "
                f"({tc.batch_size} x grad_accum {tc.grad_accum} x {self.strategy.data_world} data-parallel ranks = {self.global_batch})"
            )
        return max(1, int(per_epoch * tc.epochs))

    # ---- data order -----------------------------------------------------------------------
    def _epoch_perm(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.config.train.seed * 1_000_003 + epoch)
        return torch.randperm(len(self.train_dataset), generator=g)

    def _micro_batch(self, step: int, accum: int) -> dict[str, torch.Tensor]:
        """Batch for (optimizer step, accumulation index) on this rank: a pure function of the
        position, so resuming at a step needs nothing but the step number."""
        n = len(self.train_dataset)
        per_epoch = n // self.global_batch
        if per_epoch == 0:
            raise ConfigError(
                f"the train set has {n} samples, fewer than one global batch ({self.global_batch})"
            )
        epoch, pos = divmod(step, per_epoch)
        if getattr(self, "_perm_epoch", None) != epoch:
            self._perm, self._perm_epoch = self._epoch_perm(epoch), epoch
        b = self.config.train.batch_size
        dr, dw = self.strategy.data_rank, self.strategy.data_world
        start = pos * self.global_batch + accum * b * dw + dr * b
        idx = self._perm[start : start + b].tolist()
        return self.collator([self.train_dataset[i] for i in idx])

    def _to_device(self, batch: dict[str, Any]) -> dict[str, Any]:
        return {
            k: (v.to(self.ctx.device, non_blocking=True) if isinstance(v, torch.Tensor) else v)
            for k, v in batch.items()
        }

    def _autocast(self):
        if self.config.train.mixed_precision == "bf16":
            return torch.autocast(self.ctx.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    # ---- training ---------------------------------------------------------------------------
    def train(self) -> dict[str, Any]:
        if self.train_dataset is None:
            raise ConfigError("Trainer.train() needs a train_dataset")
        cfg, tc = self.config, self.config.train
        logger = RunLogger(
            self.run_dir,
            self.total_steps,
            enabled=self.ctx.is_main,
            progress=cfg.logging.progress,
            plot=cfg.logging.plot,
            start_step=self.step,
        )
        self.engine.train()
        t_start = time.perf_counter()
        tokens_total, last_eval = 0, None
        t_log, tok_log = time.perf_counter(), 0
        loss_acc = torch.zeros((), device=self.ctx.device)
        try:
            timeline_step = self.step + 1  # the second step: the access plan is known by then
            while self.step < self.total_steps and not self.should_stop:
                if self.step == timeline_step:
                    self.strategy.record_memory(True)
                tokens = 0
                loss_acc.zero_()
                for a in range(tc.grad_accum):
                    batch = self._to_device(self._micro_batch(self.step, a))
                    tokens += _batch_tokens(batch)
                    with self.strategy.no_sync(sync=a == tc.grad_accum - 1), self._autocast():
                        loss = _loss_of(self.engine(**batch))
                        self.strategy.backward(loss / tc.grad_accum)
                    loss_acc += loss.detach() / tc.grad_accum
                grad_norm = self.strategy.clip_grad_norm(tc.max_grad_norm)
                lr = self.scheduler.get_last_lr()[0]
                self.strategy.optimizer_step()
                if self.step == timeline_step:
                    self.strategy.record_memory(False)
                self.scheduler.step()
                self.step += 1
                tokens *= self.strategy.data_world
                tokens_total += tokens
                tok_log += tokens

                loss_mean = float(all_reduce_mean(loss_acc))
                if not math.isfinite(loss_mean):
                    raise FloatingPointError(
                        f"loss is {loss_mean} at step {self.step}; stopping (lower optim.lr?)"
                    )
                record = {
                    "step": self.step,
                    "loss": loss_mean,
                    "lr": lr,
                    "grad_norm": float(grad_norm),
                }
                self.history.append(record)
                if self.step % cfg.logging.interval == 0 or self.step == self.total_steps:
                    dt = time.perf_counter() - t_log
                    record |= {
                        "tokens_per_s": tok_log / max(dt, 1e-9),
                        "peak_rss_gib": peak_rss_gib(),
                        "time_s": time.perf_counter() - t_start,
                    }
                    record |= {f"mem_{k}": v for k, v in self.strategy.memory_report().items()}
                    t_log, tok_log = time.perf_counter(), 0
                    logger.log(record)
                for cb in self.callbacks:
                    if hasattr(cb, "on_step_end"):
                        cb.on_step_end(self, record)

                if (
                    self.eval_dataset is not None
                    and tc.eval_interval
                    and self.step % tc.eval_interval == 0
                ):
                    last_eval = self.evaluate()
                    logger.log({"step": self.step, **last_eval})
                ck = cfg.checkpoint
                if ck.interval and self.step % ck.interval == 0:
                    self.save()
            if self.eval_dataset is not None and self._eval_step != self.step:
                last_eval = self.evaluate()
                logger.log({"step": self.step, **last_eval})
            if (
                cfg.checkpoint.save_final
                and self.step == self.total_steps
                and not (cfg.checkpoint.interval and self.step % cfg.checkpoint.interval == 0)
            ):
                self.save()
        except BaseException as e:
            if logger._progress is not None:
                logger._progress.stop()
            if isinstance(e, StorageError):  # tier state is unreliable now: free its files
                self.strategy.close()
            raise
        elapsed = time.perf_counter() - t_start
        summary: dict[str, Any] = {
            "steps": self.step,
            "final_loss": self.history[-1]["loss"] if self.history else float("nan"),
            "tokens_per_s": tokens_total / max(elapsed, 1e-9),
            "peak_rss_gib": peak_rss_gib(),
            "time_s": elapsed,
            "world_size": self.ctx.world_size,
            "global_batch": self.global_batch,
        }
        summary |= {  # measured peak per tier next to the one predicted up front
            f"mem_{k}": v
            for k, v in self.strategy.memory_report().items()
            if "peak" in k or "plan" in k
        }
        if last_eval:
            summary |= last_eval
        summary["run_dir"] = str(self.run_dir)
        if self.ctx.is_main and cfg.logging.plot:
            self.strategy.save_memory_plot(self.run_dir / "memory.png")
        logger.close(summary)
        for cb in self.callbacks:
            if hasattr(cb, "on_train_end"):
                cb.on_train_end(self, summary)
        return summary

    @torch.no_grad()
    def evaluate(
        self, eval_dataset: Sequence[Any] | None = None, max_batches: int | None = -1
    ) -> dict[str, float]:
        """Mean loss over predicted tokens (and perplexity), split across ranks.

        The RNG is forked and seeded, so masked-LM evaluations are comparable across calls and
        evaluating never perturbs training randomness."""
        ds = eval_dataset if eval_dataset is not None else self.eval_dataset
        if ds is None:
            raise ConfigError("evaluate() needs an eval_dataset")
        if max_batches == -1:
            max_batches = self.config.train.eval_batches
        b = self.config.train.batch_size
        n_batches = math.ceil(len(ds) / b)
        if max_batches is not None:
            n_batches = min(n_batches, max_batches)
        was_training = self.engine.training
        self.engine.eval()
        sums = torch.zeros(2, dtype=torch.float64)
        with torch.random.fork_rng(devices=[]):
            dr, dw = self.strategy.data_rank, self.strategy.data_world
            torch.manual_seed(self.config.train.seed + 7919 * dr)
            for i in range(dr, n_batches, dw):
                batch = self._to_device(
                    self.collator([ds[j] for j in range(i * b, min(len(ds), (i + 1) * b))])
                )
                with self._autocast():
                    loss = _loss_of(self.engine(**batch))
                n = _predicted_tokens(batch, self.causal)
                sums += torch.tensor([float(loss) * n, n], dtype=torch.float64)
        if dist.is_initialized():
            dist.all_reduce(sums)  # tensor-parallel ranks add the same sums: the ratio holds
        self.engine.train(was_training)
        mean = float(sums[0] / max(sums[1], 1))
        metrics = {"eval_loss": mean, "eval_ppl": math.exp(min(mean, 50.0))}
        self._eval_step = self.step
        for cb in self.callbacks:
            if hasattr(cb, "on_evaluate"):
                cb.on_evaluate(self, metrics)
        return metrics

    # ---- checkpoints ------------------------------------------------------------------------
    @property
    def checkpoint_root(self) -> Path:
        return self.run_dir / "checkpoints"

    def save(self, root: str | Path | None = None) -> Path:
        """Write a checkpoint of the current step (collective: call on every rank)."""
        root = Path(root) if root is not None else self.checkpoint_root
        keep = self.config.checkpoint.keep_last if root == self.checkpoint_root else None
        r = self.ctx.rank
        with CheckpointWriter(root, self.step, keep_last=keep) as ck:
            self.strategy.save(ck)
            rng = {"torch_cpu": torch.get_rng_state()}
            if torch.cuda.is_available():
                rng["torch_cuda"] = torch.cuda.get_rng_state()
            ck.save_tensors(f"rng-rank{r}.safetensors", rng)
            ck.save_json(
                f"rng-rank{r}.json",
                {"python": _jsonable(random.getstate()), "numpy": _jsonable(np.random.get_state())},
            )
            if self.ctx.is_main:
                ck.save_json("scheduler.json", self.scheduler.state_dict())
                ck.save_json(
                    "trainer_state.json",
                    {
                        "step": self.step,
                        "total_steps": self.total_steps,
                        "global_batch": self.global_batch,
                        "world_size": self.ctx.world_size,
                        "seed": self.config.train.seed,
                        "task": self.config.model.resolved_task,
                        "strategy": self.strategy.name,
                    },
                )
                ck.save_text("config.yaml", self.config.to_yaml())
                if hasattr(self.model, "config") and hasattr(self.model.config, "to_json_string"):
                    ck.save_text("config.json", self.model.config.to_json_string())
                if self.tokenizer is not None and hasattr(self.tokenizer, "save_pretrained"):
                    self.tokenizer.save_pretrained(str(ck.path("tokenizer")))
        path = root / f"step-{self.step:08d}"
        for cb in self.callbacks:
            if hasattr(cb, "on_save"):
                cb.on_save(self, path)
        return path

    def resume(self, path: str | Path) -> None:
        """Restore model, optimizer, scheduler, RNG and data position from a checkpoint."""
        if str(path) == "latest":
            found = latest_checkpoint(self.checkpoint_root)
            if found is None:
                raise CheckpointError(
                    f"resume_from=latest: no checkpoint under {self.checkpoint_root}"
                )
            path = found
        path = Path(path)
        # rank 0 hashes every file; the others check sizes. Everyone fails together.
        err = None
        try:
            verify_checkpoint(path, deep=self.ctx.is_main)
        except CheckpointError as e:
            err = e
        if dist.is_initialized():
            flag = torch.tensor([1.0 if err else 0.0])
            dist.all_reduce(flag)
            if flag.item() and err is None:
                err = CheckpointError(f"checkpoint {path} failed verification on another rank")
        if err:
            raise err
        state = load_json(path / "trainer_state.json")
        saved = state.get("strategy", "none")
        fmt = {"chunk": "chunk", "tp": "tp"}  # none and ddp share one format
        if fmt.get(saved, "full") != fmt.get(self.strategy.name, "full"):
            raise CheckpointError(
                f"checkpoint {path} was written by strategy {saved!r}, this run uses "
                f"{self.strategy.name!r}: their model/optimizer formats differ. Resume with "
                f"strategy.name={saved}, or `colossus export` it and start from the exported model."
            )
        if state["global_batch"] != self.global_batch:
            raise CheckpointError(
                f"checkpoint {path} was written with global batch {state['global_batch']}, this run has "
                f"{self.global_batch}: the data position would not carry over. Match batch_size x grad_accum x ranks."
            )
        self.strategy.load(path)
        self.scheduler.load_state_dict(load_json(path / "scheduler.json"))
        self.step = int(state["step"])
        rng_file = path / f"rng-rank{self.ctx.rank}.safetensors"
        if rng_file.exists():
            rng = load_tensors(rng_file)
            torch.set_rng_state(rng["torch_cpu"])
            if "torch_cuda" in rng and torch.cuda.is_available():
                torch.cuda.set_rng_state(rng["torch_cuda"])
            py = load_json(path / f"rng-rank{self.ctx.rank}.json")
            random.setstate(_untuple(py["python"]))
            np_state = py["numpy"]
            np.random.set_state(
                (np_state[0], np.array(np_state[1], dtype=np.uint32), *np_state[2:])
            )


def _jsonable(x: Any) -> Any:
    if isinstance(x, tuple | list):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, np.integer | np.floating):
        return x.item()
    return x


def _untuple(x: Any) -> Any:
    return tuple(_untuple(v) for v in x) if isinstance(x, list) else x
