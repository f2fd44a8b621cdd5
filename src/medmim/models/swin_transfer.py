"""Weights in and out of MONAI's 3D Swin transformer (``monai.networks.nets.swin_unetr.SwinTransformer``, the
encoder ``swinViT`` of ``SwinUNETR``).

* :func:`load_swin_encoder` puts the encoder of a checkpoint into a SwinTransformer and returns a
  :class:`~medmim.models.transfer.TransferReport`, as :func:`medmim.models.transfer.load_encoder` does for the ViT:
  a wrong shape raises, an encoder that would load only in part raises unless ``partial=True``; there is no
  silent partial load. It reads

  - a bare SwinTransformer state dict (``patch_embed.*``, ``layers1.0.blocks.0.*``, ...);
  - a Swin UNETR state dict (the encoder under ``swinViT.``; ``swin_vit.`` as some of MONAI's research
    checkpoints name it);
  - a medmim SimMIM-Swin pretrainer (the encoder under ``encoder.``, with a ``mask_token`` and a head);
  - MONAI's released self-supervised Swin UNETR weights (``model_swinvit.pt``: keys under ``module.``, the
    blocks' MLP named ``mlp.fc1`` / ``mlp.fc2`` where MONAI's module has ``mlp.linear1`` / ``mlp.linear2``,
    and the self-supervised heads ``rotation_head``, ``contrastive_head``, ``convTrans3d``, ...);
  - the Disruptive Autoencoders weights that ``monai.networks.nets.swin_unetr.filter_swinunetr`` reads
    (``encoder.layers1.0.0.blocks.0.*``: one index more per stage);
  - any of these under a DataParallel / DDP ``module.`` prefix (or torch.compile's ``_orig_mod.``).

* :func:`swin_encoder_to_monai` gives an encoder's tensors named as ``SwinUNETR.swinViT`` expects
  (``swin_unetr.swinViT.load_state_dict(out, strict=True)``), :func:`swin_encoder_to_model_swinvit` the
  ``model_swinvit.pt`` layout that MONAI's ``SwinUNETR.load_from`` reads.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from medmim.errors import MedmimError
from medmim.models.monai_layout import strip_wrappers
from medmim.models.transfer import _STATE_KEYS, TransferReport, _best_prefix, adapt_input_channels, load_whole

Tensor = torch.Tensor

# a SwinTransformer tensor, as a local name: the patch embedding, a stage (its blocks, its patch merging) or,
# with use_v2, a stage's residual convolution (layers1c...)
_SWIN_NAME = re.compile(r"(patch_embed\.|layers\d+c?\.\d+\.)")
# the blocks' MLP as MONAI's research code (and model_swinvit.pt) names it, and as MONAI's module does
_FC = re.compile(r"(layers\d+\.\d+\.blocks\.\d+\.mlp\.)fc([12])\.")
_LINEAR = re.compile(r"(layers\d+\.\d+\.blocks\.\d+\.mlp\.)linear([12])\.")
# Disruptive Autoencoders' encoder has one index more per stage: layers1.0.0.blocks.0.* for layers1.0.blocks.0.*
_EXTRA_INDEX = re.compile(r"(layers\d+\.\d+\.)\d+\.(?=blocks\.|downsample\.)")
# the self-supervised heads of MONAI's Swin UNETR pretraining (rotation, contrastive, reconstruction)
_SSL_HEADS = ("rotation_head.", "rotation_pre.", "contrastive_head.", "contrastive_pre.", "convTrans3d.", "conv.")
_INDEX = "relative_position_index"

MODEL_SWINVIT_LAYOUT = "MONAI self-supervised Swin UNETR weights (model_swinvit.pt layout)"


# ---------------------------------------------------------------------------------------------
# Key translation
# ---------------------------------------------------------------------------------------------


def _translate(state: Mapping[str, Tensor], source: str) -> tuple[dict[str, Tensor], dict[str, str], dict[str, bool]]:
    """Checkpoint names -> MONAI SwinTransformer names: (translated state, translated -> original name, what
    was done: 'module' (a DDP prefix), 'fc' (mlp.fc1/fc2), 'extra_index' (Disruptive Autoencoders' stages))."""
    out: dict[str, Tensor] = {}
    original: dict[str, str] = {}
    seen = {"module": False, "fc": False, "extra_index": False}
    for key, value in state.items():
        if not isinstance(value, Tensor):
            continue
        name = strip_wrappers(key)
        seen["module"] |= key.startswith("module.")
        name, n = _EXTRA_INDEX.subn(r"\1", name)
        seen["extra_index"] |= n > 0
        renamed = _FC.sub(r"\1linear\2.", name)
        seen["fc"] |= renamed != name
        name = renamed
        if name in out:
            raise MedmimError(f"{source}: '{original[name]}' and '{key}' both stand for the encoder tensor '{name}'")
        out[name] = value
        original[name] = key
    return out, original, seen


def _compact(names: Sequence[str], most: int = 6) -> str:
    """Swin names grouped by block: 'layers4.0.blocks.0.* (13), layers4.0.downsample.* (3)'."""
    groups: dict[str, list[str]] = {}
    for name in names:
        m = re.match(r"(.*?layers\d+c?\.\d+\.(?:blocks\.\d+|downsample)|.*?layers\d+c?\.\d+|.*?patch_embed)\.", name)
        groups.setdefault(m.group(1) if m else name, []).append(name)
    parts = [stem if members == [stem] else f"{stem}.* ({len(members)})" for stem, members in groups.items()]
    return ", ".join(parts[:most]) + (f", ... ({len(parts) - most} more groups)" if len(parts) > most else "")


def _layout(prefix: str, state: Mapping[str, Tensor], seen: Mapping[str, bool]) -> str:
    """A line for the report: which layout the checkpoint was recognised as."""
    ddp = seen["module"]
    if prefix == "" and (seen["fc"] or any(k.startswith(_SSL_HEADS) for k in state)):
        return MODEL_SWINVIT_LAYOUT  # its "module." is part of the layout
    if prefix == "":
        what = "a bare SwinTransformer (SwinUNETR.swinViT) state dict"
    elif prefix == "swinViT.":
        what = "Swin UNETR (encoder under 'swinViT.')"
    elif prefix == "swin_vit.":
        what = "Swin UNETR, research code's naming (encoder under 'swin_vit.', read as 'swinViT.')"
    elif prefix == "encoder." and seen["extra_index"]:
        what = ("Disruptive Autoencoders Swin weights (ssl_pretrained_weights.pth layout, as MONAI's "
                "filter_swinunetr reads: layersN.0.0.* read as layersN.0.*)")
    elif prefix == "encoder." and "mask_token" in state:
        what = "medmim SimMIM-Swin pretrainer (encoder under 'encoder.')"
    else:
        what = f"a Swin transformer encoder under '{prefix}'"
    return f"{what}, under a DDP 'module.' prefix" if ddp else what


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def load_swin_encoder(
    encoder: nn.Module,
    state: Mapping[str, Tensor],
    *,
    partial: bool = False,
    source: str = "checkpoint",
    source_channels: Sequence[str] | None = None,
    channels: Sequence[str] | None = None,
) -> TransferReport:
    """Load the Swin transformer encoder of ``state`` into ``encoder``; return what was loaded, missing and ignored.

    Args:
        encoder: a MONAI ``SwinTransformer`` (e.g. ``SwinUNETR(...).swinViT``).
        state: a flat state dict (unwrapped from ``"state_dict"`` / ``"model"``; :func:`read_checkpoint` does
            that for files) in any of the layouts of this module's docstring.
        partial: allow an encoder that loads only in part (the report lists what is missing, and the
            checkpoint's encoder tensors with no place in the model).
        source: a name for messages (the checkpoint path).
        source_channels, channels: the input channels' names in pretraining and in ``encoder`` (None: unnamed):
            a single-channel patch embedding is adapted to more channels as
            :func:`medmim.models.transfer.adapt_input_channels` does for the ViT.

    The report names the model's tensors in ``loaded`` / ``missing`` / ``recomputed`` and the checkpoint's own
    names in ``ignored`` / ``unused_encoder``. The attention blocks' ``relative_position_index`` buffers are a
    function of the window size: when the checkpoint has them they must equal the model's; when it does not
    they are kept as the model computed them (``recomputed``). ``notes`` says which layout was recognised.

    Raises:
        MedmimError: no Swin transformer tensor in ``state``; an encoder tensor of the wrong shape (another
            feature_size, window_size, patch_size, num_heads or in_channels); a ``relative_position_index`` other
            than the model's (another window shape); an encoder that would load only in part: tensors
            missing, or checkpoint encoder tensors with no place in the model (a deeper encoder), unless
            ``partial``.
    """
    expected = encoder.state_dict()
    names = list(expected)
    report = TransferReport(source=source, expected=names)
    state, original, seen = _translate(state, source)
    prefix = _best_prefix(list(state), names)

    if not any(name.startswith("layers") and prefix + name in state for name in names):
        hint = ""
        if any(re.match(r"(.*\.)?blocks\.\d+\.attn\.", k) for k in state) or any(
                k.endswith("patch_embedding.patch_embeddings.weight") for k in state):
            hint = " (it looks like a ViT: use medmim.models.transfer.load_encoder)"
        raise MedmimError(f"{source}: no Swin transformer encoder tensor found ({len(state)} tensors, none named "
                          f"like MONAI's SwinTransformer, e.g. 'layers1.0.blocks.0.attn.qkv.weight'){hint}")

    to_load: dict[str, Tensor] = {}
    wrong: list[str] = []
    other_index: list[str] = []
    used: set[str] = set()
    for name, target in expected.items():
        key = prefix + name
        if key not in state:
            # a buffer the model computes from its window size; anything else stays at its initialisation
            (report.recomputed if name.endswith(_INDEX) else report.missing).append(name)
            continue
        value = state[key]
        used.add(key)
        if name == "patch_embed.proj.weight" and value.ndim == target.ndim and value.shape[0] == target.shape[0] \
                and value.shape[2:] == target.shape[2:]:
            value, line = adapt_input_channels(value, target.shape[1], source_channels, channels, source)
            if line:
                report.adapted.append(line)
        if value.shape != target.shape:
            wrong.append(f"{original[key]} {list(value.shape)} (model: {list(target.shape)})")
            continue
        if name.endswith(_INDEX) and not torch.equal(value.to(target.dtype), target):
            other_index.append(original[key])
            continue
        to_load[name] = value
        report.loaded.append(name)
    leftovers = [k for k in state if k not in used]
    report.ignored = [original[k] for k in leftovers]
    report.unused_encoder = [original[k] for k in leftovers if k.startswith(prefix)
                             and _SWIN_NAME.match(k[len(prefix):])]
    report.notes.append(f"layout: {_layout(prefix, state, seen)}")
    if seen["fc"]:
        report.notes.append("the blocks' mlp.fc1 / mlp.fc2 read as MONAI's mlp.linear1 / mlp.linear2")

    if wrong:
        raise MedmimError(f"{source}: {len(wrong)} Swin encoder tensor(s) have the wrong shape: {'; '.join(wrong[:4])}"
                          f"{' ...' if len(wrong) > 4 else ''} (pretrained with another feature_size, num_heads, "
                          "window_size, patch_size or in_channels?)")
    if other_index:
        raise MedmimError(f"{source}: {len(other_index)} relative_position_index buffer(s) differ from the model's, "
                          f"e.g. {other_index[0]}: pretrained with another window_size")
    return load_whole(encoder, to_load, report, partial=partial, what="Swin encoder",
                      missing_hint=" (fewer stages or blocks in the checkpoint, or use_v2 / patch_norm differ?)",
                      compact=_compact)


def find_swin(model: nn.Module) -> nn.Module | None:
    """The MONAI SwinTransformer of ``model``: itself, ``.swinViT`` (SwinUNETR) or ``.encoder`` (a SimMIM-Swin);
    None if it has none."""
    from monai.networks.nets.swin_unetr import SwinTransformer

    for m in (model, getattr(model, "swinViT", None), getattr(model, "encoder", None)):
        if isinstance(m, SwinTransformer):
            return m
    return None


def _find_swin(model: nn.Module) -> nn.Module:
    swin = find_swin(model)
    if swin is None:
        raise TypeError(f"{type(model).__name__} has no MONAI SwinTransformer (itself, .swinViT or .encoder)")
    return swin


# ---------------------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------------------


def _unwrap(state: Mapping[str, Any]) -> Mapping[str, Any]:
    """A state dict kept under "state_dict" / "model" / ... (as in a torch.save file) -> the state dict."""
    if not any(isinstance(v, Tensor) for v in state.values()):
        for key in _STATE_KEYS:
            if isinstance(state.get(key), Mapping):
                return state[key]
    return state


def _swin_state(encoder_or_state: nn.Module | Mapping[str, Any]) -> dict[str, Tensor]:
    """The SwinTransformer tensors of a module or a state dict of any layout, with MONAI's module names."""
    if isinstance(encoder_or_state, nn.Module):
        return dict(_find_swin(encoder_or_state).state_dict())
    state, _, _ = _translate(_unwrap(encoder_or_state), "state dict")
    votes: dict[str, int] = {}
    for key in state:
        m = re.fullmatch(r"(.*?)(patch_embed\.proj\.weight|layers\d+\.\d+\.blocks\.\d+\.attn\.qkv\.weight)", key)
        if m:
            votes[m.group(1)] = votes.get(m.group(1), 0) + 1
    if not any(re.search(r"layers\d+\.", k) for k in state) or not votes:
        raise MedmimError("no Swin transformer encoder in this state dict (no 'layers1.0.blocks.0.attn.qkv.weight' "
                          "or 'patch_embed.proj.weight' under any prefix)")
    prefix = max(votes, key=lambda p: (votes[p], -len(p)))
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix) and _SWIN_NAME.match(k[len(prefix):])}


