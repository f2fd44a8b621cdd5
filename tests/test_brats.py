"""BraTS: the tumour regions and their inverse, region training, channels in transfer, predict's geometry,
and a tiny brain-phantom study end to end."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from medmim.cli import main
from medmim.config import load_config
from medmim.data.datasets import Case
from medmim.data.io import read_image, write_nifti
from medmim.data.regions import ED, ET, NCR, brats_values_for, labels_to_regions, regions_to_labels
from medmim.errors import MedmimError
from medmim.eval.inference import Predictor
from medmim.models.transfer import load_encoder
from medmim.models.vit import ViT3D
from tests.conftest import run_study


# --- regions ---------------------------------------------------------------------------------

def test_regions_are_bratss_nested_sets_and_the_inverse_round_trips() -> None:
    rng = np.random.default_rng(0)
    label = rng.choice(np.array([0, NCR, ED, ET], np.uint8), size=(9, 8, 7))
    regions = labels_to_regions(label)
    tc, wt, et = regions
    assert regions.shape == (3, 9, 8, 7) and regions.dtype == bool
    np.testing.assert_array_equal(tc, np.isin(label, [1, 4]))
    np.testing.assert_array_equal(wt, label > 0)
    np.testing.assert_array_equal(et, label == 4)
    np.testing.assert_array_equal(regions_to_labels(regions), label)
    # a batch on torch goes through the same conversion
    batch = torch.from_numpy(label)[None, None].repeat(2, 1, 1, 1, 1)
    assert labels_to_regions(batch).shape == (2, 3, 9, 8, 7)


def test_a_predicted_region_outside_its_parent_still_becomes_a_valid_label_map() -> None:
    probs = np.zeros((3, 4, 1, 1), np.float32)
    probs[2, 0] = 0.9  # ET alone (no TC, no WT): still enhancing tumour
    probs[0, 1] = 0.9  # TC without WT: necrosis
    probs[1, 2] = 0.9  # WT alone: oedema
    probs[1, 3] = 0.4  # below 0.5: background
    assert regions_to_labels(probs)[:, 0, 0].tolist() == [ET, NCR, ED, 0]
    with pytest.raises(ValueError, match="TC, WT, ET"):
        regions_to_labels(probs[:2])


def test_decathlon_numbering_is_found_by_name() -> None:
    decathlon = {0: "background", 1: "edema", 2: "non-enhancing tumor", 3: "enhancing tumour"}
    assert brats_values_for(decathlon) == {1: ED, 2: NCR, 3: ET}
    assert brats_values_for({0: "background", 1: "liver", 2: "spleen", 3: "kidney"}) is None


# --- channels into the patch embedding ---------------------------------------------------------

def _vit(channels: int) -> ViT3D:
    return ViT3D(in_channels=channels, img_size=(16, 16, 16), patch_size=(8, 8, 8), hidden_size=16, num_layers=1,
                 num_heads=2, mlp_dim=32)


def test_a_single_sequence_encoder_moves_into_four_sequences_with_its_kernel_shared_out() -> None:
    one, four = _vit(1), _vit(4)
    report = load_encoder(four, one.state_dict(), source_channels=["T1ce"], channels=["T1", "T1ce", "T2", "FLAIR"])
    w1, w4 = one.patch_embed.proj.weight.detach(), four.patch_embed.proj.weight.detach()
    assert w4.shape[1] == 4
    for c in range(4):
        torch.testing.assert_close(w4[:, c:c + 1], w1 / 4)
    # an input whose four channels equal the pretraining sequence embeds exactly as in pretraining
    x = torch.randn(1, 1, 16, 16, 16)
    conv = torch.nn.functional.conv3d
    torch.testing.assert_close(conv(x.repeat(1, 4, 1, 1, 1), w4, stride=8), conv(x, w1, stride=8), atol=1e-5, rtol=1e-5)
    assert report.complete
    assert len(report.adapted) == 1 and "['T1ce'] -> ['T1', 'T1ce', 'T2', 'FLAIR']" in report.adapted[0]
    assert "adapted: patch_embed.proj.weight: 1 -> 4 input channels" in report.summary()


def test_other_channel_mismatches_are_refused_naming_both_lists_and_a_reordering_is_undone() -> None:
    with pytest.raises(MedmimError, match=r"pretrained on \['T1', 'T2'\] but the model takes \['T1', 'T1ce', 'T2', 'FLAIR'\]"):
        load_encoder(_vit(4), _vit(2).state_dict(), source_channels=["T1", "T2"], channels=["T1", "T1ce", "T2", "FLAIR"])
    with pytest.raises(MedmimError, match="pretrained on 4 unnamed channels but the model takes 1 unnamed channel"):
        load_encoder(_vit(1), _vit(4).state_dict())
    src, dst = _vit(2), _vit(2)
    report = load_encoder(dst, src.state_dict(), source_channels=["T2", "FLAIR"], channels=["flair", "t2"])
    torch.testing.assert_close(dst.patch_embed.proj.weight[:, 0], src.patch_embed.proj.weight[:, 1])
    assert "reordered" in report.adapted[0]


# --- predict's geometry ----------------------------------------------------------------------

class _Boxes(nn.Module):
    """A stand-in segmenter: region c (TC, WT, ET) is where input channel c + 1 is more than one standard
    deviation above its mean inside the brain (the z-score MRI preprocessing gives)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 20.0 * (x[:, 1:4] - 1.0)


