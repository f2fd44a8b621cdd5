"""Building blocks of the 3D ViT: patchify, patch embedding, position embeddings, attention, MLP, block.

Shapes use ``N`` batch, ``C`` channels, ``D, H, W`` voxels, ``L`` tokens, ``P`` voxels per patch
(``pd * ph * pw``) and ``E`` the embedding width.

Token order: tokens are the patch grid ``(gd, gh, gw)`` flattened row-major, which is the order of
``Conv3d(kernel=stride=patch)(x).flatten(2)`` (and so of MONAI's ViT). A patch, flattened, is ordered
``(c, pd, ph, pw)``, the order of a Conv3d kernel, so a Linear on flattened patches with weight
``conv.weight.flatten(1)`` is exactly that Conv3d.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from medmim.errors import MedmimError

Triple = tuple[int, int, int]


def to_triple(v: int | Sequence[int], name: str = "size") -> Triple:
    """``16 -> (16, 16, 16)``; a sequence of three ints is kept."""
    if isinstance(v, int):
        return (v, v, v)
    t = tuple(int(a) for a in v)
    if len(t) != 3:
        raise MedmimError(f"{name} must be one int or three ints, got {list(t)}")
    return t  # type: ignore[return-value]


def grid_size(spatial: Sequence[int], patch_size: Sequence[int]) -> Triple:
    """Token grid of a volume: ``(D, H, W) // patch_size``; the volume must tile exactly."""
    if any(s % p for s, p in zip(spatial, patch_size)) or any(s < p for s, p in zip(spatial, patch_size)):
        raise MedmimError(f"input size {list(spatial)} must be a multiple of patch_size {list(patch_size)}")
    return tuple(s // p for s, p in zip(spatial, patch_size))  # type: ignore[return-value]


# --- patches ------------------------------------------------------------------------------------

def patchify(x: torch.Tensor, patch_size: Sequence[int]) -> tuple[torch.Tensor, Triple]:
    """Cut a volume into flattened patches.

    x: [N, C, D, H, W] -> patches: [N, L, C*pd*ph*pw] (each patch ordered (c, pd, ph, pw)), grid (gd, gh, gw).
    """
    n, c = x.shape[:2]
    pd, ph, pw = patch_size
    gd, gh, gw = grid_size(x.shape[2:], patch_size)
    x = x.reshape(n, c, gd, pd, gh, ph, gw, pw)
    x = x.permute(0, 2, 4, 6, 1, 3, 5, 7)  # [N, gd, gh, gw, C, pd, ph, pw]
    return x.reshape(n, gd * gh * gw, c * pd * ph * pw), (gd, gh, gw)


def unpatchify(patches: torch.Tensor, grid: Sequence[int], patch_size: Sequence[int]) -> torch.Tensor:
    """Inverse of :func:`patchify`. patches: [N, L, C*P] -> x: [N, C, D, H, W]."""
    n = patches.shape[0]
    gd, gh, gw = grid
    pd, ph, pw = patch_size
    c = patches.shape[-1] // (pd * ph * pw)
    x = patches.reshape(n, gd, gh, gw, c, pd, ph, pw)
    x = x.permute(0, 4, 1, 5, 2, 6, 3, 7)  # [N, C, gd, pd, gh, ph, gw, pw]
    return x.reshape(n, c, gd * pd, gh * ph, gw * pw)


def gather_tokens(x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Pick tokens per sample. x: [N, L, E], ids: [N, K] -> [N, K, E]."""
    return torch.gather(x, 1, ids.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


class PatchEmbed3D(nn.Module):
    """Linear embedding of 3D patches.

    The weight is kept as a ``Conv3d(in_channels, hidden_size, kernel=stride=patch_size)`` so the state
    dict carries the patch geometry (``proj.weight: [E, C, pd, ph, pw]``) and maps one to one onto
    MONAI's ``patch_embedding.patch_embeddings``. :meth:`forward` applies it as a Linear to patches
    that were already cut (and, for MAE, already reduced to the visible ones), so voxels of masked
    patches are never embedded.
    """

    def __init__(self, *, in_channels: int, patch_size: Sequence[int], hidden_size: int):
        super().__init__()
        self.patch_size = to_triple(patch_size, "patch_size")
        self.in_channels = in_channels
        self.proj = nn.Conv3d(in_channels, hidden_size, kernel_size=self.patch_size, stride=self.patch_size)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        """patches: [N, L, C*P] (from :func:`patchify`) -> tokens: [N, L, E]."""
        return F.linear(patches, self.proj.weight.flatten(1), self.proj.bias)

    def forward_image(self, x: torch.Tensor) -> torch.Tensor:
        """The Conv3d path over a whole volume. x: [N, C, D, H, W] -> tokens: [N, L, E]."""
        return self.proj(x).flatten(2).transpose(1, 2)


# --- position embeddings --------------------------------------------------------------------------

def sincos_pos_embed_3d(grid: Sequence[int], dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """Fixed 3D sin-cos position embedding. -> [1, gd*gh*gw, dim], float32.

    The same table as MONAI's ``build_sincos_position_embedding`` (from SelfMedMAE, the paper's code):
    ``dim // 6`` frequencies per axis, concatenated as [sin, cos] of axis 1, of axis 0, then of axis 2.
    Where ``dim`` is not a multiple of 6 (a 512-wide decoder), the last ``dim % 6`` channels are zero.
    """
    gd, gh, gw = grid
    pos_dim = dim // 6
    if pos_dim == 0:
        raise MedmimError(f"a 3D sin-cos position embedding needs a width of at least 6, got {dim}")
    a0, a1, a2 = torch.meshgrid(torch.arange(gd, dtype=torch.float32), torch.arange(gh, dtype=torch.float32),
                                torch.arange(gw, dtype=torch.float32), indexing="ij")
    omega = 1.0 / temperature ** (torch.arange(pos_dim, dtype=torch.float32) / pos_dim)  # [dim // 6]
    out = [torch.outer(a.flatten(), omega) for a in (a1, a0, a2)]  # 3 x [L, dim // 6]
    emb = torch.cat([f(o) for o in out for f in (torch.sin, torch.cos)], dim=1)  # [L, 6 * (dim // 6)]
    emb = F.pad(emb, (0, dim - emb.shape[1]))  # [L, dim]
    return emb.unsqueeze(0)


def interpolate_pos_embed(pos: torch.Tensor, old_grid: Sequence[int], new_grid: Sequence[int]) -> torch.Tensor:
    """Resize a position-embedding table over the token grid (trilinear).

    pos: [1, L_old, E] -> [1, L_new, E]
    """
    if tuple(old_grid) == tuple(new_grid):
        return pos
    e = pos.shape[-1]
    x = pos.reshape(1, *old_grid, e).permute(0, 4, 1, 2, 3)  # [1, E, gd, gh, gw]
    x = F.interpolate(x.float(), size=tuple(new_grid), mode="trilinear", align_corners=False)
    return x.permute(0, 2, 3, 4, 1).reshape(1, -1, e).to(pos.dtype)


# --- transformer -------------------------------------------------------------------------------

class Attention(nn.Module):
    """Multi-head self-attention with ``F.scaled_dot_product_attention``.

    The fused ``qkv`` weight is laid out ``(3, heads, head_dim)`` along its output, as in timm and MONAI's SABlock.
    """

    def __init__(self, *, dim: int, num_heads: int, qkv_bias: bool = True, dropout: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise MedmimError(f"hidden_size ({dim}) must be divisible by num_heads ({num_heads})")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.dropout = dropout
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [N, L, E] -> [N, L, E]"""
        n, length, dim = x.shape
        qkv = self.qkv(x).reshape(n, length, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # 3 x [N, heads, L, head_dim]
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        x = x.transpose(1, 2).reshape(n, length, dim)  # [N, L, E]
        return self.proj_drop(self.proj(x))


class Mlp(nn.Module):
    """Linear -> GELU -> Linear, with dropout after each (as MONAI's MLPBlock)."""

    def __init__(self, *, dim: int, hidden_dim: int, dropout: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.drop1 = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.drop2 = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [N, L, E] -> [N, L, E]"""
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))``.

    LayerNorm epsilon is PyTorch's default (1e-5), as in MONAI's TransformerBlock, so exported
    weights give the same features there.
    """

    def __init__(self, *, dim: int, num_heads: int, mlp_dim: int, qkv_bias: bool = True, dropout: float = 0.0,
                 drop_path: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim=dim, num_heads=num_heads, qkv_bias=qkv_bias, dropout=dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim=dim, hidden_dim=mlp_dim, dropout=dropout)
        self.drop_path = drop_path  # stochastic depth: chance of skipping each residual branch, per sample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [N, L, E] -> [N, L, E]"""
        x = x + drop_path(self.attn(self.norm1(x)), self.drop_path, self.training)
        return x + drop_path(self.mlp(self.norm2(x)), self.drop_path, self.training)


def drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Stochastic depth (Huang et al. 2016): in training, zero a residual branch ``x: [N, ...]`` for a random
    share ``p`` of the samples and scale the others by 1 / (1 - p); the identity in evaluation or at p = 0."""
    if p == 0.0 or not training:
        return x
    keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1.0 - p)
    return x * keep / (1.0 - p)


def init_weights(module: nn.Module) -> None:
    """MAE's initialisation: xavier-uniform Linear weights, zero biases, unit LayerNorm.

    Apply with ``model.apply(init_weights)``; the patch embedding is initialised like a Linear over
    its flattened kernel (see :class:`PatchEmbed3D`).
    """
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
    elif isinstance(module, PatchEmbed3D):
        w = module.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(module.proj.bias)


def run_blocks(blocks: Sequence[nn.Module], x: torch.Tensor, checkpointing: bool = False,
               hidden: list[torch.Tensor] | None = None) -> torch.Tensor:
    """Apply blocks in turn, optionally with activation checkpointing; append each output to ``hidden``.

    x: [N, L, E] -> [N, L, E]
    """
    for blk in blocks:
        if checkpointing and x.requires_grad:
            x = torch.utils.checkpoint.checkpoint(blk, x, use_reentrant=False)
        else:
            x = blk(x)
        if hidden is not None:
            hidden.append(x)
    return x
