"""The training engine: one loop for MAE / SimMIM / SimCLR pretraining and UNETR fine-tuning.

    run_training(cfg)      # cfg.task is "pretrain" or "finetune"

Runs on one CPU, one GPU, or many under ``torchrun`` (DDP: NCCL on GPUs, gloo on CPUs). Only rank 0
writes checkpoints, logs and previews. A run folder holds everything about the run:

    RUN/config.yaml                the resolved config
    RUN/metrics.csv                one row per logged step and per validation
    RUN/events.out.tfevents.*      TensorBoard scalars
    RUN/checkpoints/last.pt        model, optimizer, scheduler, scaler, RNG, step (weights-only torch file)
    RUN/checkpoints/best.pt        fine-tuning: best validation mean Dice
    RUN/model.safetensors          the final weights with their config (for transfer and export)
    RUN/previews/step_XXXXXX.png   orthogonal slices: input / masked / reconstruction / target, or overlays
    RUN/.lock                      flock'ed by the run writing here (pid, host): one run per folder at a time

Faults (see :mod:`medmim.train.guard`):
- SIGTERM / SIGINT (pre-emption, Ctrl-C): the current step finishes, ``last.pt`` is written, the run
  prints the ``... resume=auto`` command and exits with 128 + signal (143 / 130); a second signal
  exits at once. Under DDP the ranks agree each step (one all_reduce of a few flags) to stop together.
- A NaN/Inf loss or gradient: the step is not applied (no optimizer or scheduler step, the step
  count stays, the batch is dropped); ``train.on_divergence`` says when to stop or roll back.
- A cached case that will not open or fails its checksums is skipped and named; more than
  ``data.max_bad_fraction`` of the training cases skipped stops the run.
- A checkpoint that cannot be written (disk full, permissions) leaves the previous one intact and
  stops the run with a MedmimError (exit 2).
"""

from __future__ import annotations

import csv
import functools
import math
import os
import random
import signal
import sys
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader

from medmim.config import Config, save_config
from medmim.data.augment import TwoViews, finetune_transform
from medmim.data.sampling import CropSampler
from medmim.errors import MedmimError
from medmim.train.data import RunCases, finetune_cases, pretrain_cases, record_preprocessing, resolve_caches
from medmim.train.guard import (BadCases, DivergenceGuard, RunLock, StopSignals, TrainingInterrupted, grad_norm,
                                resume_command, worker_init)
from medmim.train.schedule import effective_lr, warmup_cosine

CKPT_DIR = "checkpoints"


# --- environment ---------------------------------------------------------------------------

@dataclass
class Env:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


