"""Data loading benchmark: medmim's cache + crop sampler against MONAI, side by side in one run.

Pipelines, same data, same crop size, same crops per volume, same number of DataLoader workers:

  medmim        prepared cache (once), crops read from memory-mapped arrays (`CropSampler`)
  monai-otf     MONAI's usual on-the-fly pipeline: LoadImaged, EnsureChannelFirstd, Orientationd,
                Spacingd, ScaleIntensityRanged, CropForegroundd, RandCropByPosNegLabeld per sample
  monai-cache   MONAI CacheDataset holding the deterministic transforms' output in RAM, with
                RandCropByPosNegLabeld applied per sample

Each pipeline runs in its own process; its resident memory is summed over the process and its
DataLoader workers (RSS, and PSS which splits shared pages fairly). Also measured: the peak
resident memory of `prepare` for a growing number of cases.

    python benchmarks/bench_data.py [--cases 8] [--roi 96] [--workers 2] [--crops 48] [--clinical]

Writes benchmarks/results/data.json and data.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


# --- memory of a process tree ----------------------------------------------------------------

def _children(pid: int) -> list[int]:
    out = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out += [int(c) for c in f.read().split()]
    except OSError:
        pass
    return out


def _tree(pid: int) -> list[int]:
    todo, seen = [pid], []
    while todo:
        p = todo.pop()
        seen.append(p)
        todo += _children(p)
    return seen


def _mem_kb(pid: int) -> tuple[int, int]:
    rss = pss = 0
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Rss:"):
                    rss = int(line.split()[1])
                elif line.startswith("Pss:"):
                    pss = int(line.split()[1])
    except OSError:
        pass
    return rss, pss


class TreeMemory:
    """Samples the summed RSS/PSS of this process and its children every few milliseconds."""

    def __init__(self, period: float = 0.05):
        self.period, self.peak_rss, self.peak_pss = period, 0, 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            rss = pss = 0
            for p in _tree(os.getpid()):
                r, s = _mem_kb(p)
                rss, pss = rss + r, pss + s
            self.peak_rss, self.peak_pss = max(self.peak_rss, rss), max(self.peak_pss, pss)
            time.sleep(self.period)

    def __enter__(self) -> "TreeMemory":
        self._t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._t.join()


# --- one pipeline, in its own process --------------------------------------------------------

def _monai_deterministic(spacing, window):
    from monai.transforms import (CropForegroundd, EnsureChannelFirstd, LoadImaged, Orientationd,
                                  ScaleIntensityRanged, Spacingd)

    return [
        LoadImaged(["image", "label"]),
        EnsureChannelFirstd(["image", "label"]),
        Orientationd(["image", "label"], axcodes="RAS"),
        Spacingd(["image", "label"], pixdim=spacing, mode=("bilinear", "nearest")),
        ScaleIntensityRanged("image", a_min=window[0], a_max=window[1], b_min=0.0, b_max=1.0, clip=True),
        CropForegroundd(["image", "label"], source_key="image", allow_smaller=True),
    ]


def _monai_random(roi, crops):
    from monai.transforms import RandCropByPosNegLabeld

    return [RandCropByPosNegLabeld(["image", "label"], label_key="label", spatial_size=roi, pos=1, neg=1,
                                   num_samples=crops, image_key="image", image_threshold=0)]


def run_pipeline(args: argparse.Namespace) -> dict:
    import torch
    from torch.utils.data import DataLoader

    torch.set_num_threads(1)
    roi = (args.roi,) * 3
    ds_desc = json.loads((Path(args.dataset) / "dataset.json").read_text())
    files = [{"image": str(Path(args.dataset) / e["image"]), "label": str(Path(args.dataset) / e["label"])}
             for e in ds_desc["training"]]
    spacing, window = (1.5, 1.5, 2.0), (-175.0, 250.0)
    with TreeMemory() as mem:
        t0 = time.perf_counter()
        if args.pipeline == "medmim":
            from medmim.data.sampling import CropSampler, open_cache

            cache = open_cache(args.cache)
            ds = CropSampler([cache.case(c) for c in cache.case_ids(labeled=True)], roi, args.per_volume,
                             pos_fraction=0.5, seed=0)
            # the training engine's loader: crops collated into batches inside the workers
            loader = DataLoader(ds, batch_size=args.batch, num_workers=args.workers,
                                persistent_workers=args.workers > 0)
        else:
            from monai.data import CacheDataset, Dataset
            from monai.transforms import Compose

            det, rnd = _monai_deterministic(spacing, window), _monai_random(roi, args.per_volume)
            if args.pipeline == "monai-otf":
                ds = Dataset(files * 1000, transform=Compose(det + rnd))
            else:
                ds = CacheDataset(files * 1, transform=Compose(det + rnd), cache_rate=1.0,
                                  num_workers=max(1, args.workers), progress=False)
                ds = torch.utils.data.ConcatDataset([ds] * 1000)
            # MONAI returns a list of num_samples crops per volume; list_data_collate stacks them, as in
            # MONAI's own tutorials: batches of the same number of crops as medmim's
            from monai.data import list_data_collate

            loader = DataLoader(ds, batch_size=max(1, args.batch // args.per_volume), num_workers=args.workers,
                                shuffle=args.pipeline != "monai-otf", persistent_workers=args.workers > 0,
                                collate_fn=list_data_collate)
        # the first crops come out of the DataLoader's prefetch queue: time the steady state after them
        warm = 2 * max(1, args.workers) * args.batch  # the DataLoader's prefetched batches
        times, n = [], 0  # times[i]: when the batch holding crop i arrived
        for batch in loader:
            k = int(batch["image"].shape[0])
            n += k
            times += [time.perf_counter()] * k
            if n >= warm + args.crops:
                break
        first = times[0] - t0
        span = times[-1] - times[warm - 1]
        steady = span / max(1, len(times) - warm)
    return {"pipeline": args.pipeline, "crops": n, "time_to_first_crop_s": first,
            "crops_per_s": 1.0 / steady if steady > 0 else float("inf"), "s_per_crop": steady,
            "peak_rss_mb": mem.peak_rss / 1024, "peak_pss_mb": mem.peak_pss / 1024}


def run_prepare(args: argparse.Namespace) -> dict:
    from medmim.data.prepare import PrepareSettings, prepare_dataset

    with TreeMemory(0.02) as mem:
        t0 = time.perf_counter()
        res = prepare_dataset(args.dataset, args.cache, PrepareSettings(), workers=1)
        dt = time.perf_counter() - t0
    return {"cases": len(res.done), "failed": len(res.failed), "seconds": dt,
            "peak_rss_mb": mem.peak_rss / 1024, "peak_pss_mb": mem.peak_pss / 1024}


def _child(mode: str, **kw) -> dict:
    cmd = [sys.executable, __file__, "--child", mode] + [f"--{k.replace('_', '-')}={v}" for k, v in kw.items()]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{mode} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


# --- the whole benchmark ---------------------------------------------------------------------

def _copy_cases(src: Path, dst: Path, n: int) -> Path:
    """A dataset of n cases made by repeating src's labeled cases under new names (cheap, same sizes)."""
    desc = json.loads((src / "dataset.json").read_text())
    train = desc["training"]
    (dst / "imagesTr").mkdir(parents=True, exist_ok=True)
    (dst / "labelsTr").mkdir(parents=True, exist_ok=True)
    entries = []
    for i in range(n):
        e = train[i % len(train)]
        for key, folder in (("image", "imagesTr"), ("label", "labelsTr")):
            target = dst / folder / f"case_{i:04d}.nii.gz"
            if not target.exists():
                os.link(src / e[key], target)
        entries.append({"image": f"./imagesTr/case_{i:04d}.nii.gz", "label": f"./labelsTr/case_{i:04d}.nii.gz"})
    (dst / "dataset.json").write_text(json.dumps({**desc, "training": entries, "test": [], "numTraining": n}))
    return dst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", type=int, default=8, help="phantom cases (default size)")
    ap.add_argument("--roi", type=int, default=96)
    ap.add_argument("--per-volume", type=int, default=4, help="crops per volume read")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8, help="crops per batch (a multiple of --per-volume)")
    ap.add_argument("--crops", type=int, default=96, help="crops timed per pipeline, after the prefetched ones")
    ap.add_argument("--prepare-cases", default="10,100", help="dataset sizes for prepare's peak memory")
    ap.add_argument("--clinical", action="store_true", help="also time a 512x512x120 CT")
    ap.add_argument("--out", type=Path, default=HERE / "results")
    ap.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--pipeline", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--dataset", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--cache", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child == "pipeline":
        print(json.dumps(run_pipeline(args)))
        return
    if args.child == "prepare":
        print(json.dumps(run_prepare(args)))
        return

    from medmim.data.phantom import write_phantom_dataset
    from medmim.data.prepare import PrepareSettings, prepare_dataset

    work = args.work or Path(tempfile.mkdtemp(prefix="medmim-bench-data-"))
    results: dict = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
                     "settings": {"roi": args.roi, "crops_per_volume": args.per_volume, "workers": args.workers,
                                  "crops_timed": args.crops, "batch": args.batch}, "datasets": {}}
    datasets = {"phantom": (work / "phantom", {})}
    if args.clinical:
        datasets["clinical-512x512x120"] = (work / "clinical", {"shape": (512, 512, 120), "spacing": (0.7, 0.7, 2.5)})
    for name, (path, kw) in datasets.items():
        n = args.cases if name == "phantom" else 2
        if not (path / "dataset.json").is_file():
            print(f"[{name}] writing {n} phantom cases", flush=True)
            write_phantom_dataset(path, labeled=n, unlabeled=0, seed=0, **kw)
        t0 = time.perf_counter()
        prepare_dataset(path, work / f"{name}-cache", PrepareSettings(), workers=args.workers)
        rows = {"prepare_s": time.perf_counter() - t0}
        for pipe in ("medmim", "monai-cache", "monai-otf"):
            crops = args.crops
            print(f"[{name}] {pipe} ...", flush=True)
            rows[pipe] = _child("pipeline", pipeline=pipe, dataset=path, cache=work / f"{name}-cache", roi=args.roi,
                                per_volume=args.per_volume, workers=args.workers, crops=crops, batch=args.batch)
            print(f"    {rows[pipe]}", flush=True)
        m, otf, cds = rows["medmim"], rows["monai-otf"], rows["monai-cache"]
        rows["ratios"] = {
            "throughput_vs_monai_otf": m["crops_per_s"] / otf["crops_per_s"],
            "throughput_vs_monai_cache": m["crops_per_s"] / cds["crops_per_s"],
            "pss_vs_monai_cache": m["peak_pss_mb"] / cds["peak_pss_mb"],
            "rss_vs_monai_cache": m["peak_rss_mb"] / cds["peak_rss_mb"],
            "first_crop_vs_monai_cache": m["time_to_first_crop_s"] / cds["time_to_first_crop_s"],
        }
        results["datasets"][name] = rows
    # prepare's peak memory against the number of cases
    prep = {}
    for n in [int(x) for x in args.prepare_cases.split(",") if x]:
        ds = _copy_cases(work / "phantom", work / f"prep-{n}", n)
        shutil.rmtree(work / f"prep-{n}-cache", ignore_errors=True)
        print(f"[prepare] {n} cases ...", flush=True)
        prep[str(n)] = _child("prepare", dataset=ds, cache=work / f"prep-{n}-cache")
        print(f"    {prep[str(n)]}", flush=True)
    if len(prep) >= 2:
        ks = sorted(prep, key=int)
        prep["peak_rss_ratio_largest_vs_smallest"] = prep[ks[-1]]["peak_rss_mb"] / prep[ks[0]]["peak_rss_mb"]
    results["prepare_memory"] = prep
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "data.json").write_text(json.dumps(results, indent=1))
    (args.out / "data.md").write_text(render(results))
    print(render(results))