def _oblique_lps_affine(spacing=(0.9, 1.1, 2.0), degrees: float = 25.0) -> np.ndarray:
    t = np.deg2rad(degrees)
    rot = np.array([[np.cos(t), -np.sin(t), 0.0], [np.sin(t), np.cos(t), 0.0], [0.0, 0.0, 1.0]])
    tilt = np.array([[1.0, 0.0, 0.0], [0.0, np.cos(t / 2), -np.sin(t / 2)], [0.0, np.sin(t / 2), np.cos(t / 2)]])
    aff = np.eye(4)
    aff[:3, :3] = np.diag([-1.0, -1.0, 1.0]) @ rot @ tilt @ np.diag(spacing)  # LPS-stored, oblique
    aff[:3, 3] = [40.0, -25.0, 12.0]
    return aff


def test_predict_writes_a_brats_label_map_on_an_oblique_non_ras_mri_grid(tmp_path: Path) -> None:
    shape = (60, 52, 30)
    ii, jj, kk = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    brain = ((ii - 30) / 27) ** 2 + ((jj - 26) / 23) ** 2 + ((kk - 15) / 13) ** 2 < 1
    # nested boxes, off-centre so that a flipped or rotated result would miss them: WT > TC > ET
    wt = (ii >= 10) & (ii < 32) & (jj >= 12) & (jj < 34) & (kk >= 8) & (kk < 22)
    tc = (ii >= 14) & (ii < 28) & (jj >= 16) & (jj < 30) & (kk >= 10) & (kk < 20)
    et = (ii >= 17) & (ii < 24) & (jj >= 19) & (jj < 26) & (kk >= 12) & (kk < 18)
    image = np.zeros((*shape, 4), np.float32)
    for c, box in enumerate([brain, tc, wt, et]):
        image[..., c] = np.where(brain, np.where(box, 3.0, 1.0), 0.0)
    aff = _oblique_lps_affine()
    write_nifti(tmp_path / "case.nii.gz", image, aff)
    cfg = load_config("unetr-brats-cpu", ["data.spacing=2.0", "data.roi_size=32", "model.img_size=32",
                                          "data.labels={0: background, 1: n, 2: e, 4: t}"])
    predictor = Predictor(_Boxes(), cfg)
    label, info = predictor.predict_case(Case("case", [tmp_path / "case.nii.gz"]), probabilities=True)
    assert label.shape == shape and label.dtype == np.uint8
    assert set(np.unique(label)) <= {0, NCR, ED, ET}
    assert info["probabilities"].shape == (*shape, 3)
    want = np.zeros(shape, np.uint8)
    want[wt], want[tc], want[et] = ED, NCR, ET
    for value in (NCR, ED, ET):
        p, g = label == value, want == value
        dice = 2 * (p & g).sum() / (p.sum() + g.sum())
        assert dice > 0.8, (value, dice)
    # written with the geometry predict_case reports, the map has the scan's shape and affine (the command
    # line, with a real checkpoint, in the study test below)
    written = tmp_path / "pred.nii.gz"
    write_nifti(written, label, np.array(info["geometry"]["original_affine"]))
    back = read_image(written)
    assert back.array.shape == shape and np.abs(back.affine - aff).max() < 1e-4


# --- a tiny brain-phantom study --------------------------------------------------------------

TINY_BRAIN = """
name: tiny-brain
data:
  phantom: {kind: brain, labeled: 5, unlabeled: 2, seed: 1, shape: [50, 60, 50], spacing: [3.0, 3.0, 3.0]}
pretrain:
  config: mae-brats-cpu
  overrides: [data.spacing=6.0, data.roi_size=16, model.img_size=16, train.max_steps=2, train.val_every=2,
              train.preview_every=2, data.num_workers=0, data.prepare_workers=1, data.batch_size=2,
              model.hidden_size=32, model.num_layers=4, model.num_heads=2, model.mlp_dim=64, pretrain.mae.decoder_dim=16,
              pretrain.mae.decoder_depth=1, pretrain.mae.decoder_heads=2]
finetune:
  config: unetr-brats-cpu
  overrides: [data.spacing=6.0, data.roi_size=16, model.img_size=16, model.feature_size=4, train.max_steps=3,
              train.val_every=1, train.preview_every=3, data.num_workers=0, data.prepare_workers=1, data.batch_size=2,
              model.hidden_size=32, model.num_layers=4, model.num_heads=2, model.mlp_dim=64]
seeds: [0]
axes:
  - name: method
    values:
      - {label: scratch, pretrain: null}
      - {label: mae-t1ce, pretrain: [pretrain.method=mae, "data.channels=[t1ce]", model.in_channels=1]}
baseline: {method: scratch}
"""


