"""Shared fixtures: tiny datasets written to tmp folders, in every format medmim reads."""

from __future__ import annotations

import json
import locale
from pathlib import Path

import numpy as np
import pytest

from medmim.data.io import write_nifti

@pytest.fixture(autouse=True)
def _locale_unchanged():
    """No test may leave the process locale changed: later tests in the same worker would run under it."""
    before = locale.setlocale(locale.LC_ALL)
    yield
    after = locale.setlocale(locale.LC_ALL)
    if after != before:
        locale.setlocale(locale.LC_ALL, before)
        pytest.fail(f"the test changed the process locale from {before!r} to {after!r}")


LABELS = {"0": "background", "1": "spleen", "2": "right kidney", "3": "left kidney"}


def tiny_affine(spacing=(1.5, 1.5, 2.0), origin=(-10.0, 20.0, -30.0)) -> np.ndarray:
    a = np.diag([*spacing, 1.0])
    a[:3, 3] = origin
    return a


def tiny_case(rng: np.random.Generator, shape=(12, 10, 8)) -> tuple[np.ndarray, np.ndarray]:
    """A small int16 'CT' and a uint8 label with classes 0..3."""
    img = rng.integers(-1000, 1000, size=shape).astype(np.int16)
    lab = np.zeros(shape, np.uint8)
    lab[2:5, 2:5, 2:5] = 1
    lab[6:9, 2:4, 3:6] = 2
    lab[6:9, 6:8, 3:6] = 3
    return img, lab


def write_msd(root: Path, n_labeled: int = 3, n_unlabeled: int = 2, shape=(12, 10, 8), seed: int = 0) -> Path:
    """A Decathlon-format dataset: imagesTr/labelsTr + imagesTs, dataset.json."""
    rng = np.random.default_rng(seed)
    training, test = [], []
    for i in range(n_labeled):
        img, lab = tiny_case(rng, shape)
        write_nifti(root / "imagesTr" / f"case_{i:03d}.nii.gz", img, tiny_affine())
        write_nifti(root / "labelsTr" / f"case_{i:03d}.nii.gz", lab, tiny_affine())
        training.append({"image": f"./imagesTr/case_{i:03d}.nii.gz", "label": f"./labelsTr/case_{i:03d}.nii.gz"})
    for i in range(n_labeled, n_labeled + n_unlabeled):
        img, _ = tiny_case(rng, shape)
        write_nifti(root / "imagesTs" / f"case_{i:03d}.nii.gz", img, tiny_affine())
        test.append(f"./imagesTs/case_{i:03d}.nii.gz")
    desc = {"name": "tiny", "modality": {"0": "CT"}, "labels": LABELS, "numTraining": n_labeled,
            "training": training, "test": test}
    (root / "dataset.json").write_text(json.dumps(desc, indent=1), encoding="utf-8")
    return root


@pytest.fixture
def msd(tmp_path: Path) -> Path:
    return write_msd(tmp_path / "msd")


@pytest.fixture
def nnunet(tmp_path: Path) -> Path:
    """An nnU-Net v2 raw dataset with two channels (_0000, _0001)."""
    root = tmp_path / "Dataset001_Tiny"
    rng = np.random.default_rng(1)
    for i in range(3):
        img, lab = tiny_case(rng)
        for c in range(2):
            write_nifti(root / "imagesTr" / f"tiny_{i:03d}_{c:04d}.nii.gz", img + c, tiny_affine())
        write_nifti(root / "labelsTr" / f"tiny_{i:03d}.nii.gz", lab, tiny_affine())
    img, _ = tiny_case(rng)
    for c in range(2):
        write_nifti(root / "imagesTs" / f"tiny_100_{c:04d}.nii.gz", img, tiny_affine())
    desc = {"channel_names": {"0": "T1", "1": "T2"},
            "labels": {"background": 0, "spleen": 1, "right kidney": 2, "left kidney": 3},
            "numTraining": 3, "file_ending": ".nii.gz"}
    (root / "dataset.json").write_text(json.dumps(desc), encoding="utf-8")
    return root


def run_study(spec_text: str, folder: Path, capsys) -> tuple[Path, str, dict]:
    """Write a study spec into ``folder``, run it there (MEDMIM_NO_PROGRESS set by the caller) and return the
    output folder, the log and results.json."""
    from medmim.cli import main

    name = next(line.split(":", 1)[1].strip() for line in spec_text.splitlines() if line.startswith("name:"))
    spec = folder / f"{name}.yaml"
    spec.write_text(spec_text, encoding="utf-8")
    out = folder / "study"
    assert main(["study", str(spec), "--out", str(out)]) == 0
    return out, capsys.readouterr().out, json.loads((out / "results.json").read_text(encoding="utf-8"))
