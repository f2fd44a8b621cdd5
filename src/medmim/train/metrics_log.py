"""``RUN/metrics.csv`` (one row per logged step and per validation) and TensorBoard scalars, on rank 0."""

from __future__ import annotations

import csv
import math
from pathlib import Path

from medmim.errors import MedmimError

# the columns every run has; a task adds its own (e.g. per-class validation Dice)
# (val_s: wall seconds the validation row took)
BASE_COLUMNS = ["step", "epoch", "time_s", "lr", "loss", "crops_per_s", "data_wait_frac", "val_loss", "val_s"]


class MetricsLog:
    """metrics.csv (columns fixed per task) and TensorBoard scalars in the run folder."""

    def __init__(self, run_dir: Path, columns: list[str], resume_step: int | None):
        self.path = run_dir / "metrics.csv"
        self.columns = columns
        self.run_dir = run_dir
        self.tb = None
        self.rewind(resume_step)

    def rewind(self, step: int | None) -> None:
        """Start the log (over) at ``step``: rows past it are dropped, as they will be redone."""
        from torch.utils.tensorboard import SummaryWriter

        rows = []
        try:
            if step is not None and self.path.is_file():
                with open(self.path, newline="", encoding="utf-8") as f:
                    rows = [r for r in csv.DictReader(f) if int(r["step"]) <= step]
            with open(self.path, "w", newline="", encoding="utf-8") as f:
                w = csv.DictWriter(f, fieldnames=self.columns)
                w.writeheader()
                for r in rows:
                    w.writerow({k: r.get(k, "") for k in self.columns})
        except OSError as e:
            raise MedmimError(f"{self.path}: cannot write the metrics log ({e.strerror or e})")
        if self.tb is not None:
            self.tb.close()
        self.tb = SummaryWriter(log_dir=str(self.run_dir), purge_step=step)

    def write(self, row: dict) -> None:
        try:
            with open(self.path, "a", newline="", encoding="utf-8") as f:
                csv.DictWriter(f, fieldnames=self.columns).writerow({k: row.get(k, "") for k in self.columns})
        except OSError as e:
            raise MedmimError(f"{self.path}: cannot write the metrics log ({e.strerror or e}); stopping")
        step = int(row["step"])
        for k, v in row.items():
            if k not in ("step", "epoch", "time_s") and isinstance(v, (int, float)) and math.isfinite(v):
                self.tb.add_scalar(k, v, step)
        self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
            self.tb = None
