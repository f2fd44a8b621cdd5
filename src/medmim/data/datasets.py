"""Dataset formats: Medical Segmentation Decathlon, nnU-Net v2 raw, plain folders, JSON datalists.

Every format is read into one :class:`Dataset`: labeled cases (image channels + label) and
unlabeled cases (images only, used for pretraining), the label names, the modalities, and pairs
of lateralised labels (e.g. right/left kidney) that swap when the patient is mirrored.

Datasets whose labels name BraTS's three tumour classes under other values (the Decathlon's
``Task01_BrainTumour``: 1 oedema, 2 non-enhancing tumour, 3 enhancing tumour) are read into BraTS
numbering (0/1/2/4, :data:`medmim.data.regions.BRATS_LABEL_NAMES`): ``Dataset.labels`` holds BraTS's
values and each case carries ``label_map`` (file value -> BraTS value), applied wherever a label file
is read (:func:`read_case_label`, :func:`apply_label_map`), so that training, prediction and evaluation
all see BraTS values.

Splits are deterministic from a seed and written beside the data as ``splits_final.json``
(nnU-Net's format: a list of folds ``[{"train": [ids], "val": [ids]}, ...]``) so that runs
on the same data are comparable.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medmim.data.io import IMAGE_SUFFIXES, NIFTI_SUFFIXES, Image, read_image
from medmim.data.regions import BRATS_LABEL_NAMES
from medmim.errors import MedmimError
from medmim.fileio import atomic_write_json

SPLITS_FILE = "splits_final.json"


@dataclass
class Case:
    """One scan: its image channels (one file each, or one 4D file) and its label, if any.

    ``label_map``: label file value -> dataset value, when the file numbers its classes otherwise than
    ``Dataset.labels`` (a BraTS dataset in the Decathlon's numbering); None: the file's values are used as
    they are. Read labels through :func:`read_case_label`, which applies it.
    """

    case_id: str
    images: list[Path]
    label: Path | None = None
    label_map: dict[int, int] | None = None

    @property
    def labeled(self) -> bool:
        return self.label is not None


@dataclass
class Dataset:
    """A dataset in any supported format, reduced to what medmim needs."""

    root: Path
    format: str  # "msd", "nnunet", "brats", "folder", "datalist"
    name: str = ""
    labeled: list[Case] = field(default_factory=list)
    unlabeled: list[Case] = field(default_factory=list)
    labels: dict[int, str] = field(default_factory=dict)  # value -> name, 0 = background
    modalities: list[str] = field(default_factory=list)  # one per channel, e.g. ["CT"]
    lateral_pairs: list[tuple[int, int]] = field(default_factory=list)
    fixed_val: list[str] | None = None  # a datalist's own validation cases, if it names them
    descriptor: Path | None = None  # dataset.json or the datalist file
    # set when the files number BraTS's classes otherwise: file value -> BraTS value (also on every case),
    # and the labels as the descriptor declares them (``labels`` then holds BraTS's)
    label_map: dict[int, int] | None = None
    source_labels: dict[int, str] | None = None

    @property
    def channels(self) -> int:
        return max(1, len(self.modalities))

    @property
    def cases(self) -> list[Case]:
        return self.labeled + self.unlabeled

    def case(self, case_id: str) -> Case:
        for c in self.cases:
            if c.case_id == case_id:
                return c
        raise KeyError(case_id)


# --- helpers ---------------------------------------------------------------------------------

def _strip_suffix(name: str) -> str:
    for suf in sorted(IMAGE_SUFFIXES + (".dcm",), key=len, reverse=True):
        if name.lower().endswith(suf):
            return name[: -len(suf)]
    return name


def _read_json(path: Path) -> object:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise MedmimError(f"{path}: cannot read ({e.strerror or e.__class__.__name__})")
    except UnicodeDecodeError:
        raise MedmimError(f"{path}: not a text file, expected JSON")
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise MedmimError(f"{path}: invalid JSON (line {e.lineno}, column {e.colno}: {e.msg})")
    except RecursionError:
        raise MedmimError(f"{path}: invalid JSON (nested too deeply)")


def _resolve(base: Path, rel: object, where: Path, what: str) -> Path:
    if not isinstance(rel, str) or not rel.strip():
        raise MedmimError(f"{where}: {what} must be a file path string, got {rel!r}"[:300])
    p = Path(rel)
    return p if p.is_absolute() else (base / p)


def _parse_labels_msd(raw: object, where: Path) -> dict[int, str]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise MedmimError(f"{where}: 'labels' must map label values to names, got {type(raw).__name__}")
    out: dict[int, str] = {}
    for k, v in raw.items():
        # MSD: {"0": "background"}; nnU-Net v2: {"background": 0}; accept both
        if isinstance(v, (int,)) and not isinstance(v, bool):
            key, name = v, k
        elif isinstance(v, list) and v and all(isinstance(x, int) and not isinstance(x, bool) for x in v):
            classes = _classes_from_brats_regions(raw)
            if classes is not None:
                return classes
            raise MedmimError(f"{where}: label '{k}' is a region (a list of values); medmim needs one value per label")
        else:
            try:
                key = int(k)
            except (TypeError, ValueError):
                raise MedmimError(f"{where}: label key '{k}' is not an integer value")
            if not isinstance(v, str):
                raise MedmimError(f"{where}: label {k} name must be a string, got {v!r}"[:300])
            name = v
        if key < 0 or key > 255:
            raise MedmimError(f"{where}: label value {key} out of range 0..255")
        if key in out:
            raise MedmimError(f"{where}: label value {key} declared twice")
        out[key] = str(name)
    return out


def _classes_from_brats_regions(raw: dict) -> dict[int, str] | None:
    """nnU-Net's region-declared BraTS labels (``{"background": 0, "whole tumor": [1, 2, 3], "tumor core": [2, 3],
    "enhancing tumor": [3]}``) -> one name per file value (here ``{1: oedema, 2: necrotic core, 3: enhancing}``),
    or None when they are not BraTS's three nested regions, each one value larger than the next."""
    sets: dict[str, set[int]] = {}
    for k, v in raw.items():
        vals = [v] if isinstance(v, int) and not isinstance(v, bool) else v
        if not (isinstance(vals, list) and vals and all(isinstance(x, int) and not isinstance(x, bool) for x in vals)):
            return None
        if vals == [0]:
            continue
        n = str(k).strip().lower()
        region = ("WT" if re.search(r"whole|\bwt\b", n) else "TC" if re.search(r"core|\btc\b", n)
                  else "ET" if re.search(r"enhanc|\bet\b", n) else None)
        if region is None or region in sets or any(x < 1 or x > 255 for x in vals):
            return None
        sets[region] = set(vals)
    if set(sets) != {"WT", "TC", "ET"}:
        return None
    wt, tc, et = sets["WT"], sets["TC"], sets["ET"]
    if not (et < tc < wt and len(et) == len(tc - et) == len(wt - tc) == 1):
        return None
    from medmim.data.regions import BRATS_LABEL_NAMES, ED, ET, NCR

    return {0: BRATS_LABEL_NAMES[0], min(wt - tc): BRATS_LABEL_NAMES[ED], min(tc - et): BRATS_LABEL_NAMES[NCR],
            min(et): BRATS_LABEL_NAMES[ET]}


