"""Random 3D crops streamed straight from a prepared cache's memory-mapped arrays.

No volume is ever held in RAM whole: a crop reads only the voxels it covers, so many DataLoader
workers on many DDP ranks share the page cache instead of each holding a copy of the dataset.

Sharding: each epoch the cases are shuffled by ``(seed, epoch)``, padded (by wrapping) to a
multiple of ``world_size * num_workers`` and dealt round-robin, so every rank and worker sees a
different part of each epoch. The random numbers of a case depend on ``(seed, epoch, position in
the epoch)`` only, so the crops are the same whatever the number of ranks or workers.

Bad data: a case whose arrays will not open, or whose bytes no longer match the crc32 checksums in
its case.json (checked once per case per process, when first opened), is skipped. The skip is
reported in the ``bad_cases`` field of the next crop yielded (lines ``CASE_FOLDER<TAB>reason``), so
the training loop counts it even when the crops come from DataLoader worker processes.
"""

from __future__ import annotations

import json
import math
import os
import zipfile
from dataclasses import dataclass
from itertools import count
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from medmim.errors import MedmimError


class BadCaseError(MedmimError):
    """A cached case that cannot be used: its arrays do not open or do not match its checksums."""

    def __init__(self, case: "CachedCase", reason: str):
        super().__init__(f"{case.folder}: {reason}")
        self.folder = str(case.folder)
        self.reason = reason


# case folder -> (case.json mtime, None if usable else why not): each case is verified once per process
_VERDICTS: dict[str, tuple[int, str | None]] = {}
_READ_ERRORS = (OSError, ValueError, EOFError, KeyError, TypeError, zipfile.BadZipFile, json.JSONDecodeError)


class ChannelView:
    """Some channels of a memory-mapped ``[C, X, Y, Z]`` array, read lazily: indexing reads only the voxels
    asked for (a crop), then keeps the chosen channels. Has ``shape``, ``dtype``, ``ndim`` and ``__array__``."""

    def __init__(self, array: np.ndarray, channels: Sequence[int]):
        self.array, self.channels = array, list(channels)
        self.shape = (len(self.channels), *array.shape[1:])
        self.dtype, self.ndim = array.dtype, array.ndim

    def __getitem__(self, key):
        key = key if isinstance(key, tuple) else (key,)
        if not key or key[0] is not Ellipsis:
            return np.asarray(self)[key]
        return np.asarray(self.array[key])[self.channels]  # (..., x, y, z): the crop of every channel, then ours

    def __array__(self, dtype=None, copy=None):
        out = np.asarray(self.array[self.channels])
        return out.astype(dtype) if dtype is not None else out


@dataclass
class CachedCase:
    """One prepared case: memory-mapped arrays, opened lazily (cheap to pickle to workers).

    ``channels``: the channels a run uses (indices into the cached image's), None for all."""

    case_id: str
    folder: Path
    channels: tuple[int, ...] | None = None

    def image(self) -> np.ndarray:
        """``[C, X, Y, Z]`` float16/32, memory-mapped (the run's channels: a view of one contiguous run of
        channels, or a :class:`ChannelView` of others)."""
        arr = self._image_file()
        if self.channels is None or list(self.channels) == list(range(arr.shape[0])):
            return arr
        c = list(self.channels)
        if c == list(range(c[0], c[0] + len(c))):
            return arr[c[0]:c[0] + len(c)]  # a slice of a memmap is still a memmap
        return ChannelView(arr, c)  # type: ignore[return-value]

    def _image_file(self) -> np.ndarray:
        return np.load(self.folder / "image.npy", mmap_mode="r")

    def label(self) -> np.ndarray | None:
        """``[X, Y, Z]`` uint8, memory-mapped, or None for an unlabeled case."""
        p = self.folder / "label.npy"
        return np.load(p, mmap_mode="r") if p.is_file() else None

    def foreground(self) -> dict[int, np.ndarray]:
        """class -> ``[N, 3]`` voxel positions of that class (a sample of them)."""
        p = self.folder / "fg.npz"
        if not p.is_file():
            return {}
        with np.load(p) as z:
            return {int(k.split("_")[1]): z[k] for k in z.files}

    def verify(self) -> None:
        """Raise :class:`BadCaseError` unless the arrays open and match case.json's crc32 checksums.

        The arrays are read in full once per process (crc32 runs at memory speed); the verdict is kept
        until case.json changes (a case prepared again is verified again).
        """
        meta = self.folder / "case.json"
        try:
            stamp = meta.stat().st_mtime_ns
        except OSError:
            stamp = -1
        key = str(self.folder)
        if key not in _VERDICTS or _VERDICTS[key][0] != stamp:
            _VERDICTS[key] = (stamp, self._problem())
        why = _VERDICTS[key][1]
        if why is not None:
            raise BadCaseError(self, why)

    def _problem(self) -> str | None:
        from medmim.data.prepare import array_checksum

        try:
            meta = json.loads((self.folder / "case.json").read_text(encoding="utf-8"))
            sums = meta.get("checksums", {}) if isinstance(meta, dict) else None
            if not isinstance(sums, dict):
                return "case.json is not a case description"
            image = self._image_file()  # every channel: the checksum is of the file
            if image.ndim != 4:
                return f"image.npy holds a {image.ndim}D array, expected [C, X, Y, Z]"
            label = self.label()
            arrays = [("image.npy", image)] + ([("label.npy", label)] if label is not None else [])
            if label is not None and label.shape != image.shape[1:]:
                return f"label.npy shape {label.shape} differs from image.npy's {image.shape[1:]}"
            for name, arr in arrays:
                want = sums.get(name)
                if want is not None and array_checksum(arr) != want:
                    return f"{name} does not match its checksum in case.json (the file changed or is corrupted)"
            if label is not None:
                self.foreground()
        except FileNotFoundError as e:
            return f"{Path(e.filename or '?').name} is missing"
        except _READ_ERRORS as e:
            return f"unreadable ({type(e).__name__}: {' '.join(str(e).split())[:120]})"
        return None


