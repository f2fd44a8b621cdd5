"""`medmim predict` and `medmim evaluate`: whole scans in, label maps and honest numbers out."""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path

import numpy as np

from medmim.data.datasets import Case, get_split, load_dataset, read_case_label
from medmim.data.io import IMAGE_SUFFIXES, read_image, write_nifti
from medmim.errors import MedmimError
from medmim.eval.inference import PredictOptions, Predictor
from medmim.eval.metrics import Evaluation, score_case
from medmim.fileio import atomic_write_text


def cases_from_inputs(inputs: list[str]) -> list[Case]:
    """Files, DICOM series folders, BraTS case folders, or datasets (every case, labeled or not) -> cases to
    predict."""
    from medmim.data.datasets import brats_case, is_brats_case_folder, looks_like_brats

    cases: list[Case] = []
    for raw in inputs:
        p = Path(raw)
        if not p.exists():
            raise MedmimError(f"{p}: no such file or folder")
        if is_brats_case_folder(p):  # one case's four sequences (and maybe its _seg)
            case = brats_case(p)
            cases.append(Case(case.case_id, case.images))
            continue
        is_dataset = p.is_file() and p.suffix == ".json" or p.is_dir() and (
            (p / "dataset.json").is_file() or looks_like_brats(p)
            or any(f.name.lower().endswith(IMAGE_SUFFIXES) for f in p.iterdir()))
        if is_dataset:
            cases += [Case(c.case_id, c.images) for c in load_dataset(p).cases]
        else:
            name = p.name
            for suf in IMAGE_SUFFIXES:
                if name.lower().endswith(suf):
                    name = name[: -len(suf)]
            cases.append(Case(name, [p]))
    seen = set()
    for c in cases:
        if c.case_id in seen:
            raise MedmimError(f"two inputs share the case name '{c.case_id}'; their outputs would overwrite each other")
        seen.add(c.case_id)
    return cases


def predict_cases(predictor: Predictor, cases: list[Case], out: Path, log=print,
                  probabilities: bool = False) -> dict[str, str]:
    """Write ``out/CASE.nii.gz`` for each case (a BraTS region model's: a 0/1/2/4 label map), and with
    ``probabilities`` ``out/CASE_probabilities.nii.gz`` ``[I, J, K, K']`` float32 (the regions' sigmoids TC, WT,
    ET, or the classes' softmax); returns {case: error} for those that failed."""
    out.mkdir(parents=True, exist_ok=True)
    failed = {}
    for n, case in enumerate(cases, 1):
        try:
            label, info = predictor.predict_case(case, probabilities=probabilities)
            affine = np.array(info["geometry"]["original_affine"])
            if probabilities:
                write_nifti(out / f"{case.case_id}_probabilities.nii.gz", info.pop("probabilities"), affine)
            write_nifti(out / f"{case.case_id}.nii.gz", label, affine)
            log(f"[{n}/{len(cases)}] {case.case_id}: {tuple(label.shape)} in {info['seconds']:.1f} s "
                f"(inference {info['seconds_inference']:.1f} s)")
        except MedmimError as e:
            failed[case.case_id] = str(e)
            log(f"[{n}/{len(cases)}] {case.case_id}: FAILED: {e}")
    return failed


def _window(image: np.ndarray, cfg) -> np.ndarray:
    if cfg is not None and cfg.data.modality == "ct":
        lo, hi = cfg.data.hu_window
        return np.clip(image, lo, hi)
    lo, hi = np.percentile(image, [1, 99])
    return np.clip(image, lo, hi)


def comparison_figure(path: Path, image: np.ndarray, gt: np.ndarray, predictions: dict[str, np.ndarray],
                      labels: dict[int, str], cfg=None, legend: bool = False) -> Path:
    """The scan (windowed as ``cfg`` preprocesses it), its ground truth and each prediction (title -> label map,
    all on the scan's grid) as organ overlays on the same slices, centred on the ground truth's organs."""
    from medmim.preview import save_segmentation_figure

    idx = np.argwhere(gt > 0)  # where there is something to see
    if len(idx):
        lo, hi = idx.min(0), idx.max(0) + 1
        sl = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
        image, gt, predictions = image[sl], gt[sl], {k: v[sl] for k, v in predictions.items()}
    return save_segmentation_figure(path, _window(image.astype(np.float32), cfg), gt, predictions, labels, legend)


