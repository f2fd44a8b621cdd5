"""The files a study writes from its results: results.json (everything), cells.csv (one row per finished cell),
summary.md (one row per group, per-organ Dice, and what a reader may conclude) and curves.png."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from medmim.fileio import atomic_write, atomic_write_text
from medmim.study.cells import group_name
from medmim.study.curves import CONVERGED_REL_CHANGE, SPEEDUP_LEVEL, MeanSd
from medmim.study.diagnostics import Diagnostics, pretext_markdown, probe_markdown, reliance_markdown
from medmim.study.results import CellResult, CellRun, GroupRow, StudyResult, matches, partner_values
from medmim.study.spec import Spec

CELL_COLUMNS = ["cell", "group", "seed", "eval_mean_dice", "eval_mean_hd95", "best_val_dice", "last_val_dice",
                "converged", "rel_change_last_quarter", "speedup_vs_baseline", "speedup_vs_contrastive", "wall_s"]


def write_report(out: Path, spec: Spec, result: StudyResult) -> None:
    """results.json, cells.csv, summary.md and curves.png in ``out``."""
    atomic_write_text(out / "results.json", json.dumps(result.to_json(), indent=1, default=str))
    write_tables(out, spec, result.cells, result.groups, result.diagnostics)
    plot_curves(out / "curves.png", result.cells, spec)


def _fmt(ms: MeanSd, digits: int = 3, seeds: int = 1) -> str:
    m, s = ms
    if m is None:
        return "—"
    return f"{m:.{digits}f}" + (f" ± {s:.{digits}f}" if seeds > 1 else "")


def cells_csv(cells: list[CellResult]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)  # rows end in \r\n, as csv has them
    w.writerow(CELL_COLUMNS)
    for r in cells:
        sp = {which: s.speedup for which, s in r.speedup_vs.items()}
        w.writerow([r.run.cell, r.run.group, r.run.seed, r.run.score("mean_dice"), r.run.score("mean_hd95"),
                    r.best_val_dice, r.last_val_dice, r.convergence.converged, r.convergence.rel_change,
                    sp.get("baseline"), sp.get("contrastive"), r.run.wall_s])
    return buf.getvalue()


def write_tables(out: Path, spec: Spec, cells: list[CellResult], rows: list[GroupRow],
                 diagnostics: Diagnostics | None = None) -> None:
    atomic_write_text(out / "cells.csv", cells_csv(cells))
    text = summary_markdown(spec, rows)
    if diagnostics is not None:
        text += diagnostics_markdown(spec, [c.run for c in cells], diagnostics)
    atomic_write_text(out / "summary.md", text)


def diagnostics_markdown(spec: Spec, runs: list[CellRun], diag: Diagnostics) -> str:
    """The tables of the spec's diagnostics (ViT reliance, probe, pretext), after summary.md's own."""
    lines = reliance_markdown(runs, diag, spec.baseline) + probe_markdown(diag) + pretext_markdown(diag)
    return "\n".join(["", "## Diagnostics", *lines]) + "\n" if lines else ""


def _speedup_cell(r: GroupRow, which: str) -> str:
    s = r.speedup_vs.get(which)
    if s is None:
        return "—"
    txt = _fmt(s.speedup, 2, r.seeds)
    notes = ([f"{s.never_reached}/{r.seeds} never reached"] if s.never_reached else []) + \
        ([f"{s.no_partner}/{r.seeds} without a partner run yet"] if s.no_partner else [])
    return txt + (f" ({'; '.join(notes)})" if notes else "")


def _are_regions(names) -> bool:
    """Whether per-class names are BraTS's regions (TC, WT, ET) rather than organs."""
    from medmim.data.regions import REGION_NAMES

    names = list(names)
    return bool(names) and set(names) <= set(REGION_NAMES.values())


