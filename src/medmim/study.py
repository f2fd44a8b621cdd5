"""`medmim study SPEC`: grids of pretraining x fine-tuning runs, and their honest aggregation.

A spec (YAML; shipped ones live in ``medmim/studies/``) names a dataset, a base pretraining and a
base fine-tuning config, seeds, and axes whose values change either config:

    name: methods
    data: {phantom: {labeled: 10, unlabeled: 14, seed: 0}}     # or {path: DIR}
    pretrain: {config: mae-cpu, overrides: [train.max_steps=300]}
    finetune: {config: unetr-cpu, overrides: [data.label_fraction=0.5]}
    seeds: [0, 1, 2]
    axes:
      - name: method
        values:
          - {label: scratch, pretrain: null}                  # no pretraining
          - {label: mae, pretrain: [pretrain.method=mae]}     # overrides of the pretraining config
          - {label: simmim, pretrain: [pretrain.method=simmim, pretrain.decoder_depth=0, pretrain.loss=l1]}
    baseline: {method: scratch}        # speed-ups are measured against this value of an axis
    contrastive: {method: simclr}      # and, if given, against this one

Every cell (one value per axis, one seed) fine-tunes in its own folder; identical pretraining runs
are shared between cells. A finished run leaves ``done.json`` and is skipped when the study runs
again; an interrupted one resumes from its last checkpoint.

Convergence speed-up, defined once: for a baseline run B and a pretrained run P, let D be B's best
validation mean Dice; the speed-up is (first step at which B reaches 0.95 D) / (first step at which
P reaches 0.95 D). When P never reaches 0.95 D it is reported as such, never as a number.
"""

from __future__ import annotations

import csv
import hashlib
import itertools
import json
import math
import re
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np
import yaml

from medmim.config import Config, load_config, names_a_file
from medmim.errors import MedmimError

SPEEDUP_LEVEL = 0.95
CONVERGED_REL_CHANGE = 0.05  # |change of validation Dice over the last quarter| / final Dice below this


# --- the spec --------------------------------------------------------------------------------

@dataclass
class AxisValue:
    label: str
    pretrain: list[str] | None | bool = True  # True: inherit; None: no pretraining; list: overrides
    finetune: list[str] = field(default_factory=list)
    both: list[str] = field(default_factory=list)


@dataclass
class Spec:
    name: str
    source: str
    data: dict
    pretrain_config: str
    pretrain_overrides: list[str]
    finetune_config: str
    finetune_overrides: list[str]
    seeds: list[int]
    axes: list[tuple[str, list[AxisValue]]]
    baseline: dict[str, str]
    contrastive: dict[str, str]
    evaluate: bool = True
    description: str = ""
    share_pretraining: bool = False  # one pretraining run per setting, shared by every fine-tuning seed


def study_names() -> list[str]:
    folder = resources.files("medmim") / "studies"
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


def _overrides(v, where: str) -> list[str]:
    if v is None:
        return []
    if isinstance(v, str):
        return [v]
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise MedmimError(f"{where}: overrides must be a list of key=value strings")
    return list(v)


