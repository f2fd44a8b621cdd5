"""A study spec: the YAML that names a dataset, the base pretraining and fine-tuning configs, the seeds and the
axes of a study, as a typed model (unknown keys and values of the wrong type raise MedmimError naming the key).

    spec = load_spec("demo")                  # shipped: medmim/studies/demo.yaml
    spec = load_spec("my-study.yaml")         # or a file
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import yaml
from pydantic import (BaseModel, BeforeValidator, ConfigDict, Field, PrivateAttr, StrictBool, StrictInt,
                      ValidationError, model_validator)

from medmim.config import names_a_file
from medmim.errors import MedmimError
from medmim.fileio import read_text


def _as_text(v: Any) -> Any:
    # YAML reads some labels as numbers (mask_ratio: 0.75, patch: 16); a label is their text
    return v if isinstance(v, (str, dict, list)) else str(v)


def _as_overrides(v: Any) -> Any:
    # one override may stand alone; null means none
    return [] if v is None else [v] if isinstance(v, str) else v


def _pretrain_overrides(v: Any) -> Any:
    # null: no pretraining (kept as None); true: inherit the base pretraining as it is
    if isinstance(v, str):
        return [v]
    if v is None or v is True or (isinstance(v, list) and all(isinstance(x, str) for x in v)):
        return v
    raise ValueError("must be null (no pretraining), true (the base pretraining) or a list of key=value overrides")


def _or_empty(v: Any) -> Any:
    return {} if v is None else v


Label = Annotated[str, BeforeValidator(_as_text)]
Overrides = Annotated[list[str], BeforeValidator(_as_overrides)]


class _Part(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PhantomSpec(_Part):
    """Built-in phantoms written into the study folder: abdominal CTs (``medmim.data.phantom``) or brain MRIs
    with a glioma and BraTS labels (``kind: brain``, ``medmim.data.phantom_brain``)."""

    kind: Literal["abdomen", "brain"] = "abdomen"
    labeled: int = 10
    unlabeled: int = 0
    seed: int = 0
    shape: tuple[int, int, int] | None = None  # voxels; None: the generator's default
    spacing: tuple[float, float, float] | None = None  # mm; None: the generator's default


class DataSpec(_Part):
    phantom: PhantomSpec | None = None
    path: str | None = None  # a dataset or a prepared cache
    pretrain_extra: list[str] = Field(default_factory=list)  # datasets that pretraining reads besides this one
    samples: StrictBool = False  # add the real sample scans (CT and MRI) to pretraining

    @model_validator(mode="after")
    def _has_a_source(self) -> DataSpec:
        if self.phantom is None and self.path is None:
            raise ValueError("needs 'phantom: {labeled, unlabeled, seed}' or 'path: DIR'")
        return self


class RunSpec(_Part):
    """A base config (preset name or YAML file) and overrides applied to it in every cell."""

    config: str
    overrides: Overrides = Field(default_factory=list)


class AxisValue(_Part):
    label: Label
    # True: inherit the base pretraining; None: no pretraining (from scratch); list: overrides of the pretraining
    pretrain: Annotated[list[str] | None | Literal[True], BeforeValidator(_pretrain_overrides)] = True
    finetune: Overrides = Field(default_factory=list)
    both: Overrides = Field(default_factory=list)  # overrides of both configs


class Axis(_Part):
    name: Label
    values: list[AxisValue] = Field(min_length=1)


class ProbeSpec(_Part):
    """The frozen-encoder probe: a linear head on each named encoder's frozen tokens (``model.head=probe``)."""

    # "random" (no pretraining), the label of an axis value whose cells pretrain ("mae"), or LABEL@STEP for a
    # checkpoint that pretraining kept (train.keep_checkpoints): "mae@2500"
    encoders: list[Label] = Field(min_length=1)
    seeds: list[StrictInt] = Field(default_factory=lambda: [0], min_length=1)
    overrides: Overrides = Field(default_factory=list)  # of the fine-tuning config, after the spec's own


class DiagnosticsSpec(_Part):
    """What a study measures besides its cells, to say why they came out as they did."""

    reliance: StrictBool = False  # each cell's held-out Dice with the ViT's features replaced by their mean
    pretext: StrictBool = False  # evaluate-recon at each kept checkpoint of each MAE / SimMIM pretraining
    probe: ProbeSpec | None = None


