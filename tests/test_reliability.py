"""Long runs survive faults: pre-emption signals, divergence, corrupted cached data, two runs on one folder,
a full disk. Tiny model (16^3 crops), a few steps each; only the signal tests start a subprocess."""

from __future__ import annotations

import csv
import errno
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from medmim.cli import main
from medmim.config import load_config
from medmim.data.prepare import PrepareSettings, prepare_dataset
from medmim.data.sampling import CropSampler, epoch_order, open_cache
from medmim.errors import MedmimError
from medmim.train import engine
from medmim.data.selection import pretrain_cases
from medmim.train.engine import Trainer, run_training
from medmim.train.guard import RunLock, StopSignals
from medmim.train.tasks import MaskedImageTask
from medmim.train.schedule import warmup_cosine
from tests.conftest import write_msd

TINY = ["data.roi_size=16", "model.img_size=16", "train.warmup_steps=0", "train.log_every=1", "train.val_every=1000",
        "train.preview_every=1000", "train.ckpt_every=1000", "data.num_workers=0"]
ENV = {**os.environ, "MEDMIM_NO_PROGRESS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
PEAK = 1e-3 * 2 / 4  # mae-tiny: lr 1e-3 for a base batch of 4, scaled to a batch of 2


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("reliability")
    root = write_msd(tmp / "ds", n_labeled=4, n_unlabeled=2, shape=(24, 24, 16))
    prepare_dataset(root, tmp / "cache", PrepareSettings(spacing=(1.5, 1.5, 2.0)))
    return tmp / "cache"


@pytest.fixture(autouse=True)
def _no_progress_bar(monkeypatch) -> None:
    monkeypatch.setenv("MEDMIM_NO_PROGRESS", "1")


def _cfg(cache: Path, run: Path, *extra: str):
    return load_config("mae-tiny", [f"data.path={cache}", f"run.dir={run}", *TINY, *extra])


def _rows(run: Path) -> list[dict]:
    with open(run / "metrics.csv", newline="", encoding="utf-8") as f:
        return [r for r in csv.DictReader(f) if r["loss"]]


def _ckpt_step(run: Path) -> int:
    return int(torch.load(run / "checkpoints" / "last.pt", weights_only=True)["step"])


def _training_order(cache: Path) -> tuple[list, list]:
    """(training cases, the same in the order the first epoch deals them with seed 0: shard 0 reads [0], shard 1 [1])."""
    train = pretrain_cases([open_cache(cache)], 0, 0).train
    return train, [train[int(i)] for i in epoch_order(len(train), 0, 0)]


def _flip_bytes(npy: Path) -> None:
    data = bytearray(npy.read_bytes())
    for i in range(len(data) - 64, len(data) - 32):  # voxels, not the .npy header
        data[i] ^= 0xFF
    npy.write_bytes(bytes(data))


class _Faults:
    """Patch the MAE task's forward: the n-th call (1-based) returns a NaN loss or, finite loss, NaN gradients."""

    def __init__(self, monkeypatch, nan_loss=(), nan_grad=(), from_call: int | None = None):
        self.calls = 0
        original = MaskedImageTask.forward

        class NanGrad(torch.autograd.Function):
            @staticmethod
            def forward(ctx, x):
                return x.clone()

            @staticmethod
            def backward(ctx, g):
                return g * float("nan")

        def forward(task, model, batch):
            self.calls += 1
            loss, out = original(task, model, batch)
            if self.calls in nan_loss or (from_call is not None and self.calls >= from_call):
                loss = loss * float("nan")
            elif self.calls in nan_grad:
                loss = NanGrad.apply(loss)
            return loss, out

        monkeypatch.setattr(MaskedImageTask, "forward", forward)


# --- pre-emption ---------------------------------------------------------------------------

def _start(cache: Path, run: Path, err: Path) -> subprocess.Popen:
    args = [sys.executable, "-m", "medmim", "pretrain", "mae-tiny", f"data.path={cache}", f"run.dir={run}",
            *TINY, "train.max_steps=100000"]
    with open(err, "w", encoding="utf-8") as f:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(args, env=ENV, stdout=subprocess.DEVNULL, stderr=f, start_new_session=True)


def _wait_for_rows(proc: subprocess.Popen, run: Path, n: int) -> None:
    deadline = time.time() + 150
    while time.time() < deadline and proc.poll() is None:
        if (run / "metrics.csv").is_file() and len(_rows(run)) >= n:
            return
        time.sleep(0.1)
    proc.kill()
    pytest.fail("the run did not start training in time")


def test_sigterm_finishes_the_step_checkpoints_and_resume_continues_there(cache: Path, tmp_path: Path) -> None:
    run, err = tmp_path / "run", tmp_path / "err.txt"
    proc = _start(cache, run, err)
    _wait_for_rows(proc, run, 2)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 128 + signal.SIGTERM  # 143: terminated by a signal, but cleanly
    text = err.read_text(encoding="utf-8")
    # the step under way was finished, logged and checkpointed: the checkpoint is at the last logged step
    stopped_at = _ckpt_step(run)
    assert stopped_at >= 2 and [int(r["step"]) for r in _rows(run)] == list(range(1, stopped_at + 1))
    assert f"medmim pretrain {run / 'config.yaml'} resume=auto" in text  # the command to continue, printed
    assert not list((run / "checkpoints").glob(".tmp-*")) and not (run / "model.safetensors").exists()

    # the printed command, in process: it continues at that step, on the same schedule
    before = _rows(run)
    cfg = load_config(run / "config.yaml", ["resume=auto", f"train.max_steps={stopped_at + 2}"])
    summary = run_training(cfg, log=lambda s: None)
    assert summary["steps"] == stopped_at + 2 and _ckpt_step(run) == stopped_at + 2
    rows = _rows(run)
    assert [int(r["step"]) for r in rows] == list(range(1, stopped_at + 3))
    assert rows[:stopped_at] == before  # resumed, not restarted: a fresh run would have rewritten these rows


def test_a_second_signal_exits_at_once(cache: Path, tmp_path: Path) -> None:
    run, err = tmp_path / "run", tmp_path / "err.txt"
    proc = _start(cache, run, err)
    _wait_for_rows(proc, run, 1)
    # both signals become pending while the process is stopped, so it handles them back to back:
    # SIGINT first (lower number), then SIGTERM, before the current step can finish
    os.kill(proc.pid, signal.SIGSTOP)
    os.kill(proc.pid, signal.SIGTERM)
    os.kill(proc.pid, signal.SIGINT)
    os.kill(proc.pid, signal.SIGCONT)
    # exit status 128 + SIGTERM from medmim's handler (a default death by SIGTERM would be -15; SIGINT
    # alone, 130), and no checkpoint: the second signal ended the run without finishing the step
    assert proc.wait(timeout=60) == 128 + signal.SIGTERM, err.read_text(encoding="utf-8")
    assert not (run / "checkpoints" / "last.pt").exists() and not (run / "model.safetensors").exists()


def test_signal_repeats_from_a_launcher_count_once(monkeypatch) -> None:
    exits = []
    monkeypatch.setattr(os, "_exit", exits.append)
    s = StopSignals(announce=False, under_launcher=True)  # torchrun forwards the scheduler's SIGTERM
    s.handle(signal.SIGTERM)
    s.handle(signal.SIGTERM)
    assert s.requested and exits == []
    s.handle(signal.SIGINT)  # a different signal is a second request
    assert exits == [128 + signal.SIGINT]
    plain = StopSignals(announce=False, under_launcher=False)
    plain.handle(signal.SIGINT)
    plain.handle(signal.SIGINT)  # Ctrl-C twice
    assert exits[-1] == 128 + signal.SIGINT


# --- divergence ----------------------------------------------------------------------------

def test_nan_steps_are_skipped_then_the_run_stops_keeping_the_last_good_checkpoint(cache, tmp_path, monkeypatch) -> None:
    run = tmp_path / "run"
    # calls: 1, 2 good (checkpoint at 2); 3 NaN gradients (skipped); 4, 5 good (checkpoint at 4); 6, 7, 8 NaN loss
    faults = _Faults(monkeypatch, nan_grad={3}, from_call=6)
    trainer = Trainer(_cfg(cache, run, "train.max_steps=20", "train.ckpt_every=2", "train.max_bad_steps=3"),
                      log=lambda s: None)
    with pytest.raises(MedmimError, match="training diverged: 3 step") as e:
        trainer.fit()
    assert faults.calls == 8
    assert f"the last good checkpoint {run / 'checkpoints' / 'last.pt'} (step 4) is kept" in str(e.value)
    assert trainer.step == 4 and trainer.scheduler.last_epoch == 4  # skipped steps moved neither
    assert faults.calls - trainer.step == 4  # 4 forward passes gave no update: the NaN-gradient one and 3 NaN losses
    assert _ckpt_step(run) == 4 and not (run / "model.safetensors").exists()
    weights = torch.load(run / "checkpoints" / "last.pt", weights_only=True)["model"]
    assert all(bool(torch.isfinite(w).all()) for w in weights.values())  # the NaN gradients never reached them
    assert [int(r["step"]) for r in _rows(run)] == [1, 2, 3, 4]
    assert all(np.isfinite(float(r["loss"])) for r in _rows(run))


def test_stop_policy_stops_at_the_first_bad_step(cache, tmp_path, monkeypatch, capsys) -> None:
    run = tmp_path / "run"
    _Faults(monkeypatch, from_call=2)
    code = main(["pretrain", "mae-tiny", f"data.path={cache}", f"run.dir={run}", *TINY, "train.max_steps=20",
                 "train.on_divergence=stop"])
    err = capsys.readouterr().err
    assert code == 2 and "training diverged: 1 step(s) in a row" in err
    assert "no checkpoint had been written" in err
    assert err.strip().splitlines()[-1].startswith("medmim: error: training diverged")


def test_rollback_reloads_the_checkpoint_with_a_lower_lr(cache, tmp_path, monkeypatch) -> None:
    run = tmp_path / "run"
    # 1, 2 good (ckpt 2); 3 bad -> back to 2 at lr x0.5; 4, 5 good (ckpt 4); 6 bad -> back to 4 at x0.25;
    # 7 good (step 5); 8 bad -> no rollback left: stop
    _Faults(monkeypatch, nan_loss={3, 6, 8})
    cfg = _cfg(cache, run, "train.max_steps=6", "train.ckpt_every=2", "train.on_divergence=rollback",
               "train.max_bad_steps=1", "train.max_rollbacks=2", "train.rollback_lr_factor=0.5")
    with pytest.raises(MedmimError, match=r"after 2 rollback\(s\)"):
        run_training(cfg, log=lambda s: None)
    rows = _rows(run)  # the two rollbacks show in the rates: x0.5 from step 3, x0.25 from step 5
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4, 5]  # steps redone after a rollback are logged once
    scale = {1: 1.0, 2: 1.0, 3: 0.5, 4: 0.5, 5: 0.25}
    for r in rows:
        s = int(r["step"])
        assert float(r["lr"]) == pytest.approx(scale[s] * warmup_cosine(s - 1, 6, 0, PEAK), rel=1e-6)
    state = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert state["step"] == 4 and state["lr_scale"] == 0.5  # a resume keeps the lowered rate


