"""Random masking: counts, block masks, determinism, per-voxel masks."""

from __future__ import annotations

import pytest
import torch

from medmim.errors import MedmimError
from medmim.models.masking import TokenMask, mask_size_in_tokens, mask_to_image, random_masking


@pytest.mark.parametrize("ratio,visible", [(0.75, 16), (0.5, 32), (0.9, 6), (0.1, 58)])
def test_mask_counts(ratio, visible):
    m = random_masking(3, (4, 4, 4), mask_ratio=ratio)
    assert m.mask.shape == (3, 64) and m.mask.dtype == torch.bool
    assert (m.mask.sum(1) == 64 - visible).all()
    assert m.ids_keep.shape == (3, visible)
    # ids_keep are exactly the visible tokens, and ids_restore undoes [visible, masked]
    for i in range(3):
        assert set(m.ids_keep[i].tolist()) == set((~m.mask[i]).nonzero().flatten().tolist())
    order = torch.cat([m.ids_keep, m.mask.nonzero()[:, 1].reshape(3, -1)], 1)
    assert torch.equal(torch.gather(order, 1, m.ids_restore), torch.arange(64).expand(3, 64))


def test_masks_differ_per_sample_and_follow_the_generator():
    a = random_masking(4, (4, 4, 4), mask_ratio=0.75, generator=torch.Generator().manual_seed(1))
    b = random_masking(4, (4, 4, 4), mask_ratio=0.75, generator=torch.Generator().manual_seed(1))
    c = random_masking(4, (4, 4, 4), mask_ratio=0.75, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a.mask, b.mask)
    assert not torch.equal(a.mask, c.mask)
    assert len({tuple(row.tolist()) for row in a.mask}) > 1


def test_mask_blocks_larger_than_the_patch_mask_whole_blocks():
    # 16^3 voxel mask blocks over 8^3 patches: 2x2x2 tokens share their fate
    size = mask_size_in_tokens((16, 16, 16), (8, 8, 8))
    assert size == (2, 2, 2)
    m = random_masking(2, (4, 6, 4), mask_ratio=0.75, mask_size=size, generator=torch.Generator().manual_seed(0))
    blocks = m.mask.reshape(2, 2, 2, 3, 2, 2, 2).permute(0, 1, 3, 5, 2, 4, 6).reshape(2, 12, 8)  # [N, block, token]
    assert (blocks.all(-1) | ~blocks.any(-1)).all()
    assert (blocks.all(-1).sum(1) == 9).all()  # round(0.25 * 12) = 3 blocks visible of 12
    assert m.num_visible == 3 * 8


def test_mask_patch_size_must_be_a_multiple_of_the_patch():
    with pytest.raises(MedmimError, match="mask_patch_size"):
        mask_size_in_tokens((12, 16, 16), (8, 8, 8))
    with pytest.raises(MedmimError, match="mask_patch_size"):
        random_masking(1, (4, 4, 3), mask_ratio=0.5, mask_size=(2, 2, 2))
    with pytest.raises(MedmimError, match="mask_ratio"):
        random_masking(1, (4, 4, 4), mask_ratio=1.0)


def test_mask_to_image_and_from_bool():
    m = TokenMask.from_bool(torch.tensor([[True, False, False, True, False, True, True, False]]))
    assert m.ids_keep.tolist() == [[1, 2, 4, 7]]
    img = mask_to_image(m.mask, (2, 2, 2), (2, 3, 4))
    assert img.shape == (1, 1, 4, 6, 8)
    assert img[0, 0, :2, :3, :4].eq(1).all() and img[0, 0, :2, :3, 4:].eq(0).all()
    with pytest.raises(ValueError):
        TokenMask.from_bool(torch.tensor([[True, False], [True, True]]))


@pytest.mark.parametrize("mask_size", [(1, 1, 1), (2, 2, 1)])
def test_random_masking_gives_the_index_tensors_from_bool_computes(mask_size):
    """random_masking passes its known visible count (no device sync): the same TokenMask as from the bool."""
    m = random_masking(3, (4, 6, 2), mask_ratio=0.75, mask_size=mask_size, generator=torch.Generator().manual_seed(5))
    ref = TokenMask.from_bool(m.mask)
    assert torch.equal(m.ids_keep, ref.ids_keep) and torch.equal(m.ids_restore, ref.ids_restore)
    assert m.num_visible == int((~m.mask[0]).sum())