def _parse_modalities(raw: object, where: Path, key: str) -> list[str]:
    if raw is None:
        return []
    if not isinstance(raw, dict) or not raw:
        raise MedmimError(f"{where}: '{key}' must map channel numbers to names (e.g. {{\"0\": \"CT\"}})")
    try:
        items = sorted((int(k), str(v)) for k, v in raw.items())
    except (TypeError, ValueError):
        raise MedmimError(f"{where}: '{key}' keys must be channel numbers 0, 1, ...")
    if [i for i, _ in items] != list(range(len(items))):
        raise MedmimError(f"{where}: '{key}' must number channels 0..{len(items) - 1}")
    return [v for _, v in items]


def _parse_pairs(raw: object, where: Path, labels: dict[int, str]) -> list[tuple[int, int]]:
    if raw is None:
        return _guess_lateral_pairs(labels)
    ok = isinstance(raw, list) and all(
        isinstance(p, list) and len(p) == 2 and all(isinstance(x, int) and not isinstance(x, bool) for x in p)
        for p in raw)
    if not ok:
        raise MedmimError(f"{where}: 'lateral_pairs' must be a list of [right, left] label pairs")
    return [(int(a), int(b)) for a, b in raw]


def _guess_lateral_pairs(labels: dict[int, str]) -> list[tuple[int, int]]:
    """Pairs named "right X"/"left X" (or "X_R"/"X_L" etc.) swap under a left-right mirror."""
    def side(name: str) -> tuple[str, str] | None:
        n = name.lower().replace("_", " ").strip()
        for pat, s in ((r"^(right|r)\s+(.+)$", "R"), (r"^(left|l)\s+(.+)$", "L")):
            m = re.match(pat, n)
            if m:
                return s, m.group(2)
        for pat, s in ((r"^(.+)\s+(right|r)$", "R"), (r"^(.+)\s+(left|l)$", "L")):
            m = re.match(pat, n)
            if m:
                return s, m.group(1)
        return None

    rights, lefts = {}, {}
    for v, name in labels.items():
        got = side(name)
        if got:
            (rights if got[0] == "R" else lefts)[got[1]] = v
    return sorted((rights[k], lefts[k]) for k in rights if k in lefts)


