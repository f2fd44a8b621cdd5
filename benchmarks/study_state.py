"""Carry a long study's finished runs from one machine to the next, through the repository.

A study that needs more hours than a session has (phantom-science-v2: ~11 h of training on 2 cores) resumes its
finished runs, but only where its folder survives; on machines that start from a fresh clone it does not. This
keeps what a finished run leaves that the study reads again, and nothing it can rebuild:

* a finished pretraining (``pretrain/X/done.json``): its summary, config, metrics and ``pretext.json``, and its final
  weights ``model.safetensors``, from which the fine-tuning cells start (the optimizer state is not kept);
* a finished fine-tuning cell: its summary, config, metrics (the curve), ``evaluation.json`` and ``reliance.json``
  with the per-case tables of both evaluations (its checkpoints are not kept, so a cell is kept only once both
  evaluations are written: they are what the report reads);
* a finished probe: its summary, config, metrics and ``evaluation.json``.

The phantom data, the prepared cache and pictures (overlays, previews) are not kept: the study writes the data
again, byte for byte, from its seed.
An unfinished run is not kept; it starts again from step 0 on the next machine.

    python benchmarks/study_state.py save    STUDY_DIR STATE_DIR   # after a session's runs
    python benchmarks/study_state.py restore STATE_DIR STUDY_DIR   # before the study runs again
    python benchmarks/study_state.py verify  STATE_DIR STUDY_DIR   # once the study has written its data again

``save`` also writes ``data.sha256``, the checksum of every file of the study's phantom dataset; ``verify`` checks
that the data written again on this machine is the same, byte for byte (exit status 2 where it is not), since runs
carried from another machine and runs made here must have seen the same data.

Both print what they copied; neither overwrites a file that is there already.
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import sys
from pathlib import Path

SMALL = 2 * 1024 * 1024  # bytes: larger files are left behind, except a pretraining's final weights
SKIP_DIRS = {"checkpoints", "previews", "preview"}


def _files(run: Path, keep_weights: bool):
    for p in sorted(run.rglob("*")):
        rel = p.relative_to(run)
        if not p.is_file() or SKIP_DIRS & set(rel.parts[:-1]) or p.name.startswith(("events.out.tfevents", ".")):
            continue
        if keep_weights and rel.as_posix() == "model.safetensors":
            yield p
        elif p.suffix not in (".pt", ".nii", ".gz", ".png") and p.stat().st_size <= SMALL:
            yield p


def finished_runs(study: Path):
    """(run folder, keep its final weights) for each finished run of the study that can be carried."""
    for run in sorted((study / "pretrain").glob("*")):
        if (run / "done.json").is_file() and (run / "model.safetensors").is_file():
            yield run, True
    for run in sorted((study / "cells").glob("*")):
        if all((run / f).is_file() for f in ("done.json", "evaluation.json", "reliance.json")):
            yield run, False
    for run in sorted((study / "probe").glob("*")):
        if all((run / f).is_file() for f in ("done.json", "evaluation.json")):
            yield run, False


def copy_new(src_root: Path, dst_root: Path, files) -> int:
    n = 0
    for p in files:
        dst = dst_root / p.relative_to(src_root)
        if dst.exists():
            continue
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(p, dst)
        print(f"  {dst}")
        n += 1
    return n


DATA_SUMS = "data.sha256"


def data_sums(study: Path) -> str:
    data = study / "phantom"
    lines = []
    for p in sorted(data.rglob("*")):
        if p.is_file():
            lines.append(f"{hashlib.sha256(p.read_bytes()).hexdigest()}  {p.relative_to(data).as_posix()}")
    return "\n".join(lines) + "\n"


def save(study: Path, state: Path) -> int:
    n = 0
    if (study / "phantom").is_dir():
        state.mkdir(parents=True, exist_ok=True)
        sums = data_sums(study)
        if (state / DATA_SUMS).is_file() and (state / DATA_SUMS).read_text(encoding="utf-8") != sums:
            print(f"study_state: {study / 'phantom'} differs from the data the runs in {state} saw", file=sys.stderr)
            return -1
        (state / DATA_SUMS).write_text(sums, encoding="utf-8")
    for run, weights in finished_runs(study):
        n += copy_new(study, state, _files(run, weights))
    return n


def restore(state: Path, study: Path) -> int:
    return copy_new(state, study, (p for p in sorted(state.rglob("*")) if p.is_file() and p.name != DATA_SUMS))


def verify(state: Path, study: Path) -> int:
    want = (state / DATA_SUMS).read_text(encoding="utf-8") if (state / DATA_SUMS).is_file() else None
    if want is None or want != data_sums(study):
        print(f"study_state: {study / 'phantom'} is not the data the runs in {state} saw"
              + (" (no data.sha256 there)" if want is None else
                 " (was it written by another version of the phantom?)"), file=sys.stderr)
        return -1
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("action", choices=["save", "restore", "verify"])
    ap.add_argument("src", type=Path)
    ap.add_argument("dst", type=Path)
    a = ap.parse_args(argv)
    if not a.src.is_dir():
        print(f"study_state: {a.src} is not a folder", file=sys.stderr)
        return 2
    n = {"save": save, "restore": restore, "verify": verify}[a.action](a.src, a.dst)
    if n < 0:
        return 2
    print(f"verify: {a.dst / 'phantom'} is the data the carried runs saw" if a.action == "verify"
          else f"{a.action}: {n} file(s) copied into {a.dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
