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
          - {label: simmim, pretrain: [pretrain.method=simmim, pretrain.loss=l1]}
    baseline: {method: scratch}        # speed-ups are measured against this value of an axis
    contrastive: {method: simclr}      # and, if given, against this one

Every cell (one value per axis, one seed) fine-tunes in its own folder; identical pretraining runs
are shared between cells. A finished run leaves ``done.json`` and is skipped when the study runs
again; an interrupted one resumes from its last checkpoint.

The stages, one module each: ``spec`` (the typed spec), ``cells`` (expansion into cells), ``curves``
(speed-up, convergence, mean and spread), ``runner`` (data, pretraining, fine-tuning, evaluation),
``results`` (typed results), ``report`` (results.json, cells.csv, summary.md, curves.png) and
``estimate`` (the --dry-run table and its time estimate).
"""

from medmim.study.cells import Cell, expand_cells, group_name
from medmim.study.curves import (CONVERGED_REL_CHANGE, SPEEDUP_LEVEL, Convergence, Speedup, convergence, mean_sd,
                                 speedup)
from medmim.study.estimate import dry_run_table, measure_step_seconds
from medmim.study.report import plot_curves, summary_markdown, write_report, write_tables
from medmim.study.results import CellResult, CellRun, GroupRow, GroupSpeedup, StudyResult, aggregate, score_cells
from medmim.study.runner import StudyRun, read_curve
from medmim.study.spec import AxisValue, Spec, load_spec, study_names

__all__ = ["CONVERGED_REL_CHANGE", "SPEEDUP_LEVEL", "AxisValue", "Cell", "CellResult", "CellRun", "Convergence",
           "GroupRow", "GroupSpeedup", "Spec", "Speedup", "StudyResult", "StudyRun", "aggregate", "convergence",
           "dry_run_table", "expand_cells", "group_name", "load_spec", "mean_sd", "measure_step_seconds",
           "plot_curves", "read_curve", "score_cells", "speedup", "study_names", "summary_markdown", "write_report",
           "write_tables"]
