"""Brain tumour MRI in its three layouts (BraTS 2021 case folders, the Decathlon's 4D ``Task01_BrainTumour``,
nnU-Net v2 one file per channel): read into four channels and BraTS's 0/1/2/4 numbering, the renumbering
carried into the prepared cache, and `medmim data check` naming the file of each broken case."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medmim.cli import main
from medmim.data.check import check_dataset
from medmim.data.datasets import apply_label_map, load_dataset, read_case_label, read_label_values
from medmim.data.prepare import PrepareSettings, prepare_dataset, preprocess_case
from medmim.data.regions import BRATS_LABEL_NAMES
from medmim.errors import MedmimError
from tests.conftest import tiny_affine, write_msd
from tests.test_brats_format import write_brats

SHAPE = (12, 10, 8)
AFFINE = tiny_affine(spacing=(1.0, 1.0, 1.0))  # already on the 1 mm grid: prepare keeps every voxel in place
MSD_MODALITY = {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"}
MSD_LABELS = {"0": "background", "1": "edema", "2": "non-enhancing tumor", "3": "enhancing tumour"}
MSD_TO_BRATS = {1: 2, 2: 1, 3: 4}  # the Decathlon's oedema 1, non-enhancing 2, enhancing 3 -> BraTS's 2, 1, 4


def _save(path: Path, arr: np.ndarray, affine: np.ndarray = AFFINE) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(arr, affine), str(path))
    return path


def _channels(seed: int) -> np.ndarray:
    """Four positive sequences ``[X, Y, Z, 4]`` (non-zero everywhere, so prepare's MRI crop keeps the grid)."""
    rng = np.random.default_rng(seed)
    return (rng.random((*SHAPE, 4)) + 1.0 + np.arange(4)).astype(np.float32)


def _msd_label() -> np.ndarray:
    """Decathlon numbering: 1 oedema around 2 non-enhancing core, 3 enhancing."""
    lab = np.zeros(SHAPE, np.uint8)
    lab[2:10, 2:8, 1:7] = 1
    lab[4:8, 3:7, 2:6] = 3
    lab[5:7, 4:6, 3:5] = 2
    return lab


def write_decathlon(root: Path, labels: dict[str, str] = MSD_LABELS, n_labeled: int = 2, n_unlabeled: int = 1) -> Path:
    """``Task01_BrainTumour``: imagesTr/BRATS_XXX.nii.gz ``[X, Y, Z, 4]``, labelsTr/ and imagesTs/, dataset.json."""
    training, test = [], []
    for i in range(1, n_labeled + 1):
        _save(root / "imagesTr" / f"BRATS_{i:03d}.nii.gz", _channels(i))
        _save(root / "labelsTr" / f"BRATS_{i:03d}.nii.gz", _msd_label())
        training.append({"image": f"./imagesTr/BRATS_{i:03d}.nii.gz", "label": f"./labelsTr/BRATS_{i:03d}.nii.gz"})
    for i in range(n_labeled + 1, n_labeled + n_unlabeled + 1):
        _save(root / "imagesTs" / f"BRATS_{i:03d}.nii.gz", _channels(i))
        test.append(f"./imagesTs/BRATS_{i:03d}.nii.gz")
    desc = {"name": "BRATS", "tensorImageSize": "4D", "modality": MSD_MODALITY, "labels": labels,
            "numTraining": n_labeled, "numTest": n_unlabeled, "training": training, "test": test}
    (root / "dataset.json").write_text(json.dumps(desc, indent=1), encoding="utf-8")
    return root


NNUNET_LABELS = {"background": 0, "edema": 1, "non-enhancing tumor": 2, "enhancing tumour": 3}
# nnU-Net's own BraTS conversion (Dataset137_BraTS2021) declares the nested regions instead of the classes
NNUNET_REGION_LABELS = {"background": 0, "whole tumor": [1, 2, 3], "tumor core": [2, 3], "enhancing tumor": [3]}


def write_nnunet(root: Path, labels: dict = NNUNET_LABELS, n_labeled: int = 2) -> Path:
    """imagesTr/BRATS_XXX_0000..0003.nii.gz (FLAIR, T1w, t1gd, T2w), labelsTr/BRATS_XXX.nii.gz, imagesTs/."""
    for i in range(1, n_labeled + 2):
        folder = "imagesTr" if i <= n_labeled else "imagesTs"
        chans = _channels(i)
        for c in range(4):
            _save(root / folder / f"BRATS_{i:03d}_{c:04d}.nii.gz", np.ascontiguousarray(chans[..., c]))
        if i <= n_labeled:
            _save(root / "labelsTr" / f"BRATS_{i:03d}.nii.gz", _msd_label())
    desc = {"channel_names": MSD_MODALITY, "labels": labels, "numTraining": n_labeled, "file_ending": ".nii.gz"}
    if any(isinstance(v, list) for v in labels.values()):
        desc["regions_class_order"] = [1, 2, 3]
    (root / "dataset.json").write_text(json.dumps(desc, indent=1), encoding="utf-8")
    return root


def _brats_of(lab: np.ndarray) -> np.ndarray:
    lut = np.zeros(256, np.uint8)
    for src, dst in MSD_TO_BRATS.items():
        lut[src] = dst
    return lut[lab]


# --- reading ---------------------------------------------------------------------------------

def test_decathlon_4d_reads_into_four_channels_and_brats_numbering(tmp_path: Path) -> None:
    root = write_decathlon(tmp_path / "Task01_BrainTumour")
    ds = load_dataset(root)
    assert ds.format == "msd" and ds.channels == 4 and ds.modalities == ["FLAIR", "T1w", "t1gd", "T2w"]
    assert [c.case_id for c in ds.labeled] == ["BRATS_001", "BRATS_002"]
    assert [c.case_id for c in ds.unlabeled] == ["BRATS_003"]
    assert all(len(c.images) == 1 for c in ds.cases)  # one 4D file holds the four sequences
    assert ds.labels == BRATS_LABEL_NAMES and ds.label_map == MSD_TO_BRATS
    assert ds.source_labels == {int(k): v for k, v in MSD_LABELS.items()}
    assert all(c.label_map == MSD_TO_BRATS for c in ds.cases)
    case = ds.labeled[0]
    src = np.asarray(nib.load(str(case.label)).dataobj)
    got = read_label_values(case)
    assert got.dtype == np.uint8 and set(np.unique(got).tolist()) == {0, 1, 2, 4}
    assert np.array_equal(got, _brats_of(src))
    img = read_case_label(case)
    assert np.allclose(img.affine, AFFINE) and np.array_equal(img.array, got)


@pytest.mark.parametrize("labels", [NNUNET_LABELS, NNUNET_REGION_LABELS], ids=["classes", "regions"])
def test_nnunet_per_channel_files_read_into_four_channels_and_brats_numbering(labels: dict, tmp_path: Path) -> None:
    root = write_nnunet(tmp_path / "Dataset001_BrainTumour", labels)
    ds = load_dataset(root)
    assert ds.format == "nnunet" and ds.channels == 4 and ds.modalities == ["FLAIR", "T1w", "t1gd", "T2w"]
    assert [c.case_id for c in ds.labeled] == ["BRATS_001", "BRATS_002"]
    assert [c.case_id for c in ds.unlabeled] == ["BRATS_003"]
    assert [p.name for p in ds.labeled[1].images] == [f"BRATS_002_{c:04d}.nii.gz" for c in range(4)]
    assert ds.labeled[0].label == root / "labelsTr" / "BRATS_001.nii.gz"
    assert ds.labels == BRATS_LABEL_NAMES and ds.label_map == MSD_TO_BRATS
    assert np.array_equal(read_label_values(ds.labeled[0]), _brats_of(_msd_label()))


def test_brats_folders_and_datasets_in_brats_numbering_are_not_renumbered(tmp_path: Path) -> None:
    ds = load_dataset(write_brats(tmp_path / "BraTS2021"))
    assert ds.channels == 4 and ds.label_map is None and ds.source_labels is None
    assert sorted(ds.labels) == [0, 1, 2, 4] and all(c.label_map is None for c in ds.cases)
    assert set(np.unique(read_label_values(ds.labeled[0])).tolist()) == {0, 1, 2, 4}
    # a Decathlon folder already numbered as BraTS (the brain phantom's): labels kept as declared
    phantom_labels = {"0": "background", "1": "necrotic tumour core", "2": "peritumoral oedema", "4": "enhancing tumour"}
    ds = load_dataset(write_decathlon(tmp_path / "phantom", labels=phantom_labels))
    assert ds.label_map is None and ds.labels == {int(k): v for k, v in phantom_labels.items()}
    # three classes that are not BraTS's
    ds = load_dataset(write_msd(tmp_path / "ct"))
    assert ds.label_map is None and ds.labels[1] == "spleen"


def test_a_value_the_map_lacks_is_an_error_naming_the_file(tmp_path: Path) -> None:
    root = write_decathlon(tmp_path / "Task01_BrainTumour", n_labeled=1, n_unlabeled=0)
    lab = _msd_label()
    lab[0, 0, 0] = 5
    bad = _save(root / "labelsTr" / "BRATS_001.nii.gz", lab)
    case = load_dataset(root).labeled[0]
    with pytest.raises(MedmimError) as e:
        read_label_values(case)
    msg = str(e.value)
    assert msg.startswith(f"{bad}: label values [5] are not declared") and "\n" not in msg
    with pytest.raises(MedmimError, match="label values \\[5\\]"):
        preprocess_case(case, PrepareSettings(modality="mri", spacing=(1.0, 1.0, 1.0)))
    assert apply_label_map(lab, None, bad) is lab  # no map: the values as they are


@pytest.mark.parametrize("fmt", ["decathlon", "nnunet"])
def test_prepared_cache_holds_brats_values(fmt: str, tmp_path: Path) -> None:
    root = (write_decathlon if fmt == "decathlon" else write_nnunet)(tmp_path / "src")
    res = prepare_dataset(root, tmp_path / "cache", PrepareSettings(modality="mri", spacing=(1.0, 1.0, 1.0)))
    assert not res.failed and sorted(res.done) == ["BRATS_001", "BRATS_002", "BRATS_003"]
    label = np.load(tmp_path / "cache" / "cases" / "BRATS_001" / "label.npy")
    # on the unchanged 1 mm RAS grid, uncropped: voxel for voxel the source's 2/1/3 as BraTS's 1/2/4
    assert label.shape == SHAPE and np.array_equal(label, _brats_of(_msd_label()))
    assert set(np.unique(label).tolist()) == {0, 1, 2, 4}
    assert np.load(tmp_path / "cache" / "cases" / "BRATS_001" / "image.npy").shape == (4, *SHAPE)
    manifest = json.loads((tmp_path / "cache" / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["dataset"]["labels"] == {str(k): v for k, v in BRATS_LABEL_NAMES.items()}


# --- data check ------------------------------------------------------------------------------

def run_check(path: Path, capsys) -> tuple[int, str, str]:
    try:
        code = main(["data", "check", str(path)])
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("fmt", ["brats", "decathlon", "nnunet"])
def test_check_passes_on_each_format(fmt: str, tmp_path: Path, capsys) -> None:
    root = {"brats": write_brats, "decathlon": write_decathlon, "nnunet": write_nnunet}[fmt](tmp_path / "data")
    code, out, err = run_check(root, capsys)
    assert code == 0, err
    assert f"ok: {root} passed all checks" in out
    if fmt != "brats":
        assert "label files renumbered into BraTS's 0/1/2/4 by their declared names: 1 -> 2, 2 -> 1, 3 -> 4" in out
        assert "enhancing tumour" in out and "peritumoral oedema" in out
        report = check_dataset(root)
        assert sorted(report.label_voxels) == [0, 1, 2, 4]  # counted in BraTS's numbering, as named


def _break(fmt: str, kind: str, root: Path) -> tuple[Path, str]:
    """Break one case of ``root`` one way: the file the problem must name, and a fragment of its message."""
    shifted = tiny_affine(spacing=(1.0, 1.0, 1.0), origin=(-10.0, 20.0, -28.0))
    if fmt == "brats":
        d = root / "BraTS2021_00002"
        if kind == "missing sequence":
            (d / "BraTS2021_00002_t2.nii.gz").unlink()
            return d, "lacks the t2 sequence (BraTS2021_00002_t2.nii.gz)"
        if kind == "grid shape":
            return _save(d / "BraTS2021_00002_flair.nii.gz", np.ones((12, 10, 7), np.int16), tiny_affine()), \
                "channel grid differs from BraTS2021_00002_t1.nii.gz"
        if kind == "grid affine":
            return _save(d / "BraTS2021_00002_t1ce.nii.gz", np.ones(SHAPE, np.int16), tiny_affine(origin=(-10.0, 20.0, -27.0))), \
                "affine differs by up to 3 mm"
        if kind == "undeclared label":
            lab = np.zeros(SHAPE, np.uint8)
            lab[1:3, 1:3, 1:3] = 3
            return _save(d / "BraTS2021_00002_seg.nii.gz", lab, tiny_affine()), \
                "label values [3] are not declared in the BraTS labels [0, 1, 2, 4]"
    if fmt == "decathlon":
        image, label = root / "imagesTr" / "BRATS_002.nii.gz", root / "labelsTr" / "BRATS_002.nii.gz"
        if kind == "missing sequence":  # three sequences in the 4D file
            return _save(image, _channels(2)[..., :3]), \
                "3 channels but the dataset declares 4 (FLAIR, T1w, t1gd, T2w): a missing sequence"
        if kind == "one sequence only":
            return _save(image, _channels(2)[..., 0].copy()), "missing sequences"
        if kind == "grid shape":  # the label's grid is the only other one a 4D case has
            return _save(label, np.zeros((12, 10, 7), np.uint8)), "label shape (12, 10, 7) differs from its image's"
        if kind == "grid affine":
            return _save(label, _msd_label(), shifted), "label affine differs from its image's by up to 2 mm"
        if kind == "undeclared label":  # 4 is BraTS's enhancing tumour, but these files number it 3
            lab = _msd_label()
            lab[0, 0, 0] = 4
            return _save(label, lab), "label values [4] are not declared in dataset.json labels [0, 1, 2, 3]"
    if fmt == "nnunet":
        tr = root / "imagesTr"
        if kind == "missing sequence":
            (tr / "BRATS_002_0002.nii.gz").unlink()
            return tr / "BRATS_002_0002.nii.gz", "missing channel 2 (t1gd): case 'BRATS_002' has channels [0, 1, 3]"
        if kind == "grid shape":
            return _save(tr / "BRATS_002_0001.nii.gz", np.ones((12, 10, 7), np.float32)), \
                "channel grid differs from BRATS_002_0000.nii.gz (shape or affine): shape (12, 10, 7) vs (12, 10, 8)"
        if kind == "grid affine":
            return _save(tr / "BRATS_002_0003.nii.gz", np.ones(SHAPE, np.float32), shifted), \
                "channel grid differs from BRATS_002_0000.nii.gz (shape or affine): affine differs by up to 2 mm"
        if kind == "undeclared label":
            lab = _msd_label()
            lab[0, 0, 0] = 4
            return _save(root / "labelsTr" / "BRATS_002.nii.gz", lab), \
                "label values [4] are not declared in dataset.json labels [0, 1, 2, 3]"
    raise AssertionError((fmt, kind))


BREAKS = [(fmt, kind) for fmt in ("brats", "decathlon", "nnunet")
          for kind in ("missing sequence", "grid shape", "grid affine", "undeclared label")]
BREAKS.insert(5, ("decathlon", "one sequence only"))


@pytest.mark.parametrize("fmt,kind", BREAKS)
def test_check_rejects_a_broken_case_naming_the_file(fmt: str, kind: str, tmp_path: Path, capsys) -> None:
    root = {"brats": write_brats, "decathlon": write_decathlon, "nnunet": write_nnunet}[fmt](tmp_path / "data")
    bad, fragment = _break(fmt, kind, root)
    code, out, err = run_check(root, capsys)
    assert code == 2, (out, err)
    assert "passed all checks" not in out and "Traceback" not in err + out
    problems = [ln for ln in err.splitlines() if ln.startswith("medmim: error: ")]
    assert len(problems) == 1, err
    assert problems[0].startswith(f"medmim: error: {bad}: ") and fragment in problems[0], err
    assert [p.path for p in check_dataset(root).problems] == [str(bad)]
