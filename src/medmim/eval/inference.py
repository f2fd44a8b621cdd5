"""Segment whole scans with a fine-tuned UNETR, in the patient's original geometry.

    predictor = Predictor.from_checkpoint("runs/unetr/checkpoints/best.pt")
    label, info = predictor.predict_case(case)       # [I, J, K] uint8 on the original image grid

Applies exactly the preprocessing the model was trained with (from the config stored in the
checkpoint), runs MONAI's sliding-window inference with Gaussian blending (optionally averaging
mirrored copies), and maps the label map back onto the original voxel grid: the crop is undone, the
resampling and the reorientation inverted, so the written NIfTI has the scan's shape and affine.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from medmim.config import Config
from medmim.data.datasets import Case
from medmim.data.prepare import PrepareSettings, preprocess_case, to_original_grid
from medmim.errors import MedmimError
from medmim.runtime import autocast, resolve_device


def largest_component_per_class(label: np.ndarray, classes: list[int] | None = None) -> np.ndarray:
    """Keep, for each organ, only its largest 26-connected component (removes scattered false positives)."""
    from scipy import ndimage

    out = label.copy()
    for c in classes if classes is not None else [int(v) for v in np.unique(label) if v != 0]:
        mask = label == c
        comp, n = ndimage.label(mask, structure=np.ones((3, 3, 3), bool))
        if n > 1:
            sizes = np.bincount(comp.ravel())[1:]
            out[mask & (comp != 1 + int(np.argmax(sizes)))] = 0
    return out


def _softmax_(logits: torch.Tensor) -> torch.Tensor:
    """Softmax over the class axis (dim 1) written into ``logits`` itself: on a whole CT the K-channel volume
    is the largest tensor of inference, and a second one is not needed. [N, K, ...] -> the same tensor."""
    logits.sub_(logits.amax(dim=1, keepdim=True)).exp_()
    return logits.div_(logits.sum(dim=1, keepdim=True))


def cpu_has_native_bf16() -> bool:
    """Whether oneDNN runs bf16 matrix products and convolutions natively on this CPU."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


@dataclass
class PredictOptions:
    sw_batch_size: int = 4
    # MONAI's default: the same windows as its sliding_window_inference; 0.5 (nnU-Net's) runs ~1.6x the
    # windows of a CT for a slightly smoother blend
    overlap: float = 0.25
    tta: bool = False  # average over mirrored copies (flips of each axis)
    lcc: bool = False  # keep each organ's largest connected component
    precision: str = "fp32"  # or bf16 (autocast)
    device: str = "auto"  # where the network runs
    stitch_device: str | None = None  # where windows are blended (default: the network's device)


