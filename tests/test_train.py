"""Training engine: every pretrainer and fine-tuning run end to end on tiny data; resume after SIGKILL;
2-process DDP on CPU; weight transfer from a pretraining run."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from medmim.cli import main
from medmim.config import load_config
from medmim.data.prepare import PrepareSettings, prepare_dataset
from medmim.models import build_pretrainer
from medmim.train.engine import run_training
from medmim.train.schedule import warmup_cosine
from tests.conftest import write_msd
from tests.ddp_check import fixed_batch

FAST = ["train.log_every=1", "train.val_every=2", "train.preview_every=2", "train.ckpt_every=2", "data.num_workers=0"]
ENV = {**os.environ, "MEDMIM_NO_PROGRESS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("train")
    root = write_msd(tmp / "ds", n_labeled=6, n_unlabeled=3, shape=(40, 36, 24))
    prepare_dataset(root, tmp / "cache", PrepareSettings(spacing=(1.5, 1.5, 2.0)))
    return tmp / "cache"


def _rows(run: Path) -> list[dict]:
    with open(run / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("preset", ["mae-tiny", "simmim-tiny", "simclr-tiny", "unetr-tiny"])
def test_a_tiny_run_writes_its_whole_run_folder(preset: str, cache: Path, tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    verb = "finetune" if preset.startswith("unetr") else "pretrain"
    code = main([verb, preset, f"data.path={cache}", f"run.dir={run}", "train.max_steps=4"] + FAST)
    out = capsys.readouterr()
    assert code == 0, out.err
    assert load_config(run / "config.yaml").train.max_steps == 4  # the resolved config, loadable as is
    assert (run / "checkpoints" / "last.pt").is_file() and (run / "model.safetensors").is_file()
    assert list(run.glob("events.out.tfevents.*"))
    assert sorted(p.name for p in (run / "previews").glob("*.png")) == ["step_000002.png", "step_000004.png"]
    rows = _rows(run)
    train_rows = [r for r in rows if r["loss"]]
    assert [int(r["step"]) for r in train_rows] == [1, 2, 3, 4]
    assert all(float(r["loss"]) > 0 and 0 <= float(r["data_wait_frac"]) <= 1 for r in train_rows)
    val = [r for r in rows if r["val_loss"] or r.get("val_dice")]
    assert len(val) == 2
    if verb == "finetune":
        assert (run / "checkpoints" / "best.pt").is_file()
        assert 0.0 <= float(val[-1]["val_dice"]) <= 1.0
        assert "trained from scratch" in out.err and "nothing loaded" in out.err


def test_losses_are_reproducible_on_cpu(cache: Path, tmp_path: Path) -> None:
    losses = []
    for name in ("a", "b"):
        cfg = load_config("mae-tiny", [f"data.path={cache}", f"run.dir={tmp_path / name}", "train.max_steps=3"] + FAST)
        run_training(cfg, log=lambda s: None)
        losses.append([r["loss"] for r in _rows(tmp_path / name) if r["loss"]])
    assert losses[0] == losses[1] and len(losses[0]) == 3


def test_finetune_from_pretrained_loads_the_whole_encoder(cache: Path, tmp_path: Path, capsys) -> None:
    assert main(["pretrain", "mae-tiny", f"data.path={cache}", f"run.dir={tmp_path / 'pre'}", "train.max_steps=2"] + FAST) == 0
    capsys.readouterr()
    ckpt = tmp_path / "pre" / "checkpoints" / "last.pt"
    for source in (ckpt, tmp_path / "pre" / "model.safetensors"):
        code = main(["finetune", "unetr-tiny", f"data.path={cache}", f"run.dir={tmp_path / 'ft'}", "train.max_steps=1",
                     f"model.pretrained={source}"] + FAST)
        err = capsys.readouterr().err
        assert code == 0, err
        assert "all 53 encoder tensors loaded" in err and "decoder" in err  # the MAE decoder is reported ignored


def test_sigkill_mid_training_then_resume_continues_step_and_schedule(cache: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    args = [sys.executable, "-m", "medmim", "pretrain", "mae-tiny", f"data.path={cache}", f"run.dir={run}",
            "train.max_steps=400", "train.warmup_steps=5", "train.val_every=1000", "train.preview_every=1000",
            "train.ckpt_every=3", "train.log_every=1", "data.num_workers=0"]
    proc = subprocess.Popen(args, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        if (run / "metrics.csv").is_file() and len(_rows(run)) >= 8:
            break
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    killed_at = int(_rows(run)[-1]["step"])
    assert killed_at < 400
    resume = [a if not a.startswith("train.max_steps") else "train.max_steps=400" for a in args] + ["resume=auto",
                                                                                                 "train.max_time_min=0.05"]
    r = subprocess.run(resume, env=ENV, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr
    resumed_at = int(r.stderr.split("at step ")[1].split()[0])
    assert resumed_at % 3 == 0 and 3 <= resumed_at <= killed_at  # the last periodic checkpoint
    rows = [x for x in _rows(run) if x["loss"]]
    steps = [int(x["step"]) for x in rows]
    assert steps == list(range(1, steps[-1] + 1))  # no step twice, none missing, in the log
    peak = 1e-3 * 2 / 4  # mae-tiny: lr 1e-3 for base batch 4, scaled to a batch of 2
    for x in rows:  # one schedule across the kill: warm-up then cosine, by step
        assert float(x["lr"]) == pytest.approx(warmup_cosine(int(x["step"]) - 1, 400, 5, peak), rel=1e-6)
    assert steps[-1] > resumed_at


@pytest.mark.parametrize("method", ["mae"])
def test_ddp_two_cpu_processes_match_one_process(method: str, tmp_path: Path) -> None:
    out = tmp_path / "ddp.pt"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(Path(__file__).with_name("ddp_check.py")), str(out), method]
    r = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-2000:]
    got = torch.load(out, weights_only=True)
    sums = got["checksums"]
    assert torch.equal(sums[0], sums[1])  # identical parameters on both ranks after 3 steps
    torch.manual_seed(0)
    model = build_pretrainer(load_config(f"{method}-tiny"))
    x, mask = fixed_batch()
    model(x, mask=mask).loss.backward()
    for name, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(got["grads"][name], p.grad, rtol=1e-4, atol=1e-6)


def test_torchrun_runs_the_cli_with_rank0_writing(cache: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "medmim",
           "pretrain", "mae-tiny", f"data.path={cache}", f"run.dir={run}", "train.max_steps=3"] + FAST
    r = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "2 process(es) on cpu" in r.stderr
    assert [int(x["step"]) for x in _rows(run) if x["loss"]] == [1, 2, 3]
    assert (run / "checkpoints" / "last.pt").is_file()
