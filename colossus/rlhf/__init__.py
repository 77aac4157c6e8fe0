"""RLHF: supervised fine-tuning, a reward model, PPO and DPO, as recipe stages chained by paths.

Example::

    from colossus.config import TrainingConfig
    from colossus.rlhf import run_rlhf
    for stage in ("sft", "rm", "ppo"):
        run_rlhf(TrainingConfig.from_yaml(f"recipes/rlhf-{stage}.yaml"))
"""

from colossus.rlhf.stage import run_rlhf

__all__ = ["run_rlhf"]
