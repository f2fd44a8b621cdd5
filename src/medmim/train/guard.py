"""What keeps a long run alive and honest: pre-emption signals, one writer per run folder, divergence, bad data.

    lock = RunLock(run_dir).acquire()      # flock on RUN/.lock for the run's lifetime; a second run fails at once
    with StopSignals() as signals:         # 1st SIGTERM/SIGINT: stop after this step; 2nd: exit at once
        ... if signals.requested: checkpoint, then raise TrainingInterrupted(...)
    guard = DivergenceGuard(policy, max_bad_steps)    # counts non-finite steps in a row, says what to do
    bad = BadCases(case_folders, max_bad_fraction)     # cached cases the sampler skipped, and when to give up

Exit status of a pre-empted run: 128 + the signal (143 for SIGTERM, 130 for SIGINT), the shell's
"terminated by a signal" convention: the run is not finished, so `medmim pretrain ... && medmim finetune ...`
does not go on with half a model, and schedulers see a pre-emption, not a success.
"""

from __future__ import annotations

import fcntl
import os
import shlex
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from medmim.errors import MedmimError

LOCK_NAME = ".lock"
# a launcher (torchrun) that forwards the scheduler's SIGTERM makes each rank see it twice within
# milliseconds; under a launcher, a repeat of the same signal this soon is the same request
DUPLICATE_WINDOW_S = 1.0


# --- pre-emption -----------------------------------------------------------------------------

class TrainingInterrupted(SystemExit):
    """A run stopped by SIGTERM/SIGINT after writing its checkpoint; exits with status 128 + signal.

    A ``SystemExit`` so that the CLI exits with that status without a traceback; code calling
    :func:`~medmim.train.engine.run_training` directly can catch it and read ``step``, ``checkpoint``
    and ``resume_command``.
    """

    def __init__(self, signum: int, step: int, checkpoint: Path | None, resume_command: str):
        super().__init__(128 + int(signum))
        self.signum = int(signum)
        self.step = step
        self.checkpoint = checkpoint
        self.resume_command = resume_command


def resume_command(task: str, run_dir: Path, distributed: bool) -> str:
    """The command that continues a run where it stopped: the run folder's resolved config plus resume=auto."""
    args = f"{task} {shlex.quote(str(run_dir / 'config.yaml'))} resume=auto"
    return f"torchrun <the same torchrun options> -m medmim {args}" if distributed else f"medmim {args}"


def _say(text: str) -> None:
    # os.write, not print: a signal handler may run in the middle of another write to stderr
    try:
        os.write(2, text.encode())
    except OSError:
        pass


class StopSignals:
    """Turn SIGTERM and SIGINT into a request to stop after the current step; a second one exits at once.

    Installed only in the main thread (signal handlers can live nowhere else); elsewhere it is inert.
    ``announce``: print the one-line notice when a signal arrives (rank 0 only, under DDP).
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, announce: bool = True, under_launcher: bool | None = None):
        self.signum: int | None = None
        self.announce = announce
        self.under_launcher = ("TORCHELASTIC_RUN_ID" in os.environ) if under_launcher is None else under_launcher
        self._t_first = 0.0
        self._old: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else ""

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self._old[s] = signal.signal(s, self.handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)
        self._old = {}

    def handle(self, signum: int, frame=None) -> None:
        name = signal.Signals(signum).name
        if self.signum is None:
            self.signum, self._t_first = signum, time.monotonic()
            if self.announce:
                _say(f"medmim: {name} received: finishing the current step, then writing a checkpoint "
                     f"(send it again to exit at once)\n")
            return
        if self.under_launcher and signum == self.signum and time.monotonic() - self._t_first < DUPLICATE_WINDOW_S:
            return  # the launcher's forwarded copy of the same request
        if self.announce:
            _say(f"medmim: second signal ({name}): exiting at once, without a checkpoint\n")
        os._exit(128 + signum)


def worker_init(lock: tuple[int, int, int] | None, worker_id: int) -> None:
    """DataLoader worker set-up: leave SIGTERM/SIGINT to the main process, drop the inherited run lock.

    A scheduler signals every process of a job; a worker dying of it would break the loader before
    the main process could write its pre-emption checkpoint. Workers exit with the main process.
    ``lock``: (fd, st_dev, st_ino) of the run lock, closed only if a forked worker inherited that very file.
    """
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if lock is not None:
        fd, dev, ino = lock
        try:
            st = os.fstat(fd)
            if (st.st_dev, st.st_ino) == (dev, ino):
                os.close(fd)  # the lock must die with the main process, not with its last worker
        except OSError:
            pass


# --- one writer per run folder -----------------------------------------------------------------

class RunLock:
    """An exclusive ``flock`` on ``RUN/.lock``, held for the run's lifetime.

    The kernel drops the lock when the process ends however it ends (even SIGKILL), so a stale lock
    file never blocks a resume; the file itself stays, holding the last owner's pid and host.
    """

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self.fd: int | None = None

    def acquire(self) -> "RunLock":
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise MedmimError(f"{self.run_dir}: cannot create the run folder's lock file ({e.strerror or e})")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            except OSError:
                holder = "another process"
            os.close(fd)
            raise MedmimError(f"{self.run_dir}: another run is writing into this run folder ({holder}; lock file "
                              f"{self.path}); wait for it, stop it, or choose another run.dir")
        except OSError as e:  # a file system without locks (some network mounts): run, but say so
            os.close(fd)
            print(f"warning: {self.path}: cannot lock the run folder ({e.strerror or e}); "
                  f"make sure no other run writes into it", file=sys.stderr)
            return self
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n"
                  .encode(), 0)
        self.fd = fd
        return self

    def identity(self) -> tuple[int, int, int] | None:
        """(fd, st_dev, st_ino) while held, for :func:`worker_init`."""
        if self.fd is None:
            return None
        st = os.fstat(self.fd)
        return self.fd, st.st_dev, st.st_ino

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing drops the flock; the file stays (deleting it would race a new owner)
            self.fd = None


# --- divergence ---------------------------------------------------------------------------------

def grad_norm(params) -> torch.Tensor:
    """The global L2 norm of the gradients (non-finite if any gradient is NaN or Inf)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.detach().float()) for g in grads]))


