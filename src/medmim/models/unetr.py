"""UNETR (Hatamizadeh et al. 2022) on medmim's :class:`ViT3D`, wired as ``monai.networks.nets.UNETR``
from MONAI's own blocks.

Skips. MONAI's UNETR reads ``hidden_states[3]``, ``[6]``, ``[9]`` (0-based: the outputs of blocks 4, 7, 10)
and the final normed output of a 12-block ViT. For a ViT of any depth ``L >= 4`` we keep the spacing
``s = L // 4``: skips are ``hidden_states[s]``, ``[2s]``, ``[3s]`` plus the final output, which is exactly
MONAI's choice at ``L = 12`` (and blocks 2, 3, 4 of a 4-block ViT).

Patch sizes. The decoder has MONAI's four stages. With 16^3 patches every stage upsamples by 2; the
ViT skips are brought up by 1, 2 and 3 transposed convolutions of stride 2 (``UnetrPrUpBlock`` uses
one stride for all of its layers). For another patch size ``p`` (per axis) we keep the three x2 stages
and let the last stage (``decoder2``, which meets the full-resolution ``encoder1`` skip) upsample by
``p / 8``. So **each axis of patch_size must be a multiple of 8** (8, 16, 24, 32, ...): patch 16 is
MONAI's UNETR exactly, patch 8 makes the last stage a 1x1x1 transposed convolution (``encoder2`` then
sits at full resolution), patch 32 makes it x4.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from medmim.errors import MedmimError
from medmim.models.vit import ViT3D


def unetr_skip_layers(num_layers: int) -> tuple[int, int, int]:
    """0-based indices of the hidden states UNETR uses as skips: (s, 2s, 3s) with s = num_layers // 4."""
    if num_layers < 4:
        raise MedmimError(f"UNETR needs a ViT of at least 4 layers (num_layers={num_layers})")
    s = num_layers // 4
    return (s, 2 * s, 3 * s)


def unetr_last_upsample(patch_size: Sequence[int]) -> tuple[int, int, int]:
    """Upsampling factor of UNETR's last decoder stage per axis: patch / 8 (patch must be a multiple of 8)."""
    if any(p % 8 for p in patch_size):
        raise MedmimError(
            f"UNETR needs each axis of patch_size to be a multiple of 8 (three x2 decoder stages then one of "
            f"patch/8), got {list(patch_size)}")
    return tuple(p // 8 for p in patch_size)  # type: ignore[return-value]


def unetr_layer_id(name: str, num_layers: int) -> int:
    """The depth of a UNETR parameter for layer-wise learning-rate decay: 0 for the ViT's patch and position
    embeddings, i + 1 for ViT block i, num_layers + 1 for the rest (the ViT's last norm, decoder and head)."""
    if name.startswith(("vit.patch_embed.", "vit.pos_embed")):
        return 0
    m = re.match(r"vit\.blocks\.(\d+)\.", name)
    return int(m.group(1)) + 1 if m else num_layers + 1


def _train_channels_last(conv: nn.Module, x: torch.Tensor) -> bool:
    return conv.training and torch.is_grad_enabled() and x.device.type == "cpu"


class TrainChannelsLastConv3d(nn.Conv3d):
    """``nn.Conv3d`` that, in a CPU training step, hands oneDNN a channels-last copy of its (small) weight.

    Its output, and so the next layers' inputs, are then channels-last 3D, the layout whose kernels oneDNN
    runs fastest here: the convolution backward, half of a UNETR step on CPU, takes ~0.6x the time
    (benchmarks/bench_ablations.py). Parameters and state dict stay channels-first. Inference keeps the
    channels-first path: there the instance norms' layout conversions cost more than the convolutions gain.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _train_channels_last(self, x):
            return self._conv_forward(x, self.weight.contiguous(memory_format=torch.channels_last_3d), self.bias)
        return super().forward(x)


class TrainChannelsLastConvTranspose3d(nn.ConvTranspose3d):
    """``nn.ConvTranspose3d`` with the channels-last weight of :class:`TrainChannelsLastConv3d` in CPU training."""

    def forward(self, x: torch.Tensor, output_size=None) -> torch.Tensor:
        if not _train_channels_last(self, x) or output_size is not None:
            return super().forward(x, output_size)
        w = self.weight.contiguous(memory_format=torch.channels_last_3d)
        return F.conv_transpose3d(x, w, self.bias, self.stride, self.padding, self.output_padding, self.groups,
                                  self.dilation)


# the fused channels-last instance norm pays (its compile, ~6 s once per process) from this size on
FUSED_NORM_MIN_ELEMENTS = 2**21
FUSED_NORM_MIN_CHANNELS = 8  # with fewer channels PyTorch's own kernel is as fast
_fused_norm = None  # the compiled function; False once compiling failed (no C++ compiler?): PyTorch's is used


def _instance_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """Instance norm (no affine) of ``x: [N, C, D, H, W]``, mean and variance per (n, c) over space."""
    centred = x - x.mean(dim=(2, 3, 4), keepdim=True)
    return centred * torch.rsqrt(centred.square().mean(dim=(2, 3, 4), keepdim=True) + eps)


def fused_instance_norm(x: torch.Tensor, eps: float) -> torch.Tensor | None:
    """:func:`_instance_norm` compiled by inductor (one fused kernel each way, channels-last in and out),
    or None where it cannot be compiled here."""
    global _fused_norm
    if _fused_norm is None:
        _fused_norm = torch.compile(_instance_norm, dynamic=True)
    if _fused_norm is False:
        return None
    try:
        return _fused_norm(x, eps)
    except Exception as e:  # noqa: BLE001 - any compile failure: fall back to PyTorch's kernel, once said
        import warnings

        warnings.warn(f"fused instance norm unavailable ({type(e).__name__}); using PyTorch's", stacklevel=2)
        _fused_norm = False
        return None


class TrainChannelsLastInstanceNorm3d(nn.InstanceNorm3d):
    """``nn.InstanceNorm3d`` that, in a CPU training step on a large channels-last input, normalises it in
    that layout with one compiled kernel: PyTorch's own runs it as a batch norm over a channels-first
    copy, and the copies to and from that layout were ~19% of a paper-size UNETR step."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (_train_channels_last(self, x) and not self.affine and not self.track_running_stats
                and x.shape[1] >= FUSED_NORM_MIN_CHANNELS and x.numel() >= FUSED_NORM_MIN_ELEMENTS
                and x.is_contiguous(memory_format=torch.channels_last_3d)):
            y = fused_instance_norm(x, self.eps)
            if y is not None:
                return y
        return super().forward(x)


