"""The training engine: one loop for MAE / SimMIM / SimCLR pretraining and UNETR fine-tuning.

    run_training(cfg)      # cfg.task is "pretrain" or "finetune"

Runs on one CPU, one GPU, or many under ``torchrun`` (DDP: NCCL on GPUs, gloo on CPUs). Only rank 0
writes checkpoints, logs and previews. A run folder holds everything about the run:

    RUN/config.yaml                the resolved config, as given (nothing is written into it during the run)
    RUN/data.json                  what the run read from its data: labels, lateral pairs, preprocessing
    RUN/metrics.csv                one row per logged step and per validation
    RUN/events.out.tfevents.*      TensorBoard scalars
    RUN/checkpoints/last.pt        model, optimizer, scheduler, scaler, RNG, step (weights-only torch file)
    RUN/checkpoints/best.pt        fine-tuning: best validation mean Dice
    RUN/model.safetensors          the final weights with their config (for transfer and export)
    RUN/previews/step_XXXXXX.png   orthogonal slices: input / masked / reconstruction / target, or overlays
    RUN/.lock                      flock'ed by the run writing here (pid, host): one run per folder at a time

What differs per method (model, batches, loss, validation, previews, metric columns) is the task's
(:mod:`medmim.train.tasks`); the loop, DDP, precision, accumulation, clipping, checkpoints, logging and
the faults below are the engine's. Faults (:mod:`medmim.train.guard`): SIGTERM / SIGINT checkpoint the
step, print the ``... resume=auto`` command and exit 128 + signal (DDP ranks agree each step); a NaN/Inf
loss or gradient skips the update (``train.on_divergence``: skip, stop or roll back); unreadable cached
cases are skipped and named (at most ``data.max_bad_fraction``); a checkpoint that cannot be written
keeps the previous one and stops the run (exit 2).
"""

from __future__ import annotations

import functools
import gc
import math
import os
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader

from medmim.config import Config, save_config
from medmim.data.selection import data_record, finetune_cases, pretrain_cases, resolve_caches
from medmim.errors import MedmimError
from medmim.models import count_parameters
from medmim.fileio import atomic_write_json
from medmim.runtime import seed_everything
from medmim.train.checkpoint import CKPT_DIR, find_resume, load_training_state, save_checkpoint
from medmim.train.env import setup_env, unwrap
from medmim.train.guard import (BadCases, DivergenceGuard, RunLock, StopSignals, TrainingInterrupted, grad_norm,
                                resume_command, worker_init)
