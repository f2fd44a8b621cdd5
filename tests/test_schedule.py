"""The learning-rate schedule (linear warm-up, cosine to min_lr) and the linear batch scaling, against
values worked out by hand."""

from __future__ import annotations

import math

import pytest

from medmim.train.schedule import effective_lr, warmup_cosine


# --- warmup_cosine -------------------------------------------------------------------------------

def test_warmup_then_cosine_at_hand_computed_steps() -> None:
    """total 10 steps, 4 of warm-up, peak 1.0, min 0:

    warm-up, lr = peak * (step + 1) / 4:   step 0 -> 0.25, step 1 -> 0.5, step 3 (its last) -> 1.0
    cosine over the 6 steps 4..9, progress p = (step - 4) / 6, lr = 0.5 * (1 + cos(pi * p)):
        step 4: p = 0   -> 1.0 (the peak again, where the decay starts)
        step 7: p = 1/2 -> 0.5 * (1 + cos(pi/2)) = 0.5
        step 9 (the last step): p = 5/6 -> 0.5 * (1 + cos(5 pi / 6)) = 0.5 * (1 - sqrt(3)/2) = 0.0669873
        step 10 (= total): p = 1 -> 0.0
    """
    lr = lambda s: warmup_cosine(s, total_steps=10, warmup_steps=4, peak_lr=1.0)  # noqa: E731
    assert lr(0) == pytest.approx(0.25)
    assert lr(1) == pytest.approx(0.5)
    assert lr(3) == pytest.approx(1.0)
    assert lr(4) == pytest.approx(1.0)
    assert lr(7) == pytest.approx(0.5)
    assert lr(9) == pytest.approx(0.5 * (1 - math.sqrt(3) / 2)) == pytest.approx(0.0669873, abs=1e-7)
    assert lr(10) == pytest.approx(0.0, abs=1e-12)


def test_min_lr_is_the_floor_and_scales_the_cosine() -> None:
    """peak 4e-4, min 1e-5, 10 steps with 4 of warm-up: lr = min + (peak - min) * 0.5 * (1 + cos(pi p)).

    step 7 (p = 1/2): 1e-5 + 3.9e-4 * 0.5 = 2.05e-4; step 10 and every step past the end: 1e-5.
    Warm-up ignores min_lr: step 0 is 4e-4 / 4 = 1e-4.
    """
    lr = lambda s: warmup_cosine(s, 10, 4, peak_lr=4e-4, min_lr=1e-5)  # noqa: E731
    assert lr(0) == pytest.approx(1e-4)
    assert lr(4) == pytest.approx(4e-4)
    assert lr(7) == pytest.approx(2.05e-4)
    assert lr(9) == pytest.approx(1e-5 + 3.9e-4 * 0.5 * (1 - math.sqrt(3) / 2))
    for step in (10, 11, 50):
        assert lr(step) == pytest.approx(1e-5)
    assert all(1e-5 - 1e-15 <= lr(s) for s in range(4, 60))


def test_no_warmup_starts_at_the_peak() -> None:
    """warmup 0, 4 steps: p = step / 4 -> 1.0, 0.5 * (1 + cos(pi/4)) = 0.8535534, 0.5, 0.1464466."""
    got = [warmup_cosine(s, 4, 0, 1.0) for s in range(4)]
    assert got == pytest.approx([1.0, 0.5 * (1 + math.sqrt(2) / 2), 0.5, 0.5 * (1 - math.sqrt(2) / 2)])


def test_warmup_rises_and_cosine_falls_between_min_and_peak() -> None:
    total, warmup, peak, floor = 200, 20, 3e-3, 1e-4
    lrs = [warmup_cosine(s, total, warmup, peak, floor) for s in range(total)]
    assert all(a < b for a, b in zip(lrs[:warmup], lrs[1:warmup]))  # strictly increasing during warm-up
    assert all(a >= b for a, b in zip(lrs[warmup:], lrs[warmup + 1:]))  # never increasing after it
    assert max(lrs) == pytest.approx(peak) and all(0 < v <= peak * (1 + 1e-12) for v in lrs)
    assert min(lrs[warmup:]) >= floor


# --- effective_lr ------------------------------------------------------------------------------

def test_effective_lr_scales_linearly_with_the_batch() -> None:
    """lr = base_lr x effective batch / base batch: 1.5e-4 x 1024 / 256 = 6e-4; 1e-3 x 2 / 4 = 5e-4."""
    assert effective_lr(1.5e-4, 1024, 256) == pytest.approx(6e-4)
    assert effective_lr(1e-3, 2, 4) == pytest.approx(5e-4)
    assert effective_lr(1e-3, 4, 4) == pytest.approx(1e-3)  # the base batch itself: the base lr
    for batch in (1, 3, 8, 96):
        assert effective_lr(2e-4, 2 * batch, 32) == pytest.approx(2 * effective_lr(2e-4, batch, 32))


def test_effective_lr_unscaled_is_the_base_lr() -> None:
    assert effective_lr(1.5e-4, 1024, 256, scale=False) == 1.5e-4
    assert effective_lr(1e-3, 1, 4, scale=False) == 1e-3
