"""Does torch.compile pay for medmim's MAE step on a GPU? Eager vs compiled model, same inputs, one process.

    python benchmarks/gpu_compile_check.py [--batch 256] [--steps 10]

Prints the step times (median of --steps after warm-up), the compiled graph count and graph breaks.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_train as bt  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--steps", type=int, default=10)
    args = ap.parse_args()
    from medmim.models import MAE3D

    dev = torch.device("cuda")
    c = dict(bt.CONFIGS["paper"], batch=args.batch)
    x = torch.rand(c["batch"], 1, c["img"], c["img"], c["img"], device=dev)
    flops = None
    for mode in ("eager", "compiled"):
        torch.manual_seed(0)
        model = MAE3D(encoder=bt.medmim_vit(c), mask_ratio=c["mask_ratio"], decoder_dim=c["dec_dim"],
                      decoder_depth=c["dec_depth"], decoder_heads=c["dec_heads"], loss="l2").to(dev).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
        fwd = torch.compile(model) if mode == "compiled" else model

        def step():
            opt.zero_grad(set_to_none=True)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = fwd(x).loss
            loss.backward()
            opt.step()

        t0 = time.perf_counter()
        for _ in range(3):
            step()
        torch.cuda.synchronize()
        warm = time.perf_counter() - t0
        if flops is None:
            flops = bt.count_flops(step)
        times = []
        for _ in range(args.steps):
            t = time.perf_counter()
            step()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
        med = statistics.median(times)
        print(f"{mode}: batch {args.batch}, step {med * 1e3:.1f} ms (median of {args.steps}), warm-up {warm:.1f} s, "
              f"{flops / med / 1e12:.1f} TFLOP/s, peak memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB",
              flush=True)
        torch.cuda.reset_peak_memory_stats()
        del model, opt, fwd
    from torch._dynamo.utils import counters
    print("dynamo:", dict(counters["stats"]), "graph breaks:", dict(counters["graph_break"]))


if __name__ == "__main__":
    main()