@dataclass
class Cache:
    """A prepared cache folder: its manifest, cases and folds."""

    root: Path
    manifest: dict

    @property
    def labels(self) -> dict[int, str]:
        return {int(k): v for k, v in self.manifest.get("dataset", {}).get("labels", {}).items()}

    @property
    def lateral_pairs(self) -> list[tuple[int, int]]:
        return [tuple(p) for p in self.manifest.get("dataset", {}).get("lateral_pairs", [])]

    def case_ids(self, labeled: bool | None = None) -> list[str]:
        out = []
        for cid, entry in sorted(self.manifest.get("cases", {}).items()):
            if entry.get("status") != "done":
                continue
            if labeled is None or bool(entry.get("labeled")) == labeled:
                out.append(cid)
        return out

    @property
    def channel_names(self) -> list[str]:
        """The names of the cached image's channels, as the dataset declares them (empty: undeclared)."""
        return [str(m) for m in self.manifest.get("dataset", {}).get("modalities", []) or []]

    def case(self, case_id: str, channels: Sequence[int] | None = None) -> CachedCase:
        return CachedCase(case_id, self.root / "cases" / case_id, tuple(channels) if channels is not None else None)

    def split(self, fold: int = 0) -> tuple[list[str], list[str]]:
        p = self.root / "splits_final.json"
        if not p.is_file():
            raise MedmimError(f"{p}: missing; the cache holds fewer than 2 labeled cases to split")
        folds = json.loads(p.read_text(encoding="utf-8"))
        if fold >= len(folds):
            raise MedmimError(f"data.fold={fold} but {p} has {len(folds)} folds")
        return folds[fold]["train"], folds[fold]["val"]


def open_cache(path: str | os.PathLike) -> Cache:
    root = Path(path)
    p = root / "manifest.json"
    if not p.is_file():
        raise MedmimError(f"{root}: not a prepared cache (no manifest.json; run `medmim data prepare`)")
    try:
        manifest = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise MedmimError(f"{p}: unreadable manifest ({type(e).__name__})")
    return Cache(root, manifest)


def label_subset(case_ids: Sequence[str], fraction: float | None = None, count_: int | None = None,
                 seed: int = 0) -> list[str]:
    """A deterministic subset of the labeled training cases, nested across fractions.

    The cases are put in one seeded order and a prefix is taken, so the 10% subset lies inside the
    25% subset, which lies inside the 50% one. At least one case is kept.
    """
    ids = sorted(case_ids)
    order = [ids[i] for i in np.random.default_rng(seed).permutation(len(ids))]
    if count_ is None:
        if fraction is None or not 0 < fraction <= 1:
            raise MedmimError(f"data.label_fraction must be in (0, 1], got {fraction}")
        count_ = max(1, math.ceil(round(fraction * len(ids), 6)))
    if not 1 <= count_ <= len(ids):
        raise MedmimError(f"label count must be in 1..{len(ids)}, got {count_}")
    return sorted(order[:count_])


