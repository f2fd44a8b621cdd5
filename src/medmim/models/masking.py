"""Random masking of 3D token grids for masked image modeling.

A mask is drawn per sample over *mask blocks* of ``mask_size`` tokens per axis (the masked-patch size of
the paper's "masking ratio x patch size" study, in ViT tokens: a 32^3 voxel mask over 16^3 patches is
``mask_size=(2, 2, 2)``), then expanded to the token grid. Every sample masks the same number of
tokens, so the visible tokens of a batch stack into one tensor.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from medmim.errors import MedmimError


@dataclass
class TokenMask:
    """Which tokens are hidden, and the index tensors that gather / restore them.

    mask: [N, L] bool, True = masked (hidden from the encoder, predicted by the head).
    ids_keep: [N, K] indices of visible tokens, in raster order.
    ids_restore: [N, L]; ``gather(cat([visible, masked]), ids_restore)`` puts tokens back in grid order.
    """

    mask: torch.Tensor
    ids_keep: torch.Tensor
    ids_restore: torch.Tensor

    @classmethod
    def from_bool(cls, mask: torch.Tensor, num_visible: int | None = None) -> "TokenMask":
        """Build the index tensors from a bool mask [N, L] (each sample must mask as many tokens).

        ``num_visible``: the visible tokens per sample when the caller knows it (random_masking does):
        then the counts are neither checked nor read back from the device, which keeps a GPU step free of
        host synchronisation and a compiled step free of graph breaks.
        """
        mask = mask.bool()
        if num_visible is None:
            counts = mask.sum(1)
            if (counts != counts[0]).any():
                raise ValueError(f"every sample must mask the same number of tokens, got {counts.tolist()}")
            num_visible = mask.shape[1] - int(counts[0])
        # stable sort: visible tokens first (in raster order), then masked ones
        ids_shuffle = torch.argsort(mask.to(torch.uint8), dim=1, stable=True)  # [N, L]
        ids_restore = torch.argsort(ids_shuffle, dim=1)  # [N, L]
        return cls(mask=mask, ids_keep=ids_shuffle[:, :num_visible], ids_restore=ids_restore)

    @property
    def num_visible(self) -> int:
        return self.ids_keep.shape[1]


def mask_size_in_tokens(mask_patch_size: Sequence[int], patch_size: Sequence[int]) -> tuple[int, int, int]:
    """Voxels of a mask block -> ViT tokens per axis; the mask block must be a multiple of the patch."""
    if any(m % p or m < p for m, p in zip(mask_patch_size, patch_size)):
        raise MedmimError(f"mask_patch_size {list(mask_patch_size)} must be a multiple of "
                          f"patch_size {list(patch_size)}")
    return tuple(m // p for m, p in zip(mask_patch_size, patch_size))  # type: ignore[return-value]


def random_masking(
    batch_size: int,
    grid: Sequence[int],
    *,
    mask_ratio: float,
    mask_size: Sequence[int] = (1, 1, 1),
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> TokenMask:
    """Draw a random mask per sample.

    Args:
        batch_size: N.
        grid: token grid ``(gd, gh, gw)``.
        mask_ratio: share of mask blocks hidden, ``0 < r < 1``; ``round((1 - r) * blocks)`` blocks stay
            visible, at least one and at most all but one.
        mask_size: tokens per mask block along each axis; must tile ``grid``.
        generator: for reproducible masks (its device is where the noise is drawn).
        device: where the returned tensors live.

    Returns a :class:`TokenMask` with ``mask: [N, gd*gh*gw]``.
    """
    if not 0.0 < mask_ratio < 1.0:
        raise MedmimError(f"mask_ratio must be in (0, 1), got {mask_ratio}")
    if any(g % m for g, m in zip(grid, mask_size)):
        raise MedmimError(f"the token grid {list(grid)} is not a multiple of the mask block {list(mask_size)} tokens "
                          "(input size must be a multiple of mask_patch_size)")
    coarse = [g // m for g, m in zip(grid, mask_size)]  # mask blocks per axis
    num_blocks = coarse[0] * coarse[1] * coarse[2]
    num_keep = min(max(round((1.0 - mask_ratio) * num_blocks), 1), num_blocks - 1)
    if num_blocks < 2:
        raise MedmimError(f"a grid of {num_blocks} mask block cannot be partly masked; use a smaller mask_patch_size")

    # rank uniform noise: the num_keep smallest blocks of each sample stay visible
    gen_device = generator.device if generator is not None else "cpu"
    noise = torch.rand(batch_size, num_blocks, generator=generator, device=gen_device)  # [N, B]
    rank = torch.argsort(torch.argsort(noise, dim=1), dim=1)  # [N, B]
    block_mask = (rank >= num_keep).reshape(batch_size, *coarse)  # [N, bd, bh, bw]
    # every token of a mask block shares its fate
    token_mask = _repeat_grid(block_mask, mask_size).reshape(batch_size, -1)  # [N, L]
    tokens_per_block = int(mask_size[0]) * int(mask_size[1]) * int(mask_size[2])
    return TokenMask.from_bool(token_mask.to(device) if device is not None else token_mask,
                               num_visible=num_keep * tokens_per_block)


def mask_to_image(mask: torch.Tensor, grid: Sequence[int], patch_size: Sequence[int]) -> torch.Tensor:
    """Per-token mask [N, L] -> per-voxel mask [N, 1, D, H, W] float (1 = masked voxel)."""
    m = mask.float().reshape(mask.shape[0], *grid)  # [N, gd, gh, gw]
    return _repeat_grid(m, patch_size).unsqueeze(1)


def _repeat_grid(m: torch.Tensor, factors: Sequence[int]) -> torch.Tensor:
    """[N, a, b, c] -> [N, a*f0, b*f1, c*f2], each cell repeated as a block."""
    for axis, f in enumerate(factors):
        m = m.repeat_interleave(int(f), dim=1 + axis)
    return m


@dataclass
class MIMOutput:
    """What a masked-image-modeling step returns.

    loss: scalar, mean error over masked voxels.
    pred: [N, C, D, H, W] the prediction of every patch as an image, in input intensities (with a
        norm-pix target, each patch is brought back with the input patch's own mean and std), for previews.
    mask: [N, 1, D, H, W] float, 1 = masked voxel.
    token_mask: [N, L] bool, True = masked token.
    """

    loss: torch.Tensor
    pred: torch.Tensor
    mask: torch.Tensor
    token_mask: torch.Tensor


def as_token_mask(mask: "TokenMask | torch.Tensor") -> TokenMask:
    """Accept a :class:`TokenMask` or a bool tensor [N, L] (True = masked)."""
    return mask if isinstance(mask, TokenMask) else TokenMask.from_bool(mask)
