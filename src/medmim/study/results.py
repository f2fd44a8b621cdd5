"""What a study found, typed: one :class:`CellResult` per finished cell, one :class:`GroupRow` per group of cells
(the same axis values, over seeds), gathered in a :class:`StudyResult`. ``to_json`` gives each as results.json
has it, key for key, so that old study folders and new ones read the same.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from medmim.study.curves import (Convergence, Curve, MeanSd, Speedup, best, convergence, last, mean_sd,
                                 paired_difference, speedup)
from medmim.study.diagnostics import Diagnostics
from medmim.study.spec import Spec

NO_PARTNER = "no partner run"  # a speed-up's note where the same-seed reference run has not run
REFERENCES = ("baseline", "contrastive")  # the roles a spec may name a run for, in table order


@dataclass(frozen=True)
class CellRun:
    """What a finished cell left in its folder: its validation curve and (when evaluated) held-out scores."""

    cell: str  # the cell's folder name
    group: str  # "method=mae, ratio=0.75"
    values: dict[str, str]  # axis -> label
    seed: int
    pretrained: str | None  # the pretrained weights it started from; None: from scratch
    run_dir: str
    wall_s: float | None  # wall seconds of its fine-tuning
    curve: Curve
    evaluation: dict | None = None  # evaluation.json: mean_dice, mean_hd95, per_class, cases, checkpoint

    def score(self, key: str) -> float | None:
        """A held-out score ("mean_dice", "mean_hd95"); None when not evaluated."""
        return (self.evaluation or {}).get(key)


@dataclass(frozen=True)
class CellResult:
    """A finished cell and what it measured against its partners: the runs of the same seed and the same values on
    the other axes, but the spec's baseline (or contrastive) value on its own."""

    run: CellRun
    convergence: Convergence
    best_val_dice: float | None
    speedup_vs: dict[str, Speedup] = field(default_factory=dict)  # "baseline"/"contrastive" -> speed-up over it
    paired: bool = False  # a baseline run of the same seed exists (then ``paired_delta`` is its difference)
    paired_delta: float | None = None  # held-out mean Dice minus the same-seed baseline's
    paired_last_delta: float | None = None  # the same for the Dice at the last validation

    @property
    def last_val(self) -> tuple[int, float] | None:
        """(step, Dice) of the run's last validation: unlike the best, a score no one picked."""
        return last(self.run.curve)

    @property
    def last_val_dice(self) -> float | None:
        return self.last_val[1] if self.last_val else None

    def to_json(self) -> dict:
        r = self.run
        d = {"cell": r.cell, "group": r.group, "values": r.values, "seed": r.seed, "pretrained": r.pretrained,
             "run_dir": r.run_dir, "wall_s": r.wall_s, "curve": r.curve}
        if r.evaluation is not None:
            d["evaluation"] = r.evaluation
        d["convergence"] = self.convergence.to_json()
        d["best_val_dice"] = self.best_val_dice
        if self.last_val:
            d["last_val_step"], d["last_val_dice"] = self.last_val
        for which in REFERENCES:
            if which in self.speedup_vs:
                d[f"speedup_vs_{which}"] = self.speedup_vs[which].to_json()
            if which == "baseline" and self.paired:
                d["paired_delta"], d["paired_last_delta"] = self.paired_delta, self.paired_last_delta
        return d


@dataclass(frozen=True)
class GroupSpeedup:
    speedup: MeanSd  # over the runs that reached the level
    never_reached: int  # runs with a partner but no speed-up (never reached the level, no curve)
    no_partner: int = 0  # runs whose partner has not run (a partial report)


@dataclass(frozen=True)
class GroupRow:
    """One group of cells over its finished seeds: mean and spread of everything a reader compares."""

    group: str
    values: dict[str, str]
    seeds: int  # finished runs in the group
    eval_dice: MeanSd
    eval_hd95: MeanSd
    best_val_dice: MeanSd
    last_val_dice: MeanSd  # Dice at each run's last validation
    converged: int  # runs that converged
    paired_delta: MeanSd  # of the same-seed differences against the baseline
    paired_n: int
    paired_last_delta: MeanSd  # the same at the last validation
    paired_last_n: int
    rel_change: MeanSd
    speedup_vs: dict[str, GroupSpeedup]  # the references any run of the group was measured against
    organs: dict[str, tuple[str, MeanSd]]  # class id -> (organ name, held-out Dice), by class id

    def to_json(self) -> dict:
        d = {"group": self.group, "values": self.values, "seeds": self.seeds, "eval_dice": self.eval_dice,
             "eval_hd95": self.eval_hd95, "best_val_dice": self.best_val_dice, "last_val_dice": self.last_val_dice,
             "converged": self.converged, "paired_delta": self.paired_delta, "paired_n": self.paired_n,
             "paired_last_delta": self.paired_last_delta, "paired_last_n": self.paired_last_n,
             "rel_change": self.rel_change}
        for which, s in self.speedup_vs.items():
            d[f"speedup_vs_{which}"], d[f"never_reached_vs_{which}"] = s.speedup, s.never_reached
            if s.no_partner:
                d[f"no_partner_vs_{which}"] = s.no_partner
        d["organs"] = self.organs
        return d


