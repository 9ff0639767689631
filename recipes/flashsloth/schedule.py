"""Learning-rate schedule: linear warmup, then cosine decay to zero (the paper's schedule).

The formula is the one the released runs used (Hugging Face's cosine schedule with warmup,
half a cycle): for optimizer step ``s`` (0-based) with ``W`` warmup steps out of ``T``,

    factor(s) = s / W                                     if s < W
    factor(s) = 0.5 * (1 + cos(pi * min(1, (s - W) / max(1, T - W))))   otherwise

and ``lr(s) = base_lr * factor(s)``. Past the last step the factor stays at 0 instead of
rising again. Call ``scheduler.step()`` once after every ``optimizer.step()``.
"""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

__all__ = ["WarmupCosineSchedule", "num_warmup_steps", "warmup_cosine_factor"]


def num_warmup_steps(total_steps: int, warmup_ratio: float) -> int:
    """Warmup length for a run of ``total_steps`` optimizer steps: ``ceil(ratio * total)``."""
    if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
        raise ValueError(f"total_steps must be a positive int, got {total_steps!r}")
    if not 0.0 <= warmup_ratio <= 1.0:
        raise ValueError(f"warmup_ratio must be in [0, 1], got {warmup_ratio!r}")
    return math.ceil(total_steps * warmup_ratio)


def warmup_cosine_factor(step: int, *, warmup_steps: int, total_steps: int) -> float:
    """Multiplier of the base learning rate at optimizer step ``step`` (0-based)."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if step < warmup_steps:
        return step / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


class WarmupCosineSchedule(LRScheduler):
    """Linear warmup over ``ceil(warmup_ratio * total_steps)`` steps, then cosine to zero.

    Its ``state_dict()`` holds only numbers (JSON-safe), so it goes into a checkpoint's
    JSON part as is.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        total_steps: int,
        warmup_ratio: float = 0.03,
        last_epoch: int = -1,
    ) -> None:
        self.total_steps = total_steps
        self.warmup_steps = num_warmup_steps(total_steps, warmup_ratio)
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[float]:
        factor = warmup_cosine_factor(
            self.last_epoch, warmup_steps=self.warmup_steps, total_steps=self.total_steps
        )
        return [base_lr * factor for base_lr in self.base_lrs]
