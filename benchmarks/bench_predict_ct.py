"""Whole clinical-size CT through `medmim predict`'s path, against MONAI's sliding window, in one run.

    python benchmarks/bench_predict_ct.py [--shape 512 512 200] [--spacing 0.7 0.7 2.5] [--precision fp32]

A phantom CT of the given size is segmented by the paper's UNETR (ViT-B/16, 96^3 windows, 14 classes;
random weights: speed and memory do not depend on them) with medmim's Predictor at its defaults:
preprocessing (RAS, 1.5x1.5x2 mm, HU window, foreground crop), sliding window with Gaussian blending,
softmax, argmax and the mapping back onto the scan's own grid. MONAI's side is
`sliding_window_inference` at its defaults (overlap 0.25, constant blending, 1 window per pass) with
MONAI's own UNETR on the same preprocessed volume: its time leaves out the preprocessing and the mapping
back, which medmim's includes. Peak resident memory is the process's high-water mark after each side
(medmim runs first). Writes DIR/predict-ct.json and .md (DIR: benchmarks/results/).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", type=int, nargs=3, default=[512, 512, 200])
    ap.add_argument("--spacing", type=float, nargs=3, default=[0.7, 0.7, 2.5])
    ap.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", type=Path, default=HERE / "results")
    args = ap.parse_args()

    import bench_train as bt
    from monai.inferers import sliding_window_inference

    from medmim.config import config_from_dict
    from medmim.data.datasets import load_dataset
    from medmim.data.phantom import write_phantom_dataset
    from medmim.data.prepare import preprocess_case
    from medmim.eval.inference import PredictOptions, Predictor

    c = bt.CONFIGS["paper"]
    work = Path(tempfile.mkdtemp(prefix="medmim-bench-ct-"))
    t = time.perf_counter()
    write_phantom_dataset(work / "ct", labeled=1, unlabeled=0, seed=0, shape=tuple(args.shape),
                          spacing=tuple(args.spacing))
    case = load_dataset(work / "ct").cases[0]
    print(f"phantom CT {args.shape} at {args.spacing} mm written in {time.perf_counter() - t:.1f} s", flush=True)

    torch.manual_seed(0)
    ours, theirs = bt.unetr_pair(c)
    cfg = config_from_dict({"task": "finetune", "model": {
        "img_size": [c["img"]] * 3, "patch_size": [c["patch"]] * 3, "hidden_size": c["hidden"],
        "num_layers": c["layers"], "num_heads": c["heads"], "mlp_dim": c["mlp"], "num_classes": c["num_classes"],
        "feature_size": c["feature_size"]}})
    opts = PredictOptions(precision=args.precision, device=args.device)
    predictor = Predictor(ours, cfg, opts)
    base = peak_rss_mib()

    label, info = predictor.predict_case(case)
    r = {"shape": args.shape, "spacing": args.spacing, "precision": args.precision, "device": args.device,
         "threads": torch.get_num_threads(), "torch": torch.__version__, "load_start": bt.load(),
         "medmim": {"seconds": info["seconds"], "seconds_preprocess": info["seconds_preprocess"],
                    "seconds_inference": info["seconds_inference"], "seconds_postprocess": info["seconds_postprocess"],
                    "overlap": opts.overlap, "sw_batch_size": opts.sw_batch_size, "output_shape": list(label.shape),
                    "peak_rss_mib": peak_rss_mib(), "rss_before_mib": base}}
    assert list(label.shape) == list(args.shape)
    prep = preprocess_case(case.__class__(case.case_id, case.images, None), predictor.settings)
    vol = prep["image"]
    r["preprocessed_shape"] = list(vol.shape[1:])
    roi = (c["img"],) * 3
    r["medmim"]["windows"] = bt.window_count(vol.shape[1:], roi, opts.overlap)
    print(f"medmim: {info['seconds']:.1f} s ({info['seconds_inference']:.1f} s inference, "
          f"{r['medmim']['windows']} windows of {list(roi)} over {r['preprocessed_shape']}), peak RSS "
          f"{r['medmim']['peak_rss_mib']:.0f} MiB", flush=True)

    theirs = theirs.to(args.device).eval()
    x = torch.from_numpy(np.ascontiguousarray(vol, dtype=np.float32))[None].to(args.device)
    t = time.perf_counter()
    with torch.inference_mode(), bt.autocast(torch.device(args.device), args.precision):
        logits = sliding_window_inference(x, roi, 1, theirs)
        pred = torch.softmax(logits.float(), dim=1).argmax(1)
    bt.sync(torch.device(args.device))
    r["monai"] = {"seconds": time.perf_counter() - t, "overlap": 0.25, "sw_batch_size": 1,
                  "windows": bt.window_count(vol.shape[1:], roi, 0.25), "peak_rss_mib": peak_rss_mib()}
    del logits, pred
    r["ratio_time"] = r["medmim"]["seconds"] / r["monai"]["seconds"]
    r["ratio_inference_only"] = r["medmim"]["seconds_inference"] / r["monai"]["seconds"]
    r["load_end"] = bt.load()
    print(f"MONAI sliding_window_inference (defaults): {r['monai']['seconds']:.1f} s; medmim / MONAI "
          f"{r['ratio_time']:.2f} (inference alone {r['ratio_inference_only']:.2f})", flush=True)

    args.out.mkdir(parents=True, exist_ok=True)
    name = "predict-ct" + ("" if args.precision == "fp32" else f"-{args.precision}")
    (args.out / f"{name}.json").write_text(json.dumps(r, indent=1))
    m = r["medmim"]
    md = [f"# Whole CT {args.shape} at {args.spacing} mm, paper UNETR (ViT-B/16), {args.precision}, {args.device}, "
          f"{r['threads']} threads", "",
          f"Preprocessed volume {r['preprocessed_shape']}; load {r['load_start']} -> {r['load_end']}.", "",
          "| | seconds | windows | overlap | peak RSS (MiB) |", "|---|---:|---:|---:|---:|",
          f"| medmim predict (preprocess {m['seconds_preprocess']:.1f} + inference {m['seconds_inference']:.1f} + "
          f"back to the scan's grid {m['seconds_postprocess']:.1f}) | {m['seconds']:.1f} | {m['windows']} | "
          f"{m['overlap']} | {m['peak_rss_mib']:.0f} |",
          f"| MONAI sliding_window_inference, defaults (inference only) | {r['monai']['seconds']:.1f} | "
          f"{r['monai']['windows']} | 0.25 | {r['monai']['peak_rss_mib']:.0f} (cumulative) |", "",
          f"medmim / MONAI: **{r['ratio_time']:.2f}** (whole predict) and **{r['ratio_inference_only']:.2f}** "
          "(inference alone); < 1: medmim faster.", ""]
    (args.out / f"{name}.md").write_text("\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
