"""The one typed configuration schema for every medmim run.

A config is loaded from a YAML preset shipped in ``medmim/configs/`` (by name, e.g. ``mae-tiny``)
or from a YAML file, then overridden from the command line with dotted ``key=value`` pairs:

    cfg = load_config("mae-tiny", ["data.path=/data/btcv", "train.max_steps=100"])

Values of overrides are parsed as YAML (``train.lr=1e-4``, ``data.roi_size=[64,64,64]``,
``train.compile=true``). A YAML file may start with ``base: PRESET`` to inherit from a preset.
Unknown keys and values of the wrong type raise :class:`~medmim.errors.MedmimError` naming the key.
``pretrain`` holds ``method`` and one section per method (``pretrain.mae.mask_ratio``); a flat
``pretrain.mask_ratio`` (the former layout) means the setting of the method the config ends with.
"""

from __future__ import annotations

import os
import re
import reprlib
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from medmim.errors import MedmimError
from medmim.fileio import atomic_write_text

Triple = tuple[int, int, int]
FTriple = tuple[float, float, float]


def _triple(v: Any) -> Any:
    # a single number means the same along every axis: patch_size=16 -> (16, 16, 16)
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return (v, v, v)
    return v


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(_Section):
    """Where the data is and how it becomes training crops."""

    path: list[str] = Field(default_factory=list, description="datasets or prepared caches; several allowed")
    # intensity preset: ct (HU window -> [0, 1]) or mri (z-score over the foreground, per channel); auto: each
    # dataset's own, from the modality its dataset.json declares (CT -> ct, MR/T1/T2/FLAIR... -> mri; none -> ct),
    # so phantoms, CTs and MRIs can be pretrained on together. Fine-tuning records the preset its data had.
    modality: Literal["auto", "ct", "mri"] = "auto"
    # mm, target voxel size after resampling; None: by modality, CT (1.5, 1.5, 2) as the paper's BTCV, MRI 1 mm as BraTS
    spacing: FTriple | None = None
    hu_window: tuple[float, float] = (-175.0, 250.0)  # CT intensities clipped to this window, then scaled to [0, 1]
    roi_size: Triple = (96, 96, 96)  # crop size in voxels
    crops_per_volume: int = Field(4, ge=1)
    batch_size: int = Field(2, ge=1)
    num_workers: int = Field(2, ge=0)
    pos_fraction: float = Field(0.5, ge=0.0, le=1.0)  # share of crops centred on foreground when labels exist
    fold: int = Field(0, ge=0)
    num_folds: int = Field(5, ge=2)
    label_fraction: float = Field(1.0, gt=0.0, le=1.0)  # share of labeled training cases used to fine-tune
    cache_dtype: Literal["float16", "float32"] = "float16"
    cache_dir: str | None = None  # where raw datasets given in data.path are prepared (default $MEDMIM_CACHE or ~/.cache/medmim)
    prepare_workers: int = Field(2, ge=1)
    # filled in from the dataset when a run starts, so a checkpoint knows its classes on its own
    labels: dict[int, str] | None = None
    lateral_pairs: list[tuple[int, int]] | None = None
    # the input channels the model takes, by the names the dataset declares (case-insensitive) or by index:
    # data.channels=[t1ce] pretrains on one BraTS sequence; None: every channel, in the dataset's order
    channels: list[str | int] | None = None
    # bad cached data met during training: a case that will not open, or whose arrays no longer match
    # the checksums in its case.json, is skipped with a warning; more than this share of the training
    # cases skipped stops the run
    max_bad_fraction: float = Field(0.1, ge=0.0, le=1.0)
    verify_checksums: bool = True  # crc32 of each case's arrays, once per case per process, when first opened

    _norm_roi = field_validator("roi_size", "spacing", mode="before")(_triple)

    @field_validator("path", mode="before")
    @classmethod
    def _one_or_many(cls, v: Any) -> Any:
        if isinstance(v, (str, os.PathLike)):
            return [str(v)]
        return v

    @field_validator("spacing", "roi_size")
    @classmethod
    def _positive(cls, v: tuple | None, info: ValidationInfo) -> tuple | None:
        if v is not None and any(s <= 0 for s in v):
            unit = " mm" if info.field_name == "spacing" else ""
            raise ValueError(f"{info.field_name} must be positive{unit}, got {list(v)}")
        return v

    @field_validator("hu_window")
    @classmethod
    def _ordered_window(cls, v: tuple[float, float]) -> tuple[float, float]:
        if v[0] >= v[1]:
            raise ValueError(f"hu_window must be [low, high] with low < high, got {list(v)}")
        return v