# --- formats ---------------------------------------------------------------------------------

def _case_id_from(paths: list[Path]) -> str:
    return _strip_suffix(paths[0].name)


def _entry_images(entry: object, base: Path, where: Path, what: str) -> list[Path]:
    if isinstance(entry, list):
        if not entry:
            raise MedmimError(f"{where}: {what} has an empty image list")
        return [_resolve(base, e, where, what) for e in entry]
    return [_resolve(base, entry, where, what)]


def _read_msd(desc: Path, data: dict) -> Dataset:
    base = desc.parent
    labels = _parse_labels_msd(data.get("labels"), desc)
    modalities = _parse_modalities(data.get("modality"), desc, "modality")
    training = data.get("training", [])
    if not isinstance(training, list):
        raise MedmimError(f"{desc}: 'training' must be a list of {{\"image\": ..., \"label\": ...}} entries")
    ds = Dataset(root=base, format="msd", name=str(data.get("name", base.name)), labels=labels,
                 modalities=modalities, descriptor=desc)
    ds.lateral_pairs = _parse_pairs(data.get("lateral_pairs"), desc, labels)
    seen: set[str] = set()
    for n, entry in enumerate(training):
        if not isinstance(entry, dict) or "image" not in entry:
            raise MedmimError(f"{desc}: training entry {n} must be an object with an 'image' key")
        images = _entry_images(entry["image"], base, desc, f"training entry {n} 'image'")
        label = _resolve(base, entry["label"], desc, f"training entry {n} 'label'") if entry.get("label") is not None else None
        cid = _case_id_from(images)
        if cid in seen:
            raise MedmimError(f"{desc}: case '{cid}' listed twice")
        seen.add(cid)
        (ds.labeled if label is not None else ds.unlabeled).append(Case(cid, images, label))
    test = data.get("test", [])
    if not isinstance(test, list):
        raise MedmimError(f"{desc}: 'test' must be a list of image paths")
    for n, entry in enumerate(test):
        raw = entry.get("image") if isinstance(entry, dict) else entry
        images = _entry_images(raw, base, desc, f"test entry {n}")
        cid = _case_id_from(images)
        if cid in seen:
            raise MedmimError(f"{desc}: case '{cid}' listed twice")
        seen.add(cid)
        ds.unlabeled.append(Case(cid, images, None))
    return ds


