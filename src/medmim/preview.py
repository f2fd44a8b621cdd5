"""PNG previews a person can read: orthogonal slices through the middle of a crop."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


def _slices(vol: np.ndarray) -> list[np.ndarray]:
    """Axial, coronal and sagittal slices through the centre of a RAS volume [X, Y, Z], oriented for display."""
    cx, cy, cz = (s // 2 for s in vol.shape)
    return [np.rot90(vol[:, :, cz]), np.rot90(vol[:, cy, :]), np.rot90(vol[cx, :, :])]


def _np(t) -> np.ndarray:
    return t.detach().float().cpu().numpy() if isinstance(t, torch.Tensor) else np.asarray(t, dtype=np.float32)


def _figure(rows: list[tuple[str, list[np.ndarray], dict]], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, len(rows), figsize=(2.6 * len(rows), 7.2), squeeze=False)
    for col, (title, views, kw) in enumerate(rows):
        for r, view in enumerate(views):
            ax = axes[r][col]
            ax.imshow(view, **kw)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(title, fontsize=10)
    for r, name in enumerate(("axial", "coronal", "sagittal")):
        axes[r][0].set_ylabel(name)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def save_mim_preview(path: Path, image, mask, recon) -> Path:
    """input | masked input | reconstruction (visible voxels from the input) | target. Arrays [X, Y, Z]."""
    x, m, p = _np(image), _np(mask), _np(recon)
    lo, hi = float(np.percentile(x, 1)), float(np.percentile(x, 99)) + 1e-6
    gray = {"cmap": "gray", "vmin": lo, "vmax": hi}
    import matplotlib

    shown_masked = dict(gray, cmap=matplotlib.colormaps["gray"].with_extremes(bad="#3b6ea8"))  # masked: blue
    masked = np.where(m > 0.5, np.nan, x)
    blended = np.where(m > 0.5, p, x)
    return _figure([("input", _slices(x), gray), ("masked", _slices(masked), shown_masked),
                    ("reconstruction", _slices(blended), gray), ("prediction (all)", _slices(p), gray)], path)


def save_finetune_preview(path: Path, image, label, pred, labels: dict[int, str] | None = None) -> Path:
    """image | ground truth overlay | prediction overlay. Arrays [X, Y, Z]."""
    return save_segmentation_figure(path, image, label, {"prediction": pred}, labels)


def save_segmentation_figure(path: Path, image, label, predictions: dict, labels: dict[int, str] | None = None,
                             legend: bool = False) -> Path:
    """image | ground truth | each prediction (title -> label map), as coloured organ overlays on the same
    orthogonal slices. Arrays [X, Y, Z]. ``legend``: a key of the organs' colours under the panels."""
    x, y = _np(image), _np(label)
    preds = {k: _np(v) for k, v in predictions.items()}
    gray = {"cmap": "gray"}
    n = int(max([y.max(), 1.0] + [p.max() for p in preds.values()]))
    vmax = max(n, 19)
    over = {"cmap": "tab20", "vmin": 0, "vmax": vmax, "interpolation": "nearest"}

    def overlay(lab):
        return [np.ma.masked_where(v == 0, v) for v in _slices(lab)]

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = [("image", [None] * 3), ("ground truth", overlay(y))] + [(k, overlay(p)) for k, p in preds.items()]
    fig, axes = plt.subplots(3, len(columns), figsize=(2.6 * len(columns), 7.2 + (0.6 if legend else 0)),
                             squeeze=False)
    for r, xi in enumerate(_slices(x)):
        for c, (title, views) in enumerate(columns):
            ax = axes[r][c]
            ax.imshow(xi, **gray)
            if views[r] is not None:
                ax.imshow(views[r], alpha=0.55, **over)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(title, fontsize=10)
    if legend and labels:
        from matplotlib.patches import Patch

        cmap = plt.get_cmap("tab20")
        shown = [y, *preds.values()]
        present = [c for c in sorted(labels) if c != 0 and any((v == c).any() for v in shown)]
        handles = [Patch(color=cmap(c / vmax), label=labels[c]) for c in present]
        fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 7) or 1, fontsize=8, frameon=False)
        fig.tight_layout(rect=(0, 0.06, 1, 1))
    else:
        fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def save_views_preview(path: Path, view1, view2) -> Path:
    """The two augmented views a contrastive step compares. Arrays [X, Y, Z]."""
    a, b = _np(view1), _np(view2)
    lo = float(min(np.percentile(a, 1), np.percentile(b, 1)))
    hi = float(max(np.percentile(a, 99), np.percentile(b, 99))) + 1e-6
    gray = {"cmap": "gray", "vmin": lo, "vmax": hi}
    return _figure([("view 1", _slices(a), gray), ("view 2", _slices(b), gray)], path)