def load_spec(source: str) -> Spec:
    """A shipped spec name or a YAML path -> :class:`Spec` (validated; errors name the key)."""
    path = Path(source)
    if names_a_file(path):
        if not path.is_file():
            raise MedmimError(f"{source}: study spec not found")
        text = path.read_text(encoding="utf-8")
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
    known = {"name", "description", "data", "pretrain", "finetune", "seeds", "axes", "baseline", "contrastive", "evaluate",
             "share_pretraining"}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise MedmimError(f"{source}: unknown key '{unknown[0]}' (known: {', '.join(sorted(known))})")
    for key in ("data", "pretrain", "finetune", "axes"):
        if key not in raw:
            raise MedmimError(f"{source}: missing '{key}'")
    data = raw["data"]
    if not isinstance(data, dict) or not ({"phantom", "path"} & set(data)):
        raise MedmimError(f"{source}: 'data' needs 'phantom: {{labeled, unlabeled, seed}}' or 'path: DIR'")
    extra = data.get("pretrain_extra", [])
    if not isinstance(extra, list) or not all(isinstance(e, str) for e in extra):
        raise MedmimError(f"{source}: data.pretrain_extra must be a list of dataset folders")
    if not isinstance(data.get("samples", False), bool):
        raise MedmimError(f"{source}: data.samples must be true or false")
    axes = []
    for n, ax in enumerate(raw["axes"] or []):
        if not isinstance(ax, dict) or "name" not in ax or not isinstance(ax.get("values"), list) or not ax["values"]:
            raise MedmimError(f"{source}: axes[{n}] needs a 'name' and a non-empty list of 'values'")
        values = []
        for m, v in enumerate(ax["values"]):
            where = f"{source}: axes[{n}].values[{m}]"
            if not isinstance(v, dict) or "label" not in v:
                raise MedmimError(f"{where} needs a 'label'")
            pre = v.get("pretrain", True)
            values.append(AxisValue(str(v["label"]), None if pre is None else (True if pre is True else _overrides(pre, where)),
                                    _overrides(v.get("finetune"), where), _overrides(v.get("both"), where)))
        axes.append((str(ax["name"]), values))
    seeds = raw.get("seeds", [0])
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) for s in seeds):
        raise MedmimError(f"{source}: 'seeds' must be a list of integers")
    spec = Spec(name=str(raw.get("name", Path(source).stem)), source=source, data=data,
                pretrain_config=str(raw["pretrain"].get("config")), pretrain_overrides=_overrides(raw["pretrain"].get("overrides"), f"{source}: pretrain"),
                finetune_config=str(raw["finetune"].get("config")), finetune_overrides=_overrides(raw["finetune"].get("overrides"), f"{source}: finetune"),
                seeds=seeds, axes=axes, baseline=dict(raw.get("baseline") or {}), contrastive=dict(raw.get("contrastive") or {}),
                evaluate=bool(raw.get("evaluate", True)), description=str(raw.get("description", "")),
                share_pretraining=bool(raw.get("share_pretraining", False)))
    for which in ("baseline", "contrastive"):
        for axis, label in getattr(spec, which).items():
            labels = {v.label for name, vals in axes if name == axis for v in vals}
            if not labels or label not in labels:
                raise MedmimError(f"{source}: {which} names {axis}={label}, which is not a value of an axis")
    return spec


# --- cells -----------------------------------------------------------------------------------

def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text.replace("%", "pct")).strip("-")


def _group_name(values: dict[str, str]) -> str:
    """How a group of cells is named in tables: "method=mae, ratio=0.75"."""
    return ", ".join(f"{k}={v}" for k, v in values.items())


@dataclass
class Cell:
    values: dict[str, str]  # axis -> label
    seed: int
    pretrain: list[str] | None  # overrides of the pretraining config, None = from scratch
    finetune: list[str]

    @property
    def group(self) -> str:
        return _group_name(self.values)

    @property
    def slug(self) -> str:
        return _slug("_".join(f"{k}-{v}" for k, v in self.values.items()) + f"_seed{self.seed}")

    def pretrain_key(self, spec: Spec) -> str | None:
        if self.pretrain is None:
            return None
        seed = 0 if spec.share_pretraining else self.seed
        blob = json.dumps([spec.pretrain_config, spec.pretrain_overrides, self.pretrain, seed])
        return hashlib.blake2b(blob.encode(), digest_size=5).hexdigest()


def expand_cells(spec: Spec) -> list[Cell]:
    cells = []
    for combo in itertools.product(*[vals for _, vals in spec.axes]):
        pre: list[str] | None = []
        fine: list[str] = []
        for v in combo:
            if v.pretrain is None:
                pre = None
            elif v.pretrain is not True and pre is not None:
                pre += v.pretrain
            fine += v.finetune + v.both
            if pre is not None:
                pre += v.both
        for seed in spec.seeds:
            cells.append(Cell({name: v.label for (name, _), v in zip(spec.axes, combo)}, seed,
                              None if pre is None else list(pre), fine))
    return cells


# --- curves and numbers ----------------------------------------------------------------------

def read_curve(run_dir: Path) -> list[tuple[int, float]]:
    """(step, validation mean Dice) pairs from a fine-tuning run's metrics.csv."""
    p = run_dir / "metrics.csv"
    if not p.is_file():
        return []
    with open(p, newline="", encoding="utf-8") as f:
        return [(int(r["step"]), float(r["val_dice"])) for r in csv.DictReader(f) if r.get("val_dice")]


def first_step_reaching(curve: list[tuple[int, float]], level: float) -> int | None:
    for step, v in curve:
        if v >= level:
            return step
    return None


