"""The optimiser both trainers use: AdamW, linear warm-up, then cosine decay to a floor (the paper's: 5% warm-up)."""

from __future__ import annotations

import math
from typing import Any

import torch


def warmup_cosine(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int, min_lr_ratio: float = 0.0) -> torch.optim.lr_scheduler.LambdaLR:
    """LR multiplier: ``step/warmup`` during warm-up, then cosine from 1 to ``min_lr_ratio``."""
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio}")

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def fused_supported(params: list[torch.Tensor]) -> bool:
    """Every parameter can take the fused AdamW kernel: floating point, on a device torch fuses for."""
    from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

    devices = set(_get_fused_kernels_supported_devices())
    return bool(params) and all(torch.is_floating_point(p) and p.device.type in devices for p in params)


def adamw_warmup_cosine(
    param_groups: list[dict[str, Any]],
    *,
    learning_rate: float,
    betas: tuple[float, float] | list[float],
    warmup_ratio: float,
    min_lr_ratio: float,
    total_steps: int,
    fused: bool = False,
) -> dict[str, Any]:
    """``configure_optimizers``' answer: AdamW over ``param_groups`` (each may set its own lr and weight decay), stepped per batch.

    ``total_steps``: the optimiser steps of the run (``trainer.estimated_stepping_batches``); warm-up is
    ``ceil(warmup_ratio · total_steps)`` of them. ``fused``: torch's fused AdamW kernel where every
    parameter allows it (floating point, on a device it supports), else torch's default.
    """
    params = [p for group in param_groups for p in group["params"]]
    optimizer = torch.optim.AdamW(param_groups, lr=learning_rate, betas=tuple(betas), fused=(fused and fused_supported(params)) or None)
    total = max(1, int(total_steps))
    scheduler = warmup_cosine(optimizer, total_steps=total, warmup_steps=math.ceil(warmup_ratio * total), min_lr_ratio=min_lr_ratio)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
