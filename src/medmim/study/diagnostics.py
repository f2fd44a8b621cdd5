"""The diagnostics of a study, which say why its cells came out as they did (``diagnostics:`` in a spec):

* ``reliance``: each fine-tuned cell's held-out Dice with the features its UNETR takes from the ViT replaced by
  their mean over each window's tokens; the drop is how much of the segmentation the ViT carries. Where the
  baseline (scratch) loses nothing, pretraining the ViT cannot matter on that data.
* ``probe``: a linear head on each named encoder's frozen, upsampled tokens (``model.head=probe``), trained for a
  fixed number of steps per seed and scored on the held-out cases at its last step: the representation test.
* ``pretext``: ``evaluate-recon`` at each kept checkpoint of each MAE / SimMIM pretraining: whether the masked
  voxels are predicted better than by the trilinear and visible-mean baselines, which learn nothing.

Each result is kept next to the run it measures (``cells/X/reliance.json``, ``probe/ENCODER_seedN/``,
``pretrain/X/pretext.json``) and is not measured again when the study runs again.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from medmim.config import saved_config
from medmim.errors import MedmimError
from medmim.fileio import atomic_write_text, read_json, read_text
from medmim.study.cells import Cell, slug
from medmim.study.curves import MeanSd, mean_sd, paired_difference

if TYPE_CHECKING:
    from medmim.study.results import CellRun
    from medmim.study.runner import StudyRun

RANDOM = "random"
RECON_METHODS = ("mae", "simmim")
NOTHING_CARRIED = 0.01  # a drop in mean Dice below this (or within the spread between seeds) is "nothing"


@dataclass(frozen=True)
class ProbeRun:
    encoder: str  # "random", "mae", "mae@2500"
    seed: int
    checkpoint: str | None  # the encoder's weights; None: random
    mean_dice: float | None  # held-out, at the probe's last step
    steps: int | None  # the probe's training steps
    norm: str = "none"  # model.probe_norm of its run (a run from before the option fed raw tokens)


@dataclass(frozen=True)
class PretextRow:
    pretraining: str  # "mae (mae, mae-recipe)": the method and the axis values whose cells start from it
    step: int
    model_mse: float
    trilinear_mse: float
    visible_mean_mse: float


@dataclass
class Diagnostics:
    reliance: dict[str, dict] = field(default_factory=dict)  # cell folder name -> reliance.json
    probes: list[ProbeRun] = field(default_factory=list)
    pretext: list[PretextRow] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"reliance": self.reliance, "probe": [p.__dict__ for p in self.probes],
                "pretext": [p.__dict__ for p in self.pretext]}


def _write(path: Path, obj: dict) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1))


def cell_reliance(study: StudyRun, run: CellRun) -> dict | None:
    """A cell's reliance.json: its held-out mean Dice as evaluated, and with the ViT's features averaged."""
    from medmim.eval.evaluate import evaluate

    cell_dir = Path(run.run_dir)
    path = cell_dir / "reliance.json"
    if path.is_file():
        return read_json(path)
    if study.report_only or run.evaluation is None:
        return None
    study.log(f"[reliance] {cell_dir.name}: held-out cases with the ViT's features averaged")
    ev = evaluate(study.dataset_path(), cell_dir / "evaluation-vit-averaged", checkpoint=run.evaluation["checkpoint"],
                  split="val", vit_features="mean", log=lambda s: study.log(f"    {s}"))
    rel = {"mean_dice": run.evaluation["mean_dice"], "mean_dice_vit_averaged": ev.mean_dice(),
           "checkpoint": run.evaluation["checkpoint"]}
    rel["drop"] = paired_difference(rel["mean_dice"], rel["mean_dice_vit_averaged"])
    _write(path, rel)
    return rel


def _pretraining_of(study: StudyRun, cells: list[Cell], label: str) -> Path:
    """The pretraining folder of the first cell whose values include ``label`` and that pretrains."""
    from medmim.study.cells import expand_cells

    for c in cells + expand_cells(study.spec):  # the cells run so far, else any the spec has
        if label in c.values.values() and c.pretrain is not None:
            return study.pretrain_dir(c)
    raise MedmimError(f"study {study.spec.name}: diagnostics.probe names {label!r}, but no cell with that value "
                      f"pretrains")


def encoder_checkpoint(study: StudyRun, cells: list[Cell], encoder: str) -> Path | None:
    """The weights a probe encoder name stands for: None for random, a run's model.safetensors, or a kept step."""
    if encoder == RANDOM:
        return None
    label, _, step = encoder.partition("@")
    folder = _pretraining_of(study, cells, label)
    return folder / "checkpoints" / f"step_{int(step):06d}.pt" if step else folder / "model.safetensors"


def probe_dir(study: StudyRun, encoder: str, seed: int) -> Path:
    """The folder of the probe run on ``encoder`` with ``seed``; it is finished once it holds evaluation.json."""
    return study.out / "probe" / f"{slug(encoder.replace('@', '-step'))}_seed{seed}"