@dataclass
class DivergenceGuard:
    """Counts steps whose loss or gradients are not finite and says what the loop must do.

    A bad step is not a step: no optimizer update, the scheduler and the step counter stay, the batch
    is dropped. ``policy``: "skip" (stop after ``max_bad_steps`` bad steps in a row), "stop" (at the
    first), "rollback" (after ``max_bad_steps`` in a row, reload the last checkpoint with the learning
    rate scaled down; at most ``max_rollbacks`` times, then stop).
    """

    policy: str = "skip"
    max_bad_steps: int = 5
    max_rollbacks: int = 3
    streak: int = 0
    total: int = 0
    rollbacks: int = 0

    def good(self) -> None:
        self.streak = 0

    def bad(self) -> str:
        """Record a bad step; return "skip", "rollback" or "stop"."""
        self.streak += 1
        self.total += 1
        if self.policy == "stop":
            return "stop"
        if self.streak < self.max_bad_steps:
            return "skip"
        if self.policy == "rollback" and self.rollbacks < self.max_rollbacks:
            return "rollback"
        return "stop"


# --- bad cached data ------------------------------------------------------------------------------

@dataclass
class BadCases:
    """Training cases the sampler had to skip (unreadable, or checksums not matching case.json).

    Every process (and every DataLoader worker) reports what it skipped with the crops it yields, as
    lines ``CASE_FOLDER<TAB>reason``; under DDP the ranks share their sets, so every rank takes the
    same decision at the same step. ``folders``: the training cases' folders.
    """

    folders: list[str]
    max_fraction: float
    seen: dict[str, str] = field(default_factory=dict)  # case folder -> why
    _new: bool = False

    def __post_init__(self) -> None:
        self.index = {f: i for i, f in enumerate(self.folders)}

    def report(self, text: str, log) -> None:
        for line in text.splitlines():
            folder, _, why = line.partition("\t")
            if folder and folder not in self.seen:
                self.seen[folder] = why
                self._new = True
                log(f"warning: skipped cached case {Path(folder).name} ({folder}): {why}; {len(self.seen)} of "
                    f"{len(self.folders)} training cases skipped so far (data.max_bad_fraction={self.max_fraction:g})")

    def take_new(self) -> bool:
        new, self._new = self._new, False
        return new

    def bitmap(self, device) -> torch.Tensor:
        b = torch.zeros(len(self.folders), device=device)
        for f in self.seen:
            if f in self.index:
                b[self.index[f]] = 1
        return b

    def merge_bitmap(self, bitmap: torch.Tensor) -> None:
        for i in torch.nonzero(bitmap > 0).flatten().tolist():
            self.seen.setdefault(self.folders[i], "unreadable (reported by another rank)")

    def too_many(self) -> bool:
        return len(self.seen) > self.max_fraction * len(self.folders)

    def message(self) -> str:
        names = ", ".join(sorted(self.seen)[:5]) + (" ..." if len(self.seen) > 5 else "")
        return (f"{len(self.seen)} of {len(self.folders)} training cases are unreadable or corrupted, more than "
                f"data.max_bad_fraction={self.max_fraction:g}: {names}; delete those case folders and run "
                f"`medmim data prepare` again (it redoes missing cases), or raise data.max_bad_fraction")
