"""BraTS's overlapping tumour regions, to and from its label map.

BraTS labels each voxel 0 (background), 1 (necrotic / non-enhancing tumour core, NCR), 2 (peritumoral
oedema, ED) or 4 (GD-enhancing tumour, ET), but trains and scores three nested regions, each a
separate sigmoid output:

    TC  tumour core       = 1 | 4
    WT  whole tumour      = 1 | 2 | 4
    ET  enhancing tumour  = 4

in MONAI's channel order (``ConvertToMultiChannelBasedOnBratsClasses``, which does the forward
conversion here). The inverse paints the regions from the outside in (WT -> 2, TC -> 1, ET -> 4), so a
voxel takes the innermost region it is in and a prediction always becomes a valid, nested label map;
on a true label map the round trip is exact.

The Decathlon's ``Task01_BrainTumour`` numbers the same classes otherwise (1 oedema, 2 non-enhancing
tumour, 3 enhancing tumour); :func:`brats_values_for` finds the BraTS value of each declared label by
its name, so such a dataset is read into BraTS numbering.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import re

import numpy as np

if TYPE_CHECKING:
    import torch

NCR, ED, ET = 1, 2, 4  # BraTS label values
BRATS_LABEL_NAMES: dict[int, str] = {0: "background", NCR: "necrotic tumour core", ED: "peritumoral oedema",
                                     ET: "GD-enhancing tumour"}
# (short name, long name, BraTS label values inside), in MONAI's channel order
BRATS_REGIONS: tuple[tuple[str, str, tuple[int, ...]], ...] = (
    ("TC", "tumour core", (NCR, ET)),
    ("WT", "whole tumour", (NCR, ED, ET)),
    ("ET", "enhancing tumour", (ET,)),
)
REGION_NAMES: dict[int, str] = {i + 1: f"{short} ({name})" for i, (short, name, _) in enumerate(BRATS_REGIONS)}
# the value BraTS's own scoring gives HD95 when exactly one of prediction and ground truth is empty (mm)
BRATS_EMPTY_HD95_MM = 373.13


def labels_to_regions(label: torch.Tensor | np.ndarray) -> torch.Tensor | np.ndarray:
    """BraTS label map ``[X, Y, Z]`` or ``[1, X, Y, Z]`` (values 0/1/2/4) -> regions ``[3, X, Y, Z]`` bool
    (TC, WT, ET). Batches ``[N, 1, X, Y, Z]`` -> ``[N, 3, X, Y, Z]``."""
    import torch
    from monai.transforms import ConvertToMultiChannelBasedOnBratsClasses

    convert = ConvertToMultiChannelBasedOnBratsClasses()
    if label.ndim == 5:
        parts = [convert(one) for one in label]
        return torch.stack(parts) if isinstance(label, torch.Tensor) else np.stack(parts)
    return convert(label)


def regions_to_labels(regions: torch.Tensor | np.ndarray) -> np.ndarray:
    """Regions ``[3, X, Y, Z]`` (TC, WT, ET; bool, or probabilities thresholded at 0.5) -> a BraTS label map
    ``[X, Y, Z]`` uint8 with values 0/1/2/4: WT outside TC is oedema (2), TC outside ET necrosis (1), ET 4."""
    r = regions.detach().cpu().numpy() if hasattr(regions, "detach") else np.asarray(regions)
    if r.ndim != 4 or r.shape[0] != len(BRATS_REGIONS):
        raise ValueError(f"regions must be [3, X, Y, Z] (TC, WT, ET), got shape {list(r.shape)}")
    tc, wt, et = ((r[i] > 0.5) if r.dtype != bool else r[i] for i in range(3))
    out = np.zeros(r.shape[1:], np.uint8)
    out[wt] = ED
    out[tc] = NCR
    out[et] = ET
    return out


_NAME_TO_VALUE = (
    (re.compile(r"non.?enhanc|necro|ncr|net\b"), NCR),
    (re.compile(r"enhanc|\bet\b"), ET),
    (re.compile(r"edema|oedema|\bed\b|peritumo"), ED),
)


def brats_values_for(labels: dict[int, str]) -> dict[int, int] | None:
    """The BraTS value of each foreground label, found by its declared name, or None when the names are not
    BraTS's three classes. ``{1: "edema", 2: "non-enhancing tumor", 3: "enhancing tumour"}`` (the Decathlon's)
    -> ``{1: 2, 2: 1, 3: 4}``."""
    out: dict[int, int] = {}
    for value, name in labels.items():
        if int(value) == 0:
            continue
        low = name.strip().lower()
        hit = next((v for pattern, v in _NAME_TO_VALUE if pattern.search(low)), None)
        if hit is None:
            return None
        out[int(value)] = hit
    if sorted(out.values()) != [NCR, ED, ET]:
        return None
    return out
