"""Weights in and out: pretrained encoders into UNETR, MONAI interop, safe checkpoint files.

* :func:`load_pretrained` / :func:`load_encoder` put the encoder of an MAE, SimMIM, SimCLR (or UNETR,
  or MONAI ViT / UNETR / ViTAutoEnc / MaskedAutoEncoderViT) checkpoint into a :class:`ViT3D` and return
  a :class:`TransferReport` of what was loaded, missing and ignored. A wrong shape, or an encoder that
  would load only in part, raises :class:`MedmimError` (the latter unless ``partial=True``): there is
  no silent partial load.
* :func:`encoder_to_monai_vit` / :func:`monai_to_encoder` translate state dicts between medmim's ViT3D
  and ``monai.networks.nets.ViT`` (``proj_type="conv"``, ``classification=False``).
* :func:`save_weights` / :func:`load_weights` write and read safetensors with the config as JSON in the
  metadata; :func:`read_checkpoint` reads those or ``torch.save`` files with ``weights_only=True``. No
  file is ever unpickled into arbitrary objects.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medmim.errors import MedmimError
from medmim.fileio import atomic_write
from medmim.models.layers import interpolate_pos_embed
from medmim.models.monai_layout import (MEDMIM_ANCHOR, MONAI_ANCHOR, from_monai_layout, prefix_of, strip_wrappers)
from medmim.models.monai_layout import encoder_to_monai_vit, monai_to_encoder  # noqa: F401 (part of this module's API)
from medmim.models.simmim import upgrade_legacy_keys
from medmim.models.vit import ViT3D

Tensor = torch.Tensor

# ---------------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------------


@dataclass
class TransferReport:
    """What an encoder transfer did, tensor by tensor.

    loaded: encoder tensors (ViT3D names) taken from the checkpoint.
    missing: encoder tensors the model expects and the checkpoint lacks (kept at their initialisation).
    ignored: checkpoint tensors (checkpoint names) not used: decoders, heads, mask tokens, ...
    unused_encoder: the ignored ones that belong to the checkpoint's encoder (a deeper encoder's extra
        blocks): the pretrained encoder would not come over whole.
    recomputed: encoder tensors rebuilt rather than loaded (a sin-cos ``pos_embed``).
    interpolated: encoder tensors resized to the new token grid (a learnable ``pos_embed``).
    expected: every encoder tensor name of the model.
    """

    source: str
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    recomputed: list[str] = field(default_factory=list)
    interpolated: list[str] = field(default_factory=list)
    expected: list[str] = field(default_factory=list)
    unused_encoder: list[str] = field(default_factory=list)
    adapted: list[str] = field(default_factory=list)  # tensors changed to fit: how (the input channels)
    notes: list[str] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        """True when every encoder tensor was loaded (or, for a sin-cos table, recomputed) and every
        encoder tensor of the checkpoint was used."""
        return not self.missing and not self.unused_encoder

    def summary(self) -> str:
        """A few human-readable lines."""
        n = len(self.expected)
        if self.complete:
            head = f"encoder from {self.source}: all {n} encoder tensors loaded"
        else:
            head = f"encoder from {self.source}: PARTIAL load, {len(self.loaded)} of {n} encoder tensors loaded"
        if self.recomputed:
            head += f" ({', '.join(self.recomputed)} recomputed)"
        lines = [head]
        if self.missing:
            lines.append(f"  missing ({len(self.missing)}, left at initialisation): {_compact(self.missing)}")
        if self.unused_encoder:
            lines.append(f"  checkpoint encoder tensors with no place in the model ({len(self.unused_encoder)}): "
                         f"{_compact(self.unused_encoder)}")
        if self.interpolated:
            lines.append(f"  interpolated: {', '.join(self.interpolated)}")
        lines += [f"  adapted: {a}" for a in self.adapted]
        if self.ignored:
            lines.append(f"  ignored ({len(self.ignored)} checkpoint tensors): {_compact(self.ignored)}")
        lines += [f"  note: {note}" for note in self.notes]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()


def _compact(names: Sequence[str]) -> str:
    """Group names by module: 'blocks.2.norm1.weight', ... 'blocks.3.mlp.fc2.bias' -> 'blocks.[2-3].* (24)'."""
    groups: dict[str, tuple[set[int], list[str]]] = {}
    for name in names:
        m = re.match(r"(.+?)\.(\d+)\.", name)
        stem, index = (m.group(1), int(m.group(2))) if m else (name.rpartition(".")[0] or name, None)
        indices, members = groups.setdefault(stem, (set(), []))
        if index is not None:
            indices.add(index)
        members.append(name)
    parts = []
    for stem, (indices, members) in groups.items():
        if indices:
            parts.append(f"{stem}.[{_ranges(sorted(indices))}].* ({len(members)})")
        elif len(members) == 1:
            parts.append(members[0])
        else:
            parts.append(f"{stem}.* ({len(members)})")
    return ", ".join(parts)


def _ranges(values: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2,5'"""
    runs: list[list[int]] = []
    for v in values:
        if runs and v == runs[-1][-1] + 1:
            runs[-1].append(v)
        else:
            runs.append([v])
    return ",".join(str(r[0]) if len(r) == 1 else f"{r[0]}-{r[-1]}" for r in runs)


