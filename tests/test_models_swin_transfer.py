"""Weights in and out of MONAI's 3D Swin transformer (SwinUNETR.swinViT): the layouts read, MONAI's own
``SwinUNETR.load_from`` as a cross-check of the names, export both ways, and strictness."""

from __future__ import annotations

import re

import pytest
import torch
from monai.networks.nets import SwinUNETR
from monai.networks.nets.swin_unetr import SwinTransformer

from medmim.errors import MedmimError
from medmim.models.swin_transfer import (MODEL_SWINVIT_LAYOUT, load_swin_encoder,
                                         swin_encoder_to_model_swinvit, swin_encoder_to_monai)
from medmim.models.transfer import load_pretrained, read_checkpoint, save_weights
from medmim.models.vit import ViT3D

TINY = dict(in_channels=1, out_channels=2, feature_size=12, depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2),
            window_size=4, patch_size=2)
HEADS = ["module.rotation_head.weight", "module.contrastive_head.weight", "module.convTrans3d.weight"]


def tiny_swin_unetr(seed: int = 0, **kw) -> SwinUNETR:
    torch.manual_seed(seed)
    model = SwinUNETR(**{**TINY, **kw})
    with torch.no_grad():  # every float tensor random (LayerNorms start as ones): equal means loaded
        for p in model.parameters():
            p.copy_(torch.randn_like(p))
    return model


def tiny_swin(depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2), seed: int = 0, **kw) -> SwinTransformer:
    torch.manual_seed(seed)
    return SwinTransformer(in_chans=kw.pop("in_chans", 1), embed_dim=kw.pop("embed_dim", 12), window_size=(4, 4, 4),
                           patch_size=(2, 2, 2), depths=depths, num_heads=num_heads, **kw)


def model_swinvit_layout(swin_vit: torch.nn.Module) -> dict:
    """What MONAI's released model_swinvit.pt holds, made from MONAI's own module."""
    state = {"module." + re.sub(r"mlp\.linear([12])\.", r"mlp.fc\1.", k): v.clone()
             for k, v in swin_vit.state_dict().items()}
    for name in HEADS:
        state[name] = torch.randn(4, 8)
    return {"state_dict": state}


