"""Crop sampler: sizes, balance, sharding across ranks x workers, determinism, label fractions, augmentation."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from medmim.data.augment import RandLateralFlipd, TwoViews, finetune_transform
from medmim.data.prepare import PrepareSettings, prepare_dataset
from medmim.data.sampling import CropSampler, label_subset, open_cache, read_crop
from tests.conftest import write_msd


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("sampling")
    root = write_msd(tmp / "ds", n_labeled=8, n_unlabeled=0, shape=(40, 36, 20))
    prepare_dataset(root, tmp / "cache", PrepareSettings(spacing=(1.5, 1.5, 2.0)))
    return tmp / "cache"


def _cases(cache: Path):
    c = open_cache(cache)
    return [c.case(i) for i in c.case_ids(labeled=True)]


def test_crops_have_the_right_size_and_pad_at_borders(cache: Path) -> None:
    s = CropSampler(_cases(cache), (24, 24, 24), crops_per_volume=3, seed=0, epochs=1)  # larger than z (20)
    items = list(s)
    assert len(items) == 8 * 3
    for it in items:
        assert it["image"].shape == (1, 24, 24, 24) and it["image"].dtype == torch.float32
        assert it["label"].shape == (1, 24, 24, 24) and it["label"].dtype == torch.uint8
    arr = np.arange(5 * 4 * 3, dtype=np.float32).reshape(5, 4, 3)
    crop = read_crop(arr, (-1, 2, 0), (3, 3, 3), pad_value=-7)
    assert crop[0].min() == -7 and (crop[1:, :2, :] == arr[0:2, 2:4, 0:3]).all() and (crop[:, 2:, :] == -7).all()


def test_foreground_balance(cache: Path) -> None:
    pos = list(CropSampler(_cases(cache), (8, 8, 8), 8, pos_fraction=1.0, seed=0, epochs=1))
    assert all((it["label"] > 0).any() for it in pos)  # every positive crop holds its organ
    holding = Counter(c for it in pos for c in torch.unique(it["label"]).tolist() if c)
    assert min(holding[c] for c in (1, 2, 3)) > len(pos) / 6  # each class centred on about a third of the time
    neg = list(CropSampler(_cases(cache), (8, 8, 8), 8, pos_fraction=0.0, seed=0, epochs=1))
    assert np.mean([(it["label"] > 0).any() for it in neg]) < np.mean([(it["label"] > 0).any() for it in pos])


def _collect(cache: Path, rank: int, world: int, workers: int) -> list[tuple[str, float]]:
    s = CropSampler(_cases(cache), (8, 8, 8), 1, seed=3, epochs=1, rank=rank, world_size=world)
    dl = DataLoader(s, batch_size=None, num_workers=workers)
    return [(it["case_id"], float(it["image"].sum())) for it in dl]


def test_sharding_two_ranks_two_workers_is_disjoint_and_complete(cache: Path) -> None:
    shards = [_collect(cache, rank, 2, 2) for rank in range(2)]
    ids = [{cid for cid, _ in sh} for sh in shards]
    assert not ids[0] & ids[1]
    assert ids[0] | ids[1] == set(open_cache(cache).case_ids(labeled=True))
    assert len(shards[0]) == len(shards[1]) == 4
    # the crops do not depend on how the work is dealt: 1 process, 1 worker gives the same ones
    assert sorted(shards[0] + shards[1]) == sorted(_collect(cache, 0, 1, 0))


def test_deterministic_given_seed_and_epoch(cache: Path) -> None:
    def first(seed: int, epoch: int):
        s = CropSampler(_cases(cache), (8, 8, 8), 2, seed=seed, start_epoch=epoch, epochs=1,
                        transform=finetune_transform([(2, 3)]))
        return [(it["case_id"], it["image"].sum().item(), it["label"].sum().item()) for it in s]

    assert first(0, 0) == first(0, 0)
    assert first(0, 0) != first(1, 0) and first(0, 0) != first(0, 1)
    # streaming forever goes from epoch to epoch
    stream = iter(CropSampler(_cases(cache), (8, 8, 8), 1, seed=0))
    assert len([next(stream) for _ in range(20)]) == 20


def test_label_fraction_subsets_are_nested_and_deterministic() -> None:
    ids = [f"case_{i:02d}" for i in range(30)]
    subsets = [label_subset(ids, f, seed=5) for f in (0.1, 0.25, 0.5, 1.0)]
    assert [len(s) for s in subsets] == [3, 8, 15, 30]
    for small, big in zip(subsets, subsets[1:]):
        assert set(small) <= set(big)
    assert label_subset(list(reversed(ids)), 0.25, seed=5) == subsets[1]
    assert label_subset(ids, 0.25, seed=6) != subsets[1]
    assert label_subset(ids, 0.01, seed=5) and len(label_subset(ids, count_=4, seed=5)) == 4


def test_lateral_flip_swaps_right_and_left_labels() -> None:
    label = torch.zeros(1, 6, 4, 4, dtype=torch.int64)
    label[0, 4:, :, :] = 2  # right kidney at high x (RAS)
    label[0, :1, :, :] = 3  # left kidney at low x
    image = label.float()
    out = RandLateralFlipd(["image", "label"], prob=1.0, lateral_pairs=[(2, 3)])({"image": image, "label": label})
    assert (out["label"][0, :2] == 3).all() and (out["label"][0, 5:] == 2).all()  # still right on the right
    assert torch.equal(out["image"], torch.flip(image, dims=(1,)))  # the image is mirrored as it is
    plain = RandLateralFlipd(["image", "label"], prob=1.0)({"image": image, "label": label})
    assert (plain["label"][0, :2] == 2).all()  # no pairs declared: labels just move


def test_lateral_datasets_never_rotate_left_right_onto_another_axis() -> None:
    t = finetune_transform([(2, 3)], prob_flip=0.0, prob_rot=1.0, prob_scale=0, prob_shift=0)
    label = torch.zeros(1, 6, 6, 6, dtype=torch.int64)
    label[0, 5, 0, 0] = 2
    for seed in range(8):
        t.set_random_state(seed)
        out = t({"image": label.float(), "label": label})
        assert int(out["label"][0, 5].sum()) == 2  # the voxel stays on the x=5 plane


def test_two_views_differ_but_keep_shape() -> None:
    tv = TwoViews((16, 16, 16)).set_random_state(0)
    out = tv({"image": torch.rand(1, 16, 16, 16), "case_id": "a"})
    assert out["view1"].shape == out["view2"].shape == (1, 16, 16, 16)
    assert not torch.equal(out["view1"], out["view2"]) and out["case_id"] == "a"
