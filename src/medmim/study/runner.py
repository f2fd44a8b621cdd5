"""Running a study: its data (phantoms written, extra datasets checked), one prepared cache, each cell's
pretraining (shared between cells that pretrain alike) and fine-tuning, and held-out evaluation.

A finished run leaves ``done.json`` and is skipped when the study runs again; an interrupted one resumes from its
last checkpoint. ``report_only`` trains nothing and reports on the cells finished so far.
"""

from __future__ import annotations

import csv
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from medmim.config import Config, load_config
from medmim.errors import MedmimError
from medmim.fileio import atomic_write_text, read_json, read_text
from medmim.study.cells import Cell, expand_cells
from medmim.study.curves import Curve
from medmim.study.diagnostics import run_diagnostics
from medmim.study.report import write_report
from medmim.study.results import CellRun, StudyResult, aggregate, score_cells
from medmim.study.spec import Spec

DONE = "done.json"  # a finished run's summary


def read_curve(run_dir: Path) -> Curve:
    """(step, validation mean Dice) pairs from a fine-tuning run's metrics.csv."""
    p = run_dir / "metrics.csv"
    if not p.is_file():
        return []
    rows = csv.DictReader(read_text(p).splitlines())
    return [(int(r["step"]), float(r["val_dice"])) for r in rows if r.get("val_dice")]


def _write_json(path: Path, obj: dict) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1))  # as studies have always written them: no final newline


