"""What a study would cost, before it runs (``medmim study SPEC --dry-run``): its cells, their steps and crops,
and the wall time of their training steps on this machine, from timing one step of each distinct run."""

from __future__ import annotations

import json

from medmim.config import Config, load_config
from medmim.study.cells import expand_cells
from medmim.study.runner import StudyRun
from medmim.study.spec import Spec
from medmim.train.step import measure_step_seconds


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
        f = load_config(spec.finetune.config, spec.finetune.overrides + c.finetune + run.quick + run.extra)
        fs = (f.train.max_steps or 0) * f.data.batch_size
        total["finetune"] += f.train.max_steps or 0
        est = ""
        if estimate:
            sec, note = run_seconds(f)
            seconds["finetune"] += sec
            est = f", ~{_fmt_minutes(sec)}{note}"
        pre = "scratch"
        if c.pretrain is not None:
            p = load_config(spec.pretrain.config, spec.pretrain.overrides + c.pretrain + run.quick + run.extra)
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
    probe, probes = spec.diagnostics.probe, ""
    if probe is not None:
        cfg = load_config(spec.finetune.config, spec.finetune.overrides + probe.overrides + ["model.head=probe"]
                          + run.quick + run.extra)
        n = len(probe.encoders) * len(probe.seeds)
        total["probe"] = n * (cfg.train.max_steps or 0)
        if estimate:
            seconds["probe"] = n * run_seconds(cfg)[0]
        probes = f"; {n} probe run(s) of {cfg.train.max_steps} steps x {cfg.data.batch_size} crops"
        lines.append(f"- probe (linear head on the frozen ViT): encoders {', '.join(probe.encoders)}; seeds "
                     f"{', '.join(map(str, probe.seeds))}" + (f", ~{_fmt_minutes(seconds['probe'])} in all" if estimate else ""))
    lines += ["", f"{len(pre_seen)} pretraining run(s), {total['pretrain']} steps in all; "
                  f"{len(cells)} fine-tuning run(s), {total['finetune']} steps in all{probes}"]
    if estimate:
        lines += [f"estimated training time on this machine: ~{_fmt_minutes(sum(seconds.values()))} "
                  f"(pretraining {_fmt_minutes(seconds['pretrain'])}, fine-tuning {_fmt_minutes(seconds['finetune'])}"
                  + (f", probes {_fmt_minutes(seconds['probe'])}" if "probe" in seconds else "") + "; "
                  "from timing 2 steps of each distinct run on synthetic crops; data preparation, validation, "
                  "evaluation and other load on the machine not included)"]
    return "\n".join(lines)