def speedup(baseline: list[tuple[int, float]], pretrained: list[tuple[int, float]]) -> dict:
    """The convergence speed-up of ``pretrained`` over ``baseline`` (see the module docstring)."""
    if not baseline or not pretrained:
        return {"speedup": None, "note": "no validation curve"}
    d = max(v for _, v in baseline)
    level = SPEEDUP_LEVEL * d
    sb, sp = first_step_reaching(baseline, level), first_step_reaching(pretrained, level)
    if d <= 0:
        return {"speedup": None, "level": level, "note": "baseline never scored above 0"}
    if sp is None:
        return {"speedup": None, "level": level, "baseline_step": sb, "note": f"never reached {level:.3f}"}
    return {"speedup": sb / sp, "level": level, "baseline_step": sb, "step": sp, "note": ""}


def convergence(curve: list[tuple[int, float]]) -> dict:
    """Relative change of validation Dice over the last quarter of the run; converged when small."""
    if len(curve) < 8:  # a "last quarter" of one or two validations says nothing
        return {"rel_change": None, "converged": False, "note": f"too few validations ({len(curve)}) to tell"}
    last = curve[-1][1]
    q_step = curve[-1][0] * 0.75
    at_q = min(curve, key=lambda sv: abs(sv[0] - q_step))[1]
    rel = (last - at_q) / max(abs(last), 1e-6)
    return {"rel_change": rel, "converged": abs(rel) < CONVERGED_REL_CHANGE, "note": ""}


def _mean_sd(values: list[float]) -> tuple[float | None, float | None]:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return None, None
    return float(np.mean(vals)), float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0


# --- running ---------------------------------------------------------------------------------