from medmim.train.metrics_log import BASE_COLUMNS, MetricsLog
from medmim.train.step import accumulate_gradients, make_optimizer, make_scheduler
from medmim.train.schedule import effective_lr
from medmim.train.tasks import task_for


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
        self.metrics: MetricsLog | None = None
        self.bar = None  # the progress bar, while fit() runs on rank 0
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
            self.cases = pretrain_cases(caches, cfg.data.fold, t.seed, cfg.data.channels)
        else:
            self.cases = finetune_cases(caches, cfg.data.fold, cfg.data.label_fraction, t.seed, cfg.data.channels)
        self.data_record = data_record(self.cases, caches, finetune=cfg.task == "finetune")
        if self.cases.channels != cfg.model.in_channels:
            names = f" {self.cases.channel_names}" if self.cases.channel_names else ""
            raise MedmimError(f"model.in_channels={cfg.model.in_channels} but the data has {self.cases.channels} "
                              f"channel(s){names}{'' if cfg.data.channels else ' (choose some with data.channels)'}")
        self.task = task_for(cfg, self.cases, self.env.device, self.warn)
        self.model = self.task.build_model(self.log)
        if t.grad_checkpoint and hasattr(self.model, "set_grad_checkpointing"):
            self.model.set_grad_checkpointing(True)
        self.log(f"model: {type(self.model).__name__}, {count_parameters(self.model) / 1e6:.2f} M parameters")
        self.model.to(self.env.device)
        eff_batch = cfg.data.batch_size * t.grad_accum * self.env.world
        self.peak_lr = effective_lr(t.lr, eff_batch, t.base_batch_size, t.scale_lr)
        self.steps_per_epoch = max(1, math.ceil(
            self.task.sampler(self.cases.train).crops_per_epoch(self.env.world) / (cfg.data.batch_size * t.grad_accum)))
        if t.max_steps is not None:
            self.total_steps = t.max_steps
        elif t.epochs is not None:
            self.total_steps = t.epochs * self.steps_per_epoch
        else:
            raise MedmimError("set train.max_steps or train.epochs to bound the run")
        self.optimizer = make_optimizer(self.model, cfg, self.peak_lr, self.task.lr_scale())
        self.scheduler = make_scheduler(self.optimizer, cfg, self.total_steps, self.peak_lr)
        self.scaler = torch.amp.GradScaler("cuda", enabled=t.precision == "fp16" and self.env.device.type == "cuda")
        self.step, self.best = 0, -math.inf
        self.window = _new_window()  # sums over the steps since the last log row
        self.guard = DivergenceGuard(t.on_divergence, t.max_bad_steps, t.max_rollbacks)
        self.lr_scale = 1.0  # product of the rollbacks' lr factors; 1 unless train.on_divergence=rollback fired
        self.last_ckpt_step: int | None = None  # step of RUN/checkpoints/last.pt, when this process knows it
        self.signals = StopSignals(announce=False)  # replaced by the live one during fit()
        self.bad_cases = BadCases([str(c.folder) for c in self.cases.train], cfg.data.max_bad_fraction)
        self.resume_path = find_resume(cfg.resume, self.run_dir)
        if self.resume_path is not None:
            self._restore(self.resume_path)
        self.ddp_model = self.model
        if self.env.distributed:
            ids = [self.env.device.index] if self.env.device.type == "cuda" else None
            self.ddp_model = nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        if t.compile:
            self.ddp_model = torch.compile(self.ddp_model)

    def _loader(self, start_epoch: int) -> DataLoader:
        d = self.cfg.data
        init = functools.partial(worker_init, self.lock.identity() if self.lock else None) if d.num_workers > 0 else None
        sampler = self.task.sampler(self.cases.train, start_epoch=start_epoch, rank=self.env.rank, world=self.env.world)
        return DataLoader(sampler, batch_size=d.batch_size,
                          num_workers=d.num_workers, pin_memory=self.env.device.type == "cuda",
                          persistent_workers=d.num_workers > 0, prefetch_factor=4 if d.num_workers > 0 else None,
                          worker_init_fn=init)

    # -- checkpoint state --
    def _state(self) -> dict:
        return {
            "model": unwrap(self.model).state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "step": self.step,
            "best_metric": self.best,
            "rng_torch": torch.get_rng_state(),
            "lr_scale": self.lr_scale,
            "rollbacks": self.guard.rollbacks,
            "config": self.cfg.to_dict(),
            "data": self.data_record,
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
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.metrics is not None:
            self.metrics.close()
        if self.lock is not None:
            self.lock.release()

    # -- the loop --
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

    def _open_run_folder(self) -> None:
        """Rank 0: the config as given, the data record beside it, and the metrics log (rewound on resume)."""
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(self.cfg, self.run_dir / "config.yaml")
            atomic_write_json(self.run_dir / "data.json", self.data_record)
        except OSError as e:
            raise MedmimError(f"{self.run_dir}: cannot write the run folder ({e.strerror or e})")
        self.metrics = MetricsLog(self.run_dir, BASE_COLUMNS + self.task.columns(),
                                  self.step if self.resume_path else None)

    def _fit(self) -> dict:
        cfg, t, env = self.cfg, self.cfg.train, self.env
        if env.main:
            self._open_run_folder()
        start_step = self.step
        if self.step >= self.total_steps:
            self.log(f"already at step {self.step} of {self.total_steps}: nothing to do")
            return self._finish(0.0)
        crops_per_step = cfg.data.batch_size * t.grad_accum * env.world
        start_epoch = (self.step * crops_per_step) // max(1, self.task.sampler(self.cases.train).crops_per_epoch(1))
        data_iter = iter(self._loader(start_epoch))
        self.log(f"{self.task.describe()}: "
                 f"{len(self.cases.train)} training, {len(self.cases.val)} validation cases; "
                 f"{self.total_steps} steps of {crops_per_step} crops, peak lr {self.peak_lr:.3g}, "
                 f"{t.precision}, {env.world} process(es) on {env.device.type}")
        if env.main:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=self.total_steps, initial=self.step, desc=cfg.task, unit="step", dynamic_ncols=True,
                            disable=os.environ.get("MEDMIM_NO_PROGRESS") == "1")
        t_start = time.perf_counter()
        self.window = _new_window()
        stopped_by_time = False
        self.model.train()
        while self.step < self.total_steps:
            t0 = time.perf_counter()
            self.optimizer.zero_grad(set_to_none=True)
            loss_sum, out, wait = accumulate_gradients(
                self.task, self.ddp_model, lambda: self._next_batch(data_iter), t.grad_accum, t.precision, env.device,
                self.scaler, self.ddp_model.no_sync if env.distributed else None)
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
                lr_used = max(g["lr"] for g in self.optimizer.param_groups)  # this step's (full) lr, logged
                self.scheduler.step()
                self.step += 1
                if env.device.type == "cuda":
                    torch.cuda.synchronize()
                self._after_step(loss_sum, out, wait, time.perf_counter() - t0, lr_used, crops_per_step, t_start)
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

    def _after_step(self, loss: float, out, wait: float, seconds: float, lr: float, crops: int, t_start: float) -> None:
        """The step's bookkeeping, then whatever falls due at this step: log row, preview, validation, checkpoint."""
        t, w = self.cfg.train, self.window
        w["loss"] += loss
        w["n"] += 1
        w["wait"] += wait
        w["busy"] += seconds
        w["crops"] += crops
        w["lr"] = lr
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", crops_s=f"{w['crops'] / max(w['busy'], 1e-9):.1f}")
        if self.step % t.log_every == 0 or self.step == self.total_steps:
            self._log_train(w, t_start)
            self.window = _new_window()
        if self.step % self.steps_per_epoch == 0 and self.env.main:
            self.log(f"epoch {self.step // self.steps_per_epoch} done at step {self.step}: "
                     f"loss {loss:.4f}, {time.perf_counter() - t_start:.0f} s")
        if self.step % t.preview_every == 0 and self.env.main:
            self._preview(out)
        if self.step % t.val_every == 0 or self.step == self.total_steps:
            self._validate()
        if self.step % t.ckpt_every == 0:
            self._checkpoint("last.pt")
        if self.step in t.keep_checkpoints:  # e.g. the pretext check at several points of a pretraining
            self._checkpoint(f"step_{self.step:06d}.pt")

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
        if self.bar is not None:
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

    # -- validation and previews --
    @torch.no_grad()
    def _validate(self) -> None:
        if not self.cases.val:
            return
        if self.env.main:
            self.model.eval()
            t0 = time.perf_counter()
            try:
                row = self.task.validate(self.model)
            finally:
                self.model.train()
            row.update(step=self.step, val_s=round(time.perf_counter() - t0, 3))
            self.metrics.write(row)
            self.log(self.task.validation_message(self.step, row, self.best))
            score = self.task.score(row)
            if score is not None and score > self.best:
                self.best = score
                self._checkpoint("best.pt", collective=False)
        self.env.barrier()

    def _preview(self, out) -> None:
        self.task.preview(self.run_dir / "previews" / f"step_{self.step:06d}.png", out)

    def _finish(self, seconds: float, start_step: int = 0) -> dict:
        if self.env.main:
            from medmim.models.transfer import save_weights

            save_weights(self.run_dir / "model.safetensors", unwrap(self.model), config=self.cfg, data=self.data_record)
            if self.metrics is not None:
                self.metrics.close()
        self.env.barrier()
        steps = self.step - start_step
        return {"run_dir": str(self.run_dir), "steps": self.step, "seconds": seconds,
                "s_per_step": seconds / steps if steps else float("nan"), "best_val_dice": self.best,
                "skipped_steps": self.guard.total, "rollbacks": self.guard.rollbacks,
                "bad_cases": sorted(self.bad_cases.seen)}


def _new_window() -> dict:
    return {"loss": 0.0, "n": 0, "wait": 0.0, "busy": 0.0, "crops": 0}


def run_training(cfg: Config, log=print) -> dict:
    """Train as ``cfg`` says; the distributed process group (if any) is torn down at the end."""
    trainer = None
    try:
        trainer = Trainer(cfg, log=log)
        return trainer.fit()
    finally:
        # The DDP wrapper holds the process group, so destroying the group leaves gloo alive until the
        # interpreter exits, where it aborted rank 1 in about 1 of 5 two-process runs (torch 2.13, CPU):
        # "terminate called without an active exception". Free the trainer (it sits in reference
        # cycles) before destroying the group.
        trainer = None
        if dist.is_available() and dist.is_initialized():
            gc.collect()
            dist.destroy_process_group()
