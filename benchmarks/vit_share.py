"""The ViT's share of a UNETR: of a fine-tuning step's FLOPs (forward + backward, counted with
torch.utils.flop_counter.FlopCounterMode, one crop) and of the parameters, at the sizes the studies use.

    python benchmarks/vit_share.py            # writes benchmarks/results/vit-share.md and .json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from medmim.models import UNETR, ViT3D

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train import _register_cpu_sdpa_flops  # noqa: E402  (attention on CPU is counted as on CUDA)

SIZES = {  # name: (crop, patch, ViT width, blocks, heads, MLP, UNETR feature size)
    "paper (ViT-B/16, 96³, feature size 16)": (96, 16, 768, 12, 12, 3072, 16),
    "phantom-science (32³, patch 8, ViT 192 × 6, feature size 8)": (32, 8, 192, 6, 6, 768, 8),
    "phantom-science-v2 (48³, patch 8, ViT 192 × 6, feature size 4)": (48, 8, 192, 6, 6, 768, 4),
}


def share(crop: int, patch: int, width: int, depth: int, heads: int, mlp: int, fs: int) -> dict:
    torch.manual_seed(0)
    vit = ViT3D(img_size=crop, patch_size=patch, hidden_size=width, num_layers=depth, num_heads=heads, mlp_dim=mlp)
    model = UNETR(encoder=vit, num_classes=14, feature_size=fs).train()
    x = torch.rand(1, 1, crop, crop, crop)
    counter = FlopCounterMode(display=False)
    with counter:
        model(x).float().square().mean().backward()
    counts = counter.get_flop_counts()
    total = sum(counts["Global"].values())
    vit_key = next(k for k in counts if k.endswith(".vit"))
    vit_flops = sum(counts[vit_key].values())
    params = sum(p.numel() for p in model.parameters())
    vit_params = sum(p.numel() for p in model.vit.parameters())
    return {"tokens": (crop // patch) ** 3, "gflop_per_crop": total / 1e9, "vit_flop_share": vit_flops / total,
            "vit_param_share": vit_params / params, "params_m": params / 1e6}


def main() -> None:
    _register_cpu_sdpa_flops()
    res = {name: share(*size) for name, size in SIZES.items()}
    out = Path(__file__).resolve().parent / "results" / "vit-share"
    out.with_suffix(".json").write_text(json.dumps(res, indent=1), encoding="utf-8")
    lines = ["# The ViT's share of a UNETR", "",
             "Forward + backward of one crop, FLOPs counted with `torch.utils.flop_counter.FlopCounterMode` "
             "(the ViT's: those counted inside `UNETR.vit`; CPU attention with the CUDA kernel's formula); parameters "
             "counted.", "",
             "| UNETR | tokens per crop | ViT share of step FLOPs | ViT share of parameters | GFLOP per crop | parameters (M) |",
             "|---|---:|---:|---:|---:|---:|"]
    for name, r in res.items():
        lines.append(f"| {name} | {r['tokens']} | {r['vit_flop_share']:.1%} | {r['vit_param_share']:.0%} | "
                     f"{r['gflop_per_crop']:.1f} | {r['params_m']:.2f} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