def _read_nnunet(desc: Path, data: dict) -> Dataset:
    base = desc.parent
    labels = _parse_labels_msd(data.get("labels"), desc)
    modalities = _parse_modalities(data.get("channel_names"), desc, "channel_names")
    ending = data.get("file_ending", ".nii.gz")
    if not isinstance(ending, str) or not ending.startswith("."):
        raise MedmimError(f"{desc}: 'file_ending' must be a suffix such as \".nii.gz\", got {ending!r}")
    ds = Dataset(root=base, format="nnunet", name=str(data.get("name", base.name)), labels=labels,
                 modalities=modalities, descriptor=desc)
    ds.lateral_pairs = _parse_pairs(data.get("lateral_pairs"), desc, labels)
    nch = len(modalities)
    for folder, labeled in (("imagesTr", True), ("imagesTs", False)):
        d = base / folder
        if not d.is_dir():
            if labeled:
                raise MedmimError(f"{d}: missing (an nnU-Net raw dataset has imagesTr/ and labelsTr/)")
            continue
        groups: dict[str, dict[int, Path]] = {}
        for f in sorted(d.iterdir()):
            if not f.name.endswith(ending) or f.name.startswith("."):  # "._X" files: macOS metadata, not images
                continue
            m = re.match(r"^(.+)_(\d{4})$", f.name[: -len(ending)])
            if not m:
                raise MedmimError(f"{f}: nnU-Net image names end in _XXXX{ending} (the channel number)")
            groups.setdefault(m.group(1), {})[int(m.group(2))] = f
        for cid, chans in groups.items():
            if sorted(chans) != list(range(nch)):
                missing = sorted(set(range(nch)) - set(chans))
                extra = sorted(set(chans) - set(range(nch)))
                # name the file that should be there (a missing sequence), else the one that should not
                where = d / f"{cid}_{missing[0]:04d}{ending}" if missing else chans[extra[0]]
                what = (f"missing channel {missing[0]} ({modalities[missing[0]]})" if missing
                        else f"channel {extra[0]} not declared in channel_names")
                raise MedmimError(f"{where}: {what}: case '{cid}' has channels {sorted(chans)}, "
                                  f"expected 0..{nch - 1} ({', '.join(modalities)})")
            images = [chans[i] for i in range(nch)]
            label = base / "labelsTr" / f"{cid}{ending}" if labeled else None
            (ds.labeled if labeled else ds.unlabeled).append(Case(cid, images, label))
    n_declared = data.get("numTraining")
    if isinstance(n_declared, int) and n_declared != len(ds.labeled):
        raise MedmimError(f"{desc}: numTraining is {n_declared} but imagesTr/ holds {len(ds.labeled)} cases")
    return ds


def _read_datalist(path: Path, data: dict) -> Dataset:
    """A JSON datalist as used for BTCV: {"training": [{"image", "label"}], "validation": [...]} ."""
    base = path.parent
    ds = Dataset(root=base, format="datalist", name=path.stem, descriptor=path,
                 labels=_parse_labels_msd(data.get("labels"), path),
                 modalities=_parse_modalities(data.get("modality"), path, "modality"))
    ds.lateral_pairs = _parse_pairs(data.get("lateral_pairs"), path, ds.labels)
    seen: set[str] = set()
    val_ids: list[str] = []
    for key in ("training", "validation", "test", "unlabeled"):
        items = data.get(key, [])
        if not isinstance(items, list):
            raise MedmimError(f"{path}: '{key}' must be a list")
        for n, entry in enumerate(items):
            raw = entry.get("image") if isinstance(entry, dict) else entry
            images = _entry_images(raw, base, path, f"'{key}' entry {n}")
            label = None
            if isinstance(entry, dict) and entry.get("label") is not None and key != "unlabeled":
                label = _resolve(base, entry["label"], path, f"'{key}' entry {n} 'label'")
            cid = _case_id_from(images)
            if cid in seen:
                raise MedmimError(f"{path}: case '{cid}' listed twice")
            seen.add(cid)
            (ds.labeled if label is not None else ds.unlabeled).append(Case(cid, images, label))
            if key == "validation" and label is not None:
                val_ids.append(cid)
    if val_ids:
        ds.fixed_val = val_ids
    return ds


def _read_folder(folder: Path) -> Dataset:
    """A plain folder of images (and DICOM series subfolders): unlabeled, for pretraining."""
    ds = Dataset(root=folder, format="folder", name=folder.name)
    seen: set[str] = set()
    for f in sorted(folder.iterdir()):
        if f.name.startswith("."):
            continue
        is_img = f.is_file() and f.name.lower().endswith(IMAGE_SUFFIXES)
        # DICOM files come as *.dcm or with no suffix at all (IM0001, 1.2.840...)
        is_dicom_dir = f.is_dir() and any(g.is_file() and (g.suffix.lower() in (".dcm", "") or re.fullmatch(r"[\d.]+", g.name))
                                           for g in f.iterdir())
        if not (is_img or is_dicom_dir):
            continue
        cid = _strip_suffix(f.name)
        if cid in seen:
            raise MedmimError(f"{folder}: two images share the case name '{cid}'")
        seen.add(cid)
        ds.unlabeled.append(Case(cid, [f], None))
    if not ds.unlabeled:
        raise MedmimError(f"{folder}: no images found (expected {', '.join(NIFTI_SUFFIXES)}, .nrrd, .mha or DICOM folders)")
    return ds


