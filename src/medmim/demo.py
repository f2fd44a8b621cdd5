"""`medmim demo`: the paper's main comparison end to end on built-in phantom CT, and a report a person can read.

Phantoms -> prepare -> pretrain (SimCLR, MAE, SimMIM) -> fine-tune UNETR from each and from scratch
on a few labeled volumes -> evaluate on held-out volumes in their original geometry -> DIR/report.md.
It runs the shipped study spec ``demo`` (``demo-quick`` with ``--quick``); running it again resumes:
finished stages are skipped, an interrupted run continues from its last checkpoint.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from medmim.fileio import atomic_write_text, read_json
from medmim.study import (CONVERGED_REL_CHANGE, SPEEDUP_LEVEL, Speedup, StudyResult, StudyRun, load_spec,
                          summary_markdown)


def _recon_preview(pre_dir: Path, cache: Path, val_ids: list[str], out: Path) -> Path | None:
    """Reconstruct a held-out crop with a pretrained MAE/SimMIM and save the 4-panel preview."""
    from medmim.data.sampling import CropSampler, open_cache
    from medmim.models.rebuild import config_of, model_from
    from medmim.models.transfer import read_checkpoint
    from medmim.preview import save_mim_preview

    ckpt = read_checkpoint(pre_dir / "model.safetensors")
    cfg = config_of(ckpt)
    model = model_from(ckpt, cfg)
    c = open_cache(cache)
    cases = [c.case(i) for i in val_ids] or [c.case(c.case_ids()[0])]
    item = next(iter(CropSampler(cases, cfg.data.roi_size, 1, pos_fraction=1.0, seed=7, epochs=1, use_labels=True)))
    x = item["image"][None]
    with torch.no_grad():
        o = model(x, generator=torch.Generator().manual_seed(7))
    return save_mim_preview(out, x[0, 0], o.mask[0, 0], o.pred[0, 0])


def _fmt_s(s: float | None) -> str:
    if s is None:
        return "—"
    return f"{s / 60:.1f} min" if s >= 90 else f"{s:.0f} s"


def _speedup_text(s: Speedup | None) -> str:
    if s is None:
        return "—"
    if s.speedup is None:
        return f"never reached {s.level:.3f}" if s.level is not None else s.note
    return f"{s.speedup:.2f}× (B at step {s.baseline_step}, P at step {s.step}, level {s.level:.3f})"


def write_report(run: StudyRun, res: StudyResult, wall: float) -> Path:
    out = run.out
    spec = run.spec
    cells = res.cells
    by_method = {r.run.values["method"]: r for r in cells}
    lines = [f"# medmim demo report ({spec.name})", "", spec.description.strip(), ""]
    # what the data and runs were
    ph = spec.data.phantom
    data = (f"{ph.labeled} labeled + {ph.unlabeled} unlabeled phantom abdominal CTs (seed {ph.seed})" if ph
            else f"{spec.data.path}")
    lines += ["## Setup", "",
              f"- data: {data}, BTCV's 13 organs; validation = fold 0 of splits_final.json, held out of "
              f"pretraining and fine-tuning",
              f"- pretraining and fine-tuning configs: `{spec.pretrain.config}` / `{spec.finetune.config}` with "
              f"`{' '.join(spec.pretrain.overrides)}` / `{' '.join(spec.finetune.overrides)}`",
              f"- total wall time: {_fmt_s(wall)} this invocation", ""]
    # results table
    lines += ["## Held-out segmentation (original geometry)", "", summary_markdown(spec, res.groups)]
    # speed-ups
    lines += ["## Convergence speed-up", "",
              f"Defined once: with B's best validation mean Dice D, speed-up = (first step B reaches {SPEEDUP_LEVEL:.2f}·D) / "
              f"(first step P reaches {SPEEDUP_LEVEL:.2f}·D). Curves: `curves.png`.", "",
              "| pretrained run | vs scratch | vs SimCLR |", "|---|---|---|"]
    for m in ("simclr", "mae", "simmim"):
        r = by_method.get(m)
        if r:
            lines.append(f"| {m} | {_speedup_text(r.speedup_vs.get('baseline'))} | "
                         f"{'—' if m == 'simclr' else _speedup_text(r.speedup_vs.get('contrastive'))} |")
    unfinished = [r.run.group for r in cells if not r.convergence.converged]
    if unfinished:
        lines += ["", f"These speed-ups involve runs that had not converged ({', '.join(unfinished)}; see below): "
                      "they describe this demo's runs, not the method."]
    lines += ["", "![validation Dice against fine-tuning step](curves.png)", ""]
    # honesty about convergence
    lines += ["## Did the runs converge?", ""]
    for r in cells:
        cv = r.convergence
        rel = cv.rel_change
        state = ("converged" if cv.converged else "NOT converged") if rel is not None else "unknown"
        info = read_json(Path(r.run.run_dir) / "done.json")
        bound = " — stopped by its wall-time bound before its last step" if info.get("stopped_by_time") else ""
        lines.append(f"- {r.run.group}: {state} (validation Dice changed {rel:+.1%} over the last quarter; "
                     f"{info.get('steps')} steps){bound}" if rel is not None else
                     f"- {r.run.group}: {state} ({cv.note}){bound}")
    lines += ["", f"A run counts as converged when its validation Dice moved less than {CONVERGED_REL_CHANGE:.0%} over "
                  "its last quarter. Differences between runs that have not converged, or that lie within the spread "
                  "between seeds, are not results.", ""]
    # reconstructions
    lines += ["## Reconstructions of held-out crops", ""]
    val_ids = res.val_ids()
    for m in ("mae", "simmim"):
        r = by_method.get(m)
        if r and r.run.pretrained:
            png = out / f"recon_{m}.png"
            try:
                _recon_preview(Path(r.run.pretrained).parent, res.cache, val_ids, png)
                lines += [f"{m.upper() if m == 'mae' else 'SimMIM'} (input / masked / reconstruction / prediction):", "",
                          f"![{m} reconstruction]({png.name})", ""]
            except Exception as e:  # a preview must not sink the report
                lines.append(f"- {m}: preview failed ({type(e).__name__}: {e})")
    # stage times
    lines += ["## Wall time of each stage", "", "| stage | wall time |", "|---|---:|"]
    times = dict(res.stage_seconds)
    for folder in sorted((out / "pretrain").glob("*")) + sorted((out / "cells").glob("*")):
        d = folder / "done.json"
        if d.is_file():
            key = f"{'pretrain' if folder.parent.name == 'pretrain' else 'finetune'} {folder.name}"
            times.setdefault(key, read_json(d).get("wall_s"))
    for k, v in times.items():
        lines.append(f"| {k} | {_fmt_s(v)} |")
    lines.append("")
    lines.append("Stages finished by an earlier invocation keep the time they took then.")
    path = out / "report.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path


def run_demo(out: str | Path = "demo-out", quick: bool = False, extra: list[str] | None = None, log=print) -> Path:
    """Run (or resume) the demo; return the path of its report."""
    spec = load_spec("demo-quick" if quick else "demo")
    run = StudyRun(spec, Path(out), list(extra or []), log=log)
    t0 = time.perf_counter()
    res = run.run()
    report = write_report(run, res, time.perf_counter() - t0)
    log(f"report: {report}")
    return report