def plain_tensor(x) -> torch.Tensor:
    """A MONAI MetaTensor as a plain tensor: collates faster and carries no per-crop metadata."""
    return x.as_tensor() if hasattr(x, "as_tensor") else torch.as_tensor(x)


def read_crop(arr: np.ndarray, start: Sequence[int], size: Sequence[int], pad_value: float = 0.0) -> np.ndarray:
    """Read ``arr[..., start:start+size]`` over the last 3 axes, padding where it leaves the volume.

    ``arr``: ``[..., X, Y, Z]`` (a memmap reads only the covered voxels). Returns ``[..., *size]``.
    """
    shape = arr.shape[-3:]
    lead = arr.shape[:-3]
    src, dst = [], []
    for s, n, dim in zip(start, size, shape):
        a, b = max(s, 0), min(s + n, dim)
        if b <= a:  # the crop misses the volume on this axis
            return np.full(lead + tuple(size), pad_value, dtype=arr.dtype)
        src.append(slice(a, b))
        dst.append(slice(a - s, b - s))
    if all(d.start == 0 and d.stop == n for d, n in zip(dst, size)):
        return np.array(arr[(...,) + tuple(src)])
    out = np.full(lead + tuple(size), pad_value, dtype=arr.dtype)
    out[(...,) + tuple(dst)] = arr[(...,) + tuple(src)]
    return out


def _start_around(centre: Sequence[int], size: Sequence[int], shape: Sequence[int]) -> list[int]:
    """Crop start so the crop holds ``centre``, shifted inside the volume where the volume is big enough."""
    out = []
    for c, n, dim in zip(centre, size, shape):
        s = int(c) - n // 2
        s = min(max(s, 0), dim - n) if dim >= n else (dim - n) // 2  # small volume: centre it, pad both sides
        out.append(s)
    return out


