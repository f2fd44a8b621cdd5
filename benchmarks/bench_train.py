"""Training and inference benchmark: medmim against MONAI, side by side in one process, on the same inputs.

    python benchmarks/bench_train.py            # paper + demo configurations (about 15 min on 2 CPU cores)
    python benchmarks/bench_train.py --quick    # demo configuration only, fewer repeats (a few minutes)

What is measured (each a pair medmim | MONAI, the two interleaved step by step, order alternating):

  mae      one MAE pretraining step: zero_grad, forward, masked-patch MSE, backward, AdamW step.
           medmim ``MAE3D`` vs MONAI ``MaskedAutoEncoderViT`` (+ the same masked-patch MSE).
  simmim   one SimMIM step (all tokens through the ViT, linear head, L1 on masked patches).
           MONAI has no SimMIM: its ``ViT`` over all tokens + a ``Linear`` head + the same L1 stands in.
  unetr    one fine-tuning step: forward, DiceCE (MONAI's, one-hot + softmax), backward, AdamW step.
           medmim ``UNETR`` vs MONAI ``UNETR`` (same weights). MONAI's UNETR hard-codes patch 16 and 12
           blocks; at the demo configuration the MONAI side is MONAI's UNETR with its ViT and last stage
           resized to the demo's patch 8 / 6 blocks (``MonaiUNETRAnyPatch`` below, MONAI code otherwise).
  predict  sliding-window inference of a whole preprocessed volume to softmax probabilities:
           medmim ``Predictor.probabilities`` (its defaults: sw_batch_size 4, overlap 0.5, Gaussian blending)
           vs MONAI ``sliding_window_inference`` with its defaults (sw_batch_size 1, overlap 0.25, constant)
           on MONAI's UNETR with the same weights. ``predict-same`` adds MONAI at medmim's settings.

Configurations: ``paper`` = ViT-B/16, 96^3, batch 2, mask 0.75, MAE decoder 512 x 8 (16 heads), UNETR
feature size 16, predict on a 256 x 256 x 96 volume; ``demo`` = 48^3, patch 8, width 192, 6 blocks,
6 heads, MLP 768, decoder 128 x 2 (4 heads), batch 4, UNETR feature size 8 (the tiny preset's), predict on
a whole CT at demo resolution, 128 x 128 x 64 (96 x 96 x 48 with --quick).
Precisions: fp32, and bf16 autocast for both sides. On a CPU without native bf16 (no AVX512-BF16/AMX),
bf16 matmuls and 3D convolutions run many times slower than fp32 (see the "peak" section of the
results); with ``--bf16 auto`` (default) the bf16 cases that would take far too long there (all of
UNETR/predict, and the paper configuration) are not run but reported as skipped, with the measured
bf16/fp32 throughput and an estimate. ``--bf16 all`` runs them anyway.

Reported per pair: median step time of each side after warm-up, the median of the per-repeat ratios
medmim / MONAI (steps i of both ran back to back, so the ratio cancels most of what other processes
on the machine add), FLOPs per step counted with ``torch.utils.flop_counter.FlopCounterMode`` (matmul,
convolution and attention FLOPs of forward + backward; each side counted as it runs), MFU against the
measured matmul peak of the step's precision (on CUDA also against the bf16 peak), and the step's
peak memory: on CUDA ``max_memory_allocated`` above what was allocated before the step; on CPU the
peak resident set size above the RSS before the step (``--memory hwm``: in process, resetting the
kernel's high-water mark through /proc/self/clear_refs after ``malloc_trim``; ``--memory subprocess``:
``resource.getrusage`` in a fresh process per measurement, slower), plus the machine load averages.

Writes DIR/train.json and DIR/train.md (DIR defaults to benchmarks/results/).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

HERE = Path(__file__).resolve().parent

CONFIGS: dict[str, dict[str, Any]] = {
    "paper": dict(img=96, patch=16, hidden=768, layers=12, heads=12, mlp=3072, mask_ratio=0.75, dec_dim=512,
                  dec_depth=8, dec_heads=16, batch=2, feature_size=16, num_classes=14, volume=(256, 256, 96)),
    "demo": dict(img=48, patch=8, hidden=192, layers=6, heads=6, mlp=768, mask_ratio=0.75, dec_dim=128,
                 dec_depth=2, dec_heads=4, batch=4, feature_size=8, num_classes=14, volume=(128, 128, 64)),
    # phantom-science-v2's fine-tuning: the paper's ViT share of the network (216 tokens, ~12% of the FLOPs)
    "v2": dict(img=48, patch=8, hidden=192, layers=6, heads=6, mlp=768, mask_ratio=0.75, dec_dim=128,
               dec_depth=2, dec_heads=4, batch=4, feature_size=4, num_classes=14, volume=(128, 128, 64)),
}
TASKS = ("mae", "simmim", "unetr", "predict")

# (warm-up, repeats) per device kind, task and configuration; --warmup / --repeats override
REPEATS = {
    "cpu": {"paper": {"mae": (1, 3), "simmim": (1, 3), "unetr": (1, 2), "predict": (1, 1)},
            "demo": {"mae": (2, 5), "simmim": (2, 5), "unetr": (1, 3), "predict": (1, 2)},
            "v2": {"mae": (2, 5), "simmim": (2, 5), "unetr": (1, 3), "predict": (1, 2)}},
    "cpu-quick": {"demo": {"mae": (1, 3), "simmim": (1, 3), "unetr": (1, 2), "predict": (1, 1)},
                  "paper": {"mae": (1, 2), "simmim": (1, 2), "unetr": (1, 1), "predict": (1, 1)},
                  "v2": {"mae": (1, 3), "simmim": (1, 3), "unetr": (1, 2), "predict": (1, 1)}},
    "cuda": {"paper": {"mae": (3, 10), "simmim": (3, 10), "unetr": (3, 10), "predict": (1, 3)},
             "demo": {"mae": (3, 10), "simmim": (3, 10), "unetr": (3, 10), "predict": (1, 3)},
             "v2": {"mae": (3, 10), "simmim": (3, 10), "unetr": (3, 10), "predict": (1, 3)}},
}


# --------------------------------------------------------------------------------------------------
# machine
# --------------------------------------------------------------------------------------------------

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def load() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def cpu_info() -> dict:
    info = {"model": platform.processor() or platform.machine(), "flags": []}
    try:
        text = Path("/proc/cpuinfo").read_text()
        for line in text.splitlines():
            if line.startswith("model name"):
                info["model"] = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                info["flags"] = sorted(f for f in flags if f.startswith(("avx", "amx", "fma")))
                break
    except OSError:
        pass
    info["native_bf16"] = any(f in info["flags"] for f in ("avx512_bf16", "amx_bf16", "avx_vnni"))
    return info


def _timed(fn: Callable[[], Any], device: torch.device, min_time: float, max_reps: int = 20) -> float:
    """Best seconds of one call of fn, over calls repeated until min_time has passed."""
    fn()
    sync(device)
    best, spent, n = math.inf, 0.0, 0
    while (spent < min_time or n < 2) and n < max_reps:
        t0 = time.perf_counter()
        fn()
        sync(device)
        dt = time.perf_counter() - t0
        best, spent, n = min(best, dt), spent + dt, n + 1
    return best


def measure_peaks(device: torch.device, quick: bool) -> dict:
    """Matmul peak (GFLOP/s) in fp32 and bf16, and on CPU the 3D convolution throughput as well.

    The matmul size grows until one product takes long enough to time (square matrices, 512 to 8192).
    """
    out: dict[str, Any] = {"load_start": load()}
    min_time = 0.5 if device.type == "cpu" else 1.0
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        n, best = 512, 0.0
        while True:
            a = torch.randn(n, n, device=device, dtype=dtype)
            b = torch.randn(n, n, device=device, dtype=dtype)
            bias = torch.randn(n, device=device, dtype=dtype)
            t = _timed(lambda: a @ b, device, min_time=0.05, max_reps=3)
            if t > 0.25 or n >= (8192 if device.type == "cuda" else 2048):
                # a plain product and a Linear (addmm): on some CPUs they take different kernels
                t_mm = _timed(lambda: a @ b, device, min_time=min_time, max_reps=10)
                t_lin = _timed(lambda: torch.nn.functional.linear(a, b, bias), device, min_time=min_time, max_reps=10)
                best = 2 * n**3 / min(t_mm, t_lin) / 1e9
                out[f"matmul_{name}_gflops_mm"] = 2 * n**3 / t_mm / 1e9
                out[f"matmul_{name}_gflops_linear"] = 2 * n**3 / t_lin / 1e9
                break
            n *= 2
        out[f"matmul_{name}_gflops"] = best
        out[f"matmul_{name}_size"] = n
    if device.type == "cpu":
        # a UNETR-decoder-like convolution: 16 -> 16 channels, 3^3 kernel, on a 24^3 map
        x = torch.randn(2, 16, 24, 24, 24)  # batch 2: PyTorch's oneDNN path, as in training
        w = torch.randn(16, 16, 3, 3, 3)
        flops = 2 * 2 * 16 * 16 * 27 * 24**3
        with torch.inference_mode():
            t32 = _timed(lambda: torch.nn.functional.conv3d(x, w, padding=1), device, min_time=0.3, max_reps=5)
            xb, wb = x.bfloat16(), w.bfloat16()
            t16 = _timed(lambda: torch.nn.functional.conv3d(xb, wb, padding=1), device, min_time=0.3, max_reps=2)
        out["conv3d_fp32_gflops"] = flops / t32 / 1e9
        out["conv3d_bf16_gflops"] = flops / t16 / 1e9
    out["load_end"] = load()
    return out


# --------------------------------------------------------------------------------------------------
# FLOP counting (FlopCounterMode knows the CUDA attention kernels; add the CPU flash-attention ones)
# --------------------------------------------------------------------------------------------------

def _register_cpu_sdpa_flops() -> None:
    from torch.utils import flop_counter as fc

    aten = torch.ops.aten
    pairs = [("_scaled_dot_product_flash_attention_for_cpu", aten._scaled_dot_product_flash_attention),
             ("_scaled_dot_product_flash_attention_for_cpu_backward", aten._scaled_dot_product_flash_attention_backward)]
    for name, cuda_op in pairs:
        op = getattr(aten, name, None)
        formula = fc.flop_registry.get(cuda_op)
        if op is None or formula is None or op in fc.flop_registry:
            continue
        # same arguments first (query, key, value / grad_out, query, key, value): the same formula applies
        fc.register_flop_formula(op, get_raw=True)(formula)


def count_flops(fn: Callable[[], Any]) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


# --------------------------------------------------------------------------------------------------
# memory
# --------------------------------------------------------------------------------------------------

_LIBC = None


def _malloc_trim() -> None:
    global _LIBC
    try:
        if _LIBC is None:
            _LIBC = ctypes.CDLL("libc.so.6")
        _LIBC.malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _status_kb(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def hwm_available() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return _status_kb("VmHWM") is not None
    except OSError:
        return False


class MemoryProbe:
    """Peak memory of one step above what was resident before it (MiB)."""

    def __init__(self, device: torch.device, method: str):
        self.device, self.method = device, method
        self.base = 0

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        elif self.method == "hwm":
            gc.collect()
            _malloc_trim()  # return freed heap pages, so that the RSS is what is alive
            self.base = _status_kb("VmRSS") or 0
            Path("/proc/self/clear_refs").write_text("5")  # high-water mark := current RSS

    def stop(self) -> float | None:
        if self.device.type == "cuda":
            return (torch.cuda.max_memory_allocated(self.device) - self.base) / 2**20
        if self.method == "hwm":
            return ((_status_kb("VmHWM") or 0) - self.base) / 1024
        return None


# --------------------------------------------------------------------------------------------------
# the two sides of each task
# --------------------------------------------------------------------------------------------------

@dataclass
class Impl:
    """One side of a pair: ``prepare`` runs untimed before each step, ``run`` is the timed step."""

    name: str
    run: Callable[[], Any]
    prepare: Callable[[], Any] = lambda: None
    params: int = 0
    flops: int | None = None
    flops_note: str = ""
    extra: dict = field(default_factory=dict)
    warm: Callable[[], Any] | None = None  # a cheaper warm-up than ``run`` (predict: one batch of windows)


def autocast(device: torch.device, precision: str):
    """medmim's own autocast (the engine's), for both sides alike."""
    from medmim.runtime import autocast as medmim_autocast

    return medmim_autocast(precision, device)


ADAMW_FUSED_BOTH = False  # --adamw fused
COMPILE = False  # --compile
ORDER = "interleaved"  # --order


def make_optimizer(model: nn.Module, side: str) -> torch.optim.Optimizer:
    # medmim: as its engine, fused AdamW; MONAI ships no optimizer: PyTorch's default AdamW, what a user of
    # MONAI's networks gets (for-loop on CPU, foreach on CUDA), unless --adamw fused gives both the fused one
    fused = True if side == "medmim" or ADAMW_FUSED_BOTH else None
    return torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05, fused=fused)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def medmim_vit(c: dict):
    from medmim.models import ViT3D

    return ViT3D(in_channels=1, img_size=c["img"], patch_size=c["patch"], hidden_size=c["hidden"],
                 num_layers=c["layers"], num_heads=c["heads"], mlp_dim=c["mlp"], pos_embed="sincos", qkv_bias=True)


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, l1: bool = False) -> torch.Tensor:
    """pred, target: [N, L, P]; mask: [N, L], 1 = masked."""
    diff = pred.float() - target
    per_patch = (diff.abs() if l1 else diff.square()).mean(-1)
    mask = mask.to(per_patch.dtype)
    return (per_patch * mask).sum() / mask.sum()


def train_impl(name: str, model: nn.Module, loss_fn: Callable[[], torch.Tensor], device: torch.device,
               precision: str) -> Impl:
    opt = make_optimizer(model, name)
    if COMPILE:  # both sides alike: forward and loss through torch.compile (inductor)
        loss_fn = torch.compile(loss_fn)

    def run():
        with autocast(device, precision):
            loss = loss_fn()
        loss.backward()
        opt.step()
        return loss

    return Impl(name, run, prepare=lambda: opt.zero_grad(set_to_none=True), params=n_params(model))


def build_mae(c: dict, device: torch.device, precision: str, x: torch.Tensor) -> list[Impl]:
    from monai.networks.nets import MaskedAutoEncoderViT

    from medmim.models import MAE3D
    from medmim.models.layers import patchify

    torch.manual_seed(0)
    ours = MAE3D(encoder=medmim_vit(c), mask_ratio=c["mask_ratio"], decoder_dim=c["dec_dim"],
                 decoder_depth=c["dec_depth"], decoder_heads=c["dec_heads"], loss="l2").to(device).train()
    theirs = MaskedAutoEncoderViT(
        in_channels=1, img_size=c["img"], patch_size=c["patch"], hidden_size=c["hidden"], mlp_dim=c["mlp"],
        num_layers=c["layers"], num_heads=c["heads"], masking_ratio=c["mask_ratio"],
        decoder_hidden_size=c["dec_dim"], decoder_mlp_dim=4 * c["dec_dim"], decoder_num_layers=c["dec_depth"],
        decoder_num_heads=c["dec_heads"], proj_type="conv", pos_embed_type="sincos",
        decoder_pos_embed_type="learnable",  # MONAI's sin-cos needs a width divisible by 6
        qkv_bias=True).to(device).train()
    patch = (c["patch"],) * 3
    target = patchify(x, patch)[0]  # the Conv3d's token order, MONAI's as well
    if precision != "fp32":
        # MONAI 1.6.1's MaskedAutoEncoderViT fails under autocast: it index-puts the (bf16) decoder tokens into
        # an fp32 tensor of mask tokens. Casting decoder_embed's output to fp32 (one hook) lets it run.
        theirs.decoder_embed.register_forward_hook(lambda mod, inp, out: out.float())

    def monai_loss():
        pred, mask = theirs(x)  # [N, L, P], [N, L] (1 = masked)
        return masked_mse(pred, target, mask)

    return [train_impl("medmim", ours, lambda: ours(x).loss, device, precision),
            train_impl("monai", theirs, monai_loss, device, precision)]


def build_simmim(c: dict, device: torch.device, precision: str, x: torch.Tensor) -> list[Impl]:
    from monai.networks.nets import ViT

    from medmim.models import SimMIM3D
    from medmim.models.layers import patchify
    from medmim.models.masking import random_masking

    torch.manual_seed(0)
    ours = SimMIM3D(encoder=medmim_vit(c), mask_ratio=c["mask_ratio"], decoder_depth=0, loss="l1").to(device).train()
    vit = ViT(in_channels=1, img_size=c["img"], patch_size=c["patch"], hidden_size=c["hidden"], mlp_dim=c["mlp"],
              num_layers=c["layers"], num_heads=c["heads"], proj_type="conv", pos_embed_type="sincos",
              classification=False, qkv_bias=True)
    theirs = nn.ModuleDict({"vit": vit, "head": nn.Linear(c["hidden"], c["patch"] ** 3)}).to(device).train()
    patches, grid = patchify(x, (c["patch"],) * 3)

    def monai_loss():
        mask = random_masking(x.shape[0], grid, mask_ratio=c["mask_ratio"], device=x.device).mask
        feats, _ = theirs["vit"](x)  # [N, L, E], all tokens (no mask token: MONAI's ViT has none)
        return masked_mse(theirs["head"](feats), patches, mask, l1=True)

    return [train_impl("medmim", ours, lambda: ours(x).loss, device, precision),
            train_impl("monai", theirs, monai_loss, device, precision)]


def monai_unetr(c: dict):
    """MONAI's UNETR; at a patch other than 16 or a depth other than 12, resized like medmim's (see module doc)."""
    from monai.networks.nets import UNETR as MonaiUNETR

    kw = dict(in_channels=1, out_channels=c["num_classes"], img_size=c["img"], feature_size=c["feature_size"],
              hidden_size=c["hidden"], mlp_dim=c["mlp"], num_heads=c["heads"], proj_type="conv",
              norm_name="instance", conv_block=True, res_block=True, qkv_bias=True)
    if c["patch"] == 16 and c["layers"] == 12:
        return MonaiUNETR(**kw)
    return MonaiUNETRAnyPatch(patch=c["patch"], num_layers=c["layers"], **kw)


def _monai_unetr_any_patch_class():
    from monai.networks.blocks import UnetrUpBlock
    from monai.networks.nets import UNETR as MonaiUNETR
    from monai.networks.nets import ViT

    class _MonaiUNETRAnyPatch(MonaiUNETR):
        """MONAI's UNETR with its ViT built for ``patch`` / ``num_layers`` and the last stage upsampling
        ``patch / 8``; skips at blocks (s, 2s, 3s), s = num_layers // 4 (MONAI's 3, 6, 9 at 12 blocks)."""

        def __init__(self, *, patch: int, num_layers: int, **kw):
            super().__init__(**kw)
            img = kw["img_size"]
            self.patch_size = (patch,) * 3
            self.feat_size = (img // patch,) * 3
            self.proj_view_shape = list(self.feat_size) + [self.hidden_size]
            self.num_layers = num_layers
            self.vit = ViT(in_channels=kw["in_channels"], img_size=img, patch_size=patch,
                           hidden_size=kw["hidden_size"], mlp_dim=kw["mlp_dim"], num_layers=num_layers,
                           num_heads=kw["num_heads"], proj_type=kw["proj_type"], classification=False,
                           qkv_bias=kw["qkv_bias"])
            f = kw["feature_size"]
            self.decoder2 = UnetrUpBlock(spatial_dims=3, in_channels=f * 2, out_channels=f, kernel_size=3,
                                         upsample_kernel_size=patch // 8, norm_name=kw["norm_name"],
                                         res_block=kw["res_block"])

        def forward(self, x_in):
            s = self.num_layers // 4
            x, hidden = self.vit(x_in)
            enc1 = self.encoder1(x_in)
            enc2 = self.encoder2(self.proj_feat(hidden[s]))
            enc3 = self.encoder3(self.proj_feat(hidden[2 * s]))
            enc4 = self.encoder4(self.proj_feat(hidden[3 * s]))
            dec3 = self.decoder5(self.proj_feat(x), enc4)
            dec2 = self.decoder4(dec3, enc3)
            dec1 = self.decoder3(dec2, enc2)
            return self.out(self.decoder2(dec1, enc1))

    return _MonaiUNETRAnyPatch


def MonaiUNETRAnyPatch(**kw):  # noqa: N802 (a class, built lazily: MONAI is imported on first use)
    return _monai_unetr_any_patch_class()(**kw)


def unetr_pair(c: dict):
    """medmim's UNETR and MONAI's with the same weights."""
    from medmim.models import UNETR, encoder_to_monai_vit

    torch.manual_seed(0)
    ours = UNETR(encoder=medmim_vit(c), num_classes=c["num_classes"], feature_size=c["feature_size"])
    theirs = monai_unetr(c)
    state = {k: v for k, v in ours.state_dict().items() if not k.startswith("vit.")}
    state.update({f"vit.{k}": v for k, v in encoder_to_monai_vit(ours.state_dict()).items()})
    theirs.load_state_dict(state, strict=True)
    return ours, theirs


def build_unetr(c: dict, device: torch.device, precision: str, x: torch.Tensor) -> list[Impl]:
    from monai.losses import DiceCELoss

    ours, theirs = unetr_pair(c)
    ours, theirs = ours.to(device).train(), theirs.to(device).train()
    g = torch.Generator().manual_seed(1)
    y = torch.randint(0, c["num_classes"], (x.shape[0], 1, *x.shape[2:]), generator=g).to(device)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)  # as medmim's engine
    return [train_impl("medmim", ours, lambda: loss_fn(ours(x).float(), y), device, precision),
            train_impl("monai", theirs, lambda: loss_fn(theirs(x).float(), y), device, precision)]


