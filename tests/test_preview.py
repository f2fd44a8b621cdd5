"""PNG previews: each is a grid of 3 rows (axial, coronal, sagittal) by one column per panel, and each
panel shows its own input. Read back with matplotlib and checked by the colour at each panel's centre."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from matplotlib.image import imread

from medmim.preview import save_finetune_preview, save_mim_preview, save_views_preview

WHITE, BLACK = (1.0, 1.0, 1.0), (0.0, 0.0, 0.0)
MASKED_BLUE = (0x3B / 255, 0x6E / 255, 0xA8 / 255)  # the masked input's masked voxels


def _cube() -> np.ndarray:
    """16^3 zeros with a bright 8^3 cube in the middle: every centre slice has the cube at its centre."""
    x = np.zeros((16, 16, 16), np.float32)
    x[4:12, 4:12, 4:12] = 1.0
    return x


def _read(path: Path, columns: int) -> tuple[np.ndarray, np.ndarray]:
    """(the image [H, W, channels], the mean RGB of a small patch at each panel's centre [3 rows, columns, 3])."""
    assert path.is_file()
    img = imread(path)
    assert img.ndim == 3 and img.shape[2] in (3, 4) and img.dtype == np.float32
    h, w = img.shape[:2]
    centres = np.zeros((3, columns, 3))
    for r in range(3):
        for c in range(columns):
            y, x = int((r + 0.5) * h / 3), int((c + 0.5) * w / columns)
            centres[r, c] = img[y - 4:y + 4, x - 4:x + 4, :3].mean(axis=(0, 1))
    return img, centres


def _same(a, b, tol: float = 0.02) -> bool:
    return bool(np.abs(np.asarray(a) - np.asarray(b)).max() < tol)


def test_the_figures_have_three_rows_and_one_column_per_panel(tmp_path: Path) -> None:
    """Same height for all; width in proportion to the panels: MIM 4, fine-tuning 3, views 2."""
    x, zeros = _cube(), np.zeros((16, 16, 16), np.float32)
    mim, _ = _read(save_mim_preview(tmp_path / "a" / "mim.png", x, zeros, x), 4)  # parent folders are made
    ft, _ = _read(save_finetune_preview(tmp_path / "ft.png", x, x.astype(np.uint8), zeros), 3)
    views, _ = _read(save_views_preview(tmp_path / "views.png", x, x), 2)
    assert mim.shape[0] == ft.shape[0] == views.shape[0]
    per_panel = views.shape[1] / 2
    assert mim.shape[1] == pytest.approx(4 * per_panel, abs=1)
    assert ft.shape[1] == pytest.approx(3 * per_panel, abs=1)
    assert mim.shape[0] > per_panel  # three rows of panels: taller than one panel is wide


def test_mim_preview_panels_show_input_masked_reconstruction_and_prediction(tmp_path: Path) -> None:
    x, ones, zeros = _cube(), np.ones((16, 16, 16), np.float32), np.zeros((16, 16, 16), np.float32)
    # everything masked, a prediction of 0: input white, masked input blue, reconstruction and prediction black
    path = save_mim_preview(tmp_path / "all_masked.png", torch.from_numpy(x), torch.from_numpy(ones),
                            torch.from_numpy(zeros))
    assert path == tmp_path / "all_masked.png"
    _, c = _read(path, 4)
    for r in range(3):
        assert _same(c[r, 0], WHITE) and _same(c[r, 1], MASKED_BLUE), c[r]
        assert _same(c[r, 2], BLACK) and _same(c[r, 3], BLACK), c[r]
    # nothing masked: the masked input and the reconstruction are the input; the prediction is its own
    _, c = _read(save_mim_preview(tmp_path / "none_masked.png", x, zeros, zeros), 4)
    for r in range(3):
        assert _same(c[r, 0], WHITE) and _same(c[r, 1], WHITE) and _same(c[r, 2], WHITE), c[r]
        assert _same(c[r, 3], BLACK), c[r]
    # a perfect prediction: all four panels alike
    _, c = _read(save_mim_preview(tmp_path / "perfect.png", x, zeros, x), 4)
    assert all(_same(c[r, k], WHITE) for r in range(3) for k in range(4)), c


def test_views_preview_shows_each_view(tmp_path: Path) -> None:
    x, zeros = _cube(), np.zeros((16, 16, 16), np.float32)
    _, c = _read(save_views_preview(tmp_path / "differ.png", torch.from_numpy(x), zeros), 2)
    for r in range(3):
        assert _same(c[r, 0], WHITE) and _same(c[r, 1], BLACK), c[r]
    _, c = _read(save_views_preview(tmp_path / "same.png", x, x), 2)
    for r in range(3):
        assert _same(c[r, 0], c[r, 1]) and _same(c[r, 0], WHITE), c[r]


def test_finetune_preview_overlays_ground_truth_and_prediction(tmp_path: Path) -> None:
    x = _cube()
    label = x.astype(np.uint8)  # organ 1 where the cube is
    none = np.zeros_like(label)
    # nothing predicted: the prediction panel is the bare image; the ground truth panel is tinted
    _, c = _read(save_finetune_preview(tmp_path / "missed.png", x, label, none, {0: "background", 1: "organ"}), 3)
    for r in range(3):
        assert _same(c[r, 0], WHITE) and _same(c[r, 2], WHITE), c[r]
        assert not _same(c[r, 1], WHITE, tol=0.05), c[r]
    # the right prediction: both overlays alike, both tinted
    _, c = _read(save_finetune_preview(tmp_path / "right.png", x, torch.from_numpy(label), label), 3)
    for r in range(3):
        assert _same(c[r, 1], c[r, 2]) and not _same(c[r, 1], c[r, 0], tol=0.05), c[r]


def test_segmentation_figure_puts_each_prediction_beside_the_ground_truth(tmp_path: Path) -> None:
    """image | ground truth | scratch | MAE: the cube's organ shows in ground truth and in the prediction that
    found it, not in the one that missed it; the legend names the organ shown."""
    from medmim.preview import save_segmentation_figure

    x = _cube()
    label, none = (x > 0).astype(np.int64), np.zeros_like(x, dtype=np.int64)
    path = save_segmentation_figure(tmp_path / "seg.png", x, label, {"scratch": none, "mae": label},
                                    {0: "background", 1: "liver"}, legend=True)
    img, c = _read(path, 4)
    assert _same(c[0, 0], WHITE) and _same(c[0, 2], WHITE)  # the image, and a missed organ: the bare cube
    assert not _same(c[0, 1], WHITE) and _same(c[0, 1], c[0, 3])  # ground truth and the right prediction: coloured
    plain, _ = _read(save_segmentation_figure(tmp_path / "plain.png", x, label, {"scratch": none, "mae": label}), 4)
    assert img.shape[0] > plain.shape[0]  # the legend's strip
