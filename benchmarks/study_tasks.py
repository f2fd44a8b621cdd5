"""Run some of a study's runs, in a chosen order, in the study's own folders: for a study longer than the time a
machine is held (a session, a batch job), split into pieces that each finish in time.

    python benchmarks/study_tasks.py SPEC OUT TASK [TASK ...]

TASK is ``pretrain:METHOD`` (the shared pretraining of the cells whose method axis is METHOD, then the pretext
table of every finished MAE / SimMIM pretraining), ``probe:ENCODER:SEED`` (``probe:mae@2500:0``) or
``cell:SLUG`` (``cell:labels-4_method-mae_seed0``: its pretraining if not finished, fine-tuning, held-out
evaluation and ViT reliance). Every run is exactly the one ``medmim study SPEC --out OUT`` would run, with the
same config and folder, so that command then finds it finished and only writes the report.
``--list`` prints the study's tasks in its own order.
"""

from __future__ import annotations

import sys
from pathlib import Path

from medmim.errors import MedmimError


def log(s: str) -> None:
    print(s, flush=True)


def main(argv: list[str]) -> int:
    from medmim.study import StudyRun, load_spec
    from medmim.study.cells import expand_cells
    from medmim.study.diagnostics import cell_reliance, pretext_rows, probe_run

    if len(argv) < 3:
        print(__doc__)
        return 2
    spec, out, tasks = load_spec(argv[0]), Path(argv[1]), argv[2:]
    cells = expand_cells(spec)
    run = StudyRun(spec, out, [], log=log)
    methods: dict[Path, str] = {}  # one name per shared pretraining (mae-recipe pretrains as mae does)
    for c in cells:
        if c.pretrain is not None:
            methods.setdefault(run.pretrain_dir(c), c.values.get("method"))
    probe = spec.diagnostics.probe
    known = ([f"pretrain:{m}" for m in dict.fromkeys(methods.values())] + [f"cell:{c.slug}" for c in cells]
             + [f"probe:{e}:{s}" for e in (probe.encoders if probe else []) for s in (probe.seeds if probe else [])])
    if tasks == ["--list"]:
        print("\n".join(known))
        return 0
    for task in tasks:
        if task not in known:
            raise MedmimError(f"{task}: not a task of study {spec.name} (--list names them)")
    run.out.mkdir(parents=True, exist_ok=True)
    run.prepare(run.ensure_data())
    for task in tasks:
        kind, _, arg = task.partition(":")
        log(f"== task {task}")
        if kind == "pretrain":
            cell = next(c for c in cells if c.values.get("method") == arg and c.pretrain is not None)
            run.run_training(run.config("pretrain", cell), run.pretrain_dir(cell), "pretrain")
            for r in pretext_rows(run, cells):
                log(f"[pretext] {r.pretraining} step {r.step}: model {r.model_mse:.5f}, trilinear "
                    f"{r.trilinear_mse:.5f}, visible mean {r.visible_mean_mse:.5f}")
        elif kind == "probe":
            enc, _, seed = arg.rpartition(":")
            p = probe_run(run, cells, enc, int(seed))
            log(f"[probe] {enc} seed {seed}: held-out mean Dice {p.mean_dice}")
        elif kind == "cell":
            cell = next(c for c in cells if c.slug == arg)
            cr = run.run_cell(cell)
            rel = cell_reliance(run, cr) if spec.diagnostics.reliance else None
            log(f"[cell] {cell.slug}: held-out mean Dice {cr.evaluation and cr.evaluation['mean_dice']}"
                + (f", ViT features averaged {rel['mean_dice_vit_averaged']}" if rel else ""))
    log("tasks done")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except MedmimError as e:
        print(f"study_tasks: {e}", file=sys.stderr)
        sys.exit(2)
