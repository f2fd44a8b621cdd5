"""Models: the ViT3D encoder, the three pretrainers (MAE, SimMIM, SimCLR), UNETR, and weight transfer.

Every class has a plain keyword-argument constructor; the ``build_*`` functions below make them from
the typed config (:mod:`medmim.config`). Models know nothing of files or the CLI, except
:mod:`medmim.models.transfer`, whose job is weights in and out.

    encoder = build_encoder(cfg.model)          # ViT3D
    pretrainer = build_pretrainer(cfg)          # MAE3D | SimMIM3D | SimCLR3D, per cfg.pretrain.method
    unetr = build_unetr(cfg.model)              # UNETR (weights: transfer.load_pretrained)
    segmenter = build_segmenter(cfg.model)      # UNETR or LinearProbe, per cfg.model.head; SwinUNETR for Swin
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

from medmim.models.mae import MAE3D
from medmim.models.masking import MIMOutput, TokenMask, mask_to_image, random_masking
from medmim.models.simclr import ContrastiveOutput, SimCLR3D
from medmim.models.probe import LinearProbe
from medmim.models.simmim import SimMIM3D
from medmim.models.transfer import (
    Checkpoint,
    TransferReport,
    encoder_to_monai_vit,
    load_encoder,
    load_pretrained,
    load_weights,
    monai_to_encoder,
    read_checkpoint,
    save_weights,
)
from medmim.models.unetr import UNETR
from medmim.models.vit import ViT3D

if TYPE_CHECKING:
    from medmim.config import Config, ModelConfig

PRETRAINERS = {"mae": MAE3D, "simmim": SimMIM3D, "simclr": SimCLR3D}

__all__ = [
    "MAE3D", "SimMIM3D", "SimCLR3D", "UNETR", "LinearProbe", "ViT3D",
    "MIMOutput", "ContrastiveOutput", "TokenMask", "random_masking", "mask_to_image",
    "TransferReport", "Checkpoint", "load_encoder", "load_pretrained", "read_checkpoint", "save_weights",
    "load_weights", "encoder_to_monai_vit", "monai_to_encoder",
    "build_encoder", "build_pretrainer", "build_unetr", "build_segmenter",
    "count_parameters",
]


def build_encoder(model_cfg: "ModelConfig") -> ViT3D:
    """The ViT3D of ``cfg.model``."""
    return ViT3D(
        in_channels=model_cfg.in_channels,
        img_size=model_cfg.img_size,
        patch_size=model_cfg.patch_size,
        hidden_size=model_cfg.hidden_size,
        num_layers=model_cfg.num_layers,
        num_heads=model_cfg.num_heads,
        mlp_dim=model_cfg.mlp_dim,
        pos_embed=model_cfg.pos_embed,
        dropout=model_cfg.dropout,
        drop_path=model_cfg.drop_path,
        qkv_bias=model_cfg.qkv_bias,
    )


def build_pretrainer(cfg: "Config") -> nn.Module:
    """The pretrainer of ``cfg.pretrain.method`` on the encoder of ``cfg.model``, with that method's settings
    (``cfg.pretrain.mae``, ``.simmim`` or ``.simclr``): MAE3D, SimMIM3D or SimCLR3D on the ViT, SwinSimMIM3D on
    the Swin transformer (the config refuses the other methods there)."""
    method, settings = cfg.pretrain.method, cfg.pretrain.settings.model_dump()
    if cfg.model.backbone == "swin":
        from medmim.models.swin import SwinSimMIM3D, build_swin_encoder

        return SwinSimMIM3D(encoder=build_swin_encoder(cfg.model), **settings)
    encoder = build_encoder(cfg.model)
    return PRETRAINERS[method](encoder=encoder, **settings)


def build_unetr(model_cfg: "ModelConfig") -> UNETR:
    """UNETR on the encoder of ``cfg.model``, randomly initialised.

    ``model_cfg.pretrained`` is not read here: call
    ``transfer.load_pretrained(unetr, model_cfg.pretrained, partial=model_cfg.partial_load)`` and log its report.
    """
    return UNETR(encoder=build_encoder(model_cfg), num_classes=model_cfg.out_channels,
                 feature_size=model_cfg.feature_size)


def build_segmenter(model_cfg: "ModelConfig") -> nn.Module:
    """The segmentation model: UNETR, or the linear probe on the frozen ViT (``model_cfg.head``); MONAI's Swin
    UNETR for ``backbone=swin``."""
    if model_cfg.backbone == "swin":
        from medmim.models.swin_unetr import build_swin_unetr

        return build_swin_unetr(model_cfg)
    if model_cfg.head == "probe":
        return LinearProbe(encoder=build_encoder(model_cfg), num_classes=model_cfg.out_channels,
                           norm=model_cfg.probe_norm)
    return build_unetr(model_cfg)


def count_parameters(module: nn.Module, *, trainable_only: bool = False) -> int:
    """Number of parameter elements (buffers such as a sin-cos table are not parameters)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)