class SwinConfig(_Section):
    """``model.swin``: MONAI's 3D Swin transformer (SwinUNETR's encoder), used with ``model.backbone=swin``.
    Its embedding width is ``model.feature_size`` (48 in Swin UNETR's paper setting), doubling per stage."""

    patch_size: Triple = (2, 2, 2)
    depths: tuple[int, ...] = (2, 2, 2, 2)  # blocks per stage
    num_heads: tuple[int, ...] = (3, 6, 12, 24)  # attention heads per stage
    window_size: Triple = (7, 7, 7)
    mlp_ratio: float = Field(4.0, gt=0)
    use_v2: bool = False  # SwinUNETR-v2's residual convolution before each stage

    _norm = field_validator("patch_size", "window_size", mode="before")(_triple)

    @model_validator(mode="after")
    def _stages(self) -> "SwinConfig":
        if len(self.depths) != 4 or len(self.num_heads) != 4:
            raise ValueError(f"model.swin.depths {list(self.depths)} and num_heads {list(self.num_heads)} must name "
                             "four stages each (MONAI's Swin transformer and Swin UNETR's decoder have four)")
        return self


class ModelConfig(_Section):
    """The encoder (a ViT shared by every pretrainer and by UNETR, or a Swin transformer for SimMIM and
    Swin UNETR) and the segmentation head."""

    backbone: Literal["vit", "swin"] = "vit"
    swin: SwinConfig = Field(default_factory=SwinConfig)

    in_channels: int = Field(1, ge=1)
    img_size: Triple = (96, 96, 96)
    patch_size: Triple = (16, 16, 16)
    hidden_size: int = Field(768, ge=8)
    num_layers: int = Field(12, ge=1)
    num_heads: int = Field(12, ge=1)
    mlp_dim: int = Field(3072, ge=8)
    pos_embed: Literal["sincos", "learnable"] = "sincos"
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    drop_path: float = Field(0.0, ge=0.0, lt=1.0)  # stochastic depth of the last ViT block (0 at the first)
    qkv_bias: bool = True
    # the segmenter: UNETR, or probe (a linear head on the frozen ViT's tokens, upsampled: the representation test)
    head: Literal["unetr", "probe"] = "unetr"
    # the probe's tokens are standardised per channel first (BatchNorm without affine, as MAE's linear probe does:
    # still a linear map of the tokens), or fed raw (none); raw, a few dominant directions can stall its training
    probe_norm: Literal["batchnorm", "none"] = "batchnorm"
    num_classes: int = Field(14, ge=2)  # including background
    # brats: BraTS's overlapping tumour regions (TC, WT, ET) as three sigmoid outputs, trained with a sigmoid
    # DiceCE loss, from BraTS label maps (0/1/2/4); None: num_classes exclusive classes (softmax)
    regions: Literal["brats"] | None = None
    feature_size: int = Field(16, ge=1)  # UNETR's decoder width; Swin: the embedding width, and Swin UNETR's decoder
    pretrained: str | None = None  # checkpoint to initialise the encoder from (fine-tuning)
    partial_load: bool = False  # allow an encoder that loads only in part (reported either way)

    _norm = field_validator("img_size", "patch_size", mode="before")(_triple)

    @property
    def token_patch(self) -> Triple:
        """Voxels per token of the encoder: the ViT's ``patch_size`` or the Swin transformer's."""
        return self.swin.patch_size if self.backbone == "swin" else self.patch_size

    @property
    def out_channels(self) -> int:
        """Output channels of the segmenter: the regions' count (3 for BraTS) or ``num_classes``."""
        return 3 if self.regions == "brats" else self.num_classes

    @model_validator(mode="after")
    def _consistent(self) -> "ModelConfig":
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be divisible by num_heads ({self.num_heads})")
        if self.backbone == "swin":
            # every stage but the first halves the grid: the image must divide by patch x 2^stages
            stride = [p * 2 ** len(self.swin.depths) for p in self.swin.patch_size]
            if any(s % k for s, k in zip(self.img_size, stride)):
                raise ValueError(f"img_size {list(self.img_size)} must be a multiple of {stride} for the Swin "
                                 f"transformer (model.swin.patch_size x 2^{len(self.swin.depths)} stages)")
            if self.head != "unetr":
                raise ValueError("model.head=probe is built for the ViT only; use model.backbone=vit")
            return self
        for n, (s, p) in enumerate(zip(self.img_size, self.patch_size)):
            if p <= 0 or s % p:
                raise ValueError(f"img_size {list(self.img_size)} must be a multiple of patch_size {list(self.patch_size)} on axis {n}")
        return self