@dataclass
class StudyRun:
    spec: Spec
    out: Path
    extra: list[str]  # command-line overrides, applied to both configs
    log: object = print
    quick: list[str] = field(default_factory=list)  # overrides that shrink every run (demo --quick)
    stage_seconds: dict[str, float] = field(default_factory=dict)
    report_only: bool = False  # set by run(report_only=True): never start a training run
    cache_path: Path | None = None  # the prepared cache every run reads; set by run()

    # -- data --
    def dataset_path(self) -> Path:
        d = self.spec.data
        return Path(d.path) if d.path is not None else self.out / "phantom"

    def pretrain_extra(self) -> list[Path]:
        """Datasets that pretraining reads besides the study's own (data.pretrain_extra, data.samples)."""
        d = self.spec.data
        extra = [Path(p).expanduser() for p in d.pretrain_extra]
        if d.samples:
            extra += [self.out / "samples" / "ct", self.out / "samples" / "mri"]
        return extra

    def ensure_extra_data(self) -> None:
        d = self.spec.data
        for p in d.pretrain_extra:
            if not Path(p).expanduser().exists():
                raise MedmimError(f"study {self.spec.name}: data.pretrain_extra {p} does not exist")
        if d.samples:
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
        if d.path is not None and not path.exists():
            raise MedmimError(f"study {self.spec.name}: data.path {path} does not exist "
                              f"(give your dataset: medmim study {self.spec.name} data.path=DIR)")
        ph = d.phantom
        if ph is not None:
            marker = path / "dataset.json"
            desc = read_json(marker) if marker.is_file() else {}
            made = desc.get("medmim_phantom", {})
            if made.get("seed") == ph.seed and desc.get("numTraining") == ph.labeled \
                    and made.get("kind", "abdomen") == ph.kind:
                self.log(f"[data] phantom dataset in {path}: already there")
                return path
            from medmim.data.phantom import write_phantom_dataset
            from medmim.data.phantom_brain import write_brain_phantom_dataset

            t0 = time.perf_counter()
            kw = {k: v for k, v in (("shape", ph.shape), ("spacing", ph.spacing)) if v is not None}
            what = "brain MRIs" if ph.kind == "brain" else "CTs"
            self.log(f"[data] writing {ph.labeled} labeled + {ph.unlabeled} unlabeled phantom {what} to {path}")
            write = write_brain_phantom_dataset if ph.kind == "brain" else write_phantom_dataset
            write(path, labeled=ph.labeled, unlabeled=ph.unlabeled, seed=ph.seed, **kw)
            self.stage_seconds["phantom"] = time.perf_counter() - t0
        return path

    def config(self, which: str, cell: Cell) -> Config:
        """The config of ``cell``'s pretraining or fine-tuning run: the spec's base, the study's data and seed,
        the spec's and the cell's overrides, then --quick's and the command line's."""
        spec = self.spec
        if which == "pretrain":
            base, seed = spec.pretrain.config, cell.pretrain_seed(spec)
            ov = spec.pretrain.overrides + (cell.pretrain or [])
        else:
            base, seed = spec.finetune.config, cell.seed
            ov = spec.finetune.overrides + cell.finetune
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
        cfg = load_config(self.spec.pretrain.config, self.spec.pretrain.overrides + self.quick + self.extra)
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
    def run_training(self, cfg: Config, run_dir: Path, stage: str) -> dict:
        """Train one run of the study in ``run_dir`` (skipped when finished before; resumed when interrupted)."""
        from medmim.train.engine import run_training

        done = run_dir / DONE
        if done.is_file():
            self.log(f"[{stage}] {run_dir.name}: finished before, skipped")
            return read_json(done)
        if self.report_only:
            raise MedmimError(f"{run_dir}: not finished (no {DONE}); --report-only trains nothing")
        cfg.run.dir = str(run_dir)
        cfg.resume = "auto"
        self.log(f"[{stage}] {run_dir.name}: {cfg.train.max_steps} steps")
        t0 = time.perf_counter()
        summary = run_training(cfg, log=lambda s: self.log(f"    {s}"))
        summary["wall_s"] = time.perf_counter() - t0
        _write_json(done, summary)
        self.stage_seconds[f"{stage} {run_dir.name}"] = summary["wall_s"]
        return summary

    def pretrain_dir(self, cell: Cell) -> Path | None:
        """The folder of the pretraining run ``cell`` starts from (shared by cells that pretrain alike)."""
        if cell.pretrain is None:
            return None
        return self.out / "pretrain" / f"{self.config('pretrain', cell).pretrain.method}-{cell.pretrain_key(self.spec)}"

    def cell_dir(self, cell: Cell) -> Path:
        """The folder of ``cell``'s fine-tuning run."""
        return self.out / "cells" / cell.slug

    def run_cell(self, cell: Cell) -> CellRun:
        """Pretrain (unless shared and finished), fine-tune and evaluate one cell; what it left."""
        pre_ckpt = None
        if (pre_dir := self.pretrain_dir(cell)) is not None:
            self.run_training(self.config("pretrain", cell), pre_dir, "pretrain")
            pre_ckpt = pre_dir / "model.safetensors"
        fcfg = self.config("finetune", cell)
        if pre_ckpt is not None:
            fcfg.model.pretrained = str(pre_ckpt)
        cell_dir = self.cell_dir(cell)
        summary = self.run_training(fcfg, cell_dir, "finetune")
        evaluation = None
        ev_file = cell_dir / "evaluation.json"
        # held-out cases are scored in their original geometry, which needs the raw dataset (not only a cache)
        if self.spec.evaluate and not (self.dataset_path() / "manifest.json").is_file():
            if ev_file.is_file():
                evaluation = read_json(ev_file)
            else:
                best = cell_dir / "checkpoints" / "best.pt"
                evaluation = self.evaluate_run(cell_dir, best if best.is_file() else cell_dir / "checkpoints" / "last.pt")
                _write_json(ev_file, evaluation)
        return CellRun(cell=cell.slug, group=cell.group, values=cell.values, seed=cell.seed,
                       pretrained=str(pre_ckpt) if pre_ckpt else None, run_dir=str(cell_dir),
                       wall_s=summary.get("wall_s"), curve=read_curve(cell_dir), evaluation=evaluation)

    def evaluate_run(self, cell_dir: Path, ckpt: Path) -> dict:
        """Score a run's checkpoint on the held-out cases in their original geometry (evaluation.json's content)."""
        from medmim.eval.evaluate import evaluate

        t0 = time.perf_counter()
        ev = evaluate(self.dataset_path(), cell_dir / "evaluation", checkpoint=str(ckpt), split="val",
                      log=lambda s: self.log(f"    {s}"))
        self.stage_seconds[f"evaluate {cell_dir.name}"] = time.perf_counter() - t0
        per_class = {str(c): {"name": d["name"], "dice": d["mean_dice"], "hd95": d["mean_hd95"], "n": d["n"],
                              "absent": d["absent"]} for c, d in ev.per_class().items()}
        return {"mean_dice": ev.mean_dice(), "mean_hd95": ev.mean_hd95(), "per_class": per_class,
                "cases": len(ev.per_case()), "checkpoint": str(ckpt)}

    def run(self, report_only: bool = False) -> StudyResult:
        """Run every cell not finished yet, then write results.json, cells.csv, summary.md and curves.png.
        ``report_only``: train nothing, and report on the cells finished so far (those whose fine-tuning wrote
        done.json), e.g. while a long study runs."""
        cells = expand_cells(self.spec)
        if report_only:
            finished = [c for c in cells if (self.cell_dir(c) / DONE).is_file()]
            if not finished:
                raise MedmimError(f"{self.out}: no finished cell of study {self.spec.name} to report on")
            self.log(f"report on {len(finished)} of {len(cells)} cell(s) finished so far; nothing is trained")
            cells = finished
            self.report_only = True
            self.cache_path = self.cache_location(self.dataset_path())
        else:
            self.out.mkdir(parents=True, exist_ok=True)
            self.prepare(self.ensure_data())
        runs = []
        for n, cell in enumerate(cells, 1):
            self.log(f"== cell {n}/{len(cells)}: {cell.group}, seed {cell.seed}")
            runs.append(self.run_cell(cell))
        diagnostics = run_diagnostics(self, cells, runs)
        scored = score_cells(self.spec, runs)
        result = StudyResult(scored, aggregate(scored), self.cache_path, dict(self.stage_seconds), diagnostics)
        write_report(self.out, self.spec, result)
        return result
