"""`medmim data check`: find every problem in a dataset before anyone trains on it.

Each problem names the file. Volumes are read one at a time, so memory stays that of one case.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medmim.data.datasets import Case, Dataset, load_dataset
from medmim.data.io import Image, read_image
from medmim.errors import MedmimError

# label and image grids must agree to this many mm (world position of the voxel grid)
AFFINE_TOL_MM = 1e-3


@dataclass
class Problem:
    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


@dataclass
class CheckReport:
    root: str
    format: str = ""
    problems: list[Problem] = field(default_factory=list)
    n_labeled: int = 0
    n_unlabeled: int = 0
    shapes: list[tuple[int, ...]] = field(default_factory=list)
    spacings: list[tuple[float, float, float]] = field(default_factory=list)
    label_names: dict[int, str] = field(default_factory=dict)
    label_voxels: dict[int, int] = field(default_factory=dict)  # value -> voxel count over all labels
    label_cases: dict[int, int] = field(default_factory=dict)  # value -> number of cases holding it
    intensity: list[tuple[float, float]] = field(default_factory=list)  # per image (min, max)
    label_map: dict[int, int] | None = None  # file value -> BraTS value, when the files number BraTS's classes otherwise

    @property
    def ok(self) -> bool:
        return not self.problems

    def add(self, path: object, message: str) -> None:
        self.problems.append(Problem(str(path), message))

    def summary(self) -> str:
        lines = [f"dataset {self.root} ({self.format}): {self.n_labeled} labeled, {self.n_unlabeled} unlabeled cases"]
        if self.shapes:
            shp = np.array([s[:3] for s in self.shapes])
            lines.append(f"  shape (voxels): min {tuple(int(v) for v in shp.min(0))}, max {tuple(int(v) for v in shp.max(0))}")
        if self.spacings:
            sp = np.array(self.spacings)
            fmt = lambda a: "(" + ", ".join(f"{v:.2f}" for v in a) + ")"
            lines.append(f"  spacing (mm): min {fmt(sp.min(0))}, median {fmt(np.median(sp, 0))}, max {fmt(sp.max(0))}")
        if self.intensity:
            lo = min(i[0] for i in self.intensity)
            hi = max(i[1] for i in self.intensity)
            lines.append(f"  intensity range: {lo:g} .. {hi:g}")
        if self.label_map:
            pairs = ", ".join(f"{k} -> {v}" for k, v in sorted(self.label_map.items()))
            lines.append(f"  label files renumbered into BraTS's 0/1/2/4 by their declared names: {pairs}")
        if self.label_voxels:
            total = sum(self.label_voxels.values())
            lines.append("  labels (value name: voxel share, cases holding it):")
            for v in sorted(set(self.label_voxels) | set(self.label_names)):
                name = self.label_names.get(v, "?")
                share = self.label_voxels.get(v, 0) / total
                lines.append(f"    {v:3d} {name:<28s} {share:8.4%}  {self.label_cases.get(v, 0)}/{self.n_labeled}")
        return "\n".join(lines)


def _affine_problem(img: Image) -> str | None:
    a = img.affine[:3, :3]
    norms = np.linalg.norm(a, axis=0)
    if not np.all(np.isfinite(img.affine)):
        return "affine contains NaN or Inf"
    if np.any(norms < 1e-8) or abs(np.linalg.det(a)) < 1e-6 * float(np.prod(np.maximum(norms, 1e-12))):
        return f"singular affine (voxel spacing {tuple(round(float(n), 4) for n in norms)}): the voxel grid has no valid geometry"
    return None


def _spatial_shape(arr: np.ndarray) -> tuple[int, ...]:
    return tuple(arr.shape[:3])


def _check_image(report: CheckReport, path: Path, channels: int, modalities: list[str] | None = None) -> Image | None:
    """Read and check one image file: ``channels`` > 1 means it must hold them all (a 4D ``[X, Y, Z, C]`` file,
    the Decathlon's multi-sequence layout)."""
    try:
        img = read_image(path)
    except MedmimError as e:
        report.add(path, str(e).removeprefix(f"{path}: "))
        return None
    arr = img.array
    if arr.ndim == 4 and arr.shape[3] == 1:
        arr = img.array = arr[..., 0]
    if arr.ndim < 3:
        report.add(path, f"image is {arr.ndim}D (shape {arr.shape}); medmim needs 3D volumes")
        return None
    declared = f"{channels} ({', '.join(modalities)})" if modalities else f"{channels}"
    if arr.ndim > 4 or (arr.ndim == 4 and arr.shape[3] != channels):
        what = f"{arr.shape[3]} channels but the dataset declares {declared}" if arr.ndim == 4 else f"{arr.ndim}D"
        if arr.ndim == 4 and arr.shape[3] < channels:
            what += ": a missing sequence"
        report.add(path, f"image is {arr.ndim}D (shape {arr.shape}): {what}")
        return None
    if arr.ndim == 3 and channels > 1:
        report.add(path, f"image is 3D (shape {arr.shape}), one channel, but the dataset declares {declared} "
                         f"in one file: missing sequences")
        return None
    if not (np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_):
        report.add(path, f"voxels are not numbers (dtype {arr.dtype})")
        return None
    if np.issubdtype(arr.dtype, np.complexfloating):
        report.add(path, f"voxels are complex numbers (dtype {arr.dtype})")
        return None
    if np.issubdtype(arr.dtype, np.floating):
        bad = int(np.count_nonzero(~np.isfinite(arr)))
        if bad:
            report.add(path, f"{bad} voxels are NaN or Inf")
            return None
    msg = _affine_problem(img)
    if msg:
        report.add(path, msg)
        return None
    if arr.size:
        report.intensity.append((float(arr.min()), float(arr.max())))
    return img


def _check_label(report: CheckReport, case: Case, ref: Image | None, declared: dict[int, str],
                 declared_by: str = "dataset.json labels") -> None:
    """Check a label file against its image's grid and the values ``declared`` for the files (before any
    renumbering into BraTS's values); count its voxels per value in the dataset's numbering."""
    path = case.label
    try:
        lab = read_image(path)
    except MedmimError as e:
        report.add(path, str(e).removeprefix(f"{path}: "))
        return
    arr = lab.array
    if arr.ndim == 4 and arr.shape[3] == 1:
        arr = arr[..., 0]
    if arr.ndim != 3:
        report.add(path, f"label is {arr.ndim}D (shape {arr.shape}); expected a 3D label map")
        return
    msg = _affine_problem(lab)
    if msg:
        report.add(path, msg)
        return
    if ref is not None:
        if _spatial_shape(arr) != _spatial_shape(ref.array):
            report.add(path, f"label shape {arr.shape} differs from its image's {_spatial_shape(ref.array)}")
            return
        diff = float(np.abs(lab.affine - ref.affine).max())
        if diff > AFFINE_TOL_MM:
            report.add(path, f"label affine differs from its image's by up to {diff:.4g} mm: label and image do not overlap voxel for voxel")
            return
    if not (np.issubdtype(arr.dtype, np.integer) or arr.dtype == np.bool_):
        if not np.issubdtype(arr.dtype, np.floating):
            report.add(path, f"label voxels are not numbers (dtype {arr.dtype})")
            return
        finite = np.isfinite(arr)
        if not finite.all():
            report.add(path, f"label has {int((~finite).sum())} NaN or Inf voxels")
            return
        frac = arr != np.round(arr)
        if frac.any():
            report.add(path, f"label has non-integer values (e.g. {float(arr[frac].flat[0]):g}); a label map holds class ids")
            return
    if arr.size and arr.min() < 0:
        report.add(path, f"label has negative values (min {arr.min():g})")
        return
    if arr.size and arr.max() > 255:
        report.add(path, f"label value {arr.max():g} exceeds 255")
        return
    counts = np.bincount(arr.astype(np.int64, copy=False).ravel(), minlength=1)
    present = {int(v) for v in np.flatnonzero(counts)}
    if declared:
        undeclared = sorted(present - set(declared))
        if undeclared:
            report.add(path, f"label values {undeclared} are not declared in {declared_by} {sorted(declared)}")
            return
    for v in present:
        shown = case.label_map.get(v, v) if case.label_map else v  # the summary names BraTS's values
        report.label_voxels[shown] = report.label_voxels.get(shown, 0) + int(counts[v])
        report.label_cases[shown] = report.label_cases.get(shown, 0) + 1


def check_dataset(path: str | os.PathLike, progress=None) -> CheckReport:
    """Validate a dataset folder (Decathlon, nnU-Net, BraTS), its ``dataset.json``, a datalist, or a plain folder of images.

    Never raises for bad data: every problem lands in the report with the file it concerns.
    ``progress``: optional callable(case_id, index, total).
    """
    report = CheckReport(root=str(path))
    try:
        ds: Dataset = load_dataset(path)
    except MedmimError as e:
        report.problems.append(Problem(*_split_msg(str(e), str(path))))
        return report
    report.format = ds.format
    report.n_labeled, report.n_unlabeled = len(ds.labeled), len(ds.unlabeled)
    report.label_names = dict(ds.labels)
    report.label_map = ds.label_map
    # the values the label files may hold: as declared, before any renumbering into BraTS's
    file_labels = ds.source_labels if ds.source_labels is not None else ds.labels
    if ds.format != "folder" and ds.labeled and not ds.labels:
        report.add(ds.descriptor, "declares no 'labels' although it lists labeled cases")
    if file_labels and 0 not in file_labels:
        report.add(ds.descriptor, "'labels' must declare 0 (background)")
    for a, b in ds.lateral_pairs:
        for v in (a, b):
            if ds.labels and v not in ds.labels:
                report.add(ds.descriptor, f"lateral pair ({a}, {b}) names undeclared label {v}")
    channels = ds.channels
    cases = ds.cases
    if not cases:
        report.add(ds.descriptor or ds.root, "no case to train on: it lists no labeled and no unlabeled image")
    for n, case in enumerate(cases):
        if progress:
            progress(case.case_id, n, len(cases))
        ref = None
        one_file = len(case.images) == 1
        for f in case.images:
            img = _check_image(report, f, channels if one_file else 1, ds.modalities if one_file else None)
            if img is None:
                continue
            if ref is None:
                ref = img
                report.shapes.append(_spatial_shape(img.array))
                report.spacings.append(img.spacing)
            elif _spatial_shape(img.array) != _spatial_shape(ref.array):
                report.add(f, f"channel grid differs from {case.images[0].name} (shape or affine): "
                              f"shape {_spatial_shape(img.array)} vs {_spatial_shape(ref.array)}")
            elif (diff := float(np.abs(img.affine - ref.affine).max())) > AFFINE_TOL_MM:
                report.add(f, f"channel grid differs from {case.images[0].name} (shape or affine): "
                              f"affine differs by up to {diff:.4g} mm")
        if not one_file and len(case.images) != channels and ds.modalities:
            report.add(case.images[0], f"case '{case.case_id}' has {len(case.images)} channel files, dataset declares {channels}")
        if case.label is not None:
            _check_label(report, case, ref, file_labels,
                         "the BraTS labels" if ds.format == "brats" else
                         f"{ds.descriptor.name if ds.descriptor else 'the dataset'} labels")
        del ref
    return report


def _split_msg(msg: str, default_path: str) -> tuple[str, str]:
    head, sep, tail = msg.partition(": ")
    if sep and ("/" in head or "." in head or head == default_path):
        return head, tail
    return default_path, msg
