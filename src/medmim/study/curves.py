"""The numbers a study compares: convergence speed-up, convergence, mean and spread over seeds, paired differences.

A curve is a run's validation mean Dice against its fine-tuning step: ``[(step, dice), ...]``, steps rising.

Convergence speed-up, defined once: for a baseline run B and a pretrained run P, let D be B's best
validation mean Dice; the speed-up is (first step at which B reaches 0.95 D) / (first step at which
P reaches 0.95 D). When P never reaches 0.95 D it is reported as such, never as a number.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

SPEEDUP_LEVEL = 0.95
CONVERGED_REL_CHANGE = 0.05  # |change of validation Dice over the last quarter| / final Dice below this

Curve = list[tuple[int, float]]
MeanSd = tuple[float | None, float | None]  # (mean, sample standard deviation); (None, None): no value


@dataclass(frozen=True)
class Speedup:
    """The convergence speed-up of one run over another; ``speedup`` None says why in ``note``."""

    speedup: float | None
    note: str = ""
    level: float | None = None  # SPEEDUP_LEVEL x the baseline's best validation Dice
    baseline_step: int | None = None  # first step the baseline reached ``level``
    step: int | None = None  # first step the pretrained run reached ``level``

    def to_json(self) -> dict:
        """As results.json has it: the keys that apply, in the order speedup, level, baseline_step, step, note."""
        d: dict = {"speedup": self.speedup}
        d.update({k: v for k, v in (("level", self.level), ("baseline_step", self.baseline_step), ("step", self.step))
                  if v is not None})
        d["note"] = self.note
        return d


@dataclass(frozen=True)
class Convergence:
    """Relative change of validation Dice over the last quarter of a run; ``rel_change`` None: too few points."""

    rel_change: float | None
    converged: bool
    note: str = ""

    def to_json(self) -> dict:
        return asdict(self)


def first_step_reaching(curve: Curve, level: float) -> int | None:
    for step, v in curve:
        if v >= level:
            return step
    return None


def speedup(baseline: Curve, pretrained: Curve) -> Speedup:
    """The convergence speed-up of ``pretrained`` over ``baseline`` (see the module docstring)."""
    if not baseline or not pretrained:
        return Speedup(None, "no validation curve")
    d = max(v for _, v in baseline)
    level = SPEEDUP_LEVEL * d
    sb, sp = first_step_reaching(baseline, level), first_step_reaching(pretrained, level)
    if d <= 0:
        return Speedup(None, "baseline never scored above 0", level=level)
    if sp is None:
        return Speedup(None, f"never reached {level:.3f}", level=level, baseline_step=sb)
    return Speedup(sb / sp, level=level, baseline_step=sb, step=sp)


def convergence(curve: Curve) -> Convergence:
    """Relative change of validation Dice over the last quarter of the run; converged when small."""
    if len(curve) < 8:  # a "last quarter" of one or two validations says nothing
        return Convergence(None, False, f"too few validations ({len(curve)}) to tell")
    last = curve[-1][1]
    q_step = curve[-1][0] * 0.75
    at_q = min(curve, key=lambda sv: abs(sv[0] - q_step))[1]
    rel = (last - at_q) / max(abs(last), 1e-6)
    return Convergence(rel, abs(rel) < CONVERGED_REL_CHANGE)


def best(curve: Curve) -> float | None:
    """The best validation Dice of a run; None without a validation."""
    return max((v for _, v in curve), default=None)


def last(curve: Curve) -> tuple[int, float] | None:
    """A run's last validation (step, Dice): a score that no one chose, unlike the best; None without one."""
    return curve[-1] if curve else None


def mean_sd(values: list[float | None]) -> MeanSd:
    """Mean and sample standard deviation (0 for one value) of the finite values; (None, None) without any."""
    vals = [v for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return None, None
    return float(np.mean(vals)), float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0


def paired_difference(mine: float | None, theirs: float | None) -> float | None:
    """``mine - theirs`` for two runs of the same seed (same labeled subset, same decoder initialisation)."""
    return mine - theirs if mine is not None and theirs is not None else None