def probe_run(study: StudyRun, cells: list[Cell], encoder: str, seed: int) -> ProbeRun | None:
    """Train (unless finished) and evaluate the probe on one encoder with one seed; None where it cannot run yet
    (``--report-only`` before it ran)."""
    probe = study.spec.diagnostics.probe
    run_dir = probe_dir(study, encoder, seed)
    ev_file = run_dir / "evaluation.json"
    if study.report_only and not ev_file.is_file():
        return None
    ckpt = encoder_checkpoint(study, cells, encoder)
    if not ev_file.is_file():
        if ckpt is not None and not ckpt.is_file():
            raise MedmimError(f"{ckpt}: not there, so the probe of {encoder!r} cannot run (a kept step needs "
                              f"train.keep_checkpoints in the pretraining overrides)")
        cfg = study.config("finetune", Cell({"probe": encoder}, seed, None, [*probe.overrides, "model.head=probe"]))
        cfg.model.pretrained = str(ckpt) if ckpt is not None else None
        study.run_training(cfg, run_dir, "probe")
        # a probe is scored at its last step: its length is fixed, so nothing is chosen on the held-out cases
        _write(ev_file, study.evaluate_run(run_dir, run_dir / "checkpoints" / "last.pt"))
    ev, done = read_json(ev_file), run_dir / "done.json"
    steps = read_json(done).get("steps") if done.is_file() else None
    return ProbeRun(encoder, seed, str(ckpt) if ckpt else None, ev.get("mean_dice"), steps, _probe_norm(run_dir))


def _probe_norm(run_dir: Path) -> str:
    """What a probe run fed its head: its config's model.probe_norm; "none" for a run from before that option."""
    import yaml

    p = run_dir / "config.yaml"
    if not p.is_file():
        return "none"
    model = saved_config(yaml.safe_load(read_text(p)) or {}).get("model") or {}
    return str(model.get("probe_norm", "none"))


def _kept_steps(folder: Path) -> dict[int, Path]:
    """A pretraining run's checkpoints by step: those it kept, and its final weights at its last step."""
    steps = {int(m.group(1)): p for p in (folder / "checkpoints").glob("step_*.pt")
             if (m := re.fullmatch(r"step_(\d+)\.pt", p.name))}
    done = folder / "done.json"
    final = read_json(done).get("steps") if done.is_file() else None
    if isinstance(final, int) and final not in steps and (folder / "model.safetensors").is_file():
        steps[final] = folder / "model.safetensors"
    return dict(sorted(steps.items()))


def pretext_rows(study: StudyRun, cells: list[Cell]) -> list[PretextRow]:
    """Masked-voxel errors at each kept checkpoint of each finished MAE / SimMIM pretraining."""
    from medmim.eval.recon import reconstruction_report

    pretraining = {v.label for a in study.spec.axes for v in a.values if isinstance(v.pretrain, list)}
    labels: dict[Path, list[str]] = {}
    for c in cells:
        folder = study.pretrain_dir(c)
        if folder is not None and (folder / "done.json").is_file():
            labels.setdefault(folder, [])
            labels[folder] += [v for v in c.values.values() if v in pretraining and v not in labels[folder]]
    rows = []
    for folder, values in labels.items():
        method = folder.name.split("-")[0]
        if method not in RECON_METHODS:
            continue
        cache = folder / "pretext.json"
        table = {int(k): v for k, v in (read_json(cache) if cache.is_file() else {}).items()}
        for step, ckpt in _kept_steps(folder).items():
            if step not in table and not study.report_only:
                study.log(f"[pretext] {folder.name} at step {step}: evaluate-recon on the held-out cases")
                res = reconstruction_report(ckpt, [study.cache_path], folder / "pretext" / f"step_{step}",
                                            split="val", log=lambda s: study.log(f"    {s}"))
                table[step] = {m: res["methods"][m]["mse"] for m in ("model", "trilinear", "visible_mean")}
                _write(cache, {str(k): v for k, v in sorted(table.items())})
        name = f"{method} ({', '.join(values)})"
        rows += [PretextRow(name, step, t["model"], t["trilinear"], t["visible_mean"])
                 for step, t in sorted(table.items())]
    return rows


def run_diagnostics(study: StudyRun, cells: list[Cell], runs: list[CellRun]) -> Diagnostics:
    """Every diagnostic the spec asks for, measuring only what no earlier run of the study left."""
    spec, diag = study.spec.diagnostics, Diagnostics()
    if spec.reliance:
        for r in runs:
            if (rel := cell_reliance(study, r)) is not None:
                diag.reliance[r.cell] = rel
    if spec.pretext:
        diag.pretext = pretext_rows(study, cells)
    if spec.probe is not None:
        for encoder in spec.probe.encoders:
            for seed in spec.probe.seeds:
                if (p := probe_run(study, cells, encoder, seed)) is not None:
                    diag.probes.append(p)
    return diag