def _random_start(rng: np.random.Generator, size: Sequence[int], shape: Sequence[int]) -> list[int]:
    return [int(rng.integers(0, dim - n + 1)) if dim >= n else (dim - n) // 2 for n, dim in zip(size, shape)]


def shard_positions(n_items: int, shard: int, n_shards: int) -> list[int]:
    """Positions in an epoch's order dealt to ``shard`` of ``n_shards``.

    The epoch is padded by wrapping to a multiple of ``n_shards`` so every shard gets as many items
    (DDP ranks must run the same number of steps).
    """
    total = math.ceil(max(n_items, 1) / n_shards) * n_shards
    return list(range(shard, total, n_shards))


def epoch_order(n_items: int, epoch: int, seed: int, shuffle: bool = True) -> np.ndarray:
    if not shuffle:
        return np.arange(n_items)
    return np.random.default_rng([seed, epoch]).permutation(n_items)


def _dist_info() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class CropSampler(IterableDataset):
    """Random crops of ``roi_size`` from cached cases, ``crops_per_volume`` per volume read.

    Yields dicts: ``image`` ``[C, *roi_size]`` float32, ``label`` ``[1, *roi_size]`` uint8 (labeled
    cases), ``case_id``. Labeled cases give foreground-centred crops with probability
    ``pos_fraction`` (class chosen uniformly among those present, so small organs are seen as often
    as large ones) and uniformly random crops otherwise.

    ``epochs=None`` streams forever (training by steps); ``transform`` is applied to each crop dict.
    Every crop also carries ``bad_cases``: the cases skipped since the previous crop (see the module
    docstring), usually ``""``. ``verify``: check each case's checksums once per process.
    """

    def __init__(self, cases: Sequence[CachedCase], roi_size: Sequence[int], crops_per_volume: int = 4,
                 pos_fraction: float = 0.5, seed: int = 0, epochs: int | None = None, start_epoch: int = 0,
                 shuffle: bool = True, rank: int | None = None, world_size: int | None = None,
                 transform: Callable[[dict], dict] | None = None, pad_value: float = 0.0, use_labels: bool = True,
                 verify: bool = True):
        if not cases:
            raise MedmimError("no cases to sample crops from (is the cache or the split empty?)")
        self.cases = list(cases)
        self.roi_size = tuple(int(s) for s in roi_size)
        self.crops_per_volume = int(crops_per_volume)
        self.pos_fraction = float(pos_fraction)
        self.seed = int(seed)
        self.epochs = epochs
        self.start_epoch = int(start_epoch)
        self.shuffle = shuffle
        self._rank, self._world = rank, world_size
        self.transform = transform
        self.pad_value = pad_value
        self.use_labels = use_labels
        self.verify = verify

    def shard(self) -> tuple[int, int]:
        """(this shard's id, number of shards) over DDP ranks x DataLoader workers."""
        rank, world = _dist_info()
        rank = self._rank if self._rank is not None else rank
        world = self._world if self._world is not None else world
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        return rank * nw + wid, world * nw

    def open(self, case: CachedCase) -> tuple[np.ndarray, np.ndarray | None, dict]:
        """(image, label or None, foreground positions) of a case; :class:`BadCaseError` if unusable."""
        if self.verify:
            case.verify()
        try:
            image = case.image()
            label = case.label() if self.use_labels else None
            fg = case.foreground() if label is not None else {}
        except _READ_ERRORS as e:
            raise BadCaseError(case, f"unreadable ({type(e).__name__}: {' '.join(str(e).split())[:120]})")
        return image, label, fg

    def crops_of(self, case: CachedCase, rng: np.random.Generator, opened=None) -> Iterator[dict]:
        image, label, fg = opened if opened is not None else self.open(case)
        shape = image.shape[1:]
        classes = sorted(fg)
        if self.transform is not None and hasattr(self.transform, "set_random_state"):
            # MONAI transforms carry their own RNG: seed it from this case's stream, so augmentations
            # differ across workers yet repeat exactly for the same seed
            self.transform.set_random_state(seed=int(rng.integers(2**31 - 1)))
        for _ in range(self.crops_per_volume):
            if classes and rng.random() < self.pos_fraction:
                pts = fg[classes[int(rng.integers(len(classes)))]]
                start = _start_around(pts[int(rng.integers(len(pts)))], self.roi_size, shape)
            else:
                start = _random_start(rng, self.roi_size, shape)
            # torch converts the cached float16 4-6x faster than numpy; labels stay uint8 (1 byte a voxel
            # through the DataLoader's shared memory instead of 8) and become int64 on the training device
            item = {"image": torch.from_numpy(read_crop(image, start, self.roi_size, self.pad_value)).float(),
                    "case_id": case.case_id}
            if label is not None:
                item["label"] = torch.from_numpy(read_crop(label, start, self.roi_size, 0)[None])
            if self.transform is not None:
                item = {k: plain_tensor(v) if isinstance(v, torch.Tensor) else v for k, v in self.transform(item).items()}
            yield item

    def stream(self, epoch: int, pos: int) -> np.random.Generator:
        """The random stream of the crops at position ``pos`` of ``epoch``'s order (the same on every run,
        rank and worker): with ``shuffle=False`` and one epoch, ``crops_of(cases[pos], stream(start_epoch, pos))``
        gives exactly the crops iteration yields for that case."""
        return np.random.default_rng([self.seed, epoch, pos])

    def __iter__(self) -> Iterator[dict]:
        shard, n_shards = self.shard()
        epochs = count(self.start_epoch) if self.epochs is None else range(self.start_epoch, self.start_epoch + self.epochs)
        n = len(self.cases)
        skipped: list[str] = []
        for epoch in epochs:
            order = epoch_order(n, epoch, self.seed, self.shuffle)
            any_crop = False
            for pos in shard_positions(n, shard, n_shards):
                case = self.cases[int(order[pos % n])]
                rng = self.stream(epoch, pos)
                try:
                    opened = self.open(case)
                except BadCaseError as e:
                    skipped.append(f"{e.folder}\t{e.reason}")
                    continue
                for item in self.crops_of(case, rng, opened):
                    item["bad_cases"] = "\n".join(dict.fromkeys(skipped))
                    skipped = []
                    any_crop = True
                    yield item
            if not any_crop and self.epochs is None:
                return  # every case of this shard is unusable: end the stream rather than spin

    def crops_per_epoch(self, n_shards: int = 1) -> int:
        """Crops one shard yields per epoch when the work is dealt to ``n_shards``."""
        return len(shard_positions(len(self.cases), 0, n_shards)) * self.crops_per_volume
