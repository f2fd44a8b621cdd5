"""Several datasets at once, each prepared with its own intensity preset (data.modality=auto)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from medmim.cli import main
from medmim.config import load_config
from medmim.models.rebuild import config_of
from medmim.data.prepare import PrepareSettings, dataset_modality
from medmim.data.sampling import open_cache
from medmim.errors import MedmimError
from medmim.models.transfer import read_checkpoint
from tests.conftest import write_msd

FAST = ["train.log_every=1", "train.val_every=2", "train.preview_every=2", "train.ckpt_every=2", "data.num_workers=0"]


def _as_mri(root: Path, names=("T1",)) -> Path:
    desc = json.loads((root / "dataset.json").read_text(encoding="utf-8"))
    desc["modality"] = {str(i): n for i, n in enumerate(names)}
    (root / "dataset.json").write_text(json.dumps(desc), encoding="utf-8")
    return root


def test_modality_is_read_from_each_dataset(tmp_path: Path) -> None:
    ct = write_msd(tmp_path / "ct", n_labeled=2, n_unlabeled=0)
    mri = _as_mri(write_msd(tmp_path / "mri", n_labeled=2, n_unlabeled=0))
    assert dataset_modality(ct) == "ct" and dataset_modality(mri) == "mri"
    cfg = load_config("mae-tiny", [])
    assert cfg.data.modality == "auto"
    assert PrepareSettings.from_config(cfg.data, mri).modality == "mri"
    assert PrepareSettings.from_config(load_config("mae-tiny", ["data.modality=ct"]).data, mri).modality == "ct"
    mixed = _as_mri(write_msd(tmp_path / "mixed", n_labeled=2, n_unlabeled=0), ("CT", "T2"))
    with pytest.raises(MedmimError, match="mix CT"):
        dataset_modality(mixed)


def test_pretraining_on_ct_and_mri_prepares_each_with_its_preset(tmp_path: Path, capsys) -> None:
    ct = write_msd(tmp_path / "ct", n_labeled=2, n_unlabeled=1, shape=(24, 22, 20))
    mri = _as_mri(write_msd(tmp_path / "mri", n_labeled=2, n_unlabeled=1, shape=(24, 22, 20), seed=3))
    cache_dir = tmp_path / "caches"
    run = tmp_path / "pre"
    code = main(["pretrain", "mae-tiny", f"data.path=[{ct},{mri}]", f"data.cache_dir={cache_dir}",
                 f"run.dir={run}", "train.max_steps=2"] + FAST)
    assert code == 0, capsys.readouterr().err
    presets = {open_cache(p).manifest["settings"]["modality"]: p for p in cache_dir.iterdir()}
    assert set(presets) == {"ct", "mri"}
    # CT: HU window scaled to [0, 1]; MRI: z-score over the foreground (mean 0 there, values below 0)
    ct_img = np.asarray(open_cache(presets["ct"]).case("case_000").image(), dtype=np.float32)
    mri_cache = open_cache(presets["mri"])
    mri_img = np.asarray(mri_cache.case(mri_cache.case_ids()[0]).image(), dtype=np.float32)
    assert ct_img.min() >= 0.0 and ct_img.max() <= 1.0
    assert mri_img.min() < 0.0


def test_fine_tuning_records_the_preprocessing_its_data_had(tmp_path: Path, capsys) -> None:
    mri = _as_mri(write_msd(tmp_path / "mri", n_labeled=4, n_unlabeled=0, shape=(24, 22, 20)))
    run = tmp_path / "ft"
    code = main(["finetune", "unetr-tiny", f"data.path={mri}", f"data.cache_dir={tmp_path / 'c'}", f"run.dir={run}",
                 "train.max_steps=2"] + FAST)
    assert code == 0, capsys.readouterr().err
    ckpt = read_checkpoint(run / "checkpoints" / "last.pt")
    assert ckpt.data["preprocessing"]["modality"] == "mri"  # recorded beside the config, not written into it
    assert config_of(ckpt).data.modality == "mri"  # predict will z-score, as training did
