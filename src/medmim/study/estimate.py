"""What a study would cost, before it runs (``medmim study SPEC --dry-run``): its cells, their steps and crops,
and the wall time of the training still to do on this machine.

A run the study folder holds finished already (its done.json) is listed with the wall time it took and left out
of the estimate. A run still to do is estimated from a finished run of the same kind (same task, model, batch,
crop and precision), at the seconds per step that run measured, data loading and validation included; where
there is none, from timing 2 steps of it on synthetic crops, which leaves those out and so under-estimates."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from medmim.config import Config, load_config
from medmim.fileio import read_json
from medmim.study.cells import expand_cells
from medmim.study.runner import DONE, StudyRun
from medmim.study.spec import Spec
from medmim.train.step import measure_step_seconds


def _fmt_minutes(s: float) -> str:
    return f"{s / 60:.1f} min" if s < 5400 else f"{s / 3600:.1f} h"


def _run_key(cfg: Config) -> str:
    """What a step's time depends on: runs with the same key take the same time per step."""
    d = cfg.to_dict()
    return json.dumps({"task": d["task"], "model": {k: v for k, v in d["model"].items() if k != "pretrained"},
                       "pretrain": d["pretrain"], "precision": d["train"]["precision"],
                       "accum": d["train"]["grad_accum"], "batch": cfg.data.batch_size,
                       "roi": list(cfg.data.roi_size)}, sort_keys=True, default=str)


def _finished(run_dir: Path | None, needs: str = DONE) -> dict | None:
    """A finished run's done.json (its steps and wall seconds), or None; ``needs``: the file that marks it finished
    (a probe: its evaluation.json)."""
    done = run_dir / DONE if run_dir is not None else None
    return read_json(done) if done is not None and done.is_file() and (run_dir / needs).is_file() else None


@dataclass
class _Ledger:
    """Seconds by stage: measured for the runs finished, estimated for those still to do."""
    estimate: bool
    measured_per_step: dict[str, list[float]] = field(default_factory=dict)  # run key -> finished runs' s/step
    timed: dict[str, float] = field(default_factory=dict)  # run key -> synthetic s/step
    done_s: dict[str, float] = field(default_factory=dict)
    todo_s: dict[str, float] = field(default_factory=dict)
    todo_runs: int = 0
    done_runs: int = 0
    synthetic: bool = False  # some estimate rests on a synthetic timing
    measured: bool = False  # some estimate rests on a finished run's pace

    def learn(self, cfg: Config, done: dict | None) -> None:
        if done and done.get("wall_s") and done.get("steps"):
            self.measured_per_step.setdefault(_run_key(cfg), []).append(done["wall_s"] / done["steps"])

    def add(self, stage: str, cfg: Config, done: dict | None) -> str:
        """Count one run; the words its line says about its time."""
        if done is not None:
            self.done_runs += 1
            wall = float(done.get("wall_s") or 0.0)
            self.done_s[stage] = self.done_s.get(stage, 0.0) + wall
            return f"finished ({_fmt_minutes(wall)})" if wall else "finished"
        self.todo_runs += 1
        self.todo_s.setdefault(stage, 0.0)
        if not self.estimate:
            return ""
        key, steps = _run_key(cfg), cfg.train.max_steps or 0
        if key in self.measured_per_step:
            per = self.measured_per_step[key]
            s, how, self.measured = steps * sum(per) / len(per), "as measured", True
        else:
            if key not in self.timed:
                self.timed[key] = measure_step_seconds(cfg)
            s, how, self.synthetic = steps * self.timed[key], "timed", True
        note = ""
        if cfg.train.max_time_min and s > cfg.train.max_time_min * 60:
            s, note = cfg.train.max_time_min * 60, f", stopped by train.max_time_min; all steps ~{_fmt_minutes(s)}"
        self.todo_s[stage] += s
        return f"~{_fmt_minutes(s)} ({how}{note})"


