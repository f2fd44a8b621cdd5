"""A whole UNETR fine-tuning run through medmim's engine, as a study runs it: where the wall time goes.

    python benchmarks/bench_finetune_run.py                      # 100 steps, validation every 50, 3 held-out phantoms
    python benchmarks/bench_finetune_run.py --sweep              # also: step time for data.num_workers x threads

The run is phantom-science-v2's fine-tuning (48^3 crops, patch 8, ViT 192 x 6, UNETR feature size 4,
batch 4, fp32) on 12 phantoms prepared at 3 x 3 x 4.5 mm (9 for training, 3 held out), as a study's
fine-tuning cell sees them. From the run's own metrics.csv: the share of the wall time spent in validation
(sliding window over every voxel of the 3 held-out volumes, ``val_s``), the share spent waiting for data
(``data_wait_frac``), and the step time.

The sweep times ``--sweep-steps`` steps for each data.num_workers in 0, 1, 2 and each torch thread count
in 1, 2 (validation only at the end, not timed): on 2 cores, loader workers and compute threads share them.

Writes DIR/finetune-run.json and .md (DIR defaults to benchmarks/results/).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
V2 = ["data.spacing=[3.0,3.0,4.5]", "data.roi_size=48", "model.img_size=48", "model.patch_size=8",
      "model.hidden_size=192", "model.num_layers=6", "model.num_heads=6", "model.mlp_dim=768",
      "model.feature_size=4", "data.batch_size=4", "train.precision=fp32", "train.log_every=1",
      "train.preview_every=100000", "train.ckpt_every=100000", "data.prepare_workers=1"]


def make_data(root: Path) -> Path:
    """12 labeled phantoms (seed 0), prepared at 3 x 3 x 4.5 mm; the cache folder."""
    from medmim.data.phantom import write_phantom_dataset
    from medmim.data.prepare import PrepareSettings, prepare_dataset

    raw, cache = root / "raw", root / "cache"
    if not (cache / "manifest.json").is_file():
        write_phantom_dataset(raw, labeled=12, unlabeled=0, seed=0)
        prepare_dataset(raw, cache, PrepareSettings(spacing=(3.0, 3.0, 4.5)), workers=1, log=lambda s: None)
    return cache


def run(cache: Path, out: Path, steps: int, val_every: int, workers: int, threads: int) -> dict:
    """One fine-tuning run in a fresh process (its own thread count); numbers from its metrics.csv."""
    args = [sys.executable, "-m", "medmim", "finetune", "unetr-cpu", f"data.path={cache}", f"run.dir={out}",
            f"train.max_steps={steps}", f"train.val_every={val_every}", f"train.warmup_steps={min(20, steps // 4)}",
            f"data.num_workers={workers}", *V2]
    env = {**os.environ, "MEDMIM_NO_PROGRESS": "1", "OMP_NUM_THREADS": str(threads)}
    t0 = time.perf_counter()
    proc = subprocess.run(args, env=env, capture_output=True, encoding="utf-8", errors="replace")
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"fine-tuning run failed ({proc.returncode}): {proc.stderr.strip().splitlines()[-1:]}")
    with open(out / "metrics.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    train = [r for r in rows if r["loss"]]
    val = [r for r in rows if r["val_s"]]
    times = [float(r["time_s"]) for r in train]
    step_s = [b - a for a, b in zip(times, times[1:])]
    busy = [1.0 / float(r["crops_per_s"]) * 4 for r in train]  # seconds of each logged step (log_every=1)
    wait = [float(r["data_wait_frac"]) * b for r, b in zip(train, busy)]
    val_s = sum(float(r["val_s"]) for r in val)
    # time_s (since the loop started) of the last step includes every validation but the one after it
    loop_s = times[-1] + (float(val[-1]["val_s"]) if val and int(val[-1]["step"]) == steps else 0.0)
    return {"steps": steps, "val_every": val_every, "workers": workers, "threads": threads,
            "process_wall_s": wall, "loop_s": loop_s, "validations": len(val), "val_s": val_s,
            "val_share": val_s / loop_s, "wait_s": sum(wait), "wait_share": sum(wait) / loop_s,
            "median_step_s": statistics.median(step_s[len(step_s) // 5:]) if len(step_s) > 4 else float("nan"),
            "mean_val_s": val_s / max(len(val), 1)}


def render(r: dict) -> str:
    m = r["main"]
    lines = ["# A UNETR fine-tuning run: where the wall time goes", "",
             f"{r['machine']}. phantom-science-v2's fine-tuning (48³, patch 8, ViT 192 × 6, feature size 4, batch 4, "
             f"fp32); 9 training and 3 held-out phantoms at 3 × 3 × 4.5 mm.", "",
             f"**Run**: {m['steps']} steps, a validation every {m['val_every']} ({m['validations']} in all), "
             f"data.num_workers={m['workers']}, {m['threads']} thread(s).", "",
             "| loop wall (s) | median step (s) | validation total (s) | per validation (s) | validation share | "
             "data-wait share |", "|---:|---:|---:|---:|---:|---:|",
             f"| {m['loop_s']:.1f} | {m['median_step_s']:.3f} | {m['val_s']:.1f} | {m['mean_val_s']:.2f} | "
             f"**{m['val_share']:.1%}** | {m['wait_share']:.1%} |", ""]
    if r.get("sweep"):
        lines += ["**Sweep** (median step time over the last 80% of the steps; validation not counted):", "",
                  "| data.num_workers | threads | median step (s) | data-wait share |", "|---:|---:|---:|---:|"]
        for s in r["sweep"]:
            lines.append(f"| {s['workers']} | {s['threads']} | {s['median_step_s']:.3f} | {s['wait_share']:.1%} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--val-every", type=int, default=50)
    ap.add_argument("--workers", type=int, default=None, help="data.num_workers of the main run (default: unetr-cpu's)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--sweep-steps", type=int, default=25)
    ap.add_argument("--data", type=Path, default=None, help="where the phantoms are made (default: a temp folder)")
    ap.add_argument("--out", type=Path, default=HERE / "results")
    args = ap.parse_args()
    from medmim.config import load_config

    workers = args.workers if args.workers is not None else load_config("unetr-cpu").data.num_workers
    with tempfile.TemporaryDirectory() as tmp:
        cache = make_data(args.data or Path(tmp) / "data")
        main_run = run(cache, Path(tmp) / "main", args.steps, args.val_every, workers, args.threads)
        print(json.dumps(main_run))
        sweep = []
        if args.sweep:
            for w in (0, 1, 2):
                for th in (1, 2):
                    s = run(cache, Path(tmp) / f"w{w}t{th}", args.sweep_steps, 100000, w, th)
                    print(json.dumps(s))
                    sweep.append(s)
    import platform

    import torch

    r = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}",
         "main": main_run, "sweep": sweep}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "finetune-run.json").write_text(json.dumps(r, indent=1) + "\n", encoding="utf-8")
    (args.out / "finetune-run.md").write_text(render(r), encoding="utf-8")
    print(render(r))


if __name__ == "__main__":
    main()
