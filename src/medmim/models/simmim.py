"""SimMIM (Xie et al. 2022) for 3D volumes: every token goes through the encoder, masked ones replaced
by a learnable mask token; a light head predicts the voxels of every patch; the loss counts masked
voxels only.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

import torch

from medmim.models.layers import run_blocks
from medmim.models.masking import MIMOutput, TokenMask
from medmim.models.mim import MaskedImageModel, constructor_args
from medmim.models.vit import ViT3D

# before the decoder was named as MAE's, SimMIM's head was head_embed / head_blocks / head_norm / head_pred
LEGACY_PREFIXES = {f"head_{part}.": f"decoder_{part}." for part in ("embed", "blocks", "norm", "pred")}


class SimMIM3D(MaskedImageModel):
    """SimMIM on a :class:`ViT3D`.

    Args:
        encoder: the ViT; it sees all tokens, the masked ones as ``mask_token``.
        mask_ratio: share of mask blocks hidden, in (0, 1).
        mask_patch_size: voxels per mask block along each axis, a multiple of the ViT patch
            (default: the ViT patch).
        decoder_depth: 0 (SimMIM's choice) makes the head one Linear from each token to its patch's
            voxels; more adds that many transformer blocks of ``decoder_dim`` width before it.
        decoder_dim, decoder_heads, decoder_mlp_ratio: the light head's width, heads and MLP ratio.
        loss: ``"l1"`` (SimMIM) or ``"l2"`` on voxels of masked patches.
        norm_pix_loss: predict each patch normalised to zero mean and unit variance.

    State dicts with the head's former names (``head_*``) load as they are.
    """

    def __init__(self, *, encoder: ViT3D, mask_ratio: float = 0.75, mask_patch_size: int | Sequence[int] | None = None,
                 decoder_dim: int = 384, decoder_depth: int = 0, decoder_heads: int = 12,
                 decoder_mlp_ratio: float = 4.0, loss: Literal["l1", "l2"] = "l1", norm_pix_loss: bool = False):
        super().__init__(**constructor_args(locals()))
        self._init_mask_token(encoder.hidden_size)  # stands for a hidden patch in the encoder
        self.register_load_state_dict_pre_hook(_upgrade_legacy_keys)

    def forward_encoder(self, patches: torch.Tensor, grid: Sequence[int], mask: torch.Tensor) -> torch.Tensor:
        """patches: [N, L, C*P], mask: [N, L] -> features [N, L, E]."""
        tokens = self.encoder.patch_embed(patches)  # [N, L, E]
        # masked tokens become the mask token, before the position embedding is added
        # (one select instead of two products and a sum: the same values and gradients)
        tokens = torch.where(mask.bool().unsqueeze(-1), self.mask_token.to(tokens.dtype), tokens)
        tokens = tokens + self.encoder.pos_embed_for(grid)
        return self.encoder.forward_tokens(tokens)

    def forward_decoder(self, features: torch.Tensor) -> torch.Tensor:
        """features: [N, L, E] -> pred [N, L, C*P]; no mask tokens or positions to add, the encoder did."""
        x = self.decoder_embed(features)  # [N, L, Dd]
        x = run_blocks(self.decoder_blocks, x)  # the light head is not checkpointed
        x = self.decoder_norm(x)
        return self.decoder_pred(x)  # [N, L, C*P]

    def forward(self, x: torch.Tensor, *, mask: TokenMask | torch.Tensor | None = None,
                generator: torch.Generator | None = None) -> MIMOutput:
        """x: [N, C, D, H, W]; mask: a fixed mask (TokenMask or bool [N, L]; counts may differ per sample)
        or None to draw one."""
        patches, grid = self.encoder.patchify(x)  # [N, L, C*P]
        if mask is None:
            mask = self.random_mask(x.shape[0], grid, generator=generator, device=x.device)
        token_mask = mask.mask if isinstance(mask, TokenMask) else mask.bool()  # [N, L]
        features = self.forward_encoder(patches, grid, token_mask)  # [N, L, E]
        pred = self.forward_decoder(features)  # [N, L, C*P]
        loss = self.forward_loss(patches, pred, token_mask)
        return self._output(loss, pred, patches, grid, token_mask)


def upgrade_legacy_keys(state: Mapping[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """A SimMIM state dict with the former head names (``head_pred.weight``...) -> today's names
    (``decoder_pred.weight``...), in the same order; other keys, and keys outside ``prefix``, unchanged."""
    out = {}
    for key, value in state.items():
        for old, new in LEGACY_PREFIXES.items():
            if key.startswith(prefix + old):
                key = prefix + new + key[len(prefix + old):]
                break
        out[key] = value
    return out


def _upgrade_legacy_keys(module, state_dict, prefix, *args) -> None:
    # load_state_dict pre-hook: rename in place, so resuming an old run and loading an old file both work
    if any(k.startswith(prefix + old) for k in state_dict for old in LEGACY_PREFIXES):
        upgraded = upgrade_legacy_keys(state_dict, prefix)
        state_dict.clear()
        state_dict.update(upgraded)
