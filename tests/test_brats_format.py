"""BraTS case folders: ROOT/<case>/<case>_{t1,t1ce,t2,flair}.nii.gz [+ <case>_seg.nii.gz]."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medmim.cli import main
from medmim.data.check import check_dataset
from medmim.data.datasets import load_dataset
from medmim.errors import MedmimError
from tests.conftest import tiny_affine

SHAPE = (12, 10, 8)
SEQ_VALUE = {"t1": 10, "t1ce": 20, "t2": 30, "flair": 40}  # a distinct constant per sequence


def _save(path: Path, arr: np.ndarray, affine: np.ndarray | None = None) -> Path:
    nib.save(nib.Nifti1Image(arr, tiny_affine() if affine is None else affine), str(path))
    return path


def write_brats(root: Path, cases=("BraTS2021_00000", "BraTS2021_00002", "BraTS2021_00005"),
                unlabeled=("BraTS2021_00005",), ext: str = ".nii.gz") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for cid in cases:
        d = root / cid
        d.mkdir()
        for seq, v in SEQ_VALUE.items():
            _save(d / f"{cid}_{seq}{ext}", np.full(SHAPE, v, dtype=np.int16))
        if cid not in unlabeled:
            seg = np.zeros(SHAPE, dtype=np.uint8)
            seg[2:5, 2:5, 2:4], seg[6:8, 3:6, 2:4], seg[8:10, 6:9, 4:6] = 1, 2, 4
            _save(d / f"{cid}_seg{ext}", seg)
    return root


@pytest.fixture
def brats(tmp_path: Path) -> Path:
    return write_brats(tmp_path / "BraTS2021_Training_Data")


def run_check(path: Path, capsys) -> tuple[int, str, str]:
    try:
        code = main(["data", "check", str(path)])
    except SystemExit as e:  # click may exit rather than return, depending on how main is wired
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_brats_folder_is_read(brats: Path) -> None:
    ds = load_dataset(brats)
    assert ds.format == "brats" and ds.channels == 4
    assert ds.modalities == ["T1", "T1ce", "T2", "FLAIR"]
    assert ds.labels == {0: "background", 1: "necrotic tumour core", 2: "peritumoral oedema",
                         4: "GD-enhancing tumour"}
    assert [c.case_id for c in ds.labeled] == ["BraTS2021_00000", "BraTS2021_00002"]
    assert [c.case_id for c in ds.unlabeled] == ["BraTS2021_00005"]  # no _seg: validation data
    assert ds.unlabeled[0].label is None and len(ds.unlabeled[0].images) == 4
    for case in ds.cases:
        # channel order T1, T1ce, T2, FLAIR, checked by the files' contents
        values = [int(np.asarray(nib.load(str(p)).dataobj).flat[0]) for p in case.images]
        assert values == [10, 20, 30, 40], case.case_id
    lab = ds.labeled[0]
    assert lab.label == brats / lab.case_id / f"{lab.case_id}_seg.nii.gz"
    assert set(np.unique(np.asarray(nib.load(str(lab.label)).dataobj))) == {0, 1, 2, 4}
    assert ds.lateral_pairs == [] and ds.descriptor is None


def test_other_years_prefixes_and_plain_nii(tmp_path: Path) -> None:
    root = write_brats(tmp_path / "MICCAI_BraTS2020_TrainingData", cases=("BraTS20_Training_001", "BraTS20_Training_002"),
                       unlabeled=(), ext=".nii")
    (root / "name_mapping.csv").write_text("a,b\n", encoding="utf-8")  # files beside the cases are ignored
    ds = load_dataset(root)
    assert ds.format == "brats"
    assert [c.case_id for c in ds.labeled] == ["BraTS20_Training_001", "BraTS20_Training_002"]
    assert [p.name for p in ds.labeled[0].images] == [f"BraTS20_Training_001_{s}.nii" for s in ("t1", "t1ce", "t2", "flair")]


def test_a_plain_image_folder_is_still_a_folder(tmp_path: Path) -> None:
    (tmp_path / "imgs").mkdir()
    _save(tmp_path / "imgs" / "a.nii.gz", np.zeros(SHAPE, dtype=np.int16))
    assert load_dataset(tmp_path / "imgs").format == "folder"


def test_missing_sequence_names_the_case_folder_and_sequence(brats: Path) -> None:
    (brats / "BraTS2021_00002" / "BraTS2021_00002_t1ce.nii.gz").unlink()
    with pytest.raises(MedmimError) as e:
        load_dataset(brats)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(str(brats / "BraTS2021_00002"))
    assert "t1ce" in msg and "BraTS2021_00002_t1ce.nii.gz" in msg


def test_partial_matches_are_rejected(brats: Path) -> None:
    # files whose prefix is not their folder's name (a renamed folder)
    (brats / "BraTS2021_00005").rename(brats / "case5")
    with pytest.raises(MedmimError, match="prefix differs from its case folder's name 'case5'") as e:
        load_dataset(brats)
    assert str(e.value).startswith(str(brats / "case5" / "BraTS2021_00005_"))
    (brats / "case5").rename(brats / "BraTS2021_00005")
    # an image loose beside the case folders
    loose = _save(brats / "BraTS2021_00009_t1.nii.gz", np.zeros(SHAPE, dtype=np.int16))
    with pytest.raises(MedmimError, match="beside BraTS case folders") as e:
        load_dataset(brats)
    assert str(e.value).startswith(str(loose))
    loose.unlink()
    # the same sequence twice (.nii and .nii.gz)
    dup = _save(brats / "BraTS2021_00000" / "BraTS2021_00000_t2.nii", np.zeros(SHAPE, dtype=np.int16))
    with pytest.raises(MedmimError, match="a second t2 file"):
        load_dataset(brats)
    dup.unlink()
    # an empty case folder
    (brats / "BraTS2021_00007").mkdir()
    with pytest.raises(MedmimError, match="empty case folder"):
        load_dataset(brats)


def test_check_passes_on_a_good_brats_folder(brats: Path, capsys) -> None:
    code, out, err = run_check(brats, capsys)
    assert code == 0, err
    assert f"dataset {brats} (brats): 2 labeled, 1 unlabeled" in out
    assert "GD-enhancing tumour" in out and f"ok: {brats} passed all checks" in out


def _break(kind: str, root: Path) -> tuple[Path, str]:
    d = root / "BraTS2021_00002"
    if kind == "missing sequence":
        bad = d / "BraTS2021_00002_flair.nii.gz"
        bad.unlink()
        return d, "lacks the flair sequence (BraTS2021_00002_flair.nii.gz)"
    if kind == "shape":
        bad = _save(d / "BraTS2021_00002_t2.nii.gz", np.full((12, 10, 7), 30, dtype=np.int16))
        return bad, "channel grid differs from BraTS2021_00002_t1.nii.gz"
    if kind == "affine":
        bad = _save(d / "BraTS2021_00002_t1ce.nii.gz", np.full(SHAPE, 20, dtype=np.int16),
                    tiny_affine(origin=(-10.0, 20.0, -28.0)))
        return bad, "affine differs by up to 2 mm"
    if kind == "seg value 3":
        seg = np.zeros(SHAPE, dtype=np.uint8)
        seg[1:3, 1:3, 1:3] = 3
        bad = _save(d / "BraTS2021_00002_seg.nii.gz", seg)
        return bad, "label values [3] are not declared in the BraTS labels [0, 1, 2, 4]"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["missing sequence", "shape", "affine", "seg value 3"])
def test_check_rejects_broken_brats_naming_the_file(kind: str, brats: Path, capsys) -> None:
    bad, fragment = _break(kind, brats)
    code, out, err = run_check(brats, capsys)
    assert code == 2, (kind, out, err)
    assert "passed all checks" not in out and "Traceback" not in err + out
    problems = [ln for ln in err.splitlines() if ln.startswith("medmim: error: ")]
    assert len(problems) == 1, err
    assert problems[0].startswith(f"medmim: error: {bad}: ") and fragment in problems[0], err
    report = check_dataset(brats)
    assert [p.path for p in report.problems] == [str(bad)]