def plain_layers(module: nn.Module) -> nn.Module:
    """A copy of ``module`` with PyTorch's own convolutions in place of the classes above (the path
    before the speed-up; the same parameters): the reference the equivalence tests and ablations use."""
    import copy

    module = copy.deepcopy(module)
    for child in module.modules():
        if isinstance(child, TrainChannelsLastConv3d):
            child.__class__ = nn.Conv3d
        elif isinstance(child, TrainChannelsLastConvTranspose3d):
            child.__class__ = nn.ConvTranspose3d
        elif isinstance(child, TrainChannelsLastInstanceNorm3d):
            child.__class__ = nn.InstanceNorm3d
    return module


def _fast_layers(module: nn.Module) -> None:
    """Swap MONAI's convolutions for the classes above (same parameters, same state dict)."""
    for name, child in module.named_children():
        if type(child) is nn.Conv3d and child.padding_mode == "zeros":
            child.__class__ = TrainChannelsLastConv3d  # adds behaviour only, no state
        elif type(child) is nn.ConvTranspose3d and child.padding_mode == "zeros":
            child.__class__ = TrainChannelsLastConvTranspose3d
        elif type(child) is nn.InstanceNorm3d:
            child.__class__ = TrainChannelsLastInstanceNorm3d
        else:
            _fast_layers(child)


