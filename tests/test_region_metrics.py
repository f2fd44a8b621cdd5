"""Per-region (TC, WT, ET) Dice and HD95 for BraTS, against hand-computed values and BraTS's empty-case rules."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from medmim.data.regions import BRATS_EMPTY_HD95_MM, REGION_NAMES
from medmim.eval.metrics import Evaluation, score_case, score_regions

TC, WT, ET = 0, 1, 2  # positions in score_regions' list (labels 1, 2, 3)
CONVENTION = ("Regions are scored as BraTS scores them: a region empty in both ground truth and prediction "
              "scores Dice 1 and HD95 0 mm; empty on one side only, Dice 0 and HD95 373.13 mm.")


def _case_a() -> tuple[np.ndarray, np.ndarray]:
    """A [4, 4, 4] label map with 3 voxels of NCR (1), 5 of oedema (2), 4 of ET (4), so TC = 1|4 has 7 voxels,
    WT = 1|2|4 has 12, ET 4; and a prediction that changes exactly four of its voxels:

    * one ET voxel predicted NCR: ET 3 (all inside the truth), TC unchanged;
    * one oedema voxel predicted NCR: TC 8 (the 7 true + 1), WT unchanged;
    * one oedema voxel predicted background: WT loses one true voxel;
    * one background voxel predicted oedema: WT gains one false voxel, so WT 12 with 11 shared.
    """
    gt = np.zeros((4, 4, 4), np.uint8)
    gt[0, 0, :3] = 1                     # NCR: 3
    gt[1, 0, :] = 2                      # ED: 4 ...
    gt[1, 1, 0] = 2                      # ... + 1 = 5
    gt[2, 0, :] = 4                      # ET: 4
    pred = gt.copy()
    pred[2, 0, 0] = 1                    # ET -> NCR
    pred[1, 0, 0] = 1                    # ED -> NCR
    pred[1, 0, 1] = 0                    # ED -> background
    pred[3, 3, 3] = 2                    # background -> ED
    assert [int((gt == v).sum()) for v in (1, 2, 4)] == [3, 5, 4]
    return pred, gt


def test_dice_per_region_matches_the_hand_computed_fractions() -> None:
    pred, gt = _case_a()
    s = score_regions("a", pred, gt, (1.0, 1.0, 1.0))
    assert [x.label for x in s] == [1, 2, 3] and [x.name for x in s] == [REGION_NAMES[i] for i in (1, 2, 3)]
    assert all(x.region and x.status == "ok" for x in s)
    assert s[TC].dice == pytest.approx(2 * 7 / (7 + 8))     # 7 shared; truth 7, prediction 8
    assert s[WT].dice == pytest.approx(2 * 11 / (12 + 12))  # 11 shared; truth 12, prediction 12
    assert s[ET].dice == pytest.approx(2 * 3 / (4 + 3))     # 3 shared; truth 4, prediction 3
    assert [(x.gt_voxels, x.pred_voxels) for x in s] == [(7, 8), (12, 12), (4, 3)]
    assert all(x.hd95_mm is not None and x.hd95_mm > 0 for x in s)


def test_hd95_uses_the_true_anisotropic_spacing() -> None:
    """Two single-voxel-thick 6x6 ET slabs 2 voxels apart: every surface voxel is exactly 2 voxels from the
    other slab, so HD95 is 2 x the spacing along the offset axis (all three regions are the slab)."""
    gt = np.zeros((10, 10, 10), np.uint8)
    pred = np.zeros_like(gt)
    gt[2:8, 2:8, 3] = 4
    pred[2:8, 2:8, 5] = 4
    s = score_regions("slab", pred, gt, (0.5, 0.8, 3.0))
    assert [x.status for x in s] == ["ok"] * 3
    assert all(x.dice == 0.0 for x in s)                      # no voxel shared
    assert all(x.hd95_mm == pytest.approx(2 * 3.0) for x in s)  # 6 mm along the 3 mm axis
    # the same offset along the first axis (0.5 mm) is 1 mm: the spacing is applied axis by axis
    gt_x, pred_x = np.moveaxis(gt, 2, 0), np.moveaxis(pred, 2, 0)
    s = score_regions("slab-x", pred_x, gt_x, (0.5, 0.8, 3.0))
    assert all(x.hd95_mm == pytest.approx(2 * 0.5) for x in s)


def test_empty_regions_are_scored_as_brats_scores_them() -> None:
    gt = np.zeros((6, 6, 6), np.uint8)
    gt[1:3, 1:3, 1:3] = 2   # oedema only: TC and ET empty in the truth
    gt[3, 3, 3] = 1         # with one NCR voxel: TC present, ET still empty
    # both empty: ET in neither -> Dice 1, HD95 0
    s = score_regions("both", gt.copy(), gt, (1.0, 1.0, 1.0))
    assert (s[ET].status, s[ET].dice, s[ET].hd95_mm) == ("both empty", 1.0, 0.0)
    assert (s[ET].gt_voxels, s[ET].pred_voxels) == (0, 0)
    assert s[TC].status == s[WT].status == "ok" and s[TC].dice == s[WT].dice == 1.0
    # an ET predicted where the truth has none -> false positive, Dice 0, HD95 373.13 mm
    pred = gt.copy()
    pred[4, 4, 4] = 4
    s = score_regions("fp", pred, gt, (1.0, 1.0, 1.0))
    assert (s[ET].status, s[ET].dice, s[ET].hd95_mm) == ("false positive", 0.0, BRATS_EMPTY_HD95_MM)
    assert BRATS_EMPTY_HD95_MM == 373.13
    # a true ET the prediction misses -> missed, Dice 0, HD95 373.13 mm
    s = score_regions("missed", gt, pred, (1.0, 1.0, 1.0))
    assert (s[ET].status, s[ET].dice, s[ET].hd95_mm) == ("missed", 0.0, BRATS_EMPTY_HD95_MM)
    assert (s[ET].gt_voxels, s[ET].pred_voxels) == (1, 0)
    # nothing at all on one side: every region one-sided
    s = score_regions("empty pred", np.zeros_like(gt), gt, (1.0, 1.0, 1.0))
    assert [x.status for x in s] == ["missed", "missed", "both empty"]


def test_region_inputs_are_checked() -> None:
    gt = np.zeros((4, 4, 4), np.uint8)
    with pytest.raises(ValueError, match="differs"):
        score_regions("c", np.zeros((4, 4, 5), np.uint8), gt, (1, 1, 1))
    bad = gt.copy()
    bad[0, 0, 0] = 3  # a Decathlon-numbered enhancing tumour would fall out of every region unnoticed
    with pytest.raises(ValueError, match=r"\[3\]"):
        score_regions("c", bad, gt, (1, 1, 1))


def test_evaluation_counts_both_empty_and_one_sided_regions_in_the_means(tmp_path: Path) -> None:
    pred_a, gt_a = _case_a()
    gt_b = np.zeros((6, 6, 6), np.uint8)
    gt_b[1:3, 1:3, 1:3] = 2
    gt_b[3, 3, 3] = 1                       # no ET: perfect prediction, ET both empty
    gt_c = gt_b.copy()
    gt_c[4, 4, 4] = 4                       # an ET the prediction (gt_b) misses
    ev = Evaluation(score_regions("a", pred_a, gt_a, (1, 1, 1)) + score_regions("b", gt_b, gt_b, (1, 1, 1)))
    assert ev.is_regions()
    pc = ev.per_class()
    assert pc[3]["n"] == 2 and pc[3]["both_empty"] == 1 and pc[3]["absent"] == 0
    assert pc[3]["mean_dice"] == pytest.approx((2 * 3 / 7 + 1) / 2)  # the both-empty case counts as 1
    tc, wt, et = (2 * 7 / 15 + 1) / 2, (2 * 11 / 24 + 1) / 2, (2 * 3 / 7 + 1) / 2
    assert ev.mean_dice() == pytest.approx((tc + wt + et) / 3)
    assert ev.per_case()["b"] == 1.0
    # a missed ET adds its 373.13 mm to the region's mean HD95, beside the both-empty case's 0
    ev2 = Evaluation(score_regions("b", gt_b, gt_b, (1, 1, 1)) + score_regions("c", gt_b, gt_c, (1, 1, 1)))
    pc2 = ev2.per_class()
    assert pc2[3]["mean_hd95"] == pytest.approx((0.0 + 373.13) / 2)
    assert pc2[3]["mean_dice"] == pytest.approx((1.0 + 0.0) / 2)
    assert (pc2[3]["both_empty"], pc2[3]["missed"], pc2[3]["fp"]) == (1, 1, 0)

    md = ev2.markdown("Regions")
    assert CONVENTION in md
    assert "| label | region |" in md and "both empty (scored 1)" in md and "| organ |" not in md
    assert f"| 3 | {REGION_NAMES[3]} | 0.5000 | 186.56 | 2 | 1 | 1 | 0 |" in md
    rows = list(csv.DictReader(open(ev2.write_csv(tmp_path / "m.csv"), encoding="utf-8")))
    et_rows = {r["case"]: r for r in rows if r["label"] == "3"}
    assert (et_rows["b"]["status"], et_rows["b"]["dice"], et_rows["b"]["hd95_mm"]) == \
        ("both empty", "1.000000", "0.000")
    assert (et_rows["c"]["status"], et_rows["c"]["dice"], et_rows["c"]["hd95_mm"]) == ("missed", "0.000000", "373.130")


def test_organ_scoring_keeps_its_own_convention() -> None:
    """Organ classes: absent left out of the means, one-sided Dice 0 with no HD95, the organ table unchanged."""
    gt = np.zeros((8, 8, 8), np.uint8)
    gt[1:4, 1:4, 1:4] = 1
    s = score_case("c", gt.copy(), gt, (1, 1, 1), {0: "bg", 1: "liver", 2: "spleen"})
    assert not any(x.region for x in s) and s[1].status == "absent" and s[1].dice is None
    missed = score_case("d", np.zeros_like(gt), gt, (1, 1, 1), {1: "liver"})[0]
    assert (missed.status, missed.dice, missed.hd95_mm) == ("missed", 0.0, None)
    ev = Evaluation(s + [missed])
    assert not ev.is_regions()
    assert ev.mean_dice() == pytest.approx((1.0 + 0.0) / 2)  # liver only; spleen absent, left out
    assert ev.mean_hd95() == 0.0                              # the missed liver has no HD95
    md = ev.markdown()
    assert "| label | organ |" in md and "absent (both empty)" in md and CONVENTION not in md
    assert "Mean Dice over classes (background and absent classes excluded)" in md
