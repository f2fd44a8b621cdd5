"""Where and how a model runs: the device, mixed precision, seeding. One home for every stage.

    device = resolve_device("auto")           # cuda:0 if there is one, else cpu; "cuda" without one: error
    with autocast("bf16", device): ...       # fp32: no autocast; fp16 only on a GPU
"""

from __future__ import annotations

import random
from contextlib import nullcontext

import numpy as np
import torch

from medmim.errors import MedmimError

DEVICES = ("auto", "cpu", "cuda")


def resolve_device(pref: str = "auto", index: int = 0, setting: str = "run.device") -> torch.device:
    """``auto``: CUDA device ``index`` if CUDA is available, else the CPU. Asking for ``cuda`` on a machine
    without one is an error naming ``setting``, never a silent CPU run."""
    if pref not in DEVICES:
        raise MedmimError(f"{setting} must be one of {', '.join(DEVICES)}, got {pref!r}")
    if pref == "cuda" and not torch.cuda.is_available():
        raise MedmimError(f"{setting}=cuda but no CUDA device is available")
    if pref != "cpu" and torch.cuda.is_available():
        return torch.device("cuda", index)
    return torch.device("cpu")


def autocast(precision: str, device: torch.device):
    """The autocast context of ``precision`` (fp32, bf16, fp16) on ``device``."""
    if precision == "fp32":
        return nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    if device.type == "cpu" and dtype == torch.float16:
        raise MedmimError("train.precision=fp16 needs a GPU; use bf16 or fp32 on CPU")
    return torch.autocast(device_type=device.type, dtype=dtype)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