class UNETR(nn.Module):
    """UNETR segmentation network.

    Args:
        encoder: the :class:`ViT3D` (its patch size: a multiple of 8 per axis; its depth: >= 4).
        num_classes: output channels (classes including background).
        feature_size: width of the convolutional decoder's finest stage (16 in the paper).
        norm_name: normalisation of the convolution blocks (MONAI's name, e.g. ``"instance"``, ``"batch"``).
        conv_block, res_block: as in MONAI's UNETR.

    Input ``x: [N, C, D, H, W]``, each spatial size a multiple of the patch size; output logits
    ``[N, num_classes, D, H, W]``. The encoder's state dict lives under ``vit.`` (as in MONAI).
    """

    def __init__(
        self,
        *,
        encoder: ViT3D,
        num_classes: int = 14,
        feature_size: int = 16,
        norm_name: tuple | str = "instance",
        conv_block: bool = True,
        res_block: bool = True,
    ):
        # imported here: MONAI takes seconds to import, and only UNETR needs it
        from monai.networks.blocks import UnetOutBlock, UnetrBasicBlock, UnetrPrUpBlock, UnetrUpBlock

        super().__init__()
        self.vit = encoder
        self.skip_layers = unetr_skip_layers(encoder.num_layers)
        last_up = unetr_last_upsample(encoder.patch_size)
        hidden, f, c_in = encoder.hidden_size, feature_size, encoder.in_channels
        common = dict(spatial_dims=3, kernel_size=3, norm_name=norm_name, res_block=res_block)
        pr_up = dict(common, stride=1, upsample_kernel_size=2, conv_block=conv_block)

        # encoder side: the image itself, and three ViT skips upsampled x8, x4, x2 from the token grid
        self.encoder1 = UnetrBasicBlock(in_channels=c_in, out_channels=f, stride=1, **common)
        self.encoder2 = UnetrPrUpBlock(in_channels=hidden, out_channels=f * 2, num_layer=2, **pr_up)
        self.encoder3 = UnetrPrUpBlock(in_channels=hidden, out_channels=f * 4, num_layer=1, **pr_up)
        self.encoder4 = UnetrPrUpBlock(in_channels=hidden, out_channels=f * 8, num_layer=0, **pr_up)
        # decoder side: three x2 stages, then one of patch / 8
        self.decoder5 = UnetrUpBlock(in_channels=hidden, out_channels=f * 8, upsample_kernel_size=2, **common)
        self.decoder4 = UnetrUpBlock(in_channels=f * 8, out_channels=f * 4, upsample_kernel_size=2, **common)
        self.decoder3 = UnetrUpBlock(in_channels=f * 4, out_channels=f * 2, upsample_kernel_size=2, **common)
        self.decoder2 = UnetrUpBlock(in_channels=f * 2, out_channels=f, upsample_kernel_size=last_up, **common)
        self.out = UnetOutBlock(spatial_dims=3, in_channels=f, out_channels=num_classes)
        for block in (self.encoder1, self.encoder2, self.encoder3, self.encoder4, self.decoder5, self.decoder4,
                      self.decoder3, self.decoder2, self.out):
            _fast_layers(block)  # the convolutional decoder (the ViT is medmim's own)

    def proj_feat(self, x: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
        """tokens [N, L, E] -> feature map [N, E, gd, gh, gw]"""
        return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], *grid)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [N, C, D, H, W] -> logits [N, num_classes, D, H, W]"""
        grid = [s // p for s, p in zip(x.shape[2:], self.vit.patch_size)]
        z, hidden = self.vit(x, return_hidden=True)  # z: [N, L, E] (normed), hidden: num_layers x [N, L, E]
        a, b, c = self.skip_layers
        enc1 = self.encoder1(x)  # [N, f, D, H, W]
        enc2 = self.encoder2(self.proj_feat(hidden[a], grid))  # [N, 2f, ...]
        enc3 = self.encoder3(self.proj_feat(hidden[b], grid))  # [N, 4f, ...]
        enc4 = self.encoder4(self.proj_feat(hidden[c], grid))  # [N, 8f, ...]
        dec4 = self.proj_feat(z, grid)  # [N, E, gd, gh, gw]
        dec3 = self.decoder5(dec4, enc4)
        dec2 = self.decoder4(dec3, enc3)
        dec1 = self.decoder3(dec2, enc2)
        out = self.decoder2(dec1, enc1)
        return self.out(out)


@contextlib.contextmanager
def vit_features_averaged(model: nn.Module):
    """While active, ``model.vit`` returns each of its outputs (the final tokens and every hidden state)
    replaced by its mean over the window's tokens, so the ViT carries no spatial information to the
    decoder and only UNETR's convolutional path from the image remains: the "ViT reliance" diagnostic
    (``medmim evaluate --vit-reliance``). The forward hook that does it is removed on exit, exceptions too.
    """
    vit = getattr(model, "vit", None)
    if not isinstance(vit, nn.Module):
        raise MedmimError(f"{type(model).__name__} has no ViT encoder (.vit) whose features could be averaged; "
                          f"the ViT-features diagnostic needs a UNETR")

    def mean(t: torch.Tensor) -> torch.Tensor:  # [N, L, E] -> the same, each token the mean over the L tokens
        return t.mean(dim=1, keepdim=True).expand_as(t)

    def hook(module: nn.Module, args, output):
        if isinstance(output, torch.Tensor):  # called without return_hidden
            return mean(output)
        z, hidden = output
        return mean(z), [mean(h) for h in hidden]

    handle = vit.register_forward_hook(hook)
    try:
        yield model
    finally:
        handle.remove()
