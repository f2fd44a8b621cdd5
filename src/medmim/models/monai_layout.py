"""medmim's ViT3D state dicts in and out of MONAI's ``monai.networks.nets.ViT`` layout
(``proj_type="conv"``, ``classification=False``): the key mapping, both ways."""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from medmim.errors import MedmimError

Tensor = torch.Tensor


# ---------------------------------------------------------------------------------------------
# MONAI interop
# ---------------------------------------------------------------------------------------------

# medmim ViT3D name -> MONAI ViT name (blocks.{i}. prefixes are added for the per-block ones)
_TOP_TO_MONAI = {
    "patch_embed.proj.weight": "patch_embedding.patch_embeddings.weight",
    "patch_embed.proj.bias": "patch_embedding.patch_embeddings.bias",
    "pos_embed": "patch_embedding.position_embeddings",
    "norm.weight": "norm.weight",
    "norm.bias": "norm.bias",
}
_BLOCK_TO_MONAI = {
    "norm1": "norm1",
    "attn.qkv": "attn.qkv",
    "attn.proj": "attn.out_proj",
    "norm2": "norm2",
    "mlp.fc1": "mlp.linear1",
    "mlp.fc2": "mlp.linear2",
}
MONAI_ANCHOR = "patch_embedding.patch_embeddings.weight"
MEDMIM_ANCHOR = "patch_embed.proj.weight"


def strip_wrappers(key: str) -> str:
    # DataParallel/DDP ("module.") and torch.compile ("_orig_mod.") add these to every key
    key = key.replace("_orig_mod.", "")
    while key.startswith("module."):
        key = key[len("module."):]
    return key


def prefix_of(state: Mapping[str, Tensor], anchor: str) -> str | None:
    """The prefix under which ``anchor`` sits in ``state`` ("" or "something."), or None."""
    for key in state:
        if key == anchor or key.endswith("." + anchor):
            return key[: len(key) - len(anchor)]
    return None


def encoder_to_monai_vit(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A medmim encoder state dict -> a state dict for ``monai.networks.nets.ViT``.

    ``state`` is a :class:`ViT3D` state dict, or any state holding one under a prefix (a pretrainer's
    ``encoder.``, UNETR's ``vit.``). The result loads with ``strict=True`` into
    ``ViT(in_channels, img_size, patch_size, hidden_size, mlp_dim, num_layers, num_heads, proj_type="conv",
    pos_embed_type=<any>, classification=False, qkv_bias=<as the encoder>)`` and into ``.vit`` of a MONAI
    ``UNETR`` with the same settings, and computes the same features and hidden states:

    * the patch embedding's Conv3d kernel is stored as such (medmim applies it as a Linear);
    * ``pos_embed [1, L, E]`` becomes ``patch_embedding.position_embeddings`` (MONAI keeps it in the state
      dict for every ``pos_embed_type``, a frozen parameter for ``"sincos"``; values are the same table);
    * MONAI's ``TransformerBlock`` always owns a ``norm_cross_attn`` LayerNorm, unused without cross
      attention; it is exported as an identity LayerNorm.
    """
    prefix = prefix_of(state, MEDMIM_ANCHOR)
    if prefix is None:
        raise MedmimError(f"no medmim encoder in this state dict (no '{MEDMIM_ANCHOR}' key)")
    enc = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    out: dict[str, Tensor] = {}
    blocks: set[int] = set()
    for key, value in enc.items():
        if key in _TOP_TO_MONAI:
            out[_TOP_TO_MONAI[key]] = value
            continue
        m = re.fullmatch(r"blocks\.(\d+)\.(.+)\.(weight|bias)", key)
        if m is None or m.group(2) not in _BLOCK_TO_MONAI:
            raise MedmimError(f"unexpected encoder tensor '{prefix}{key}': not a medmim ViT3D state dict")
        i, part, kind = int(m.group(1)), m.group(2), m.group(3)
        out[f"blocks.{i}.{_BLOCK_TO_MONAI[part]}.{kind}"] = value
        blocks.add(i)
    for i in sorted(blocks):
        width = out[f"blocks.{i}.norm1.weight"]
        out[f"blocks.{i}.norm_cross_attn.weight"] = torch.ones_like(width)
        out[f"blocks.{i}.norm_cross_attn.bias"] = torch.zeros_like(width)
    return out


def from_monai_layout(state: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], list[str]]:
    """MONAI ViT-family state -> (ViT3D state, MONAI keys not used)."""
    prefix = prefix_of(state, MONAI_ANCHOR)
    if prefix is None:
        if any(k.endswith("patch_embedding.patch_embeddings.1.weight") for k in state):
            raise MedmimError("MONAI ViT with proj_type='perceptron' is not supported; use proj_type='conv'")
        raise MedmimError(f"no MONAI ViT in this state dict (no '{MONAI_ANCHOR}' key)")
    from_monai = {v: k for k, v in _TOP_TO_MONAI.items()}
    block_from_monai = {v: k for k, v in _BLOCK_TO_MONAI.items()}
    out: dict[str, Tensor] = {}
    ignored: list[str] = []
    for key, value in state.items():
        local = key[len(prefix):] if key.startswith(prefix) else None
        if local is None:
            ignored.append(key)
        elif local in from_monai:
            out[from_monai[local]] = value
        elif m := re.fullmatch(r"blocks\.(\d+)\.(.+)\.(weight|bias)", local):
            part = m.group(2)
            if part in block_from_monai:
                out[f"blocks.{m.group(1)}.{block_from_monai[part]}.{m.group(3)}"] = value
            else:
                ignored.append(key)  # norm_cross_attn (unused by MONAI without cross attention), ...
        elif m := re.fullmatch(r"blocks\.(\d+)\.(weight|bias)", local):
            # MaskedAutoEncoderViT keeps its final LayerNorm as the last entry of `blocks`
            out[f"norm.{m.group(2)}"] = value
        else:
            ignored.append(key)  # cls_token, decoders, UNETR's convolutional side, ...
    return out, ignored


def monai_to_encoder(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A MONAI ``ViT`` / ``ViTAutoEnc`` / ``MaskedAutoEncoderViT`` / ``UNETR`` (keys under ``vit.``) state dict
    -> a :class:`ViT3D` state dict. Tensors that are not part of the encoder are dropped (use
    :func:`load_encoder` for a report of them)."""
    return from_monai_layout({strip_wrappers(k): v for k, v in state.items()})[0]
