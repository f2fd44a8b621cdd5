"""The fine-tuning length a pilot run gives, by the rule fixed in benchmarks/results/phantom-science-v2/pilot.yaml:
the first validation step at which the moving average of 3 consecutive validation Dice values reaches 98% of the
run's highest moving average, rounded up to a multiple of 100.

    python benchmarks/pilot_steps.py PILOT_RUN/metrics.csv
"""

from __future__ import annotations

import csv
import math
import sys
from pathlib import Path


def chosen_steps(curve: list[tuple[int, float]], window: int = 3, level: float = 0.98, multiple: int = 100) -> dict:
    ma = [(curve[i][0], sum(v for _, v in curve[i - window + 1:i + 1]) / window) for i in range(window - 1, len(curve))]
    best = max(v for _, v in ma)
    first = next(s for s, v in ma if v >= level * best)
    return {"best_moving_average": best, "first_step_at_level": first,
            "steps": int(math.ceil(first / multiple) * multiple), "last_step": curve[-1][0]}


def main() -> None:
    rows = list(csv.DictReader(Path(sys.argv[1]).read_text(encoding="utf-8").splitlines()))
    curve = [(int(r["step"]), float(r["val_dice"])) for r in rows if r.get("val_dice")]
    res = chosen_steps(curve)
    print(f"{len(curve)} validations up to step {res['last_step']}; highest 3-point moving average "
          f"{res['best_moving_average']:.4f}; 98% of it first reached at step {res['first_step_at_level']}; "
          f"fine-tuning length: {res['steps']} steps")


if __name__ == "__main__":
    main()