def test_fp16_overflow_is_left_to_the_grad_scaler() -> None:
    """Inf gradients under an active GradScaler are its business (it skips that update): not divergence."""
    model = torch.nn.Linear(2, 1)
    for p in model.parameters():
        p.grad = torch.full_like(p, float("inf"))

    class Scaler:
        enabled = True

        def is_enabled(self):
            return self.enabled

        def unscale_(self, optimizer):
            pass

    t = SimpleNamespace(cfg=SimpleNamespace(train=SimpleNamespace(grad_clip=1.0)), scaler=Scaler(), model=model,
                        optimizer=None)
    assert Trainer._unscale_clip_and_check(t) is None
    t.scaler.enabled = False
    assert Trainer._unscale_clip_and_check(t) == "non-finite gradient"
    t.cfg.train.grad_clip = None
    assert Trainer._unscale_clip_and_check(t) == "non-finite gradient"


# --- bad cached data -----------------------------------------------------------------------

def test_sampler_workers_report_the_cases_they_skip(cache: Path, tmp_path: Path) -> None:
    copy = tmp_path / "cache"
    shutil.copytree(cache, copy)
    train, order = _training_order(copy)
    _flip_bytes(order[0].folder / "image.npy")
    (order[1].folder / "label.npy").write_bytes(b"\x93NUMPY garbage")
    sampler = CropSampler(train, (8, 8, 8), 2, seed=0, epochs=1)
    items = list(DataLoader(sampler, batch_size=None, num_workers=2))
    reported = {line.split("\t")[0] for it in items for line in it["bad_cases"].splitlines()}
    assert reported == {str(order[0].folder), str(order[1].folder)}
    assert {it["case_id"] for it in items} == {c.case_id for c in order[2:]}
    assert any("checksum" in it["bad_cases"] for it in items) and any("unreadable" in it["bad_cases"] for it in items)


