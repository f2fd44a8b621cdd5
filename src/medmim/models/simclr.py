"""SimCLR (Chen et al. 2020), the contrastive baseline of the paper, on the same :class:`ViT3D`.

Two augmented views of each volume (made by the data pipeline) go through the encoder; the mean of the
final tokens is projected by an MLP; NT-Xent pulls the two views of a volume together and pushes the
other volumes of the batch away.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from medmim.models.layers import init_weights
from medmim.models.losses import nt_xent
from medmim.models.vit import ViT3D


@dataclass
class ContrastiveOutput:
    """loss: scalar NT-Xent; z1, z2: [N, proj_dim] projections of the two views."""

    loss: torch.Tensor
    z1: torch.Tensor
    z2: torch.Tensor


class SimCLR3D(nn.Module):
    """SimCLR on a :class:`ViT3D`.

    Args:
        encoder: the ViT (all tokens, no masking).
        proj_dim: output width of the projection MLP.
        proj_hidden_dim: its hidden width (default: the encoder width).
        temperature: NT-Xent temperature.
    """

    def __init__(self, *, encoder: ViT3D, proj_dim: int = 128, proj_hidden_dim: int | None = None,
                 temperature: float = 0.1):
        super().__init__()
        self.encoder = encoder
        self.temperature = temperature
        hidden = proj_hidden_dim or encoder.hidden_size
        self.projector = nn.Sequential(
            nn.Linear(encoder.hidden_size, hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, proj_dim),
        )
        self.projector.apply(init_weights)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.encoder.set_grad_checkpointing(enable)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """x: [N, C, D, H, W] -> pooled representation [N, E] (mean over tokens)."""
        return self.encoder(x).mean(dim=1)

    def forward(self, view1: torch.Tensor, view2: torch.Tensor) -> ContrastiveOutput:
        """view1, view2: [N, C, D, H, W], two augmentations of the same N volumes (same size)."""
        n = view1.shape[0]
        h = self.embed(torch.cat([view1, view2], dim=0))  # [2N, E], one encoder pass
        z = self.projector(h)  # [2N, proj_dim]
        z1, z2 = z[:n], z[n:]
        return ContrastiveOutput(loss=nt_xent(z1, z2, self.temperature), z1=z1, z2=z2)
