"""SimMIM (Xie et al. 2022) for 3D volumes: every token goes through the encoder, masked ones replaced
by a learnable mask token; a light head predicts the voxels of every patch; the loss counts masked
voxels only.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import nn

from medmim.errors import MedmimError
from medmim.models.layers import Block, init_weights, run_blocks, to_triple
from medmim.models.losses import masked_patch_loss, patch_norm
from medmim.models.mae import prediction_image
from medmim.models.masking import (
    MIMOutput,
    TokenMask,
    mask_size_in_tokens,
    mask_to_image,
    random_masking,
)
from medmim.models.vit import ViT3D


class SimMIM3D(nn.Module):
    """SimMIM on a :class:`ViT3D`.

    Args:
        encoder: the ViT; it sees all tokens, the masked ones as ``mask_token``.
        mask_ratio: share of mask blocks hidden, in (0, 1).
        mask_patch_size: voxels per mask block along each axis, a multiple of the ViT patch
            (default: the ViT patch).
        decoder_depth: 0 (SimMIM's choice) makes the head one Linear from each token to its patch's
            voxels; more adds that many transformer blocks of ``decoder_dim`` width before it.
        decoder_dim, decoder_heads, decoder_mlp_ratio: the light head's width, heads and MLP ratio.
        loss: ``"l1"`` (SimMIM) or ``"l2"`` on voxels of masked patches.
        norm_pix_loss: predict each patch normalised to zero mean and unit variance.
    """

    def __init__(
        self,
        *,
        encoder: ViT3D,
        mask_ratio: float = 0.75,
        mask_patch_size: int | Sequence[int] | None = None,
        decoder_dim: int = 384,
        decoder_depth: int = 0,
        decoder_heads: int = 12,
        decoder_mlp_ratio: float = 4.0,
        loss: Literal["l1", "l2"] = "l1",
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

        self.mask_token = nn.Parameter(torch.zeros(1, 1, encoder.hidden_size))
        # the head: [Linear -> blocks -> norm] when deep, then the Linear to voxels
        width = decoder_dim if decoder_depth > 0 else encoder.hidden_size
        self.head_embed = nn.Linear(encoder.hidden_size, width) if decoder_depth > 0 else nn.Identity()
        self.head_blocks = nn.ModuleList(
            Block(dim=width, num_heads=decoder_heads, mlp_dim=int(width * decoder_mlp_ratio))
            for _ in range(decoder_depth)
        )
        self.head_norm = nn.LayerNorm(width) if decoder_depth > 0 else nn.Identity()
        self.head_pred = nn.Linear(width, patch_dim)

        for m in (self.head_embed, self.head_blocks, self.head_norm, self.head_pred):
            m.apply(init_weights)
        nn.init.normal_(self.mask_token, std=0.02)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.encoder.set_grad_checkpointing(enable)

    def random_mask(self, batch_size: int, grid: Sequence[int], *, generator: torch.Generator | None = None,
                    device: torch.device | str | None = None) -> TokenMask:
        """A fresh mask for a batch -> TokenMask with mask [N, L]."""
        return random_masking(batch_size, grid, mask_ratio=self.mask_ratio, mask_size=self.mask_size,
                              generator=generator, device=device)

    def forward_encoder(self, patches: torch.Tensor, grid: Sequence[int], mask: torch.Tensor) -> torch.Tensor:
        """patches: [N, L, C*P], mask: [N, L] -> features [N, L, E]."""
        tokens = self.encoder.patch_embed(patches)  # [N, L, E]
        # masked tokens become the mask token, before the position embedding is added
        # (one select instead of two products and a sum: the same values and gradients)
        tokens = torch.where(mask.bool().unsqueeze(-1), self.mask_token.to(tokens.dtype), tokens)
        tokens = tokens + self.encoder.pos_embed_for(grid)
        return self.encoder.forward_tokens(tokens)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        """features: [N, L, E] -> pred [N, L, C*P]"""
        x = self.head_embed(features)
        x = run_blocks(self.head_blocks, x)
        return self.head_pred(self.head_norm(x))

    def forward_loss(self, patches: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """patches, pred: [N, L, C*P]; mask: [N, L] (1 = masked). Error over masked voxels only."""
        target = patch_norm(patches)[0] if self.norm_pix_loss else patches
        return masked_patch_loss(pred, target, mask, kind=self.loss_kind)

    def forward(self, x: torch.Tensor, *, mask: TokenMask | torch.Tensor | None = None,
                generator: torch.Generator | None = None) -> MIMOutput:
        """x: [N, C, D, H, W]; mask: a fixed mask (TokenMask or bool [N, L]) or None to draw one."""
        patches, grid = self.encoder.patchify(x)  # [N, L, C*P]
        if mask is None:
            mask = self.random_mask(x.shape[0], grid, generator=generator, device=x.device)
        token_mask = mask.mask if isinstance(mask, TokenMask) else mask.bool()  # [N, L]
        features = self.forward_encoder(patches, grid, token_mask)  # [N, L, E]
        pred = self.forward_head(features)  # [N, L, C*P]
        loss = self.forward_loss(patches, pred, token_mask)
        return MIMOutput(loss=loss, pred=prediction_image(pred, patches, grid, self.patch_size, self.norm_pix_loss),
                         mask=mask_to_image(token_mask, grid, self.patch_size), token_mask=token_mask)
