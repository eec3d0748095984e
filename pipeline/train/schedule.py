"""The learning-rate schedule: a pure function of the optimiser step, so a resume needs only the step."""

from __future__ import annotations

import math

from pipeline.config import TrainConfig


def learning_rate(cfg: TrainConfig, opt_step: int, total_opt_steps: int, epoch: int) -> float:
    """Linear warm-up to `cfg.peak_lr`, then cosine to 0 over the run, or `step`: times `lr_gamma`
    every `lr_step_epochs` epochs (the only use of `epoch`)."""
    peak = cfg.peak_lr
    if opt_step < cfg.warmup_steps:
        return peak * (opt_step + 1) / cfg.warmup_steps
    if cfg.schedule == "step":
        return peak * cfg.lr_gamma ** (epoch // cfg.lr_step_epochs)
    span = max(1, total_opt_steps - cfg.warmup_steps)
    progress = min(1.0, (opt_step - cfg.warmup_steps) / span)
    return peak * 0.5 * (1.0 + math.cos(math.pi * progress))
