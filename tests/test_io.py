"""Image I/O: every format reads to the same RAS+ array/affine pair; NIfTI round-trips exactly."""

from __future__ import annotations

import gzip
import locale
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from medmim.data.io import read_image, read_info, write_nifti
from medmim.errors import MedmimError


def _oblique_affine() -> np.ndarray:
    # a rotated, anisotropic, LPS-stored grid like dcm2niix writes: x and y flipped
    theta = np.deg2rad(7.0)
    rot = np.array([[np.cos(theta), -np.sin(theta), 0], [np.sin(theta), np.cos(theta), 0], [0, 0, 1]])
    a = np.eye(4)
    a[:3, :3] = rot @ np.diag([-0.7, -0.7, 2.5])
    a[:3, 3] = [120.5, 98.25, -312.0]
    return a.astype(np.float32).astype(np.float64)  # NIfTI stores float32


@pytest.mark.parametrize("dtype", [np.int16, np.uint8, np.float32])
@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_nifti_round_trip_is_exact(tmp_path: Path, dtype, suffix: str) -> None:
    rng = np.random.default_rng(0)
    arr = (rng.normal(size=(17, 13, 9)) * 500).astype(dtype)
    aff = _oblique_affine()
    p1 = write_nifti(tmp_path / f"a{suffix}", arr, aff)
    img = read_image(p1)
    assert img.array.dtype == dtype
    np.testing.assert_array_equal(img.array, arr)
    np.testing.assert_array_equal(img.affine, aff)
    # read -> write -> read again: identical voxels and affine
    p2 = write_nifti(tmp_path / f"b{suffix}", img.array, img.affine)
    again = read_image(p2)
    np.testing.assert_array_equal(again.array, arr)
    np.testing.assert_array_equal(again.affine, img.affine)
    assert img.orientation == "LPS"
    np.testing.assert_allclose(img.spacing, (0.7, 0.7, 2.5), rtol=1e-6)


def test_nifti_multichannel_round_trip(tmp_path: Path) -> None:
    arr = np.arange(6 * 5 * 4 * 3, dtype=np.float32).reshape(6, 5, 4, 3)
    p = write_nifti(tmp_path / "mc.nii.gz", arr, np.diag([1.0, 1.0, 1.0, 1.0]))
    img = read_image(p)
    assert img.shape == (6, 5, 4, 3)
    np.testing.assert_array_equal(img.array, arr)


def test_a_foreign_header_keeps_its_sform(tmp_path: Path) -> None:
    # a file written by another tool: sform only, scanner qform absent
    aff = _oblique_affine()
    nimg = nib.Nifti1Image(np.ones((4, 4, 4), np.int16), aff)
    nimg.set_qform(None, code=0)
    nib.save(nimg, tmp_path / "f.nii")
    np.testing.assert_array_equal(read_image(tmp_path / "f.nii").affine, aff)


def _sitk_image(arr_kji: np.ndarray, spacing, origin, direction) -> sitk.Image:
    img = sitk.GetImageFromArray(arr_kji)
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    img.SetDirection(direction)
    return img


@pytest.mark.parametrize("suffix", [".nrrd", ".mha"])
def test_sitk_formats_read_as_ras(tmp_path: Path, suffix: str) -> None:
    rng = np.random.default_rng(1)
    arr_kji = rng.integers(-1000, 1000, size=(7, 9, 11)).astype(np.int16)  # numpy order [K, J, I]
    spacing, origin = (0.8, 0.9, 3.0), (-100.0, 50.0, 20.0)
    direction = (1, 0, 0, 0, 1, 0, 0, 0, 1)  # LPS-aligned, ITK's default
    p = tmp_path / f"v{suffix}"
    sitk.WriteImage(_sitk_image(arr_kji, spacing, origin, direction), str(p))
    img = read_image(p)
    assert img.shape == (11, 9, 7)
    np.testing.assert_array_equal(img.array, arr_kji.transpose(2, 1, 0))
    # an LPS identity direction is a RAS flip of x and y; origin flips the same way
    np.testing.assert_allclose(img.affine, [[-0.8, 0, 0, 100.0], [0, -0.9, 0, -50.0], [0, 0, 3.0, 20.0], [0, 0, 0, 1]])
    assert img.orientation == "LPS"
    # the same world point must land on the same voxel through NIfTI: write, read with nibabel
    out = write_nifti(tmp_path / "v.nii.gz", img.array, img.affine)
    nimg = nib.load(out)
    np.testing.assert_allclose(nimg.affine, img.affine, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(nimg.dataobj), img.array)