def test_a_corrupted_case_is_skipped_and_named_with_workers(cache: Path, tmp_path: Path) -> None:
    copy = tmp_path / "cache"
    shutil.copytree(cache, copy)
    bad = _training_order(copy)[1][0]  # the first case worker 0 reads
    _flip_bytes(bad.folder / "image.npy")
    logs: list[str] = []
    cfg = load_config("mae-tiny", [f"data.path={copy}", f"run.dir={tmp_path / 'run'}", *TINY, "train.max_steps=3",
                                   "data.num_workers=2", "data.max_bad_fraction=0.5"])
    summary = run_training(cfg, log=logs.append)
    assert summary["steps"] == 3 and summary["bad_cases"] == [str(bad.folder)]
    # and the run warned about it, naming the case and why (whatever the wording)
    assert any(bad.case_id in s and "checksum" in s for s in logs), logs


def test_too_many_bad_cases_stop_the_run(cache: Path, tmp_path: Path, capsys) -> None:
    copy = tmp_path / "cache"
    shutil.copytree(cache, copy)
    _, order = _training_order(copy)
    _flip_bytes(order[0].folder / "image.npy")
    (order[1].folder / "image.npy").write_bytes(b"")  # truncated to nothing
    code = main(["pretrain", "mae-tiny", f"data.path={copy}", f"run.dir={tmp_path / 'run'}", *TINY,
                 "train.max_steps=20", "data.max_bad_fraction=0.2"])
    err = capsys.readouterr().err
    assert code == 2, err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"medmim: error: 2 of {len(order)} training cases are unreadable or corrupted")
    assert str(order[0].folder) in last and str(order[1].folder) in last and "data.max_bad_fraction=0.2" in last