def swin_encoder_to_monai(encoder_or_state: nn.Module | Mapping[str, Any]) -> dict[str, Tensor]:
    """A Swin transformer encoder -> its tensors named as ``SwinUNETR.swinViT`` (MONAI's ``SwinTransformer``)
    expects, so ``swin_unetr.swinViT.load_state_dict(out, strict=True)`` works for a SwinUNETR of the same
    settings.

    ``encoder_or_state``: a SwinTransformer, or a module holding one (``.swinViT``, ``.encoder``), or a state dict
    of a medmim SimMIM-Swin pretrainer, a SwinUNETR, a bare SwinTransformer, or the ``model_swinvit.pt`` layout
    (a dict with the state under ``"state_dict"`` is unwrapped). Tensors that are not the encoder's (a head, a
    mask token, SwinUNETR's convolutional side) are left out.
    """
    return _swin_state(encoder_or_state)


def swin_encoder_to_model_swinvit(encoder_or_state: nn.Module | Mapping[str, Any]) -> dict[str, dict[str, Tensor]]:
    """A Swin transformer encoder -> ``{"state_dict": {...}}`` in the layout of MONAI's self-supervised
    ``model_swinvit.pt`` (keys under ``module.``, the blocks' MLP as ``mlp.fc1`` / ``mlp.fc2``), which
    ``SwinUNETR.load_from`` reads; ``torch.save`` it to hand a medmim-pretrained encoder to code written for
    those weights. Takes what :func:`swin_encoder_to_monai` takes."""
    state = _swin_state(encoder_or_state)
    return {"state_dict": {"module." + _LINEAR.sub(r"\1fc\2.", k): v for k, v in state.items()}}