def _write_dicom_series(folder: Path, arr_kji: np.ndarray, spacing, origin) -> None:
    """Write one 2D DICOM file per slice, with the geometry tags a scanner would set.

    SimpleITK's DICOM writer switches the whole process's C locale to "C" (ASCII); put it back, so that
    no later test in this process runs under another locale.
    """
    saved = locale.setlocale(locale.LC_ALL)
    try:
        _write_slices(folder, arr_kji, spacing, origin)
    finally:
        locale.setlocale(locale.LC_ALL, saved)


def _write_slices(folder: Path, arr_kji: np.ndarray, spacing, origin) -> None:
    folder.mkdir(parents=True)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    series_uid = "1.2.826.0.1.3680043.2.1125.1.4242"
    for k in range(arr_kji.shape[0]):
        sl = sitk.GetImageFromArray(arr_kji[k])
        pos = (origin[0], origin[1], origin[2] + k * spacing[2])
        sl.SetSpacing(spacing[:2])
        for tag, value in {
            "0008|0060": "CT",
            "0020|000d": "1.2.826.0.1.3680043.2.1125.1.4241",
            "0020|000e": series_uid,
            "0020|0032": "\\".join(f"{v:.4f}" for v in pos),
            "0020|0037": "1\\0\\0\\0\\1\\0",
            "0020|0013": str(k + 1),
            "0018|0050": f"{spacing[2]:.4f}",
            "0028|0030": f"{spacing[1]:.4f}\\{spacing[0]:.4f}",
            "0008|0018": f"{series_uid}.{k + 1}",
        }.items():
            sl.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"IM{k:04d}.dcm"))
        writer.Execute(sl)


def test_dicom_series_folder(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    arr_kji = rng.integers(-1000, 1500, size=(6, 16, 12)).astype(np.int16)
    _write_dicom_series(tmp_path / "series", arr_kji, (0.75, 0.75, 2.5), (-50.0, -40.0, 100.0))
    img = read_image(tmp_path / "series")
    assert img.shape == (12, 16, 6)
    np.testing.assert_array_equal(img.array, arr_kji.transpose(2, 1, 0))
    np.testing.assert_allclose(img.spacing, (0.75, 0.75, 2.5), rtol=1e-4)
    np.testing.assert_allclose(img.affine[:3, 3], (50.0, 40.0, 100.0), atol=1e-3)
    assert img.orientation == "LPS"
    assert read_info(tmp_path / "series").shape == (12, 16, 6)


def test_read_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(MedmimError, match="missing.nii.gz: file not found"):
        read_image(tmp_path / "missing.nii.gz")
    junk = tmp_path / "junk.nii.gz"
    junk.write_bytes(b"this is not an image at all" * 10)
    with pytest.raises(MedmimError, match="junk.nii.gz"):
        read_image(junk)
    good = write_nifti(tmp_path / "good.nii.gz", np.ones((30, 30, 30), np.float32), np.eye(4))
    data = gzip.decompress(good.read_bytes())
    trunc = tmp_path / "trunc.nii.gz"
    trunc.write_bytes(gzip.compress(data[: len(data) // 2]))
    with pytest.raises(MedmimError, match="trunc.nii.gz: cannot read voxel data"):
        read_image(trunc)
    with pytest.raises(MedmimError, match="unknown image format"):
        (tmp_path / "notes.txt").write_text("hello", encoding="utf-8")
        read_image(tmp_path / "notes.txt")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(MedmimError, match="no DICOM series"):
        read_image(empty)


def test_absurd_header_is_refused_before_allocating(tmp_path: Path) -> None:
    p = write_nifti(tmp_path / "big.nii", np.ones((4, 4, 4), np.int16), np.eye(4))
    raw = bytearray(p.read_bytes())
    # dim[1..3] live at bytes 42..47 of the NIfTI-1 header (int16 each)
    raw[42:48] = np.array([30000, 30000, 30000], "<i2").tobytes()
    p.write_bytes(bytes(raw))
    with pytest.raises(MedmimError, match="too many"):
        read_image(p)