VIT_FEATURES = ("as-is", "mean")


def _reliance_section(ev: Evaluation, averaged: Evaluation, split: str) -> tuple[dict, str]:
    """reliance.json's record and metrics.md's extra section: the mean Dice as-is and with the ViT's features
    averaged over each window's tokens, and the drop between them (what the ViT carries)."""
    x, y = ev.mean_dice(), averaged.mean_dice()
    drop = x - y if x is not None and y is not None else None
    record = {"mean_dice": x, "mean_dice_vit_averaged": y, "drop": drop,
              "per_class_vit_averaged": {str(c): d["mean_dice"] for c, d in sorted(averaged.per_class().items())}}
    fmt = lambda v: "—" if v is None else f"{v:.4f}"
    where = "held-out" if split == "val" else "all-case"
    text = ("\n## ViT reliance\n\n"
            f"ViT reliance: {where} mean Dice {fmt(x)} as-is, {fmt(y)} with the ViT's features replaced by their "
            f"mean over each window's tokens: the ViT carries {fmt(drop)} of it.\n\n"
            "Per class with the ViT's features averaged: "
            + ", ".join(f"{d['name']} {fmt(d['mean_dice'])}" for _, d in sorted(averaged.per_class().items()))
            + " (reliance.json).\n")
    return record, text


def _scorer(regions: str | None, labels: dict[int, str]):
    """score(case_id, pred, gt, spacing) -> the case's scores: per class, or per BraTS region."""
    if regions:
        from medmim.eval.metrics import score_regions

        return score_regions
    return lambda cid, pred, gt, spacing: score_case(cid, pred, gt, spacing, labels)