# BraTS (2021 and other years): ROOT/<case>/<case>_{t1,t1ce,t2,flair}.nii.gz [+ <case>_seg.nii.gz]
BRATS_SEQUENCES = ("t1", "t1ce", "t2", "flair")  # channel order
BRATS_MODALITIES = ["T1", "T1ce", "T2", "FLAIR"]
BRATS_LABELS = BRATS_LABEL_NAMES
_BRATS_FILE = re.compile(r"^(.+)_(t1|t1ce|t2|flair|seg)(\.nii(?:\.gz)?)$", re.IGNORECASE)


def _subfolders(folder: Path) -> list[Path]:
    return [d for d in sorted(folder.iterdir())
            if d.is_dir() and not d.name.startswith(".") and d.name != "__MACOSX"]


def _is_nifti(f: Path) -> bool:
    return f.is_file() and not f.name.startswith(".") and f.name.lower().endswith(NIFTI_SUFFIXES)


def looks_like_brats(folder: Path) -> bool:
    """Some sub-folder holds a file named like a BraTS sequence (``*_t1.nii.gz``, ``*_flair.nii`` ...)."""
    for d in _subfolders(folder):
        for f in d.iterdir():
            m = _BRATS_FILE.match(f.name)
            if m and m.group(2).lower() != "seg" and f.is_file():
                return True
    return False


def _read_brats(folder: Path) -> Dataset:
    """A BraTS folder: one sub-folder per case, named as its files' prefix (``BraTS2021_00000/
    BraTS2021_00000_t1.nii.gz`` ...). Channels T1, T1ce, T2, FLAIR; a case without ``_seg`` is unlabeled."""
    ds = Dataset(root=folder, format="brats", name=folder.name, labels=dict(BRATS_LABELS),
                 modalities=list(BRATS_MODALITIES))
    for f in sorted(folder.iterdir()):
        if _is_nifti(f):
            raise MedmimError(f"{f}: an image beside BraTS case folders; each BraTS case keeps its files "
                              f"in its own folder (<case>/<case>_t1.nii.gz, ...)")
    for d in _subfolders(folder):
        case = brats_case(d)
        if case is not None:
            (ds.labeled if case.labeled else ds.unlabeled).append(case)
    if not ds.cases:
        raise MedmimError(f"{folder}: no BraTS case folders found (<case>/<case>_t1.nii.gz, _t1ce, _t2, _flair)")
    return ds


def is_brats_case_folder(d: Path) -> bool:
    """``d`` holds a BraTS case's own files (``<d.name>_t1.nii.gz`` ...)."""
    return d.is_dir() and any((m := _BRATS_FILE.match(f.name)) and m.group(1) == d.name and _is_nifti(f)
                              for f in d.iterdir())


def brats_case(d: Path) -> Case | None:
    """The case of one BraTS case folder (T1, T1ce, T2, FLAIR and the ``_seg`` label if there); None if ``d``
    holds no NIfTI at all (notes, a cache beside the data). A missing sequence names the file it expected."""
    entries = [g for g in d.iterdir() if not g.name.startswith(".")]
    if not entries:
        raise MedmimError(f"{d}: empty case folder (expected {d.name}_t1.nii.gz, _t1ce, _t2, _flair)")
    nifti = sorted(g for g in entries if _is_nifti(g))
    if not nifti:
        return None
    found: dict[str, Path] = {}
    others: list[Path] = []
    for g in nifti:
        m = _BRATS_FILE.match(g.name)
        if not m:
            continue
        if m.group(1) != d.name:
            others.append(g)
            continue
        seq = m.group(2).lower()
        if seq in found:
            raise MedmimError(f"{g}: a second {seq} file in case folder '{d.name}' (also {found[seq].name})")
        found[seq] = g
    missing = [s for s in BRATS_SEQUENCES if s not in found]
    if missing and not found and others:
        raise MedmimError(f"{others[0]}: its prefix differs from its case folder's name '{d.name}'; BraTS files "
                          f"are named <case folder>_<sequence>.nii.gz (e.g. {d.name}_t1.nii.gz)")
    if missing:
        ext = _BRATS_FILE.match(next(iter(found.values())).name).group(3) if found else ".nii.gz"
        names = ", ".join(f"{d.name}_{s}{ext}" for s in missing)
        raise MedmimError(f"{d}: case '{d.name}' lacks the {'/'.join(missing)} sequence"
                          f"{'s' if len(missing) > 1 else ''} ({names})")
    images = [found[s] for s in BRATS_SEQUENCES]
    return Case(d.name, images, found.get("seg"))


