"""Dataset formats and deterministic splits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from medmim.data.datasets import get_split, load_dataset, make_splits, splits_path
from medmim.data.io import write_nifti
from medmim.errors import MedmimError
from tests.conftest import tiny_affine, tiny_case, write_msd

import numpy as np


def test_msd_dataset(msd: Path) -> None:
    ds = load_dataset(msd)
    assert ds.format == "msd"
    assert [c.case_id for c in ds.labeled] == ["case_000", "case_001", "case_002"]
    assert [c.case_id for c in ds.unlabeled] == ["case_003", "case_004"]  # 'test' entries: pretraining data
    assert all(c.images[0].is_file() and c.label.is_file() for c in ds.labeled)
    assert ds.labels[2] == "right kidney" and ds.modalities == ["CT"]
    assert ds.lateral_pairs == [(2, 3)]  # guessed from "right kidney"/"left kidney"
    # the dataset.json path itself works too
    assert [c.case_id for c in load_dataset(msd / "dataset.json").cases] == [c.case_id for c in ds.cases]


def test_nnunet_dataset(nnunet: Path) -> None:
    ds = load_dataset(nnunet)
    assert ds.format == "nnunet" and ds.channels == 2
    assert [c.case_id for c in ds.labeled] == ["tiny_000", "tiny_001", "tiny_002"]
    assert [p.name for p in ds.labeled[0].images] == ["tiny_000_0000.nii.gz", "tiny_000_0001.nii.gz"]
    assert ds.labeled[0].label.name == "tiny_000.nii.gz"
    assert [c.case_id for c in ds.unlabeled] == ["tiny_100"]
    assert ds.labels == {0: "background", 1: "spleen", 2: "right kidney", 3: "left kidney"}
    (nnunet / "imagesTr" / "tiny_001_0001.nii.gz").unlink()
    with pytest.raises(MedmimError, match="case 'tiny_001' has channels \\[0\\], expected 0..1"):
        load_dataset(nnunet)


def test_plain_folder_is_unlabeled(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for i in range(3):
        write_nifti(tmp_path / "scans" / f"s{i}.nii.gz", tiny_case(rng)[0], tiny_affine())
    (tmp_path / "scans" / "README.txt").write_text("not an image", encoding="utf-8")
    ds = load_dataset(tmp_path / "scans")
    assert ds.format == "folder" and not ds.labeled
    assert [c.case_id for c in ds.unlabeled] == ["s0", "s1", "s2"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(MedmimError, match="empty: no images found"):
        load_dataset(tmp_path / "empty")


def test_btcv_style_datalist_keeps_its_validation(tmp_path: Path) -> None:
    root = write_msd(tmp_path / "btcv", n_labeled=4, n_unlabeled=1)
    datalist = {
        "labels": {"0": "background", "1": "spleen", "2": "right kidney", "3": "left kidney"},
        "training": [{"image": f"imagesTr/case_{i:03d}.nii.gz", "label": f"labelsTr/case_{i:03d}.nii.gz"} for i in (0, 1, 2)],
        "validation": [{"image": "imagesTr/case_003.nii.gz", "label": "labelsTr/case_003.nii.gz"}],
    }
    (root / "dataset_0.json").write_text(json.dumps(datalist), encoding="utf-8")
    ds = load_dataset(root / "dataset_0.json")
    assert ds.format == "datalist" and len(ds.labeled) == 4
    train, val = get_split(ds)
    assert val == ["case_003"] and train == ["case_000", "case_001", "case_002"]


def test_splits_are_deterministic_and_written_beside_the_data(tmp_path: Path) -> None:
    ids = [f"c{i:02d}" for i in range(11)]
    a, b = make_splits(ids, 5, seed=3), make_splits(list(reversed(ids)), 5, seed=3)
    assert a == b
    assert make_splits(ids, 5, seed=4) != a
    for fold in a:  # each fold partitions the cases
        assert sorted(fold["train"] + fold["val"]) == ids and not set(fold["train"]) & set(fold["val"])
    assert sorted(i for f in a for i in f["val"]) == ids  # every case validated exactly once

    root = write_msd(tmp_path / "d", n_labeled=6, n_unlabeled=0)
    ds = load_dataset(root)
    train, val = get_split(ds, fold=1, num_folds=3, seed=0)
    written = json.loads(splits_path(ds).read_text(encoding="utf-8"))
    assert len(written) == 3 and written[1] == {"train": train, "val": val}
    # an existing splits file wins over the seed, so runs stay comparable
    assert get_split(ds, fold=1, num_folds=3, seed=99) == (train, val)
    with pytest.raises(MedmimError, match="data.fold=3 but splits_final.json has 3 folds"):
        get_split(ds, fold=3)
    splits_path(ds).write_text(json.dumps([{"train": ["ghost"], "val": ["case_000"]}]), encoding="utf-8")
    with pytest.raises(MedmimError, match="names cases not in the dataset \\(ghost\\)"):
        get_split(ds)


@pytest.mark.parametrize("content, message", [
    ("{not json", "invalid JSON"),
    ("[1, 2]", "must be a JSON object"),
    ('{"foo": 1}', "neither a Decathlon"),
    ('{"training": 5}', "'training' must be a list"),
    ('{"training": [{"label": "x.nii.gz"}]}', "training entry 0 must be an object with an 'image' key"),
    ('{"training": [], "labels": {"zero": "background"}}', "label key 'zero' is not an integer"),
    ('{"training": [], "labels": {"0": "bg", "1": "a"}, "modality": {"1": "CT"}}', "must number channels"),
])
def test_invalid_dataset_json_is_named(tmp_path: Path, content: str, message: str) -> None:
    (tmp_path / "dataset.json").write_text(content, encoding="utf-8")
    with pytest.raises(MedmimError, match=message) as e:
        load_dataset(tmp_path)
    assert "dataset.json" in str(e.value)