class Predictor:
    """A UNETR rebuilt from a checkpoint alone, with the preprocessing it was trained with."""

    def __init__(self, model: torch.nn.Module, cfg: Config, options: PredictOptions | None = None,
                 lateral_pairs: list[tuple[int, int]] | None = None, channel_index: list[int] | None = None):
        self.cfg = cfg
        self.regions = cfg.model.regions
        self.channel_index = channel_index  # the scan's channels the model takes (data.channels), None: all
        self.opt = options or PredictOptions()
        self.device = resolve_device(self.opt.device, setting="--device")
        self.stitch_device = torch.device(self.opt.stitch_device) if self.opt.stitch_device else self.device
        self.model = model.to(self.device).eval()
        if self.opt.precision == "bf16" and self.device.type == "cpu" and not cpu_has_native_bf16():
            warnings.warn("bf16 on a CPU without native bf16 (AVX512-BF16 or AMX) runs slower than fp32 here; "
                          "use --precision fp32", stacklevel=2)
        self.settings = PrepareSettings.from_config(cfg.data)
        self._window_weights: torch.Tensor | None = None
        self.lateral_pairs = lateral_pairs or []

    @classmethod
    def from_checkpoint(cls, path: str | Path, options: PredictOptions | None = None) -> "Predictor":
        from medmim.models.rebuild import config_of, model_from
        from medmim.models.transfer import read_checkpoint

        ckpt = read_checkpoint(path)
        cfg = config_of(ckpt, "medmim needs the config a model was trained with to predict")
        if cfg.task != "finetune":
            raise MedmimError(f"{path}: a {cfg.task} checkpoint; predict needs a fine-tuned UNETR (medmim finetune)")
        model = model_from(ckpt, cfg)
        return cls(model, cfg, options, [tuple(p) for p in (cfg.data.lateral_pairs or [])],
                   (ckpt.data or {}).get("channel_index"))

    def _autocast(self):
        return autocast("bf16" if self.opt.precision == "bf16" else "fp32", self.device)

    @torch.inference_mode()
    def probabilities(self, image: np.ndarray) -> torch.Tensor:
        """image: [C, X, Y, Z] preprocessed -> softmax probabilities [K, X, Y, Z], or for a region model each
        region's sigmoid [3, X, Y, Z] (on the stitch device)."""
        from monai.inferers import sliding_window_inference

        x = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None]
        if self.stitch_device == self.device:
            x = x.to(self.device)  # one copy of the volume, instead of one per window
        roi = tuple(self.cfg.model.img_size)

        if self._window_weights is None:  # the Gaussian window weights, once for every case and mirror
            from monai.data.utils import compute_importance_map

            self._window_weights = compute_importance_map(roi, mode="gaussian", sigma_scale=0.125, device=self.device)

        def run(inp: torch.Tensor) -> torch.Tensor:
            with self._autocast():
                logits = sliding_window_inference(inp, roi, self.opt.sw_batch_size, self.model, overlap=self.opt.overlap,
                                                  mode="gaussian", sw_device=self.device, device=self.stitch_device,
                                                  roi_weight_map=self._window_weights)
            return logits.float().sigmoid_()[0] if self.regions else _softmax_(logits.float())[0]

        probs = run(x)
        if self.opt.tta:
            n = 1
            for axis in (1, 2, 3):  # spatial axes of [C, X, Y, Z] -> dims 2..4 of [1, C, X, Y, Z]
                p = torch.flip(run(torch.flip(x, dims=(axis + 1,))), dims=(axis,))
                if axis == 1 and self.lateral_pairs:
                    # a left-right mirror turns the right kidney into the left one: swap their channels back
                    idx = list(range(p.shape[0]))
                    for a, b in self.lateral_pairs:
                        idx[a], idx[b] = b, a
                    p = p[idx]
                probs += p
                n += 1
            probs /= n
        return probs

    def predict_case(self, case: Case, probabilities: bool = False) -> tuple[np.ndarray, dict]:
        """A case's label map [I, J, K] uint8 on its original grid (for a BraTS region model: 0/1/2/4), and
        timing / geometry info; with ``probabilities``, ``info["probabilities"]`` holds the class (or region)
        probabilities [I, J, K, K'] float32 on the original grid too."""
        t0 = time.perf_counter()
        prep = preprocess_case(Case(case.case_id, case.images, None), self.settings)
        image = prep["image"]
        if self.channel_index is not None:
            if max(self.channel_index) >= image.shape[0]:
                raise MedmimError(f"{case.images[0]}: has {image.shape[0]} channel(s); the model takes channels "
                                  f"{self.channel_index} of its training data")
            image = image[self.channel_index]
        if image.shape[0] != self.cfg.model.in_channels:
            raise MedmimError(f"{case.images[0]}: has {image.shape[0]} channel(s); the model takes "
                              f"{self.cfg.model.in_channels}")
        t1 = time.perf_counter()
        probs = self.probabilities(image)
        if self.regions:
            from medmim.data.regions import regions_to_labels

            label = regions_to_labels(probs)
        else:
            label = probs.argmax(0).to(torch.uint8).cpu().numpy()
        extra = {}
        if probabilities:
            extra["probabilities"] = np.moveaxis(to_original_grid(probs.cpu().numpy(), prep["geometry"], mode="bilinear"), 0, -1)
        del probs
        t2 = time.perf_counter()
        if self.opt.lcc:
            label = largest_component_per_class(label)
        out = to_original_grid(label, prep["geometry"], mode="nearest").astype(np.uint8)
        t3 = time.perf_counter()
        info = {"geometry": prep["geometry"], "seconds_preprocess": t1 - t0, "seconds_inference": t2 - t1,
                "seconds_postprocess": t3 - t2, "seconds": t3 - t0, **extra}
        return out, info
