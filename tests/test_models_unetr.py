"""UNETR on ViT3D: shapes over patch and input sizes, constraints, and MONAI's UNETR wiring."""

from __future__ import annotations

import pytest
import torch
from monai.networks.nets import UNETR as MonaiUNETR

from medmim.config import load_config
from medmim.errors import MedmimError
from medmim.models import UNETR, ViT3D, build_unetr, encoder_to_monai_vit
from medmim.models.unetr import unetr_skip_layers


def tiny_vit(**kw) -> ViT3D:
    args = dict(in_channels=1, img_size=32, patch_size=8, hidden_size=48, num_layers=4, num_heads=4, mlp_dim=96)
    args.update(kw)
    return ViT3D(**args)


@pytest.mark.parametrize(
    "patch,spatial",
    [(8, (32, 32, 32)), (8, (16, 32, 24)), (16, (32, 32, 48)), ((16, 16, 8), (32, 32, 16)), (32, (32, 32, 64))],
)
def test_output_shapes(patch, spatial):
    unetr = UNETR(encoder=tiny_vit(patch_size=patch, img_size=spatial), num_classes=3, feature_size=4).eval()
    with torch.no_grad():
        assert unetr(torch.randn(1, 1, *spatial)).shape == (1, 3, *spatial)


def test_multichannel_and_other_input_sizes():
    unetr = UNETR(encoder=tiny_vit(in_channels=2), num_classes=2, feature_size=4).eval()
    with torch.no_grad():
        assert unetr(torch.randn(2, 2, 16, 24, 40)).shape == (2, 2, 16, 24, 40)


def test_constraints():
    with pytest.raises(MedmimError, match="multiple of 8"):
        UNETR(encoder=tiny_vit(patch_size=4))
    with pytest.raises(MedmimError, match="multiple of 8"):
        UNETR(encoder=tiny_vit(patch_size=(16, 16, 12), img_size=(32, 32, 24)))
    with pytest.raises(MedmimError, match="at least 4 layers"):
        UNETR(encoder=tiny_vit(num_layers=3))
    assert unetr_skip_layers(12) == (3, 6, 9)  # MONAI's hidden_states_out[3], [6], [9]
    assert unetr_skip_layers(4) == (1, 2, 3)
    assert unetr_skip_layers(8) == (2, 4, 6)


def test_same_output_as_monai_unetr():
    """Patch 16, 12 layers: medmim's UNETR is MONAI's UNETR (same weights -> same logits)."""
    torch.manual_seed(0)
    ours = UNETR(encoder=tiny_vit(patch_size=16, num_layers=12), num_classes=3, feature_size=4).eval()
    theirs = MonaiUNETR(in_channels=1, out_channels=3, img_size=32, feature_size=4, hidden_size=48, mlp_dim=96,
                        num_heads=4, qkv_bias=True).eval()
    state = {k: v for k, v in ours.state_dict().items() if not k.startswith("vit.")}
    state.update({f"vit.{k}": v for k, v in encoder_to_monai_vit(ours.state_dict()).items()})
    theirs.load_state_dict(state, strict=True)
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-4, atol=1e-4)


def test_build_unetr_from_preset():
    cfg = load_config("unetr-tiny")
    unetr = build_unetr(cfg.model)
    assert unetr.vit.patch_size == (8, 8, 8) and unetr.out.conv.conv.out_channels == 14
    with torch.no_grad():
        assert unetr(torch.randn(1, 1, 32, 32, 32)).shape == (1, 14, 32, 32, 32)
