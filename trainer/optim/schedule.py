"""Learning-rate schedules: linear warmup, then cosine, linear, constant or warmup-stable-decay."""

import math

import torch


def lr_factor(
    step: int, max_steps: int, warmup_steps: int, schedule: str, min_lr_ratio: float, decay_fraction: float
) -> float:
    """Multiplier of the peak learning rate at optimizer step `step` (counted from 0)."""
    warmup_steps = min(warmup_steps, max_steps - 1)
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if schedule == "constant":
        return 1.0
    if schedule == "wsd":
        # Warmup-stable-decay (Hu et al., MiniCPM, 2024): hold the peak, then decay linearly over the
        # last `decay_fraction` of the run.
        decay_start = max(warmup_steps, round(max_steps * (1 - decay_fraction)))
        if step < decay_start:
            return 1.0
        progress = (step - decay_start) / max(1, max_steps - 1 - decay_start)
        return 1.0 - (1.0 - min_lr_ratio) * min(progress, 1.0)
    progress = min((step - warmup_steps) / max(1, max_steps - 1 - warmup_steps), 1.0)
    if schedule == "linear":
        return 1.0 - (1.0 - min_lr_ratio) * progress
    if schedule == "cosine":
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown schedule {schedule!r}")


def build_scheduler(optimizer: torch.optim.Optimizer, cfg, max_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    def factor(step):
        return lr_factor(step, max_steps, cfg.warmup_steps, cfg.schedule, cfg.min_lr_ratio, cfg.decay_fraction)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