@dataclass
class StudyRun:
    spec: Spec
    out: Path
    extra: list[str]  # command-line overrides, applied to both configs
    log: object = print
    quick: list[str] = field(default_factory=list)  # overrides that shrink every run (demo --quick)
    stage_seconds: dict[str, float] = field(default_factory=dict)
    report_only: bool = False  # set by run(report_only=True): never start a training run

    # -- data --
    def dataset_path(self) -> Path:
        d = self.spec.data
        if "path" in d:
            return Path(d["path"])
        return self.out / "phantom"

    def pretrain_extra(self) -> list[Path]:
        """Datasets that pretraining reads besides the study's own (data.pretrain_extra, data.samples)."""
        d = self.spec.data
        extra = [Path(p).expanduser() for p in d.get("pretrain_extra", [])]
        if d.get("samples"):
            extra += [self.out / "samples" / "ct", self.out / "samples" / "mri"]
        return extra

    def ensure_extra_data(self) -> None:
        d = self.spec.data
        for p in d.get("pretrain_extra", []):
            if not Path(p).expanduser().exists():
                raise MedmimError(f"study {self.spec.name}: data.pretrain_extra {p} does not exist")
        if d.get("samples"):
            folder = self.out / "samples"
            if all((folder / k / "dataset.json").is_file() for k in ("ct", "mri")):
                self.log(f"[data] real sample scans in {folder}: already there")
                return
            from medmim.data.samples import write_samples

            t0 = time.perf_counter()
            self.log(f"[data] real sample scans (pip download, cached) -> {folder}")
            write_samples(folder, log=self.log)
            self.stage_seconds["samples"] = time.perf_counter() - t0

    def ensure_data(self) -> Path:
        d = self.spec.data
        path = self.dataset_path()
        self.ensure_extra_data()
        if "path" in d and not path.exists():
            raise MedmimError(f"study {self.spec.name}: data.path {path} does not exist "
                              f"(give your dataset: medmim study {self.spec.name} data.path=DIR)")
        if "phantom" in d:
            ph = dict(d["phantom"])
            marker = path / "dataset.json"
            if marker.is_file() and json.loads(marker.read_text(encoding="utf-8")).get("medmim_phantom", {}).get("seed") == ph.get("seed", 0) \
                    and json.loads(marker.read_text(encoding="utf-8")).get("numTraining") == ph.get("labeled"):
                self.log(f"[data] phantom dataset in {path}: already there")
                return path
            from medmim.data.phantom import write_phantom_dataset

            t0 = time.perf_counter()
            kw = {k: tuple(ph[k]) for k in ("shape", "spacing") if k in ph}
            self.log(f"[data] writing {ph.get('labeled', 10)} labeled + {ph.get('unlabeled', 0)} unlabeled phantom CTs to {path}")
            write_phantom_dataset(path, labeled=int(ph.get("labeled", 10)), unlabeled=int(ph.get("unlabeled", 0)),
                                  seed=int(ph.get("seed", 0)), **kw)
            self.stage_seconds["phantom"] = time.perf_counter() - t0
        return path

    def config(self, which: str, cell: Cell) -> Config:
        spec = self.spec
        if which == "pretrain":
            ov = spec.pretrain_overrides + (cell.pretrain or [])
            base = spec.pretrain_config
            seed = 0 if spec.share_pretraining else cell.seed
        else:
            ov = spec.finetune_overrides + cell.finetune
            base = spec.finetune_config
            seed = cell.seed
        paths = [self.cache_path] + (self.pretrain_extra() if which == "pretrain" else [])
        where = f"data.path=[{','.join(str(p) for p in paths)}]" if len(paths) > 1 else f"data.path={paths[0]}"
        data = [where, f"data.cache_dir={self.out / 'cache'}", f"train.seed={seed}"]
        return load_config(base, data + ov + self.quick + self.extra)

    def cache_location(self, dataset: Path) -> Path:
        """Where the study's prepared cache is: the dataset itself when it is a cache already."""
        return dataset if (dataset / "manifest.json").is_file() else self.out / "cache" / "prepared"

    def prepare(self, dataset: Path) -> None:
        """Prepare the dataset once, with the pretraining config's data settings."""
        from medmim.data.prepare import PrepareSettings, prepare_dataset

        self.cache_path = self.cache_location(dataset)
        if self.cache_path == dataset:
            return
        cfg = load_config(self.spec.pretrain_config, self.spec.pretrain_overrides + self.quick + self.extra)
        t0 = time.perf_counter()
        res = prepare_dataset(dataset, self.cache_path, PrepareSettings.from_config(cfg.data, dataset),
                              workers=cfg.data.prepare_workers, num_folds=cfg.data.num_folds, seed=0)
        self.log(f"[prepare] {len(res.done)} prepared, {len(res.skipped)} up to date, {len(res.failed)} failed "
                 f"in {res.seconds:.1f} s -> {self.cache_path}")
        if res.failed:
            raise MedmimError(f"{len(res.failed)} case(s) failed to prepare: {', '.join(sorted(res.failed))}")
        if res.done:
            self.stage_seconds["prepare"] = time.perf_counter() - t0

    # -- runs --
    def _run(self, cfg: Config, run_dir: Path, stage: str) -> dict:
        from medmim.train.engine import run_training

        done = run_dir / "done.json"
        if done.is_file():
            self.log(f"[{stage}] {run_dir.name}: finished before, skipped")
            return json.loads(done.read_text(encoding="utf-8"))
        if self.report_only:
            raise MedmimError(f"{run_dir}: not finished (no done.json); --report-only trains nothing")
        cfg.run.dir = str(run_dir)
        cfg.resume = "auto"
        self.log(f"[{stage}] {run_dir.name}: {cfg.train.max_steps} steps")
        t0 = time.perf_counter()
        summary = run_training(cfg, log=lambda s: self.log(f"    {s}"))
        summary["wall_s"] = time.perf_counter() - t0
        done.write_text(json.dumps(summary, indent=1), encoding="utf-8")
        self.stage_seconds[f"{stage} {run_dir.name}"] = summary["wall_s"]
        return summary

    def run_cell(self, cell: Cell) -> dict:
        pre_ckpt = None
        if cell.pretrain is not None:
            key = cell.pretrain_key(self.spec)
            pcfg = self.config("pretrain", cell)
            pre_dir = self.out / "pretrain" / f"{pcfg.pretrain.method}-{key}"
            self._run(pcfg, pre_dir, "pretrain")
            pre_ckpt = pre_dir / "model.safetensors"
        fcfg = self.config("finetune", cell)
        if pre_ckpt is not None:
            fcfg.model.pretrained = str(pre_ckpt)
        cell_dir = self.out / "cells" / cell.slug
        summary = self._run(fcfg, cell_dir, "finetune")
        result = {"cell": cell.slug, "group": cell.group, "values": cell.values, "seed": cell.seed,
                  "pretrained": str(pre_ckpt) if pre_ckpt else None, "run_dir": str(cell_dir),
                  "wall_s": summary.get("wall_s"), "curve": read_curve(cell_dir)}
        ev_file = cell_dir / "evaluation.json"
        # held-out cases are scored in their original geometry, which needs the raw dataset (not only a cache)
        if self.spec.evaluate and not (self.dataset_path() / "manifest.json").is_file():
            if ev_file.is_file():
                result["evaluation"] = json.loads(ev_file.read_text(encoding="utf-8"))
            else:
                result["evaluation"] = self._evaluate(cell_dir)
                ev_file.write_text(json.dumps(result["evaluation"], indent=1), encoding="utf-8")
        return result

    def _evaluate(self, cell_dir: Path) -> dict:
        from medmim.eval.evaluate import evaluate

        ckpt = cell_dir / "checkpoints" / "best.pt"
        if not ckpt.is_file():
            ckpt = cell_dir / "checkpoints" / "last.pt"
        t0 = time.perf_counter()
        ev = evaluate(self.dataset_path(), cell_dir / "evaluation", checkpoint=str(ckpt), split="val",
                      log=lambda s: self.log(f"    {s}"))
        self.stage_seconds[f"evaluate {cell_dir.name}"] = time.perf_counter() - t0
        per_class = {str(c): {"name": d["name"], "dice": d["mean_dice"], "hd95": d["mean_hd95"], "n": d["n"],
                              "absent": d["absent"]} for c, d in ev.per_class().items()}
        return {"mean_dice": ev.mean_dice(), "mean_hd95": ev.mean_hd95(), "per_class": per_class,
                "cases": len(ev.per_case()), "checkpoint": str(ckpt)}

    def run(self, dry_run: bool = False, report_only: bool = False) -> dict:
        """Run every cell not finished yet, then aggregate. ``report_only``: train nothing, and aggregate the
        cells finished so far (those whose fine-tuning wrote done.json), e.g. while a long study runs."""
        cells = expand_cells(self.spec)
        if dry_run:
            return {"cells": cells}
        if report_only:
            finished = [c for c in cells if (self.out / "cells" / c.slug / "done.json").is_file()]
            if not finished:
                raise MedmimError(f"{self.out}: no finished cell of study {self.spec.name} to report on")
            self.log(f"report on {len(finished)} of {len(cells)} cell(s) finished so far; nothing is trained")
            cells = finished
            self.report_only = True
            self.cache_path = self.cache_location(self.dataset_path())
        else:
            self.out.mkdir(parents=True, exist_ok=True)
            self.prepare(self.ensure_data())
        results = []
        for n, cell in enumerate(cells, 1):
            self.log(f"== cell {n}/{len(cells)}: {cell.group}, seed {cell.seed}")
            results.append(self.run_cell(cell))
        agg = aggregate(self.spec, results)
        (self.out / "results.json").write_text(json.dumps({"cells": results, "aggregate": agg,
                                                           "stage_seconds": self.stage_seconds}, indent=1, default=str),
                                               encoding="utf-8")
        write_tables(self.out, self.spec, results, agg)
        plot_curves(self.out / "curves.png", results, self.spec)
        return {"cells": results, "aggregate": agg}


