"""How a study's frozen ViT encoders spread their tokens, and how much of the organ layout a closed-form linear
fit reads from them: a check of the frozen-encoder probe that no training can stall.

    python benchmarks/token_stats.py STUDY_OUT [--fold 0] > token-stats.md

For the random encoder (seed 0) and each finished pretraining under STUDY_OUT/pretrain/ (its final weights), the
prepared cases of the study's cache are tiled into crops of the model's size (zero-padded at the edges) and each
crop's final tokens (after the ViT's last LayerNorm, as the probe reads them) are collected, with each token's
majority label over its patch. Reported:

* ``|z|``: mean token norm;
* effective dimension: the participation ratio (sum of eigenvalues)^2 / sum of squares of the token covariance,
  and the share of the variance in its top direction (a large share: the tokens vary mostly along one line);
* ridge fit: least squares from the tokens (each channel standardised on the training cases, ridge 1) to one-hot
  labels, on the fold's training cases; its argmax scored on the fold's held-out cases as token-level Dice per
  organ (mean over the foreground classes) and accuracy. An exact solve: it does not depend on optimisation.

The token-level figures are at the patch grid (one label per token), so they are not the probe's voxel Dice;
they compare encoders with each other.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch


def tiles(n: int, size: int) -> list[int]:
    """Crop starts covering 0..n with crops of ``size`` (the last one flush with the end when it fits)."""
    starts = list(range(0, max(n - size, 0) + 1, size))
    if n > size and starts[-1] != n - size:
        starts.append(n - size)
    return starts


def case_tokens(vit, case: Path, roi: tuple[int, int, int], patch: tuple[int, int, int], classes: int):
    """Tokens [n, E] and their majority labels [n] of one prepared case, tiled into ``roi`` crops."""
    img = np.load(case / "image.npy").astype(np.float32)
    lab = np.load(case / "label.npy")
    zs, ys = [], []
    grid = [r // p for r, p in zip(roi, patch)]
    for a in tiles(lab.shape[0], roi[0]):
        for b in tiles(lab.shape[1], roi[1]):
            for c in tiles(lab.shape[2], roi[2]):
                x = np.zeros((img.shape[0], *roi), np.float32)
                y = np.zeros(roi, np.int64)
                part = img[:, a:a + roi[0], b:b + roi[1], c:c + roi[2]]
                x[:, :part.shape[1], :part.shape[2], :part.shape[3]] = part
                lp = lab[a:a + roi[0], b:b + roi[1], c:c + roi[2]]
                y[:lp.shape[0], :lp.shape[1], :lp.shape[2]] = lp
                with torch.no_grad():
                    zs.append(vit(torch.from_numpy(x)[None])[0].numpy())
                blocks = y.reshape(grid[0], patch[0], grid[1], patch[1], grid[2], patch[2]).transpose(0, 2, 4, 1, 3, 5)
                counts = np.apply_along_axis(np.bincount, 1, blocks.reshape(-1, int(np.prod(patch))), minlength=classes)
                ys.append(counts.argmax(1))
    return np.concatenate(zs), np.concatenate(ys)


def stats(train: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray], classes: int) -> dict:
    z, y = train
    zt, yt = test
    ev = np.clip(np.linalg.eigvalsh(np.cov((z - z.mean(0)).T)), 0, None)
    mu, sd = z.mean(0), z.std(0) + 1e-6
    a = np.c_[(z - mu) / sd, np.ones(len(z))]
    w = np.linalg.solve(a.T @ a + np.eye(a.shape[1]), a.T @ np.eye(classes)[y])
    pred = (np.c_[(zt - mu) / sd, np.ones(len(zt))] @ w).argmax(1)
    dice = [2 * np.sum((pred == k) & (yt == k)) / max(1, np.sum(pred == k) + np.sum(yt == k))
            for k in range(1, classes) if np.any(yt == k)]
    return {"norm": float(np.linalg.norm(z, axis=1).mean()), "eff_dim": float(ev.sum() ** 2 / (ev ** 2).sum()),
            "top_share": float(ev.max() / ev.sum()), "dice": float(np.mean(dice)), "acc": float(np.mean(pred == yt)),
            "tokens": (len(z), len(zt))}


def main(argv: list[str]) -> int:
    from medmim.config import load_config
    from medmim.models import build_encoder
    from medmim.models.transfer import load_pretrained

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("study", type=Path)
    ap.add_argument("--fold", type=int, default=0)
    args = ap.parse_args(argv)
    cache = args.study / "cache" / "prepared"
    runs = sorted(p.parent for p in (args.study / "pretrain").glob("*/model.safetensors"))
    if not runs or not (cache / "splits_final.json").is_file():
        print(f"{args.study}: no finished pretraining or no prepared cache with splits_final.json", file=sys.stderr)
        return 2
    split = json.loads((cache / "splits_final.json").read_text(encoding="utf-8"))[args.fold]
    model_cfg = load_config(str(runs[0] / "config.yaml")).model
    classes = model_cfg.num_classes
    roi, patch = tuple(model_cfg.img_size), tuple(model_cfg.patch_size)
    print(f"Tokens of the frozen encoders of {args.study.name} (fold {args.fold}: {len(split['train'])} training, "
          f"{len(split['val'])} held-out cases; crops {list(roi)}, patch {list(patch)}).\n")
    print("| encoder | mean token norm | effective dimension | top direction's share of variance | "
          "ridge token Dice (held-out) | ridge token accuracy |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, run in [("random", None)] + [(r.name, r) for r in runs]:
        torch.manual_seed(0)
        cfg = load_config(str(run / "config.yaml")).model if run else model_cfg
        vit = build_encoder(cfg).eval()
        if run is not None:
            load_pretrained(vit, run / "model.safetensors")
        tok = {s: [case_tokens(vit, cache / "cases" / c, roi, patch, classes) for c in split[s]] for s in ("train", "val")}
        cat = {s: (np.concatenate([t[0] for t in v]), np.concatenate([t[1] for t in v])) for s, v in tok.items()}
        r = stats(cat["train"], cat["val"], classes)
        print(f"| {name} | {r['norm']:.2f} | {r['eff_dim']:.1f} | {r['top_share']:.3f} | {r['dice']:.3f} | "
              f"{r['acc']:.3f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