def assert_same(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


@pytest.fixture
def source() -> SwinUNETR:
    return tiny_swin_unetr(seed=1)


@pytest.fixture
def swinvit_file(tmp_path, source):
    path = tmp_path / "model_swinvit.pt"
    torch.save(model_swinvit_layout(source.swinViT), path)
    return path


# ---------------------------------------------------------------------------------------------
# MONAI's self-supervised weights (model_swinvit.pt layout)
# ---------------------------------------------------------------------------------------------


def test_model_swinvit_file_loads_whole(swinvit_file, source):
    ckpt = read_checkpoint(swinvit_file)
    assert "module.layers1.0.blocks.0.mlp.fc1.weight" in ckpt.state  # unwrapped from "state_dict"
    target = tiny_swin_unetr(seed=2)
    report = load_swin_encoder(target.swinViT, ckpt.state, source=ckpt.source)

    assert report.complete and not report.recomputed and not report.adapted
    assert sorted(report.loaded) == sorted(target.swinViT.state_dict())
    assert sorted(report.ignored) == sorted(HEADS)
    assert f"layout: {MODEL_SWINVIT_LAYOUT}" in report.notes
    assert any("mlp.fc1" in n for n in report.notes)
    assert str(swinvit_file) in report.summary()
    assert_same(target.swinViT, source.swinViT)

    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        outs, refs = target.swinViT(x), source.swinViT(x)
    assert len(outs) == 5
    for out, ref in zip(outs, refs):
        assert torch.equal(out, ref)


def test_monai_load_from_gives_the_same_tensors(swinvit_file):
    weights = torch.load(swinvit_file, weights_only=True)
    theirs = tiny_swin_unetr(seed=3)
    theirs.load_from(weights)
    ours = tiny_swin_unetr(seed=4)
    load_swin_encoder(ours.swinViT, read_checkpoint(swinvit_file).state)
    assert_same(ours.swinViT, theirs.swinViT)


def test_load_swin_pretrained_reads_the_file(swinvit_file, source):
    target = tiny_swin_unetr(seed=2)
    report = load_pretrained(target, swinvit_file)
    assert report.complete and report.source == str(swinvit_file)
    assert_same(target.swinViT, source.swinViT)


def test_relative_position_index_recomputed_or_checked(source):
    state = model_swinvit_layout(source.swinViT)["state_dict"]
    without = {k: v for k, v in state.items() if not k.endswith("relative_position_index")}
    target = tiny_swin_unetr(seed=2)
    report = load_swin_encoder(target.swinViT, without)
    assert report.complete
    assert report.recomputed == [f"layers{i}.0.blocks.0.attn.relative_position_index" for i in range(1, 5)]
    assert_same(target.swinViT, source.swinViT)  # the index is a function of the window: the same

    other = dict(state)
    key = "module.layers2.0.blocks.0.attn.relative_position_index"
    other[key] = other[key].flip(0)
    with pytest.raises(MedmimError, match=r"relative_position_index.*layers2.*window_size"):
        load_swin_encoder(tiny_swin_unetr().swinViT, other)


# ---------------------------------------------------------------------------------------------
# The other layouts
# ---------------------------------------------------------------------------------------------


def _layouts(m: SwinUNETR) -> dict[str, tuple[dict, str, set]]:
    enc = m.swinViT.state_dict()
    full = m.state_dict()
    others = {k for k in full if not k.startswith("swinViT.")}
    simmim = {**{"encoder." + k: v for k, v in enc.items()}, "mask_token": torch.zeros(1, 1, 12),
              "head.weight": torch.randn(8, 12)}
    dae = {"encoder." + re.sub(r"^(layers\d+\.0\.)", r"\g<1>0.", k): v for k, v in enc.items()}
    dae.update({"encoder.mask_token": torch.zeros(1, 12), "encoder.norm.weight": torch.ones(96),
                "out.conv.conv.weight": torch.randn(1, 12, 1, 1, 1)})
    return {
        "bare": (dict(enc), "bare SwinTransformer", set()),
        "swin_unetr": (dict(full), "Swin UNETR (encoder under 'swinViT.')", others),
        "swin_unetr_ddp": ({"module." + k: v for k, v in full.items()}, "DDP", {"module." + k for k in others}),
        "swin_vit": ({"swin_vit." + k: v for k, v in enc.items()}, "'swin_vit.'", set()),
        "simmim": (simmim, "medmim SimMIM-Swin", {"mask_token", "head.weight"}),
        "simmim_ddp": ({"module." + k: v for k, v in simmim.items()}, "DDP", {"module.mask_token", "module.head.weight"}),
        "dae": (dae, "Disruptive Autoencoders", {"encoder.mask_token", "encoder.norm.weight", "out.conv.conv.weight"}),
    }


@pytest.mark.parametrize("layout", ["bare", "swin_unetr", "swin_unetr_ddp", "swin_vit", "simmim", "simmim_ddp", "dae"])
def test_each_layout_loads_whole(source, layout):
    state, note, ignored = _layouts(source)[layout]
    target = tiny_swin_unetr(seed=2)
    report = load_swin_encoder(target.swinViT, state, source=layout)
    assert report.complete and len(report.loaded) == len(target.swinViT.state_dict())
    assert set(report.ignored) == ignored
    assert any(n.startswith("layout: ") and note in n for n in report.notes), report.notes
    assert_same(target.swinViT, source.swinViT)


def test_one_channel_encoder_into_four_channels(source):
    target = tiny_swin_unetr(seed=2, in_channels=4)
    report = load_swin_encoder(target.swinViT, source.state_dict(), channels=["t1", "t1ce", "t2", "flair"])
    assert report.complete and "1 -> 4 input channels" in report.adapted[0]
    kernel = source.swinViT.patch_embed.proj.weight
    assert torch.allclose(target.swinViT.patch_embed.proj.weight, kernel.repeat(1, 4, 1, 1, 1) / 4)


# ---------------------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------------------


def test_export_simmim_state_to_swinvit_and_model_swinvit(source):
    simmim = {**{"encoder." + k: v for k, v in source.swinViT.state_dict().items()},
              "mask_token": torch.zeros(1, 1, 12), "head.weight": torch.randn(8, 12)}
    out = swin_encoder_to_monai(simmim)
    target = tiny_swin_unetr(seed=2)
    target.swinViT.load_state_dict(out, strict=True)
    assert_same(target.swinViT, source.swinViT)

    weights = swin_encoder_to_model_swinvit(simmim)
    assert set(weights) == {"state_dict"}
    assert "module.layers3.0.blocks.0.mlp.fc2.bias" in weights["state_dict"]
    assert all(k.startswith("module.") and ".linear" not in k for k in weights["state_dict"])
    theirs = tiny_swin_unetr(seed=3)
    theirs.load_from(weights)
    assert_same(theirs.swinViT, source.swinViT)


@pytest.mark.parametrize("what", ["swin_unetr_module", "swin_module", "swin_unetr_state", "model_swinvit"])
def test_export_from_modules_and_layouts(source, what):
    obj = {"swin_unetr_module": source, "swin_module": source.swinViT, "swin_unetr_state": source.state_dict(),
           "model_swinvit": model_swinvit_layout(source.swinViT)}[what]
    target = tiny_swin_unetr(seed=2)
    target.swinViT.load_state_dict(swin_encoder_to_monai(obj), strict=True)
    assert_same(target.swinViT, source.swinViT)


def test_model_swinvit_export_round_trip(source):
    target = tiny_swin_unetr(seed=2)
    report = load_swin_encoder(target.swinViT, swin_encoder_to_model_swinvit(source.swinViT)["state_dict"])
    assert report.complete and not report.ignored
    assert report.notes[0] == f"layout: {MODEL_SWINVIT_LAYOUT}"
    assert_same(target.swinViT, source.swinViT)


def test_export_refuses_a_state_without_swin():
    with pytest.raises(MedmimError, match="no Swin transformer"):
        swin_encoder_to_monai({"blocks.0.attn.qkv.weight": torch.zeros(3, 1)})


# ---------------------------------------------------------------------------------------------
# Strictness
# ---------------------------------------------------------------------------------------------


def test_wrong_shape_raises_naming_tensor_and_shapes(source):
    wider = tiny_swin_unetr(seed=1, feature_size=24)
    state = model_swinvit_layout(wider.swinViT)["state_dict"]
    for partial in (False, True):
        with pytest.raises(MedmimError, match=r"module\.patch_embed\.proj\.weight \[24, 1, 2, 2, 2\] "
                                              r"\(model: \[12, 1, 2, 2, 2\]\)"):
            load_swin_encoder(tiny_swin_unetr().swinViT, state, partial=partial, source="wider.pt")


def test_missing_stage_raises_unless_partial(source):
    state = model_swinvit_layout(source.swinViT)["state_dict"]
    no_stage4 = {k: v for k, v in state.items() if not k.startswith("module.layers4.")}
    target = tiny_swin_unetr(seed=2)
    before = {k: v.clone() for k, v in target.swinViT.state_dict().items()}
    with pytest.raises(MedmimError, match=r"missing layers4\..*partial=True"):
        load_swin_encoder(target.swinViT, no_stage4, source="cut.pt")
    assert all(torch.equal(v, target.swinViT.state_dict()[k]) for k, v in before.items())  # nothing loaded

    report = load_swin_encoder(target.swinViT, no_stage4, partial=True)
    assert not report.complete and "PARTIAL" in report.summary()
    assert report.missing and all(n.startswith("layers4.") for n in report.missing)
    # the index is not in the file: kept as the model computed it, reported as such rather than missing
    assert report.recomputed == ["layers4.0.blocks.0.attn.relative_position_index"]
    assert "layers4.0.blocks.0.attn.relative_position_index" not in report.missing
    got = target.swinViT.state_dict()
    for k, v in source.swinViT.state_dict().items():
        assert torch.equal(got[k], v if not k.startswith("layers4.") else before[k]), k


def test_three_stage_checkpoint_into_four_stages_and_back():
    three = tiny_swin(depths=(1, 1, 1), num_heads=(1, 1, 2), seed=5)
    with pytest.raises(MedmimError, match="missing layers4"):
        load_swin_encoder(tiny_swin(), three.state_dict())
    assert load_swin_encoder(tiny_swin(), three.state_dict(), partial=True).missing

    four = tiny_swin(seed=6)
    with pytest.raises(MedmimError, match=r"no place in the model \(layers4\."):
        load_swin_encoder(tiny_swin(depths=(1, 1, 1), num_heads=(1, 1, 2)), four.state_dict())
    report = load_swin_encoder(tiny_swin(depths=(1, 1, 1), num_heads=(1, 1, 2)), four.state_dict(), partial=True)
    assert report.unused_encoder and all(k.startswith("layers4.") for k in report.unused_encoder)
    assert set(report.unused_encoder) <= set(report.ignored)


def test_deeper_checkpoint_raises_unless_partial():
    deeper = tiny_swin_unetr(seed=1, depths=(2, 1, 1, 1))
    state = model_swinvit_layout(deeper.swinViT)["state_dict"]
    with pytest.raises(MedmimError, match=r"deep\.pt: the checkpoint's Swin encoder does not fit whole.*module\.layers1\.0\.blocks\.1\.\* \(14\).*partial=True"):
        load_swin_encoder(tiny_swin_unetr().swinViT, state, source="deep.pt")
    target = tiny_swin_unetr(seed=2)
    report = load_swin_encoder(target.swinViT, state, partial=True)
    assert not report.missing and not report.complete
    assert report.unused_encoder and all(".blocks.1." in k for k in report.unused_encoder)
    assert torch.equal(target.swinViT.layers1[0].blocks[0].attn.qkv.weight,
                       deeper.swinViT.layers1[0].blocks[0].attn.qkv.weight)


def test_swin_unetr_v2(source):
    v2 = tiny_swin_unetr(seed=1, use_v2=True)
    target = tiny_swin_unetr(seed=2, use_v2=True)
    assert load_swin_encoder(target.swinViT, v2.state_dict()).complete
    assert_same(target.swinViT, v2.swinViT)
    target.swinViT.load_state_dict(swin_encoder_to_monai(v2), strict=True)
    # v1 weights (model_swinvit.pt has no residual convolutions) into a v2 encoder: partial only
    with pytest.raises(MedmimError, match=r"missing layers1c\.0\.\* .*use_v2"):
        load_swin_encoder(target.swinViT, model_swinvit_layout(source.swinViT)["state_dict"])
    report = load_swin_encoder(target.swinViT, model_swinvit_layout(source.swinViT)["state_dict"], partial=True)
    assert report.missing and all(re.match(r"layers\dc\.", n) for n in report.missing)


def test_state_without_swin_tensors_raises():
    with pytest.raises(MedmimError, match=r"somewhere\.pt: no Swin transformer encoder tensor"):
        load_swin_encoder(tiny_swin(), {"fc.weight": torch.zeros(2, 2)}, source="somewhere.pt")
    vit = ViT3D(in_channels=1, img_size=32, patch_size=8, hidden_size=48, num_layers=1, num_heads=4, mlp_dim=96)
    with pytest.raises(MedmimError, match="looks like a ViT"):
        load_swin_encoder(tiny_swin(), {"encoder." + k: v for k, v in vit.state_dict().items()})


def test_safetensors_file(tmp_path, source):
    path = save_weights(tmp_path / "swin.safetensors", {"encoder." + k: v for k, v in source.swinViT.state_dict().items()})
    target = tiny_swin_unetr(seed=2)
    report = load_pretrained(target, path)
    assert report.complete
    assert_same(target.swinViT, source.swinViT)
