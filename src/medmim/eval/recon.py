"""`medmim evaluate-recon`: does a pretrained MAE / SimMIM reconstruct masked anatomy, or only averages?

The model reconstructs masked patches of random crops of held-out cases, and its error on the masked
voxels is set against two baselines that learn nothing, both given exactly the same crops and masks:

* ``visible_mean``: every masked voxel is the mean of the crop's visible voxels (per channel);
* ``trilinear``: the mean of each visible patch, masked patches filled in from their visible
  neighbours on the token grid (normalised convolution), upsampled to voxels trilinearly.

A model that only learned the intensity of "tissue in general" lands near the first; one that only
learned local smoothness lands near the second; a model that learned anatomy beats both.

Errors are in the intensities of the prepared cache (CT: the HU window scaled to [0, 1]; MRI: z-scores)
and count masked voxels inside the scan only (a crop that overhangs a small scan is padded; the
padding is not scored).
"""

from __future__ import annotations

import csv
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from medmim.errors import MedmimError
from medmim.runtime import resolve_device

Tensor = torch.Tensor

METHODS = ("model", "visible_mean", "trilinear")
ORACLE = "model_own_patch_stats"  # norm-pix models only: de-normalised with the hidden patch's own mean/std
LABELS = {
    "model": "model",
    "visible_mean": "baseline: mean of visible voxels",
    "trilinear": "baseline: trilinear from visible patches",
    ORACLE: "model, own patch mean/std (leaks the target)",
}
_CHUNK = 8  # crops per forward pass: a ViT-B at 96^3 stays far below 1 GB of activations


# ---------------------------------------------------------------------------------------------
# Baselines (no learning) and errors
# ---------------------------------------------------------------------------------------------


def visible_mean_baseline(x: Tensor, voxel_mask: Tensor, inside: Tensor | None = None) -> Tensor:
    """Predict every voxel as the mean of the crop's visible voxels, per sample and channel.

    x: [N, C, D, H, W]; voxel_mask: [N, 1, D, H, W], 1 = masked; inside: [N, 1, D, H, W] bool, the
    voxels that belong to the scan (None: all). Returns [N, C, D, H, W] (constant per sample and channel).
    """
    visible = voxel_mask < 0.5
    if inside is not None:
        # a sample whose visible voxels all lie in the padding falls back to all visible voxels
        in_vis = visible & inside
        has = in_vis.flatten(1).any(dim=1).view(-1, 1, 1, 1, 1)
        visible = torch.where(has, in_vis, visible)
    w = visible.to(x.dtype)
    mean = (x * w).sum(dim=(2, 3, 4), keepdim=True) / w.sum(dim=(2, 3, 4), keepdim=True).clamp_min(1.0)
    return mean.expand_as(x)


def fill_from_neighbours(values: Tensor, known: Tensor) -> Tensor:
    """Fill unknown cells of a grid from their known 3x3x3 neighbours, front by front.

    values: [N, C, a, b, c]; known: [N, 1, a, b, c] bool. Each pass gives every unknown cell with at
    least one known neighbour the mean of those neighbours (normalised convolution), then counts it as
    known; passes repeat until every cell is filled. A sample with no known cell is filled with 0.
    """
    w = known.to(values.dtype)
    v = values * w
    ones = torch.ones(1, 1, 3, 3, 3, dtype=values.dtype, device=values.device)

    def box(t: Tensor) -> Tensor:  # sum over each cell's 3x3x3 neighbourhood, per channel
        return F.conv3d(t.reshape(-1, 1, *t.shape[2:]), ones, padding=1).reshape(t.shape)

    for _ in range(max(values.shape[2:]) + 1):  # the filled front moves one cell a pass
        if bool((w > 0).all()):
            break
        num, den = box(v), box(w)  # sum of known neighbours' values, and their count
        new = (w == 0) & (den > 0.5)
        v = torch.where(new, num / den.clamp_min(1e-12), v)
        w = torch.where(new, torch.ones_like(w), w)
    return v