def evaluate(data: str | os.PathLike, out: str | os.PathLike, checkpoint: str | None = None,
             predictions: str | None = None, split: str = "val", options: PredictOptions | None = None,
             n_overlays: int = 3, log=print, *, vit_features: str = "as-is", vit_reliance: bool = False,
             regions: str | None = None) -> Evaluation:
    """Score a checkpoint (predicting each case) or a folder of predictions (``CASE.nii.gz``) against a dataset.

    Everything is computed in the original geometry with the true spacing. Writes ``metrics.csv``,
    ``metrics.md`` and ``overlay_CASE.png`` for the first ``n_overlays`` cases into ``out``.

    ``vit_features="mean"`` (checkpoint only) predicts with every feature UNETR takes from its ViT replaced
    by its mean over the window's tokens (:func:`~medmim.models.unetr.vit_features_averaged`): only the
    convolutional path from the image carries spatial information. ``vit_reliance`` (checkpoint only)
    predicts each case both ways: the returned evaluation (and ``predictions/``) is the as-is one; the
    averaged predictions are scored too, and both mean Dice and their drop go to ``reliance.json`` and a
    section of ``metrics.md``.

    ``regions="brats"`` scores BraTS's tumour regions (TC, WT, ET) of 0/1/2/4 label maps, as BraTS scores them
    (:func:`~medmim.eval.metrics.score_regions`); a BraTS region checkpoint is scored so without asking.
    """
    if vit_features not in VIT_FEATURES:
        raise MedmimError(f"--vit-features must be one of {', '.join(VIT_FEATURES)}, got {vit_features!r}")
    if (checkpoint is None) == (predictions is None):
        raise MedmimError("give either --checkpoint or --predictions")
    if predictions is not None and (vit_reliance or vit_features != "as-is"):
        flag = "--vit-reliance" if vit_reliance else f"--vit-features {vit_features}"
        raise MedmimError(f"{flag} needs a model to run: give --checkpoint, not --predictions")
    if vit_reliance and vit_features != "as-is":
        raise MedmimError("--vit-reliance already predicts with the ViT's features both as-is and averaged; "
                          "leave --vit-features at as-is")
    out = Path(out)
    ds = load_dataset(data)
    predictor, cfg = None, None
    if checkpoint is not None:
        from medmim.models.unetr import vit_features_averaged

        predictor = Predictor.from_checkpoint(checkpoint, options)
        cfg = predictor.cfg
        if cfg.model.backbone != "vit" and (vit_reliance or vit_features != "as-is"):
            raise MedmimError(f"{checkpoint}: a Swin UNETR; --vit-reliance and --vit-features are for UNETR's ViT")
        if cfg.model.regions and regions not in (None, cfg.model.regions):
            raise MedmimError(f"{checkpoint}: predicts {cfg.model.regions} regions, not --regions {regions}")
        regions = regions or cfg.model.regions
    if regions not in (None, "brats"):
        raise MedmimError(f"--regions must be brats, got {regions!r}")
    if split == "all":
        ids = [c.case_id for c in ds.labeled]
    elif split == "val":
        fold, folds, seed = (cfg.data.fold, cfg.data.num_folds, cfg.train.seed) if cfg else (0, 5, 0)
        ids = get_split(ds, fold, folds, seed)[1]
    else:
        raise MedmimError(f"--split must be val or all, got {split!r}")
    labels = dict(ds.labels) or (dict(cfg.data.labels) if cfg and cfg.data.labels else {})
    if not labels:
        raise MedmimError(f"{data}: declares no labels to evaluate")
    out.mkdir(parents=True, exist_ok=True)
    ev = Evaluation()
    averaged = Evaluation() if vit_reliance else None  # the predictions with the ViT's features averaged
    times = []
    for n, cid in enumerate(ids, 1):
        case = ds.case(cid)
        gt_img = read_case_label(case)  # in BraTS numbering where the dataset numbers its tumour classes otherwise
        t0 = time.perf_counter()
        if predictor is not None:
            with vit_features_averaged(predictor.model) if vit_features == "mean" else contextlib.nullcontext():
                pred, _ = predictor.predict_case(case)
            write_nifti(out / "predictions" / f"{cid}.nii.gz", pred, gt_img.affine)
        else:
            ppath = Path(predictions) / f"{cid}.nii.gz"
            pimg = read_image(ppath)
            if pimg.array.shape != gt_img.array.shape or np.abs(pimg.affine - gt_img.affine).max() > 1e-3:
                raise MedmimError(f"{ppath}: not on its ground truth's grid (shape {pimg.array.shape} vs "
                                  f"{gt_img.array.shape}); predictions must be in the original geometry")
            pred = np.rint(pimg.array).astype(np.int64)
        times.append(time.perf_counter() - t0)
        gt = np.rint(gt_img.array).astype(np.int64)
        score = _scorer(regions, labels)
        scores = score(cid, pred, gt, gt_img.spacing)
        ev.scores += scores
        mean = [s.dice for s in scores if s.status != "absent"]
        line = f"[{n}/{len(ids)}] {cid}: mean Dice {np.mean(mean) if mean else float('nan'):.4f}"
        if averaged is not None:  # the same case again, the ViT's features averaged (kept out of predictions/)
            with vit_features_averaged(predictor.model):
                pred_avg, _ = predictor.predict_case(case)
            scores_avg = score(cid, pred_avg, gt, gt_img.spacing)
            averaged.scores += scores_avg
            mean_avg = [s.dice for s in scores_avg if s.status != "absent"]
            line += f" ({np.mean(mean_avg) if mean_avg else float('nan'):.4f} with the ViT's features averaged)"
        log(line)
        if n <= n_overlays:
            image = read_image(case.images[0]).array
            image = image[..., 0] if image.ndim == 4 else image
            comparison_figure(out / f"overlay_{cid}.png", image, gt, {"prediction": pred}, labels, cfg)
    if times:
        ev.seconds = {"mean": float(np.mean(times)), "max": float(np.max(times))}
    ev.write_csv(out / "metrics.csv")
    what = f"{checkpoint} (the ViT's features averaged over each window's tokens)" if vit_features == "mean" \
        else checkpoint or predictions
    title = f"Evaluation of {what} on {data} ({split}, {len(ids)} cases)"
    text = ev.markdown(title)
    if averaged is not None:
        record, section = _reliance_section(ev, averaged, split)
        atomic_write_text(out / "reliance.json", json.dumps(record, indent=1) + "\n")
        text += section
    else:
        (out / "reliance.json").unlink(missing_ok=True)  # an earlier --vit-reliance's, no longer what metrics.md says
    (out / "metrics.md").write_text(text, encoding="utf-8")
    return ev
