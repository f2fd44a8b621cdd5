"""What MAE and SimMIM share: random block masking, the light decoder that predicts the voxels of each
patch, and the loss over masked patches.

The two differ in what their encoder sees (MAE: the visible tokens only, the decoder adds mask tokens;
SimMIM: every token, the masked ones replaced by a mask token); the rest is here. The decoder is
``decoder_embed -> decoder_blocks -> decoder_norm -> decoder_pred``; with depth 0 only ``decoder_pred`` is
left, a Linear from encoder-width tokens to voxels (the "projection head").
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import nn

from medmim.errors import MedmimError
from medmim.models.layers import Block, init_weights, to_triple, unpatchify
from medmim.models.losses import masked_patch_loss, patch_norm
from medmim.models.masking import MIMOutput, TokenMask, mask_size_in_tokens, mask_to_image, random_masking
from medmim.models.vit import ViT3D


def constructor_args(local_vars: dict) -> dict:
    """A subclass constructor's keyword arguments, from its ``locals()``, to pass on to the base."""
    return {k: v for k, v in local_vars.items() if k not in ("self", "__class__")}


class MaskedImageModel(nn.Module):
    """The base of :class:`~medmim.models.mae.MAE3D` and :class:`~medmim.models.simmim.SimMIM3D`; see
    those for the arguments. Subclasses add their ``mask_token`` and ``forward``."""

    def __init__(
        self,
        *,
        encoder: ViT3D,
        mask_ratio: float,
        mask_patch_size: int | Sequence[int] | None,
        decoder_dim: int,
        decoder_depth: int,
        decoder_heads: int,
        decoder_mlp_ratio: float,
        loss: Literal["l1", "l2"],
        norm_pix_loss: bool,
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
        self.mask_size = mask_size_in_tokens(self.mask_patch_size, self.patch_size)  # tokens per mask block
        self.loss_kind = loss
        self.norm_pix_loss = norm_pix_loss
        self.grad_checkpointing = False
        patch_dim = encoder.in_channels * self.patch_size[0] * self.patch_size[1] * self.patch_size[2]

        # the decoder: [Linear to its width -> blocks -> norm] when deep, then the Linear to voxels;
        # depth 0 has no decoder transformer, the last Linear reads encoder-width tokens directly
        width = decoder_dim if decoder_depth > 0 else encoder.hidden_size
        self.decoder_dim = width
        self.decoder_embed = nn.Linear(encoder.hidden_size, width) if decoder_depth > 0 else nn.Identity()
        self.decoder_blocks = nn.ModuleList(
            Block(dim=width, num_heads=decoder_heads, mlp_dim=int(width * decoder_mlp_ratio))
            for _ in range(decoder_depth)
        )
        self.decoder_norm = nn.LayerNorm(width) if decoder_depth > 0 else nn.Identity()
        self.decoder_pred = nn.Linear(width, patch_dim)
        for m in (self.decoder_embed, self.decoder_blocks, self.decoder_norm, self.decoder_pred):
            m.apply(init_weights)

    def _init_mask_token(self, width: int) -> None:
        """The learnable mask token [1, 1, width], drawn after the decoder (the order fixes the weights of a seed)."""
        self.mask_token = nn.Parameter(torch.zeros(1, 1, width))
        nn.init.normal_(self.mask_token, std=0.02)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable
        self.encoder.set_grad_checkpointing(enable)

    def random_mask(self, batch_size: int, grid: Sequence[int], *, generator: torch.Generator | None = None,
                    device: torch.device | str | None = None) -> TokenMask:
        """A fresh mask for a batch -> TokenMask with mask [N, L]."""
        return random_masking(batch_size, grid, mask_ratio=self.mask_ratio, mask_size=self.mask_size,
                              generator=generator, device=device)

    def forward_loss(self, patches: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """patches, pred: [N, L, C*P]; mask: [N, L] (1 = masked). Error over the voxels of masked patches only."""
        target = patch_norm(patches)[0] if self.norm_pix_loss else patches
        return masked_patch_loss(pred, target, mask, kind=self.loss_kind)

    def _output(self, loss: torch.Tensor, pred: torch.Tensor, patches: torch.Tensor, grid: Sequence[int],
               token_mask: torch.Tensor) -> MIMOutput:
        """The step's result, with the prediction and the mask as images [N, C, D, H, W] for previews."""
        return MIMOutput(loss=loss, pred=prediction_image(pred, patches, grid, self.patch_size, self.norm_pix_loss),
                         mask=mask_to_image(token_mask, grid, self.patch_size), token_mask=token_mask)


def prediction_image(pred: torch.Tensor, patches: torch.Tensor, grid: Sequence[int], patch_size: Sequence[int],
                     norm_pix: bool) -> torch.Tensor:
    """Per-patch predictions [N, L, C*P] -> an image [N, C, D, H, W] in input intensities (for previews)."""
    pred = pred.detach().float()
    if norm_pix:
        _, mean, std = patch_norm(patches.detach().float())
        pred = pred * std + mean
    return unpatchify(pred, grid, patch_size)
