"""The frozen-encoder probe: how much of a segmentation a ViT's tokens hold on their own.

One linear layer maps each of the frozen ViT's final tokens to class logits, and the logit grid is upsampled
trilinearly to the input's size. There is no convolutional path from the image, so the probe's Dice measures the
representation alone (the linear probe of the MAE literature, for dense prediction), with far less variance
between seeds than fine-tuning the whole UNETR. (Linear maps and trilinear interpolation commute, so this is the
linear head on the upsampled tokens, computed at the token grid's size.)

By default the tokens are standardised per channel before the head (``norm="batchnorm"``: batch normalisation
without affine parameters, its statistics over every token of the batch, frozen in evaluation), as MAE's linear
probe does; in evaluation it is a fixed affine map, so the probe stays linear in the tokens. It matters: an
encoder whose token variance lies mostly in one direction (measured on a SimMIM ViT: 81% of it) left the raw probe
predicting background only, while a closed-form linear fit read the organs from its tokens better than from
MAE's or a random encoder's (``benchmarks/token_stats.py``).
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
    ``norm``: ``"batchnorm"`` standardises each token channel before the head (running statistics under
    ``norm.``), ``"none"`` feeds the raw tokens.
    """

    def __init__(self, *, encoder: ViT3D, num_classes: int = 14, norm: str = "batchnorm"):
        super().__init__()
        if norm not in ("batchnorm", "none"):
            raise ValueError(f"probe norm {norm!r}: use batchnorm or none")
        self.vit = encoder
        self.vit.requires_grad_(False)
        self.norm = nn.BatchNorm1d(encoder.hidden_size, affine=False) if norm == "batchnorm" else nn.Identity()
        self.head = nn.Linear(encoder.hidden_size, num_classes)

    def train(self, mode: bool = True) -> LinearProbe:
        super().train(mode)
        self.vit.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        grid = [s // p for s, p in zip(x.shape[2:], self.vit.patch_size)]
        with torch.no_grad():
            z = self.vit(x)  # [N, L, E], after the final norm
        z = self.norm(z.transpose(1, 2)).transpose(1, 2)  # BatchNorm1d takes [N, E, L]: statistics over N and L
        logits = self.head(z).transpose(1, 2).reshape(x.shape[0], -1, *grid)
        return F.interpolate(logits, size=x.shape[2:], mode="trilinear", align_corners=False)