def trilinear_baseline(x: Tensor, token_mask: Tensor, patch_size: Sequence[int]) -> Tensor:
    """Means of visible patches, masked patches filled from visible neighbours, upsampled trilinearly.

    x: [N, C, D, H, W]; token_mask: [N, L] bool (True = masked) in raster order of the token grid;
    patch_size: voxels per token per axis. Returns [N, C, D, H, W]. With ``align_corners=False`` and a
    scale of exactly the patch size, each patch mean sits at its patch's centre, so a linear intensity
    ramp is reproduced exactly between the centres of patches whose means are right.
    """
    ps = tuple(int(p) for p in patch_size)
    grid = [s // p for s, p in zip(x.shape[2:], ps)]
    means = F.avg_pool3d(x, kernel_size=ps, stride=ps)  # [N, C, gd, gh, gw]
    visible = ~token_mask.bool().reshape(x.shape[0], 1, *grid)
    filled = fill_from_neighbours(means, visible)
    return F.interpolate(filled, size=tuple(x.shape[2:]), mode="trilinear", align_corners=False)


def neighbour_stats_prediction(pred: Tensor, x: Tensor, token_mask: Tensor, patch_size: Sequence[int]) -> Tensor:
    """A norm-pix prediction brought back to intensities without looking at the hidden patches.

    ``MIMOutput.pred`` of a ``norm_pix_loss`` model is de-normalised with each input patch's own mean
    and std, which a masked patch should not reveal. This undoes that and uses instead the mean and std
    of the masked patch filled in from its visible neighbours (as :func:`trilinear_baseline` does).
    pred, x: [N, C, D, H, W]; token_mask: [N, L] bool. Returns [N, C, D, H, W].
    """
    from medmim.models.layers import patchify, unpatchify
    from medmim.models.losses import patch_norm

    n = x.shape[0]
    patches, grid = patchify(x.float(), patch_size)  # [N, L, C*P]
    _, mean, std = patch_norm(patches)  # [N, L, 1] each: what the model's pred was scaled with
    z = (patchify(pred.float(), patch_size)[0] - mean) / std  # the model's own normalised output
    stats = torch.cat([mean, std], dim=-1).transpose(1, 2).reshape(n, 2, *grid)  # [N, 2, gd, gh, gw]
    visible = ~token_mask.bool().reshape(n, 1, *grid)
    est = fill_from_neighbours(stats, visible).reshape(n, 2, -1).transpose(1, 2)  # [N, L, 2]
    return unpatchify(z * est[..., 1:2] + est[..., 0:1], grid, patch_size)


def masked_errors(pred: Tensor, x: Tensor, voxel_mask: Tensor, inside: Tensor | None = None) -> dict[str, Tensor]:
    """Per-sample sums of |error| and error^2 over masked voxels (inside the scan), and their count.

    pred, x: [N, C, D, H, W]; voxel_mask: [N, 1, D, H, W], 1 = masked; inside: [N, 1, D, H, W] bool or None.
    Returns {"abs": [N], "sq": [N], "count": [N]} (float64); count counts voxels x channels.
    """
    m = voxel_mask > 0.5
    if inside is not None:
        m = m & inside
    m = m.expand_as(x)
    err = torch.where(m, pred.float() - x.float(), torch.zeros((), dtype=torch.float32, device=x.device))
    dims = (1, 2, 3, 4)
    return {"abs": err.abs().sum(dims).double(), "sq": err.square().sum(dims).double(), "count": m.sum(dims).double()}


# ---------------------------------------------------------------------------------------------
# Accumulating numbers
# ---------------------------------------------------------------------------------------------


@dataclass
class _Tally:
    abs: float = 0.0
    sq: float = 0.0
    count: float = 0.0
    crops: int = 0
    psnr: list[float] = field(default_factory=list)

    def add(self, abs_sum: float, sq_sum: float, count: float, value_range: float) -> None:
        self.abs += abs_sum
        self.sq += sq_sum
        self.count += count
        self.crops += 1
        if count > 0 and sq_sum > 0 and value_range > 0:
            self.psnr.append(10.0 * math.log10(value_range ** 2 / (sq_sum / count)))

    def merge(self, other: "_Tally") -> None:
        self.abs += other.abs
        self.sq += other.sq
        self.count += other.count
        self.crops += other.crops
        self.psnr += other.psnr

    def numbers(self) -> dict:
        c = max(self.count, 1.0)
        return {"mae": self.abs / c if self.count else float("nan"), "mse": self.sq / c if self.count else float("nan"),
                "psnr_db": float(np.mean(self.psnr)) if self.psnr else float("nan"),
                "crops": self.crops, "masked_voxels": int(self.count)}


# ---------------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------------


def _checkpoint_file(path: Path) -> Path:
    """A run folder means its model.safetensors (or, failing that, checkpoints/last.pt)."""
    if path.is_dir():
        for p in (path / "model.safetensors", path / "checkpoints" / "last.pt"):
            if p.is_file():
                return p
        raise MedmimError(f"{path}: a folder without model.safetensors or checkpoints/last.pt; "
                          "give a pretraining checkpoint file")
    return path


def load_mim_model(checkpoint: str | Path):
    """(model in eval mode, its Config, the file read) from a MAE or SimMIM pretraining checkpoint."""
    from medmim.models.rebuild import config_of, model_from
    from medmim.models.transfer import read_checkpoint

    path = _checkpoint_file(Path(checkpoint))
    ckpt = read_checkpoint(path)
    need = "reconstruction needs a MAE or SimMIM pretraining checkpoint (RUN/model.safetensors or RUN/checkpoints/last.pt)"
    cfg = config_of(ckpt, need)
    if cfg.task != "pretrain":
        raise MedmimError(f"{path}: a fine-tuning (UNETR) checkpoint has no reconstruction head; {need}")
    if cfg.pretrain.method not in ("mae", "simmim"):
        raise MedmimError(f"{path}: a SimCLR checkpoint has no reconstruction head; {need}")
    return model_from(ckpt, cfg), cfg, path


def _case_names(cases) -> list[str]:
    """Case ids, prefixed with their cache's folder name where two caches share an id."""
    ids = [c.case_id for c in cases]
    dup = {i for i in ids if ids.count(i) > 1}
    return [f"{c.folder.parent.parent.name}/{c.case_id}" if c.case_id in dup else c.case_id for c in cases]


def _fmt(v: float, digits: int = 4) -> str:
    return "—" if v is None or not math.isfinite(v) else f"{v:.{digits}g}"


def reconstruction_report(checkpoint: str | Path, data_paths: Sequence[str | Path], out_dir: str | Path, *,
                          crops_per_case: int = 4, seed: int = 0, max_cases: int | None = None, split: str = "val",
                          device: str = "auto", log: Callable[[str], None] = print) -> dict:
    """Masked-voxel reconstruction errors of a MAE/SimMIM checkpoint against two no-learning baselines.

    checkpoint: a pretraining run's ``model.safetensors`` or ``checkpoints/last.pt`` (or the run folder).
    data_paths: datasets or prepared caches; raw datasets are prepared with the checkpoint's own settings.
    split: ``"val"``: the cases pretraining held out (``medmim.data.selection.pretrain_cases``), or all cases
        when there are none; ``"all"``: every case.
    crops_per_case: random crops of the model's ``roi_size`` per case; seed: crops and masks (the same
        seed gives the same crops and masks, and every method is scored on the same ones).
    max_cases: score at most this many cases (the first in id order).

    Writes ``out_dir/recon.md``, ``out_dir/recon.csv`` (per case and method) and ``out_dir/recon.png``
    (one crop); returns the numbers as a dict.
    """
    from medmim.data.sampling import BadCaseError, CropSampler
    from medmim.data.selection import pretrain_cases, resolve_caches

    if crops_per_case < 1:
        raise MedmimError(f"crops_per_case must be >= 1, got {crops_per_case}")
    if max_cases is not None and max_cases < 1:
        raise MedmimError(f"max_cases must be >= 1, got {max_cases}")
    if split not in ("val", "all"):
        raise MedmimError(f"split must be 'val' or 'all', got {split!r}")
    if not data_paths:
        raise MedmimError("give at least one dataset or prepared cache (-d DATA)")
    out = Path(out_dir)
    model, cfg, ckpt_path = load_mim_model(checkpoint)
    dev = resolve_device(device, setting="--device")
    model.to(dev)

    # the data, prepared as the model was pretrained (a cache_dir from another machine is not reused)
    cache_dir = cfg.data.cache_dir if cfg.data.cache_dir and Path(cfg.data.cache_dir).is_dir() else None
    data_cfg = cfg.data.model_copy(update={"path": [str(p) for p in data_paths], "cache_dir": cache_dir})
    caches = resolve_caches(data_cfg, log=log)
    run_cases = pretrain_cases(caches, cfg.data.fold, cfg.train.seed, cfg.data.channels)
    if run_cases.channels != cfg.model.in_channels:
        raise MedmimError(f"{ckpt_path}: the model takes {cfg.model.in_channels} channel(s) but "
                          f"{', '.join(map(str, data_paths))} has {run_cases.channels}")
    all_cases = sorted(run_cases.train + run_cases.val, key=lambda c: (c.case_id, str(c.folder)))
    if split == "val" and run_cases.val:
        cases = sorted(run_cases.val, key=lambda c: (c.case_id, str(c.folder)))
        which = (f"the {len(cases)} case(s) pretraining held out (fold {cfg.data.fold} validation cases, or a "
                 f"seed-{cfg.train.seed} hold-out of unlabeled data)")
    elif split == "val":
        cases = all_cases
        which = (f"ALL {len(cases)} case(s): the data has no held-out cases (fewer than 2 cases?), so pretraining "
                 "may have seen these")
        log(f"note: no held-out cases in {', '.join(map(str, data_paths))}; scoring all {len(cases)} case(s)")
    else:
        cases = all_cases
        which = f"all {len(cases)} case(s) (--split all: pretraining may have seen them, unless the data is new)"
    if max_cases is not None and len(cases) > max_cases:
        cases = cases[:max_cases]
        which += f"; the first {max_cases} scored (max_cases)"
    names = _case_names(cases)

    roi = tuple(int(s) for s in cfg.data.roi_size)
    patch = tuple(int(p) for p in cfg.model.token_patch)  # voxels per token: the ViT's patch or the Swin's
    if any(r % p for r, p in zip(roi, patch)):
        raise MedmimError(f"{ckpt_path}: data.roi_size {list(roi)} is not a multiple of the encoder's patch {list(patch)}")
    grid = tuple(r // p for r, p in zip(roi, patch))
    mim = cfg.pretrain.settings  # the method's masking and loss
    norm_pix = bool(mim.norm_pix_loss)
    methods = list(METHODS) + ([ORACLE] if norm_pix else [])
    # padding is NaN here, so the scan's own voxels are known; the model sees 0 there, as in pretraining
    sampler = CropSampler(cases, roi, crops_per_case, pos_fraction=0.0, seed=seed, epochs=1, shuffle=False, rank=0,
                          world_size=1, pad_value=float("nan"), use_labels=False, verify=cfg.data.verify_checksums)
    gen = torch.Generator().manual_seed(int(seed))  # one mask per crop, in case order: same masks for every method

    per_case: dict[str, dict[str, _Tally]] = {}
    bad: list[str] = []
    masked_tokens = total_tokens = 0
    preview = None
    log(f"scoring {len(cases)} case(s) x {crops_per_case} crop(s) of {list(roi)} voxels, mask ratio "
        f"{mim.mask_ratio} in blocks of {list(model.mask_patch_size)} voxels, on {dev.type}")
    for idx, (case, name) in enumerate(zip(cases, names)):
        try:
            opened = sampler.open(case)
        except BadCaseError as e:
            bad.append(f"{name}: {e.reason}")
            log(f"[{idx + 1}/{len(cases)}] {name}: skipped ({e.reason})")
            continue
        crops = torch.stack([item["image"] for item in sampler.crops_of(case, sampler.stream(0, idx), opened)])  # [K, C, *roi]
        tallies = {m: _Tally() for m in methods}
        for start in range(0, crops.shape[0], _CHUNK):
            xb = crops[start:start + _CHUNK]
            inside = ~torch.isnan(xb).any(dim=1, keepdim=True)  # [n, 1, *roi]
            xb = torch.nan_to_num(xb, nan=0.0).to(dev)
            inside = inside.to(dev)
            n = xb.shape[0]
            token_mask = torch.cat([model.random_mask(1, grid, generator=gen).mask for _ in range(n)]).to(dev)
            with torch.no_grad():
                o = model(xb, mask=token_mask)
            vmask = o.mask  # [n, 1, *roi], 1 = masked
            preds = {"visible_mean": visible_mean_baseline(xb, vmask, inside),
                     "trilinear": trilinear_baseline(xb, token_mask, patch)}
            if norm_pix:
                preds["model"] = neighbour_stats_prediction(o.pred, xb, token_mask, patch)
                preds[ORACLE] = o.pred
            else:
                preds["model"] = o.pred
            big = torch.finfo(torch.float32).max
            lo = torch.where(inside.expand_as(xb), xb, big).flatten(1).amin(1)
            hi = torch.where(inside.expand_as(xb), xb, -big).flatten(1).amax(1)
            ranges = (hi - lo).clamp_min(0).double().cpu().tolist()
            for m in methods:
                e = {k: v.cpu().tolist() for k, v in masked_errors(preds[m], xb, vmask, inside).items()}
                for i in range(n):
                    tallies[m].add(e["abs"][i], e["sq"][i], e["count"][i], ranges[i])
            masked_tokens += int(token_mask.sum())
            total_tokens += token_mask.numel()
            if preview is None:
                preview = (xb[0, 0].cpu(), vmask[0, 0].cpu(), preds["model"][0, 0].cpu())
        per_case[name] = tallies
        r = {m: tallies[m].numbers() for m in methods}
        log(f"[{idx + 1}/{len(cases)}] {name}: mean |error| model {_fmt(r['model']['mae'])}, visible mean "
            f"{_fmt(r['visible_mean']['mae'])}, trilinear {_fmt(r['trilinear']['mae'])}")
    if not per_case:
        raise MedmimError(f"no case of {', '.join(map(str, data_paths))} could be read: {'; '.join(bad[:3])}")

    # totals over every scored voxel (all crops mask as many tokens, so crops weigh alike)
    totals = {m: _Tally() for m in methods}
    for tallies in per_case.values():
        for m in methods:
            totals[m].merge(tallies[m])
    summary = {m: totals[m].numbers() for m in methods}
    base = summary["visible_mean"]
    for m in methods:
        s = summary[m]
        s["mae_ratio"] = s["mae"] / base["mae"] if base["mae"] and math.isfinite(base["mae"]) else float("nan")
        s["mse_ratio"] = s["mse"] / base["mse"] if base["mse"] and math.isfinite(base["mse"]) else float("nan")

    hu_scale = _hu_scale(caches)
    verdict = _verdict(summary, mim.loss)
    result = {
        "checkpoint": str(ckpt_path), "method": cfg.pretrain.method, "loss": mim.loss,
        "norm_pix_loss": norm_pix, "mask_ratio": float(mim.mask_ratio),
        "mask_patch_size": list(model.mask_patch_size), "patch_size": list(patch), "roi_size": list(roi),
        "masked_token_fraction": masked_tokens / max(total_tokens, 1), "split": split, "which": which,
        "cases": list(per_case), "skipped_cases": bad, "crops": summary["model"]["crops"],
        "masked_voxels": summary["model"]["masked_voxels"], "crops_per_case": int(crops_per_case), "seed": int(seed), "device": dev.type,
        "methods": summary, "hu_per_unit": hu_scale, "verdict": verdict,
        "per_case": [{"case": name, "method": m, **tallies[m].numbers()}
                     for name, tallies in per_case.items() for m in methods],
    }
    out.mkdir(parents=True, exist_ok=True)
    _write_csv(out / "recon.csv", result["per_case"])
    png = None
    if preview is not None:
        try:
            from medmim.preview import save_mim_preview

            png = save_mim_preview(out / "recon.png", *preview)
        except Exception as e:  # noqa: BLE001 - a picture must not sink the numbers
            log(f"note: preview not written ({type(e).__name__}: {e})")
    result["files"] = {"md": str(out / "recon.md"), "csv": str(out / "recon.csv"), "png": str(png) if png else None}
    (out / "recon.md").write_text(_markdown(result, methods), encoding="utf-8")
    return result


def _hu_scale(caches) -> float | None:
    """HU per cache intensity unit when every cache is CT with one HU window, else None."""
    windows = set()
    for c in caches:
        s = c.manifest.get("settings", {})
        if s.get("modality") != "ct" or not s.get("hu_window"):
            return None
        windows.add(tuple(s["hu_window"]))
    if len(windows) != 1:
        return None
    lo, hi = windows.pop()
    return float(hi - lo)


def _verdict(summary: dict, loss: str) -> str:
    key, word = ("mse", "mean squared error") if loss == "l2" else ("mae", "mean absolute error")
    m, vm, tri = summary["model"][key], summary["visible_mean"][key], summary["trilinear"][key]
    if not all(math.isfinite(v) for v in (m, vm, tri)):
        return "no masked voxel inside a scan was scored: no verdict."
    lead = (f"On {word} (the pretraining loss is {loss.upper()}), the model scores {m / vm:.2f}x the visible-mean "
            f"baseline and {m / tri:.2f}x the trilinear baseline" if vm > 0 and tri > 0 else
            f"On {word}, the model scores {m:.4g} (visible mean {vm:.4g}, trilinear {tri:.4g})")
    if m < tri and m < vm:
        return lead + ": it predicts masked voxels better than interpolating what it sees, i.e. it has learned " \
                      "structure beyond local averages."
    if m < 0.95 * vm:
        return lead + ": it beats the crop's mean but not interpolation of its visible neighbours, i.e. it gives no " \
                      "more than a smooth fill-in would."
    if m <= 1.05 * vm:
        return lead + ": it does about as well as the mean of the visible voxels, i.e. it has learned averages only."
    return lead + ": it is worse than predicting the mean of the visible voxels, i.e. it has not even learned the " \
                  "average intensity (too little pretraining?)."


def _write_csv(path: Path, rows: list[dict]) -> None:
    cols = ["case", "method", "crops", "masked_voxels", "mae", "mse", "psnr_db"]
    tmp = path.with_name(f".tmp-{path.name}")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{r[k]:.6g}" if isinstance(r[k], float) else r[k]) for k in cols})
    tmp.replace(path)


def _markdown(res: dict, methods: list[str]) -> str:
    hu = res["hu_per_unit"]
    lines = ["# Masked-voxel reconstruction", "",
             f"- checkpoint: `{res['checkpoint']}` ({res['method'].upper() if res['method'] == 'mae' else 'SimMIM'}, "
             f"{res['loss'].upper()} loss{', norm-pix target' if res['norm_pix_loss'] else ''})",
             f"- cases: {_which_line(res)}",
             f"- crops: {res['crops']} of {res['roi_size']} voxels ({res['crops_per_case']} per case), "
             f"seed {res['seed']}; {res['masked_voxels']} masked voxels scored",
             f"- mask: ratio {res['mask_ratio']} in blocks of {res['mask_patch_size']} voxels (ViT patch "
             f"{res['patch_size']}); {res['masked_token_fraction']:.1%} of tokens masked; every method is scored "
             "on the same crops and masks",
             "- errors: on masked voxels inside the scan only, in the prepared cache's intensities (CT: the HU window "
             "scaled to [0, 1]; MRI: z-scores)" + (f"; 1 unit = {hu:g} HU" if hu else ""),
             "- PSNR: per crop, peak = the crop's max - min intensity, averaged over crops", ""]
    if res["skipped_cases"]:
        lines += [f"- skipped (unreadable): {'; '.join(res['skipped_cases'])}", ""]
    head = "| method | MAE | MSE | PSNR (dB) | MAE / visible mean | MSE / visible mean |"
    if hu:
        head = "| method | MAE | MAE (HU) | MSE | PSNR (dB) | MAE / visible mean | MSE / visible mean |"
    lines += [head, "|---|" + "---:|" * (head.count("|") - 2)]
    for m in methods:
        s = res["methods"][m]
        cells = [LABELS[m], _fmt(s["mae"])] + ([_fmt(s["mae"] * hu, 3)] if hu else []) + [
            _fmt(s["mse"]), _fmt(s["psnr_db"], 3), _fmt(s["mae_ratio"], 3), _fmt(s["mse_ratio"], 3)]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"**{res['verdict']}**", ""]
    if res["norm_pix_loss"]:
        lines += ["Note: this model predicts each patch normalised to zero mean and unit variance (norm-pix loss). "
                  "The `model` row brings its prediction back to intensities with each masked patch's mean and std "
                  "filled in from the visible patches around it (as the trilinear baseline does), so it uses nothing "
                  "hidden. The last row uses the masked patch's own mean and std, as the training previews do: that "
                  "leaks the target's statistics and flatters the model; do not compare it with the baselines.", ""]
    lines += ["Baselines, which learn nothing: *visible mean* predicts every masked voxel as the mean of the crop's "
              "visible voxels; *trilinear* takes the mean of each visible patch, fills each masked patch from its "
              "visible neighbours on the token grid (repeated 3x3x3 averaging), and interpolates trilinearly to voxels. "
              "A model that beats both reconstructs more than intensity averages and smooth interpolation.", "",
              "Per case and method: `recon.csv`." + (" One crop (input / masked / reconstruction / prediction): "
                                                     "![reconstruction](recon.png)" if res["files"]["png"] else ""), ""]
    return "\n".join(lines)


def _which_line(res: dict) -> str:
    names = res["cases"]
    shown = ", ".join(names[:20]) + (f", ... ({len(names) - 20} more in recon.csv)" if len(names) > 20 else "")
    return f"{res['which']}: {shown}"