def window_count(shape, roi, overlap: float) -> int:
    """Windows MONAI's sliding_window_inference visits over a volume."""
    try:
        from monai.data.utils import dense_patch_slices
        from monai.inferers.utils import _get_scan_interval

        roi_t = tuple(min(r, s) for r, s in zip(roi, shape))
        return len(dense_patch_slices(shape, roi_t, _get_scan_interval(shape, roi_t, 3, (overlap,) * 3)))
    except ImportError:
        n = 1
        for s, r in zip(shape, roi):
            step = max(int(r * (1 - overlap)), 1)
            n *= 1 if s <= r else math.ceil((s - r) / step) + 1
        return n


def predict_volume(c: dict, quick: bool) -> np.ndarray:
    """A smooth random volume in [0, 1] (a preprocessed CT's range): [1, X, Y, Z] float32."""
    shape = (96, 96, 48) if quick and c is CONFIGS["demo"] else tuple(c["volume"])
    g = torch.Generator().manual_seed(2)
    coarse = torch.rand(1, 1, *(max(s // 8, 2) for s in shape), generator=g)
    vol = torch.nn.functional.interpolate(coarse, size=shape, mode="trilinear", align_corners=False)[0]
    return vol.numpy().astype(np.float32)


def build_predict(c: dict, device: torch.device, precision: str, volume: np.ndarray, same: bool) -> list[Impl]:
    from monai.inferers import sliding_window_inference

    from medmim.config import config_from_dict
    from medmim.eval.inference import PredictOptions, Predictor

    ours, theirs = unetr_pair(c)
    roi = (c["img"],) * 3
    cfg = config_from_dict({"task": "finetune", "model": {
        "img_size": list(roi), "patch_size": [c["patch"]] * 3, "hidden_size": c["hidden"], "num_layers": c["layers"],
        "num_heads": c["heads"], "mlp_dim": c["mlp"], "num_classes": c["num_classes"],
        "feature_size": c["feature_size"]}})
    opts = PredictOptions(precision=precision, device=device.type)
    predictor = Predictor(ours, cfg, opts)
    theirs = theirs.to(device).eval()
    x = torch.from_numpy(volume)[None].to(device)  # [1, C, X, Y, Z], where a MONAI user would put it

    def monai_default():
        with torch.inference_mode(), autocast(device, precision):
            logits = sliding_window_inference(x, roi, 1, theirs)  # MONAI's defaults: overlap 0.25, constant
        return torch.softmax(logits.float(), dim=1)[0]

    def monai_same():
        with torch.inference_mode(), autocast(device, precision):
            logits = sliding_window_inference(x, roi, opts.sw_batch_size, theirs, overlap=opts.overlap,
                                              mode="gaussian")
        return torch.softmax(logits.float(), dim=1)[0]

    impls = [Impl("medmim", lambda: predictor.probabilities(volume), params=n_params(ours)),
             Impl("monai", monai_default, params=n_params(theirs))]
    shape = volume.shape[1:]
    impls[0].extra = {"windows": window_count(shape, roi, opts.overlap), "sw_batch_size": opts.sw_batch_size,
                      "overlap": opts.overlap, "mode": "gaussian"}
    impls[1].extra = {"windows": window_count(shape, roi, 0.25), "sw_batch_size": 1, "overlap": 0.25,
                      "mode": "constant"}
    if same:
        impls.append(Impl("monai-same", monai_same, params=n_params(theirs)))
        impls[2].extra = dict(impls[0].extra)
    # FLOPs: one window through each network, times the windows visited
    win = torch.zeros(1, 1, *roi, device=device)
    for impl, net in zip(impls, (predictor.model, theirs, theirs)):
        with torch.inference_mode():
            per_window = count_flops(lambda: net(win))
        impl.flops = per_window * impl.extra["windows"]
        impl.flops_note = f"{per_window / 1e9:.1f} GFLOP per window x {impl.extra['windows']} windows"

        def warm(net=net, n=impl.extra["sw_batch_size"]):  # one batch of windows, as the first step would run
            with torch.inference_mode(), autocast(device, precision):
                net(win.expand(n, -1, -1, -1, -1))

        impl.warm = warm
    return impls


# --------------------------------------------------------------------------------------------------
# running a pair
# --------------------------------------------------------------------------------------------------

def build_case(task: str, cname: str, device: torch.device, precision: str, quick: bool, same: bool) -> list[Impl]:
    c = CONFIGS[cname]
    if task == "predict":
        return build_predict(c, device, precision, predict_volume(c, quick), same)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(c["batch"], 1, c["img"], c["img"], c["img"], generator=g).to(device)
    return {"mae": build_mae, "simmim": build_simmim, "unetr": build_unetr}[task](c, device, precision, x)


def run_case(impls: list[Impl], device: torch.device, warmup: int, repeats: int, memory: str,
             keep: tuple[str, ...] = ()) -> dict:
    """Interleave the sides step by step (order alternating), or with ``--order blocked`` run each side's
    steps one after the other (each side then allocates as it would alone); count FLOPs in the first
    warm-up step.

    Memory is measured in one more, untimed, step per side after the timed ones (on CPU, freeing the heap
    for an exact high-water mark makes the next step page-fault its memory in again: not in a timed step).
    ``keep``: sides whose last output is returned under ``"outputs"`` (not written to the results).
    """
    probe = MemoryProbe(device, memory)
    times: dict[str, list[float]] = {i.name: [] for i in impls}
    outputs: dict[str, Any] = {}
    if ORDER == "blocked":
        schedule = [(it, impl) for impl in impls for it in range(warmup + repeats)]
    else:
        schedule = [(it, impl) for it in range(warmup + repeats) for impl in (impls if it % 2 == 0 else impls[::-1])]
    for it, impl in schedule:
        impl.prepare()
        if it == 0 and impl.flops is None:
            impl.flops = count_flops(impl.run)  # the first warm-up step, counted (untimed)
            continue
        if it < warmup and impl.warm is not None:
            impl.warm()
            continue
        sync(device)
        t0 = time.perf_counter()
        out = impl.run()
        sync(device)
        dt = time.perf_counter() - t0
        if impl.name in keep and it == warmup + repeats - 1:
            outputs[impl.name] = out
        del out
        if it >= warmup:
            times[impl.name].append(dt)
    mem: dict[str, float | None] = {}
    for impl in impls:
        if memory in ("none", "subprocess") or impl.name == "monai-same":
            mem[impl.name] = None
            continue
        impl.prepare()
        sync(device)
        probe.start()
        out = impl.run()
        sync(device)
        mem[impl.name] = probe.stop()
        del out
    res: dict[str, Any] = {"sides": {}, "outputs": outputs}
    for impl in impls:
        t = times[impl.name]
        res["sides"][impl.name] = {
            "step_s_median": statistics.median(t), "step_s_min": min(t), "step_s_all": t, "params": impl.params,
            "flops": impl.flops, "flops_note": impl.flops_note, "peak_mem_mib": mem[impl.name], **impl.extra}
    ref = times[impls[0].name]
    for impl in impls[1:]:
        ratios = [a / b for a, b in zip(ref, times[impl.name])]
        res[f"ratio_vs_{impl.name}"] = statistics.median(ratios)
        res[f"ratios_vs_{impl.name}"] = ratios
    return res


def memory_subprocess(task: str, cname: str, precision: str, side: str, device: str, quick: bool) -> dict:
    """Peak RSS of one step of one side in a fresh process (``resource.getrusage``)."""
    cmd = [sys.executable, __file__, "--_memory-probe", json.dumps(
        {"task": task, "config": cname, "precision": precision, "side": side, "device": device, "quick": quick,
         "threads": torch.get_num_threads()})]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    for line in out.stdout.splitlines()[::-1]:
        if line.startswith("{"):
            return json.loads(line)
    return {"error": (out.stderr or out.stdout)[-400:]}


def _memory_probe_main(spec: dict) -> None:
    import resource

    device = torch.device(spec["device"])
    torch.set_num_threads(spec.get("threads") or torch.get_num_threads())
    impls = {i.name: i for i in build_case(spec["task"], spec["config"], device, spec["precision"], spec["quick"],
                                           same=False)}
    impl = impls[spec["side"]]
    gc.collect()
    _malloc_trim()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    rss0 = (_status_kb("VmRSS") or 0) / 1024
    for _ in range(1 if spec["task"] == "predict" else 2):  # training: the 2nd step has the optimizer state
        impl.prepare()
        impl.run()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"peak_rss_mib": peak, "rss_before_mib": rss0, "peak_before_mib": before,
                      "peak_delta_mib": peak - rss0}))


