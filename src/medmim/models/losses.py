"""Pretraining losses: reconstruction of masked patches (MAE, SimMIM) and NT-Xent (SimCLR)."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F


def patch_norm(target: torch.Tensor, eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Normalise each patch to zero mean, unit variance (MAE's norm-pix target).

    target: [N, L, P] -> (normalised [N, L, P], mean [N, L, 1], std [N, L, 1])
    """
    mean = target.mean(dim=-1, keepdim=True)
    std = (target.var(dim=-1, keepdim=True) + eps).sqrt()
    return (target - mean) / std, mean, std


def masked_patch_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor,
    *,
    kind: Literal["l1", "l2"] = "l2",
) -> torch.Tensor:
    """Mean L1 / L2 error over the voxels of masked patches only.

    pred, target: [N, L, P] voxels per patch; mask: [N, L], 1 = masked. Visible patches weigh nothing.
    As every patch has P voxels, this is the mean over all masked voxels.
    """
    diff = pred.float() - target.float()
    err = diff.abs() if kind == "l1" else diff.square()
    per_patch = err.mean(dim=-1)  # [N, L]
    mask = mask.to(per_patch.dtype)
    return (per_patch * mask).sum() / mask.sum().clamp_min(1.0)


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """SimCLR's normalised-temperature cross entropy over a batch of view pairs.

    z1, z2: [N, K] projections of two views of the same N images. Each of the 2N projections must pick
    its partner among the other 2N - 1 (cosine similarity / temperature). Returns the mean loss.
    """
    n = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2], dim=0).float(), dim=1)  # [2N, K]
    logits = z @ z.t() / temperature  # [2N, 2N]
    # a projection is never its own candidate
    logits = logits.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), float("-inf"))
    targets = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)  # partner of each row
    return F.cross_entropy(logits, targets)
