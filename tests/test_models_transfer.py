"""Weight transfer into UNETR (reports, failures, position embeddings), MONAI interop, safe files."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from monai.networks.nets import UNETR as MonaiUNETR
from monai.networks.nets import MaskedAutoEncoderViT, ViT, ViTAutoEnc

from medmim.config import config_from_dict, load_config
from medmim.errors import MedmimError
from medmim.models import (
    MAE3D,
    UNETR,
    SimCLR3D,
    SimMIM3D,
    ViT3D,
    build_pretrainer,
    encoder_to_monai_vit,
    load_encoder,
    load_pretrained,
    load_weights,
    monai_to_encoder,
    read_checkpoint,
    save_weights,
)
from medmim.models.layers import interpolate_pos_embed, sincos_pos_embed_3d
from medmim.models.transfer import upgrade_legacy_state

TINY = dict(in_channels=1, hidden_size=48, num_heads=4, mlp_dim=96)


def tiny_vit(**kw) -> ViT3D:
    args = dict(TINY, img_size=32, patch_size=8, num_layers=4)
    args.update(kw)
    return ViT3D(**args)


def tiny_unetr(**kw) -> UNETR:
    return UNETR(encoder=tiny_vit(**kw), num_classes=3, feature_size=4)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.mark.parametrize("make", [
    lambda: MAE3D(encoder=tiny_vit(), decoder_dim=32, decoder_depth=1, decoder_heads=4),
    lambda: SimMIM3D(encoder=tiny_vit()),
    lambda: SimCLR3D(encoder=tiny_vit(), proj_dim=16),
])
def test_full_transfer_from_each_pretrainer(make):
    pretrainer = make()
    unetr = tiny_unetr()
    report = load_pretrained(unetr, pretrainer.state_dict())
    expected = set(unetr.vit.state_dict())
    assert report.complete and not report.missing
    assert set(report.loaded) | set(report.recomputed) == expected
    assert report.recomputed == ["pos_embed"]  # sin-cos: rebuilt, not read
    head = {k for k in pretrainer.state_dict() if not k.startswith("encoder.")}
    assert set(report.ignored) == head and head
    assert "all 53 encoder tensors loaded" in report.summary()
    for k, v in pretrainer.encoder.state_dict().items():
        assert torch.equal(unetr.vit.state_dict()[k], v), k


def test_wrong_shape_raises():
    mae = MAE3D(encoder=tiny_vit(mlp_dim=64), decoder_dim=32, decoder_depth=1, decoder_heads=4)
    with pytest.raises(MedmimError, match=r"wrong shape: encoder\.blocks\.0\.mlp\.fc1\.weight \[64, 48\]"):
        load_pretrained(tiny_unetr(), mae.state_dict())
    with pytest.raises(MedmimError, match="wrong shape"):  # another patch size: the patch embedding differs
        load_pretrained(tiny_unetr(), MAE3D(encoder=tiny_vit(patch_size=16), decoder_depth=0).state_dict(),
                        partial=True)


def test_partial_load_raises_unless_allowed():
    shallow = SimCLR3D(encoder=tiny_vit(num_layers=2), proj_dim=16)
    unetr = tiny_unetr()
    before = {k: v.clone() for k, v in unetr.vit.state_dict().items()}
    with pytest.raises(MedmimError, match=r"only 28 of 53 encoder tensors would load.*partial=True"):
        load_pretrained(unetr, shallow.state_dict())
    for k, v in unetr.vit.state_dict().items():  # a refused load changes nothing
        assert torch.equal(v, before[k])
    report = load_pretrained(unetr, shallow.state_dict(), partial=True)
    assert not report.complete
    assert sorted({k.split(".")[1] for k in report.missing}) == ["2", "3"] and len(report.missing) == 24
    assert "PARTIAL load, 28 of 53" in report.summary()
    assert "missing (24, left at initialisation): blocks.[2-3].* (24)" in report.summary()
    assert torch.equal(unetr.vit.blocks[0].attn.qkv.weight, shallow.encoder.blocks[0].attn.qkv.weight)


def test_deeper_checkpoint_encoder_raises_unless_partial():
    deep = SimCLR3D(encoder=tiny_vit(num_layers=4), proj_dim=16)
    shallow = tiny_vit(num_layers=2)
    with pytest.raises(MedmimError, match=r"does not fit whole, 24 of its tensors.*encoder\.blocks\.\[2-3\]"):
        load_encoder(shallow, deep.state_dict())
    report = load_encoder(shallow, deep.state_dict(), partial=True)
    assert not report.complete and not report.missing and len(report.unused_encoder) == 24
    assert "projector.0.weight" in report.ignored and "projector.0.weight" not in report.unused_encoder


def test_no_encoder_at_all_raises_even_if_partial():
    with pytest.raises(MedmimError, match="no encoder tensor"):
        load_pretrained(tiny_unetr(), {"foo.weight": torch.zeros(3)}, partial=True)


def test_learnable_pos_embed_is_interpolated_when_sizes_differ(tmp_path):
    # pretrained on 32x32x48 (grid 4x4x6: not a cube, so the grid must come from the stored config)
    cfg = load_config("mae-tiny", ["model.img_size=[32,32,48]", "model.pos_embed=learnable"])
    mae = build_pretrainer(cfg)
    path = save_weights(tmp_path / "mae.safetensors", mae, config=cfg)
    unetr = tiny_unetr(img_size=(48, 32, 32), pos_embed="learnable")  # fine-tune on grid 6x4x4
    report = load_pretrained(unetr, path)
    assert report.complete and "pos_embed" in report.loaded
    assert report.interpolated == ["pos_embed [4, 4, 6] -> [6, 4, 4] (trilinear)"]
    want = interpolate_pos_embed(mae.encoder.pos_embed.detach(), (4, 4, 6), (6, 4, 4))
    torch.testing.assert_close(unetr.vit.pos_embed.detach(), want)
    assert "interpolated: pos_embed" in report.summary()
    # without a config: the same token count is taken as the same grid, and the report says so...
    report = load_pretrained(tiny_unetr(img_size=(48, 32, 32), pos_embed="learnable"), mae.state_dict())
    assert not report.interpolated and "pretraining grid unknown" in report.summary()
    # ...and another, non-cubic count cannot be guessed
    with pytest.raises(MedmimError, match="cannot tell the token grid"):
        load_pretrained(tiny_unetr(img_size=(48, 48, 32), pos_embed="learnable"), mae.state_dict())
    # a cubic pretraining grid can: 32^3 (4x4x4) -> 48x48x32 (6x6x4)
    cube = build_pretrainer(load_config("mae-tiny", ["model.pos_embed=learnable"]))
    report = load_pretrained(tiny_unetr(img_size=(48, 48, 32), pos_embed="learnable"), cube.state_dict())
    assert report.interpolated == ["pos_embed [4, 4, 4] -> [6, 6, 4] (trilinear)"]


def test_sincos_pos_embed_is_recomputed_for_the_new_size():
    mae = MAE3D(encoder=tiny_vit(img_size=32), decoder_depth=0)
    unetr = tiny_unetr(img_size=(48, 48, 32))
    report = load_pretrained(unetr, mae.state_dict())
    assert report.complete and report.recomputed == ["pos_embed"] and not report.interpolated
    torch.testing.assert_close(unetr.vit.pos_embed, sincos_pos_embed_3d((6, 6, 4), 48))
    # a learned table that cannot be used is said so
    learned = load_config("mae-tiny", ["model.pos_embed=learnable"])
    report = load_encoder(tiny_vit(), build_pretrainer(learned).state_dict(), config=learned.to_dict())
    assert "learned pos_embed is not used" in report.summary()


# --- MONAI interop ---------------------------------------------------------------------------


@pytest.mark.parametrize("pos_embed", ["sincos", "learnable"])
@pytest.mark.parametrize("qkv_bias", [True, False])
def test_export_loads_strictly_into_monai_vit_with_same_features(pos_embed, qkv_bias):
    enc = tiny_vit(pos_embed=pos_embed, qkv_bias=qkv_bias, img_size=(32, 32, 16)).eval()
    monai_vit = ViT(in_channels=1, img_size=(32, 32, 16), patch_size=8, hidden_size=48, mlp_dim=96, num_layers=4,
                    num_heads=4, proj_type="conv", pos_embed_type=pos_embed, classification=False,
                    qkv_bias=qkv_bias).eval()
    monai_vit.load_state_dict(encoder_to_monai_vit(enc.state_dict()), strict=True)
    x = torch.randn(2, 1, 32, 32, 16)
    with torch.no_grad():
        ours, ours_hidden = enc(x, return_hidden=True)
        theirs, theirs_hidden = monai_vit(x)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)
    for a, b in zip(ours_hidden, theirs_hidden, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_export_of_a_unetr_or_pretrainer_loads_into_monai_unetr_vit():
    ours = UNETR(encoder=tiny_vit(patch_size=16, num_layers=12), num_classes=3, feature_size=4)
    monai_unetr = MonaiUNETR(in_channels=1, out_channels=3, img_size=32, feature_size=4, hidden_size=48,
                             mlp_dim=96, num_heads=4, qkv_bias=True)
    monai_unetr.vit.load_state_dict(encoder_to_monai_vit(ours.state_dict()), strict=True)
    mae = MAE3D(encoder=tiny_vit(patch_size=16, num_layers=12), decoder_depth=0)
    monai_unetr.vit.load_state_dict(encoder_to_monai_vit(mae.state_dict()), strict=True)


def test_monai_import_round_trips():
    enc = tiny_vit(pos_embed="learnable").eval()
    monai_vit = ViT(in_channels=1, img_size=32, patch_size=8, hidden_size=48, mlp_dim=96, num_layers=4,
                    num_heads=4, qkv_bias=True).eval()
    monai_vit.load_state_dict(encoder_to_monai_vit(enc.state_dict()), strict=True)
    back = monai_to_encoder(monai_vit.state_dict())
    assert back.keys() == enc.state_dict().keys()
    for k, v in enc.state_dict().items():
        assert torch.equal(back[k], v), k
    # and a MONAI-initialised ViT comes in with the same features
    fresh = ViT(in_channels=1, img_size=32, patch_size=8, hidden_size=48, mlp_dim=96, num_layers=4, num_heads=4,
                qkv_bias=False, save_attn=True).eval()  # save_attn: MONAI's explicit-softmax path
    enc2 = tiny_vit(qkv_bias=False, pos_embed="learnable").eval()
    enc2.load_state_dict(monai_to_encoder(fresh.state_dict()), strict=True)
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(enc2(x), fresh(x)[0], rtol=1e-4, atol=1e-5)


def test_monai_unetr_vitautoenc_and_mae_states_import():
    args = dict(in_channels=1, img_size=32, hidden_size=48, mlp_dim=96, num_heads=4, qkv_bias=True)
    unetr = MonaiUNETR(out_channels=3, feature_size=4, **args)
    report = load_pretrained(tiny_unetr(patch_size=16, num_layers=12, pos_embed="learnable"), unetr.state_dict())
    assert report.complete and "vit.blocks.0.norm_cross_attn.weight" in report.ignored
    assert "encoder1.layer.conv1.conv.weight" in report.ignored

    autoenc = ViTAutoEnc(patch_size=16, num_layers=2, **args)
    enc = tiny_vit(patch_size=16, num_layers=2, pos_embed="learnable")
    enc.load_state_dict(monai_to_encoder(autoenc.state_dict()), strict=True)

    mae = MaskedAutoEncoderViT(patch_size=16, num_layers=2, decoder_hidden_size=48, decoder_num_layers=1,
                               decoder_num_heads=4, **args)
    enc.load_state_dict(monai_to_encoder(mae.state_dict()), strict=True)
    assert torch.equal(enc.norm.weight, mae.blocks[2].weight)
    report = load_encoder(enc, mae.state_dict())
    assert report.complete and "cls_token" in report.ignored and "decoder_pred.weight" in report.ignored


def test_monai_state_without_qkv_bias_names_the_setting():
    monai_vit = ViT(in_channels=1, img_size=32, patch_size=8, hidden_size=48, mlp_dim=96, num_layers=4, num_heads=4)
    with pytest.raises(MedmimError, match="qkv_bias=False"):
        load_encoder(tiny_vit(), monai_vit.state_dict())


# --- files -------------------------------------------------------------------------------------


@dataclass
class NotAWeight:
    payload: str = "anything"


def test_safetensors_round_trip_with_config(tmp_path):
    cfg = load_config("simmim-tiny")
    model = build_pretrainer(cfg)
    path = save_weights(tmp_path / "out" / "w.safetensors", model, config=cfg)
    state, config = load_weights(path)
    assert config == cfg.to_dict()
    assert state.keys() == model.state_dict().keys()
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    rebuilt = build_pretrainer(load_config("simmim-tiny"))
    rebuilt.load_state_dict(state, strict=True)
    assert not list(tmp_path.glob("out/.tmp-*"))


def test_torch_checkpoints_are_read_weights_only(tmp_path):
    cfg = load_config("mae-tiny")
    mae = build_pretrainer(cfg)
    good = tmp_path / "last.pt"
    torch.save({"model": mae.state_dict(), "config": cfg.to_dict(), "step": 3}, good)
    ckpt = read_checkpoint(good)
    assert ckpt.config == cfg.to_dict() and ckpt.state.keys() == mae.state_dict().keys()
    assert load_pretrained(tiny_unetr(), good).complete

    evil = tmp_path / "evil.pt"
    torch.save({"model": mae.state_dict(), "extra": NotAWeight()}, evil)
    with pytest.raises(MedmimError, match="evil.pt: not a weights-only checkpoint"):
        read_checkpoint(evil)
    with pytest.raises(MedmimError, match="missing.pt: checkpoint not found"):
        read_checkpoint(tmp_path / "missing.pt")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not safetensors")
    with pytest.raises(MedmimError, match="bad.safetensors"):
        load_pretrained(tiny_unetr(), bad)


# --- files written before the per-method pretrain sections and SimMIM's decoder_* names -------------

LEGACY = Path(__file__).parent / "data" / "legacy"  # see its README: which commit wrote them, and how
# the loss of each legacy model on the input below, computed with the code that wrote the files
LEGACY_LOSS = {"mae": 0.35863152146339417, "simmim": 0.4972947835922241}


def _legacy_loss(model) -> float:
    x = torch.rand((2, 1, 16, 16, 16), generator=torch.Generator().manual_seed(0))
    mask = model.random_mask(2, (2, 2, 2), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model.eval()(x, mask=mask).loss.item()


@pytest.mark.parametrize("method", ["mae", "simmim"])
def test_an_old_run_folders_weights_load_strictly_and_give_the_same_loss(method):
    from safetensors.torch import load_file

    path = LEGACY / method / "model.safetensors"
    on_disk = load_file(str(path))
    assert any(k.startswith("head_") for k in on_disk) == (method == "simmim")  # SimMIM's former names
    ckpt = read_checkpoint(path)
    assert not any(k.startswith("head_") for k in ckpt.state)
    model = build_pretrainer(config_from_dict(ckpt.config))
    model.load_state_dict(ckpt.state, strict=True)
    assert _legacy_loss(model) == pytest.approx(LEGACY_LOSS[method], rel=1e-6, abs=0)
    state, _ = load_weights(path)
    assert state.keys() == model.state_dict().keys()
    # the file as it is (an old run resumed hands its state to load_state_dict as stored) loads too
    again = build_pretrainer(load_config(LEGACY / method / "config.yaml"))
    again.load_state_dict(on_disk, strict=True)
    assert _legacy_loss(again) == _legacy_loss(model)
    # and its encoder goes into UNETR
    cfg = load_config(LEGACY / method / "config.yaml", ["task=finetune", "model.feature_size=4"])
    unetr = UNETR(encoder=ViT3D(in_channels=1, img_size=16, patch_size=8, hidden_size=8, num_layers=4, num_heads=2,
                                mlp_dim=16), num_classes=cfg.model.num_classes, feature_size=4)
    report = load_pretrained(unetr, path)
    assert report.complete and "encoder.blocks.0.attn.qkv.weight" not in report.ignored
    assert "decoder_pred.weight" in report.ignored and not any(k.startswith("head_") for k in report.ignored)
    assert torch.equal(unetr.vit.blocks[0].attn.qkv.weight, model.encoder.blocks[0].attn.qkv.weight)


def test_an_old_simmim_torch_checkpoint_reads_with_todays_names(tmp_path):
    from safetensors.torch import load_file

    legacy = load_file(str(LEGACY / "simmim" / "model.safetensors"))
    last = tmp_path / "last.pt"
    torch.save({"model": legacy, "config": read_checkpoint(LEGACY / "simmim" / "model.safetensors").config}, last)
    ckpt = read_checkpoint(last)
    assert "decoder_blocks.0.attn.qkv.weight" in ckpt.state and not any(k.startswith("head_") for k in ckpt.state)
    model = build_pretrainer(config_from_dict(ckpt.config))
    model.load_state_dict(ckpt.state, strict=True)
    assert _legacy_loss(model) == pytest.approx(LEGACY_LOSS["simmim"], rel=1e-6, abs=0)
    # only a SimMIM state is renamed: another model with a head_pred (and no mask token) is left alone
    other = {"head_pred.weight": torch.zeros(2, 2), "blocks.0.weight": torch.zeros(2)}
    assert upgrade_legacy_state(other) is other