class MaskedImageConfig(_Section):
    """MAE's or SimMIM's settings: masking, the decoder that predicts voxels, the loss. Defaults: the model's."""

    mask_ratio: float = Field(0.75, gt=0.0, lt=1.0)
    mask_patch_size: Triple | None = None  # voxels; a multiple of model.patch_size (None: the ViT patch)
    decoder_dim: int = Field(512, ge=8)
    decoder_depth: int = Field(8, ge=0)  # 0: a linear projection head
    decoder_heads: int = Field(16, ge=1)
    loss: Literal["l1", "l2"] = "l2"
    norm_pix_loss: bool = False

    _norm = field_validator("mask_patch_size", mode="before")(_triple)


class MAEConfig(MaskedImageConfig):
    """``pretrain.mae``: the defaults of :class:`~medmim.models.mae.MAE3D`."""


class SimMIMConfig(MaskedImageConfig):
    """``pretrain.simmim``: the defaults of :class:`~medmim.models.simmim.SimMIM3D` (a linear head, L1)."""

    decoder_dim: int = Field(384, ge=8)
    decoder_depth: int = Field(0, ge=0)
    decoder_heads: int = Field(12, ge=1)
    loss: Literal["l1", "l2"] = "l1"


class SimCLRConfig(_Section):
    """``pretrain.simclr``: the defaults of :class:`~medmim.models.simclr.SimCLR3D`."""

    temperature: float = Field(0.1, gt=0.0)  # NT-Xent
    proj_dim: int = Field(128, ge=8)  # projection output


METHODS = ("mae", "simmim", "simclr")
# the former flat keys (pretrain.mask_ratio) and the methods each belongs to
FLAT_KEYS = {**{k: ("mae", "simmim") for k in MaskedImageConfig.model_fields},
             **{k: ("simclr",) for k in SimCLRConfig.model_fields}}


class PretrainConfig(_Section):
    """The pretext task: ``method``, and a section of settings per method (only the method's own is used)."""

    method: Literal["mae", "simmim", "simclr"] = "mae"
    mae: MAEConfig = Field(default_factory=MAEConfig)
    simmim: SimMIMConfig = Field(default_factory=SimMIMConfig)
    simclr: SimCLRConfig = Field(default_factory=SimCLRConfig)

    @model_validator(mode="before")
    @classmethod
    def _nest(cls, data: Any) -> Any:  # flat keys of a plain dict: see nest_pretrain
        return nest_pretrain(data) if isinstance(data, dict) else data

    @property
    def settings(self) -> MAEConfig | SimMIMConfig | SimCLRConfig:
        """The section of the active method: what its pretrainer is built with."""
        return getattr(self, self.method)


def nest_pretrain(section: dict, method: str | None = None) -> dict:
    """A ``pretrain`` mapping with flat keys (``mask_ratio: 0.6``) -> the same with each in its method's section.

    ``method``: the run's method, when the mapping is one layer of several (a base preset); otherwise its
    own ``method`` (default mae). A flat key of another method raises ValueError, except in a complete
    dump of the former flat section (an old run's config.yaml or checkpoint): those settings never had an
    effect and are dropped.
    """
    flat = [k for k in section if k in FLAT_KEYS]
    if not flat:
        return section
    method = method or section.get("method") or "mae"
    out = {k: v for k, v in section.items() if k not in FLAT_KEYS}
    if method not in METHODS or not isinstance(out.get(method) or {}, dict):
        return out  # the method or its section is wrong: validation names that
    legacy = set(section) == {"method", *FLAT_KEYS}
    own = dict(out.get(method) or {})
    for k in flat:
        if method in FLAT_KEYS[k]:
            if k in own:
                raise ValueError(f"'pretrain.{k}' and 'pretrain.{method}.{k}' both given; give one")
            own[k] = section[k]
        elif not legacy:
            raise ValueError(_not_a_setting(k, method))
    out[method] = own
    return out


def _not_a_setting(key: str, method: str) -> str:
    return (f"'pretrain.{key}' is not a setting of the method {method} (it belongs in "
            f"{' or '.join(f'pretrain.{m}.{key}' for m in FLAT_KEYS[key])})")


