"""Per-case, per-class Dice and 95th-percentile Hausdorff distance (MONAI), in the original geometry.

A class absent from both the prediction and the ground truth is reported as ``absent`` with no
number: it is neither a perfect 1 nor a failed 0. A class present on one side only gets Dice 0
and no HD95 (``missed`` when only the ground truth has it, ``false positive`` when only the
prediction has it). The mean over classes excludes background and the absent classes.
"""

from __future__ import annotations

import csv
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch


@dataclass
class ClassScore:
    case_id: str
    label: int
    name: str
    dice: float | None
    hd95_mm: float | None
    status: str  # "ok", "absent", "missed", "false positive"
    gt_voxels: int
    pred_voxels: int


def score_case(case_id: str, pred: np.ndarray, gt: np.ndarray, spacing, labels: dict[int, str]) -> list[ClassScore]:
    """Dice and HD95 (mm, with the true voxel ``spacing``) for every non-background class in ``labels``."""
    from monai.metrics import compute_dice, compute_hausdorff_distance

    if pred.shape != gt.shape:
        raise ValueError(f"{case_id}: prediction shape {pred.shape} differs from ground truth {gt.shape}")
    out = []
    for c in sorted(labels):
        if c == 0:
            continue
        p, g = pred == c, gt == c
        np_, ng = int(p.sum()), int(g.sum())
        if np_ == 0 and ng == 0:
            out.append(ClassScore(case_id, c, labels[c], None, None, "absent", 0, 0))
            continue
        if np_ == 0 or ng == 0:
            out.append(ClassScore(case_id, c, labels[c], 0.0, None, "missed" if ng else "false positive", ng, np_))
            continue
        pt = torch.from_numpy(p)[None, None]
        gt_t = torch.from_numpy(g)[None, None]
        dice = float(compute_dice(pt, gt_t, include_background=True)[0, 0])
        with warnings.catch_warnings():  # MONAI 1.6 warns about its own deprecated internal argument
            warnings.simplefilter("ignore", FutureWarning)
            hd = float(compute_hausdorff_distance(pt, gt_t, include_background=True, percentile=95,
                                                  spacing=[float(s) for s in spacing])[0, 0])
        out.append(ClassScore(case_id, c, labels[c], dice, hd if math.isfinite(hd) else None, "ok", ng, np_))
    return out


@dataclass
class Evaluation:
    scores: list[ClassScore] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)

    def per_class(self) -> dict[int, dict]:
        """label -> {name, mean dice, mean hd95, cases scored, cases absent}."""
        out: dict[int, dict] = {}
        for s in self.scores:
            d = out.setdefault(s.label, {"name": s.name, "dice": [], "hd95": [], "absent": 0, "missed": 0, "fp": 0})
            if s.status == "absent":
                d["absent"] += 1
                continue
            d["dice"].append(s.dice)
            if s.hd95_mm is not None:
                d["hd95"].append(s.hd95_mm)
            d["missed"] += s.status == "missed"
            d["fp"] += s.status == "false positive"
        for d in out.values():
            d["mean_dice"] = float(np.mean(d["dice"])) if d["dice"] else None
            d["mean_hd95"] = float(np.mean(d["hd95"])) if d["hd95"] else None
            d["n"] = len(d["dice"])
        return out

    def per_case(self) -> dict[str, float | None]:
        by: dict[str, list[float]] = {}
        for s in self.scores:
            if s.status != "absent":
                by.setdefault(s.case_id, []).append(s.dice)
        return {k: float(np.mean(v)) if v else None for k, v in by.items()}

    def mean_dice(self) -> float | None:
        """Mean over classes (background and absent classes excluded) of each class's mean over cases."""
        vals = [d["mean_dice"] for d in self.per_class().values() if d["mean_dice"] is not None]
        return float(np.mean(vals)) if vals else None

    def mean_hd95(self) -> float | None:
        vals = [d["mean_hd95"] for d in self.per_class().values() if d["mean_hd95"] is not None]
        return float(np.mean(vals)) if vals else None

    def write_csv(self, path: Path) -> Path:
        with open(path, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["case", "label", "name", "dice", "hd95_mm", "status", "gt_voxels", "pred_voxels"])
            for s in self.scores:
                w.writerow([s.case_id, s.label, s.name, "" if s.dice is None else f"{s.dice:.6f}",
                            "" if s.hd95_mm is None else f"{s.hd95_mm:.3f}", s.status, s.gt_voxels, s.pred_voxels])
        return path

    def markdown(self, title: str = "Evaluation") -> str:
        pc = self.per_class()
        fmt = lambda v, d=4: "—" if v is None else f"{v:.{d}f}"
        lines = [f"# {title}", "",
                 f"Mean Dice over classes (background and absent classes excluded): **{fmt(self.mean_dice())}**; "
                 f"mean HD95: **{fmt(self.mean_hd95(), 2)} mm**", "",
                 "| label | organ | mean Dice | mean HD95 (mm) | cases scored | absent (both empty) | missed | false positive |",
                 "|---:|---|---:|---:|---:|---:|---:|---:|"]
        for c, d in sorted(pc.items()):
            lines.append(f"| {c} | {d['name']} | {fmt(d['mean_dice'])} | {fmt(d['mean_hd95'], 2)} | {d['n']} | "
                         f"{d['absent']} | {d['missed']} | {d['fp']} |")
        lines += ["", "| case | mean Dice |", "|---|---:|"]
        for k, v in sorted(self.per_case().items()):
            lines.append(f"| {k} | {fmt(v)} |")
        if self.seconds:
            lines += ["", "Time per case (s): " + ", ".join(f"{k} {v:.1f}" for k, v in self.seconds.items())]
        return "\n".join(lines) + "\n"
