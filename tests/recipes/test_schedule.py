"""Warmup + cosine schedule: values against the hand formula, state round trip."""

from __future__ import annotations

import json
import math

import pytest
import torch

from recipes.flashsloth.schedule import WarmupCosineSchedule, num_warmup_steps, warmup_cosine_factor


def hand_lr(step: int, base: float, warmup: int, total: int) -> float:
    if step < warmup:
        return base * step / warmup
    progress = min(1.0, (step - warmup) / (total - warmup))
    return base * 0.5 * (1 + math.cos(math.pi * progress))


def make_optimizer(lr: float = 1e-3) -> torch.optim.Optimizer:
    return torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=lr)


@pytest.mark.parametrize(
    "total, ratio, expected",
    [(100, 0.03, 3), (1000, 0.03, 30), (10, 0.03, 1), (2180, 0.03, 66), (5197, 0.03, 156),
     (50, 0.0, 0), (7, 1.0, 7)],
)
def test_warmup_steps_is_ceil_of_ratio_times_total(total, ratio, expected):
    assert num_warmup_steps(total, ratio) == expected


@pytest.mark.parametrize(
    "total, ratio, match", [(0, 0.03, "total_steps"), (10, -0.1, "warmup_ratio"), (10, 1.5, "warmup_ratio")]
)
def test_bad_arguments_name_the_argument(total, ratio, match):
    with pytest.raises(ValueError, match=match):
        num_warmup_steps(total, ratio)


def test_factor_matches_hand_formula_at_landmarks():
    # 100 steps, 3 warmup: 0, 1/3, 2/3, then exactly 1 at the end of warmup.
    assert [warmup_cosine_factor(s, warmup_steps=3, total_steps=100) for s in range(4)] == pytest.approx(
        [0.0, 1 / 3, 2 / 3, 1.0]
    )
    # Half-way through the decay the cosine is at 0.5; at the last step it is 0.
    assert warmup_cosine_factor(3 + 97 / 2, warmup_steps=3, total_steps=100) == pytest.approx(0.5)
    assert warmup_cosine_factor(100, warmup_steps=3, total_steps=100) == pytest.approx(0.0)
    # Past the end it stays at 0 rather than rising again.
    assert warmup_cosine_factor(150, warmup_steps=3, total_steps=100) == pytest.approx(0.0)
    # No warmup: starts at the full rate.
    assert warmup_cosine_factor(0, warmup_steps=0, total_steps=10) == 1.0


def test_scheduler_learning_rates_follow_hand_formula():
    base, total = 2e-5, 40
    optimizer = make_optimizer(base)
    schedule = WarmupCosineSchedule(optimizer, total_steps=total, warmup_ratio=0.03)
    assert schedule.warmup_steps == 2
    seen = []
    for _ in range(total):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    expected = [hand_lr(s, base, 2, total) for s in range(total)]
    assert seen == pytest.approx(expected, rel=1e-12, abs=1e-18)
    assert max(seen) == pytest.approx(base)


def test_state_dict_is_json_and_resumes_identically():
    optimizer = make_optimizer()
    schedule = WarmupCosineSchedule(optimizer, total_steps=20, warmup_ratio=0.1)
    for _ in range(7):
        optimizer.step()
        schedule.step()
    state = json.loads(json.dumps(schedule.state_dict()))  # checkpoints keep it as JSON

    resumed_optimizer = make_optimizer()
    resumed = WarmupCosineSchedule(resumed_optimizer, total_steps=20, warmup_ratio=0.1)
    resumed.load_state_dict(state)
    # The optimizer's lr is restored from its own state dict in a real resume.
    resumed_optimizer.param_groups[0]["lr"] = optimizer.param_groups[0]["lr"]
    for _ in range(10):
        optimizer.step()
        schedule.step()
        resumed_optimizer.step()
        resumed.step()
        assert resumed_optimizer.param_groups[0]["lr"] == optimizer.param_groups[0]["lr"]