class TrainConfig(_Section):
    """Optimisation (AdamW, warm-up + cosine), precision, duration and logging cadence."""

    max_steps: int | None = Field(None, ge=1)
    epochs: int | None = Field(None, ge=1)
    max_time_min: float | None = Field(None, gt=0)
    lr: float = Field(1.5e-4, gt=0)  # base learning rate for base_batch_size; scaled linearly with the effective batch
    base_batch_size: int = Field(256, ge=1)
    scale_lr: bool = True
    min_lr: float = Field(0.0, ge=0)
    weight_decay: float = Field(0.05, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_steps: int = Field(0, ge=0)
    grad_clip: float | None = Field(1.0, gt=0)
    grad_accum: int = Field(1, ge=1)
    precision: Literal["fp32", "bf16", "fp16"] = "bf16"
    compile: bool = False
    grad_checkpoint: bool = False
    # fine-tuning recipe: lr x layer_decay^(blocks above) per ViT layer (MAE's 0.65-0.75; None: one lr), and
    # the ViT held still (lr 0) for the first freeze_encoder_steps steps while the decoder warms up
    layer_decay: float | None = Field(None, gt=0.0, le=1.0)
    freeze_encoder_steps: int = Field(0, ge=0)
    seed: int = 0
    val_every: int = Field(100, ge=1)  # steps
    log_every: int = Field(10, ge=1)
    preview_every: int = Field(200, ge=1)
    ckpt_every: int = Field(200, ge=1)
    keep_checkpoints: list[int] = Field(default_factory=list)  # steps whose state stays as checkpoints/step_NNNNNN.pt
    sw_overlap: float = Field(0.25, ge=0.0, lt=1.0)  # sliding-window overlap at validation
    sw_batch_size: int = Field(4, ge=1)
    # a step whose loss or gradients are NaN/Inf is not applied (no optimizer step, scheduler and step
    # count stay); skip: stop after max_bad_steps such steps in a row; stop: at the first; rollback:
    # after max_bad_steps in a row, reload the last checkpoint with the learning rate times
    # rollback_lr_factor, at most max_rollbacks times (fp16 overflows are the GradScaler's, not counted)
    on_divergence: Literal["skip", "stop", "rollback"] = "skip"
    max_bad_steps: int = Field(5, ge=1)
    rollback_lr_factor: float = Field(0.5, gt=0.0, le=1.0)
    max_rollbacks: int = Field(3, ge=1)


class RunConfig(_Section):
    dir: str = "runs/run"
    name: str | None = None
    device: Literal["auto", "cpu", "cuda"] = "auto"


class Config(_Section):
    """Every setting of a run. Written, resolved, into the run folder and into every checkpoint."""

    task: Literal["pretrain", "finetune"] = "pretrain"
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    pretrain: PretrainConfig = Field(default_factory=PretrainConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    run: RunConfig = Field(default_factory=RunConfig)
    resume: str | None = None  # a checkpoint path or "auto" (the run folder's last checkpoint)

    @model_validator(mode="after")
    def _mask_fits(self) -> "Config":
        swin = self.model.backbone == "swin"
        m = self.model
        if swin and self.task == "finetune" and any(s < 2 * p * 16 for s, p in zip(m.img_size, m.swin.patch_size)):
            # Swin UNETR's bottleneck instance-normalises the last stage: it needs more than one voxel there
            raise ValueError(f"model.img_size {list(m.img_size)}: Swin UNETR needs at least two voxels at its last "
                             f"stage, i.e. {[2 * p * 16 for p in m.swin.patch_size]}")
        if swin and self.task == "pretrain" and self.pretrain.method != "simmim":
            why = ("MAE's encoder sees only the visible tokens, which a windowed transformer cannot: its windows "
                   "and patch merging need the whole grid" if self.pretrain.method == "mae"
                   else "contrastive pretraining is built for the ViT only")
            raise ValueError(f"pretrain.method={self.pretrain.method} does not work with model.backbone=swin ({why}); "
                             "use pretrain.method=simmim")
        if self.pretrain.method == "simclr":
            return self
        name = f"pretrain.{self.pretrain.method}.mask_patch_size"
        patch = self.model.token_patch
        where = "model.swin.patch_size" if swin else "model.patch_size"
        mask = self.pretrain.settings.mask_patch_size or patch
        for n, (m, p) in enumerate(zip(mask, patch)):
            if m % p:
                raise ValueError(f"{name} {list(mask)} must be a multiple of {where} {list(patch)} (axis {n})")
        for n, (s, m) in enumerate(zip(self.model.img_size, mask)):
            if self.task == "pretrain" and s % m:
                raise ValueError(f"model.img_size {list(self.model.img_size)} must be a multiple of {name} "
                                 f"{list(mask)} (axis {n})")
        return self

    def to_dict(self) -> dict:
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)


# --- loading ---------------------------------------------------------------------------------

def preset_names() -> list[str]:
    """Names of the presets shipped in ``medmim/configs/``."""
    folder = resources.files("medmim") / "configs"
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


# a config is a few levels deep; PyYAML's scanner slows quadratically with [ { nesting (seconds at a
# thousand levels) before its parser recurses too deep: refuse deeper text before parsing it
MAX_NESTING = 100


def _nesting(text: str) -> int:
    depth = deepest = 0
    for m in re.finditer(r"[\[\]{}]", text):
        depth = depth + 1 if m.group() in "[{" else max(depth - 1, 0)
        deepest = max(deepest, depth)
    return deepest


def _read_yaml(text: str, where: str) -> dict:
    if _nesting(text) > MAX_NESTING:
        raise MedmimError(f"{where}: invalid YAML (nested more than {MAX_NESTING} levels deep)")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" (line {mark.line + 1})" if mark is not None else ""
        raise MedmimError(f"{where}: invalid YAML{at}")
    except RecursionError:
        raise MedmimError(f"{where}: invalid YAML (nested too deeply)")
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise MedmimError(f"{where}: a config must be a mapping of sections, got {type(data).__name__}")
    return data


def names_a_file(path: Path) -> bool:
    """Whether a preset/spec argument means a YAML file rather than a shipped name. A folder that happens to
    share the name (a study's output folder, say) does not shadow the shipped one."""
    return path.suffix in (".yaml", ".yml") or path.is_file()


def _load_layers(source: str | os.PathLike, seen: tuple[str, ...] = ()) -> list[tuple[str, dict]]:
    """A preset name or a YAML path -> its ``base:`` chain as (where, plain dict), the deepest base first."""
    source = str(source)
    if source in seen:
        raise MedmimError(f"{source}: 'base' chain loops back on itself")
    path = Path(source)
    where = source
    if names_a_file(path):
        if not path.is_file():
            raise MedmimError(f"{source}: config file not found")
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise MedmimError(f"{source}: cannot read config ({e.__class__.__name__})")
    else:
        preset = resources.files("medmim") / "configs" / f"{source}.yaml"
        if not preset.is_file():
            raise MedmimError(f"unknown preset '{source}' (presets: {', '.join(preset_names())}; or give a .yaml file)")
        text, where = preset.read_text(encoding="utf-8"), f"preset {source}"
    data = _read_yaml(text, where)
    base = data.pop("base", None)
    if base is None:
        return [(where, data)]
    if not isinstance(base, str):
        raise MedmimError(f"{source}: 'base' must be a preset name or a file path")
    return _load_layers(base, seen + (source,)) + [(where, data)]


def _final_method(layers: list[tuple[str, dict]], overrides: list[tuple[list[str], Any]]) -> Any:
    """The pretraining method a file chain plus overrides ends with (None: not set, the default)."""
    for keys, value in reversed(overrides):
        if keys == ["pretrain", "method"]:
            return value
        if keys == ["pretrain"]:  # the whole section replaced
            return value.get("method") if isinstance(value, dict) else None
    for _, layer in reversed(layers):
        if isinstance(layer.get("pretrain"), dict) and "method" in layer["pretrain"]:
            return layer["pretrain"]["method"]
    return None


def _nested(data: dict, method: Any, where: str) -> dict:
    """``data`` with the flat keys of its ``pretrain`` section moved into ``method``'s section."""
    if not isinstance(data, dict) or not isinstance(data.get("pretrain"), dict):
        return data
    try:
        return {**data, "pretrain": nest_pretrain(data["pretrain"], method)}
    except ValueError as e:
        raise MedmimError(f"{where}: {e}")


def _deep_update(dst: dict, src: dict) -> dict:
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            _deep_update(dst[k], v)
        else:
            dst[k] = v
    return dst


def parse_override(item: str) -> tuple[list[str], Any]:
    """``"train.lr=1e-4"`` -> (["train", "lr"], 1e-4). Values are read as YAML."""
    if "=" not in item:
        raise MedmimError(f"override '{item}' must look like key=value (e.g. train.max_steps=100)")
    key, _, raw = item.partition("=")
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise MedmimError(f"override '{item}' has an empty key")
    try:
        if _nesting(raw) > MAX_NESTING:
            raise RecursionError
        value = yaml.safe_load(raw) if raw.strip() else None
    except (yaml.YAMLError, RecursionError):
        value = raw  # not YAML: take the text as it is (a path with odd characters, say)
    if isinstance(value, dict) and not raw.lstrip().startswith("{"):
        value = raw  # "run.dir=a: b" is a name with a colon, not a mapping
    return key.split("."), value


def apply_overrides(data: dict, overrides: list[str], method: Any = None) -> dict:
    """Set each ``key=value`` in ``data``. A flat ``pretrain.KEY`` is the setting of the run's method
    (``method``, or what ``data`` and the overrides end with), i.e. ``pretrain.<method>.KEY``."""
    parsed = [(item, *parse_override(item)) for item in overrides]
    if method is None:
        method = _final_method([("", data)], [(keys, value) for _, keys, value in parsed]) or "mae"
    for item, keys, value in parsed:
        if len(keys) == 2 and keys[0] == "pretrain" and keys[1] in FLAT_KEYS and method in METHODS:
            if method not in FLAT_KEYS[keys[1]]:
                raise MedmimError(f"override '{item}': {_not_a_setting(keys[1], method)}")
            keys = ["pretrain", method, keys[1]]
        node = data
        for k in keys[:-1]:
            nxt = node.get(k)
            if nxt is None:
                nxt = node[k] = {}
            elif not isinstance(nxt, dict):
                raise MedmimError(f"override '{item}': '{k}' is a value, not a section")
            node = nxt
        node[keys[-1]] = value
    return data


# a bounded repr of a bad value: YAML aliases can make a small file hold an exponentially large value
_SHORT = reprlib.Repr()
_SHORT.maxlevel, _SHORT.maxstring, _SHORT.maxother = 2, 80, 80
_SHORT.maxlist = _SHORT.maxtuple = _SHORT.maxdict = _SHORT.maxset = 4
MAX_REPORTED = 10  # problems named in one message


def _format_validation(e: ValidationError, where: str) -> str:
    parts = []
    errors = e.errors()
    for err in errors[:MAX_REPORTED]:
        loc = ".".join(str(p) for p in err["loc"] if not isinstance(p, int))
        if not loc:  # a check across sections names its keys itself
            parts.append(err["msg"].removeprefix("Value error, "))
        elif err["type"] == "extra_forbidden":
            parts.append(f"unknown key '{loc}'")
        else:
            msg = err["msg"].removeprefix("Value error, ")
            given = err.get("input")
            shown = "" if isinstance(given, dict) else f" (got {_SHORT.repr(given)})"
            parts.append(f"'{loc}': {msg}{shown}")
    if len(errors) > MAX_REPORTED:
        parts.append(f"and {len(errors) - MAX_REPORTED} more problem(s)")
    return f"{where}: " + "; ".join(parts)


def saved_config(data: dict) -> dict:
    """A config a run saved (a checkpoint's, a run folder's config.yaml) with the settings it had in effect
    before they could be named: a probe from before ``model.probe_norm`` fed its head raw tokens."""
    model = data.get("model")
    if isinstance(model, dict) and model.get("head") == "probe" and "probe_norm" not in model:
        return {**data, "model": {**model, "probe_norm": "none"}}
    return data


def config_from_dict(data: dict, where: str = "config") -> Config:
    """Validate a plain dict: a checkpoint's config, say (one with the former flat pretrain keys too)."""
    data = _nested(data, None, where)
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        raise MedmimError(_format_validation(e, where))


def load_config(source: str | os.PathLike | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Build a validated :class:`Config` from a preset name or YAML file plus ``key=value`` overrides."""
    layers = _load_layers(source) if source is not None else []
    method = _final_method(layers, [parse_override(item) for item in overrides])
    data: dict = {}
    for where, layer in layers:  # flat pretrain keys of every layer are the final method's
        _deep_update(data, _nested(layer, method, where))
    apply_overrides(data, list(overrides), method)
    return config_from_dict(data, str(source) if source is not None else "config")


def save_config(cfg: Config, path: str | os.PathLike) -> Path:
    """Write the resolved config as YAML (atomically)."""
    return atomic_write_text(path, cfg.to_yaml())
