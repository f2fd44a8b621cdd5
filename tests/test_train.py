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
from medmim.models import build_pretrainer, build_unetr
from medmim.models.transfer import load_pretrained, read_checkpoint
from medmim.train.engine import run_training
from medmim.train.schedule import effective_lr, warmup_cosine
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
    with open(run / "metrics.csv", newline="", encoding="utf-8") as f:
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
        assert "model.pretrained" in out.err  # a run from scratch says so, naming the setting that loads weights


def test_losses_are_reproducible_on_cpu(cache: Path, tmp_path: Path) -> None:
    losses = []
    for name in ("a", "b"):
        cfg = load_config("mae-tiny", [f"data.path={cache}", f"run.dir={tmp_path / name}", "train.max_steps=3"] + FAST)
        run_training(cfg, log=lambda s: None)
        losses.append([r["loss"] for r in _rows(tmp_path / name) if r["loss"]])
    assert losses[0] == losses[1] and len(losses[0]) == 3


def test_finetune_from_pretrained_loads_the_whole_encoder(cache: Path, tmp_path: Path, capsys) -> None:
    """The fine-tuning run starts from every one of the MAE encoder's 53 tensors. Its one step has a learning
    rate of 1e-30, which leaves float32 weights as they were: the encoder it saves is the one it loaded."""
    assert main(["pretrain", "mae-tiny", f"data.path={cache}", f"run.dir={tmp_path / 'pre'}", "train.max_steps=2"] + FAST) == 0
    capsys.readouterr()
    ckpt = tmp_path / "pre" / "checkpoints" / "last.pt"
    for n, source in enumerate((ckpt, tmp_path / "pre" / "model.safetensors")):
        pretrained = read_checkpoint(source).state
        encoder = {k.removeprefix("encoder."): v for k, v in pretrained.items() if k.startswith("encoder.")}
        assert len(encoder) == 53 and any(k.startswith("decoder") for k in pretrained)
        report = load_pretrained(build_unetr(load_config("unetr-tiny").model), source)
        assert report.complete and len(report.expected) == 53  # every encoder tensor comes over
        assert "decoder_embed.weight" in report.ignored  # and the MAE decoder does not
        run = tmp_path / f"ft{n}"
        code = main(["finetune", "unetr-tiny", f"data.path={cache}", f"run.dir={run}", "train.max_steps=1",
                     "train.lr=1e-30", "train.min_lr=0", f"model.pretrained={source}"] + FAST)
        assert code == 0, capsys.readouterr().err
        tuned = read_checkpoint(run / "model.safetensors").state
        vit = {k.removeprefix("vit."): v for k, v in tuned.items() if k.startswith("vit.")}
        assert vit.keys() == encoder.keys()
        for name, w in encoder.items():
            torch.testing.assert_close(vit[name], w, rtol=0, atol=1e-20, msg=name)


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
    before = _rows(run)
    resumed_at = int(torch.load(run / "checkpoints" / "last.pt", weights_only=True)["step"])
    assert resumed_at % 3 == 0 and 3 <= resumed_at <= killed_at  # the last periodic checkpoint
    resume = [a if not a.startswith("train.max_steps") else "train.max_steps=400" for a in args] + ["resume=auto",
                                                                                                 "train.max_time_min=0.05"]
    r = subprocess.run(resume, env=ENV, capture_output=True, text=True, encoding="utf-8", timeout=180)
    assert r.returncode == 0, r.stderr
    # it went on from that checkpoint: the rows up to it are the killed run's own, kept as they were (a fresh
    # start would have rewritten them, with other timings); the killed run's last row may be half written
    kept = min(resumed_at, len(before) - 1)
    assert kept >= 3 and _rows(run)[:kept] == before[:kept]
    rows = [x for x in _rows(run) if x["loss"]]
    steps = [int(x["step"]) for x in rows]
    assert steps == list(range(1, steps[-1] + 1))  # no step twice, none missing, in the log
    peak = 1e-3 * 2 / 4  # mae-tiny: lr 1e-3 for base batch 4, scaled to a batch of 2
    for x in rows:  # one schedule across the kill: warm-up then cosine, by step
        assert float(x["lr"]) == pytest.approx(warmup_cosine(int(x["step"]) - 1, 400, 5, peak), rel=1e-6)
    assert steps[-1] > resumed_at


def _torchrun(cmd: list[str]) -> None:
    """Run a two-process job; on failure show the head of stderr (where an abort's cause is) and its tail."""
    r = subprocess.run(cmd, env=ENV, capture_output=True, text=True, encoding="utf-8", timeout=240)
    err = r.stderr if len(r.stderr) <= 4000 else r.stderr[:2000] + "\n[...]\n" + r.stderr[-2000:]
    assert r.returncode == 0, err


# The two torchrun tests share one xdist group (run with --dist loadgroup), so two rendezvous never race.
@pytest.mark.xdist_group("torchrun")
@pytest.mark.parametrize("method", ["mae"])
def test_ddp_two_cpu_processes_match_one_process(method: str, tmp_path: Path) -> None:
    out = tmp_path / "ddp.pt"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(Path(__file__).with_name("ddp_check.py")), str(out), method]
    _torchrun(cmd)
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


@pytest.mark.xdist_group("torchrun")
def test_torchrun_runs_the_cli_with_rank0_writing(cache: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "medmim",
           "pretrain", "mae-tiny", f"data.path={cache}", f"run.dir={run}", "train.max_steps=3"] + FAST
    _torchrun(cmd)
    rows = [x for x in _rows(run) if x["loss"]]
    assert [int(x["step"]) for x in rows] == [1, 2, 3]
    # two processes: the learning rate is scaled to the batch of both (linear scaling rule)
    cfg = load_config(run / "config.yaml")
    t = cfg.train
    assert t.scale_lr
    peak = effective_lr(t.lr, cfg.data.batch_size * t.grad_accum * 2, t.base_batch_size)
    for x in rows:
        assert float(x["lr"]) == pytest.approx(warmup_cosine(int(x["step"]) - 1, 3, t.warmup_steps, peak, t.min_lr),
                                               rel=1e-6)
    assert (run / "checkpoints" / "last.pt").is_file()


def test_kept_checkpoints_hold_the_state_of_their_step(cache: Path, tmp_path: Path, capsys) -> None:
    """train.keep_checkpoints: the state at those steps stays (e.g. to check the pretext task along a pretraining)."""
    from medmim.eval.recon import load_mim_model

    run = tmp_path / "run"
    assert main(["pretrain", "mae-tiny", f"data.path={cache}", f"run.dir={run}", "train.max_steps=4",
                 "train.keep_checkpoints=[1,3]"] + FAST) == 0, capsys.readouterr().err
    kept = sorted(p.name for p in (run / "checkpoints").glob("step_*.pt"))
    assert kept == ["step_000001.pt", "step_000003.pt"]
    states = [torch.load(run / "checkpoints" / k, weights_only=True) for k in kept]
    assert [s["step"] for s in states] == [1, 3]
    w = "encoder.blocks.0.attn.qkv.weight"
    assert not torch.equal(states[0]["model"][w], states[1]["model"][w])  # trained in between
    model, cfg, _ = load_mim_model(run / "checkpoints" / kept[0])  # evaluate-recon reads a kept one
    assert torch.equal(model.state_dict()[w], states[0]["model"][w])
