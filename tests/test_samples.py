"""`medmim data samples`: conversion on tiny stand-ins of the packages' files, fetching with pip faked.

Only the test marked ``network`` downloads, and only with ``MEDMIM_NETWORK_TESTS=1``.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from medmim.data import samples
from medmim.data.check import check_dataset
from medmim.data.io import read_image, write_nifti
from medmim.errors import MedmimError

PYRAD, NILEARN, TOTSEG = (samples.PACKAGES[k] for k in ("pyradiomics", "nilearn", "totalsegmentator"))
SHAPE = (10, 9, 4)  # i, j, k of the fake NRRD images
SPACING = (0.6, 0.7, 5.0)
ORIGIN_LPS = (10.0, 20.0, -30.0)


def _write_nrrd(path: Path, arr: np.ndarray, spacing=SPACING, origin=ORIGIN_LPS, direction=None) -> None:
    """``arr`` is [i, j, k]; geometry in ITK's LPS terms, as NRRD files store it."""
    img = sitk.GetImageFromArray(np.ascontiguousarray(arr.transpose(2, 1, 0)))
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    if direction is not None:
        img.SetDirection(direction)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(img, str(path))


def _lesion(shape=SHAPE) -> np.ndarray:
    m = np.zeros(shape, np.int16)
    m[3:6, 2:5, 1:3] = 1
    return m


def _make_roots(base: Path) -> dict[str, Path]:
    """Unpacked-package stand-ins, laid out as the real archives (tiny volumes)."""
    rng = np.random.default_rng(0)
    pr = base / "pyradiomics"
    (pr / "data").mkdir(parents=True)
    (pr / "PKG-INFO").write_text("Metadata-Version: 2.1\nName: pyradiomics\nVersion: 3.0.1\nLicense: BSD License\n"
                                 "Classifier: License :: OSI Approved :: BSD License\n\nDescription\n",
                                 encoding="utf-8")
    (pr / "LICENSE.txt").write_text("Copyright 2017 Fake Licensor\n\nRedistribution permitted.\n", encoding="utf-8")
    (pr / "data" / "README.md").write_text("Test cases and baselines.\n", encoding="utf-8")
    for name in ("lung1", "brain1", "brain2", "breast1"):
        _write_nrrd(pr / "data" / f"{name}_image.nrrd", rng.integers(-1024, 1000, SHAPE).astype(np.int16))
        _write_nrrd(pr / "data" / f"{name}_label.nrrd", _lesion())
    # lung2: a rotated grid (axes i and j swapped), and its mask stored cropped (another origin and shape)
    direction = (0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, -1.0)
    _write_nrrd(pr / "data" / "lung2_image.nrrd", rng.integers(-1024, 1000, SHAPE).astype(np.int16), direction=direction)
    crop = _lesion()[2:8, 1:7, 1:4]
    d = np.array(direction).reshape(3, 3)
    crop_origin = tuple(np.array(ORIGIN_LPS) + d @ (np.array([2, 1, 1]) * np.array(SPACING)))
    _write_nrrd(pr / "data" / "lung2_label.nrrd", crop, origin=crop_origin, direction=direction)

    nl = base / "nilearn"
    aff = np.diag([1.0, 1.0, 1.0, 1.0])
    aff[:3, 3] = (-3, -4, -2)
    mni = "nilearn/datasets/data/mni_icbm152_{}_tal_nlin_sym_09a_converted.nii.gz"
    gm = np.zeros((6, 5, 4), np.uint8)
    wm = np.zeros((6, 5, 4), np.uint8)
    gm[1], wm[1] = 200, 50  # grey
    gm[2], wm[2] = 50, 200  # white
    gm[3], wm[3] = 100, 100  # neither reaches 0.5: background
    gm[4], wm[4] = 128, 0  # 128/255 = 0.502: grey
    write_nifti(nl / mni.format("t1"), rng.integers(0, 256, (6, 5, 4)).astype(np.uint8), aff)
    write_nifti(nl / mni.format("gm"), gm, aff)
    write_nifti(nl / mni.format("wm"), wm, aff)
    (nl / "nilearn/datasets/description").mkdir(parents=True)
    (nl / "nilearn/datasets/description/icbm152_2009.rst").write_text("ICBM\n====\n\nLicense\n-------\nunknown\n",
                                                                        encoding="utf-8")
    (nl / "nilearn-0.14.1.dist-info/licenses").mkdir(parents=True)
    (nl / "nilearn-0.14.1.dist-info/METADATA").write_text(
        "Metadata-Version: 2.5\nName: nilearn\nVersion: 0.14.1\nLicense-Expression: BSD-3-Clause\n", encoding="utf-8")
    (nl / "nilearn-0.14.1.dist-info/licenses/LICENSE").write_text("Copyright (c) The fake developers.\n",
                                                                  encoding="utf-8")

    ts = base / "totalsegmentator"
    write_nifti(ts / "totalsegmentator/resources/ct_brain_atlas_1mm.nii.gz",
                rng.integers(-30, 385, (7, 6, 5)).astype(np.int16), aff)
    (ts / "totalsegmentator-2.18.0.dist-info/licenses").mkdir(parents=True)
    (ts / "totalsegmentator-2.18.0.dist-info/METADATA").write_text(
        "Metadata-Version: 2.4\nName: TotalSegmentator\nVersion: 2.18.0\nLicense: Apache 2.0\n", encoding="utf-8")
    (ts / "totalsegmentator-2.18.0.dist-info/licenses/LICENSE").write_text("Apache License\nVersion 2.0\n",
                                                                           encoding="utf-8")
    return {"pyradiomics": pr, "nilearn": nl, "totalsegmentator": ts}