def dry_run_table(spec: Spec, run: StudyRun, estimate: bool = True) -> str:
    """The cells and an estimate of their cost: steps x crops per step by run, what is finished already in the
    study folder, and (``estimate``) the wall time of the training still to do on this machine."""
    from medmim.study.diagnostics import probe_dir

    cells = expand_cells(spec)
    run.cache_path = run.cache_location(run.dataset_path())  # run.config needs it; nothing is written
    fine = [run.config("finetune", c) for c in cells]
    pre = {run.pretrain_dir(c): run.config("pretrain", c) for c in cells if c.pretrain is not None}
    probe = spec.diagnostics.probe
    probe_cfg = probe_runs = None
    if probe is not None:
        probe_cfg = load_config(spec.finetune.config, spec.finetune.overrides + probe.overrides + ["model.head=probe"]
                                + run.quick + run.extra)
        probe_runs = [(e, s, probe_dir(run, e, s)) for e in probe.encoders for s in probe.seeds]
    led = _Ledger(estimate)
    for c, f in zip(cells, fine):
        led.learn(f, _finished(run.cell_dir(c)))
    for d, p in pre.items():
        led.learn(p, _finished(d))
    for _, _, d in probe_runs or []:
        led.learn(probe_cfg, _finished(d, "evaluation.json"))

    lines = [f"study {spec.name}: {len(cells)} fine-tuning cell(s)", ""]
    pre_seen: set[Path] = set()
    total = {"pretrain": 0, "finetune": 0}
    for c, f in zip(cells, fine):
        total["finetune"] += f.train.max_steps or 0
        est = led.add("finetune", f, _finished(run.cell_dir(c)))
        words = "scratch"
        if c.pretrain is not None:
            d = run.pretrain_dir(c)
            p = pre[d]
            words = f"{p.pretrain.method} ({p.train.max_steps} steps x {p.data.batch_size} crops)"
            if d not in pre_seen:
                pre_seen.add(d)
                total["pretrain"] += p.train.max_steps or 0
                if pe := led.add("pretrain", p, _finished(d)):
                    words += f" {pe}"
            else:
                words += " (shared)"
        lines.append(f"- {c.group}, seed {c.seed}: pretrain {words}; fine-tune {f.train.max_steps} steps x "
                     f"{f.data.batch_size} crops ({(f.train.max_steps or 0) * f.data.batch_size} crops), "
                     f"roi {list(f.data.roi_size)}" + (f": {est}" if est else ""))
    probes = ""
    if probe is not None:
        finished = 0
        for _, _, d in probe_runs:
            done = _finished(d, "evaluation.json")
            finished += done is not None
            led.add("probe", probe_cfg, done)
        total["probe"] = len(probe_runs) * (probe_cfg.train.max_steps or 0)
        probes = f"; {len(probe_runs)} probe run(s) of {probe_cfg.train.max_steps} steps x {probe_cfg.data.batch_size} crops"
        todo = led.todo_s.get("probe", 0.0)
        lines.append(f"- probe (linear head on the frozen ViT): encoders {', '.join(probe.encoders)}; seeds "
                     f"{', '.join(map(str, probe.seeds))}; {finished} of {len(probe_runs)} finished"
                     + (f", ~{_fmt_minutes(todo)} to do" if estimate and finished < len(probe_runs) else ""))
    lines += ["", f"{len(pre_seen)} pretraining run(s), {total['pretrain']} steps in all; "
                  f"{len(cells)} fine-tuning run(s), {total['finetune']} steps in all{probes}"]
    if led.done_runs:
        lines.append(f"finished already in {run.out}: {led.done_runs} run(s), "
                     f"{_fmt_minutes(sum(led.done_s.values()))} of training as they measured; "
                     f"{led.todo_runs} run(s) still to do")
    if estimate:
        if not led.todo_runs:
            lines.append("nothing left to train")
        else:
            names = {"pretrain": "pretraining", "finetune": "fine-tuning", "probe": "probes"}
            by_stage = ", ".join(f"{w} {_fmt_minutes(led.todo_s[k])}" for k, w in names.items() if k in led.todo_s)
            how = []
            if led.measured:
                how.append("as measured: at the seconds per step of the finished runs of the same kind, data "
                           "loading and validation included")
            if led.synthetic:
                how.append("timed: from 2 steps on synthetic crops; data preparation, data loading, validation, "
                           "evaluation and other load on the machine not included")
            lines.append(f"estimated training time on this machine: ~{_fmt_minutes(sum(led.todo_s.values()))} "
                         f"({by_stage}; {'; '.join(how)})")
    return "\n".join(lines)
