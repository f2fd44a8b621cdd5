"""Training checkpoints: ``RUN/checkpoints/last.pt`` (and ``best.pt``), written atomically, read back for resume.

A checkpoint is a weights-only torch file: model, optimizer, scheduler, scaler, RNG, step, the config the
run was made with, and what the run read from its data (labels, lateral pairs, preprocessing).
"""

from __future__ import annotations

from pathlib import Path

import torch

from medmim.errors import MedmimError
from medmim.fileio import atomic_write

CKPT_DIR = "checkpoints"


def save_checkpoint(path: Path, state: dict) -> None:
    """Write atomically: a file killed mid-write never replaces the last good checkpoint."""
    try:
        atomic_write(path, lambda tmp: torch.save(state, tmp))
    except (OSError, RuntimeError) as e:  # torch's zip writer reports a failed write as RuntimeError
        why = e.strerror if isinstance(e, OSError) and e.strerror else " ".join(str(e).split())[:200]
        raise MedmimError(f"{path}: cannot write checkpoint ({why}); the previous one is intact; stopping")


def load_training_state(path: Path) -> dict:
    if not path.is_file():
        raise MedmimError(f"resume: {path}: checkpoint not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - a broken file of any kind is a bad input here
        raise MedmimError(f"resume: {path}: unreadable checkpoint ({type(e).__name__})")


def find_resume(resume: str | None, run_dir: Path) -> Path | None:
    """The checkpoint ``resume`` names: a path, or ``auto`` (the run folder's last one, if any)."""
    if resume is None:
        return None
    if resume == "auto":
        last = run_dir / CKPT_DIR / "last.pt"
        return last if last.is_file() else None
    return Path(resume)
