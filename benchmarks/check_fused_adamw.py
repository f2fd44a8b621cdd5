"""Does PyTorch's fused AdamW on CPU move weights as its default for-loop AdamW does?

    .venv/bin/python benchmarks/check_fused_adamw.py [--steps 5] [--rtol 1e-5] [--atol 1e-6]

medmim's engine builds ``torch.optim.AdamW(..., fused=True)`` on CPU as on CUDA. This check exercises
PyTorch only (no medmim code), so it lives here rather than in the test suite: run it after a PyTorch
upgrade. It trains two copies of a small regression MLP for a few steps, one with the fused AdamW and
one with ``foreach=False`` (the for-loop reference), prints the largest difference between their
weights and exits 1 if any weight differs beyond ``atol + rtol * |reference|`` (torch.testing's rule).

(A regression MLP: in a ViT some gradients are pure rounding noise, the size of AdamW's eps, where any
two summation orders give different update directions; those say nothing about the optimizer.)
"""

from __future__ import annotations

import argparse
import copy
import sys

import torch
import torch.nn.functional as F
from torch import nn


def run(steps: int) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """(name, fused weight, for-loop weight) for every parameter after ``steps`` updates."""
    torch.manual_seed(0)
    a = nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 4))
    b = copy.deepcopy(a)
    kw = dict(lr=1e-3, weight_decay=0.05, betas=(0.9, 0.95))
    oa = torch.optim.AdamW(a.parameters(), fused=True, **kw)
    ob = torch.optim.AdamW(b.parameters(), foreach=False, **kw)
    x, y = torch.randn(256, 16), torch.randn(256, 4)
    for _ in range(steps):
        for model, opt in ((a, oa), (b, ob)):
            opt.zero_grad()
            F.mse_loss(model(x), y).backward()
            opt.step()
    return [(name, pa.detach(), pb.detach()) for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters())]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--rtol", type=float, default=1e-5)
    ap.add_argument("--atol", type=float, default=1e-6)
    args = ap.parse_args(argv)
    worst_abs, worst_name, bad = 0.0, "", []
    for name, fused, loop in run(args.steps):
        diff = (fused - loop).abs()
        excess = float((diff - (args.atol + args.rtol * loop.abs())).max())  # > 0: beyond tolerance
        if float(diff.max()) > worst_abs:
            worst_abs, worst_name = float(diff.max()), name
        if excess > 0:
            bad.append(name)
    print(f"torch {torch.__version__}: fused vs for-loop AdamW on CPU after {args.steps} steps: "
          f"max |difference| {worst_abs:.3g} (in {worst_name}); "
          f"tolerance atol {args.atol:g} + rtol {args.rtol:g} x |w|")
    if bad:
        print(f"FAIL: beyond tolerance in {', '.join(bad)}", file=sys.stderr)
        return 1
    print("ok: within tolerance")
    return 0


if __name__ == "__main__":
    sys.exit(main())