def render(r: dict) -> str:
    s = r["settings"]
    lines = [f"# Data loading: medmim vs MONAI ({r['machine']['cpus']} CPUs, roi {s['roi']}³, "
             f"{s['crops_per_volume']} crops/volume, batches of {s.get('batch', 1)} crops, {s['workers']} workers)", ""]
    for name, rows in r["datasets"].items():
        lines += [f"## {name} (prepare once: {rows['prepare_s']:.1f} s)", "",
                  "| pipeline | crops/s | s/crop | first crop (s) | peak RSS (MB) | peak PSS (MB) |",
                  "|---|---:|---:|---:|---:|---:|"]
        for p in ("medmim", "monai-cache", "monai-otf"):
            x = rows[p]
            lines.append(f"| {p} | {x['crops_per_s']:.1f} | {x['s_per_crop']:.4f} | {x['time_to_first_crop_s']:.2f} | "
                         f"{x['peak_rss_mb']:.0f} | {x['peak_pss_mb']:.0f} |")
        q = rows["ratios"]
        lines += ["", f"- throughput vs MONAI on-the-fly: **{q['throughput_vs_monai_otf']:.1f}×** (target ≥ 50×)",
                  f"- throughput vs MONAI CacheDataset: **{q['throughput_vs_monai_cache']:.2f}×** (target ≥ 1×)",
                  f"- resident memory vs CacheDataset: PSS **{q['pss_vs_monai_cache']:.2f}×**, RSS {q['rss_vs_monai_cache']:.2f}× (target ≤ 0.2×)",
                  f"- time to first crop vs CacheDataset: **{q['first_crop_vs_monai_cache']:.3f}×** (target ≤ 0.1×)", ""]
    prep = r.get("prepare_memory", {})
    if prep:
        lines += ["## prepare: peak resident memory vs number of cases", "", "| cases | seconds | peak RSS (MB) |", "|---:|---:|---:|"]
        for k, v in prep.items():
            if isinstance(v, dict):
                lines.append(f"| {k} | {v['seconds']:.1f} | {v['peak_rss_mb']:.0f} |")
        if "peak_rss_ratio_largest_vs_smallest" in prep:
            lines += ["", f"- largest / smallest: **{prep['peak_rss_ratio_largest_vs_smallest']:.2f}×** (target ≤ 1.2×)"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
