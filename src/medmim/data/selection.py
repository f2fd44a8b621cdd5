"""From ``data.path`` to the cases a run trains and validates on, and the record of what it read.

Each entry of ``data.path`` is a prepared cache (used as it is) or a raw dataset, which is prepared
once into ``data.cache_dir`` (default ``$MEDMIM_CACHE`` or ``~/.cache/medmim``) under a name that
depends on the dataset's location and the preprocessing settings, so later runs reuse it.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medmim.data.prepare import DEFAULT_SPACING, PrepareSettings, prepare_dataset
from medmim.data.sampling import Cache, CachedCase, label_subset, open_cache
from medmim.errors import MedmimError


def default_cache_root() -> Path:
    return Path(os.environ.get("MEDMIM_CACHE", Path.home() / ".cache" / "medmim"))


def cache_folder_for(dataset: Path, settings: PrepareSettings, cache_dir: str | None) -> Path:
    root = Path(cache_dir) if cache_dir else default_cache_root()
    key = hashlib.blake2b(f"{dataset.resolve()}|{settings.digest()}".encode(), digest_size=6).hexdigest()
    return root / f"{dataset.resolve().name}-{key}"


def resolve_caches(data_cfg, log=print, is_main: bool = True, barrier=lambda: None) -> list[Cache]:
    """Open every ``data.path`` as a cache, preparing raw datasets first (on the main process only)."""
    if not data_cfg.path:
        raise MedmimError("data.path is empty: give a dataset or a prepared cache (data.path=DIR)")
    caches = []
    for raw in data_cfg.path:
        p = Path(raw).expanduser()
        if not p.exists():
            raise MedmimError(f"data.path: {p}: no such file or folder")
        if (p / "manifest.json").is_file():
            cache = open_cache(p)
            got = cache.manifest.get("settings", {})
            want = data_cfg.spacing or DEFAULT_SPACING.get(got.get("modality"))
            if got.get("spacing") != list(want or []) or data_cfg.modality not in ("auto", got.get("modality")):
                log(f"note: cache {p} was prepared at spacing {got.get('spacing')} mm, {got.get('modality')}; "
                    f"it is used as it is (data.spacing/data.modality apply to raw datasets)")
        else:
            settings = PrepareSettings.from_config(data_cfg, p)  # each dataset its own intensity preset
            target = cache_folder_for(p, settings, data_cfg.cache_dir)
            if is_main:
                log(f"preparing {p} ({settings.modality.upper()}) into {target}")
                res = prepare_dataset(p, target, settings, workers=data_cfg.prepare_workers,
                                      num_folds=data_cfg.num_folds, log=lambda s: None)
                log(f"  {len(res.done)} prepared, {len(res.skipped)} up to date, {len(res.failed)} failed "
                    f"({res.seconds:.1f} s)")
                for cid, err in sorted(res.failed.items()):
                    log(f"  skipped case {cid}: {err}")
            barrier()
            cache = open_cache(target)
        if not cache.case_ids():
            raise MedmimError(f"data.path: {p}: no usable case (every case failed to prepare?)")
        caches.append(cache)
    return caches


@dataclass
class RunCases:
    train: list[CachedCase]
    val: list[CachedCase]
    labels: dict[int, str]
    lateral_pairs: list[tuple[int, int]]
    channels: int
    channel_names: list[str] | None = None  # the model's input channels by name (None: undeclared)
    channel_index: list[int] | None = None  # the cached channels they are (None: all, in order)


def select_channels(names: list[str], wanted: list | None, where: str) -> list[int] | None:
    """Indices of ``wanted`` (``data.channels``: names, case-insensitive, or indices) among a dataset's
    channel ``names``; None for all of them."""
    if wanted is None:
        return None
    low = [n.lower() for n in names]
    out = []
    for w in wanted:
        if isinstance(w, int) or (isinstance(w, str) and w.isdigit() and w.lower() not in low):
            i = int(w)
            if not 0 <= i < max(len(names), 1):
                raise MedmimError(f"data.channels: channel {i} out of range; {where} has channels {names or ['(one, unnamed)']}")
        elif str(w).lower() in low:
            i = low.index(str(w).lower())
        else:
            raise MedmimError(f"data.channels: no channel named {w!r}; {where} has channels {names or ['(unnamed)']}")
        if i in out:
            raise MedmimError(f"data.channels: channel {w!r} given twice")
        out.append(i)
    return out or None


def _selection(caches: list[Cache], wanted: list | None) -> tuple[list[list[int] | None], list[str] | None]:
    """Per cache the channel indices of ``data.channels``, and the selected channels' names (None if any cache
    leaves them undeclared or the caches disagree)."""
    picks, named = [], []
    for c in caches:
        idx = select_channels(c.channel_names, wanted, str(c.root))
        picks.append(idx)
        names = c.channel_names
        named.append([names[i] for i in idx] if names and idx is not None else (names or None))
    same = all(n is not None and [x.lower() for x in n] == [x.lower() for x in named[0]] for n in named)
    return picks, (named[0] if named and same else None)


def _holdout(ids: list[str], seed: int, fraction: float = 0.1) -> list[str]:
    if len(ids) < 2:
        return []
    k = max(1, int(round(fraction * len(ids))))
    order = np.random.default_rng(seed).permutation(len(ids))
    return sorted(ids[i] for i in order[:k])


def pretrain_cases(caches: list[Cache], fold: int, seed: int, channels: list | None = None) -> RunCases:
    """All cases but the validation ones: a fine-tuning fold's validation cases are never pretrained on.
    ``channels``: ``data.channels``, the channels to use (None: all)."""
    picks, names = _selection(caches, channels)
    train, val = [], []
    for cache, idx in zip(caches, picks):
        labeled = cache.case_ids(labeled=True)
        held = set(cache.split(fold)[1]) if len(labeled) >= 2 else set(_holdout(cache.case_ids(), seed))
        for cid in cache.case_ids():
            (val if cid in held else train).append(cache.case(cid, idx))
    if not train:
        raise MedmimError("no pretraining cases left after holding out the validation cases")
    return RunCases(train, val, caches[0].labels, caches[0].lateral_pairs, _channels(caches, picks), names, picks[0])


def finetune_cases(caches: list[Cache], fold: int, label_fraction: float, seed: int,
                   channels: list | None = None) -> RunCases:
    """The fold's labeled training cases (a nested ``label_fraction`` subset of them) and its validation cases.
    ``channels``: ``data.channels``, the channels to use (None: all)."""
    picks, names = _selection(caches, channels)
    train, val = [], []
    labels, pairs = {}, []
    for cache, idx in zip(caches, picks):
        if len(cache.case_ids(labeled=True)) < 2:
            continue
        tr, va = cache.split(fold)
        done = set(cache.case_ids(labeled=True))
        tr = [c for c in tr if c in done]
        if tr:
            tr = label_subset(tr, label_fraction, seed=seed)
        train += [cache.case(c, idx) for c in tr]
        val += [cache.case(c, idx) for c in va if c in done]
        labels = labels or cache.labels
        pairs = pairs or cache.lateral_pairs
    if not train:
        raise MedmimError("fine-tuning needs labeled cases: data.path holds fewer than 2 labeled cases")
    return RunCases(train, val, labels, pairs, _channels(caches, picks), names, picks[0])


def _channels(caches: list[Cache], picks: list[list[int] | None]) -> int:
    chans = {len(idx) if idx is not None else max(1, len(c.channel_names)) for c, idx in zip(caches, picks)}
    if len(chans) > 1:
        raise MedmimError(f"data.path mixes datasets with different channel counts {sorted(chans)}")
    return chans.pop()


def data_record(cases: RunCases, caches: list[Cache], finetune: bool) -> dict:
    """What a run reads from its data, recorded beside its config (``RUN/data.json``, the checkpoints):
    the label names and lateral pairs, and for fine-tuning the preprocessing the data actually had
    (modality, spacing, HU window, from the caches' manifests), so that a checkpoint predicts with exactly that."""
    record: dict = {"labels": {int(k): v for k, v in cases.labels.items()},
                    "lateral_pairs": [list(p) for p in cases.lateral_pairs],
                    "channel_names": cases.channel_names, "channel_index": cases.channel_index}
    if not finetune:
        return record
    folders = [c.folder.resolve() for c in cases.train + cases.val]
    used = [c for c in caches if any(c.root.resolve() in f.parents for f in folders)]
    seen = {json.dumps({k: c.manifest.get("settings", {}).get(k) for k in ("modality", "spacing", "hu_window")},
                       sort_keys=True) for c in used}
    if len(seen) > 1:
        raise MedmimError("fine-tuning data prepared with different settings (" + "; ".join(sorted(seen)) +
                          "): a model predicts with one preprocessing; prepare them alike or fine-tune on one")
    got = json.loads(seen.pop())
    prep: dict = {}
    if got.get("modality") in ("ct", "mri"):
        prep["modality"] = got["modality"]
    if got.get("spacing"):
        prep["spacing"] = [float(v) for v in got["spacing"]]
    if got.get("hu_window"):
        prep["hu_window"] = [float(v) for v in got["hu_window"]]
    record["preprocessing"] = prep
    return record
