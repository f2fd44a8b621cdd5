"""Learning-rate schedule of the paper: linear warm-up, then cosine decay to ``min_lr``."""

from __future__ import annotations

import math


def effective_lr(base_lr: float, effective_batch: int, base_batch_size: int, scale: bool = True) -> float:
    """The linear scaling rule: lr = base_lr x effective batch / base batch (Goyal et al.; MAE)."""
    return base_lr * effective_batch / base_batch_size if scale else base_lr


def warmup_cosine(step: int, total_steps: int, warmup_steps: int, peak_lr: float, min_lr: float = 0.0) -> float:
    """Learning rate at optimiser ``step`` (0-based): 0 -> peak over ``warmup_steps``, cosine to ``min_lr`` by ``total_steps``."""
    if warmup_steps > 0 and step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_lr + (peak_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