# ---------------------------------------------------------------------------------------------
# Checkpoint files
# ---------------------------------------------------------------------------------------------


@dataclass
class Checkpoint:
    """Weights read from a file: a flat state dict and the config it was made with (if stored)."""

    state: dict[str, Tensor]
    config: dict | None
    source: str
    data: dict | None = None  # what the run read from its data (labels, lateral pairs, preprocessing)


def _config_dict(config: Any) -> dict | None:
    if config is None:
        return None
    if hasattr(config, "to_dict"):
        return config.to_dict()
    if hasattr(config, "model_dump"):
        return config.model_dump(mode="json")
    if isinstance(config, str):
        try:
            return json.loads(config)
        except json.JSONDecodeError:
            import yaml

            return yaml.safe_load(config)
    return dict(config)


def save_weights(path: str | os.PathLike, weights: nn.Module | Mapping[str, Tensor], *, config: Any = None,
                 data: dict | None = None) -> Path:
    """Write a safetensors file; ``config`` (a Config, or a JSON-able mapping) goes in the metadata as JSON.

    The file is written next to its destination and renamed, so a crash never leaves half a file.
    """
    from safetensors.torch import save_file

    path = Path(path)
    state = weights.state_dict() if isinstance(weights, nn.Module) else dict(weights)
    state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    metadata = {"format": "pt", "producer": "medmim"}
    cfg = _config_dict(config)
    if cfg is not None:
        metadata["config"] = json.dumps(cfg)
    if data is not None:
        metadata["data"] = json.dumps(data)
    return atomic_write(path, lambda tmp: save_file(state, str(tmp), metadata=metadata))


