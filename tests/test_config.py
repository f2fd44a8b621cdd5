"""Typed configs: presets, YAML files with a base, dotted overrides, and errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from medmim.config import Config, load_config, preset_names, save_config
from medmim.errors import MedmimError


def test_every_preset_loads_and_paper_preset_is_vit_b16() -> None:
    names = preset_names()
    for required in ("mae-tiny", "simmim-tiny", "simclr-tiny", "unetr-tiny", "mae-vitb16", "unetr-vitb16"):
        assert required in names
    for n in names:
        assert isinstance(load_config(n), Config)
    paper = load_config("mae-vitb16")
    assert (paper.model.hidden_size, paper.model.num_layers, paper.model.num_heads, paper.model.mlp_dim) == (768, 12, 12, 3072)
    assert paper.model.patch_size == (16, 16, 16) and paper.data.roi_size == (96, 96, 96)
    assert paper.data.hu_window == (-175.0, 250.0) and paper.data.spacing == (1.5, 1.5, 2.0)
    assert load_config("simmim-vitb16").pretrain.method == "simmim"
    assert load_config("unetr-vitb16").task == "finetune"


def test_overrides_are_typed() -> None:
    cfg = load_config("mae-tiny", ["data.path=/data/btcv", "run.dir=/tmp/r", "train.max_steps=100",
                                   "train.lr=3e-4", "data.roi_size=[48,48,32]", "pretrain.mask_patch_size=16",
                                   "train.compile=true", "resume=auto", "model.pretrained=/ck/last.safetensors"])
    assert cfg.data.path == ["/data/btcv"]
    assert cfg.run.dir == "/tmp/r"
    assert cfg.train.max_steps == 100 and isinstance(cfg.train.max_steps, int)
    assert cfg.train.lr == pytest.approx(3e-4)
    assert cfg.data.roi_size == (48, 48, 32)
    assert cfg.pretrain.mask_patch_size == (16, 16, 16)
    assert cfg.train.compile is True and cfg.resume == "auto"
    assert cfg.model.pretrained == "/ck/last.safetensors"
    assert load_config("mae-tiny", ["data.path=[/a, /b]"]).data.path == ["/a", "/b"]


@pytest.mark.parametrize("override, message", [
    ("train.max_step=3", "unknown key 'train.max_step'"),
    ("trian.lr=1", "unknown key 'trian'"),
    ("train.max_steps=abc", "'train.max_steps'"),
    ("pretrain.mask_ratio=1.5", "'pretrain.mask_ratio'"),
    ("pretrain.method=byol", "'pretrain.method'"),
    ("data.hu_window=[250,-175]", "'data.hu_window'"),
    ("model.num_heads=5", "divisible by num_heads"),
    ("pretrain.mask_patch_size=12", "multiple of model.patch_size"),
    ("train.max_steps", "must look like key=value"),
    ("train.lr.x=1", "'lr' is a value, not a section"),
])
def test_bad_overrides_name_the_key(override: str, message: str) -> None:
    with pytest.raises(MedmimError, match=message.replace("[", r"\[").replace(".", r"\.")):
        load_config("mae-tiny", [override])


def test_yaml_file_with_base_and_errors(tmp_path: Path) -> None:
    f = tmp_path / "mine.yaml"
    f.write_text("base: mae-tiny\npretrain:\n  mask_ratio: 0.6\n")
    cfg = load_config(f)
    assert cfg.pretrain.mask_ratio == 0.6 and cfg.model.hidden_size == load_config("mae-tiny").model.hidden_size
    with pytest.raises(MedmimError, match="unknown preset 'nope'"):
        load_config("nope")
    with pytest.raises(MedmimError, match="config file not found"):
        load_config(tmp_path / "absent.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(MedmimError, match=r"bad.yaml: invalid YAML \(line"):
        load_config(bad)
    loop = tmp_path / "loop.yaml"
    loop.write_text(f"base: {loop}\n")
    with pytest.raises(MedmimError, match="loops back"):
        load_config(loop)
    bad_key = tmp_path / "k.yaml"
    bad_key.write_text("model:\n  hiden_size: 8\n")
    with pytest.raises(MedmimError, match="k.yaml: unknown key 'model.hiden_size'"):
        load_config(bad_key)


def test_resolved_config_round_trips(tmp_path: Path) -> None:
    cfg = load_config("unetr-tiny", ["train.max_steps=7", "data.path=/x"])
    p = save_config(cfg, tmp_path / "run" / "config.yaml")
    assert load_config(p) == cfg