def _make_archives(roots: dict[str, Path], folder: Path) -> dict[str, Path]:
    """Archives named as pip saves them: an sdist with its top folder, two wheels."""
    folder.mkdir(parents=True, exist_ok=True)
    sdist = folder / "pyradiomics-3.0.1.tar.gz"
    with tarfile.open(sdist, "w:gz") as t:
        t.add(roots["pyradiomics"], arcname="pyradiomics-3.0.1")
        info = tarfile.TarInfo("pyradiomics-3.0.1/setup.py")  # not needed: must not be unpacked
        info.size = 2
        t.addfile(info, io.BytesIO(b"#\n"))
    out = {"pyradiomics": sdist}
    for key, name in (("nilearn", "nilearn-0.14.1-py3-none-any.whl"),
                      ("totalsegmentator", "totalsegmentator-2.18.0-py3-none-any.whl")):
        with zipfile.ZipFile(folder / name, "w") as z:
            for f in sorted(roots[key].rglob("*")):
                if f.is_file():
                    z.write(f, f.relative_to(roots[key]).as_posix())
            z.writestr(f"{key}/__init__.py", "")
        out[key] = folder / name
    return out


@pytest.fixture(scope="module")
def fake(tmp_path_factory) -> dict:
    base = tmp_path_factory.mktemp("fake_packages")
    roots = _make_roots(base / "roots")
    return {"roots": roots, "archives": _make_archives(roots, base / "archives")}