def _read_safetensors(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """(state dict on CPU with today's key names, the metadata) of a safetensors file; errors name the file."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file, safe_open

    if not path.is_file():
        raise MedmimError(f"{path}: weights file not found")
    try:
        state = load_file(str(path))
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise MedmimError(f"{path}: not a readable safetensors file ({str(e).splitlines()[0] if str(e) else e})")
    return upgrade_legacy_state(state), metadata


def _metadata_json(path: Path, metadata: dict[str, str], key: str, what: str) -> dict | None:
    if key not in metadata:
        return None
    try:
        return json.loads(metadata[key])
    except json.JSONDecodeError:
        raise MedmimError(f"{path}: the {what} stored in the safetensors metadata is not valid JSON")


def load_weights(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict | None]:
    """Read a safetensors file -> (state dict on CPU, config dict from the metadata or None)."""
    path = Path(path)
    state, metadata = _read_safetensors(path)
    return state, _metadata_json(path, metadata, "config", "config")


def upgrade_legacy_state(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Today's names for a state dict of an older layout, as read from a file: a SimMIM from before its head
    was named like MAE's decoder (``head_pred.weight`` -> ``decoder_pred.weight``). Others come back as they are."""
    prefix = prefix_of(state, "head_pred.weight")
    if prefix is None or prefix + "mask_token" not in state or prefix + "decoder_pred.weight" in state:
        return state
    return upgrade_legacy_keys(state, prefix)


_STATE_KEYS = ("model", "state_dict", "model_state", "module", "weights")


def read_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Read weights from ``.safetensors`` or a ``torch.save`` file (loaded with ``weights_only=True``).

    A torch file may hold a state dict, or a dict with the state under one of ``model``, ``state_dict``,
    ``model_state``, ``module``, ``weights`` and optionally the config under ``config``.
    """
    path = Path(path)
    if not path.is_file():
        raise MedmimError(f"{path}: checkpoint not found")
    if path.suffix == ".safetensors":
        state, metadata = _read_safetensors(path)
        return Checkpoint(state=state, config=_metadata_json(path, metadata, "config", "config"), source=str(path),
                          data=_metadata_json(path, metadata, "data", "data record"))
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means: not a plain-weights file
        first = str(e).strip().splitlines()[0] if str(e).strip() else e.__class__.__name__
        raise MedmimError(f"{path}: not a weights-only checkpoint (medmim never unpickles objects): {first}")
    if not isinstance(obj, Mapping):
        raise MedmimError(f"{path}: expected a dict of tensors, found {type(obj).__name__}")
    config = _config_dict(obj.get("config")) if isinstance(obj.get("config"), (Mapping, str)) else None
    state = obj
    for key in _STATE_KEYS:
        if isinstance(obj.get(key), Mapping):
            state = obj[key]
            break
    tensors = upgrade_legacy_state({k: v for k, v in state.items() if isinstance(v, Tensor)})
    if not tensors:
        raise MedmimError(f"{path}: no tensors found (looked at the top level and under {', '.join(_STATE_KEYS)})")
    data = obj.get("data") if isinstance(obj.get("data"), Mapping) else None
    return Checkpoint(state=tensors, config=config, source=str(path), data=data)


# ---------------------------------------------------------------------------------------------
# Encoder transfer
# ---------------------------------------------------------------------------------------------


# names of ViT3D tensors, to tell an encoder's leftovers from a decoder's or a head's
_ENCODER_NAME = re.compile(r"(blocks\.\d+\.|patch_embed\.|pos_embed$|norm\.(weight|bias)$)")


def _best_prefix(keys: Sequence[str], expected: Sequence[str]) -> str:
    """The prefix ("", "encoder.", "vit.", ...) under which most expected encoder names appear."""
    votes: dict[str, int] = {}
    for key in keys:
        for name in expected:
            if key == name or key.endswith("." + name):
                prefix = key[: len(key) - len(name)]
                votes[prefix] = votes.get(prefix, 0) + 1
    return max(votes, key=lambda p: (votes[p], -len(p))) if votes else ""


def _grid_from_config(config: Mapping | None) -> tuple[int, int, int] | None:
    if not config:
        return None
    model = config.get("model", config)
    try:
        img = model["img_size"]
        patch = model["patch_size"]
        img = [img] * 3 if isinstance(img, int) else list(img)
        patch = [patch] * 3 if isinstance(patch, int) else list(patch)
        return tuple(int(s) // int(p) for s, p in zip(img, patch))  # type: ignore[return-value]
    except (KeyError, TypeError, ValueError):
        return None


def _source_grid(num_tokens: int, target_grid: Sequence[int], source_grid: Sequence[int] | None,
                 config: Mapping | None, source: str, notes: list[str]) -> tuple[int, int, int]:
    """The token grid a checkpoint's position table was made for."""
    for grid in (source_grid, _grid_from_config(config)):
        if grid is not None:
            if math.prod(grid) != num_tokens:
                raise MedmimError(f"{source}: pos_embed has {num_tokens} tokens but the pretraining grid "
                                  f"{list(grid)} has {math.prod(grid)}")
            return tuple(grid)  # type: ignore[return-value]
    if math.prod(target_grid) == num_tokens:
        notes.append(f"pos_embed: pretraining grid unknown (no config in the checkpoint); its {num_tokens} tokens "
                     f"were taken as the fine-tuning grid {list(target_grid)}")
        return tuple(target_grid)  # type: ignore[return-value]
    side = round(num_tokens ** (1 / 3))
    if side ** 3 == num_tokens:
        notes.append(f"pos_embed: pretraining grid unknown (no config in the checkpoint); {num_tokens} tokens "
                     f"taken as a cube {[side] * 3}")
        return (side, side, side)
    raise MedmimError(f"{source}: cannot tell the token grid of pos_embed ({num_tokens} tokens); the checkpoint "
                      "stores no config with model.img_size/model.patch_size")


def _names(channels: Sequence[str] | None, n: int) -> str:
    return str(list(channels)) if channels else f"{n} unnamed channel{'s' if n != 1 else ''}"


def adapt_input_channels(weight: Tensor, target: int, source_channels: Sequence[str] | None,
                         channels: Sequence[str] | None, source: str) -> tuple[Tensor, str | None]:
    """The patch embedding's kernel ``weight`` ``[E, C_src, pd, ph, pw]`` made to take ``target`` channels.

    * the same channels (or the same names in another order: the kernel's input channels are reordered to
      match): no change, or the reordering, reported;
    * one pretrained channel into ``target`` channels (a T1ce-pretrained encoder into a four-sequence UNETR):
      the kernel is copied to every channel and divided by ``target``, so an input whose channels all equal the
      pretraining sequence embeds exactly as in pretraining, and each sequence starts with an equal share;
    * any other mismatch: refused, naming both channel lists.

    Returns the kernel and a line for the report (None when nothing changed).
    """
    have = weight.shape[1]
    low_src = [c.lower() for c in source_channels] if source_channels else None
    low_tgt = [c.lower() for c in channels] if channels else None
    if have == target:
        if low_src and low_tgt and low_src != low_tgt and sorted(low_src) == sorted(low_tgt):
            order = [low_src.index(c) for c in low_tgt]
            return weight[:, order], (f"patch_embed.proj.weight: input channels reordered from {list(source_channels)} "
                                      f"to {list(channels)}")
        return weight, None
    if have == 1:
        line = (f"patch_embed.proj.weight: 1 -> {target} input channels ({_names(source_channels, 1)} -> "
                f"{_names(channels, target)}): the pretrained kernel copied to each channel and divided by {target}")
        return weight.repeat(1, target, *([1] * (weight.ndim - 2))) / target, line
    raise MedmimError(f"{source}: the encoder was pretrained on {_names(source_channels, have)} but the model takes "
                      f"{_names(channels, target)}; only a single-channel encoder can be adapted to more channels "
                      "(choose the pretraining channels with data.channels)")


def load_encoder(
    encoder: ViT3D,
    state: Mapping[str, Tensor],
    *,
    partial: bool = False,
    source: str = "checkpoint",
    source_grid: Sequence[int] | None = None,
    config: Mapping | None = None,
    source_channels: Sequence[str] | None = None,
    channels: Sequence[str] | None = None,
) -> TransferReport:
    """Load the encoder part of ``state`` into ``encoder``; return what was loaded, missing and ignored.

    Args:
        encoder: the target ViT3D (e.g. ``unetr.vit``).
        state: a state dict of a ViT3D, an MAE/SimMIM/SimCLR pretrainer (``encoder.``), a UNETR (``vit.``),
            or a MONAI ViT-family model.
        partial: allow an encoder that loads only in part (the report lists what is missing).
        source: a name for messages (the checkpoint path).
        source_grid, config: the pretraining token grid, or the config the checkpoint was made with, to
            interpolate a learnable position table when the fine-tuning grid differs.
        source_channels, channels: the input channels' names in pretraining and in ``encoder`` (None: unnamed),
            for :func:`adapt_input_channels`.

    Raises:
        MedmimError: an encoder tensor of the wrong shape; an encoder that would load only in part
            (unless ``partial``); no encoder tensor at all.
    """
    expected = encoder.state_dict()
    names = list(expected)
    state = {strip_wrappers(k): v for k, v in state.items()}
    report = TransferReport(source=source, expected=names)
    if prefix_of(state, MONAI_ANCHOR) is not None and prefix_of(state, MEDMIM_ANCHOR) is None:
        state, monai_ignored = from_monai_layout(state)
        report.ignored += monai_ignored
        report.notes.append("converted from MONAI ViT names")
    prefix = _best_prefix(list(state), names)

    to_load: dict[str, Tensor] = {}
    wrong: list[str] = []
    used: set[str] = set()
    for name, target in expected.items():
        key = prefix + name
        if name == "pos_embed" and encoder.pos_embed_type == "sincos":
            # a fixed table is a function of the grid: rebuild it rather than trust the file
            report.recomputed.append(name)
            if key in state:
                used.add(key)
                if ((config or {}).get("model") or {}).get("pos_embed") == "learnable":
                    report.notes.append("the checkpoint's learned pos_embed is not used: this model's position "
                                        "embedding is sin-cos (pos_embed='sincos')")
            continue
        if key not in state:
            report.missing.append(name)
            continue
        value = state[key]
        used.add(key)
        if name == "pos_embed" and value.ndim == 3 and value.shape[-1] == target.shape[-1]:
            # the same number of tokens may still be another grid (4x4x6 vs 6x4x4): compare grids
            old = _source_grid(value.shape[1], encoder.grid, source_grid, config, source, report.notes)
            if old != encoder.grid:
                value = interpolate_pos_embed(value, old, encoder.grid)
                report.interpolated.append(f"pos_embed {list(old)} -> {list(encoder.grid)} (trilinear)")
        if name == "patch_embed.proj.weight" and value.ndim == target.ndim and value.shape[0] == target.shape[0] \
                and value.shape[2:] == target.shape[2:]:
            value, line = adapt_input_channels(value, target.shape[1], source_channels, channels, source)
            if line:
                report.adapted.append(line)
            elif source_channels and channels and [c.lower() for c in source_channels] != [c.lower() for c in channels]:
                report.notes.append(f"pretrained on {list(source_channels)}, fine-tuned on {list(channels)}: "
                                    "other channels, loaded as they are")
        if value.shape != target.shape:
            wrong.append(f"{key} {list(value.shape)} (model: {list(target.shape)})")
            continue
        to_load[name] = value
        report.loaded.append(name)
    report.ignored += [k for k in state if k not in used]
    report.unused_encoder = [k for k in state if k not in used and k.startswith(prefix)
                             and _ENCODER_NAME.match(k[len(prefix):])]

    if wrong:
        raise MedmimError(f"{source}: {len(wrong)} encoder tensor(s) have the wrong shape: {'; '.join(wrong[:4])}"
                          f"{' ...' if len(wrong) > 4 else ''} (pretrained with another in_channels, patch_size, "
                          "hidden_size or mlp_dim?)")
    if not report.loaded:
        raise MedmimError(f"{source}: no encoder tensor found in the checkpoint ({len(state)} tensors, none "
                          "named like a ViT3D / MONAI ViT encoder)")
    hint = ""
    if report.missing and all(n.endswith("attn.qkv.bias") for n in report.missing):
        hint = " (the checkpoint has no qkv bias: build the encoder with qkv_bias=False)"
    return load_whole(encoder, to_load, report, partial=partial, missing_hint=hint)


def load_whole(encoder: nn.Module, to_load: dict[str, Tensor], report: TransferReport, *, partial: bool,
               what: str = "encoder", missing_hint: str = "", compact=None) -> TransferReport:
    """Load ``to_load`` into ``encoder`` once ``report`` says what it holds: an encoder that would load only in
    part (tensors missing, or checkpoint encoder tensors with no place) is refused unless ``partial``.
    ``compact``: how a message groups tensor names (default: by their first block index)."""
    group = compact or _compact
    allow = "allow a partial load with partial=True (model.partial_load=true)"
    if report.missing and not partial:
        raise MedmimError(f"{report.source}: only {len(report.loaded)} of {len(report.expected)} {what} tensors would "
                          f"load, missing {group(report.missing)}{missing_hint}; {allow}")
    if report.unused_encoder and not partial:
        raise MedmimError(f"{report.source}: the checkpoint's {what} does not fit whole, {len(report.unused_encoder)} "
                          f"of its tensors have no place in the model ({group(report.unused_encoder)}: a deeper "
                          f"encoder?); {allow}")
    result = encoder.load_state_dict(to_load, strict=False)
    # a bug guard: what load_state_dict left untouched is exactly what the report says
    assert not result.unexpected_keys, result.unexpected_keys
    assert set(result.missing_keys) == set(report.missing) | set(report.recomputed), result.missing_keys
    return report


def _find_encoder(model: nn.Module) -> ViT3D:
    if isinstance(model, ViT3D):
        return model
    for attr in ("vit", "encoder"):
        enc = getattr(model, attr, None)
        if isinstance(enc, ViT3D):
            return enc
    raise TypeError(f"{type(model).__name__} has no ViT3D encoder (.vit or .encoder)")


def load_pretrained(
    model: nn.Module,
    checkpoint: str | os.PathLike | Checkpoint | Mapping[str, Tensor],
    *,
    partial: bool = False,
    channels: Sequence[str] | None = None,
) -> TransferReport:
    """Initialise the encoder of ``model`` (a UNETR, a pretrainer or a ViT3D) from a checkpoint.

    ``checkpoint`` is a path (``.safetensors`` or a torch file, read safely), a :class:`Checkpoint`, or a
    state dict. ``channels``: the names of ``model``'s input channels (the checkpoint's own come from its data
    record). See :func:`load_encoder` for what is reported and what raises.
    """
    if isinstance(checkpoint, (str, os.PathLike)):
        checkpoint = read_checkpoint(checkpoint)
    source_channels = None
    if isinstance(checkpoint, Checkpoint):
        state, config, source = checkpoint.state, checkpoint.config, checkpoint.source
        source_channels = (checkpoint.data or {}).get("channel_names")
    else:
        state, config, source = checkpoint, None, "state dict"
    from medmim.models.swin_transfer import find_swin, load_swin_encoder

    swin = find_swin(model)
    if swin is not None:  # Swin UNETR (or a SimMIM-Swin): the Swin transformer's own transfer
        return load_swin_encoder(swin, state, partial=partial, source=source, source_channels=source_channels,
                                 channels=channels)
    return load_encoder(_find_encoder(model), state, partial=partial, source=source, config=config,
                        source_channels=source_channels, channels=channels)

