"""Swin benchmark: medmim's SimMIM-on-Swin step and Swin UNETR fine-tuning step against MONAI, side by side in one
process, same weights, same inputs (the harness of bench_train.py: steps interleaved, order alternating).

    python benchmarks/bench_swin.py            # cpu and paper sizes (paper: several minutes on 2 CPU cores)
    python benchmarks/bench_swin.py --quick    # cpu size only, fewer repeats

What is measured (each a pair medmim | MONAI):

  simmim-swin  one SimMIM pretraining step on the Swin transformer: zero_grad, forward, L1 on masked voxels,
               backward, AdamW. medmim ``SwinSimMIM3D`` (mask token before the first stage, linear head from
               the last stage, 3D pixel shuffle) vs MONAI's ``SwinUNETR.swinViT`` over the whole image (MONAI
               has no mask token) with the same head and loss: what a user would write on MONAI alone.
  swin-unetr   one fine-tuning step: forward, DiceCE (one-hot + softmax), backward, AdamW. medmim builds
               MONAI's ``SwinUNETR`` itself, so the networks are the same module with the same weights; what
               differs is medmim's training step (its fused AdamW against PyTorch's default AdamW).

Sizes: ``cpu`` = simmim-swin-cpu / swin-unetr-cpu (feature size 12, window 4, 64^3, batch 4 / 2); ``paper``
= simmim-swin / swin-unetr (feature size 48, window 7, 96^3, batch 1). fp32.

Writes DIR/swin.json and DIR/swin.md (DIR defaults to benchmarks/results/).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train import Impl, cpu_info, load, run_case, train_impl  # noqa: E402

SIZES = {
    "cpu": {"simmim": "simmim-swin-cpu", "unetr": "swin-unetr-cpu", "batch_simmim": 4, "batch_unetr": 2},
    "paper": {"simmim": "simmim-swin", "unetr": "swin-unetr", "batch_simmim": 1, "batch_unetr": 1},
}


def _cfg(name: str):
    from medmim.config import load_config

    return load_config(name, ["train.precision=fp32"])


def build_simmim_swin(size: dict, device: torch.device) -> list[Impl]:
    from medmim.models import build_pretrainer
    from medmim.models.masking import mask_to_image
    from medmim.models.swin import pixel_shuffle_3d
    from medmim.models.swin_unetr import build_swin_unetr

    cfg = _cfg(size["simmim"])
    torch.manual_seed(0)
    ours = build_pretrainer(cfg).to(device).train()
    ref = build_swin_unetr(cfg.model.model_copy(update={"num_classes": 2})).swinViT
    ref.load_state_dict(ours.encoder.state_dict(), strict=True)
    head = nn.Conv3d(ours.decoder_pred.in_channels, ours.decoder_pred.out_channels, 1)
    head.load_state_dict(ours.decoder_pred.state_dict())
    theirs = nn.ModuleDict({"swin": ref, "head": head}).to(device).train()
    n, roi = size["batch_simmim"], tuple(cfg.model.img_size)
    x = torch.rand(n, cfg.model.in_channels, *roi, generator=torch.Generator().manual_seed(0)).to(device)
    grid = tuple(r // p for r, p in zip(roi, ours.patch_size))
    mask = ours.random_mask(n, grid, generator=torch.Generator().manual_seed(1)).mask.to(device)
    vmask = mask_to_image(mask, grid, ours.patch_size)  # [N, 1, D, H, W]

    def monai_loss():
        feats = theirs["swin"](x, normalize=True)[4]  # the last stage, every voxel seen
        pred = pixel_shuffle_3d(theirs["head"](feats), ours.stride)
        return ((pred - x).abs() * vmask).sum() / (vmask.sum() * x.shape[1])

    return [train_impl("medmim", ours, lambda: ours(x, mask=mask).loss, device, "fp32"),
            train_impl("monai", theirs, monai_loss, device, "fp32")]


def build_swin_unetr_pair(size: dict, device: torch.device) -> list[Impl]:
    from monai.losses import DiceCELoss
    from monai.networks.nets import SwinUNETR

    from medmim.models import build_segmenter

    cfg = _cfg(size["unetr"])
    m = cfg.model
    torch.manual_seed(0)
    ours = build_segmenter(m).to(device).train()
    theirs = SwinUNETR(in_channels=m.in_channels, out_channels=m.num_classes, feature_size=m.feature_size,
                       patch_size=m.swin.patch_size[0], depths=m.swin.depths, num_heads=m.swin.num_heads,
                       window_size=m.swin.window_size).to(device).train()
    theirs.load_state_dict(ours.state_dict(), strict=True)
    n, roi = size["batch_unetr"], tuple(m.img_size)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(n, m.in_channels, *roi, generator=g).to(device)
    y = torch.randint(0, m.num_classes, (n, 1, *roi), generator=g).to(device)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    return [train_impl("medmim", ours, lambda: loss_fn(ours(x).float(), y), device, "fp32"),
            train_impl("monai", theirs, lambda: loss_fn(theirs(x).float(), y), device, "fp32")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    device = torch.device(args.device)
    sizes = ["cpu"] if args.quick else ["cpu", "paper"]
    warmup, repeats = (1, 3) if args.quick else (2, 5)
    results = {"machine": {"platform": platform.platform(), "torch": torch.__version__, "threads": torch.get_num_threads(),
                           "device": str(device), **cpu_info()}, "load_before": load(), "cases": {}}
    for size in sizes:
        for task, build in (("simmim-swin", build_simmim_swin), ("swin-unetr", build_swin_unetr_pair)):
            t0 = time.perf_counter()
            impls = build(SIZES[size], device)
            res = run_case(impls, device, warmup, repeats, memory="none")
            res.pop("outputs", None)
            res["seconds"] = time.perf_counter() - t0
            results["cases"][f"{task}/{size}"] = res
            s = res["sides"]
            print(f"{task}/{size}: medmim {s['medmim']['step_s_median']:.3f} s, monai {s['monai']['step_s_median']:.3f} s, "
                  f"medmim/monai {res['ratio_vs_monai']:.2f}", flush=True)
    results["load_after"] = load()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "swin.json").write_text(json.dumps(results, indent=1), encoding="utf-8")
    lines = ["# Swin: medmim against MONAI, side by side", "",
             f"{results['machine']['device']}, torch {results['machine']['torch']}, {results['machine']['threads']} "
             f"threads, fp32; {repeats} timed steps per side after {warmup} warm-up, interleaved, order alternating. "
             f"Load average before {results['load_before']}, after {results['load_after']}.", "",
             "| step | size | medmim (s) | MONAI (s) | median of paired ratios medmim/MONAI | speed-up | params medmim | params MONAI | FLOPs / step medmim | FLOPs / step MONAI |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for key, res in results["cases"].items():
        task, size = key.split("/")
        a, b = res["sides"]["medmim"], res["sides"]["monai"]
        fl = lambda f: f"{f / 1e9:.1f} G" if f else "-"
        lines.append(f"| {task} | {size} | {a['step_s_median']:.3f} | {b['step_s_median']:.3f} | "
                     f"{res['ratio_vs_monai']:.2f} | {1 / res['ratio_vs_monai']:.2f}x | {a['params'] / 1e6:.2f} M | "
                     f"{b['params'] / 1e6:.2f} M | {fl(a['flops'])} | {fl(b['flops'])} |")
    lines += ["", "simmim-swin's MONAI side runs the encoder over every voxel with no mask token (MONAI has none), the "
              "same head and the same masked L1; swin-unetr's two sides are the same MONAI module with the same weights, "
              "so its ratio is medmim's training step (fused AdamW) against PyTorch's default AdamW."]
    (args.out / "swin.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"wrote {args.out / 'swin.md'}")


if __name__ == "__main__":
    main()