# -- tables --

def _fmt(ms: MeanSd, n: int, digits: int = 3) -> str:
    m, s = ms
    return "—" if m is None else f"{m:.{digits}f}" + (f" ± {s:.{digits}f}" if n > 1 else "")


def reliance_markdown(runs: list[CellRun], diag: Diagnostics, baseline: dict[str, str]) -> list[str]:
    groups: dict[str, list[dict]] = {}
    values: dict[str, dict[str, str]] = {}
    for r in runs:
        if r.cell in diag.reliance:
            groups.setdefault(r.group, []).append(diag.reliance[r.cell])
            values[r.group] = r.values
    if not groups:
        return []
    lines = ["", "### ViT reliance", "",
             "Held-out mean Dice of each fine-tuned UNETR as it is, and with every feature it takes from the ViT "
             "replaced by its mean over the window's tokens (the convolutional path from the image left alone); the "
             "drop is how much of the segmentation the ViT carries.", "",
             "| group | seeds | held-out mean Dice | ViT features averaged | drop |", "|---|---:|---:|---:|---:|"]
    notes = []
    for group, rels in groups.items():
        n = len(rels)
        drop = mean_sd([x["drop"] for x in rels])
        lines.append(f"| {group} | {n} | {_fmt(mean_sd([x['mean_dice'] for x in rels]), n)} | "
                     f"{_fmt(mean_sd([x['mean_dice_vit_averaged'] for x in rels]), n)} | {_fmt(drop, n)} |")
        if baseline and all(values[group].get(k) == v for k, v in baseline.items()) and drop[0] is not None:
            if drop[0] < NOTHING_CARRIED or (n > 1 and abs(drop[0]) <= drop[1]):
                notes.append(f"- {group} loses {drop[0]:+.3f} without the ViT's features: its segmentation does "
                             f"not rest on the ViT, so pretraining the ViT cannot matter much on this data.")
            else:
                whole = mean_sd([x["mean_dice"] for x in rels])[0]
                share = f" of its {whole:.3f} ({drop[0] / whole:.0%})" if whole and whole > 0 else ""
                notes.append(f"- {group} loses {drop[0]:.3f}{share} without the ViT's features: the ViT carries "
                             f"that much of the segmentation, so a better ViT can show.")
    return lines + ([""] + notes if notes else [])


def probe_markdown(diag: Diagnostics) -> list[str]:
    if not diag.probes:
        return []
    steps = sorted({p.steps for p in diag.probes if p.steps})
    steps = steps[0] if len(steps) == 1 else None
    by_enc: dict[str, list[ProbeRun]] = {}
    for p in diag.probes:
        by_enc.setdefault(p.encoder, []).append(p)
    random = {p.seed: p.mean_dice for p in by_enc.get(RANDOM, [])}
    norms = {p.norm for p in diag.probes}
    fed = ("tokens standardised per channel (batch normalisation without affine, as MAE's linear probe)"
           if norms == {"batchnorm"} else "raw tokens, not normalised before the head" if norms == {"none"}
           else "some runs standardised their tokens, some did not: the rows do not compare")
    lines = ["", "### Frozen-encoder probe", "",
             f"A linear head on each encoder's frozen, upsampled tokens (no convolutional path from the image; "
             f"{fed}), trained {'for ' + str(steps) + ' steps ' if steps else ''}per seed and scored on the "
             f"held-out cases at its last step.", "",
             "| encoder | seeds | held-out mean Dice | minus random's, seed by seed |", "|---|---:|---:|---:|"]
    for enc, ps in by_enc.items():
        n = len(ps)
        vs = [paired_difference(p.mean_dice, random.get(p.seed)) for p in ps] if enc != RANDOM else []
        d = mean_sd(vs)
        lines.append(f"| {enc} | {n} | {_fmt(mean_sd([p.mean_dice for p in ps]), n)} | "
                     f"{'—' if enc == RANDOM else _fmt(d, sum(v is not None for v in vs)) if d[0] is not None else '—'} |")
    return lines


def pretext_markdown(diag: Diagnostics) -> list[str]:
    if not diag.pretext:
        return []
    lines = ["", "### Pretext check", "",
             "Masked-voxel mean squared error on crops of the held-out cases (`evaluate-recon`), and as a multiple "
             "of the two baselines that learn nothing (below 1: better than the baseline).", "",
             "| pretraining | step | masked-voxel MSE | × trilinear | × visible mean |", "|---|---:|---:|---:|---:|"]
    for p in diag.pretext:
        lines.append(f"| {p.pretraining} | {p.step} | {p.model_mse:.4g} | {p.model_mse / p.trilinear_mse:.2f} | "
                     f"{p.model_mse / p.visible_mean_mse:.2f} |")
    return lines