def _to_brats_numbering(ds: Dataset) -> Dataset:
    """Renumber a dataset whose labels name BraTS's three tumour classes under other values (the Decathlon's
    1 oedema, 2 non-enhancing tumour, 3 enhancing) into BraTS's 0/1/2/4: ``labels`` become BraTS's, the declared
    ones move to ``source_labels`` and every case gets the ``label_map`` (file value -> BraTS value)."""
    # only three foreground classes can be BraTS's; the check spares other datasets importing regions (torch)
    if ds.format == "brats" or len([v for v in ds.labels if v != 0]) != 3:
        return ds
    from medmim.data.regions import BRATS_LABEL_NAMES, brats_values_for

    mapping = brats_values_for(ds.labels)
    if mapping is None or all(k == v for k, v in mapping.items()):
        return ds  # not BraTS's classes, or already in BraTS numbering: the files' values are used as they are
    ds.source_labels = dict(ds.labels)
    ds.labels = dict(BRATS_LABEL_NAMES)
    ds.label_map = dict(mapping)
    ds.lateral_pairs = [(mapping.get(a, a), mapping.get(b, b)) for a, b in ds.lateral_pairs]
    for case in ds.cases:
        case.label_map = dict(mapping)
    return ds


def apply_label_map(array: np.ndarray, label_map: dict[int, int] | None, path: str | os.PathLike) -> np.ndarray:
    """A label map ``[X, Y, Z]`` read from ``path`` -> the dataset's numbering (``label_map``: file value ->
    dataset value; 0 stays 0). None: ``array`` unchanged. Else uint8; a value the map lacks, a negative or a
    non-integer value raises :class:`MedmimError` naming ``path``."""
    if label_map is None:
        return array
    a = np.asarray(array)
    if not (np.issubdtype(a.dtype, np.integer) or a.dtype == np.bool_):
        if not np.issubdtype(a.dtype, np.floating) or not np.all(np.isfinite(a)):
            raise MedmimError(f"{path}: label voxels are not finite numbers (dtype {a.dtype}); cannot renumber them")
        if np.any(a != np.rint(a)):
            raise MedmimError(f"{path}: label has non-integer values; a label map holds class ids")
    vals = a.astype(np.int64)
    known = sorted({0, *label_map})
    if vals.size and (vals.min() < 0 or vals.max() > 255):
        raise MedmimError(f"{path}: label values outside 0..255 (min {vals.min()}, max {vals.max()}); "
                          f"declared are {known}")
    present = np.flatnonzero(np.bincount(vals.ravel(), minlength=1))
    unknown = sorted(set(present.tolist()) - set(known))
    if unknown:
        raise MedmimError(f"{path}: label values {unknown} are not declared in the dataset's labels {known}; "
                          f"cannot renumber them")
    lut = np.zeros(256, np.uint8)
    for src, dst in label_map.items():
        lut[src] = dst
    return lut[vals]


def read_case_label(case: Case) -> Image:
    """A case's label map ``[X, Y, Z]`` and its geometry, values in the dataset's numbering: ``case.label_map``
    applied, so a BraTS dataset in the Decathlon's numbering reads as 0/1/2/4. Raises :class:`MedmimError`
    naming the file."""
    if case.label is None:
        raise MedmimError(f"case '{case.case_id}' has no label")
    img = read_image(case.label)
    if img.array.ndim == 4 and img.array.shape[3] == 1:
        img.array = img.array[..., 0]
    img.array = apply_label_map(img.array, case.label_map, case.label)
    return img


def read_label_values(case: Case) -> np.ndarray:
    """A case's label values ``[X, Y, Z]`` in the dataset's numbering (see :func:`read_case_label`)."""
    return read_case_label(case).array


