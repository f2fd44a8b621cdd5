"""Typed configs: presets, YAML files with a base, dotted overrides, and errors that name the key."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import yaml

from medmim.config import (
    Config,
    MAEConfig,
    SimCLRConfig,
    SimMIMConfig,
    config_from_dict,
    load_config,
    preset_names,
    save_config,
)
from medmim.errors import MedmimError
from medmim.models import MAE3D, SimCLR3D, SimMIM3D, build_pretrainer

LEGACY = Path(__file__).parent / "data" / "legacy"  # run folders written before the per-method sections


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
    assert cfg.pretrain.mae.mask_patch_size == (16, 16, 16)
    assert cfg.train.compile is True and cfg.resume == "auto"
    assert cfg.model.pretrained == "/ck/last.safetensors"
    assert load_config("mae-tiny", ["data.path=[/a, /b]"]).data.path == ["/a", "/b"]


@pytest.mark.parametrize("override, message", [
    ("train.max_step=3", "unknown key 'train.max_step'"),
    ("trian.lr=1", "unknown key 'trian'"),
    ("train.max_steps=abc", "'train.max_steps'"),
    ("pretrain.mask_ratio=1.5", "'pretrain.mae.mask_ratio'"),  # a flat key is the active method's
    ("pretrain.simmim.mask_ratio=1.5", "'pretrain.simmim.mask_ratio'"),
    ("pretrain.method=byol", "'pretrain.method'"),
    ("data.hu_window=[250,-175]", "'data.hu_window'"),
    ("model.num_heads=5", "divisible by num_heads"),
    ("pretrain.mask_patch_size=12", "pretrain.mae.mask_patch_size [12, 12, 12] must be a multiple of model.patch_size"),
    ("pretrain.temperature=0.5", "'pretrain.temperature' is not a setting of the method mae"),
    ("pretrain.mae.temperature=0.5", "unknown key 'pretrain.mae.temperature'"),
    ("train.max_steps", "must look like key=value"),
    ("train.lr.x=1", "'lr' is a value, not a section"),
])
def test_bad_overrides_name_the_key(override: str, message: str) -> None:
    with pytest.raises(MedmimError, match=message.replace("[", r"\[").replace(".", r"\.")):
        load_config("mae-tiny", [override])


def test_yaml_file_with_base_and_errors(tmp_path: Path) -> None:
    f = tmp_path / "mine.yaml"
    f.write_text("base: mae-tiny\npretrain:\n  mask_ratio: 0.6\n", encoding="utf-8")
    cfg = load_config(f)
    assert cfg.pretrain.mae.mask_ratio == 0.6 and cfg.model.hidden_size == load_config("mae-tiny").model.hidden_size
    with pytest.raises(MedmimError, match="unknown preset 'nope'"):
        load_config("nope")
    with pytest.raises(MedmimError, match="config file not found"):
        load_config(tmp_path / "absent.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n", encoding="utf-8")
    with pytest.raises(MedmimError, match=r"bad.yaml: invalid YAML \(line"):
        load_config(bad)
    loop = tmp_path / "loop.yaml"
    loop.write_text(f"base: {loop}\n", encoding="utf-8")
    with pytest.raises(MedmimError, match="loops back"):
        load_config(loop)
    bad_key = tmp_path / "k.yaml"
    bad_key.write_text("model:\n  hiden_size: 8\n", encoding="utf-8")
    with pytest.raises(MedmimError, match="k.yaml: unknown key 'model.hiden_size'"):
        load_config(bad_key)


def test_resolved_config_round_trips(tmp_path: Path) -> None:
    cfg = load_config("unetr-tiny", ["train.max_steps=7", "data.path=/x"])
    p = save_config(cfg, tmp_path / "run" / "config.yaml")
    assert load_config(p) == cfg


# --- the pretrain section: one sub-section per method ----------------------------------------

@pytest.mark.parametrize("section, cls, not_configured", [
    (MAEConfig, MAE3D, {"encoder", "decoder_mlp_ratio"}),
    (SimMIMConfig, SimMIM3D, {"encoder", "decoder_mlp_ratio"}),
    (SimCLRConfig, SimCLR3D, {"encoder", "proj_hidden_dim"}),
])
def test_each_method_section_defaults_to_its_model(section, cls, not_configured) -> None:
    params = inspect.signature(cls.__init__).parameters
    fields = section.model_fields
    assert set(fields) == set(params) - {"self"} - not_configured
    for name, field in fields.items():
        default = params[name].default
        assert field.default == default, f"{section.__name__}.{name}: {field.default!r}, {cls.__name__}: {default!r}"


def test_switching_method_takes_that_methods_defaults_not_another_ones_decoder() -> None:
    cfg = load_config("mae-cpu", ["pretrain.method=simmim"])
    assert cfg.pretrain.settings == SimMIMConfig()
    model = build_pretrainer(cfg)
    assert isinstance(model, SimMIM3D) and model.loss_kind == "l1" and len(model.decoder_blocks) == 0
    assert model.mask_patch_size == cfg.model.patch_size  # mask_patch_size None: the ViT patch
    assert load_config("simmim-cpu", ["pretrain.method=mae"]).pretrain.settings == load_config("mae-cpu").pretrain.mae
    assert load_config("mae-cpu", ["pretrain.method=simclr"]).pretrain.settings == SimCLRConfig()


def test_flat_keys_are_the_active_methods_settings(tmp_path: Path) -> None:
    for order in (["pretrain.method=simmim", "pretrain.decoder_depth=2"],
                  ["pretrain.decoder_depth=2", "pretrain.method=simmim"]):
        cfg = load_config("mae-cpu", order)
        assert cfg.pretrain.simmim.decoder_depth == 2 and cfg.pretrain.mae == load_config("mae-cpu").pretrain.mae
    # a flat override beats the preset's nested value; of two overrides of one setting, the last wins
    assert load_config("simmim-tiny", ["pretrain.loss=l2"]).pretrain.simmim.loss == "l2"
    assert load_config("mae-tiny", ["pretrain.mae.mask_ratio=0.5", "pretrain.mask_ratio=0.6"]).pretrain.mae.mask_ratio == 0.6
    assert load_config("mae-tiny", ["pretrain.mask_ratio=0.6", "pretrain.mae.mask_ratio=0.5"]).pretrain.mae.mask_ratio == 0.5
    # a user's file chain in the former flat form means the settings of the method the chain ends with
    mine = tmp_path / "my-mae.yaml"
    mine.write_text("base: mae-tiny\npretrain: {method: mae, mask_ratio: 0.6, decoder_dim: 16}\n", encoding="utf-8")
    (tmp_path / "my-simmim.yaml").write_text(f"base: {mine}\npretrain: {{method: simmim, loss: l1}}\n", encoding="utf-8")
    cfg = load_config(tmp_path / "my-simmim.yaml")
    assert (cfg.pretrain.simmim.mask_ratio, cfg.pretrain.simmim.decoder_dim, cfg.pretrain.simmim.loss) == (0.6, 16, "l1")
    assert cfg.pretrain.mae == load_config("mae-tiny").pretrain.mae
    assert config_from_dict({"pretrain": {"method": "simclr", "temperature": 0.3}}).pretrain.simclr.temperature == 0.3


def test_a_flat_key_of_another_method_is_an_error_naming_it(tmp_path: Path) -> None:
    with pytest.raises(MedmimError, match=r"override 'pretrain.decoder_depth=1': 'pretrain.decoder_depth' is not a "
                                          r"setting of the method simclr \(it belongs in pretrain.mae.decoder_depth or "
                                          r"pretrain.simmim.decoder_depth\)"):
        load_config("simclr-tiny", ["pretrain.decoder_depth=1"])
    f = tmp_path / "mine.yaml"
    f.write_text("base: mae-tiny\npretrain:\n  proj_dim: 64\n", encoding="utf-8")
    with pytest.raises(MedmimError, match=r"mine.yaml: 'pretrain.proj_dim' is not a setting of the method mae"):
        load_config(f)
    with pytest.raises(MedmimError, match=r"ckpt: 'pretrain.temperature' is not a setting of the method mae"):
        config_from_dict({"pretrain": {"method": "mae", "mask_ratio": 0.5, "temperature": 0.2}}, where="ckpt")
    f.write_text("base: mae-tiny\npretrain:\n  mask_ratio: 0.5\n  mae: {mask_ratio: 0.6}\n", encoding="utf-8")
    with pytest.raises(MedmimError, match=r"'pretrain.mask_ratio' and 'pretrain.mae.mask_ratio' both given"):
        load_config(f)


@pytest.mark.parametrize("method", ["mae", "simmim"])
def test_an_old_run_folders_config_loads_to_the_same_settings(method: str) -> None:
    from medmim.models.transfer import read_checkpoint

    old = yaml.safe_load((LEGACY / method / "config.yaml").read_text(encoding="utf-8"))
    assert {"mask_ratio", "temperature", "proj_dim"} <= set(old["pretrain"])  # the former flat section, whole
    cfg = load_config(LEGACY / method / "config.yaml")
    assert cfg.pretrain.method == method
    assert cfg.pretrain.settings.model_dump() == dict(
        mask_ratio=0.75, mask_patch_size=(8, 8, 8), decoder_dim=8, decoder_depth=1, decoder_heads=2,
        loss="l2" if method == "mae" else "l1", norm_pix_loss=False)
    assert cfg.pretrain.simclr == SimCLRConfig()  # SimCLR's keys of an MAE/SimMIM run never had an effect: dropped
    # everything else as it was written; settings added since then take their defaults
    new, default = cfg.to_dict(), Config().to_dict()
    for section, values in old.items():
        if section == "pretrain":
            continue
        if not isinstance(values, dict):
            assert new[section] == values
            continue
        assert {k: new[section][k] for k in values} == values
        assert {k: v for k, v in new[section].items() if k not in values} == \
            {k: default[section][k] for k in new[section] if k not in values}
    # the checkpoint's embedded config loads to the same
    assert config_from_dict(read_checkpoint(LEGACY / method / "model.safetensors").config) == cfg


def test_an_old_simclr_dump_drops_the_masked_image_keys() -> None:
    old = yaml.safe_load((LEGACY / "mae" / "config.yaml").read_text(encoding="utf-8"))
    old["pretrain"].update(method="simclr", temperature=0.3, proj_dim=32)
    cfg = config_from_dict(old)
    assert cfg.pretrain.settings == SimCLRConfig(temperature=0.3, proj_dim=32)
    assert cfg.pretrain.mae == MAEConfig() and cfg.pretrain.simmim == SimMIMConfig()
    del old["pretrain"]["norm_pix_loss"]  # not a whole dump: another method's key is an error again
    with pytest.raises(MedmimError, match="'pretrain.mask_ratio' is not a setting of the method simclr"):
        config_from_dict(old)


def test_a_resolved_config_holds_every_methods_section(tmp_path: Path) -> None:
    cfg = load_config("simmim-tiny", ["pretrain.simclr.temperature=0.3"])
    dumped = cfg.to_dict()["pretrain"]
    assert set(dumped) == {"method", "mae", "simmim", "simclr"} and dumped["simclr"]["temperature"] == 0.3
    assert load_config(save_config(cfg, tmp_path / "config.yaml")) == cfg