# --------------------------------------------------------------------------------------------------
# bf16 feasibility, estimates
# --------------------------------------------------------------------------------------------------

def bf16_skip_reason(task: str, cname: str, device: torch.device, peaks: dict, policy: str) -> str | None:
    if policy == "all" or device.type == "cuda":
        return None
    mm = peaks["matmul_bf16_gflops"] / peaks["matmul_fp32_gflops"]
    conv = peaks.get("conv3d_bf16_gflops", 0) / max(peaks.get("conv3d_fp32_gflops", 1), 1e-9)
    if mm >= 0.8 and conv >= 0.8:
        return None  # a CPU with usable bf16
    if task in ("unetr", "predict") and conv < 0.5:
        return (f"this CPU runs bf16 3D convolutions at {conv:.3f}x its fp32 rate (no native bf16): "
                "not run (--bf16 all runs it)")
    if cname == "paper" and mm < 0.5:
        return (f"this CPU runs bf16 matmuls at {mm:.3f}x its fp32 rate (no native bf16): the paper configuration "
                "is not run in bf16 (--bf16 all runs it); see the demo configuration's bf16 rows")
    return None


# --------------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------------

def _fmt(v, spec=".3f", none="-"):
    return none if v is None else format(v, spec)


def render(r: dict) -> str:
    p = r["peaks"]
    lines = [
        "# medmim vs MONAI: training steps and sliding-window inference",
        "",
        f"Device: {r['device']}; {r['threads']} threads; torch {r['versions']['torch']}, MONAI "
        f"{r['versions']['monai']}; memory: {r['memory_method']}. Load averages (1, 5, 15 min) at start "
        f"{r['load_start']}, at end {r['load_end']}; run took {r['seconds'] / 60:.1f} min.",
        "",
        *([f"**Warning**: {r['warning']}.", ""] if r.get("warning") else []),
        f"Peaks: matmul fp32 {p['matmul_fp32_gflops']:.1f} GFLOP/s, bf16 {p['matmul_bf16_gflops']:.1f} GFLOP/s"
        + (f"; conv3d fp32 {p['conv3d_fp32_gflops']:.1f}, bf16 {p['conv3d_bf16_gflops']:.2f} GFLOP/s"
           if "conv3d_fp32_gflops" in p else "") + f" (load {p['load_start']} -> {p['load_end']}).",
        "",
        "Times are medians after warm-up; *ratio* is the median over repeats of medmim / MONAI for steps run back to "
        "back (< 1: medmim faster). MFU: counted FLOPs / time / "
        + ("the GPU's measured bf16 matmul peak (fp32 rows: cuDNN may run convolutions in TF32)"
           if r.get("device_type") == "cuda" else "matmul peak of that precision")
        + ". Memory: peak of a step above what was resident before it. AdamW: "
        + ("the fused implementation on both sides." if r.get("adamw") == "fused" else
           "medmim's engine uses the fused one; MONAI's networks get PyTorch's default AdamW (no MONAI optimizer).")
        + (" Training steps run through torch.compile on both sides." if r.get("compile") else "")
        + (" Order: each side's steps one after the other (blocked), not alternating."
           if r.get("order") == "blocked" else "")
        + " Crops per training step: " + ", ".join(f"{k} {v['batch']}" for k, v in r["configs"].items()) + ".",
        "",
        "| task | config | prec | medmim s | MONAI s | ratio | runs | medmim GFLOP | MONAI GFLOP | medmim MFU | "
        "MONAI MFU | medmim MiB | MONAI MiB | load 1-min |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    notes = []
    mfu_key = "mfu_vs_bf16_peak" if r.get("device_type") == "cuda" else "mfu"
    for case in r["cases"]:
        head = f"| {case['task']} | {case['config']} | {case['precision']} |"
        if "skipped" in case:
            lines.append(head + " skipped | | | | | | | | | | |")
            notes.append(f"{case['task']} / {case['config']} / {case['precision']}: {case['skipped']}")
            continue
        if "error" in case:
            lines.append(head + " error | | | | | | | | | | |")
            notes.append(f"{case['task']} / {case['config']} / {case['precision']}: ERROR {case['error']}")
            continue
        sides = case["sides"]
        a = sides["medmim"]
        for other in [k for k in sides if k != "medmim"]:
            b = sides[other]
            label = case["task"] if other == "monai" else f"{case['task']} ({other})"
            lines.append(
                f"| {label} | {case['config']} | {case['precision']} | {a['step_s_median']:.3f} | "
                f"{b['step_s_median']:.3f} | **{case[f'ratio_vs_{other}']:.2f}** | {len(a['step_s_all'])} | "
                f"{_fmt(a['flops'] and a['flops'] / 1e9, '.1f')} | {_fmt(b['flops'] and b['flops'] / 1e9, '.1f')} | "
                f"{_fmt(a.get(mfu_key), '.1%')} | {_fmt(b.get(mfu_key), '.1%')} | {_fmt(a['peak_mem_mib'], '.0f')} | "
                f"{_fmt(b['peak_mem_mib'], '.0f')} | {case['load_start'][0]} -> {case['load_end'][0]} |")
        if case["task"] == "predict":
            notes.append(f"predict / {case['config']} / {case['precision']}: volume {case['volume']}; "
                         + "; ".join(f"{k}: {v['windows']} windows (sw_batch_size {v['sw_batch_size']}, overlap "
                                     f"{v['overlap']}, {v['mode']})" for k, v in sides.items())
                         + (f"; max |p_medmim - p_monai-same| = {case['max_abs_diff_same']:.2e}"
                            if "max_abs_diff_same" in case else ""))
    if r.get("memory_subprocess"):
        lines += ["", "Peak RSS in a fresh process per measurement (resource.getrusage; MiB):", "",
                  "| task | config | prec | side | peak RSS | RSS before step | step delta |", "|---|---|---|---|---:|---:|---:|"]
        for m in r["memory_subprocess"]:
            lines.append(f"| {m['task']} | {m['config']} | {m['precision']} | {m['side']} | "
                         f"{_fmt(m.get('peak_rss_mib'), '.0f')} | {_fmt(m.get('rss_before_mib'), '.0f')} | "
                         f"{_fmt(m.get('peak_delta_mib'), '.0f')} |")
    if notes:
        lines += ["", "Notes:", ""] + [f"- {n}" for n in notes]
    lines.append("")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="demo configuration only, fewer repeats, smaller volume")
    ap.add_argument("--configs", default=None, help="comma list of paper,demo,v2 (default: all three; --quick: demo)")
    ap.add_argument("--tasks", default=",".join(TASKS), help=f"comma list of {','.join(TASKS)}")
    ap.add_argument("--precisions", default="fp32,bf16")
    ap.add_argument("--bf16", choices=("auto", "all"), default="auto",
                    help="auto: skip bf16 cases that a CPU without native bf16 cannot run in reasonable time")
    ap.add_argument("--same-settings", choices=("auto", "all", "none"), default="auto",
                    help="also time MONAI at medmim's predict settings (auto: demo configuration, or on CUDA)")
    ap.add_argument("--memory", choices=("auto", "hwm", "subprocess", "none"), default="auto",
                    help="CPU peak memory: in-process high-water mark (hwm, default where available) or a fresh "
                         "process per measurement (subprocess: adds one run of each step)")
    ap.add_argument("--adamw", choices=("defaults", "fused"), default="defaults",
                    help="defaults: medmim's engine (fused AdamW) vs PyTorch's default AdamW for MONAI's networks; "
                         "fused: the fused AdamW for both sides (the networks alone compared)")
    ap.add_argument("--order", choices=("interleaved", "blocked"), default="interleaved",
                    help="interleaved: the sides' steps alternate (load drift cancels in the ratios); blocked: each "
                         "side's steps run one after the other, so each allocates memory as it would alone")
    ap.add_argument("--compile", action="store_true", help="torch.compile each training step's forward + loss, "
                    "for both sides (the first, compiling, steps fall in the warm-up)")
    ap.add_argument("--batch", type=int, default=None,
                    help="crops per training step for every configuration (default: the paper's 2, the demo's 4)")
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", type=Path, default=HERE / "results")
    ap.add_argument("--name", default="train", help="output file stem")
    ap.add_argument("--_memory-probe", dest="memory_probe", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    global ADAMW_FUSED_BOTH, COMPILE, ORDER
    ADAMW_FUSED_BOTH = args.adamw == "fused"
    ORDER = args.order
    COMPILE = args.compile
    if args.memory_probe:
        _register_cpu_sdpa_flops()
        _memory_probe_main(json.loads(args.memory_probe))
        return

    t_start = time.perf_counter()
    device = torch.device(args.device)
    if args.batch:
        for c in CONFIGS.values():
            c["batch"] = args.batch
    _register_cpu_sdpa_flops()
    configs = (args.configs or ("demo" if args.quick else "paper,demo,v2")).split(",")
    tasks = [t for t in args.tasks.split(",") if t]
    precisions = args.precisions.split(",")
    memory = args.memory
    if device.type == "cuda":
        memory = "cuda"
    elif memory == "auto":
        memory = "hwm" if hwm_available() else "subprocess"
    table = REPEATS["cuda" if device.type == "cuda" else ("cpu-quick" if args.quick else "cpu")]

    r: dict[str, Any] = {
        "device": cpu_info()["model"] if device.type == "cpu" else torch.cuda.get_device_name(device),
        "device_type": device.type, "adamw": args.adamw, "order": args.order, "compile": args.compile, "cpu": cpu_info(), "threads": torch.get_num_threads(), "quick": args.quick,
        "memory_method": memory,
        "versions": {"torch": torch.__version__, "monai": __import__("monai").__version__,
                     "python": platform.python_version()},
        "configs": {k: CONFIGS[k] for k in configs}, "load_start": load(), "cases": [],
    }
    print(f"# {r['device']}, {r['threads']} threads, load {r['load_start']}", flush=True)
    ncpu = os.cpu_count() or 1
    if device.type == "cpu" and r["threads"] > 1 and r["load_start"][0] > ncpu - r["threads"] + 0.5:
        # every parallel region waits for its slowest thread: on a busy machine one descheduled thread stalls
        # each of the thousands of small ops of a step, and step times become those of the scheduler
        r["warning"] = (f"load {r['load_start'][0]} on {ncpu} CPUs with {r['threads']} threads: timings are "
                        "dominated by OpenMP threads waiting for CPU time; consider --threads 1")
        print("WARNING: " + r["warning"], flush=True)
    r["peaks"] = peaks = measure_peaks(device, args.quick)
    print(f"peaks: {json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in peaks.items()})}", flush=True)
    peak_of = {"fp32": peaks["matmul_fp32_gflops"] * 1e9, "bf16": peaks["matmul_bf16_gflops"] * 1e9}

    for cname in configs:
        for task in tasks:
            for precision in precisions:
                case: dict[str, Any] = {"task": task, "config": cname, "precision": precision}
                reason = bf16_skip_reason(task, cname, device, peaks, args.bf16) if precision == "bf16" else None
                if reason:
                    case["skipped"] = reason
                    r["cases"].append(case)
                    print(f"{task:8s} {cname:6s} {precision}: skipped ({reason})", flush=True)
                    continue
                warmup, repeats = table[cname][task]
                warmup = max(1, args.warmup if args.warmup is not None else warmup)
                repeats = args.repeats if args.repeats is not None else repeats
                same = task == "predict" and (args.same_settings == "all" or (
                    args.same_settings == "auto" and (cname == "demo" or device.type == "cuda")))
                case["load_start"] = load()
                try:
                    impls = build_case(task, cname, device, precision, args.quick, same)
                    case.update(run_case(impls, device, warmup, repeats, memory,
                                         keep=("medmim", "monai-same") if same else ()))
                except Exception as e:  # one failing case must not lose the others
                    case["error"] = f"{type(e).__name__}: {e}"
                    r["cases"].append(case)
                    print(f"{task:8s} {cname:6s} {precision}: ERROR {case['error']}", flush=True)
                    continue
                case["load_end"] = load()
                case["warmup"], case["repeats"] = warmup, repeats
                if task == "predict":
                    vol = predict_volume(CONFIGS[cname], args.quick)
                    case["volume"] = list(vol.shape[1:])
                    outs = case["outputs"]
                    if same:  # same weights, same settings: the probabilities must agree
                        diff = outs["medmim"].float().cpu() - outs["monai-same"].float().cpu()
                        case["max_abs_diff_same"] = float(diff.abs().max())
                case.pop("outputs", None)
                for name, side in case["sides"].items():
                    if side["flops"]:
                        side["mfu"] = side["flops"] / side["step_s_median"] / peak_of[precision]
                        if device.type == "cuda":
                            side["mfu_vs_bf16_peak"] = side["flops"] / side["step_s_median"] / peak_of["bf16"]
                del impls
                gc.collect()
                r["cases"].append(case)
                s = case["sides"]
                print(f"{task:8s} {cname:6s} {precision}: medmim {s['medmim']['step_s_median']:.3f}s  MONAI "
                      f"{s['monai']['step_s_median']:.3f}s  ratio {case['ratio_vs_monai']:.2f}"
                      + (f"  (vs MONAI same settings {case['ratio_vs_monai-same']:.2f})" if same else "")
                      + f"  load {case['load_end']}", flush=True)

    if memory == "subprocess":
        r["memory_subprocess"] = []
        for case in r["cases"]:
            if "sides" not in case:
                continue
            for side in ("medmim", "monai"):
                m = memory_subprocess(case["task"], case["config"], case["precision"], side, args.device, args.quick)
                m.update(task=case["task"], config=case["config"], precision=case["precision"], side=side)
                case["sides"][side]["peak_mem_mib"] = m.get("peak_delta_mib")
                r["memory_subprocess"].append(m)
                print(f"memory {case['task']} {case['config']} {case['precision']} {side}: {m}", flush=True)

    r["load_end"] = load()
    r["seconds"] = time.perf_counter() - t_start
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(r, indent=1))
    (args.out / f"{args.name}.md").write_text(render(r))
    print(render(r))


if __name__ == "__main__":
    main()
