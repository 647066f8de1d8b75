"""OLMo's learning-rate schedules and gradient-clipping warm-up, as pure functions of the step (or token) count.

With `t` the current step (or tokens seen, counting the current batch) and `T` the run's length (or `t_max`):
  warmup (t < t_warmup):  lr = w + (LR - w) * t / t_warmup,   w = warmup_min_lr or 0.1 * LR
  cosine_with_warmup:     lr = m + (LR - m) * (1 + cos(pi * (t - t_warmup) / (T - t_warmup))) / 2,  m = alpha_f * LR
  linear_with_warmup:     lr = LR - (LR - m) * (t - t_warmup) / (T - t_warmup)
  constant_with_warmup:   lr = LR after warm-up;  constant: lr = LR always
and lr = m once t >= T. Staged annealing (OLMo 1.7) is `linear_with_warmup` with `t_warmup: 0, alpha_f: 0`
over the anneal's tokens, started from a checkpoint with `reset_trainer_state` (optimizer state kept).
Max grad norm: `max_grad_norm * grad_clip_warmup_factor` while t <= grad_clip_warmup_steps, else max_grad_norm.
"""
from __future__ import annotations

import math

from ..config import ConfigError
from .config import SchedulerConfig


class Schedule:
    def __init__(self, config: SchedulerConfig, learning_rate: float, max_grad_norm: float | None) -> None:
        self.config, self.learning_rate, self.max_grad_norm = config, learning_rate, max_grad_norm
        w = config.warmup_min_lr
        if config.name != "constant" and config.t_warmup > 0 and not 0 <= (w if w is not None else 0) < learning_rate:
            raise ConfigError(f"scheduler.warmup_min_lr {w} must lie in [0, learning_rate {learning_rate})")

    def lr(self, t: float, total: float) -> float:
        cfg, peak = self.config, self.learning_rate
        if cfg.name == "constant":
            return peak
        warmup = cfg.t_warmup
        if t < warmup:
            start = cfg.warmup_min_lr if cfg.warmup_min_lr is not None else 0.1 * peak
            return start + (peak - start) * t / warmup
        if cfg.name == "constant_with_warmup":
            return peak
        total = cfg.t_max if cfg.t_max is not None else total
        floor = cfg.alpha_f * peak
        if t >= total:
            return floor
        frac = (t - warmup) / (total - warmup)
        if cfg.name == "cosine_with_warmup":
            return floor + (peak - floor) * (1 + math.cos(math.pi * frac)) / 2
        return peak - (peak - floor) * frac  # linear_with_warmup

    def grad_norm_limit(self, t: float) -> float | None:
        cfg = self.config
        if self.max_grad_norm is None:
            return None
        if cfg.grad_clip_warmup_steps is None or cfg.grad_clip_warmup_factor is None or t > cfg.grad_clip_warmup_steps:
            return self.max_grad_norm
        return self.max_grad_norm * cfg.grad_clip_warmup_factor
