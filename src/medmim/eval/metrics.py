"""Per-case, per-class Dice and 95th-percentile Hausdorff distance (MONAI), in the original geometry.

A class absent from both the prediction and the ground truth is reported as ``absent`` with no
number: it is neither a perfect 1 nor a failed 0. A class present on one side only gets Dice 0
and no HD95 (``missed`` when only the ground truth has it, ``false positive`` when only the
prediction has it). The mean over classes excludes background and the absent classes.

BraTS's tumour regions (TC, WT, ET; :func:`score_regions`) are scored the way the BraTS challenge
scores them instead, and every case counts in their means: a region empty in both is ``both empty``
with Dice 1 and HD95 0 mm; empty on one side only is ``missed`` / ``false positive`` with Dice 0 and
HD95 :data:`~medmim.data.regions.BRATS_EMPTY_HD95_MM` (373.13 mm). Those are the numbers BraTS
results are reported with, so a region table is comparable with published ones; an organ table
keeps its stricter convention.
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
    # organs: "ok", "absent", "missed", "false positive"; regions: "ok", "both empty", "missed", "false positive"
    status: str
    gt_voxels: int
    pred_voxels: int
    # a BraTS region (label = region index 1..3) scored by BraTS's convention, not an organ class: its
    # "missed" / "false positive" carry HD95 373.13 mm and its "both empty" Dice 1, all counted in means
    region: bool = False


def _dice_hd95(p: np.ndarray, g: np.ndarray, spacing) -> tuple[float, float | None]:
    """Dice and HD95 (mm) of two non-empty boolean masks ``[X, Y, Z]`` on the same grid; ``spacing`` is the
    voxel size in mm along X, Y, Z. HD95 is None when MONAI returns a non-finite distance."""
    from monai.metrics import compute_dice, compute_hausdorff_distance

    pt = torch.from_numpy(p)[None, None]
    gt_t = torch.from_numpy(g)[None, None]
    dice = float(compute_dice(pt, gt_t, include_background=True)[0, 0])
    with warnings.catch_warnings():  # MONAI 1.6 warns about its own deprecated internal argument
        warnings.simplefilter("ignore", FutureWarning)
        hd = float(compute_hausdorff_distance(pt, gt_t, include_background=True, percentile=95,
                                              spacing=[float(s) for s in spacing])[0, 0])
    return dice, hd if math.isfinite(hd) else None


def score_case(case_id: str, pred: np.ndarray, gt: np.ndarray, spacing, labels: dict[int, str]) -> list[ClassScore]:
    """Dice and HD95 (mm, with the true voxel ``spacing``) for every non-background class in ``labels``."""
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
        dice, hd = _dice_hd95(p, g, spacing)
        out.append(ClassScore(case_id, c, labels[c], dice, hd, "ok", ng, np_))
    return out


_BRATS_VALUES = (0, 1, 2, 4)


def score_regions(case_id: str, pred: np.ndarray, gt: np.ndarray, spacing) -> list[ClassScore]:
    """Dice and HD95 of BraTS's three tumour regions, scored as the BraTS challenge scores them.

    ``pred`` and ``gt`` are BraTS label maps ``[X, Y, Z]`` (values 0/1/2/4) on the same grid; ``spacing`` is
    the voxel size in mm along X, Y, Z. Both are converted to the regions TC, WT, ET
    (:func:`~medmim.data.regions.labels_to_regions`) and scored one per region, ``label`` = region index
    1..3 (TC, WT, ET), ``name`` from :data:`~medmim.data.regions.REGION_NAMES`, HD95 in mm:

    * both non-empty: ``ok``, MONAI's Dice and 95th-percentile Hausdorff distance;
    * empty in both: ``both empty``, Dice 1, HD95 0 mm;
    * empty in the prediction only: ``missed``; in the ground truth only: ``false positive``; both Dice 0 and
      HD95 373.13 mm (:data:`~medmim.data.regions.BRATS_EMPTY_HD95_MM`).
    """
    from medmim.data.regions import BRATS_EMPTY_HD95_MM, REGION_NAMES, labels_to_regions

    if pred.shape != gt.shape:
        raise ValueError(f"{case_id}: prediction shape {pred.shape} differs from ground truth {gt.shape}")
    if len(gt.shape) != 3:
        raise ValueError(f"{case_id}: expected label maps [X, Y, Z], got shape {gt.shape}")
    for what, a in (("prediction", pred), ("ground truth", gt)):
        # a value outside 0/1/2/4 (a Decathlon-numbered 3, say) would silently fall out of every region
        stray = np.ones(a.shape, bool)
        for v in _BRATS_VALUES:
            stray &= a != v
        if stray.any():
            bad = sorted({int(x) for x in np.unique(a[stray])})
            raise ValueError(f"{case_id}: {what} holds values {bad}, not BraTS labels 0/1/2/4")
    pr = np.asarray(labels_to_regions(pred)).astype(bool)
    gr = np.asarray(labels_to_regions(gt)).astype(bool)
    out = []
    for i in range(pr.shape[0]):
        r = i + 1
        p, g = pr[i], gr[i]
        np_, ng = int(p.sum()), int(g.sum())
        if np_ == 0 and ng == 0:
            out.append(ClassScore(case_id, r, REGION_NAMES[r], 1.0, 0.0, "both empty", 0, 0, region=True))
        elif np_ == 0 or ng == 0:
            out.append(ClassScore(case_id, r, REGION_NAMES[r], 0.0, BRATS_EMPTY_HD95_MM,
                                  "missed" if ng else "false positive", ng, np_, region=True))
        else:
            dice, hd = _dice_hd95(p, g, spacing)
            out.append(ClassScore(case_id, r, REGION_NAMES[r], dice, hd, "ok", ng, np_, region=True))
    return out


@dataclass
class Evaluation:
    scores: list[ClassScore] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)

    def is_regions(self) -> bool:
        """True when every score is a BraTS region's (:func:`score_regions`), so the tables say "region"."""
        return bool(self.scores) and all(s.region for s in self.scores)

    def per_class(self) -> dict[int, dict]:
        """label -> {name, mean_dice, mean_hd95 (mm), n (cases scored), absent, both_empty, missed, fp}.

        An organ class's ``absent`` cases are left out of its means and a one-sided one adds Dice 0 and no HD95;
        a region's cases all count with the values they were scored with (``both empty`` Dice 1 / HD95 0,
        one-sided Dice 0 / HD95 373.13 mm), so ``n`` counts every case for a region."""
        out: dict[int, dict] = {}
        for s in self.scores:
            d = out.setdefault(s.label, {"name": s.name, "dice": [], "hd95": [], "absent": 0, "both_empty": 0,
                                         "missed": 0, "fp": 0})
            if s.status == "absent":
                d["absent"] += 1
                continue
            d["dice"].append(s.dice)
            if s.hd95_mm is not None:  # None for a one-sided organ; a region's carries BraTS's 373.13 mm
                d["hd95"].append(s.hd95_mm)
            d["both_empty"] += s.status == "both empty"
            d["missed"] += s.status == "missed"
            d["fp"] += s.status == "false positive"
        for d in out.values():
            d["mean_dice"] = float(np.mean(d["dice"])) if d["dice"] else None
            d["mean_hd95"] = float(np.mean(d["hd95"])) if d["hd95"] else None
            d["n"] = len(d["dice"])
        return out

    def per_case(self) -> dict[str, float | None]:
        """case -> mean Dice over its scored classes (organs' absent ones left out; every region counted)."""
        by: dict[str, list[float]] = {}
        for s in self.scores:
            if s.status != "absent":
                by.setdefault(s.case_id, []).append(s.dice)
        return {k: float(np.mean(v)) if v else None for k, v in by.items()}

    def mean_dice(self) -> float | None:
        """Mean over classes (background and absent classes excluded) of each class's mean over cases; for
        regions, the mean over TC, WT, ET of each region's mean over all cases (BraTS's empty-case values in)."""
        vals = [d["mean_dice"] for d in self.per_class().values() if d["mean_dice"] is not None]
        return float(np.mean(vals)) if vals else None

    def mean_hd95(self) -> float | None:
        """Mean over classes of each class's mean HD95 (mm), over the cases that have one."""
        vals = [d["mean_hd95"] for d in self.per_class().values() if d["mean_hd95"] is not None]
        return float(np.mean(vals)) if vals else None

    def write_csv(self, path: Path) -> Path:
        """One row per case and class (or region); ``status`` tells ok / absent / both empty / missed /
        false positive apart, and a region's empty cases carry the Dice and HD95 BraTS gives them."""
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
        means = f"**{fmt(self.mean_dice())}**; mean HD95: **{fmt(self.mean_hd95(), 2)} mm**"
        if self.is_regions():
            from medmim.data.regions import BRATS_EMPTY_HD95_MM

            lines = [f"# {title}", "", f"Mean Dice over regions (every case counted): {means}", "",
                     "Regions are scored as BraTS scores them: a region empty in both ground truth and prediction "
                     "scores Dice 1 and HD95 0 mm; empty on one side only, Dice 0 and HD95 "
                     f"{BRATS_EMPTY_HD95_MM:.2f} mm.",
                     "",
                     "| label | region | mean Dice | mean HD95 (mm) | cases scored | both empty (scored 1) | missed "
                     "| false positive |",
                     "|---:|---|---:|---:|---:|---:|---:|---:|"]
            empty_key = "both_empty"
        else:
            lines = [f"# {title}", "", f"Mean Dice over classes (background and absent classes excluded): {means}", "",
                     "| label | organ | mean Dice | mean HD95 (mm) | cases scored | absent (both empty) | missed "
                     "| false positive |",
                     "|---:|---|---:|---:|---:|---:|---:|---:|"]
            empty_key = "absent"
        for c, d in sorted(pc.items()):
            lines.append(f"| {c} | {d['name']} | {fmt(d['mean_dice'])} | {fmt(d['mean_hd95'], 2)} | {d['n']} | "
                         f"{d[empty_key]} | {d['missed']} | {d['fp']} |")
        lines += ["", "| case | mean Dice |", "|---|---:|"]
        for k, v in sorted(self.per_case().items()):
            lines.append(f"| {k} | {fmt(v)} |")
        if self.seconds:
            lines += ["", "Time per case (s): " + ", ".join(f"{k} {v:.1f}" for k, v in self.seconds.items())]
        return "\n".join(lines) + "\n"
