"""Learning-rate schedule: linear warm-up then cosine decay to a floor (the paper's: 5% warm-up)."""

from __future__ import annotations

import math

import torch


def warmup_cosine(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int, min_lr_ratio: float = 0.0) -> torch.optim.lr_scheduler.LambdaLR:
    """LR multiplier: ``step/warmup`` during warm-up, then cosine from 1 to ``min_lr_ratio``."""
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(f"model.min_lr_ratio must be in [0, 1], got {min_lr_ratio}")

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