def setup_env(device_pref: str = "auto") -> Env:
    """Read torchrun's RANK/WORLD_SIZE/LOCAL_RANK; start the process group (NCCL on GPU, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and device_pref in ("auto", "cuda")
    if device_pref == "cuda" and not torch.cuda.is_available():
        raise MedmimError("run.device=cuda but no CUDA device is available")
    device = torch.device("cuda", local) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return Env(rank, world, local, device)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def segmentation_loss() -> nn.Module:
    """The fine-tuning loss: Dice + cross-entropy on softmax outputs against integer labels (the paper's)."""
    from monai.losses import DiceCELoss

    return DiceCELoss(to_onehot_y=True, softmax=True)


def autocast_for(precision: str, device: torch.device):
    if precision == "fp32":
        return nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    if device.type == "cpu" and dtype == torch.float16:
        raise MedmimError("train.precision=fp16 needs a GPU; use bf16 or fp32 on CPU")
    return torch.autocast(device_type=device.type, dtype=dtype)


def _unwrap(model: nn.Module) -> nn.Module:
    model = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    return getattr(model, "_orig_mod", model)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on biases, norms, position embeddings and mask tokens (as in MAE)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim <= 1 or name.endswith(".bias") or "pos_embed" in name or "token" in name:
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


# --- checkpoints -----------------------------------------------------------------------------

def save_checkpoint(path: Path, state: dict) -> None:
    """Write atomically: a file killed mid-write never replaces the last good checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch's zip writer reports a failed write as RuntimeError
        _unlink_quietly(tmp)
        why = e.strerror if isinstance(e, OSError) and e.strerror else " ".join(str(e).split())[:200]
        raise MedmimError(f"{path}: cannot write checkpoint ({why}); the previous one is intact; stopping")
    except BaseException:
        _unlink_quietly(tmp)
        raise


def _unlink_quietly(p: Path) -> None:
    try:
        p.unlink(missing_ok=True)
    except OSError:
        pass


def load_training_state(path: Path) -> dict:
    if not path.is_file():
        raise MedmimError(f"resume: {path}: checkpoint not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - a broken file of any kind is a bad input here
        raise MedmimError(f"resume: {path}: unreadable checkpoint ({type(e).__name__})")


def find_resume(cfg: Config, run_dir: Path) -> Path | None:
    if cfg.resume is None:
        return None
    if cfg.resume == "auto":
        last = run_dir / CKPT_DIR / "last.pt"
        return last if last.is_file() else None
    return Path(cfg.resume)


# --- logging ---------------------------------------------------------------------------------

class MetricsLog:
    """metrics.csv (one row per event, columns fixed per task) and TensorBoard scalars, on rank 0."""

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


# --- the trainer -----------------------------------------------------------------------------

class Trainer:
    """Build data, model and optimiser from the config, then :meth:`fit`."""

    def __init__(self, cfg: Config, log=print):
        self.cfg = cfg
        self.env = setup_env(cfg.run.device)
        self.log = log if self.env.main else (lambda *a, **k: None)
        # warnings about data come from whichever rank meets the problem
        self.warn = log if self.env.main else (lambda s: print(f"[rank {self.env.rank}] {s}", file=sys.stderr, flush=True))
        self.run_dir = Path(cfg.run.dir)
        self.lock = RunLock(self.run_dir).acquire() if self.env.main else None  # before anything reads or writes there
        self.metrics = None
        try:
            self._setup()
        except BaseException:
            self.close()
            raise

    def _setup(self) -> None:
        cfg, t = self.cfg, self.cfg.train
        if cfg.task == "pretrain" and tuple(cfg.model.img_size) != tuple(cfg.data.roi_size):
            raise MedmimError(f"model.img_size {list(cfg.model.img_size)} must equal data.roi_size "
                              f"{list(cfg.data.roi_size)} for pretraining")
        seed_everything(t.seed + self.env.rank)
        caches = resolve_caches(cfg.data, self.log, self.env.main, self.env.barrier)
        if cfg.task == "pretrain":
            self.cases: RunCases = pretrain_cases(caches, cfg.data.fold, t.seed)
        else:
            self.cases = finetune_cases(caches, cfg.data.fold, cfg.data.label_fraction, t.seed)
            folders = [c.folder.resolve() for c in self.cases.train + self.cases.val]
            record_preprocessing(cfg.data, [c for c in caches if any(c.root.resolve() in f.parents for f in folders)])
        if cfg.data.labels is None and self.cases.labels:
            cfg.data.labels = dict(self.cases.labels)
        if cfg.data.lateral_pairs is None:
            cfg.data.lateral_pairs = [tuple(p) for p in self.cases.lateral_pairs]
        if self.cases.channels != cfg.model.in_channels:
            raise MedmimError(f"model.in_channels={cfg.model.in_channels} but the data has {self.cases.channels} channel(s)")
        self.model = self._build_model()
        self.model.to(self.env.device)
        eff_batch = cfg.data.batch_size * t.grad_accum * self.env.world
        self.peak_lr = effective_lr(t.lr, eff_batch, t.base_batch_size, t.scale_lr)
        self.steps_per_epoch = max(1, math.ceil(
            self._sampler(self.cases.train, 0).crops_per_epoch(self.env.world) / (cfg.data.batch_size * t.grad_accum)))
        if t.max_steps is not None:
            self.total_steps = t.max_steps
        elif t.epochs is not None:
            self.total_steps = t.epochs * self.steps_per_epoch
        else:
            raise MedmimError("set train.max_steps or train.epochs to bound the run")
        # fused AdamW (CPU and CUDA): one kernel over all parameters; on CPU a ViT-B/16 MAE's update takes
        # 0.27x the time of PyTorch's default for-loop AdamW (benchmarks/bench_ablations.py)
        self.optimizer = torch.optim.AdamW(param_groups(self.model, t.weight_decay), lr=self.peak_lr,
                                           betas=tuple(t.betas), fused=True)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: warmup_cosine(s, self.total_steps, t.warmup_steps, 1.0, t.min_lr / self.peak_lr))
        self.scaler = torch.amp.GradScaler("cuda", enabled=t.precision == "fp16" and self.env.device.type == "cuda")
        self.step, self.best = 0, -math.inf
        self.guard = DivergenceGuard(t.on_divergence, t.max_bad_steps, t.max_rollbacks)
        self.lr_scale = 1.0  # product of the rollbacks' lr factors; 1 unless train.on_divergence=rollback fired
        self.last_ckpt_step: int | None = None  # step of RUN/checkpoints/last.pt, when this process knows it
        self.signals = StopSignals(announce=False)  # replaced by the live one during fit()
        self.bad_cases = BadCases([str(c.folder) for c in self.cases.train], cfg.data.max_bad_fraction)
        self.resume_path = find_resume(cfg, self.run_dir)
        if self.resume_path is not None:
            self._restore(self.resume_path)
        self.ddp_model = self.model
        if self.env.distributed:
            ids = [self.env.device.index] if self.env.device.type == "cuda" else None
            self.ddp_model = nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        if t.compile:
            self.ddp_model = torch.compile(self.ddp_model)

    # -- construction --
    def _build_model(self) -> nn.Module:
        from medmim.models import build_pretrainer, build_unetr, count_parameters
        from medmim.models.transfer import load_pretrained

        cfg = self.cfg
        if cfg.task == "pretrain":
            model = build_pretrainer(cfg)
        else:
            model = build_unetr(cfg.model)
            self.transfer = None
            if cfg.model.pretrained:
                self.transfer = load_pretrained(model, cfg.model.pretrained, partial=cfg.model.partial_load)
                self.log(self.transfer.summary())
            else:
                self.log("encoder: trained from scratch (model.pretrained not set): nothing loaded")
        if cfg.train.grad_checkpoint and hasattr(model, "set_grad_checkpointing"):
            model.set_grad_checkpointing(True)
        self.log(f"model: {type(model).__name__}, {count_parameters(model) / 1e6:.2f} M parameters")
        return model

    def _sampler(self, cases, start_epoch: int, epochs: int | None = None, seed: int | None = None) -> CropSampler:
        d, t = self.cfg.data, self.cfg.train
        transform = None
        if self.cfg.task == "finetune":
            transform = finetune_transform(self.cases.lateral_pairs)
        elif self.cfg.pretrain.method == "simclr":
            transform = TwoViews(d.roi_size)
        return CropSampler(cases, d.roi_size, d.crops_per_volume, d.pos_fraction, seed=t.seed if seed is None else seed,
                           epochs=epochs, start_epoch=start_epoch, rank=self.env.rank, world_size=self.env.world,
                           transform=transform, use_labels=self.cfg.task == "finetune", verify=d.verify_checksums)

    def _loader(self, start_epoch: int) -> DataLoader:
        d = self.cfg.data
        init = functools.partial(worker_init, self.lock.identity() if self.lock else None) if d.num_workers > 0 else None
        return DataLoader(self._sampler(self.cases.train, start_epoch), batch_size=d.batch_size,
                          num_workers=d.num_workers, pin_memory=self.env.device.type == "cuda",
                          persistent_workers=d.num_workers > 0, prefetch_factor=4 if d.num_workers > 0 else None,
                          worker_init_fn=init)

    # -- checkpoint state --
    def _state(self) -> dict:
        return {
            "model": _unwrap(self.model).state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "step": self.step,
            "best_metric": self.best,
            "rng_torch": torch.get_rng_state(),
            "lr_scale": self.lr_scale,
            "rollbacks": self.guard.rollbacks,
            "config": self.cfg.to_dict(),
            "task": self.cfg.task,
        }

    def _restore(self, path: Path, quiet: bool = False) -> None:
        state = load_training_state(path)
        try:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            if state.get("scaler"):
                self.scaler.load_state_dict(state["scaler"])
        except (KeyError, RuntimeError, ValueError) as e:
            raise MedmimError(f"resume: {path}: does not match this config's model ({str(e).splitlines()[0][:200]})")
        self.step = int(state["step"])
        self.best = float(state.get("best_metric", -math.inf))
        self.lr_scale = float(state.get("lr_scale", 1.0))
        self.guard.rollbacks = int(state.get("rollbacks", 0))
        if path == self.run_dir / CKPT_DIR / "last.pt":
            self.last_ckpt_step = self.step
        if self.env.world == 1 and "rng_torch" in state:
            torch.set_rng_state(state["rng_torch"])
        else:  # each rank needs its own stream: derive it from the step
            torch.manual_seed(self.cfg.train.seed * 1_000_003 + self.env.rank * 7919 + self.step)
        if not quiet:
            self.log(f"resumed from {path} at step {self.step}")

    def _checkpoint(self, name: str, collective: bool = True) -> None:
        """Rank 0 writes; with ``collective`` every rank learns whether it worked, so all stop together."""
        err = None
        if self.env.main:
            try:
                save_checkpoint(self.run_dir / CKPT_DIR / name, self._state())
            except MedmimError as e:
                err = e
        if collective and self.env.distributed:
            flag = torch.tensor([float(err is not None)], device=self.env.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            if err is None and flag.item() > 0:
                raise MedmimError(f"rank 0 could not write {self.run_dir / CKPT_DIR / name}; stopping")
        if err is not None:
            raise err
        if name == "last.pt":
            self.last_ckpt_step = self.step

    def close(self) -> None:
        """Close the logs and release the run folder (idempotent)."""
        if getattr(self, "bar", None) is not None:
            self.bar.close()
            self.bar = None
        if self.metrics is not None:
            self.metrics.close()
        if self.lock is not None:
            self.lock.release()

    # -- one step --
    def _forward(self, batch: dict) -> tuple[torch.Tensor, object]:
        dev = self.env.device
        nb = dev.type == "cuda"
        if self.cfg.task == "finetune":
            x, y = batch["image"].to(dev, non_blocking=nb), batch["label"].to(dev, non_blocking=nb).long()
            logits = self.ddp_model(x)
            return self.loss_fn(logits.float(), y), (x, y, logits)
        if self.cfg.pretrain.method == "simclr":
            v1, v2 = batch["view1"].to(dev, non_blocking=nb), batch["view2"].to(dev, non_blocking=nb)
            out = self.ddp_model(v1, v2)
            return out.loss, (v1, v2)
        x = batch["image"].to(dev, non_blocking=nb)
        out = self.ddp_model(x)
        return out.loss, (x, out)

    def fit(self) -> dict:
        """Train to ``total_steps`` (or the wall-time bound); return a summary dict.

        Raises :class:`~medmim.train.guard.TrainingInterrupted` (a ``SystemExit``, status 128 + signal)
        after a SIGTERM/SIGINT checkpoint, and :class:`MedmimError` when the run cannot go on: divergence,
        too many bad cases, a checkpoint that cannot be written. The run folder is released either way.
        """
        try:
            with StopSignals(announce=self.env.main) as self.signals:
                return self._fit()
        finally:
            self.close()

    def _fit(self) -> dict:
        cfg, t, env = self.cfg, self.cfg.train, self.env
        if cfg.task == "finetune":
            self.loss_fn = segmentation_loss()
        if env.main:
            try:
                self.run_dir.mkdir(parents=True, exist_ok=True)
                save_config(cfg, self.run_dir / "config.yaml")
            except OSError as e:
                raise MedmimError(f"{self.run_dir}: cannot write the run folder ({e.strerror or e})")
            columns = ["step", "epoch", "time_s", "lr", "loss", "crops_per_s", "data_wait_frac", "val_loss"]
            if cfg.task == "finetune":
                columns += ["val_dice"] + [f"dice_{c}" for c in sorted(self.cases.labels) if c != 0]
            self.metrics = MetricsLog(self.run_dir, columns, self.step if self.resume_path else None)
        start_step = self.step
        if self.step >= self.total_steps:
            self.log(f"already at step {self.step} of {self.total_steps}: nothing to do")
            return self._finish(0.0)
        crops_per_step = cfg.data.batch_size * t.grad_accum * env.world
        start_epoch = (self.step * crops_per_step) // max(1, self._sampler(self.cases.train, 0).crops_per_epoch(1))
        data_iter = iter(self._loader(start_epoch))
        self.log(f"{cfg.task} ({cfg.pretrain.method if cfg.task == 'pretrain' else 'UNETR'}): "
                 f"{len(self.cases.train)} training, {len(self.cases.val)} validation cases; "
                 f"{self.total_steps} steps of {crops_per_step} crops, peak lr {self.peak_lr:.3g}, "
                 f"{t.precision}, {env.world} process(es) on {env.device.type}")
        self.bar = None
        if env.main:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=self.total_steps, initial=self.step, desc=cfg.task, unit="step", dynamic_ncols=True,
                            disable=os.environ.get("MEDMIM_NO_PROGRESS") == "1")
        t_start = time.perf_counter()
        window = {"loss": 0.0, "n": 0, "wait": 0.0, "busy": 0.0, "crops": 0}
        stopped_by_time = False
        self.model.train()
        while self.step < self.total_steps:
            t0 = time.perf_counter()
            self.optimizer.zero_grad(set_to_none=True)
            loss_sum, wait = 0.0, 0.0
            for micro in range(t.grad_accum):
                tw = time.perf_counter()
                batch = self._next_batch(data_iter)
                wait += time.perf_counter() - tw
                sync = nullcontext() if (not env.distributed or micro == t.grad_accum - 1) else self.ddp_model.no_sync()
                with sync:
                    with autocast_for(t.precision, env.device):
                        loss, out = self._forward(batch)
                    self.scaler.scale(loss / t.grad_accum).backward()
                loss_sum += float(loss.detach()) / t.grad_accum
            # the wall-time bound is judged here, with the other flags, so that DDP ranks stop at the same step
            time_up = t.max_time_min is not None and (time.perf_counter() - t_start) / 60 > t.max_time_min
            stop, bad_loss, time_up = self._agree(not math.isfinite(loss_sum), time_up)
            why = "non-finite loss" if bad_loss else self._unscale_clip_and_check()
            if why is not None:
                self._bad_step(why)
            else:
                self.guard.good()
                self.scaler.step(self.optimizer)
                self.scaler.update()
                lr_used = self.optimizer.param_groups[0]["lr"]  # the lr of this step, logged with it
                self.scheduler.step()
                self.step += 1
                if env.device.type == "cuda":
                    torch.cuda.synchronize()
                dt = time.perf_counter() - t0
                window["loss"] += loss_sum
                window["n"] += 1
                window["wait"] += wait
                window["busy"] += dt
                window["crops"] += crops_per_step
                window["lr"] = lr_used
                if self.bar is not None:
                    self.bar.update(1)
                    self.bar.set_postfix(loss=f"{loss_sum:.4f}", lr=f"{lr_used:.2e}",
                                         crops_s=f"{window['crops'] / max(window['busy'], 1e-9):.1f}")
                if self.step % t.log_every == 0 or self.step == self.total_steps:
                    self._log_train(window, t_start)
                    window = {"loss": 0.0, "n": 0, "wait": 0.0, "busy": 0.0, "crops": 0}
                if self.step % self.steps_per_epoch == 0 and env.main:
                    self.log(f"epoch {self.step // self.steps_per_epoch} done at step {self.step}: "
                             f"loss {loss_sum:.4f}, {time.perf_counter() - t_start:.0f} s")
                if self.step % t.preview_every == 0 and env.main:
                    self._preview(out)
                if self.step % t.val_every == 0 or self.step == self.total_steps:
                    self._validate()
                if self.step % t.ckpt_every == 0:
                    self._checkpoint("last.pt")
            if stop and self.step < self.total_steps:  # a signal at the very end just lets the run finish
                self._interrupt()
            if time_up and self.step < self.total_steps:
                stopped_by_time = True
                self.log(f"wall-time bound train.max_time_min={t.max_time_min} reached at step {self.step}")
                if self.step % t.val_every != 0:
                    self._validate()  # the state the run ends in is scored too
                break
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.last_ckpt_step != self.step:
            self._checkpoint("last.pt")
        summary = self._finish(time.perf_counter() - t_start, start_step)
        summary["stopped_by_time"] = stopped_by_time
        return summary

    # -- faults --
    def _next_batch(self, data_iter) -> dict:
        """The next batch; the cases the sampler skipped on the way are counted and named."""
        try:
            batch = next(data_iter)
        except StopIteration:
            known = f": {self.bad_cases.message()}" if self.bad_cases.seen else ""
            raise MedmimError(f"no readable training case left (every cached case this process samples is unreadable "
                              f"or fails its checksums){known}")
        for text in batch.pop("bad_cases", ()):
            if text:
                self.bad_cases.report(text, self.warn)
        return batch

    def _agree(self, bad_loss: bool, time_up: bool = False) -> tuple[bool, bool, bool]:
        """(stop requested, loss not finite, wall-time bound reached), the same on every rank: one all_reduce
        of a few flags a step (a rank whose clock passed the bound stops them all at this step).

        Under DDP the ranks also pool the cases they skipped, so all judge data.max_bad_fraction alike.
        """
        stop, new_bad = self.signals.requested, self.bad_cases.take_new()
        if self.env.distributed:
            flags = torch.tensor([float(stop), float(bad_loss), float(new_bad), float(time_up)], device=self.env.device)
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
            stop, bad_loss, new_bad, time_up = (bool(v > 0) for v in flags.tolist())
            if new_bad:
                seen = self.bad_cases.bitmap(self.env.device)
                dist.all_reduce(seen, op=dist.ReduceOp.MAX)
                self.bad_cases.merge_bitmap(seen.cpu())
        if new_bad and self.bad_cases.too_many():
            raise MedmimError(self.bad_cases.message())
        return stop, bad_loss, time_up

    def _unscale_clip_and_check(self) -> str | None:
        """Clip the gradients; "non-finite gradient" if they hold NaN/Inf, else None.

        With the fp16 GradScaler on, overflowing gradients are the scaler's business (it skips that
        update and lowers its scale), so they are not counted as divergence here.
        """
        t, scaler_on = self.cfg.train, self.scaler.is_enabled()
        if not t.grad_clip and scaler_on:
            return None
        if scaler_on:
            self.scaler.unscale_(self.optimizer)
        if t.grad_clip:
            norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), t.grad_clip)
        else:
            norm = grad_norm(self.model.parameters())
        if not scaler_on and not bool(torch.isfinite(norm)):
            return "non-finite gradient"
        return None

    def _bad_step(self, why: str) -> None:
        """Drop this step's update; stop or roll back as train.on_divergence says."""
        t = self.cfg.train
        self.optimizer.zero_grad(set_to_none=True)
        action = self.guard.bad()
        self.log(f"step {self.step + 1}: {why}: update skipped ({self.guard.streak} in a row; "
                  f"train.on_divergence={t.on_divergence}, train.max_bad_steps={t.max_bad_steps})")
        if action == "rollback":
            self._rollback()
        elif action == "stop":
            ckpt = self.run_dir / CKPT_DIR / "last.pt"
            if ckpt.is_file():
                at = f" (step {self.last_ckpt_step})" if self.last_ckpt_step is not None else ""
                kept = f"the last good checkpoint {ckpt}{at} is kept"
            else:
                kept = f"no checkpoint had been written to {ckpt.parent} yet"
            after = f" after {self.guard.rollbacks} rollback(s)" if self.guard.rollbacks else ""
            raise MedmimError(
                f"training diverged: {self.guard.streak} step(s) in a row with a non-finite loss or gradient at step "
                f"{self.step + 1}{after} (train.on_divergence={t.on_divergence}, train.max_bad_steps={t.max_bad_steps}); "
                f"{kept}; lower train.lr, set train.grad_clip, train.precision=fp32, or train.on_divergence=rollback")

    def _rollback(self) -> None:
        """Reload RUN/checkpoints/last.pt and go on with the learning rate times train.rollback_lr_factor."""
        t = self.cfg.train
        ckpt = self.run_dir / CKPT_DIR / "last.pt"
        if not ckpt.is_file():
            raise MedmimError(f"training diverged at step {self.step + 1} and train.on_divergence=rollback has no "
                              f"checkpoint to go back to yet ({ckpt}); lower train.lr or set a smaller train.ckpt_every")
        self.env.barrier()
        scale = self.lr_scale * t.rollback_lr_factor
        rollbacks = self.guard.rollbacks + 1
        diverged_at = self.step + 1
        self._restore(ckpt, quiet=True)
        factor = scale / self.lr_scale  # relative to the checkpoint's own (possibly already lowered) rates
        for g in self.optimizer.param_groups:
            g["lr"] *= factor
        self.scheduler.base_lrs = [b * factor for b in self.scheduler.base_lrs]
        self.lr_scale, self.guard.rollbacks, self.guard.streak = scale, rollbacks, 0
        if self.metrics is not None:
            self.metrics.rewind(self.step)
        if getattr(self, "bar", None) is not None:
            self.bar.n = self.step
            self.bar.refresh()
        self.log(f"diverged at step {diverged_at}: rolled back to step {self.step} ({ckpt}) with the learning rate "
                 f"x{t.rollback_lr_factor:g} (x{scale:g} of the schedule now); rollback {rollbacks} of at most "
                 f"{t.max_rollbacks}")

    def _interrupt(self) -> None:
        """After a SIGTERM/SIGINT: checkpoint this step, say how to resume, exit with 128 + signal."""
        signum = self.signals.signum or signal.SIGTERM  # under DDP another rank may have got it
        if self.last_ckpt_step != self.step:
            self._checkpoint("last.pt")
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        ckpt = self.run_dir / CKPT_DIR / "last.pt"
        cmd = resume_command(self.cfg.task, self.run_dir, self.env.distributed)
        self.log(f"stopped by {signal.Signals(signum).name} after step {self.step} of {self.total_steps}: checkpoint "
                 f"{ckpt} written. To continue exactly there, run:\n  {cmd}")
        raise TrainingInterrupted(signum, self.step, ckpt, cmd)

    def _log_train(self, w: dict, t_start: float) -> None:
        loss = w["loss"] / max(w["n"], 1)
        if self.env.distributed:  # the mean over ranks, so the log speaks for the whole batch
            tl = torch.tensor([loss], device=self.env.device)
            dist.all_reduce(tl)
            loss = float(tl) / self.env.world
        if self.env.main:
            self.metrics.write({"step": self.step, "epoch": f"{self.step / self.steps_per_epoch:.3f}",
                                "time_s": f"{time.perf_counter() - t_start:.2f}",
                                "lr": w.get("lr", float("nan")), "loss": loss,
                                "crops_per_s": w["crops"] / max(w["busy"], 1e-9),
                                "data_wait_frac": w["wait"] / max(w["busy"], 1e-9)})

    # -- validation --
    @torch.no_grad()
    def _validate(self) -> None:
        if not self.cases.val:
            return
        if self.env.main:
            self.model.eval()
            try:
                row = self._validate_finetune() if self.cfg.task == "finetune" else self._validate_pretrain()
            finally:
                self.model.train()
            row["step"] = self.step
            self.metrics.write(row)
            if self.cfg.task == "finetune":
                self.log(f"step {self.step}: validation mean Dice {row['val_dice']:.4f} (best {max(self.best, row['val_dice']):.4f})")
                if row["val_dice"] > self.best:
                    self.best = row["val_dice"]
                    self._checkpoint("best.pt", collective=False)
            else:
                what = "contrastive" if self.cfg.pretrain.method == "simclr" else "masked reconstruction"
                self.log(f"step {self.step}: held-out {what} loss {row['val_loss']:.4f}")
        self.env.barrier()

    def _validate_pretrain(self) -> dict:
        """Masked reconstruction loss on held-out crops; fixed crops and masks, so values compare across steps."""
        sampler = self._sampler(self.cases.val, 0, epochs=1, seed=12345)
        sampler._rank, sampler._world = 0, 1
        gen = torch.Generator(device="cpu").manual_seed(12345)
        losses = []
        for item in sampler:
            for line in item.pop("bad_cases", "").splitlines():
                self._warn_val(Path(line.partition("\t")[0]).name, line.partition("\t")[2])
            if self.cfg.pretrain.method == "simclr":
                out = self.model(item["view1"][None].to(self.env.device), item["view2"][None].to(self.env.device))
                # a batch of one has no negatives: score the two views' agreement instead
                losses.append(float(1 - torch.nn.functional.cosine_similarity(out.z1, out.z2).mean()))
                continue
            x = item["image"][None]
            with autocast_for(self.cfg.train.precision, self.env.device):
                out = self.model(x.to(self.env.device), generator=gen)
            losses.append(float(out.loss))
            if len(losses) >= 16:
                break
        return {"val_loss": float(np.mean(losses)) if losses else float("nan")}

    def _warn_val(self, case, why) -> None:
        """Name an unusable validation case once; it is left out of the validation metrics."""
        name = getattr(case, "case_id", case)
        warned = self.__dict__.setdefault("_val_warned", set())
        if name not in warned:
            warned.add(name)
            self.warn(f"warning: validation case {name} left out: {why}")

    def _validate_finetune(self) -> dict:
        """Sliding-window inference over each whole validation volume; MONAI Dice per class (background excluded)."""
        from monai.inferers import sliding_window_inference
        from monai.metrics import DiceMetric
        from monai.networks.utils import one_hot

        t = self.cfg.train
        n_cls = self.cfg.model.num_classes
        metric = DiceMetric(include_background=False, reduction="none", ignore_empty=True)
        scored = 0
        for case in self.cases.val:
            try:
                if self.cfg.data.verify_checksums:
                    case.verify()
                x = torch.from_numpy(np.asarray(case.image(), dtype=np.float32))[None].to(self.env.device)
                y = torch.from_numpy(np.asarray(case.label(), dtype=np.int64))[None, None].to(self.env.device)
            except (MedmimError, OSError, ValueError, EOFError) as e:
                self._warn_val(case, e)
                continue
            scored += 1
            with autocast_for(t.precision, self.env.device):
                logits = sliding_window_inference(x, self.cfg.model.img_size, t.sw_batch_size, self.model,
                                                  overlap=t.sw_overlap, mode="gaussian")
            pred = logits.float().argmax(1, keepdim=True)
            metric(one_hot(pred, n_cls), one_hot(y, n_cls))
        if not scored:
            return {"val_dice": float("nan")}
        per_case = metric.aggregate().cpu().numpy()  # [cases, classes-1], NaN where a class is absent from both
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # a class absent from every case stays NaN
            per_class = np.nanmean(per_case, axis=0)
            row = {"val_dice": float(np.nanmean(per_class)) if np.isfinite(per_class).any() else 0.0}
        for c, v in enumerate(per_class, start=1):
            row[f"dice_{c}"] = float(v)
        return row

    # -- previews --
    def _preview(self, out) -> None:
        from medmim.train.preview import save_finetune_preview, save_mim_preview, save_views_preview

        path = self.run_dir / "previews" / f"step_{self.step:06d}.png"
        if self.cfg.task == "finetune":
            x, y, logits = out
            save_finetune_preview(path, x[0, 0], y[0, 0], logits[0].argmax(0), self.cases.labels)
        elif self.cfg.pretrain.method == "simclr":
            v1, v2 = out
            save_views_preview(path, v1[0, 0], v2[0, 0])
        else:
            x, o = out
            save_mim_preview(path, x[0, 0], o.mask[0, 0], o.pred[0, 0])

    def _finish(self, seconds: float, start_step: int = 0) -> dict:
        if self.env.main:
            from medmim.models.transfer import save_weights

            save_weights(self.run_dir / "model.safetensors", _unwrap(self.model), config=self.cfg)
            if self.metrics is not None:
                self.metrics.close()
        self.env.barrier()
        steps = self.step - start_step
        return {"run_dir": str(self.run_dir), "steps": self.step, "seconds": seconds,
                "s_per_step": seconds / steps if steps else float("nan"), "best_val_dice": self.best,
                "skipped_steps": self.guard.total, "rollbacks": self.guard.rollbacks,
                "bad_cases": sorted(self.bad_cases.seen)}


def run_training(cfg: Config, log=print) -> dict:
    """Train as ``cfg`` says; the distributed process group (if any) is torn down at the end."""
    try:
        return Trainer(cfg, log=log).fit()
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
