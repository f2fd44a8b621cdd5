"""Swin UNETR (Hatamizadeh et al. 2022): MONAI's ``SwinUNETR``, built from the typed config, for fine-tuning a
SimMIM-pretrained Swin transformer (or MONAI's self-supervised Swin weights) for segmentation.

The encoder is ``swin_unetr.swinViT``, the same module :func:`medmim.models.swin.build_swin_encoder` builds, so
weights move between the two by name (:mod:`medmim.models.swin_transfer`).
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from torch import nn

if TYPE_CHECKING:
    from medmim.config import ModelConfig


def build_swin_unetr(model_cfg: "ModelConfig") -> nn.Module:
    """MONAI's ``SwinUNETR`` of ``model_cfg`` (``backbone=swin``): embedding and decoder width
    ``feature_size``, the stages of ``model.swin``, stochastic depth up to ``model.drop_path``;
    ``model.out_channels`` outputs (classes, or BraTS's three regions). Input ``[N, C, D, H, W]`` ->
    logits ``[N, K, D, H, W]``; each spatial size a multiple of ``swin.patch_size x 2^stages``."""
    from monai.networks.nets import SwinUNETR

    s = model_cfg.swin
    return SwinUNETR(in_channels=model_cfg.in_channels, out_channels=model_cfg.out_channels,
                     patch_size=s.patch_size[0] if len(set(s.patch_size)) == 1 else s.patch_size,
                     depths=s.depths, num_heads=s.num_heads, window_size=s.window_size, qkv_bias=model_cfg.qkv_bias,
                     mlp_ratio=s.mlp_ratio, feature_size=model_cfg.feature_size, drop_rate=model_cfg.dropout,
                     dropout_path_rate=model_cfg.drop_path, use_v2=s.use_v2)


def swin_unetr_layer_id(name: str, num_stages: int) -> int:
    """The depth of a Swin UNETR parameter for layer-wise learning-rate decay over stages: 0 for the patch
    embedding, k for stage k (its blocks, its patch merging and, with use_v2, its residual convolution),
    num_stages + 1 for the rest (the convolutional encoder blocks, decoder and head)."""
    if name.startswith("swinViT.patch_embed."):
        return 0
    m = re.match(r"swinViT\.layers(\d+)c?\.", name)
    return int(m.group(1)) if m else num_stages + 1
