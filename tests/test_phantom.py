"""The synthetic abdominal CT phantom: geometry, determinism, anatomy measured in world mm, HU,
and the Decathlon folder it writes."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from medmim.data.phantom import (
    BTCV_LABELS, BTCV_LATERAL_PAIRS, DEFAULT_SHAPE, DEFAULT_SPACING, MIN_FOV_MM, case_seed, make_phantom,
    write_phantom_dataset,
)
from medmim.errors import MedmimError

# the default field of view (384 x 320 x 240 mm) on a coarse grid: 46k voxels instead of 2.5M
COARSE = {"shape": (48, 40, 24), "spacing": (8.0, 8.0, 10.0)}
SEEDS = (0, 1, 2)
SPLEEN, KIDNEY_R, KIDNEY_L, GALLBLADDER, ESOPHAGUS, LIVER, STOMACH = 1, 2, 3, 4, 5, 6, 7
AORTA, IVC, PORTAL_SPLENIC, PANCREAS, ADRENAL_R, ADRENAL_L = 8, 9, 10, 11, 12, 13


@pytest.fixture(scope="module")
def cases():
    """Three default-size phantoms, shared by the anatomy tests."""
    return {seed: make_phantom(seed) for seed in SEEDS}


def world(case, mask) -> np.ndarray:
    """[N, 3] RAS world coordinates (mm) of the voxels in ``mask``."""
    ijk = np.argwhere(mask).astype(float)
    return ijk @ case.affine[:3, :3].T + case.affine[:3, 3]


def body_mask(image) -> np.ndarray:
    """Inside the skin, slice by slice (lungs touch the volume's top face, so not in 3D)."""
    in_plane = np.zeros((3, 3, 3), bool)
    in_plane[:, :, 1] = ndimage.generate_binary_structure(2, 1)
    return ndimage.binary_fill_holes(image > -500, structure=in_plane)


def centroid(case, label: int) -> np.ndarray:
    return world(case, case.label == label).mean(axis=0)


def volume_ml(case, label: int) -> float:
    return float((case.label == label).sum() * abs(np.linalg.det(case.affine[:3, :3])) / 1000.0)


# --- geometry and determinism -------------------------------------------------------------------

def test_default_case_geometry(cases):
    case = cases[0]
    assert case.image.shape == case.label.shape == DEFAULT_SHAPE
    assert case.image.dtype == np.int16 and case.label.dtype == np.uint8
    assert case.affine.shape == (4, 4) and case.affine.dtype == np.float64
    assert "".join(nib.aff2axcodes(case.affine)) == "RAS"
    assert np.allclose(np.linalg.norm(case.affine[:3, :3], axis=0), DEFAULT_SPACING)
    centre = case.affine @ [*((np.array(DEFAULT_SHAPE) - 1) / 2), 1.0]
    assert np.allclose(centre[:3], 0.0, atol=1e-6)
    assert 2e6 < case.image.size < 5e6  # "a few million voxels"
    assert set(np.unique(case.label)) <= set(BTCV_LABELS)


def test_same_seed_same_arrays_other_seed_differs(cases):
    again = make_phantom(0)
    assert np.array_equal(again.image, cases[0].image)
    assert np.array_equal(again.label, cases[0].label)
    assert np.array_equal(again.affine, cases[0].affine)
    assert not np.array_equal(cases[1].image, cases[0].image)
    assert not np.array_equal(cases[1].label, cases[0].label)


def test_custom_shape_and_spacing():
    case = make_phantom(3, **COARSE)
    assert case.image.shape == case.label.shape == COARSE["shape"]
    assert np.allclose(np.diag(case.affine)[:3], COARSE["spacing"])
    assert "".join(nib.aff2axcodes(case.affine)) == "RAS"


def test_volumes_do_not_depend_on_spacing(cases):
    coarse = make_phantom(0, **COARSE)
    for label in (LIVER, SPLEEN, KIDNEY_R, KIDNEY_L, STOMACH, PANCREAS):
        assert volume_ml(coarse, label) == pytest.approx(volume_ml(cases[0], label), rel=0.08), BTCV_LABELS[label]
    # and the organs sit in the same place (mm)
    for label in (LIVER, SPLEEN, KIDNEY_R, KIDNEY_L):
        assert np.linalg.norm(centroid(coarse, label) - centroid(cases[0], label)) < 8.0


def test_smallest_field_of_view_still_shows_every_organ():
    shape = tuple(int(np.ceil(f / s)) for f, s in zip(MIN_FOV_MM, COARSE["spacing"]))
    case = make_phantom(4, shape=shape, spacing=COARSE["spacing"])
    assert set(np.unique(case.label)) == set(BTCV_LABELS)


# --- anatomy, measured in world millimetres ------------------------------------------------------

VOLUME_RANGES_ML = {
    LIVER: (1200, 1800), SPLEEN: (120, 250), KIDNEY_R: (120, 180), KIDNEY_L: (120, 180),
    GALLBLADDER: (20, 50), ESOPHAGUS: (5, 20), STOMACH: (150, 400), AORTA: (40, 150), IVC: (40, 150),
    PORTAL_SPLENIC: (10, 30), PANCREAS: (50, 100), ADRENAL_R: (3, 7), ADRENAL_L: (3, 7),
}


@pytest.mark.parametrize("seed", SEEDS)
def test_all_13_organs_with_realistic_volumes(cases, seed):
    case = cases[seed]
    assert set(np.unique(case.label)) == set(BTCV_LABELS)
    for label, (lo, hi) in VOLUME_RANGES_ML.items():
        assert lo <= volume_ml(case, label) <= hi, (BTCV_LABELS[label], volume_ml(case, label))


@pytest.mark.parametrize("seed", SEEDS)
def test_small_organs_stay_small_and_thin(cases, seed):
    case = cases[seed]
    spacing = np.linalg.norm(case.affine[:3, :3], axis=0)
    for label, max_ml, max_half_thickness_mm in ((ADRENAL_R, 10, 8.0), (ADRENAL_L, 10, 8.0),
                                                 (ESOPHAGUS, 25, 12.0), (PORTAL_SPLENIC, 30, 10.0),
                                                 (KIDNEY_R, 200, 40.0)):
        mask = case.label == label
        assert volume_ml(case, label) < max_ml
        # distance from the deepest voxel to the nearest outside voxel: ~half the thickness
        box = ndimage.find_objects(mask.astype(np.uint8))[0]
        depth = ndimage.distance_transform_edt(np.pad(mask[box], 1), sampling=spacing).max()
        assert depth <= max_half_thickness_mm, (BTCV_LABELS[label], depth)
        if label == KIDNEY_R:
            assert depth > 15.0  # the yardstick: a kidney is much thicker


@pytest.mark.parametrize("seed", SEEDS)
def test_organs_in_their_real_places(cases, seed):
    case = cases[seed]
    c = {label: centroid(case, label) for label in BTCV_LABELS if label}
    x, y, z = 0, 1, 2
    assert c[LIVER][x] > 20 and c[SPLEEN][x] < -20  # liver on the patient's right, spleen left
    assert c[KIDNEY_R][x] > 20 and c[KIDNEY_L][x] < -20
    assert c[KIDNEY_R][z] < c[KIDNEY_L][z]  # right kidney sits lower
    assert c[AORTA][x] < 0 and c[AORTA][x] < c[IVC][x] - 15  # IVC right of the aorta
    assert c[GALLBLADDER][x] > 0 and c[GALLBLADDER][y] > c[LIVER][y]  # right, anterior
    for kidney in (KIDNEY_R, KIDNEY_L):
        assert c[kidney][y] < c[PANCREAS][y] - 20  # kidneys posterior to the pancreas
    assert c[AORTA][y] < c[PANCREAS][y]
    assert c[STOMACH][x] < 0 and c[STOMACH][y] > c[SPLEEN][y] and c[STOMACH][y] > c[KIDNEY_L][y]
    assert c[ESOPHAGUS][z] > c[STOMACH][z] and abs(c[ESOPHAGUS][x]) < 30
    assert c[SPLEEN][z] > c[KIDNEY_L][z]
    for adrenal, kidney in ((ADRENAL_R, KIDNEY_R), (ADRENAL_L, KIDNEY_L)):
        kid = world(case, case.label == kidney)
        upper_pole = kid[np.argmax(kid[:, z])]
        assert c[adrenal][z] > c[kidney][z] + 30  # above the kidney ...
        assert np.linalg.norm(c[adrenal] - upper_pole) < 40  # ... near its upper pole
        assert abs(c[adrenal][x]) < abs(c[kidney][x])  # and medial to it
    # the right/left pairs are what BTCV_LATERAL_PAIRS says
    for right, left in BTCV_LATERAL_PAIRS:
        assert c[right][x] > 0 > c[left][x]


@pytest.mark.parametrize("seed", SEEDS)
def test_gallbladder_sits_on_the_liver(cases, seed):
    case = cases[seed]
    touching = ndimage.binary_dilation(case.label == GALLBLADDER, iterations=2) & (case.label == LIVER)
    assert touching.any()


@pytest.mark.parametrize("seed", SEEDS)
def test_spine_is_posterior_in_the_midline(cases, seed):
    case = cases[seed]
    body = world(case, body_mask(case.image))
    bone = world(case, case.image > 250)
    assert len(bone) > 1000
    spine = bone[np.abs(bone[:, 0]) < 20]
    assert np.median(spine[:, 1]) < np.median(body[:, 1]) - 20
    assert np.median(spine[:, 1]) < centroid(case, AORTA)[1]  # aorta in front of the spine


@pytest.mark.parametrize("seed", SEEDS)
def test_body_size(cases, seed):
    case = cases[seed]
    k = case.image.shape[2] // 2
    body = world(case, (case.image > -500)[:, :, k:k + 1])
    width, depth = np.ptp(body[:, 0]), np.ptp(body[:, 1])
    assert 280 <= width <= 380 and 190 <= depth <= 280


# --- intensities --------------------------------------------------------------------------------

HU_RANGES = {
    LIVER: (80, 140), SPLEEN: (90, 140), KIDNEY_R: (130, 200), KIDNEY_L: (130, 200), AORTA: (140, 220),
    IVC: (100, 170), PANCREAS: (70, 120), GALLBLADDER: (-20, 40), ESOPHAGUS: (10, 80), PORTAL_SPLENIC: (110, 190),
}


@pytest.mark.parametrize("seed", SEEDS)
def test_organ_hounsfield_units(cases, seed):
    case = cases[seed]
    for label, (lo, hi) in HU_RANGES.items():
        mask = case.label == label
        if label not in (ESOPHAGUS, PORTAL_SPLENIC):  # thin tubes: every voxel is near an edge
            mask = ndimage.binary_erosion(mask)
        assert lo <= np.median(case.image[mask]) <= hi, BTCV_LABELS[label]


@pytest.mark.parametrize("seed", SEEDS)
def test_background_hounsfield_units(cases, seed):
    case = cases[seed]
    image = case.image
    corner = image[:10, :10, :]  # air outside the body
    assert abs(np.median(corner) + 1000) < 10 and 5 < corner.std() < 25  # scanner noise
    body = body_mask(image)
    outside = ~ndimage.binary_dilation(body, iterations=2)  # beyond the skin's partial-volume rim
    assert image[outside].max() < -850  # nothing but air (and its noise) outside the body
    # fat is the most common soft-tissue value in the body
    counts, edges = np.histogram(image[body], bins=np.arange(-300, 301, 10))
    assert -120 <= edges[np.argmax(counts)] <= -80
    assert (image > 400).sum() > 500  # cortical bone
    assert image.min() >= -1024 and image.max() <= 3071


# --- the Decathlon folder ------------------------------------------------------------------------

def test_write_dataset_msd_layout(tmp_path):
    out = write_phantom_dataset(tmp_path / "phantom", labeled=2, unlabeled=1, seed=5, **COARSE)
    assert out == tmp_path / "phantom"
    desc = json.loads((out / "dataset.json").read_text(encoding="utf-8"))
    assert desc["name"] == "medmim-phantom" and desc["tensorImageSize"] == "3D"
    assert desc["modality"] == {"0": "CT"}
    assert desc["labels"] == {str(k): v for k, v in BTCV_LABELS.items()}
    assert desc["numTraining"] == 2 and desc["numTest"] == 1
    assert desc["training"] == [
        {"image": f"./imagesTr/phantom_{i:04d}.nii.gz", "label": f"./labelsTr/phantom_{i:04d}.nii.gz"} for i in (0, 1)]
    assert desc["test"] == ["./imagesTs/phantom_0002.nii.gz"]
    assert desc["lateral_pairs"] == [[2, 3], [12, 13]]
    meta = desc["medmim_phantom"]
    assert meta["seed"] == 5 and meta["shape"] == [48, 40, 24] and meta["spacing"] == [8.0, 8.0, 10.0]
    assert not (out / "labelsTr" / "phantom_0002.nii.gz").exists()
    assert sorted(p.name for p in out.rglob("*.nii.gz")) == sorted(
        ["phantom_0000.nii.gz"] * 2 + ["phantom_0001.nii.gz"] * 2 + ["phantom_0002.nii.gz"])
    # files read back as the arrays make_phantom gives for each case's seed
    seeds = set()
    for i, entry in enumerate(desc["training"] + [{"image": desc["test"][0]}]):
        seed = case_seed(5, i)
        assert meta["case_seeds"][f"phantom_{i:04d}"] == seed
        seeds.add(seed)
        case = make_phantom(seed, **COARSE)
        img = nib.load(out / entry["image"])
        assert np.array_equal(np.asarray(img.dataobj), case.image) and img.get_data_dtype() == np.int16
        assert np.allclose(img.affine, case.affine)
        assert "".join(nib.aff2axcodes(img.affine)) == "RAS"
        if "label" in entry:
            lab = nib.load(out / entry["label"])
            assert np.array_equal(np.asarray(lab.dataobj), case.label) and lab.get_data_dtype() == np.uint8
            assert np.allclose(lab.affine, case.affine)
    assert len(seeds) == 3  # labeled and unlabeled cases are different patients


def test_same_seed_writes_same_bytes(tmp_path):
    a = write_phantom_dataset(tmp_path / "a", labeled=1, unlabeled=1, seed=9, **COARSE)
    b = write_phantom_dataset(tmp_path / "b", labeled=1, unlabeled=1, seed=9, **COARSE)
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert len(files) == 4
    for rel in files:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
    c = write_phantom_dataset(tmp_path / "c", labeled=1, unlabeled=1, seed=10, **COARSE)
    rel = "imagesTr/phantom_0000.nii.gz"
    assert (a / rel).read_bytes() != (c / rel).read_bytes()


_HASH_CASES = """
import hashlib
from medmim.data.phantom import make_phantom
from medmim.data.phantom_brain import make_brain_phantom
for case in (make_phantom(0), make_phantom(1), make_brain_phantom(0, shape=(64, 72, 64), spacing=(2.5, 2.5, 2.5))):
    print(hashlib.sha256(case.image.tobytes() + case.label.tobytes()).hexdigest())
"""


def _cpu_flags() -> set[str]:
    try:
        text = open("/proc/cpuinfo", encoding="utf-8").read()
    except OSError:
        return set()
    return set(next((ln.split(":", 1)[1].split() for ln in text.splitlines() if ln.startswith("flags")), []))


@pytest.mark.skipif("avx2" not in _cpu_flags(), reason="needs an x86 CPU with AVX2, to run two BLAS kernels")
def test_same_seed_same_bytes_whichever_blas_kernel_the_cpu_picks():
    # numpy's OpenBLAS picks its kernel for the CPU; forcing an old one (SSE3) and an AVX2 one imitates two
    # machines. With the organ frames' products in BLAS, seeds 0 and 1 differed in a few voxels between them.
    import os
    import subprocess
    import sys
    from pathlib import Path

    import medmim

    src = str(Path(medmim.__file__).resolve().parents[1])
    hashes = {}
    for kernel in ("Prescott", "Haswell"):
        env = {**os.environ, "OPENBLAS_CORETYPE": kernel, "OMP_NUM_THREADS": "1",
               "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
        done = subprocess.run([sys.executable, "-c", _HASH_CASES], env=env, capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 0, done.stderr
        hashes[kernel] = done.stdout.split()
    assert len(hashes["Haswell"]) == 3 and hashes["Prescott"] == hashes["Haswell"]


@pytest.mark.parametrize("kwargs, option", [
    ({"labeled": -1}, "--labeled"),
    ({"unlabeled": -2}, "--unlabeled"),
    ({"labeled": 1.5}, "--labeled"),
    ({"labeled": 0, "unlabeled": 0}, "--labeled"),
    ({"seed": -1}, "--seed"),
    ({"seed": "x"}, "--seed"),
    ({"shape": (0, 40, 24)}, "--shape"),
    ({"shape": (48, 40)}, "--shape"),
    ({"shape": (48.0, 40, 24)}, "--shape"),
    ({"spacing": (8.0, -8.0, 10.0)}, "--spacing"),
    ({"spacing": (8.0, float("nan"), 10.0)}, "--spacing"),
    ({"spacing": "8"}, "--spacing"),
    ({"shape": (32, 32, 16), "spacing": DEFAULT_SPACING}, "--shape"),  # 64 x 64 x 48 mm: no room
    ({"shape": (48, 40, 12)}, "--shape"),  # 120 mm craniocaudal
])
def test_invalid_arguments_name_the_option(tmp_path, kwargs, option):
    args = {"labeled": 1, "unlabeled": 0, **COARSE, **kwargs}
    with pytest.raises(MedmimError, match=option) as err:
        write_phantom_dataset(tmp_path / "out", **args)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "out" / "dataset.json").exists()


@pytest.mark.parametrize("kwargs, option", [
    ({"seed": -3}, "--seed"), ({"seed": True}, "--seed"),
    ({"seed": 0, "shape": (10, 10, 10)}, "--shape"), ({"seed": 0, "spacing": (0.0, 2.0, 3.0)}, "--spacing"),
])
def test_make_phantom_checks_its_arguments(kwargs, option):
    with pytest.raises(MedmimError, match=option):
        make_phantom(**kwargs)
