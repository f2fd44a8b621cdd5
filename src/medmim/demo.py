"""`medmim demo`: the paper's main comparison end to end on built-in phantom CT, and a report a person can read.

Phantoms -> prepare -> pretrain (SimCLR, MAE, SimMIM) -> fine-tune UNETR from each and from scratch
on a few labeled volumes -> evaluate on held-out volumes in their original geometry -> DIR/report.md.
It runs the shipped study spec ``demo`` (``demo-quick`` with ``--quick``); running it again resumes:
finished stages are skipped, an interrupted run continues from its last checkpoint.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from medmim.fileio import atomic_write_text, read_json
from medmim.study import (CONVERGED_REL_CHANGE, SPEEDUP_LEVEL, Speedup, StudyResult, StudyRun, expand_cells,
                          load_spec, summary_markdown)


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


def _organ_table(cells) -> list[str]:
    """Per-organ held-out Dice and HD95 of each fine-tuned run, side by side."""
    runs = [(r.run.group.removeprefix("method="), (r.run.evaluation or {}).get("per_class") or {}) for r in cells]
    organs = sorted({c for _, pc in runs for c in pc}, key=int)
    if not organs:
        return []
    names = {c: next(pc[c]["name"] for _, pc in runs if c in pc) for c in organs}

    def cell(pc, c, key, digits):
        v = (pc.get(c) or {}).get(key)
        return "—" if v is None else f"{v:.{digits}f}"

    head = " | ".join(f"{m} Dice" for m, _ in runs) + " | " + " | ".join(f"{m} HD95 (mm)" for m, _ in runs)
    lines = ["Per organ, on the held-out phantoms (mean over cases; HD95: 95th-percentile surface distance):", "",
             f"| organ | {head} |", "|---|" + "---:|" * (2 * len(runs))]
    for c in organs:
        lines.append(f"| {names[c]} | " + " | ".join(cell(pc, c, "dice", 3) for _, pc in runs) + " | "
                     + " | ".join(cell(pc, c, "hd95", 1) for _, pc in runs) + " |")
    return lines + [""]


def _heldout_figure(run: StudyRun, cells, val_ids: list[str], path: Path) -> Path | None:
    """The first held-out case: CT, ground truth and each run's prediction on the same slices."""
    from medmim.data.datasets import load_dataset
    from medmim.data.datasets import read_case_label
    from medmim.data.io import read_image
    from medmim.eval.evaluate import comparison_figure

    if not val_ids:
        return None
    ds = load_dataset(run.dataset_path())
    case = ds.case(val_ids[0])
    preds = {}
    for r in cells:
        f = Path(r.run.run_dir) / "evaluation" / "predictions" / f"{case.case_id}.nii.gz"
        if f.is_file():
            preds[r.run.group.removeprefix("method=")] = read_image(f).array.astype(np.int64)
    if not preds:
        return None
    image = read_image(case.images[0]).array
    gt = np.rint(read_case_label(case).array).astype(np.int64)
    cfg = run.config("finetune", next(c for c in expand_cells(run.spec)))
    return comparison_figure(path, image[..., 0] if image.ndim == 4 else image, gt, preds, dict(ds.labels), cfg,
                             legend=True)


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
    # results: the picture, the table, per organ
    val_ids = res.val_ids()
    lines += ["## Held-out segmentation (original geometry)", ""]
    try:
        fig = _heldout_figure(run, cells, val_ids, out / "heldout.png")
        if fig is not None:
            lines += [f"A held-out phantom ({val_ids[0]}), slices through its organs: the CT, the ground truth, and "
                      "each run's prediction.", "", f"![held-out case]({fig.name})", ""]
    except Exception as e:  # noqa: BLE001 - a picture must not sink the report
        lines += [f"(held-out figure not drawn: {type(e).__name__}: {e})", ""]
    lines += [summary_markdown(spec, res.groups, organs=False)] + _organ_table(cells)
    # speed-ups
    lines += ["## Convergence speed-up", "",
              f"Defined once: with B's best validation mean Dice D, speed-up = (first step B reaches {SPEEDUP_LEVEL:.2f}·D) / "
              f"(first step P reaches {SPEEDUP_LEVEL:.2f}·D). Curves: `curves.png`.", "",
              "| pretrained run | vs scratch | vs SimCLR |", "|---|---|---|"]
    for m in ("simclr", "mae", "simmim"):
        r = by_method.get(m)
        if r:
            lines.append(f"| {m} | {_speedup_text(r.speedup_vs.get('baseline'))} | "
                         f"{'—' if m == 'simclr' or 'contrastive' not in r.speedup_vs else _speedup_text(r.speedup_vs.get('contrastive'))} |")
    unfinished = [r.run.group for r in cells if not r.convergence.converged]
    if unfinished:
        lines += ["", f"These speed-ups involve runs that had not converged ({', '.join(unfinished)}; see below): "
                      "they describe this demo's runs, not the method."]
    lines += ["", "![validation Dice against fine-tuning step](curves.png)", ""]
    # honesty about convergence and about one seed
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
    if len(spec.seeds) == 1:
        lines += [f"**One seed.** This demo fine-tunes each method once (seed {spec.seeds[0]}, which draws the labeled "
                  "phantoms and the decoder's initialisation). One run per method shows what each run reached; it cannot "
                  "tell a difference that pretraining makes from one that the seed makes. "
                  "The comparison with seeds and all four methods (scratch, SimCLR, MAE, SimMIM) is the study "
                  "`medmim study phantom-science-v2`; its last measured result is in medmim's repository under "
                  "`benchmarks/results/phantom-science-v2/` and in the README's \"What the phantom studies showed\".",
                  ""]
    # pretraining: did it learn the pretext task?
    lines += ["## Did the pretraining learn? (reconstructions of held-out crops)", ""]
    if res.diagnostics is not None and res.diagnostics.pretext:
        lines += ["Masked-voxel error on crops of the held-out phantoms against two baselines that learn nothing "
                  "(`medmim evaluate-recon`; below 1× the baseline is better than it):", "",
                  "| pretraining | step | masked-voxel MSE | × trilinear of the visible patches | × mean of the visible voxels |",
                  "|---|---:|---:|---:|---:|"]
        for p in res.diagnostics.pretext:
            lines.append(f"| {p.pretraining} | {p.step} | {p.model_mse:.4g} | {p.model_mse / p.trilinear_mse:.2f} | "
                         f"{p.model_mse / p.visible_mean_mse:.2f} |")
        lines.append("")
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
