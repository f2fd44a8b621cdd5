"""Model benchmark: one MAE training step of medmim's MAE3D against MONAI's MaskedAutoEncoderViT.

The paper's configuration, the same for both: ViT-B/16 encoder (768 wide, 12 blocks, 12 heads, MLP 3072,
qkv bias), 96^3 single-channel input, batch 2, mask ratio 0.75, decoder 512 wide x 8 blocks, 16 heads,
MLP 2048 (4x), fp32. A step is forward + loss + backward (no optimiser), timed with
``time.perf_counter`` (with ``torch.cuda.synchronize`` on GPU); the median of ``--repeats`` steps is
reported after ``--warmup`` steps, the two models interleaved step by step in one process so that
both see the same machine state.

Differences that belong to the models, not to the benchmark:
  * medmim embeds only the visible patches; MONAI embeds all 216 patches (a Conv3d) and then drops 75%.
  * MONAI adds a class token to the encoder and decoder sequences (55 / 217 tokens vs 54 / 216).
  * MONAI's 3D sin-cos table needs a width divisible by 6, so its 512-wide decoder uses a learnable
    position embedding (110,592 more trainable parameters); medmim zero-pads the sin-cos table.
  * MONAI's model returns predictions and mask only: the benchmark adds the same masked-patch MSE.

    python benchmarks/bench_models.py [--repeats 5] [--warmup 2] [--device cpu|cuda] [--out DIR]

Writes DIR/models.json and DIR/models.md (DIR defaults to benchmarks/results/).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent

PAPER = dict(img_size=96, patch_size=16, hidden_size=768, num_layers=12, num_heads=12, mlp_dim=3072,
             mask_ratio=0.75, decoder_dim=512, decoder_depth=8, decoder_heads=16, decoder_mlp_dim=2048, batch=2)


def build_medmim(c: dict):
    from medmim.models import MAE3D, ViT3D

    encoder = ViT3D(in_channels=1, img_size=c["img_size"], patch_size=c["patch_size"], hidden_size=c["hidden_size"],
                    num_layers=c["num_layers"], num_heads=c["num_heads"], mlp_dim=c["mlp_dim"], pos_embed="sincos",
                    qkv_bias=True)
    mae = MAE3D(encoder=encoder, mask_ratio=c["mask_ratio"], decoder_dim=c["decoder_dim"],
                decoder_depth=c["decoder_depth"], decoder_heads=c["decoder_heads"],
                decoder_mlp_ratio=c["decoder_mlp_dim"] / c["decoder_dim"], loss="l2")

    def step(x: torch.Tensor) -> torch.Tensor:
        loss = mae(x).loss
        loss.backward()
        return loss

    return mae, step


def build_monai(c: dict):
    from monai.networks.nets import MaskedAutoEncoderViT

    from medmim.models.layers import patchify

    mae = MaskedAutoEncoderViT(
        in_channels=1, img_size=c["img_size"], patch_size=c["patch_size"], hidden_size=c["hidden_size"],
        mlp_dim=c["mlp_dim"], num_layers=c["num_layers"], num_heads=c["num_heads"], masking_ratio=c["mask_ratio"],
        decoder_hidden_size=c["decoder_dim"], decoder_mlp_dim=c["decoder_mlp_dim"],
        decoder_num_layers=c["decoder_depth"], decoder_num_heads=c["decoder_heads"], proj_type="conv",
        pos_embed_type="sincos", decoder_pos_embed_type="learnable", qkv_bias=True)
    patch = (c["patch_size"],) * 3

    def step(x: torch.Tensor) -> torch.Tensor:
        pred, mask = mae(x)  # [N, L, P], [N, L] (1 = masked)
        target = patchify(x, patch)[0]  # tokens in the Conv3d's raster order, as MONAI's
        per_patch = (pred - target).square().mean(-1)
        loss = (per_patch * mask).sum() / mask.sum()
        loss.backward()
        return loss

    return mae, step


def count(model: torch.nn.Module) -> dict:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"total": total, "trainable": trainable}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    c = dict(PAPER, batch=args.batch, img_size=args.img)
    torch.manual_seed(0)
    x = torch.rand(c["batch"], 1, c["img_size"], c["img_size"], c["img_size"], device=device)
    models = {"medmim": build_medmim(c), "monai": build_monai(c)}
    times: dict[str, list[float]] = {name: [] for name in models}
    peak_mb: dict[str, float] = {}
    losses: dict[str, float] = {}
    for name, (model, _) in models.items():
        model.to(device).train()
    for i in range(args.warmup + args.repeats):
        for name, (model, step) in models.items():  # interleaved: both see the same machine state
            model.zero_grad(set_to_none=True)
            sync(device)
            if device.type == "cuda":
                base = torch.cuda.memory_allocated(device)
                torch.cuda.reset_peak_memory_stats(device)
            t0 = time.perf_counter()
            loss = step(x)
            sync(device)
            if i >= args.warmup:
                times[name].append(time.perf_counter() - t0)
            if device.type == "cuda":  # activations + gradients of this step, above the resident weights
                peak_mb[name] = (torch.cuda.max_memory_allocated(device) - base) / 2**20
            losses[name] = float(loss.detach())
    results = {
        "what": "one MAE training step (forward + masked-patch MSE + backward), fp32",
        "config": c,
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "threads": torch.get_num_threads(),
        "warmup": args.warmup,
        "repeats": args.repeats,
        "versions": {"torch": torch.__version__, "monai": __import__("monai").__version__,
                     "python": platform.python_version()},
        "models": {},
    }
    # steps i of both models ran back to back: their ratio cancels most of what other processes add
    results["paired_ratio_median"] = statistics.median(a / b for a, b in zip(times["medmim"], times["monai"]))
    for name, (model, _) in models.items():
        results["models"][name] = {
            "params": count(model),
            "encoder_params": count(model.encoder if name == "medmim" else _monai_encoder(model)),
            "step_s_median": statistics.median(times[name]),
            "step_s_min": min(times[name]),
            "step_s_all": times[name],
            "last_loss": losses[name],
        }
        if name in peak_mb:
            results["models"][name]["step_peak_mb"] = peak_mb[name]
    return results


def _monai_encoder(model) -> torch.nn.Module:
    enc = torch.nn.Module()
    enc.patch_embedding, enc.blocks, enc.cls_token = model.patch_embedding, model.blocks, model.cls_token
    return enc


def render(r: dict) -> str:
    c = r["config"]
    lines = [
        "# MAE step: medmim vs MONAI",
        "",
        f"{r['what']}; ViT-B/{c['patch_size']} ({c['hidden_size']} wide, {c['num_layers']} blocks), "
        f"{c['img_size']}^3 input, batch {c['batch']}, mask {c['mask_ratio']}, decoder {c['decoder_dim']} x "
        f"{c['decoder_depth']} ({c['decoder_heads']} heads, MLP {c['decoder_mlp_dim']}).",
        f"Device: {r['device']}, {r['threads']} threads; median of {r['repeats']} steps after {r['warmup']} warm-up "
        f"steps, the two models interleaved. torch {r['versions']['torch']}, MONAI {r['versions']['monai']}.",
        "",
        "| model | params (total) | trainable | encoder params | step (s, median) | step (s, min) | steps (s) "
        "| step memory (MiB) |",
        "|---|---:|---:|---:|---:|---:|---|---:|",
    ]
    for name, m in r["models"].items():
        mem = f"{m['step_peak_mb']:.0f}" if "step_peak_mb" in m else "n/a (CPU)"
        lines.append(f"| {name} | {m['params']['total']:,} | {m['params']['trainable']:,} | "
                     f"{m['encoder_params']['total']:,} | {m['step_s_median']:.3f} | {m['step_s_min']:.3f} | "
                     f"{', '.join(f'{t:.3f}' for t in m['step_s_all'])} | {mem} |")
    a, b = r["models"]["medmim"]["step_s_median"], r["models"]["monai"]["step_s_median"]
    lines += ["", f"medmim / MONAI step time: {a / b:.2f} (ratio of medians), {r['paired_ratio_median']:.2f} (median "
              "of the ratios of back-to-back steps, robust to other load on the machine).", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batch", type=int, default=PAPER["batch"])
    ap.add_argument("--img", type=int, default=PAPER["img_size"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", type=Path, default=HERE / "results")
    args = ap.parse_args()
    results = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "models.json").write_text(json.dumps(results, indent=1))
    (args.out / "models.md").write_text(render(results))
    print(render(results))


if __name__ == "__main__":
    main()
