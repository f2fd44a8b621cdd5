"""MAE (He et al. 2022) for 3D volumes: the encoder sees visible patches only, a light decoder
reconstructs the voxels of the masked ones, the loss counts masked patches only.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import nn

from medmim.errors import MedmimError
from medmim.models.layers import Block, init_weights, run_blocks, sincos_pos_embed_3d, to_triple, unpatchify
from medmim.models.losses import masked_patch_loss, patch_norm
from medmim.models.masking import (
    MIMOutput,
    TokenMask,
    as_token_mask,
    mask_size_in_tokens,
    mask_to_image,
    random_masking,
)
from medmim.models.vit import ViT3D


class MAE3D(nn.Module):
    """Masked autoencoder on a :class:`ViT3D`.

    Args:
        encoder: the ViT; it runs on visible tokens only.
        mask_ratio: share of mask blocks hidden, in (0, 1).
        mask_patch_size: voxels per mask block along each axis, a multiple of the ViT patch
            (default: the ViT patch, i.e. token-wise masking).
        decoder_dim: decoder width.
        decoder_depth: decoder blocks; 0 makes the decoder a single Linear on encoder features and
            mask tokens (the "projection head" setting: a masked patch's prediction then depends on its
            position only).
        decoder_heads: decoder attention heads.
        decoder_mlp_ratio: decoder MLP width / decoder_dim.
        loss: ``"l2"`` (MAE) or ``"l1"`` on voxels of masked patches.
        norm_pix_loss: predict each patch normalised to zero mean and unit variance.

    The decoder's position embedding is a fixed sin-cos table.
    """

    def __init__(
        self,
        *,
        encoder: ViT3D,
        mask_ratio: float = 0.75,
        mask_patch_size: int | Sequence[int] | None = None,
        decoder_dim: int = 512,
        decoder_depth: int = 8,
        decoder_heads: int = 16,
        decoder_mlp_ratio: float = 4.0,
        loss: Literal["l1", "l2"] = "l2",
        norm_pix_loss: bool = False,
    ):
        super().__init__()
        if loss not in ("l1", "l2"):
            raise MedmimError(f"loss must be 'l1' or 'l2', got {loss!r}")
        if decoder_depth < 0:
            raise MedmimError(f"decoder_depth must be >= 0, got {decoder_depth}")
        self.encoder = encoder
        self.patch_size = encoder.patch_size
        self.mask_ratio = mask_ratio
        self.mask_patch_size = to_triple(mask_patch_size or encoder.patch_size, "mask_patch_size")
        self.mask_size = mask_size_in_tokens(self.mask_patch_size, self.patch_size)
        self.loss_kind = loss
        self.norm_pix_loss = norm_pix_loss
        patch_dim = encoder.in_channels * self.patch_size[0] * self.patch_size[1] * self.patch_size[2]

        # depth 0: no decoder transformer, the head reads encoder-width tokens directly
        width = decoder_dim if decoder_depth > 0 else encoder.hidden_size
        self.decoder_dim = width
        self.decoder_embed = nn.Linear(encoder.hidden_size, width) if decoder_depth > 0 else nn.Identity()
        self.mask_token = nn.Parameter(torch.zeros(1, 1, width))
        self.register_buffer("decoder_pos_embed", sincos_pos_embed_3d(encoder.grid, width), persistent=False)
        self.decoder_blocks = nn.ModuleList(
            Block(dim=width, num_heads=decoder_heads, mlp_dim=int(width * decoder_mlp_ratio))
            for _ in range(decoder_depth)
        )
        self.decoder_norm = nn.LayerNorm(width) if decoder_depth > 0 else nn.Identity()
        self.decoder_pred = nn.Linear(width, patch_dim)
        self.grad_checkpointing = False

        for m in (self.decoder_embed, self.decoder_blocks, self.decoder_norm, self.decoder_pred):
            m.apply(init_weights)
        nn.init.normal_(self.mask_token, std=0.02)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable
        self.encoder.set_grad_checkpointing(enable)

    def random_mask(self, batch_size: int, grid: Sequence[int], *, generator: torch.Generator | None = None,
                    device: torch.device | str | None = None) -> TokenMask:
        """A fresh mask for a batch -> TokenMask with mask [N, L]."""
        return random_masking(batch_size, grid, mask_ratio=self.mask_ratio, mask_size=self.mask_size,
                              generator=generator, device=device)

    def forward_encoder(self, patches: torch.Tensor, grid: Sequence[int], mask: TokenMask) -> torch.Tensor:
        """patches: [N, L, C*P] -> latent [N, K, E] of the K visible tokens."""
        tokens = self.encoder.embed(patches, grid, mask.ids_keep)  # [N, K, E], visible patches only
        return self.encoder.forward_tokens(tokens)

    def forward_decoder(self, latent: torch.Tensor, grid: Sequence[int], mask: TokenMask) -> torch.Tensor:
        """latent: [N, K, E] -> pred [N, L, C*P] for every token of the grid."""
        x = self.decoder_embed(latent)  # [N, K, Dd]
        n, k, width = x.shape
        length = mask.ids_restore.shape[1]
        # append mask tokens, then put every token back in grid order
        x = torch.cat([x, self.mask_token.expand(n, length - k, width).to(x.dtype)], dim=1)  # [N, L, Dd]
        x = torch.gather(x, 1, mask.ids_restore.unsqueeze(-1).expand(-1, -1, width))
        x = x + self._decoder_pos_embed(grid).to(x.dtype)
        x = run_blocks(self.decoder_blocks, x, self.grad_checkpointing)
        x = self.decoder_norm(x)
        return self.decoder_pred(x)  # [N, L, C*P]

    def forward_loss(self, patches: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """patches, pred: [N, L, C*P]; mask: [N, L] (1 = masked). Error over masked patches only."""
        target = patch_norm(patches)[0] if self.norm_pix_loss else patches
        return masked_patch_loss(pred, target, mask, kind=self.loss_kind)

    def forward(self, x: torch.Tensor, *, mask: TokenMask | torch.Tensor | None = None,
                generator: torch.Generator | None = None) -> MIMOutput:
        """x: [N, C, D, H, W]; mask: a fixed mask (TokenMask or bool [N, L]) or None to draw one."""
        patches, grid = self.encoder.patchify(x)  # [N, L, C*P]
        if mask is None:
            mask = self.random_mask(x.shape[0], grid, generator=generator, device=x.device)
        mask = as_token_mask(mask)
        latent = self.forward_encoder(patches, grid, mask)  # [N, K, E]
        pred = self.forward_decoder(latent, grid, mask)  # [N, L, C*P]
        loss = self.forward_loss(patches, pred, mask.mask)
        return MIMOutput(loss=loss, pred=prediction_image(pred, patches, grid, self.patch_size, self.norm_pix_loss),
                         mask=mask_to_image(mask.mask, grid, self.patch_size), token_mask=mask.mask)

    def _decoder_pos_embed(self, grid: Sequence[int]) -> torch.Tensor:
        if tuple(grid) == self.encoder.grid:
            return self.decoder_pos_embed
        return sincos_pos_embed_3d(grid, self.decoder_dim).to(self.decoder_pos_embed.device)


def prediction_image(pred: torch.Tensor, patches: torch.Tensor, grid: Sequence[int], patch_size: Sequence[int],
                     norm_pix: bool) -> torch.Tensor:
    """Per-patch predictions [N, L, C*P] -> an image [N, C, D, H, W] in input intensities (for previews)."""
    pred = pred.detach().float()
    if norm_pix:
        _, mean, std = patch_norm(patches.detach().float())
        pred = pred * std + mean
    return unpatchify(pred, grid, patch_size)