# --- run folder ----------------------------------------------------------------------------

def test_a_second_run_on_the_same_folder_is_refused(cache: Path, tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    held = RunLock(run).acquire()  # flock is per open file: this holder counts as another run
    try:
        code = main(["pretrain", "mae-tiny", f"data.path={cache}", f"run.dir={run}", *TINY, "train.max_steps=1"])
    finally:
        held.release()
    err = capsys.readouterr().err
    assert code == 2 and str(run) in err and f"pid {os.getpid()}" in err and "another run" in err
    assert not (run / "config.yaml").exists()


@pytest.mark.parametrize("fails", ["torch.save", "os.replace"])
def test_disk_full_on_checkpoint_keeps_the_previous_one(fails: str, cache, tmp_path, monkeypatch, capsys) -> None:
    run = tmp_path / "run"
    writes = []
    real_save, real_replace = torch.save, os.replace

    def full(*a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def save(obj, f, *a, **k):
        writes.append(1)
        return full() if len(writes) > 1 and fails == "torch.save" else real_save(obj, f, *a, **k)

    def replace(src, dst, *a, **k):
        return full() if str(dst).endswith(".pt") and len(writes) > 1 else real_replace(src, dst, *a, **k)

    monkeypatch.setattr(torch, "save", save)
    monkeypatch.setattr(engine.os, "replace", replace)
    code = main(["pretrain", "mae-tiny", f"data.path={cache}", f"run.dir={run}", *TINY, "train.max_steps=6",
                 "train.ckpt_every=2"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "cannot write checkpoint (No space left on device); the previous one is intact" in err
    assert _ckpt_step(run) == 2 and os.listdir(run / "checkpoints") == ["last.pt"]  # no tmp file left
    assert not (run / "model.safetensors").exists()
