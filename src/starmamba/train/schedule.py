"""Learning-rate schedule: linear warmup then half-cycle cosine, applied every iteration (as in MAE)."""

from __future__ import annotations

import math

import torch


def lr_at(epoch: float, base_lr: float, min_lr: float, warmup_epochs: float, epochs: float) -> float:
    """The lr at fractional ``epoch`` (epoch index + step / steps per epoch).

    Rises linearly from 0 to ``base_lr`` over ``warmup_epochs``, then follows a half cosine down
    to ``min_lr`` at ``epochs``, and stays at ``min_lr`` after that.
    """
    if epoch < warmup_epochs:
        return base_lr * epoch / warmup_epochs
    span = epochs - warmup_epochs
    progress = min(1.0, (epoch - warmup_epochs) / span) if span > 0 else 1.0
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Give every group ``lr`` times its ``lr_scale`` (1 where it has none)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def effective_lr(blr: float, effective_batch: int) -> float:
    """The absolute lr from a base lr, scaled linearly with the batch: ``blr * effective_batch / 256``."""
    return blr * effective_batch / 256
