"""The frozen-encoder probe: how much of a segmentation a ViT's tokens hold on their own.

One linear layer maps each of the frozen ViT's final tokens to class logits, and the logit grid is upsampled
trilinearly to the input's size. There is no convolutional path from the image, so the probe's Dice measures the
representation alone (the linear probe of the MAE literature, for dense prediction), with far less variance
between seeds than fine-tuning the whole UNETR. (Linear maps and trilinear interpolation commute, so this is the
linear head on the upsampled tokens, computed at the token grid's size.)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from medmim.models.vit import ViT3D


class LinearProbe(nn.Module):
    """A linear segmentation head on a frozen :class:`ViT3D`.

    The encoder's weights never train (``requires_grad`` off) and it always runs in eval mode (no dropout or
    drop path), also while the head trains. Input ``x: [N, C, D, H, W]`` -> logits ``[N, num_classes, D, H, W]``.
    The encoder's state dict lives under ``vit.``, as in UNETR, so pretrained weights load the same way.
    """

    def __init__(self, *, encoder: ViT3D, num_classes: int = 14):
        super().__init__()
        self.vit = encoder
        self.vit.requires_grad_(False)
        self.head = nn.Linear(encoder.hidden_size, num_classes)

    def train(self, mode: bool = True) -> LinearProbe:
        super().train(mode)
        self.vit.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        grid = [s // p for s, p in zip(x.shape[2:], self.vit.patch_size)]
        with torch.no_grad():
            z = self.vit(x)  # [N, L, E], after the final norm
        logits = self.head(z).transpose(1, 2).reshape(x.shape[0], -1, *grid)
        return F.interpolate(logits, size=x.shape[2:], mode="trilinear", align_corners=False)
