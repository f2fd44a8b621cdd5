"""`medmim data prepare`: geometry round-trips, re-runs skip finished cases, a broken case fails alone."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from medmim.cli import main
from medmim.data.io import read_image, write_nifti
from medmim.data.prepare import PrepareSettings, load_geometry, prepare_dataset, to_original_grid
from tests.conftest import write_msd


def _lps_case(root: Path, i: int = 0, spacing=(0.9, 0.9, 2.5)) -> tuple[np.ndarray, np.ndarray]:
    """Overwrite case i with an LPS-stored, anisotropic CT holding a body and two 'kidneys'."""
    shape = (48, 40, 16)
    aff = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])
    aff[:3, 3] = [40.0, 30.0, -20.0]
    img = np.full(shape, -1000, np.int16)
    img[6:42, 5:35, 1:15] = 40  # soft tissue body
    lab = np.zeros(shape, np.uint8)
    lab[8:18, 8:20, 3:12] = 2
    lab[28:38, 10:22, 4:13] = 3
    img[lab > 0] = 160
    write_nifti(root / "imagesTr" / f"case_{i:03d}.nii.gz", img, aff)
    write_nifti(root / "labelsTr" / f"case_{i:03d}.nii.gz", lab, aff)
    return img, lab


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * float((a & b).sum()) / float(a.sum() + b.sum())


def test_prediction_maps_back_onto_the_original_voxels(tmp_path: Path) -> None:
    root = write_msd(tmp_path / "ds", n_labeled=2, n_unlabeled=0)
    img, lab = _lps_case(root)
    # same spacing: only reorientation and crop, so mapping back must be exact
    prepare_dataset(root, tmp_path / "same", PrepareSettings(spacing=(0.9, 0.9, 2.5)))
    geo = load_geometry(tmp_path / "same", "case_000")
    cached = np.load(tmp_path / "same" / "cases" / "case_000" / "label.npy")
    assert geo["cache_shape"] == list(cached.shape)
    assert geo["cache_shape"] == [36, 30, 14]  # cropped to the body (HU above the window floor)
    back = to_original_grid(cached, geo)
    np.testing.assert_array_equal(back, lab)
    # the cache is RAS: the right kidney (label 2, stored on the low-i side of an LPS file) is at high x
    xs2 = np.nonzero(cached == 2)[0].mean()
    xs3 = np.nonzero(cached == 3)[0].mean()
    assert xs2 > xs3
    # other spacing: resampled there and back, the organs land on their own voxels again
    prepare_dataset(root, tmp_path / "iso", PrepareSettings(spacing=(1.5, 1.5, 1.5)))
    geo = load_geometry(tmp_path / "iso", "case_000")
    back = to_original_grid(np.load(tmp_path / "iso" / "cases" / "case_000" / "label.npy"), geo)
    assert back.shape == lab.shape
    for c in (2, 3):
        assert _dice(back == c, lab == c) > 0.9
    # written with the original affine it overlays the scan in any viewer
    out = write_nifti(tmp_path / "pred.nii.gz", back, np.array(geo["original_affine"]))
    np.testing.assert_allclose(read_image(out).affine, read_image(root / "imagesTr" / "case_000.nii.gz").affine)


def test_intensity_normalisation_ct_and_mri(tmp_path: Path) -> None:
    root = write_msd(tmp_path / "ds", n_labeled=2, n_unlabeled=0)
    _lps_case(root)
    prepare_dataset(root, tmp_path / "ct", PrepareSettings(spacing=(0.9, 0.9, 2.5), dtype="float32"))
    x = np.load(tmp_path / "ct" / "cases" / "case_000" / "image.npy")
    assert x.dtype == np.float32 and x.shape[0] == 1
    assert x.min() >= 0.0 and x.max() <= 1.0
    np.testing.assert_allclose(np.unique(x.round(4)), [(40 + 175) / 425, (160 + 175) / 425], atol=1e-3)
    prepare_dataset(root, tmp_path / "mri", PrepareSettings(modality="mri", spacing=(0.9, 0.9, 2.5), dtype="float32"))
    x = np.load(tmp_path / "mri" / "cases" / "case_001" / "image.npy")[0]
    nz = x[x != 0]
    assert abs(nz.mean()) < 0.05 and abs(nz.std() - 1) < 0.05


def test_rerun_skips_done_cases_and_redoes_stale_ones(tmp_path: Path) -> None:
    root = write_msd(tmp_path / "ds", n_labeled=3, n_unlabeled=1)
    s = PrepareSettings(spacing=(1.5, 1.5, 2.0))
    first = prepare_dataset(root, tmp_path / "c", s)
    assert sorted(first.done) == ["case_000", "case_001", "case_002", "case_003"] and not first.skipped
    again = prepare_dataset(root, tmp_path / "c", s)
    assert not again.done and len(again.skipped) == 4
    _lps_case(root, 1)  # a source changed: that case alone is stale
    third = prepare_dataset(root, tmp_path / "c", s)
    assert third.done == ["case_001"] and len(third.skipped) == 3
    other = prepare_dataset(root, tmp_path / "c", PrepareSettings(spacing=(2.0, 2.0, 2.0)))
    assert len(other.done) == 4  # new settings: everything redone
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["settings"]["spacing"] == [2.0, 2.0, 2.0]
    assert json.loads((tmp_path / "c" / "splits_final.json").read_text(encoding="utf-8"))[0]["val"]


def test_corrupted_case_fails_alone_with_its_name(tmp_path: Path, capsys) -> None:
    root = write_msd(tmp_path / "ds", n_labeled=3, n_unlabeled=1)
    (root / "imagesTr" / "case_001.nii.gz").write_bytes(b"\x1f\x8b broken gzip")
    code = main(["data", "prepare", str(root), "--out", str(tmp_path / "c"), "--workers", "1",
                 "data.spacing=[1.5,1.5,2.0]"])
    out = capsys.readouterr()
    assert code == 2
    assert "case_001: FAILED" in out.out and "case_001.nii.gz" in out.out
    assert "1 case(s) of" in out.err and "case_001" in out.err
    for ok in ("case_000", "case_002", "case_003"):
        assert (tmp_path / "c" / "cases" / ok / "image.npy").is_file()
    assert not (tmp_path / "c" / "cases" / "case_001").exists()
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["cases"]["case_001"]["status"] == "failed"


def test_parallel_workers_give_the_same_cache(tmp_path: Path) -> None:
    root = write_msd(tmp_path / "ds", n_labeled=2, n_unlabeled=2)
    s = PrepareSettings(spacing=(1.5, 1.5, 2.0))
    prepare_dataset(root, tmp_path / "one", s, workers=1)
    res = prepare_dataset(root, tmp_path / "two", s, workers=2)
    assert len(res.done) == 4
    for cid in ("case_000", "case_003"):
        a = np.load(tmp_path / "one" / "cases" / cid / "image.npy")
        b = np.load(tmp_path / "two" / "cases" / cid / "image.npy")
        np.testing.assert_array_equal(a, b)