def load_dataset(path: str | os.PathLike) -> Dataset:
    """Read a dataset from a folder (MSD, nnU-Net v2 raw, BraTS case folders, or plain images) or a JSON file.

    Labels that name BraTS's tumour classes under other values are read into BraTS numbering (see
    :func:`read_case_label`). Raises :class:`MedmimError` naming the file when the path or its ``dataset.json``
    is invalid.
    """
    return _to_brats_numbering(_load_any(Path(path)))


def _load_any(path: Path) -> Dataset:
    path = Path(path)
    if not path.exists():
        raise MedmimError(f"{path}: no such file or folder")
    if path.is_file():
        if path.suffix.lower() != ".json":
            raise MedmimError(f"{path}: a dataset is a folder or a .json file (dataset.json or a datalist)")
        desc = path
    else:
        desc = path / "dataset.json"
        if not desc.is_file():
            if looks_like_brats(path):
                return _read_brats(path)
            return _read_folder(path)
    data = _read_json(desc)
    if not isinstance(data, dict):
        raise MedmimError(f"{desc}: must be a JSON object, got {type(data).__name__}")
    if "channel_names" in data:
        return _read_nnunet(desc, data)
    if "validation" in data and desc.name != "dataset.json":
        return _read_datalist(desc, data)
    if "training" in data or "test" in data:
        if desc.name == "dataset.json":
            return _read_msd(desc, data)
        return _read_datalist(desc, data)
    raise MedmimError(f"{desc}: neither a Decathlon dataset.json ('training', 'labels', 'modality'), an nnU-Net "
                      f"dataset.json ('channel_names', 'labels', 'file_ending') nor a datalist ('training', 'validation')")


# --- splits ----------------------------------------------------------------------------------

def make_splits(case_ids: list[str], num_folds: int = 5, seed: int = 0) -> list[dict[str, list[str]]]:
    """K folds over the sorted case ids, shuffled by ``seed``: the same ids and seed give the same folds."""
    ids = sorted(case_ids)
    if len(ids) < 2:
        raise MedmimError(f"need at least 2 labeled cases to split into train and validation, got {len(ids)}")
    k = min(num_folds, len(ids))
    order = np.random.default_rng(seed).permutation(len(ids))
    folds = []
    for f in range(k):
        val = sorted(ids[i] for i in order[f::k])
        folds.append({"train": [i for i in ids if i not in set(val)], "val": val})
    return folds


def splits_path(ds: Dataset) -> Path:
    return (ds.descriptor.parent if ds.descriptor else ds.root) / SPLITS_FILE


def get_split(ds: Dataset, fold: int = 0, num_folds: int = 5, seed: int = 0) -> tuple[list[str], list[str]]:
    """(train ids, val ids) of the labeled cases for ``fold``.

    Reads ``splits_final.json`` beside the data if it exists (it must name only known cases), else
    makes the folds from ``seed`` and writes them there. A datalist that names its own validation
    cases keeps that split.
    """
    ids = [c.case_id for c in ds.labeled]
    if ds.fixed_val is not None:
        val = list(ds.fixed_val)
        return [i for i in ids if i not in set(val)], val
    path = splits_path(ds)
    if path.is_file():
        folds = _read_json(path)
        ok = isinstance(folds, list) and all(
            isinstance(f, dict) and isinstance(f.get("train"), list) and isinstance(f.get("val"), list) for f in folds)
        if not ok or not folds:
            raise MedmimError(f"{path}: must be a list of {{\"train\": [...], \"val\": [...]}} folds")
        unknown = sorted({i for f in folds for i in f["train"] + f["val"]} - set(ids))
        if unknown:
            raise MedmimError(f"{path}: names cases not in the dataset ({', '.join(map(str, unknown[:3]))}); "
                              f"delete it to make new splits")
    else:
        folds = make_splits(ids, num_folds, seed)
        try:
            atomic_write_json(path, folds)
        except OSError:
            warnings.warn(f"{path}: cannot write the splits file (read-only data?); splits kept in memory")
    if fold >= len(folds):
        raise MedmimError(f"data.fold={fold} but {path.name} has {len(folds)} folds (0..{len(folds) - 1})")
    return list(folds[fold]["train"]), list(folds[fold]["val"])
