"""Each speed change of medmim, on and off, interleaved in one process (the evidence behind the choices).

    python benchmarks/bench_ablations.py [--config demo|paper] [--repeats 5] [--threads N]

  norm       UNETR inference: instance norm as a one-group-per-channel group norm vs PyTorch's (not adopted:
             no faster in a whole forward pass here).
  unetr_train  UNETR training step: channels-last weights handed to the decoder's convolutions (adopted) vs
             PyTorch's layers, and vs the whole model converted to channels-last (weights stored so).
  softmax    Predictor: softmax written into the logits (adopted) vs a new tensor: time and peak memory.
  predict    Predictor.probabilities with the in-place softmax and one copy of the volume on the device, vs without.
  simmim     SimMIM mask token by one select (adopted) vs the blend tokens * (1 - w) + mask_token * w.
  attention  SDPA on strided q/k/v views (kept) vs contiguous copies.
  adamw      AdamW over the paper MAE's parameters: for-loop (medmim's engine on CPU), foreach, fused.
  channels_last  UNETR inference with channels-last 3D weights/activations (not adopted): as is, and with the
             instance norms run channels-first (the conversions).

Writes DIR/ablations.json and DIR/ablations.md (DIR: benchmarks/results/). Ratios are medians over
repeats of (variant / baseline) for runs back to back; < 1 means the variant is faster.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_train as bt  # noqa: E402
from medmim.models.unetr import plain_layers  # noqa: E402

CL = torch.channels_last_3d


def ab(fns: dict, repeats: int, warmup: int = 1, memory: bool = False) -> dict:
    """Interleave the variants (order alternating); the first is the baseline of the ratios."""
    probe = bt.MemoryProbe(torch.device("cpu"), "hwm" if memory and bt.hwm_available() else "none")
    names = list(fns)
    t: dict[str, list[float]] = {k: [] for k in names}
    mem: dict[str, list[float]] = {k: [] for k in names}
    for i in range(warmup + repeats):
        for k in (names if i % 2 == 0 else names[::-1]):
            t0 = time.perf_counter()
            out = fns[k]()
            dt = time.perf_counter() - t0
            del out
            if i >= warmup:
                t[k].append(dt)
    if probe.method == "hwm":  # one more, untimed, run each (the heap trim would slow a timed one)
        for k in names:
            probe.start()
            out = fns[k]()
            mem[k].append(probe.stop())
            del out
    base = names[0]
    res = {"load_end": bt.load()}
    for k in names:
        res[k] = {"s_median": statistics.median(t[k]),
                  "ratio_vs_" + base: statistics.median(a / b for a, b in zip(t[k], t[base]))}
        if mem[k]:
            res[k]["peak_mem_mib"] = max(mem[k])
    return res


class _GroupNormIN(nn.InstanceNorm3d):
    """Instance norm (no affine, no running stats) computed as a group norm with one group per channel."""

    def forward(self, x):
        return torch.nn.functional.group_norm(x, x.shape[1], None, None, self.eps)


def group_norms(module: nn.Module) -> nn.Module:
    module = copy.deepcopy(module)
    for parent in module.modules():
        for name, child in parent.named_children():
            if type(child) is nn.InstanceNorm3d:
                setattr(parent, name, _GroupNormIN(child.num_features, eps=child.eps))
    return module


class _CFNorm(nn.InstanceNorm3d):
    """Instance norm run channels-first, its output turned back to channels-last."""

    def forward(self, x):
        return super().forward(x.contiguous()).contiguous(memory_format=CL)


def channels_last(module: nn.Module, cf_norms: bool) -> nn.Module:
    module = plain_layers(module).to(memory_format=CL)
    if cf_norms:
        for parent in module.modules():
            for name, child in parent.named_children():
                if type(child) is nn.InstanceNorm3d:
                    setattr(parent, name, _CFNorm(child.num_features, eps=child.eps))
    return module


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="demo", choices=list(bt.CONFIGS))
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--only", default=None, help="comma list of ablations")
    ap.add_argument("--out", type=Path, default=HERE / "results")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    c = bt.CONFIGS[args.config]
    want = set(args.only.split(",")) if args.only else None
    r: dict = {"config": args.config, "threads": torch.get_num_threads(), "load_start": bt.load(),
               "torch": torch.__version__, "results": {}}
    reps = args.repeats

    def record(name: str, res: dict) -> None:
        r["results"][name] = res
        print(name, json.dumps(res), flush=True)

    from medmim.config import config_from_dict
    from medmim.eval import inference
    from medmim.eval.inference import PredictOptions, Predictor

    ours, _ = bt.unetr_pair(c)
    ours.eval()
    plain = plain_layers(ours).eval()
    roi = (c["img"],) * 3
    win = torch.rand(4, 1, *roi)

    if want is None or "norm" in want:
        gn = group_norms(plain).eval()
        with torch.inference_mode():
            record("norm (UNETR forward, batch of 4 windows)",
                   ab({"instance_norm": lambda: plain(win), "group_norm": lambda: gn(win)}, reps))

    vol = bt.predict_volume(bt.CONFIGS["demo"], quick=True) if args.config == "demo" else \
        bt.predict_volume(c, quick=False)
    cfg = config_from_dict({"task": "finetune", "model": {
        "img_size": list(roi), "patch_size": [c["patch"]] * 3, "hidden_size": c["hidden"], "num_layers": c["layers"],
        "num_heads": c["heads"], "mlp_dim": c["mlp"], "num_classes": c["num_classes"],
        "feature_size": c["feature_size"]}})
    fast_pred = Predictor(ours, cfg, PredictOptions(device="cpu"))
    plain_pred = Predictor(plain, cfg, PredictOptions(device="cpu"))
    fast_softmax = inference._softmax_

    def with_softmax(fn, inplace: bool):
        def run():
            inference._softmax_ = fast_softmax if inplace else (lambda x: torch.softmax(x, dim=1))
            try:
                return fn()
            finally:
                inference._softmax_ = fast_softmax
        return run

    if want is None or "softmax" in want:
        record("softmax (Predictor.probabilities, volume %s)" % list(vol.shape[1:]),
               ab({"new_tensor": with_softmax(lambda: fast_pred.probabilities(vol), False),
                   "in_place": with_softmax(lambda: fast_pred.probabilities(vol), True)}, max(2, reps // 2),
                  memory=True))
    if want is None or "predict" in want:
        record("predict (Predictor.probabilities, volume %s)" % list(vol.shape[1:]),
               ab({"before": with_softmax(lambda: plain_pred.probabilities(vol), False),
                   "after": with_softmax(lambda: fast_pred.probabilities(vol), True)}, max(2, reps // 2),
                  memory=True))

    if want is None or "simmim" in want:
        from medmim.models import SimMIM3D

        torch.manual_seed(0)
        sim = SimMIM3D(encoder=bt.medmim_vit(c), mask_ratio=c["mask_ratio"], decoder_depth=0, loss="l1")
        x = torch.rand(c["batch"], 1, *roi)
        patches, grid = sim.encoder.patchify(x)
        mask = sim.random_mask(c["batch"], grid).mask

        def blend():
            tokens = sim.encoder.patch_embed(patches)
            w = mask.unsqueeze(-1).to(tokens.dtype)
            tokens = tokens * (1.0 - w) + sim.mask_token * w
            return tokens + sim.encoder.pos_embed_for(grid)

        def select():
            tokens = sim.encoder.patch_embed(patches)
            tokens = torch.where(mask.unsqueeze(-1), sim.mask_token, tokens)
            return tokens + sim.encoder.pos_embed_for(grid)

        record("simmim mask token (embedding + mask, forward + backward)",
               ab({"blend": lambda: blend().sum().backward(), "select": lambda: select().sum().backward()},
                  reps * 4))

    if want is None or "attention" in want:
        n, length, e, h = c["batch"], (c["img"] // c["patch"]) ** 3, c["hidden"], c["heads"]
        qkv = torch.randn(n, length, 3 * e, requires_grad=True)

        def attn(contiguous: bool):
            q, k, v = qkv.reshape(n, length, 3, h, e // h).permute(2, 0, 3, 1, 4)
            if contiguous:
                q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
            F.scaled_dot_product_attention(q, k, v).sum().backward()

        record("attention (SDPA forward + backward, all tokens)",
               ab({"strided_views": lambda: attn(False), "contiguous": lambda: attn(True)}, reps * 4))

    if want is None or "adamw" in want:
        from medmim.models import MAE3D, ViT3D

        p = bt.CONFIGS["paper"]
        mae = MAE3D(encoder=ViT3D(), decoder_dim=p["dec_dim"], decoder_depth=p["dec_depth"],
                    decoder_heads=p["dec_heads"])
        for prm in mae.parameters():
            prm.grad = torch.randn_like(prm) * 1e-3
        opts = {k: torch.optim.AdamW(mae.parameters(), lr=1e-4, weight_decay=0.05, **kw) for k, kw in
                (("for_loop", {"foreach": False}), ("foreach", {"foreach": True}), ("fused", {"fused": True}))}
        record("adamw step (paper MAE, %.0f M parameters)" % (bt.n_params(mae) / 1e6),
               ab({k: o.step for k, o in opts.items()}, reps))
        del mae, opts

    if want is None or "channels_last" in want:
        cl, cl_cf = channels_last(ours, False).eval(), channels_last(ours, True).eval()
        with torch.inference_mode():
            record("channels-last UNETR forward (batch of 4 windows)",
                   ab({"channels_first": lambda: plain(win), "channels_last": lambda: cl(win),
                       "channels_last_cf_norms": lambda: cl_cf(win)}, reps))

    if want is None or "unetr_train" in want:
        from monai.losses import DiceCELoss

        x = torch.rand(c["batch"], 1, *roi)
        y = torch.randint(0, c["num_classes"], (c["batch"], 1, *roi))
        loss = DiceCELoss(to_onehot_y=True, softmax=True)

        def step(m):
            def run():
                m.zero_grad(set_to_none=True)
                loss(m(x), y).backward()
            return run

        models = {"plain": plain_layers(ours).train(), "adopted": copy.deepcopy(ours).train(),
                  "channels_last_model": plain_layers(ours).to(memory_format=CL).train()}
        record("UNETR training step (forward + DiceCE + backward, batch %d)" % c["batch"],
               ab({k: step(m) for k, m in models.items()}, max(2, reps // 2)))

    r["load_end"] = bt.load()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"ablations-{args.config}.json").write_text(json.dumps(r, indent=1))
    lines = [f"# Ablations ({args.config} configuration, {r['threads']} threads, torch {r['torch']})", "",
             f"Load averages: start {r['load_start']}, end {r['load_end']}. Ratio: median over repeats of variant / "
             "first variant, run back to back.", "", "| what | variant | s (median) | ratio | peak MiB |",
             "|---|---|---:|---:|---:|"]
    for what, res in r["results"].items():
        for k, v in res.items():
            if isinstance(v, dict):
                ratio = next(val for key, val in v.items() if key.startswith("ratio_vs_"))
                lines.append(f"| {what} | {k} | {v['s_median']:.4f} | {ratio:.2f} | "
                             f"{v.get('peak_mem_mib', float('nan')):.0f} |")
    (args.out / f"ablations-{args.config}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