def summary_markdown(spec: Spec, rows: list[GroupRow], organs: bool = True) -> str:
    """The table of groups, their per-organ Dice (``organs``), and notes on what they show (summary.md)."""
    refs = [(which, group_name(ref)) for which, ref in spec.references.items()]  # a spec may name neither
    head = ["group", "seeds", "held-out mean Dice", "mean HD95 (mm)", "best val Dice", "last val Dice", "converged"]
    head += [f"speed-up vs {name}" for _, name in refs]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for r in rows:
        n = r.seeds  # a group may have fewer finished seeds than the spec lists (--report-only)
        lines.append(f"| {r.group} | {n} | {_fmt(r.eval_dice, 3, n)} | {_fmt(r.eval_hd95, 1, n)} | "
                     f"{_fmt(r.best_val_dice, 3, n)} | {_fmt(r.last_val_dice, 3, n)} | {r.converged}/{r.seeds} |"
                     + "".join(f" {_speedup_cell(r, which)} |" for which, _ in refs))
    organ_ids = []
    for r in rows:
        for c in r.organs:
            if c not in organ_ids:
                organ_ids.append(c)
    if organ_ids and organs:
        names = {c: rows[0].organs.get(c, (c,))[0] for c in organ_ids}
        what = "region" if _are_regions(names.values()) else "organ"
        lines += ["", f"Per-{what} held-out Dice (mean over seeds):", "",
                  "| group | " + " | ".join(names[c] for c in organ_ids) + " |",
                  "|---|" + "---:|" * len(organ_ids)]
        for r in rows:
            lines.append(f"| {r.group} | " + " | ".join(_fmt(r.organs[c][1], 2) if c in r.organs else "—"
                                                       for c in organ_ids) + " |")
    lines += _reading_notes(spec, rows)
    lines += ["", "Held-out mean Dice and HD95 are those of each run's best.pt: the checkpoint of its best validation "
                  "Dice. The validation cases are the held-out ones, so that pick favours the run it was made for; "
                  "last val Dice is each run's Dice at its last validation, a score no one picked.",
              "", f"Converged: |relative change of validation Dice over the last quarter of the run| < "
                  f"{CONVERGED_REL_CHANGE:.0%}; under the cosine schedule the last quarter runs at 15% of the peak "
                  f"learning rate or less, so a flat last quarter can also be the schedule running out (a run twice "
                  f"as long tells which). Speed-up: (first step the baseline reaches {SPEEDUP_LEVEL:.0%} of its best "
                  f"validation Dice) / (first step the pretrained run reaches it)."]
    return "\n".join(lines) + "\n"


def _against_baseline(spec: Spec, r: GroupRow, rows: list[GroupRow]) -> str | None:
    """A group's held-out Dice minus its baseline group's, next to the spread between seeds; None: nothing to say."""
    want = partner_values(r.values, spec.baseline)
    b = next((q for q in rows if q.values == want), None)
    (m, sd), (bm, bsd) = r.eval_dice, (b.eval_dice if b else (None, None))
    if m is None or bm is None:
        return None
    delta = m - bm
    if min(r.seeds, b.seeds) < 2:
        verdict = "one seed: spread unknown"
    else:
        spread = max(sd, bsd)
        verdict = (f"beyond the spread ({spread:.3f})" if abs(delta) > spread
                   else f"within the spread ({spread:.3f}): not a result")
    paired = _paired(r.paired_delta, r.paired_n)
    last = _paired(r.paired_last_delta, r.paired_last_n)
    last = f"; at the last validation,{last[1:]}" if last else ""
    return f"- {r.group}: {delta:+.3f} ({verdict}{paired}{last})"


def _paired(ms: MeanSd, n: int) -> str:
    (m, sd) = ms
    return ("" if m is None else f"; seed by seed: {m:+.3f} ± {sd:.3f} over {n}" if n > 1
            else f"; against the same seed: {m:+.3f}")


def _reading_notes(spec: Spec, rows: list[GroupRow]) -> list[str]:
    """What a reader may and may not conclude from the table: unfinished runs, and each group's held-out Dice
    against the baseline's next to the spread between seeds."""
    out: list[str] = []
    runs = sum(r.seeds for r in rows)
    unfinished = [f"{r.group} ({r.seeds - r.converged}/{r.seeds})" for r in rows if r.converged < r.seeds]
    if unfinished:
        out += ["", f"**Not converged: {sum(r.seeds - r.converged for r in rows)} of {runs} runs** "
                    f"({', '.join(unfinished)}). Dice values and speed-ups that involve them compare unfinished runs."]
    if not spec.baseline:
        return out
    diffs = [d for r in rows if not matches(r.values, spec.baseline)
             if (d := _against_baseline(spec, r, rows)) is not None]
    if diffs:
        out += ["", f"Held-out mean Dice minus {group_name(spec.baseline)}'s (spread: the larger standard deviation "
                    "over seeds of the two; seed by seed: the mean ± SD of the differences between runs of the same "
                    "seed, which share the labeled subset and the decoder's initialisation):", ""] + diffs
    return out


def plot_curves(path: Path, cells: list[CellResult], spec: Spec) -> Path:
    """Validation Dice against fine-tuning step, one colour per group (curves.png)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    colors: dict[str, str] = {}
    for r in cells:
        if not r.run.curve:
            continue
        c = colors.setdefault(r.run.group, f"C{len(colors) % 10}")
        steps, vals = zip(*r.run.curve)
        ax.plot(steps, vals, color=c, alpha=0.9 if len(spec.seeds) == 1 else 0.6,
                label=r.run.group if r.run.seed == spec.seeds[0] else None)
    ax.set_xlabel("fine-tuning step")
    names = [d.get("name") for r in cells for d in ((r.run.evaluation or {}).get("per_class") or {}).values()]
    ax.set_ylabel("validation mean Dice (TC, WT, ET)" if _are_regions(names) else "validation mean Dice (over classes)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    plt.close(fig)
    return path