# --- aggregation -----------------------------------------------------------------------------

def _matches(values: dict[str, str], fixed: dict[str, str]) -> bool:
    return all(values.get(k) == v for k, v in fixed.items())


def _partner(results: list[dict], r: dict, ref: dict[str, str]) -> dict | None:
    """The run with the same seed and the same values on the other axes, but ``ref`` on its axes."""
    want = {**r["values"], **ref}
    for q in results:
        if q["seed"] == r["seed"] and q["values"] == want:
            return q
    return None


def aggregate(spec: Spec, results: list[dict]) -> list[dict]:
    """One row per group (axis values), over seeds: mean and spread of everything a reader compares."""
    groups: dict[str, list[dict]] = {}
    for r in results:
        groups.setdefault(r["group"], []).append(r)
        r["convergence"] = convergence(r["curve"])
        r["best_val_dice"] = max((v for _, v in r["curve"]), default=None)
        for which in ("baseline", "contrastive"):
            ref = getattr(spec, which)
            if not ref or _matches(r["values"], ref):
                continue
            b = _partner(results, r, ref)
            r[f"speedup_vs_{which}"] = speedup(b["curve"], r["curve"]) if b else {"speedup": None, "note": "no partner run"}
            if which == "baseline" and b:  # same seed: same labeled subset, same decoder initialisation
                mine, theirs = ((q.get("evaluation") or {}).get("mean_dice") for q in (r, b))
                r["paired_delta"] = mine - theirs if mine is not None and theirs is not None else None
    rows = []
    for group, rs in groups.items():
        row = {"group": group, "values": rs[0]["values"], "seeds": len(rs)}
        row["eval_dice"] = _mean_sd([(r.get("evaluation") or {}).get("mean_dice") for r in rs])
        row["eval_hd95"] = _mean_sd([(r.get("evaluation") or {}).get("mean_hd95") for r in rs])
        row["best_val_dice"] = _mean_sd([r["best_val_dice"] for r in rs])
        row["converged"] = sum(bool(r["convergence"]["converged"]) for r in rs)
        paired = [r["paired_delta"] for r in rs if r.get("paired_delta") is not None]
        row["paired_delta"], row["paired_n"] = _mean_sd(paired), len(paired)
        row["rel_change"] = _mean_sd([r["convergence"]["rel_change"] for r in rs])
        for which in ("baseline", "contrastive"):
            sps = [r.get(f"speedup_vs_{which}") for r in rs if r.get(f"speedup_vs_{which}")]
            if sps:
                row[f"speedup_vs_{which}"] = _mean_sd([s["speedup"] for s in sps])
                row[f"never_reached_vs_{which}"] = sum(s["speedup"] is None for s in sps)
        organs: dict[str, list] = {}
        for r in rs:
            for c, d in ((r.get("evaluation") or {}).get("per_class") or {}).items():
                organs.setdefault(c, [d["name"], []])[1].append(d["dice"])
        row["organs"] = {c: (name, _mean_sd(v)) for c, (name, v) in sorted(organs.items(), key=lambda kv: int(kv[0]))}
        rows.append(row)
    return rows


