"""SimMIM (Xie et al. 2022) on MONAI's 3D Swin transformer, the encoder of Swin UNETR.

The encoder is ``monai.networks.nets.swin_unetr.SwinTransformer`` built with the arguments ``SwinUNETR`` gives
its ``swinViT``, so its state dict loads as it is into a Swin UNETR for fine-tuning. SimMIM runs that encoder on
every token: the patch embeddings of masked tokens are replaced by a learned mask token before the first stage
(a windowed transformer cannot drop tokens, as MAE's encoder does), then the stages run as in MONAI's
``SwinTransformer.forward``. The head is SimMIM's for Swin, in 3D: a 1x1x1 convolution from the last stage's
features to ``stride^3 x C`` channels and a pixel shuffle back to the voxels. The loss counts masked voxels only.

Shapes: ``N`` batch, ``C`` channels, ``D, H, W`` voxels, ``E`` the embedding width (``model.feature_size``),
``L`` tokens of the patch grid ``(D, H, W) // patch_size`` in raster order (the order of a Conv3d's output).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

import torch
from monai.networks.nets.swin_unetr import SwinTransformer
from torch import nn

from medmim.errors import MedmimError
from medmim.models.layers import to_triple
from medmim.models.masking import MIMOutput, TokenMask, mask_size_in_tokens, mask_to_image, random_masking

if TYPE_CHECKING:
    from medmim.config import ModelConfig

# MONAI's SwinTransformer has four stages, layers1..layers4 (and layers1c..layers4c with use_v2)
NUM_STAGES = 4
# the mask block SimMIM's masking uses by default, in voxels per axis (when the Swin patch divides it)
DEFAULT_MASK_VOXELS = 16


def build_swin_encoder(model_cfg: "ModelConfig") -> SwinTransformer:
    """MONAI's SwinTransformer of ``model_cfg`` (``backbone=swin``), constructed exactly as ``SwinUNETR`` of the same
    settings constructs its ``swinViT``: its state dict loads strictly into ``SwinUNETR(...).swinViT`` and back.

    Refused (MedmimError): a stage count other than MONAI's four, and a ``feature_size`` SwinUNETR would refuse
    (not a multiple of 12), since the pretrained encoder could then not be fine-tuned.
    """
    s = model_cfg.swin
    if len(s.depths) != NUM_STAGES:
        raise MedmimError(f"model.swin.depths {list(s.depths)} must name {NUM_STAGES} stages: MONAI's Swin "
                          f"transformer has exactly {NUM_STAGES}")
    if model_cfg.feature_size % 12:
        raise MedmimError(f"model.feature_size ({model_cfg.feature_size}) must be a multiple of 12 for the Swin "
                          "transformer (MONAI's SwinUNETR requires it)")
    # SwinUNETR.__init__'s call, argument for argument (the Hyena and flash-attention options at their defaults)
    return SwinTransformer(
        in_chans=model_cfg.in_channels,
        embed_dim=model_cfg.feature_size,
        window_size=tuple(s.window_size),
        patch_size=tuple(s.patch_size),
        depths=tuple(s.depths),
        num_heads=tuple(s.num_heads),
        mlp_ratio=s.mlp_ratio,
        qkv_bias=model_cfg.qkv_bias,
        drop_rate=model_cfg.dropout,
        attn_drop_rate=0.0,
        drop_path_rate=model_cfg.drop_path,
        norm_layer=nn.LayerNorm,
        patch_norm=False,
        use_checkpoint=False,
        spatial_dims=3,
        downsample="merging",
        use_v2=s.use_v2,
    )


def default_mask_patch_size(patch_size: Sequence[int]) -> tuple[int, int, int]:
    """16 voxels per axis where the Swin patch divides 16 (8 tokens at the usual patch of 2), else one patch."""
    return tuple(DEFAULT_MASK_VOXELS if DEFAULT_MASK_VOXELS % p == 0 else int(p) for p in patch_size)  # type: ignore


def pixel_shuffle_3d(x: torch.Tensor, factor: Sequence[int]) -> torch.Tensor:
    """[N, C*fd*fh*fw, d, h, w] -> [N, C, d*fd, h*fh, w*fw]: each location's channels become its block of voxels
    (channels ordered (c, fd, fh, fw), as torch's 2D PixelShuffle orders (c, fh, fw))."""
    n, k, d, h, w = x.shape
    fd, fh, fw = factor
    c = k // (fd * fh * fw)
    x = x.reshape(n, c, fd, fh, fw, d, h, w)
    x = x.permute(0, 1, 5, 2, 6, 3, 7, 4)  # [N, C, d, fd, h, fh, w, fw]
    return x.reshape(n, c, d * fd, h * fh, w * fw)


class SwinSimMIM3D(nn.Module):
    """SimMIM on MONAI's 3D :class:`SwinTransformer` (from :func:`build_swin_encoder`).

    Args:
        encoder: the Swin transformer; it sees all tokens, the masked ones as ``mask_token``.
        mask_ratio: share of mask blocks hidden, in (0, 1).
        mask_patch_size: voxels per mask block along each axis, a multiple of the Swin patch (default: 16 voxels
            on each axis the patch divides 16, else the patch: SimMIM masks blocks far larger than a Swin patch).
        decoder_dim, decoder_heads: accepted with the rest of ``pretrain.simmim`` and unused: the head has no
            transformer, its width is the last stage's.
        decoder_depth: must be 0 (SimMIM's Swin head is a linear projection).
        loss: ``"l1"`` (SimMIM) or ``"l2"`` on voxels of masked tokens.
        norm_pix_loss: must be False (not implemented for the Swin head).

    Input sizes must be multiples of the encoder's stride, ``patch_size x 2^4`` (32 voxels at patch 2).
    """

    def __init__(self, *, encoder: SwinTransformer, mask_ratio: float = 0.75,
                 mask_patch_size: int | Sequence[int] | None = None, decoder_dim: int = 384, decoder_depth: int = 0,
                 decoder_heads: int = 12, loss: Literal["l1", "l2"] = "l1", norm_pix_loss: bool = False):
        super().__init__()
        if decoder_depth != 0:
            raise MedmimError(f"decoder_depth={decoder_depth} (pretrain.simmim.decoder_depth) is not supported with "
                              "the Swin transformer: its SimMIM head is a linear projection; use decoder_depth=0")
        if norm_pix_loss:
            raise MedmimError("norm_pix_loss=true (pretrain.simmim.norm_pix_loss) is not supported with the Swin "
                              "transformer; use norm_pix_loss=false")
        if loss not in ("l1", "l2"):
            raise MedmimError(f"loss must be 'l1' or 'l2', got {loss!r}")
        if not 0.0 < mask_ratio < 1.0:
            raise MedmimError(f"mask_ratio must be in (0, 1), got {mask_ratio}")
        self.encoder = encoder
        self.patch_size = to_triple(encoder.patch_size, "patch_size")  # voxels per token
        self.mask_ratio = mask_ratio
        self.mask_patch_size = to_triple(mask_patch_size or default_mask_patch_size(self.patch_size), "mask_patch_size")
        self.mask_size = mask_size_in_tokens(self.mask_patch_size, self.patch_size)  # tokens per mask block
        self.loss_kind = loss
        self.norm_pix_loss = norm_pix_loss
        self.grad_checkpointing = False
        self.in_channels = encoder.patch_embed.proj.in_channels
        self.embed_dim = encoder.embed_dim
        # every stage ends in a patch merging: the last one gives 2^4 E channels at 1/(patch x 2^4) of the size
        self.stride = tuple(p * 2 ** NUM_STAGES for p in self.patch_size)
        self.feature_dim = self.embed_dim * 2 ** NUM_STAGES

        # the head: a 1x1x1 convolution to the voxels of each last-stage location, then a pixel shuffle
        voxels = self.stride[0] * self.stride[1] * self.stride[2]
        self.decoder_pred = nn.Conv3d(self.feature_dim, voxels * self.in_channels, kernel_size=1)
        # stands for a hidden patch's embedding, channel-first as MONAI's patch embedding: [1, E, 1, 1, 1]
        self.mask_token = nn.Parameter(torch.zeros(1, self.embed_dim, 1, 1, 1))
        nn.init.trunc_normal_(self.mask_token, std=0.02)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """MONAI's Swin blocks read their ``use_checkpoint`` at every forward: set it on each of them."""
        self.grad_checkpointing = enable
        for m in self.encoder.modules():
            if hasattr(m, "use_checkpoint"):
                m.use_checkpoint = enable

    def grid_of(self, x: torch.Tensor) -> tuple[int, int, int]:
        """x: [N, C, D, H, W] -> the token grid (D, H, W) // patch_size; the size must be a multiple of the stride."""
        spatial = tuple(int(s) for s in x.shape[2:])
        if len(spatial) != 3 or any(s % k or s < k for s, k in zip(spatial, self.stride)):
            raise MedmimError(f"input size {list(spatial)} must be a multiple of {list(self.stride)} voxels for the "
                              f"Swin transformer (model.swin.patch_size {list(self.patch_size)} x 2^{NUM_STAGES})")
        return tuple(s // p for s, p in zip(spatial, self.patch_size))  # type: ignore[return-value]

    def random_mask(self, batch_size: int, grid: Sequence[int], *, generator: torch.Generator | None = None,
                    device: torch.device | str | None = None) -> TokenMask:
        """A fresh mask for a batch -> TokenMask with mask [N, L]."""
        return random_masking(batch_size, grid, mask_ratio=self.mask_ratio, mask_size=self.mask_size,
                              generator=generator, device=device)

    def forward_encoder(self, x: torch.Tensor, token_mask: torch.Tensor) -> torch.Tensor:
        """x: [N, C, D, H, W], token_mask: [N, L] bool -> last-stage features [N, 16E, D/s, H/s, W/s] (s the stride),
        layer-normalised as SwinUNETR reads them (``proj_out(normalize=True)``)."""
        enc = self.encoder
        tokens = enc.patch_embed(x)  # [N, E, gd, gh, gw]
        # masked tokens become the mask token before anything mixes tokens (dropout, then the stages)
        hidden = token_mask.reshape(tokens.shape[0], 1, *tokens.shape[2:])  # [N, 1, gd, gh, gw]
        tokens = torch.where(hidden, self.mask_token.to(tokens.dtype), tokens)
        h = enc.pos_drop(tokens)
        # the stages as in SwinTransformer.forward: (v2: a residual conv block, then) the Swin blocks and merging
        for i in range(1, NUM_STAGES + 1):
            if enc.use_v2:
                h = getattr(enc, f"layers{i}c")[0](h.contiguous())
            h = getattr(enc, f"layers{i}")[0](h.contiguous())  # [N, 2^i E, gd/2^i, ...]
        return enc.proj_out(h, normalize=True)

    def forward_decoder(self, features: torch.Tensor) -> torch.Tensor:
        """features: [N, 16E, d, h, w] -> pred [N, C, d*s, h*s, w*s], every voxel predicted."""
        return pixel_shuffle_3d(self.decoder_pred(features), self.stride)

    def forward_loss(self, x: torch.Tensor, pred: torch.Tensor, voxel_mask: torch.Tensor) -> torch.Tensor:
        """x, pred: [N, C, D, H, W]; voxel_mask: [N, 1, D, H, W] (1 = masked). Mean error over the voxels of masked
        tokens, every channel; visible voxels weigh nothing."""
        diff = pred.float() - x.float()
        err = diff.abs() if self.loss_kind == "l1" else diff.square()  # [N, C, D, H, W]
        counted = voxel_mask.sum() * x.shape[1]
        return (err * voxel_mask).sum() / counted.clamp_min(1.0)

    def forward(self, x: torch.Tensor, *, mask: TokenMask | torch.Tensor | None = None,
                generator: torch.Generator | None = None) -> MIMOutput:
        """x: [N, C, D, H, W]; mask: a fixed mask (TokenMask or bool [N, L]) or None to draw one."""
        grid = self.grid_of(x)
        if mask is None:
            mask = self.random_mask(x.shape[0], grid, generator=generator, device=x.device)
        token_mask = (mask.mask if isinstance(mask, TokenMask) else mask).bool().to(x.device)  # [N, L]
        if tuple(token_mask.shape) != (x.shape[0], grid[0] * grid[1] * grid[2]):
            raise ValueError(f"mask of shape {list(token_mask.shape)} for a batch of {x.shape[0]} on a token grid "
                             f"{list(grid)}")
        features = self.forward_encoder(x, token_mask)  # [N, 16E, d, h, w]
        pred = self.forward_decoder(features)  # [N, C, D, H, W]
        voxel_mask = mask_to_image(token_mask, grid, self.patch_size)  # [N, 1, D, H, W]
        loss = self.forward_loss(x, pred, voxel_mask)
        return MIMOutput(loss=loss, pred=pred.detach().float(), mask=voxel_mask, token_mask=token_mask)