def test_a_tiny_brain_phantom_study_trains_regions_and_adapts_a_one_sequence_encoder(tmp_path: Path, capsys,
                                                                                     monkeypatch) -> None:
    monkeypatch.setenv("MEDMIM_NO_PROGRESS", "1")
    out, log, res = run_study(TINY_BRAIN, tmp_path, capsys)
    assert "brain MRIs" in log and "BraTS regions TC/WT/ET" in log
    assert "adapted: patch_embed.proj.weight: 1 -> 4 input channels (['T1ce'] -> ['T1', 'T1ce', 'T2', 'FLAIR'])" in log
    for cell in res["cells"]:
        names = {d["name"] for d in cell["evaluation"]["per_class"].values()}
        assert names == {"TC (tumour core)", "WT (whole tumour)", "ET (enhancing tumour)"}
    summary = (out / "summary.md").read_text(encoding="utf-8")
    assert "Per-region held-out Dice" in summary and "WT (whole tumour)" in summary
    # the fine-tuned checkpoint predicts BraTS labels on the phantom's own grid
    ckpt = next((out / "cells" / "method-scratch_seed0").rglob("best.pt"))
    case = out / "data" / "imagesTr" / "brain_0000.nii.gz"
    if not case.is_file():
        case = next(out.rglob("brain_0000.nii.gz"))
    assert main(["predict", "-c", str(ckpt), "-o", str(tmp_path / "pred"), "--probabilities", str(case)]) == 0
    pred, src = read_image(tmp_path / "pred" / "brain_0000.nii.gz"), read_image(case)
    assert pred.array.shape == src.array.shape[:3] and np.abs(pred.affine - src.affine).max() < 1e-4
    assert set(np.unique(pred.array).astype(int)) <= {0, 1, 2, 4}
    assert read_image(tmp_path / "pred" / "brain_0000_probabilities.nii.gz").array.shape == (*src.array.shape[:3], 3)


# --- the README's BraTS commands, on a BraTS 2021 folder ---------------------------------------

def _brats_2021_folder(root: Path, n: int = 4) -> Path:
    """``n`` brain phantoms written as BraTS 2021 case folders (one NIfTI per sequence, ``_seg`` labels)."""
    from medmim.data.phantom_brain import make_brain_phantom

    for i in range(n):
        case = make_brain_phantom(100 + i, shape=(50, 60, 50), spacing=(3.0, 3.0, 3.0))
        cid = f"BraTS2021_{i:05d}"
        (root / cid).mkdir(parents=True)
        for c, seq in enumerate(("t1", "t1ce", "t2", "flair")):
            write_nifti(root / cid / f"{cid}_{seq}.nii.gz", case.image[c], case.affine)
        write_nifti(root / cid / f"{cid}_seg.nii.gz", case.label, case.affine)
    return root


def test_from_a_brats_2021_folder_to_region_dice_with_the_readme_commands(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("MEDMIM_NO_PROGRESS", "1")
    monkeypatch.setenv("MEDMIM_CACHE", str(tmp_path / "cache"))
    data = _brats_2021_folder(tmp_path / "BraTS2021_Training_Data")
    assert main(["data", "check", str(data)]) == 0
    run = tmp_path / "run"
    tiny = ["data.spacing=6.0", "data.roi_size=16", "model.img_size=16", "model.feature_size=4", "model.hidden_size=32",
            "model.num_layers=4", "model.num_heads=2", "model.mlp_dim=64", "train.max_steps=2", "train.val_every=2",
            "data.num_workers=0", "data.prepare_workers=1", "data.batch_size=2"]
    assert main(["finetune", "unetr-brats-cpu", f"data.path={data}", f"run.dir={run}"] + tiny) == 0
    capsys.readouterr()
    assert main(["evaluate", "-c", str(run / "checkpoints" / "last.pt"), "-d", str(data), "-o", str(tmp_path / "ev")]) == 0
    assert "mean Dice" in capsys.readouterr().out
    md = (tmp_path / "ev" / "metrics.md").read_text(encoding="utf-8")
    assert "| region |" in md and "WT (whole tumour)" in md and "scores Dice 1 and HD95 0 mm" in md
    # predict takes a BraTS case folder as one case, and writes a BraTS label map on its grid
    case = data / "BraTS2021_00001"
    assert main(["predict", "-c", str(run / "checkpoints" / "last.pt"), "-o", str(tmp_path / "pred"), str(case)]) == 0
    pred, src = read_image(tmp_path / "pred" / "BraTS2021_00001.nii.gz"), read_image(case / "BraTS2021_00001_t1.nii.gz")
    assert pred.array.shape == src.array.shape and np.abs(pred.affine - src.affine).max() < 1e-4
    assert set(np.unique(pred.array).astype(int)) <= {0, 1, 2, 4}
