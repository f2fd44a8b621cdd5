"""MAE (He et al. 2022) for 3D volumes: the encoder sees visible patches only, a light decoder
reconstructs the voxels of the masked ones, the loss counts masked patches only.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch

from medmim.models.layers import run_blocks, sincos_pos_embed_3d
from medmim.models.masking import MIMOutput, TokenMask, as_token_mask
from medmim.models.mim import MaskedImageModel, constructor_args
from medmim.models.vit import ViT3D


class MAE3D(MaskedImageModel):
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

    def __init__(self, *, encoder: ViT3D, mask_ratio: float = 0.75, mask_patch_size: int | Sequence[int] | None = None,
                 decoder_dim: int = 512, decoder_depth: int = 8, decoder_heads: int = 16,
                 decoder_mlp_ratio: float = 4.0, loss: Literal["l1", "l2"] = "l2", norm_pix_loss: bool = False):
        super().__init__(**constructor_args(locals()))
        self._init_mask_token(self.decoder_dim)  # stands for a hidden patch in the decoder
        self.register_buffer("decoder_pos_embed", sincos_pos_embed_3d(encoder.grid, self.decoder_dim),
                             persistent=False)

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
        return self._output(loss, pred, patches, grid, mask.mask)

    def _decoder_pos_embed(self, grid: Sequence[int]) -> torch.Tensor:
        if tuple(grid) == self.encoder.grid:
            return self.decoder_pos_embed
        return sincos_pos_embed_3d(grid, self.decoder_dim).to(self.decoder_pos_embed.device)
