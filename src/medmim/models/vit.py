"""ViT3D: the one encoder of medmim, shared by MAE, SimMIM, SimCLR and UNETR.

A volume is cut into patches, patches become tokens (a Linear on flattened patches, equal to a
``Conv3d(kernel=stride=patch)``), a position embedding is added, pre-norm transformer blocks run, and a
final LayerNorm closes. With ``ids_keep`` only those tokens are embedded and processed (MAE).

State-dict layout (see ``transfer.encoder_to_monai_vit`` for MONAI's names)::

    patch_embed.proj.weight  [E, C, pd, ph, pw]     patch_embed.proj.bias  [E]
    pos_embed                [1, L, E]               (a buffer for sin-cos, a parameter when learnable)
    blocks.{i}.norm1 / attn.qkv / attn.proj / norm2 / mlp.fc1 / mlp.fc2
    norm
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import nn

from medmim.errors import MedmimError
from medmim.models.layers import (
    Block,
    PatchEmbed3D,
    gather_tokens,
    grid_size,
    init_weights,
    interpolate_pos_embed,
    patchify,
    run_blocks,
    sincos_pos_embed_3d,
    to_triple,
)


class ViT3D(nn.Module):
    """3D Vision Transformer encoder.

    Args:
        in_channels: image channels (>= 1).
        img_size: voxels ``(D, H, W)`` the position embedding is built for; other sizes that are
            multiples of ``patch_size`` work too (sin-cos is recomputed, a learnable table is
            interpolated trilinearly over the token grid).
        patch_size: voxels per patch along each axis, e.g. 16 or ``(16, 16, 8)``.
        hidden_size: token width ``E``.
        num_layers: transformer blocks.
        num_heads: attention heads (``hidden_size`` must divide by it).
        mlp_dim: hidden width of each block's MLP.
        pos_embed: ``"sincos"`` (fixed, a buffer) or ``"learnable"`` (a parameter, trunc-normal std 0.02).
        dropout: dropout after the position embedding, on attention weights, and in the MLP.
        drop_path: stochastic depth of the last block (rising linearly from 0 at the first); off in evaluation.
        qkv_bias: bias in the fused qkv projection.

    Input ``x: [N, C, D, H, W]`` float; output tokens ``[N, L, E]`` (``L`` = tokens of the grid, or the
    number of kept tokens when ``ids_keep`` is given).
    """

    def __init__(
        self,
        *,
        in_channels: int = 1,
        img_size: int | Sequence[int] = (96, 96, 96),
        patch_size: int | Sequence[int] = (16, 16, 16),
        hidden_size: int = 768,
        num_layers: int = 12,
        num_heads: int = 12,
        mlp_dim: int = 3072,
        pos_embed: Literal["sincos", "learnable"] = "sincos",
        dropout: float = 0.0,
        qkv_bias: bool = True,
        drop_path: float = 0.0,
    ):
        super().__init__()
        if in_channels < 1:
            raise MedmimError(f"in_channels must be >= 1, got {in_channels}")
        if pos_embed not in ("sincos", "learnable"):
            raise MedmimError(f"pos_embed must be 'sincos' or 'learnable', got {pos_embed!r}")
        self.in_channels = in_channels
        self.img_size = to_triple(img_size, "img_size")
        self.patch_size = to_triple(patch_size, "patch_size")
        self.grid = grid_size(self.img_size, self.patch_size)
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.pos_embed_type = pos_embed
        self.grad_checkpointing = False

        self.patch_embed = PatchEmbed3D(in_channels=in_channels, patch_size=self.patch_size, hidden_size=hidden_size)
        table = sincos_pos_embed_3d(self.grid, hidden_size)  # [1, L, E]
        if pos_embed == "sincos":
            self.register_buffer("pos_embed", table)
        else:
            self.pos_embed = nn.Parameter(torch.zeros_like(table))
        self.pos_drop = nn.Dropout(dropout)
        if not 0.0 <= drop_path < 1.0:
            raise MedmimError(f"drop_path must be in [0, 1), got {drop_path}")
        # stochastic depth rising linearly from 0 at the first block to drop_path at the last (as in timm)
        rates = [drop_path * i / max(num_layers - 1, 1) for i in range(num_layers)]
        self.blocks = nn.ModuleList(
            Block(dim=hidden_size, num_heads=num_heads, mlp_dim=mlp_dim, qkv_bias=qkv_bias, dropout=dropout,
                  drop_path=rate)
            for rate in rates
        )
        self.norm = nn.LayerNorm(hidden_size)

        self.apply(init_weights)
        if pos_embed == "learnable":
            nn.init.trunc_normal_(self.pos_embed, std=0.02, a=-2.0, b=2.0)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute block activations in the backward pass (less memory, ~30% more compute)."""
        self.grad_checkpointing = enable

    def pos_embed_for(self, grid: Sequence[int]) -> torch.Tensor:
        """Position embedding of a token grid -> [1, L, E]."""
        if tuple(grid) == self.grid:
            return self.pos_embed
        if self.pos_embed_type == "sincos":
            return sincos_pos_embed_3d(grid, self.hidden_size).to(self.pos_embed)
        return interpolate_pos_embed(self.pos_embed, self.grid, grid)

    def patchify(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """x: [N, C, D, H, W] -> patches [N, L, C*P], grid (gd, gh, gw)."""
        if x.ndim != 5 or x.shape[1] != self.in_channels:
            raise MedmimError(f"expected an input [N, {self.in_channels}, D, H, W] (in_channels={self.in_channels}), "
                              f"got {list(x.shape)}")
        return patchify(x, self.patch_size)

    def embed(self, patches: torch.Tensor, grid: Sequence[int], ids_keep: torch.Tensor | None = None) -> torch.Tensor:
        """Embed patches (only the kept ones) and add their position embedding.

        patches: [N, L, C*P], ids_keep: [N, K] or None -> tokens [N, K, E] (K = L without ids_keep)
        """
        pos = self.pos_embed_for(grid).expand(patches.shape[0], -1, -1)  # [N, L, E]
        if ids_keep is not None:
            # drop masked patches before the embedding: their voxels are never multiplied
            patches = gather_tokens(patches, ids_keep)  # [N, K, C*P]
            pos = gather_tokens(pos, ids_keep)  # [N, K, E]
        return self.patch_embed(patches) + pos

    def forward_tokens(self, tokens: torch.Tensor, *, return_hidden: bool = False):
        """Run the transformer on embedded tokens (position embedding already added).

        tokens: [N, L, E] -> features [N, L, E] (after the final norm), and with ``return_hidden``
        also the list of every block's output (before the final norm), as MONAI's ViT returns them.
        """
        x = self.pos_drop(tokens)
        hidden: list[torch.Tensor] | None = [] if return_hidden else None
        x = run_blocks(self.blocks, x, self.grad_checkpointing, hidden)
        x = self.norm(x)
        return (x, hidden) if return_hidden else x

    def forward(self, x: torch.Tensor, *, ids_keep: torch.Tensor | None = None, return_hidden: bool = False):
        """x: [N, C, D, H, W], ids_keep: [N, K] token indices to keep (None: all).

        Returns features [N, K, E]; with ``return_hidden``, ``(features, [hidden_1 .. hidden_num_layers])``.
        """
        patches, grid = self.patchify(x)  # [N, L, C*P]
        tokens = self.embed(patches, grid, ids_keep)  # [N, K, E]
        return self.forward_tokens(tokens, return_hidden=return_hidden)