def _fmt(ms: tuple[float | None, float | None], digits: int = 3, seeds: int = 1) -> str:
    m, s = ms
    if m is None:
        return "—"
    return f"{m:.{digits}f}" + (f" ± {s:.{digits}f}" if seeds > 1 else "")


def write_tables(out: Path, spec: Spec, results: list[dict], rows: list[dict]) -> None:
    with open(out / "cells.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["cell", "group", "seed", "eval_mean_dice", "eval_mean_hd95", "best_val_dice", "converged",
                    "rel_change_last_quarter", "speedup_vs_baseline", "speedup_vs_contrastive", "wall_s"])
        for r in results:
            ev = r.get("evaluation") or {}
            w.writerow([r["cell"], r["group"], r["seed"], ev.get("mean_dice"), ev.get("mean_hd95"), r["best_val_dice"],
                        r["convergence"]["converged"], r["convergence"]["rel_change"],
                        (r.get("speedup_vs_baseline") or {}).get("speedup"),
                        (r.get("speedup_vs_contrastive") or {}).get("speedup"), r.get("wall_s")])
    (out / "summary.md").write_text(summary_markdown(spec, rows), encoding="utf-8")


def summary_markdown(spec: Spec, rows: list[dict]) -> str:
    refs = [(which, _group_name(getattr(spec, which)))
            for which in ("baseline", "contrastive") if getattr(spec, which)]  # a spec may name neither
    head = ["group", "seeds", "held-out mean Dice", "mean HD95 (mm)", "best val Dice", "converged"]
    head += [f"speed-up vs {name}" for _, name in refs]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for r in rows:
        def sp(which):
            if f"speedup_vs_{which}" not in r:
                return "—"
            never = r[f"never_reached_vs_{which}"]
            txt = _fmt(r[f"speedup_vs_{which}"], 2, r["seeds"])
            return txt + (f" ({never}/{r['seeds']} never reached)" if never else "")
        n = r["seeds"]  # a group may have fewer finished seeds than the spec lists (--report-only)
        lines.append(f"| {r['group']} | {n} | {_fmt(r['eval_dice'], 3, n)} | {_fmt(r['eval_hd95'], 1, n)} | "
                     f"{_fmt(r['best_val_dice'], 3, n)} | {r['converged']}/{r['seeds']} |"
                     + "".join(f" {sp(which)} |" for which, _ in refs))
    organ_ids = []
    for r in rows:
        for c in r["organs"]:
            if c not in organ_ids:
                organ_ids.append(c)
    if organ_ids:
        names = {c: rows[0]["organs"].get(c, (c,))[0] for c in organ_ids}
        lines += ["", "Per-organ held-out Dice (mean over seeds):", "",
                  "| group | " + " | ".join(names[c] for c in organ_ids) + " |",
                  "|---|" + "---:|" * len(organ_ids)]
        for r in rows:
            lines.append(f"| {r['group']} | " + " | ".join(_fmt(r["organs"][c][1], 2) if c in r["organs"] else "—"
                                                         for c in organ_ids) + " |")
    lines += _reading_notes(spec, rows)
    lines += ["", f"Converged: |relative change of validation Dice over the last quarter of the run| < "
                  f"{CONVERGED_REL_CHANGE:.0%}; under the cosine schedule the last quarter runs at 15% of the peak "
                  f"learning rate or less, so a flat last quarter can also be the schedule running out (a run twice "
                  f"as long tells which). Speed-up: (first step the baseline reaches {SPEEDUP_LEVEL:.0%} of its best "
                  f"validation Dice) / (first step the pretrained run reaches it)."]
    return "\n".join(lines) + "\n"


