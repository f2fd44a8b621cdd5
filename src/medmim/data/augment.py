"""Augmentations, composed from MONAI dictionary transforms.

Fine-tuning (as in the paper, after MONAI's UNETR/BTCV recipe): random flips, 90-degree rotations,
intensity scale and shift. MIM pretraining uses plain random crops (no augmentation). The
contrastive baseline gets two independently augmented views of each crop.

Left and right: the cache is RAS, so array axis 0 runs from the patient's left to right. A flip of
axis 0 mirrors the patient: lateralised labels (right/left kidney, right/left adrenal...) swap, or
the model would learn a mirrored "right kidney" on the left. A 90-degree turn in a plane holding
axis 0 would carry left-right onto another axis, which no relabelling fixes, so when a dataset
declares lateral pairs rotations are kept to the plane of axes 1 and 2 (which keeps left and right).
"""

from __future__ import annotations

from typing import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import (
    Compose,
    MapTransform,
    RandFlipd,
    RandGaussianNoised,
    RandGaussianSmoothd,
    RandomizableTransform,
    RandRotate90d,
    RandScaleIntensityd,
    RandShiftIntensityd,
    RandSpatialCropd,
    Resized,
)

from medmim.data.sampling import plain_tensor


def swap_table(pairs: Sequence[tuple[int, int]], n: int = 256) -> torch.Tensor:
    """A lookup table mapping each label value to its mirror twin (identity for the rest)."""
    lut = torch.arange(n)
    for a, b in pairs:
        lut[a], lut[b] = b, a
    return lut


class RandLateralFlipd(RandomizableTransform, MapTransform):
    """Flip along the patient's left-right axis (axis 0 of a RAS crop) and swap lateralised labels."""

    def __init__(self, keys: KeysCollection, label_key: str = "label", prob: float = 0.1,
                 lateral_pairs: Sequence[tuple[int, int]] = ()):
        RandomizableTransform.__init__(self, prob)
        MapTransform.__init__(self, keys, allow_missing_keys=True)
        self.label_key = label_key
        self.lut = swap_table(lateral_pairs) if lateral_pairs else None

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        self.randomize(None)
        if not self._do_transform:
            return d
        for key in self.key_iterator(d):
            d[key] = torch.flip(torch.as_tensor(d[key]), dims=(1,))  # [C, X, Y, Z]: X is axis 1 here
            if key == self.label_key and self.lut is not None:
                d[key] = self.lut[d[key].long()].to(d[key].dtype)
        return d


def finetune_transform(lateral_pairs: Sequence[tuple[int, int]] = (), prob_flip: float = 0.1,
                       prob_rot: float = 0.1, prob_scale: float = 0.1, prob_shift: float = 0.5) -> Compose:
    """Segmentation augmentation on ``{"image": [C, X, Y, Z], "label": [1, X, Y, Z]}`` crops."""
    keys = ["image", "label"]
    rot_plane = (1, 2) if lateral_pairs else (0, 1)
    return Compose([
        RandLateralFlipd(keys, prob=prob_flip, lateral_pairs=lateral_pairs),
        RandFlipd(keys, prob=prob_flip, spatial_axis=1, allow_missing_keys=True),
        RandFlipd(keys, prob=prob_flip, spatial_axis=2, allow_missing_keys=True),
        RandRotate90d(keys, prob=prob_rot, max_k=3, spatial_axes=rot_plane, allow_missing_keys=True),
        RandScaleIntensityd("image", factors=0.1, prob=prob_scale),
        RandShiftIntensityd("image", offsets=0.1, prob=prob_shift),
    ], lazy=False)


class TwoViews:
    """Turn a crop into two augmented views ``view1``, ``view2`` (``[C, *roi]`` each) for SimCLR."""

    def __init__(self, roi_size: Sequence[int], min_scale: float = 0.5):
        roi = tuple(int(s) for s in roi_size)
        self.view = Compose([
            # random resized crop: a sub-volume of 50-100% per axis, brought back to the crop size
            RandSpatialCropd("image", roi_size=tuple(max(1, int(s * min_scale)) for s in roi), max_roi_size=roi,
                             random_center=True, random_size=True),
            Resized("image", spatial_size=roi, mode="trilinear"),
            RandFlipd("image", prob=0.5, spatial_axis=0),
            RandFlipd("image", prob=0.5, spatial_axis=1),
            RandFlipd("image", prob=0.5, spatial_axis=2),
            RandScaleIntensityd("image", factors=0.2, prob=0.8),
            RandShiftIntensityd("image", offsets=0.1, prob=0.8),
            RandGaussianNoised("image", std=0.05, prob=0.5),
            RandGaussianSmoothd("image", sigma_x=(0.5, 1.0), sigma_y=(0.5, 1.0), sigma_z=(0.5, 1.0), prob=0.5),
        ], lazy=False)

    def set_random_state(self, seed: int | None = None, state: np.random.RandomState | None = None) -> "TwoViews":
        self.view.set_random_state(seed=seed, state=state)
        return self

    def __call__(self, item: dict) -> dict:
        base = {"image": item["image"]}
        v1 = self.view(dict(base))["image"]
        v2 = self.view(dict(base))["image"]
        out = {k: v for k, v in item.items() if k not in ("image", "label")}
        out["view1"] = plain_tensor(v1)
        out["view2"] = plain_tensor(v2)
        return out