@dataclass(frozen=True)
class StudyResult:
    cells: list[CellResult]
    groups: list[GroupRow]
    cache: Path  # the prepared cache the runs read
    stage_seconds: dict[str, float] = field(default_factory=dict)  # wall seconds of the stages run this time
    diagnostics: Diagnostics | None = None  # what the spec's diagnostics measured

    def val_ids(self, fold: int = 0) -> list[str]:
        """The ids of the validation cases of ``fold`` (held out of pretraining and fine-tuning)."""
        from medmim.data.sampling import open_cache

        return open_cache(self.cache).split(fold)[1]

    def to_json(self) -> dict:
        d = {"cells": [c.to_json() for c in self.cells], "aggregate": [g.to_json() for g in self.groups],
             "stage_seconds": self.stage_seconds}
        if self.diagnostics is not None:
            d["diagnostics"] = self.diagnostics.to_json()
        return d


def matches(values: dict[str, str], fixed: dict[str, str]) -> bool:
    return all(values.get(k) == v for k, v in fixed.items())


def partner_values(values: dict[str, str], ref: dict[str, str]) -> dict[str, str]:
    """The axis values of the partner of a run with ``values``: the same on the other axes, ``ref`` on its own."""
    return {**values, **ref}


def score_cells(spec: Spec, runs: list[CellRun]) -> list[CellResult]:
    """Each finished cell's convergence and best validation Dice, and its speed-ups and paired difference against
    its partners among ``runs``."""
    out = []
    for r in runs:
        speedups: dict[str, Speedup] = {}
        paired, delta, last_delta = False, None, None
        for which, ref in spec.references.items():
            want = partner_values(r.values, ref)
            if matches(r.values, ref) or spec.excluded(want):  # it is the reference, or the spec runs no partner
                continue
            b = next((q for q in runs if q.seed == r.seed and q.values == want), None)
            speedups[which] = speedup(b.curve, r.curve) if b else Speedup(None, NO_PARTNER)
            if which == "baseline" and b:  # same seed: same labeled subset, same decoder initialisation
                paired, delta = True, paired_difference(r.score("mean_dice"), b.score("mean_dice"))
                mine, theirs = last(r.curve), last(b.curve)
                last_delta = paired_difference(mine and mine[1], theirs and theirs[1])
        out.append(CellResult(r, convergence(r.curve), best(r.curve), speedups, paired, delta, last_delta))
    return out


def _organs(rs: list[CellResult]) -> dict[str, tuple[str, MeanSd]]:
    organs: dict[str, list] = {}
    for r in rs:
        for c, d in ((r.run.evaluation or {}).get("per_class") or {}).items():
            organs.setdefault(c, [d["name"], []])[1].append(d["dice"])
    return {c: (name, mean_sd(v)) for c, (name, v) in sorted(organs.items(), key=lambda kv: int(kv[0]))}


def aggregate(cells: list[CellResult]) -> list[GroupRow]:
    """One row per group (axis values), over seeds, in the order the groups first appear."""
    groups: dict[str, list[CellResult]] = {}
    for r in cells:
        groups.setdefault(r.run.group, []).append(r)
    rows = []
    for group, rs in groups.items():
        paired = [r.paired_delta for r in rs if r.paired_delta is not None]
        paired_last = [r.paired_last_delta for r in rs if r.paired_last_delta is not None]
        speedups = {}
        for which in REFERENCES:
            sps = [r.speedup_vs[which] for r in rs if which in r.speedup_vs]
            if sps:
                alone = sum(s.note == NO_PARTNER for s in sps)
                speedups[which] = GroupSpeedup(mean_sd([s.speedup for s in sps]),
                                               sum(s.speedup is None for s in sps) - alone, alone)
        rows.append(GroupRow(
            group=group, values=rs[0].run.values, seeds=len(rs),
            eval_dice=mean_sd([r.run.score("mean_dice") for r in rs]),
            eval_hd95=mean_sd([r.run.score("mean_hd95") for r in rs]),
            best_val_dice=mean_sd([r.best_val_dice for r in rs]),
            last_val_dice=mean_sd([r.last_val_dice for r in rs]),
            converged=sum(bool(r.convergence.converged) for r in rs),
            paired_delta=mean_sd(paired), paired_n=len(paired), paired_last_delta=mean_sd(paired_last),
            paired_last_n=len(paired_last),
            rel_change=mean_sd([r.convergence.rel_change for r in rs]),
            speedup_vs=speedups, organs=_organs(rs)))
    return rows
