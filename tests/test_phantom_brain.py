"""The synthetic BraTS-like brain MRI phantom: determinism, BraTS labels and their nesting, tumour
volumes in mL, tissue contrasts per sequence, the skull strip, and the Decathlon folder it writes."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from medmim.cli import main
from medmim.data.phantom import case_seed
from medmim.data.phantom_brain import (
    BRATS_LABELS, BRATS_MODALITIES, CSF, DEEP_GM, ENHANCING, GM, MIN_FOV_MM, NECROSIS, OEDEMA, WM,
    make_brain_phantom, write_brain_phantom_dataset,
)
from medmim.errors import MedmimError

SMALL = {"shape": (64, 72, 64), "spacing": (2.5, 2.5, 2.5)}  # 160 x 180 x 160 mm, 295k voxels
SEEDS = (0, 1, 2, 3, 4, 5)
T1, T1CE, T2, FLAIR = range(4)


@pytest.fixture(scope="module")
def cases():
    return {seed: make_brain_phantom(seed, **SMALL) for seed in SEEDS}


def ml(case, mask) -> float:
    return float(mask.sum() * np.prod(np.diag(case.affine)[:3]) / 1000.0)


def regions(label):
    """BraTS evaluation regions: enhancing tumour, tumour core, whole tumour."""
    return label == 4, np.isin(label, (1, 4)), label > 0


def test_geometry_and_dtypes(cases):
    case = cases[0]
    assert case.image.shape == (4, *SMALL["shape"]) and case.image.dtype == np.float32
    assert case.label.shape == SMALL["shape"] and case.label.dtype == np.uint8
    assert np.allclose(np.diag(case.affine)[:3], SMALL["spacing"])
    centre = case.affine @ np.array([(n - 1) / 2 for n in SMALL["shape"]] + [1.0])
    assert np.allclose(centre[:3], 0.0)
    # the brain is whole inside the field of view, centred within a few mm
    brain = case.image[0] > 0
    for axis in range(3):
        assert not np.take(brain, 0, axis).any() and not np.take(brain, -1, axis).any()
    ijk = np.argwhere(brain).mean(0)
    assert np.all(np.abs(ijk * 2.5 + case.affine[:3, 3]) < 10.0)


def test_same_seed_same_arrays_other_seed_differs(cases):
    again = make_brain_phantom(0, **SMALL)
    assert np.array_equal(again.image, cases[0].image)
    assert np.array_equal(again.label, cases[0].label)
    assert not np.array_equal(cases[0].label, cases[1].label)
    assert not np.array_equal(cases[0].image, cases[1].image)


@pytest.mark.parametrize("seed", SEEDS)
def test_labels_nest_inside_the_brain(cases, seed):
    case = cases[seed]
    assert set(np.unique(case.label).tolist()) == {0, 1, 2, 4}
    et, tc, wt = regions(case.label)
    assert et.any() and (tc & ~et).any() and (wt & ~tc).any()
    assert not (et & ~tc).any() and not (tc & ~wt).any()
    brain = np.all(case.image > 0, axis=0)
    assert not (wt & ~brain).any()
    # outside the brain every channel is exactly 0; inside none is
    outside = case.tissue == 0
    assert np.array_equal(brain, ~outside)
    assert np.all(case.image[:, outside] == 0.0)


@pytest.mark.parametrize("seed", SEEDS)
def test_tumour_in_one_hemisphere_white_matter(cases, seed):
    case = cases[seed]
    _, tc, wt = regions(case.label)
    ijk = np.argwhere(tc).mean(0)
    x = ijk[0] * 2.5 + case.affine[0, 3]
    assert abs(x) > 10.0  # off the midline, in one hemisphere
    assert case.tissue[tuple(np.round(ijk).astype(int))] in (NECROSIS, ENHANCING)
    # the oedema is larger than the core
    assert ml(case, wt) > 1.5 * ml(case, tc)


def test_tumour_volumes_plausible_and_varying(cases):
    vols = np.array([[ml(c, r) for r in regions(c.label)] for c in cases.values()])  # ET, TC, WT
    assert np.all((vols[:, 0] > 1.0) & (vols[:, 0] < 60.0)), vols
    assert np.all((vols[:, 1] > 2.0) & (vols[:, 1] < 120.0)), vols
    assert np.all((vols[:, 2] > 15.0) & (vols[:, 2] < 300.0)), vols
    assert np.ptp(vols[:, 1]) > 5.0 and np.ptp(vols[:, 2]) > 3.0, vols
    brain = np.array([ml(c, c.tissue > 0) for c in cases.values()])
    assert np.all((brain > 900.0) & (brain < 1700.0)), brain  # mL, a plausible adult brain
    assert np.ptp(brain) > 20.0  # head size varies


def test_tumours_arise_in_different_places(cases):
    """Seeds place the tumour in either hemisphere, at different heights and depths, not in one spot."""
    centres = []
    for case in cases.values():
        _, tc, _ = regions(case.label)
        centres.append(np.argwhere(tc).mean(0) * 2.5 + case.affine[:3, 3])
    centres = np.array(centres)
    assert (centres[:, 0] > 10).any() and (centres[:, 0] < -10).any(), centres  # both hemispheres
    assert np.ptp(centres[:, 1]) > 20.0 and np.ptp(centres[:, 2]) > 20.0, centres  # mm, front to back, up-down
    apart = np.linalg.norm(centres[:, None] - centres[None], axis=-1)[np.triu_indices(len(centres), 1)]
    assert apart.min() > 5.0, apart  # no two seeds share a spot


def test_volumes_do_not_depend_much_on_spacing():
    coarse = make_brain_phantom(7, **SMALL)
    fine = make_brain_phantom(7, shape=(80, 90, 80), spacing=(2.0, 2.0, 2.0))
    for a, b in zip(regions(coarse.label) + (coarse.tissue > 0,), regions(fine.label) + (fine.tissue > 0,)):
        assert ml(coarse, a) == pytest.approx(ml(fine, b), rel=0.12)


@pytest.mark.parametrize("seed", SEEDS)
def test_tissue_contrasts(cases, seed):
    case = cases[seed]
    m = {t: case.image[:, case.tissue == t].mean(axis=1) for t in (CSF, GM, WM, DEEP_GM, OEDEMA, NECROSIS, ENHANCING)}
    # T1: WM > GM > CSF, necrosis dark, oedema slightly darker than WM
    assert m[WM][T1] > m[GM][T1] > m[CSF][T1]
    assert m[NECROSIS][T1] < m[GM][T1] and m[OEDEMA][T1] < m[WM][T1]
    # T1ce: the enhancing rim is the brightest tissue, necrosis does not enhance
    assert m[ENHANCING][T1CE] > 1.4 * m[WM][T1CE]
    assert m[ENHANCING][T1CE] > max(m[t][T1CE] for t in m if t != ENHANCING)
    assert m[NECROSIS][T1CE] < m[GM][T1CE]
    # T1ce is T1 after gadolinium: relative to white matter, no tissue but the enhancing rim gains signal
    # (the two share one bias field), and it gains at least 1.5x
    gain = {t: (m[t][T1CE] / m[t][T1]) / (m[WM][T1CE] / m[WM][T1]) for t in m}
    assert all(abs(g - 1.0) < 0.05 for t, g in gain.items() if t != ENHANCING), gain
    assert gain[ENHANCING] > 1.5, gain
    # deep grey nuclei lie between cortex and white matter on T1, whatever the case's bias field
    assert m[WM][T1] > m[DEEP_GM][T1] > m[GM][T1]
    # T2: CSF brightest, oedema bright, WM darker than GM
    assert m[CSF][T2] > max(m[t][T2] for t in m if t != CSF)
    assert m[OEDEMA][T2] > m[GM][T2] > m[WM][T2]
    # FLAIR: CSF suppressed, oedema brightest, GM > WM
    assert m[OEDEMA][FLAIR] > m[GM][FLAIR] > m[WM][FLAIR] > m[CSF][FLAIR]
    assert m[OEDEMA][FLAIR] == max(m[t][FLAIR] for t in m)


def test_arbitrary_units_per_sequence(cases):
    wm = np.array([[c.image[ch, c.tissue == WM].mean() for ch in range(4)] for c in cases.values()])
    assert np.all(wm > 0)
    assert np.ptp(wm[:, 0]) / wm[:, 0].mean() > 0.2  # no absolute scale
    # a smooth bias field: white matter varies across the brain more than noise alone explains
    c = cases[0]
    wm_mask = c.tissue == WM
    half = np.zeros_like(wm_mask)
    half[: half.shape[0] // 2] = True
    a, b = c.image[0, wm_mask & half].mean(), c.image[0, wm_mask & ~half].mean()
    assert a != pytest.approx(b, rel=1e-3)


def test_write_dataset_msd_layout(tmp_path):
    out = write_brain_phantom_dataset(tmp_path / "brats", labeled=2, unlabeled=1, seed=3, **SMALL)
    desc = json.loads((out / "dataset.json").read_text(encoding="utf-8"))
    assert desc["modality"] == {"0": "T1", "1": "T1ce", "2": "T2", "3": "FLAIR"}
    assert desc["modality"] == {str(k): v for k, v in BRATS_MODALITIES.items()}
    assert desc["labels"] == {"0": "background", "1": "necrotic tumour core", "2": "peritumoral oedema",
                              "4": "GD-enhancing tumour"}
    assert set(BRATS_LABELS) == {0, 1, 2, 4}
    assert desc["numTraining"] == 2 and desc["numTest"] == 1
    assert desc["training"] == [{"image": f"./imagesTr/brain_{i:04d}.nii.gz", "label": f"./labelsTr/brain_{i:04d}.nii.gz"}
                                for i in range(2)]
    assert desc["test"] == ["./imagesTs/brain_0002.nii.gz"]
    rec = desc["medmim_phantom"]
    assert rec["kind"] == "brain" and rec["seed"] == 3 and rec["shape"] == list(SMALL["shape"])
    assert rec["case_seeds"]["brain_0001"] == case_seed(3, 1)
    img = nib.load(out / "imagesTr" / "brain_0001.nii.gz")
    lab = nib.load(out / "labelsTr" / "brain_0001.nii.gz")
    assert img.shape == (*SMALL["shape"], 4) and lab.shape == SMALL["shape"]
    case = make_brain_phantom(case_seed(3, 1), **SMALL)
    assert np.array_equal(np.moveaxis(np.asarray(img.dataobj), -1, 0), case.image)
    assert np.array_equal(np.asarray(lab.dataobj), case.label)
    assert np.allclose(img.affine, case.affine) and np.allclose(lab.affine, case.affine)
    assert (out / "imagesTs" / "brain_0002.nii.gz").exists()
    assert not (out / "labelsTr" / "brain_0002.nii.gz").exists()


def test_same_seed_writes_same_bytes(tmp_path):
    a = write_brain_phantom_dataset(tmp_path / "a", labeled=1, unlabeled=1, seed=5, **SMALL)
    b = write_brain_phantom_dataset(tmp_path / "b", labeled=1, unlabeled=1, seed=5, **SMALL)
    c = write_brain_phantom_dataset(tmp_path / "c", labeled=1, unlabeled=1, seed=6, **SMALL)
    for rel in ("dataset.json", "imagesTr/brain_0000.nii.gz", "labelsTr/brain_0000.nii.gz", "imagesTs/brain_0001.nii.gz"):
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
    rel = "imagesTr/brain_0000.nii.gz"
    assert (a / rel).read_bytes() != (c / rel).read_bytes()


@pytest.mark.parametrize("kwargs, option", [
    ({"labeled": -1}, "--labeled"),
    ({"unlabeled": -2}, "--unlabeled"),
    ({"labeled": 1.5}, "--labeled"),
    ({"labeled": 0, "unlabeled": 0}, "--labeled"),
    ({"seed": -1}, "--seed"),
    ({"seed": "x"}, "--seed"),
    ({"shape": (0, 72, 64)}, "--shape"),
    ({"shape": (64, 72)}, "--shape"),
    ({"shape": (64.0, 72, 64)}, "--shape"),
    ({"spacing": (2.5, -2.5, 2.5)}, "--spacing"),
    ({"spacing": (2.5, float("nan"), 2.5)}, "--spacing"),
    ({"spacing": "8"}, "--spacing"),
    ({"shape": (64, 64, 64)}, "--shape"),  # 160 mm front to back: the brain does not fit
])
def test_invalid_arguments_name_the_option(tmp_path, kwargs, option):
    args = {"labeled": 1, "unlabeled": 0, **SMALL, **kwargs}
    with pytest.raises(MedmimError, match=option) as err:
        write_brain_phantom_dataset(tmp_path / "out", **args)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "out" / "dataset.json").exists()


@pytest.mark.parametrize("kwargs, option", [
    ({"seed": -3}, "--seed"), ({"seed": True}, "--seed"),
    ({"seed": 0, "shape": (10, 10, 10)}, "--shape"), ({"seed": 0, "spacing": (0.0, 1.0, 1.0)}, "--spacing"),
])
def test_make_brain_phantom_checks_its_arguments(kwargs, option):
    with pytest.raises(MedmimError, match=option):
        make_brain_phantom(**kwargs)


def test_min_fov_is_accepted():
    shape = tuple(int(np.ceil(m / 3.0)) for m in MIN_FOV_MM)
    case = make_brain_phantom(0, shape=shape, spacing=(3.0, 3.0, 3.0))
    assert (case.label > 0).any()


def test_cli_writes_a_brain_dataset(tmp_path):
    out = tmp_path / "cli"
    args = ["data", "phantom", str(out), "--kind", "brain", "--labeled", "1", "--unlabeled", "1", "--seed", "4",
            "--shape", "64", "72", "64", "--spacing", "2.5", "2.5", "2.5"]
    assert main(args) in (0, None)
    desc = json.loads((out / "dataset.json").read_text(encoding="utf-8"))
    assert desc["medmim_phantom"]["kind"] == "brain" and desc["medmim_phantom"]["seed"] == 4
    assert nib.load(out / "imagesTr" / "brain_0000.nii.gz").shape == (64, 72, 64, 4)
    assert (out / "imagesTs" / "brain_0001.nii.gz").exists()
    ref = write_brain_phantom_dataset(tmp_path / "ref", labeled=1, unlabeled=1, seed=4, **SMALL)
    assert (out / "imagesTr/brain_0000.nii.gz").read_bytes() == (ref / "imagesTr/brain_0000.nii.gz").read_bytes()
    # a bad option is an error naming it, exit 2
    assert main(["data", "phantom", str(tmp_path / "bad"), "--kind", "brain", "--shape", "10", "10", "10"]) == 2
    assert main(["data", "phantom", str(tmp_path / "bad"), "--kind", "liver"]) == 2