def _reading_notes(spec: Spec, rows: list[dict]) -> list[str]:
    """What a reader may and may not conclude from the table: unfinished runs, and each group's held-out Dice
    against the baseline's next to the spread between seeds."""
    out: list[str] = []
    runs = sum(r["seeds"] for r in rows)
    unfinished = [f"{r['group']} ({r['seeds'] - r['converged']}/{r['seeds']})" for r in rows if r["converged"] < r["seeds"]]
    if unfinished:
        out += ["", f"**Not converged: {sum(r['seeds'] - r['converged'] for r in rows)} of {runs} runs** "
                    f"({', '.join(unfinished)}). Dice values and speed-ups that involve them compare unfinished runs."]
    if not spec.baseline:
        return out
    diffs = []
    for r in rows:
        if _matches(r["values"], spec.baseline):
            continue
        want = {**r["values"], **spec.baseline}
        b = next((q for q in rows if q["values"] == want), None)
        (m, sd), (bm, bsd) = r["eval_dice"], (b["eval_dice"] if b else (None, None))
        if m is None or bm is None:
            continue
        delta = m - bm
        if min(r["seeds"], b["seeds"]) < 2:
            verdict = "one seed: spread unknown"
        else:
            spread = max(sd, bsd)
            verdict = (f"beyond the spread ({spread:.3f})" if abs(delta) > spread
                       else f"within the spread ({spread:.3f}): not a result")
        (pm, psd), pn = r.get("paired_delta", (None, None)), r.get("paired_n", 0)
        paired = ("" if pm is None else f"; seed by seed: {pm:+.3f} ± {psd:.3f} over {pn}" if pn > 1
                  else f"; against the same seed: {pm:+.3f}")
        diffs.append(f"- {r['group']}: {delta:+.3f} ({verdict}{paired})")
    if diffs:
        out += ["", f"Held-out mean Dice minus {_group_name(spec.baseline)}'s (spread: the larger standard deviation over seeds of the two; "
                    "seed by seed: the mean ± SD of the differences between runs of the same seed, which share the "
                    "labeled subset and the decoder's initialisation):", ""] + diffs
    return out


def plot_curves(path: Path, results: list[dict], spec: Spec) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    colors = {}
    for r in results:
        if not r["curve"]:
            continue
        c = colors.setdefault(r["group"], f"C{len(colors) % 10}")
        steps, vals = zip(*r["curve"])
        ax.plot(steps, vals, color=c, alpha=0.9 if len(spec.seeds) == 1 else 0.6,
                label=r["group"] if r["seed"] == spec.seeds[0] else None)
    ax.set_xlabel("fine-tuning step")
    ax.set_ylabel("validation mean Dice (13 organs)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def measure_step_seconds(cfg: Config, repeats: int = 2) -> float:
    """Wall seconds of one optimizer step of ``cfg``'s run on this machine (forward, loss, backward, AdamW;
    grad_accum micro-batches), timed on synthetic crops after one warm-up step. Data loading, validation
    and checkpoints are not in it."""
    import torch

    from medmim.models import build_pretrainer, build_unetr
    from medmim.train.engine import autocast_for, segmentation_loss

    dev = torch.device("cuda" if cfg.run.device in ("auto", "cuda") and torch.cuda.is_available() else "cpu")
    n, roi = cfg.data.batch_size, tuple(cfg.data.roi_size)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(n, cfg.model.in_channels, *roi, generator=g).to(dev)
    if cfg.task == "finetune":
        model = build_unetr(cfg.model).to(dev).train()
        y = torch.randint(0, cfg.model.num_classes, (n, 1, *roi), generator=g).to(dev)
        dice_ce = segmentation_loss()

        def loss():
            return dice_ce(model(x).float(), y)
    else:
        model = build_pretrainer(cfg).to(dev).train()
        two_views = cfg.pretrain.method == "simclr"

        def loss():
            return (model(x, x.flip(-1)) if two_views else model(x)).loss
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6, fused=True)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        for _ in range(cfg.train.grad_accum):
            with autocast_for(cfg.train.precision, dev):
                value = loss()
            value.backward()
        opt.step()
        if dev.type == "cuda":
            torch.cuda.synchronize()

    step()
    t0 = time.perf_counter()
    for _ in range(repeats):
        step()
    return (time.perf_counter() - t0) / repeats


