"""Where a UNETR fine-tuning step's time goes: torch.profiler's self time per operator, grouped by kind of work
(convolutions, the ViT's matmuls and attention, normalisation, layout copies, element-wise work, the loss,
the optimizer), for medmim's step and MONAI's side by side, at bench_train's configurations.

    python benchmarks/profile_step.py                      # v2 and paper, 2 threads
    python benchmarks/profile_step.py --configs v2 --steps 5 --out benchmarks/results/profile-step

Writes OUT.md and OUT.json. The profile counts self CPU time of each operator over ``--steps`` steps after one
warm-up step; the profiler's own overhead makes its total a little longer than a bench_train step.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_train  # noqa: E402

# first match wins; patterns on the profiler's operator names
KINDS = [
    ("convolution", r"conv|mkldnn_convolution|slow_conv|col2vol|vol2col"),
    ("ViT matmul and attention", r"addmm|aten::mm$|aten::bmm|aten::linear|matmul|scaled_dot_product|_flash_attention"),
    ("normalisation (incl. medmim's fused kernel)", r"norm|Compiled|compiled|inductor|cpp_fused"),
    ("layout copies", r"copy_|contiguous|clone|aten::to$|_to_copy|permute|transpose|as_strided|empty_like"),
    ("loss (softmax, one-hot, Dice, CE)", r"softmax|nll|one_hot|scatter|cross_entropy"),
    ("optimizer", r"adam|_foreach|fused_adamw|zero_"),
    ("element-wise and reductions", r"aten::(add|mul|sub|div|neg|gelu|leaky_relu|relu|where|sum|mean|pow|sqrt|"
                                    r"rsqrt|threshold|fill_|exp|log|clamp|abs|sign|max|min|gt|lt|eq|cat|stack)"),
]


def kind_of(name: str) -> str:
    for kind, pattern in KINDS:
        if re.search(pattern, name):
            return kind
    return "other"


def profile(impl, steps: int) -> dict:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    impl.prepare()
    impl.run()  # warm-up
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            impl.prepare()
            impl.run()
    by_kind: dict[str, float] = {}
    top: list[tuple[str, float]] = []
    for e in prof.key_averages():
        us = e.self_cpu_time_total
        by_kind[kind_of(e.key)] = by_kind.get(kind_of(e.key), 0.0) + us
        top.append((e.key, us))
    total = sum(by_kind.values())
    top.sort(key=lambda kv: -kv[1])
    return {"step_s": total / steps / 1e6, "share": {k: v / total for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])},
            "top": [(k, v / total) for k, v in top[:12]]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", nargs="+", default=["v2", "paper"], choices=sorted(bench_train.CONFIGS))
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "profile-step")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    res = {"machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
           "steps": args.steps, "configs": {}, "load_start": [round(x, 2) for x in os.getloadavg()]}
    for cname in args.configs:
        impls = bench_train.build_case("unetr", cname, device, "fp32", quick=False, same=False)
        res["configs"][cname] = {impl.name: profile(impl, args.steps) for impl in impls}
        print(cname, {n: round(r["step_s"], 3) for n, r in res["configs"][cname].items()}, flush=True)
    res["load_end"] = [round(x, 2) for x in os.getloadavg()]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(res, indent=1), encoding="utf-8")
    lines = ["# Where a UNETR fine-tuning step's time goes (torch.profiler, self CPU time)", "",
             f"{res['machine']}; fp32; {args.steps} profiled steps after one warm-up; each side with its own "
             "AdamW as in bench_train's defaults. Shares of the profiled self time. Load averages (1, 5, 15 min) "
             f"{res['load_start']} at the start, {res['load_end']} at the end: with other work on the machine the "
             "step times are longer than alone; the shares are what to read.", ""]
    for cname, sides in res["configs"].items():
        kinds = list(dict.fromkeys(k for s in sides.values() for k in s["share"]))
        lines += [f"## {cname}", "", "| kind of work | " + " | ".join(sides) + " |", "|---|" + "---:|" * len(sides)]
        lines += ["| profiled step (s) | " + " | ".join(f"{s['step_s']:.3f}" for s in sides.values()) + " |"]
        for k in kinds:
            lines.append(f"| {k} | " + " | ".join(f"{s['share'].get(k, 0):.1%}" for s in sides.values()) + " |")
        for name, s in sides.items():
            lines += ["", f"Top operators of {name}: " + ", ".join(f"`{k}` {v:.1%}" for k, v in s["top"]), ""]
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"wrote {args.out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