@pytest.fixture(scope="module")
def converted(fake, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("samples_out")
    logs: list[str] = []
    result = samples.convert_samples(out, fake["roots"], log=logs.append)
    return {"out": out, "result": result, "logs": logs}


class FakePip:
    """Stands in for ``subprocess.run``: copies the fake archive pip would have saved into --dest."""

    def __init__(self, archives: dict[str, Path], returncode: int = 0, stderr: str = ""):
        self.archives, self.returncode, self.stderr, self.calls = archives, returncode, stderr, []

    def __call__(self, cmd, **kw):
        self.calls.append(list(cmd))
        if self.returncode == 0:
            dest = Path(cmd[cmd.index("--dest") + 1])
            name = cmd[-1].split("==")[0].lower()
            src = self.archives[name]
            (dest / src.name).write_bytes(src.read_bytes())
        return subprocess.CompletedProcess(cmd, self.returncode, "", self.stderr)


def _no_pip(*a, **kw):
    raise AssertionError(f"pip was called: {a}")


# --- conversion ------------------------------------------------------------------------------

def test_folders_pass_check_and_list_their_cases(converted):
    res = converted["result"]
    assert set(res) == {"ct", "mri", "mri-tissue"}
    assert (res["ct"]["labeled"], res["ct"]["unlabeled"]) == (2, 1)
    assert (res["mri"]["labeled"], res["mri"]["unlabeled"]) == (3, 1)
    assert (res["mri-tissue"]["labeled"], res["mri-tissue"]["unlabeled"]) == (1, 0)
    for name, d in res.items():
        report = check_dataset(d["path"])
        assert report.ok, report.problems
    ct = json.loads((res["ct"]["path"] / "dataset.json").read_text(encoding="utf-8"))
    assert ct["modality"] == {"0": "CT"} and ct["labels"] == {"0": "background", "1": "lesion"}
    assert [e["image"] for e in ct["training"]] == ["./imagesTr/lung1.nii.gz", "./imagesTr/lung2.nii.gz"]
    assert ct["test"] == ["./imagesTs/ct_brain_atlas.nii.gz"]
    mri = json.loads((res["mri"]["path"] / "dataset.json").read_text(encoding="utf-8"))
    assert mri["modality"] == {"0": "MRI"} and mri["test"] == ["./imagesTs/mni152_t1.nii.gz"]
    tissue = json.loads((res["mri-tissue"]["path"] / "dataset.json").read_text(encoding="utf-8"))
    assert tissue["labels"] == {"0": "background", "1": "grey matter", "2": "white matter"}


def test_geometry_is_kept_lps_to_ras(converted, fake):
    out = converted["out"]
    img = read_image(out / "ct/imagesTr/lung1.nii.gz")
    # identity LPS direction: RAS+ flips the first two world axes of spacing and origin
    expected = np.diag([-SPACING[0], -SPACING[1], SPACING[2], 1.0])
    expected[:3, 3] = (-ORIGIN_LPS[0], -ORIGIN_LPS[1], ORIGIN_LPS[2])
    np.testing.assert_allclose(img.affine, expected, atol=1e-5)
    src = read_image(fake["roots"]["pyradiomics"] / "data/lung1_image.nrrd")
    np.testing.assert_array_equal(img.array, src.array)
    assert img.array.dtype == np.int16
    # the rotated grid too, and an untouched NIfTI
    src2 = read_image(fake["roots"]["pyradiomics"] / "data/lung2_image.nrrd")
    out2 = read_image(out / "ct/imagesTr/lung2.nii.gz")
    np.testing.assert_allclose(out2.affine, src2.affine, atol=1e-5)
    np.testing.assert_array_equal(out2.array, src2.array)
    atlas = read_image(out / "ct/imagesTs/ct_brain_atlas.nii.gz")
    atlas_src = read_image(fake["roots"]["totalsegmentator"] / "totalsegmentator/resources/ct_brain_atlas_1mm.nii.gz")
    np.testing.assert_array_equal(atlas.affine, atlas_src.affine)
    np.testing.assert_array_equal(atlas.array, atlas_src.array)


def test_masks_are_binary_on_their_image_grid(converted):
    out = converted["out"]
    for folder, case in (("ct", "lung1"), ("mri", "brain1"), ("mri", "breast1")):
        img = read_image(out / folder / "imagesTr" / f"{case}.nii.gz")
        lab = read_image(out / folder / "labelsTr" / f"{case}.nii.gz")
        assert lab.array.dtype == np.uint8 and lab.shape == img.shape
        np.testing.assert_array_equal(lab.affine, img.affine)
        np.testing.assert_array_equal(lab.array, _lesion())


def test_mask_on_another_grid_is_resampled_onto_the_image(converted):
    out = converted["out"]
    img = read_image(out / "ct/imagesTr/lung2.nii.gz")
    lab = read_image(out / "ct/labelsTr/lung2.nii.gz")
    assert lab.shape == img.shape
    np.testing.assert_array_equal(lab.affine, img.affine)
    # the crop [2:8, 1:7, 1:4] put back where it came from
    expected = np.zeros(SHAPE, np.uint8)
    expected[2:8, 1:7, 1:4] = _lesion()[2:8, 1:7, 1:4]
    np.testing.assert_array_equal(lab.array, expected)
    assert any("lung2" in m and "resampled" in m for m in converted["logs"])


def test_tissue_map_from_probabilities(converted):
    lab = read_image(converted["out"] / "mri-tissue/labelsTr/mni152_t1.nii.gz").array
    assert [int(np.unique(lab[i])[0]) for i in range(6)] == [0, 1, 2, 0, 1, 0]
    p = np.array([[0.6, 0.3, 0.2, 0.5]]), np.array([[0.3, 0.6, 0.2, 0.5]])
    np.testing.assert_array_equal(samples.tissue_map(*p), [[1, 2, 0, 1]])


def test_resample_nearest_follows_world_coordinates():
    arr = np.arange(4 * 3 * 2).reshape(4, 3, 2)
    a = np.diag([2.0, 1.0, 1.0, 1.0])
    flipped = a.copy()
    flipped[0, 0], flipped[0, 3] = -2.0, 6.0  # same voxels, i axis reversed
    got = samples.resample_nearest(arr, a, (4, 3, 2), flipped)
    np.testing.assert_array_equal(got, arr[::-1])
    shifted = a.copy()
    shifted[0, 3] = 4.0  # two voxels along i: the last two fall outside
    got = samples.resample_nearest(arr, a, (4, 3, 2), shifted, fill=-1)
    np.testing.assert_array_equal(got[:2], arr[2:])
    assert (got[2:] == -1).all()


def test_sources_md_lists_files_versions_and_licences(converted):
    out = converted["out"]
    ct = (out / "ct/SOURCES.md").read_text(encoding="utf-8")
    for f in ("imagesTr/lung1.nii.gz", "labelsTr/lung2.nii.gz", "imagesTs/ct_brain_atlas.nii.gz",
              "data/lung1_image.nrrd", "totalsegmentator/resources/ct_brain_atlas_1mm.nii.gz"):
        assert f in ct
    assert "pyradiomics | 3.0.1 | License: BSD License" in ct
    assert "TotalSegmentator | 2.18.0 | License: Apache 2.0" in ct
    assert "Copyright 2017 Fake Licensor" in ct
    assert (out / "ct/licenses/pyradiomics-3.0.1-LICENSE.txt").is_file()
    mri = (out / "mri/SOURCES.md").read_text(encoding="utf-8")
    assert "License-Expression: BSD-3-Clause" in mri and '"License" section says: "unknown"' in mri
    assert "data/README.md`: it states no licence" in mri
    tissue = (out / "mri-tissue/SOURCES.md").read_text(encoding="utf-8")
    assert "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz" in tissue and str(samples.TISSUE_THRESHOLD) in tissue


# --- fetching and the cache ------------------------------------------------------------------

def test_write_samples_downloads_once_then_reuses_the_cache(fake, tmp_path, monkeypatch):
    pip = FakePip(fake["archives"])
    monkeypatch.setattr(samples.subprocess, "run", pip)
    cache = tmp_path / "cache"
    res = samples.write_samples(tmp_path / "out", cache_dir=cache, log=lambda m: None)
    assert sorted(c[-1] for c in pip.calls) == ["TotalSegmentator==2.18.0", "nilearn==0.14.1", "pyradiomics==3.0.1"]
    for c in pip.calls:
        assert c[:5] == [sys.executable, "-m", "pip", "download", "--no-deps"]
        assert ("--no-build-isolation" in c) == c[-1].startswith("pyradiomics")
    assert res["cache_dir"] == cache and res["datasets"]["ct"]["path"] == tmp_path / "out" / "ct"
    assert not (cache / "unpacked/pyradiomics-3.0.1/setup.py").exists()  # only the data and licence files
    assert (cache / "unpacked/pyradiomics-3.0.1/data/lung1_image.nrrd").is_file()
    assert "sha256" in (tmp_path / "out/ct/SOURCES.md").read_text(encoding="utf-8")

    again = FakePip(fake["archives"])
    monkeypatch.setattr(samples.subprocess, "run", again)
    res2 = samples.write_samples(tmp_path / "out2", cache_dir=cache, log=lambda m: None)
    assert again.calls == []  # all 3 archives came from the cache
    assert res2["cache_dir"] == cache and res2["datasets"]["mri"]["labeled"] == 3
    assert check_dataset(tmp_path / "out2/mri").ok


def test_cached_archives_are_reused_without_pip(fake, tmp_path, monkeypatch):
    downloads = tmp_path / "c/samples/downloads"
    downloads.mkdir(parents=True)
    for a in fake["archives"].values():
        (downloads / a.name).write_bytes(a.read_bytes())
    monkeypatch.setenv("MEDMIM_CACHE", str(tmp_path / "c"))
    monkeypatch.setattr(samples.subprocess, "run", _no_pip)
    assert samples.default_cache_dir() == tmp_path / "c/samples"
    res = samples.write_samples(tmp_path / "out", log=lambda m: None, check=False)
    assert res["cache_dir"] == tmp_path / "c/samples"


def test_failed_fetch_names_the_package_and_the_pip_command(tmp_path, monkeypatch):
    pip = FakePip({}, returncode=1, stderr="ERROR: No matching distribution found for pyradiomics==3.0.1\n")
    monkeypatch.setattr(samples.subprocess, "run", pip)
    with pytest.raises(MedmimError) as e:
        samples.write_samples(tmp_path / "out", cache_dir=tmp_path / "cache", log=lambda m: None)
    msg = str(e.value)
    assert "pyradiomics==3.0.1" in msg and "No matching distribution" in msg
    assert "-m pip download --no-deps --no-build-isolation --dest" in msg
    assert str(tmp_path / "cache" / "downloads") in msg
    assert list((tmp_path / "cache/downloads").iterdir()) == []  # nothing half-downloaded left behind
    assert not (tmp_path / "out").exists()


def test_pip_that_cannot_start_is_a_medmim_error(tmp_path, monkeypatch):
    def broken(cmd, **kw):
        raise FileNotFoundError(2, "No such file or directory")

    monkeypatch.setattr(samples.subprocess, "run", broken)
    with pytest.raises(MedmimError, match=r"nilearn==0\.14\.1.*pip download --no-deps --dest"):
        samples.fetch_archive(samples.PACKAGES["nilearn"], tmp_path, log=lambda m: None)


def test_no_registry_host_in_the_code():
    text = Path(samples.__file__).read_text(encoding="utf-8").lower()
    assert "pypi.org" not in text and "pythonhosted" not in text and "http" not in text


# --- the real thing --------------------------------------------------------------------------

@pytest.mark.network
@pytest.mark.skipif(os.environ.get("MEDMIM_NETWORK_TESTS") != "1", reason="set MEDMIM_NETWORK_TESTS=1 to download")
def test_real_download_and_conversion(tmp_path, monkeypatch):
    t0 = time.perf_counter()
    res = samples.write_samples(tmp_path / "out", cache_dir=tmp_path / "cache")
    took = time.perf_counter() - t0
    cases = {(name, c["case_id"]): c for name, d in res["datasets"].items() for c in d["cases"]}
    for (name, cid), c in sorted(cases.items()):
        print(f"{name}/{cid}: shape {c['shape']} spacing {c['spacing']} {c['orientation']} {c['dtype']} "
              f"{c['min']:g}..{c['max']:g} labels {c.get('label_voxels', '-')}")
    print(f"download + conversion + check: {took:.1f} s")
    lung1 = cases[("ct", "lung1")]
    assert lung1["shape"][:2] == (512, 512) and 40 <= lung1["shape"][2] <= 70
    assert lung1["spacing"][2] == pytest.approx(5.0) and lung1["min"] == -1024
    assert cases[("mri-tissue", "mni152_t1")]["spacing"] == (1.0, 1.0, 1.0)
    for (name, cid), c in cases.items():
        if "label_voxels" in c:
            assert c["label_voxels"].get(1, 0) > 0, (name, cid)
    for d in res["datasets"].values():
        assert check_dataset(d["path"]).ok
    monkeypatch.setattr(samples.subprocess, "run", _no_pip)
    samples.write_samples(tmp_path / "out2", cache_dir=tmp_path / "cache", check=False)
