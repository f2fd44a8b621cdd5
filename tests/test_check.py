"""`medmim data check`: every kind of broken input exits 2 with a message naming the file."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medmim.cli import main
from medmim.data.check import check_dataset
from medmim.data.io import write_nifti
from tests.conftest import tiny_affine, write_msd


def run_check(path: Path, capsys) -> tuple[int, str, str]:
    code = main(["data", "check", str(path)])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_valid_dataset_passes_with_summary(msd: Path, capsys) -> None:
    code, out, err = run_check(msd, capsys)
    assert code == 0, err
    assert "3 labeled, 2 unlabeled" in out
    assert "spacing (mm)" in out and "1.50, 1.50, 2.00" in out
    assert "right kidney" in out and f"ok: {msd} passed all checks" in out


def test_nnunet_and_folder_pass(nnunet: Path, tmp_path: Path, capsys) -> None:
    assert run_check(nnunet, capsys)[0] == 0
    assert run_check(nnunet / "imagesTs", capsys)[0] == 0  # a plain folder of images


def test_a_dataset_with_no_case_to_train_on_is_rejected(tmp_path: Path, capsys) -> None:
    # a Decathlon dataset.json with no 'training' key and an empty 'test' list: nothing to pretrain or fine-tune on
    root = tmp_path / "empty"
    root.mkdir()
    desc = root / "dataset.json"
    desc.write_text(json.dumps({"name": "empty", "modality": {"0": "CT"}, "labels": {"0": "background"},
                                "numTraining": 0, "test": []}), encoding="utf-8")
    code, out, err = run_check(root, capsys)
    assert code == 2 and "passed all checks" not in out
    assert f"medmim: error: {desc}: no case to train on" in err
    assert check_dataset(desc).problems[0].path == str(desc)


def _label(root: Path, i: int = 1) -> Path:
    return root / "labelsTr" / f"case_{i:03d}.nii.gz"


def _image(root: Path, i: int = 1) -> Path:
    return root / "imagesTr" / f"case_{i:03d}.nii.gz"


def _corrupt(kind: str, root: Path) -> tuple[Path, str]:
    """Break the dataset at ``root`` one way; return the file that must be named and a message fragment."""
    aff = tiny_affine()
    if kind == "missing":
        _image(root).unlink()
        return _image(root), "file not found"
    if kind == "unreadable":
        _image(root).write_bytes(b"\x00\x01garbage" * 50)
        return _image(root), "not a readable NIfTI"
    if kind == "truncated":
        raw = gzip.decompress(_image(root).read_bytes())
        _image(root).write_bytes(gzip.compress(raw[: len(raw) - 200]))
        return _image(root), "truncated"
    if kind == "not-an-image":
        desc = json.loads((root / "dataset.json").read_text(encoding="utf-8"))
        desc["training"][1]["image"] = "./imagesTr/notes.txt"
        (root / "imagesTr" / "notes.txt").write_text("hello", encoding="utf-8")
        (root / "dataset.json").write_text(json.dumps(desc), encoding="utf-8")
        return root / "imagesTr" / "notes.txt", "unknown image format"
    if kind == "nan":
        arr = np.zeros((12, 10, 8), np.float32)
        arr[3, 3, 3] = np.nan
        arr[4, 4, 4] = np.inf
        write_nifti(_image(root), arr, aff)
        return _image(root), "2 voxels are NaN or Inf"
    if kind == "2d":
        write_nifti(_image(root), np.zeros((12, 10), np.int16), aff)
        return _image(root), "image is 2D"
    if kind == "4d":
        write_nifti(_image(root), np.zeros((12, 10, 8, 3), np.int16), aff)
        return _image(root), "image is 4D"
    if kind == "label-shape":
        write_nifti(_label(root), np.zeros((12, 10, 9), np.uint8), aff)
        return _label(root), "label shape (12, 10, 9) differs from its image's (12, 10, 8)"
    if kind == "label-affine":
        shifted = aff.copy()
        shifted[0, 3] += 3.0
        write_nifti(_label(root), np.zeros((12, 10, 8), np.uint8), shifted)
        return _label(root), "label affine differs"
    if kind == "non-integer":
        lab = np.zeros((12, 10, 8), np.float32)
        lab[1, 1, 1] = 1.5
        write_nifti(_label(root), lab, aff)
        return _label(root), "non-integer values"
    if kind == "undeclared":
        lab = np.zeros((12, 10, 8), np.uint8)
        lab[1, 1, 1] = 7
        write_nifti(_label(root), lab, aff)
        return _label(root), "label values [7] are not declared"
    if kind == "negative":
        lab = np.zeros((12, 10, 8), np.int16)
        lab[1, 1, 1] = -1
        write_nifti(_label(root), lab, aff)
        return _label(root), "negative values"
    if kind == "singular":
        img = nib.Nifti1Image(np.zeros((12, 10, 8), np.int16), None)
        img.set_sform(np.diag([1.0, 1.0, 0.0, 1.0]), code=1)  # a slice thickness of 0 mm
        nib.save(img, _image(root))
        return _image(root), "singular affine"
    if kind == "bad-json":
        (root / "dataset.json").write_text('{"training": [}', encoding="utf-8")
        return root / "dataset.json", "invalid JSON"
    raise AssertionError(kind)


KINDS = ["missing", "unreadable", "truncated", "not-an-image", "nan", "2d", "4d", "label-shape", "label-affine",
         "non-integer", "undeclared", "negative", "singular", "bad-json"]


@pytest.mark.parametrize("kind", KINDS)
def test_broken_input_is_rejected_naming_the_file(kind: str, tmp_path: Path, capsys) -> None:
    root = write_msd(tmp_path / "ds")
    bad_file, fragment = _corrupt(kind, root)
    code, out, err = run_check(root, capsys)
    assert code == 2, (kind, out, err)
    lines = [ln for ln in err.splitlines() if ln.startswith("medmim: error:")]
    assert any(str(bad_file) in ln and fragment in ln for ln in lines), err
    assert "Traceback" not in err + out


def test_all_problems_are_reported_not_just_the_first(tmp_path: Path) -> None:
    root = write_msd(tmp_path / "ds", n_labeled=4)
    _corrupt("nan", root)
    lab = np.zeros((12, 10, 8), np.int16)
    lab[0, 0, 0] = -3
    write_nifti(_label(root, 2), lab, tiny_affine())
    report = check_dataset(root)
    assert {Path(p.path).name for p in report.problems} == {"case_001.nii.gz", "case_002.nii.gz"}
    assert len(report.problems) == 2


def test_multichannel_4d_is_fine_when_declared(tmp_path: Path, capsys) -> None:
    root = write_msd(tmp_path / "ds", n_labeled=2, n_unlabeled=0)
    desc = json.loads((root / "dataset.json").read_text(encoding="utf-8"))
    desc["modality"] = {"0": "FLAIR", "1": "T1w", "2": "T1gd"}
    (root / "dataset.json").write_text(json.dumps(desc), encoding="utf-8")
    for i in range(2):
        write_nifti(_image(root, i), np.zeros((12, 10, 8, 3), np.float32), tiny_affine())
    assert run_check(root, capsys)[0] == 0
