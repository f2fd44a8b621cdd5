"""Building blocks: patchify order, the Linear patch embedding vs the Conv3d, sin-cos tables."""

from __future__ import annotations

import pytest
import torch
from monai.networks.blocks.pos_embed_utils import build_sincos_position_embedding

from medmim.errors import MedmimError
from medmim.models.layers import (
    PatchEmbed3D,
    gather_tokens,
    interpolate_pos_embed,
    patchify,
    sincos_pos_embed_3d,
    unpatchify,
)


@pytest.mark.parametrize("shape,patch", [((2, 1, 16, 16, 16), (8, 8, 8)), ((1, 2, 8, 16, 12), (4, 8, 2))])
def test_patchify_round_trip(shape, patch):
    x = torch.randn(shape)
    patches, grid = patchify(x, patch)
    assert grid == tuple(s // p for s, p in zip(shape[2:], patch))
    assert patches.shape == (shape[0], grid[0] * grid[1] * grid[2], shape[1] * patch[0] * patch[1] * patch[2])
    assert torch.equal(unpatchify(patches, grid, patch), x)


def test_patchify_rejects_sizes_that_do_not_tile():
    with pytest.raises(MedmimError, match="multiple of patch_size"):
        patchify(torch.randn(1, 1, 20, 16, 16), (8, 8, 8))


@pytest.mark.parametrize("channels,patch", [(1, (8, 8, 8)), (2, (4, 8, 2))])
def test_patch_embedding_on_visible_patches_equals_conv3d(channels, patch):
    torch.manual_seed(0)
    embed = PatchEmbed3D(in_channels=channels, patch_size=patch, hidden_size=24)
    x = torch.randn(2, channels, 16, 16, 8)
    patches, grid = patchify(x, patch)
    ids_keep = torch.stack([torch.randperm(patches.shape[1])[:5] for _ in range(2)])  # [N, 5]
    visible_only = embed(gather_tokens(patches, ids_keep))  # Linear on gathered visible patches
    full_conv = gather_tokens(embed.forward_image(x), ids_keep)  # Conv3d over everything, then gather
    torch.testing.assert_close(visible_only, full_conv, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("grid", [(2, 3, 4), (4, 4, 4)])
def test_sincos_matches_monai(grid):
    ours = sincos_pos_embed_3d(grid, 48)
    theirs = build_sincos_position_embedding(list(grid), 48, 3)
    torch.testing.assert_close(ours, theirs.data)


def test_sincos_width_not_multiple_of_six_is_zero_padded():
    table = sincos_pos_embed_3d((2, 2, 2), 512)
    assert table.shape == (1, 8, 512)
    assert torch.equal(table[..., 510:], torch.zeros(1, 8, 2))
    torch.testing.assert_close(table[..., :510], sincos_pos_embed_3d((2, 2, 2), 510))


def test_interpolate_pos_embed_is_trilinear_over_the_grid():
    # a table linear along axis 0 stays a (resampled) table of the same kind
    pos = torch.arange(2.0).repeat_interleave(9).reshape(1, 18, 1).expand(1, 18, 4).contiguous()  # grid (2, 3, 3)
    out = interpolate_pos_embed(pos, (2, 3, 3), (4, 3, 3))
    assert out.shape == (1, 36, 4)
    along0 = out.reshape(4, 3, 3, 4)[:, 0, 0, 0]
    torch.testing.assert_close(along0, torch.tensor([0.0, 0.25, 0.75, 1.0]))
    assert interpolate_pos_embed(pos, (2, 3, 3), (2, 3, 3)) is pos
