"""`medmim data prepare`: preprocess every case once into a memory-mappable cache.

For every case: reorient to RAS, resample to the target spacing (images trilinear, labels nearest),
normalise intensities by modality (CT: clip to a HU window and scale to [0, 1]; MRI: z-score over
the non-zero foreground, per channel), crop to the foreground, and store

    CACHE/manifest.json             settings, their hash, each case's source hashes and status
    CACHE/splits_final.json         the dataset's folds (copied, so a cache is self-contained)
    CACHE/cases/ID/image.npy        [C, X, Y, Z] float16/float32, memory-mappable
    CACHE/cases/ID/label.npy        [X, Y, Z] uint8 (labeled cases only)
    CACHE/cases/ID/fg.npz           per-class foreground voxel positions for balanced crops
    CACHE/cases/ID/case.json        geometry: original shape/affine, cache affine, crop box, checksums

The MONAI transforms (Orientation, Spacing, ScaleIntensityRange, NormalizeIntensity) do the work.
Cases stream one at a time per worker process, so peak memory does not grow with the dataset.
Running prepare again skips cases whose sources and settings are unchanged and redoes stale ones.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import zlib
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medmim.data.datasets import Case, Dataset, get_split, load_dataset
from medmim.data.io import read_image
from medmim.errors import MedmimError
from medmim.fileio import atomic_write_json

CACHE_VERSION = 1
MANIFEST = "manifest.json"
FG_SAMPLES_PER_CLASS = 4096  # enough positions to centre crops on; keeps fg.npz small
# mm, data.spacing when not set: the paper's BTCV setting for CT, BraTS's 1 mm isotropic grid for MRI
DEFAULT_SPACING = {"ct": (1.5, 1.5, 2.0), "mri": (1.0, 1.0, 1.0)}


@dataclass
class PrepareSettings:
    """Everything that changes the cached arrays; its hash decides whether a case is stale."""

    modality: str = "ct"
    spacing: tuple[float, float, float] = (1.5, 1.5, 2.0)
    hu_window: tuple[float, float] = (-175.0, 250.0)
    dtype: str = "float16"

    @classmethod
    def from_config(cls, data_cfg, dataset: str | os.PathLike | None = None) -> "PrepareSettings":
        """The settings for ``dataset`` (data.modality=auto: the modality the dataset declares)."""
        modality = data_cfg.modality
        if modality == "auto":
            modality = dataset_modality(dataset) if dataset is not None else "ct"
        spacing = data_cfg.spacing or DEFAULT_SPACING[modality]
        return cls(modality=modality, spacing=tuple(float(s) for s in spacing),
                   hu_window=tuple(float(v) for v in data_cfg.hu_window), dtype=data_cfg.cache_dtype)

    def to_dict(self) -> dict:
        return {"version": CACHE_VERSION, "modality": self.modality, "spacing": list(self.spacing),
                "hu_window": list(self.hu_window), "dtype": self.dtype}

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]


def dataset_modality(dataset: str | os.PathLike) -> str:
    """"ct" or "mri" from the channel names a dataset declares (Decathlon's ``modality``; none: "ct")."""
    names = [m.strip().lower() for m in load_dataset(Path(dataset)).modalities]
    if not names:
        return "ct"
    is_ct = [n in ("ct", "cta", "ncct", "pet-ct") or n.startswith("ct") for n in names]
    if all(is_ct):
        return "ct"
    if not any(is_ct):
        return "mri"
    raise MedmimError(f"{dataset}: channels {names} mix CT and other modalities; set data.modality=ct or mri")


@dataclass
class PrepareResult:
    cache: Path
    done: list[str] = field(default_factory=list)  # prepared in this run
    skipped: list[str] = field(default_factory=list)  # already up to date
    failed: dict[str, str] = field(default_factory=dict)  # case id -> error
    seconds: float = 0.0


# --- hashing ---------------------------------------------------------------------------------

def _file_hash(path: Path) -> str:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _files_of(p: Path) -> list[Path]:
    return sorted(q for q in p.rglob("*") if q.is_file()) if p.is_dir() else [p]


def source_fingerprint(case: Case, known: dict | None = None) -> dict:
    """{file: [size, mtime_ns, hash]}: the hash is recomputed only when size or mtime changed."""
    known = known or {}
    out = {}
    for src in case.images + ([case.label] if case.label else []):
        for f in _files_of(src):
            st = f.stat()
            prev = known.get(str(f))
            if prev and prev[0] == st.st_size and prev[1] == st.st_mtime_ns:
                out[str(f)] = prev
            else:
                out[str(f)] = [st.st_size, st.st_mtime_ns, _file_hash(f)]
    return out


def array_checksum(arr: np.ndarray) -> str:
    """crc32 of the raw bytes: cheap enough to verify a cached case before training on it."""
    return f"{zlib.crc32(np.ascontiguousarray(arr).view(np.uint8).ravel()) & 0xFFFFFFFF:08x}"


# --- one case --------------------------------------------------------------------------------

def _load_channels(case: Case):
    """Read a case's channels into a [C, X, Y, Z] float32 array and the first channel's affine."""
    arrays, affine = [], None
    for p in case.images:
        img = read_image(p)
        arr = img.array
        if arr.ndim == 4 and arr.shape[3] == 1:
            arr = arr[..., 0]
        if arr.ndim == 3:
            arr = arr[None]
        elif arr.ndim == 4:
            arr = np.moveaxis(arr, 3, 0)
        else:
            raise MedmimError(f"{p}: image is {arr.ndim}D; medmim needs 3D volumes (run `medmim data check`)")
        if affine is None:
            affine = img.affine
        elif arr.shape[1:] != arrays[0].shape[1:] or np.abs(img.affine - affine).max() > 1e-3:
            raise MedmimError(f"{p}: channel grid differs from {case.images[0].name}")
        arrays.append(arr.astype(np.float32, copy=False))
    return np.concatenate(arrays, 0), affine


def _crop_box(mask: np.ndarray) -> tuple[list[int], list[int]]:
    """Smallest box [start, end) around the True voxels; the whole grid if there are none."""
    if not mask.any():
        return [0, 0, 0], list(mask.shape)
    start, end = [], []
    for ax in range(3):
        other = tuple(a for a in range(3) if a != ax)
        hit = np.flatnonzero(mask.any(axis=other))
        start.append(int(hit[0]))
        end.append(int(hit[-1]) + 1)
    return start, end


def preprocess_case(case: Case, settings: PrepareSettings) -> dict:
    """Run the preprocessing of one case in memory.

    Returns ``{"image": [C, X, Y, Z] float array, "label": [X, Y, Z] uint8 or None, "geometry": dict}``.
    """
    import torch
    from monai.data import MetaTensor
    from monai.transforms import NormalizeIntensity, Orientation, ScaleIntensityRange, Spacing

    from medmim.data.datasets import read_case_label

    image, affine = _load_channels(case)
    orig_shape = list(image.shape[1:])
    img = MetaTensor(torch.from_numpy(image), affine=torch.as_tensor(affine, dtype=torch.float64))
    orient = Orientation(axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S")))
    img = orient(img)
    img = Spacing(pixdim=settings.spacing, mode="bilinear", padding_mode="border")(img)
    label = None
    if case.label is not None:
        # case.label_map applied: a BraTS dataset in another numbering (the Decathlon's) is cached as 0/1/2/4
        lab = read_case_label(case).array
        if lab.shape != tuple(orig_shape):
            raise MedmimError(f"{case.label}: label shape {lab.shape} differs from its image's {tuple(orig_shape)}")
        lab_t = MetaTensor(torch.from_numpy(np.asarray(lab, dtype=np.float32)[None]),
                           affine=torch.as_tensor(affine, dtype=torch.float64))
        lab_t = orient(lab_t)
        # resample the label onto exactly the image's output grid
        lab_t = Spacing(pixdim=settings.spacing, mode="nearest", padding_mode="zeros")(
            lab_t, output_spatial_shape=img.shape[1:])
        label = lab_t
    if settings.modality == "ct":
        lo, hi = settings.hu_window
        img = ScaleIntensityRange(a_min=lo, a_max=hi, b_min=0.0, b_max=1.0, clip=True)(img)
        body = (img[0] > 0).numpy()  # above the window's floor: the patient, not the air
    else:
        body = (img != 0).any(0).numpy()
        img = NormalizeIntensity(nonzero=True, channel_wise=True)(img)
    resampled_affine = np.asarray(img.affine, dtype=np.float64)
    resampled_shape = list(img.shape[1:])
    start, end = _crop_box(body)
    sl = tuple(slice(s, e) for s, e in zip(start, end))
    out_img = np.ascontiguousarray(img.numpy()[(slice(None),) + sl]).astype(settings.dtype)
    out_lab = None
    if label is not None:
        out_lab = np.ascontiguousarray(np.rint(label.numpy()[0][sl])).astype(np.uint8)
    cache_affine = resampled_affine.copy()
    cache_affine[:3, 3] = resampled_affine[:3, :3] @ np.asarray(start, dtype=np.float64) + resampled_affine[:3, 3]
    geometry = {
        "original_shape": orig_shape,
        "original_affine": np.asarray(affine).tolist(),
        "resampled_shape": resampled_shape,
        "resampled_affine": resampled_affine.tolist(),
        "crop_start": start,
        "crop_end": end,
        "cache_shape": list(out_img.shape[1:]),
        "cache_affine": cache_affine.tolist(),
        "spacing": list(settings.spacing),
        "channels": int(out_img.shape[0]),
    }
    return {"image": out_img, "label": out_lab, "geometry": geometry}


def _foreground_positions(label: np.ndarray, seed: int) -> dict[str, np.ndarray]:
    """Up to FG_SAMPLES_PER_CLASS voxel positions [N, 3] per class present (class 0 excluded)."""
    rng = np.random.default_rng(seed)
    counts = np.bincount(label.ravel(), minlength=2)
    out = {}
    for c in np.flatnonzero(counts[1:]) + 1:
        idx = np.flatnonzero(label.ravel() == c)
        if idx.size > FG_SAMPLES_PER_CLASS:
            idx = np.sort(rng.choice(idx, FG_SAMPLES_PER_CLASS, replace=False))
        out[f"class_{int(c)}"] = np.stack(np.unravel_index(idx, label.shape), 1).astype(np.int32)
    return out


def _write_case(case_dir: Path, result: dict, case: Case) -> dict:
    """Write a case's arrays into a fresh folder, then swap it in: a crash never leaves half a case."""
    tmp = case_dir.with_name(f".tmp-{case_dir.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    np.save(tmp / "image.npy", result["image"])
    checksums = {"image.npy": array_checksum(result["image"])}
    classes: dict[str, int] = {}
    if result["label"] is not None:
        np.save(tmp / "label.npy", result["label"])
        checksums["label.npy"] = array_checksum(result["label"])
        seed = zlib.crc32(case.case_id.encode())
        np.savez(tmp / "fg.npz", **_foreground_positions(result["label"], seed))
        counts = np.bincount(result["label"].ravel())
        classes = {str(c): int(n) for c, n in enumerate(counts) if n}
    meta = {"case_id": case.case_id, "labeled": result["label"] is not None, "class_voxels": classes,
            "checksums": checksums, **result["geometry"]}
    (tmp / "case.json").write_text(json.dumps(meta, indent=1), encoding="utf-8")
    if case_dir.exists():
        shutil.rmtree(case_dir)
    os.replace(tmp, case_dir)
    return meta


def _prepare_one(case: Case, settings: PrepareSettings, case_dir: Path) -> tuple[str, dict | None, str | None]:
    """Worker entry: (case id, case.json contents or None, error or None). Never raises for bad data."""
    try:
        import torch

        torch.set_num_threads(1)
        result = preprocess_case(case, settings)
        return case.case_id, _write_case(case_dir, result, case), None
    except MedmimError as e:
        return case.case_id, None, str(e)
    except Exception as e:  # a file that breaks a reader in an unforeseen way still fails alone
        return case.case_id, None, f"{type(e).__name__}: {' '.join(str(e).split())[:200]}"


# --- the whole dataset -----------------------------------------------------------------------

def _read_manifest(cache: Path) -> dict:
    p = cache / MANIFEST
    if not p.is_file():
        return {}
    try:
        m = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}  # unreadable manifest: everything is redone
    return m if isinstance(m, dict) else {}


def _write_manifest(cache: Path, manifest: dict) -> None:
    atomic_write_json(cache / MANIFEST, manifest)


def prepare_dataset(source: str | os.PathLike | Dataset, out: str | os.PathLike, settings: PrepareSettings,
                    workers: int = 1, num_folds: int = 5, seed: int = 0, log=None) -> PrepareResult:
    """Preprocess every case of ``source`` into the cache folder ``out``.

    ``workers`` > 1 runs cases in parallel processes. ``log``: callable(str) for progress lines.
    A case that fails is recorded with its error and the others go on.
    """
    t0 = time.perf_counter()
    ds = source if isinstance(source, Dataset) else load_dataset(source)
    cache = Path(out)
    cache.mkdir(parents=True, exist_ok=True)
    (cache / "cases").mkdir(exist_ok=True)
    log = log or (lambda s: None)
    old = _read_manifest(cache)
    same_settings = old.get("settings_hash") == settings.digest()
    old_cases = old.get("cases", {}) if same_settings else {}
    manifest = {
        "version": CACHE_VERSION,
        "settings": settings.to_dict(),
        "settings_hash": settings.digest(),
        "dataset": {"name": ds.name, "root": str(ds.root), "format": ds.format,
                    "labels": {str(k): v for k, v in ds.labels.items()}, "modalities": ds.modalities,
                    "lateral_pairs": [list(p) for p in ds.lateral_pairs]},
        "cases": {},
    }
    result = PrepareResult(cache)
    todo: list[tuple[Case, dict]] = []
    for case in ds.cases:
        prev = old_cases.get(case.case_id, {})
        try:
            fp = source_fingerprint(case, prev.get("sources"))
        except OSError as e:
            result.failed[case.case_id] = f"{e.filename}: {e.strerror}"
            manifest["cases"][case.case_id] = {"status": "failed", "error": result.failed[case.case_id]}
            continue
        label_map = {str(k): v for k, v in case.label_map.items()} if case.label_map else None
        up_to_date = (prev.get("status") == "done" and prev.get("sources") == fp
                      and prev.get("label_map") == label_map  # renumbered labels (BraTS) differ in label.npy
                      and (cache / "cases" / case.case_id / "case.json").is_file())
        if up_to_date:
            result.skipped.append(case.case_id)
            manifest["cases"][case.case_id] = prev
        else:
            todo.append((case, fp))
    if result.skipped:
        log(f"{len(result.skipped)} case(s) already prepared with these settings: skipped")

    def record(case: Case, fp: dict, meta: dict | None, err: str | None, n: int) -> None:
        if err is None:
            result.done.append(case.case_id)
            manifest["cases"][case.case_id] = {"status": "done", "sources": fp, "labeled": case.labeled,
                                               "shape": meta["cache_shape"]}
            if case.label_map:
                manifest["cases"][case.case_id]["label_map"] = {str(k): v for k, v in case.label_map.items()}
            log(f"[{n}/{len(todo)}] {case.case_id}: {meta['original_shape']} -> {meta['cache_shape']}")
        else:
            result.failed[case.case_id] = err
            manifest["cases"][case.case_id] = {"status": "failed", "error": err}
            log(f"[{n}/{len(todo)}] {case.case_id}: FAILED: {err}")
        _write_manifest(cache, manifest)  # progress survives an interruption

    if workers <= 1 or len(todo) <= 1:
        for n, (case, fp) in enumerate(todo, 1):
            _, meta, err = _prepare_one(case, settings, cache / "cases" / case.case_id)
            record(case, fp, meta, err, n)
    else:
        import multiprocessing as mp

        # spawn: forking a process that holds torch's thread pools can deadlock
        with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn")) as pool:
            futures = {pool.submit(_prepare_one, case, settings, cache / "cases" / case.case_id): (case, fp)
                       for case, fp in todo}
            for n, fut in enumerate(as_completed(futures), 1):
                case, fp = futures[fut]
                _, meta, err = fut.result()
                record(case, fp, meta, err, n)
    # folds of the labeled cases travel with the cache
    if len(ds.labeled) >= 2:
        folds = []
        for f in range(min(num_folds, len(ds.labeled))):
            try:
                tr, va = get_split(ds, f, num_folds, seed)
            except MedmimError:
                break
            folds.append({"train": tr, "val": va})
        (cache / "splits_final.json").write_text(json.dumps(folds, indent=1), encoding="utf-8")
    # cases no longer in the dataset leave the cache
    for d in (cache / "cases").iterdir():
        if d.is_dir() and d.name not in manifest["cases"] and not d.name.startswith(".tmp-"):
            shutil.rmtree(d, ignore_errors=True)
    _write_manifest(cache, manifest)
    result.seconds = time.perf_counter() - t0
    return result


def load_geometry(cache: str | os.PathLike, case_id: str) -> dict:
    p = Path(cache) / "cases" / case_id / "case.json"
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise MedmimError(f"{p}: case not in the cache (run `medmim data prepare`)")
    except (OSError, json.JSONDecodeError) as e:
        raise MedmimError(f"{p}: unreadable case geometry ({type(e).__name__})")


def to_original_grid(array: np.ndarray, geometry: dict, mode: str = "nearest") -> np.ndarray:
    """Map an array on a case's cache grid back onto the original image's voxel grid.

    ``array``: ``[X, Y, Z]`` (a label map; ``mode="nearest"``) or ``[C, X, Y, Z]`` (probabilities;
    ``mode="bilinear"``) on the cropped, resampled RAS grid. Returns the same on the original grid
    (``original_shape``, ``original_affine``): the crop is undone (zeros outside), the resampling and
    the reorientation inverted, so ``write_nifti(path, out, original_affine)`` overlays the scan.
    """
    import torch
    from monai.data import MetaTensor
    from monai.transforms import SpatialResample

    squeeze = array.ndim == 3
    arr = array[None] if squeeze else array
    dtype = arr.dtype
    src = MetaTensor(torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32)),
                     affine=torch.tensor(geometry["cache_affine"], dtype=torch.float64))
    out = SpatialResample(mode=mode, padding_mode="zeros", dtype=torch.float64 if mode == "nearest" else torch.float32)(
        src, dst_affine=torch.tensor(geometry["original_affine"], dtype=torch.float64),
        spatial_size=tuple(geometry["original_shape"]))
    res = out.numpy()
    if mode == "nearest":
        res = np.rint(res)
    res = res.astype(dtype if mode == "nearest" else np.float32)
    return res[0] if squeeze else res
