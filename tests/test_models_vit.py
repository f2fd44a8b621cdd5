"""ViT3D: shapes over input and patch sizes, hidden states, masked (visible-only) path, input checks."""

from __future__ import annotations

import pytest
import torch

from medmim.errors import MedmimError
from medmim.models import ViT3D
from medmim.models.layers import gather_tokens


def tiny_vit(**kw) -> ViT3D:
    args = dict(in_channels=1, img_size=32, patch_size=8, hidden_size=48, num_layers=2, num_heads=4, mlp_dim=96)
    args.update(kw)
    return ViT3D(**args)


@pytest.mark.parametrize(
    "patch,img,spatial",
    [
        (8, 32, (32, 32, 32)),
        (8, 32, (16, 32, 48)),  # non-cubic input, other than img_size
        (16, (32, 32, 48), (32, 32, 48)),  # non-cubic img_size
        ((8, 8, 4), (16, 16, 8), (16, 24, 12)),  # anisotropic patch
    ],
)
@pytest.mark.parametrize("pos_embed", ["sincos", "learnable"])
def test_output_shapes(patch, img, spatial, pos_embed):
    vit = tiny_vit(patch_size=patch, img_size=img, pos_embed=pos_embed).eval()
    x = torch.randn(2, 1, *spatial)
    p = vit.patch_size
    length = (spatial[0] // p[0]) * (spatial[1] // p[1]) * (spatial[2] // p[2])
    features, hidden = vit(x, return_hidden=True)
    assert features.shape == (2, length, 48)
    assert len(hidden) == 2 and all(h.shape == (2, length, 48) for h in hidden)
    # features are the final norm of the last block's output
    torch.testing.assert_close(features, vit.norm(hidden[-1]))


def test_multichannel_input():
    vit = tiny_vit(in_channels=3)
    assert vit(torch.randn(1, 3, 16, 16, 16)).shape == (1, 8, 48)
    with pytest.raises(MedmimError, match="in_channels=3"):
        vit(torch.randn(1, 1, 16, 16, 16))


def test_input_not_a_multiple_of_the_patch_raises():
    with pytest.raises(MedmimError, match="multiple of patch_size"):
        tiny_vit()(torch.randn(1, 1, 30, 32, 32))


def test_visible_only_path_equals_full_embedding_then_gather():
    torch.manual_seed(0)
    vit = tiny_vit().eval()
    x = torch.randn(2, 1, 32, 32, 32)
    ids_keep = torch.stack([torch.randperm(64)[:16].sort().values for _ in range(2)])
    patches, grid = vit.patchify(x)
    visible = vit.embed(patches, grid, ids_keep)  # never embeds the 48 dropped patches
    full = gather_tokens(vit.patch_embed.forward_image(x) + vit.pos_embed, ids_keep)  # Conv3d over all
    torch.testing.assert_close(visible, full, rtol=1e-5, atol=1e-5)
    assert vit(x, ids_keep=ids_keep).shape == (2, 16, 48)


def test_pos_embed_kinds():
    sincos, learnable = tiny_vit(pos_embed="sincos"), tiny_vit(pos_embed="learnable")
    assert "pos_embed" in dict(sincos.named_buffers()) and "pos_embed" in sincos.state_dict()
    assert "pos_embed" in dict(learnable.named_parameters())
    # another grid: sin-cos recomputed, learnable interpolated
    assert sincos.pos_embed_for((2, 4, 6)).shape == (1, 48, 48)
    assert learnable.pos_embed_for((2, 4, 6)).shape == (1, 48, 48)


def test_grad_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    vit = tiny_vit()
    x = torch.randn(1, 1, 16, 16, 16)
    vit(x).square().mean().backward()
    ref = [p.grad.clone() for p in vit.parameters()]
    vit.zero_grad()
    vit.set_grad_checkpointing(True)
    vit(x).square().mean().backward()
    for a, p in zip(ref, vit.parameters()):
        torch.testing.assert_close(a, p.grad)