class Spec(_Part):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    name: Label
    description: Label = ""
    data: DataSpec
    pretrain: RunSpec
    finetune: RunSpec
    seeds: list[StrictInt] = Field(default_factory=lambda: [0], min_length=1)
    axes: Annotated[list[Axis], BeforeValidator(lambda v: [] if v is None else v)]
    baseline: Annotated[dict[str, Label], BeforeValidator(_or_empty)] = Field(default_factory=dict)  # speed-ups against
    contrastive: Annotated[dict[str, Label], BeforeValidator(_or_empty)] = Field(default_factory=dict)  # and this
    # combinations of the grid that are not run: each a partial mapping axis -> label ({labels: "1", method: simclr})
    exclude: Annotated[list[dict[str, Label]], BeforeValidator(lambda v: [] if v is None else v)] = Field(
        default_factory=list)
    evaluate: bool = True  # score each cell's held-out cases in their original geometry
    diagnostics: DiagnosticsSpec = Field(default_factory=DiagnosticsSpec)
    share_pretraining: bool = False  # one pretraining run per setting, shared by every fine-tuning seed
    _source: str = PrivateAttr("")

    @property
    def source(self) -> str:
        """The name or path the spec was loaded from."""
        return self._source

    @property
    def references(self) -> dict[str, dict[str, str]]:
        """The runs speed-ups are measured against, by role ("baseline", "contrastive"), where the spec names them."""
        return {which: ref for which, ref in (("baseline", self.baseline), ("contrastive", self.contrastive)) if ref}

    def excluded(self, values: dict[str, str]) -> bool:
        """Whether a combination of axis values is one of those the spec does not run."""
        return any(all(values.get(k) == v for k, v in ex.items()) for ex in self.exclude)

    @model_validator(mode="after")
    def _references_are_axis_values(self) -> Spec:
        named = [(which, ref) for which, ref in self.references.items()]
        named += [(f"exclude[{n}]", ex) for n, ex in enumerate(self.exclude)]
        for which, ref in named:
            for axis, label in ref.items():
                if label not in {v.label for a in self.axes if a.name == axis for v in a.values}:
                    raise ValueError(f"{which} names {axis}={label}, which is not a value of an axis")
        probe = self.diagnostics.probe
        pretrained = {v.label for a in self.axes for v in a.values if v.pretrain is not None}
        for n, enc in enumerate(probe.encoders if probe else []):
            label, _, step = enc.partition("@")
            if label != "random" and label not in pretrained or step and not step.isdigit() or enc == "random@" + step:
                raise ValueError(f"diagnostics.probe.encoders[{n}] is {enc!r}: give random, the label of a value "
                                 f"that pretrains ({', '.join(sorted(pretrained))}) or LABEL@STEP")
        return self


def study_names() -> list[str]:
    folder = resources.files("medmim") / "studies"
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


def _model_of(annotation: Any) -> type[BaseModel] | None:
    """The spec model inside a field's type (``list[Axis]`` -> Axis), if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in get_args(annotation):
        if (model := _model_of(arg)) is not None:
            return model
    return None


def _problem(e: ValidationError) -> str:
    """The first problem of a spec, naming its key: "axes[0].values[1].label", "unknown key 'extra' (known: ...)"."""
    err = e.errors()[0]
    loc, model = "", Spec
    for n, part in enumerate(err["loc"]):
        if isinstance(part, int):
            loc += f"[{part}]"
            continue
        loc += f".{part}" if loc else str(part)
        if n < len(err["loc"]) - 1 and model is not None and part in model.model_fields:
            model = _model_of(model.model_fields[part].annotation)
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        known = f" (known: {', '.join(sorted(model.model_fields))})" if model is not None else ""
        return f"unknown key '{loc}'{known}"
    if err["type"] == "missing":
        return f"missing '{loc}'"
    if not loc:  # a check across keys names them itself
        return msg
    return f"'{loc}' {msg}" if err["type"] == "value_error" else f"'{loc}': {msg}"


def load_spec(source: str) -> Spec:
    """A shipped spec name or a YAML path -> :class:`Spec` (validated; errors name the key)."""
    path = Path(source)
    if names_a_file(path):
        if not path.is_file():
            raise MedmimError(f"{source}: study spec not found")
        text = read_text(path)
    else:
        shipped = resources.files("medmim") / "studies" / f"{source}.yaml"
        if not shipped.is_file():
            raise MedmimError(f"unknown study '{source}' (shipped: {', '.join(study_names())}; or give a .yaml file)")
        text = shipped.read_text(encoding="utf-8")
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError:
        raise MedmimError(f"{source}: invalid YAML")
    if not isinstance(raw, dict):
        raise MedmimError(f"{source}: a study spec is a mapping")
    try:
        spec = Spec.model_validate({"name": path.stem, **raw})
    except ValidationError as e:
        raise MedmimError(f"{source}: {_problem(e)}")
    spec._source = source
    return spec