def _fmt_minutes(s: float) -> str:
    return f"{s / 60:.1f} min" if s < 5400 else f"{s / 3600:.1f} h"


def dry_run_table(spec: Spec, run: StudyRun, estimate: bool = True) -> str:
    """The cells and an estimate of their cost: steps x crops per step by run, and (``estimate``) the wall
    time of their training steps on this machine, from timing each distinct run's step once."""
    cells = expand_cells(spec)
    lines = [f"study {spec.name}: {len(cells)} fine-tuning cell(s)", ""]
    pre_seen = set()
    total = {"pretrain": 0, "finetune": 0}
    timed: dict[str, float] = {}  # one timing per distinct run config
    seconds = {"pretrain": 0.0, "finetune": 0.0}

    def run_seconds(cfg: Config) -> tuple[float, str]:
        d = cfg.to_dict()
        key = json.dumps({"task": d["task"], "model": d["model"], "pretrain": d["pretrain"],
                          "precision": d["train"]["precision"], "accum": d["train"]["grad_accum"],
                          "batch": cfg.data.batch_size, "roi": list(cfg.data.roi_size)}, sort_keys=True, default=str)
        if key not in timed:
            timed[key] = measure_step_seconds(cfg)
        s = timed[key] * (cfg.train.max_steps or 0)
        if cfg.train.max_time_min and s > cfg.train.max_time_min * 60:
            return cfg.train.max_time_min * 60, f" (stopped by train.max_time_min; all steps ~{_fmt_minutes(s)})"
        return s, ""

    for c in cells:
        f = load_config(spec.finetune_config, spec.finetune_overrides + c.finetune + run.quick + run.extra)
        fs = (f.train.max_steps or 0) * f.data.batch_size
        total["finetune"] += f.train.max_steps or 0
        est = ""
        if estimate:
            sec, note = run_seconds(f)
            seconds["finetune"] += sec
            est = f", ~{_fmt_minutes(sec)}{note}"
        pre = "scratch"
        if c.pretrain is not None:
            p = load_config(spec.pretrain_config, spec.pretrain_overrides + c.pretrain + run.quick + run.extra)
            key = c.pretrain_key(spec)
            pre = f"{p.pretrain.method} ({p.train.max_steps} steps x {p.data.batch_size} crops)"
            if key not in pre_seen:
                pre_seen.add(key)
                total["pretrain"] += p.train.max_steps or 0
                if estimate:
                    sec, note = run_seconds(p)
                    seconds["pretrain"] += sec
                    pre += f" ~{_fmt_minutes(sec)}{note}"
            else:
                pre += " (shared)"
        lines.append(f"- {c.group}, seed {c.seed}: pretrain {pre}; fine-tune {f.train.max_steps} steps x "
                     f"{f.data.batch_size} crops ({fs} crops){est}, roi {list(f.data.roi_size)}")
    lines += ["", f"{len(pre_seen)} pretraining run(s), {total['pretrain']} steps in all; "
                  f"{len(cells)} fine-tuning run(s), {total['finetune']} steps in all"]
    if estimate:
        lines += [f"estimated training time on this machine: ~{_fmt_minutes(sum(seconds.values()))} "
                  f"(pretraining {_fmt_minutes(seconds['pretrain'])}, fine-tuning {_fmt_minutes(seconds['finetune'])}; "
                  "from timing 2 steps of each distinct run on synthetic crops; data preparation, validation, "
                  "evaluation and other load on the machine not included)"]
    return "\n".join(lines)
