"""A study's cells: one value of every axis and one seed, with the overrides of both configs that they make.

Every cell fine-tunes in its own folder (``cells/SLUG``); cells whose pretraining would be the same run share it
(``pretrain/METHOD-KEY``, KEY a hash of the pretraining config's base, overrides and seed).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
from dataclasses import dataclass

from medmim.study.spec import Spec


def slug(text: str) -> str:
    """A folder name from any text: "50%" -> "50pct", runs of other characters -> "-"."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text.replace("%", "pct")).strip("-")


def group_name(values: dict[str, str]) -> str:
    """How a group of cells is named in tables: "method=mae, ratio=0.75"."""
    return ", ".join(f"{k}={v}" for k, v in values.items())


@dataclass(frozen=True)
class Cell:
    values: dict[str, str]  # axis -> label
    seed: int
    pretrain: list[str] | None  # overrides of the pretraining config, None = from scratch
    finetune: list[str]  # overrides of the fine-tuning config

    @property
    def group(self) -> str:
        return group_name(self.values)

    @property
    def slug(self) -> str:
        return slug("_".join(f"{k}-{v}" for k, v in self.values.items()) + f"_seed{self.seed}")

    def pretrain_seed(self, spec: Spec) -> int:
        return 0 if spec.share_pretraining else self.seed

    def pretrain_key(self, spec: Spec) -> str | None:
        """Equal for cells that pretrain the same way (they share the run); None for cells without pretraining."""
        if self.pretrain is None:
            return None
        blob = json.dumps([spec.pretrain.config, spec.pretrain.overrides, self.pretrain, self.pretrain_seed(spec)])
        return hashlib.blake2b(blob.encode(), digest_size=5).hexdigest()


def expand_cells(spec: Spec) -> list[Cell]:
    """Every combination of axis values (in the order of the axes) that the spec does not exclude, each with every
    seed."""
    cells = []
    for combo in itertools.product(*[axis.values for axis in spec.axes]):
        pre: list[str] | None = []
        fine: list[str] = []
        for v in combo:
            if v.pretrain is None:
                pre = None
            elif v.pretrain is not True and pre is not None:
                pre += v.pretrain
            fine += v.finetune + v.both
            if pre is not None:
                pre += v.both
        values = {axis.name: v.label for axis, v in zip(spec.axes, combo)}
        if spec.excluded(values):
            continue
        for seed in spec.seeds:
            cells.append(Cell(dict(values), seed, None if pre is None else list(pre), list(fine)))
    return cells
