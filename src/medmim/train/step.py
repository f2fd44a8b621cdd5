"""One optimizer step's pieces, shared by the engine, the study's time estimate and the benchmarks.

    optimizer = make_optimizer(model, cfg, lr)
    loss, out, wait = accumulate_gradients(task, model, next_batch, grad_accum, precision, device)
    seconds = measure_step_seconds(cfg)
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import nullcontext

import torch
from torch import nn

from medmim.config import Config
from medmim.runtime import autocast
from medmim.train.schedule import warmup_cosine
from medmim.train.tasks import Task, task_for


def _no_decay(name: str, p: torch.Tensor) -> bool:
    # Swin's relative position bias tables are position embeddings too (Swin and SimMIM leave them undecayed)
    return (p.ndim <= 1 or name.endswith(".bias") or "pos_embed" in name or "token" in name
            or "relative_position_bias_table" in name)


def param_groups(model: nn.Module, weight_decay: float, lr: float,
                 lr_scale: Callable[[str], tuple[float, bool]] | None = None) -> list[dict]:
    """No weight decay on biases, norms, position embeddings (Swin's relative position tables too) and mask
    tokens (as in MAE).

    ``lr_scale(name) -> (factor, is_encoder)`` (a task's fine-tuning recipe) splits the groups further: each
    gets ``lr * factor`` and says whether it is the encoder's (held still while the decoder warms up).
    """
    if lr_scale is None:
        decay = [p for n, p in model.named_parameters() if p.requires_grad and not _no_decay(n, p)]
        no_decay = [p for n, p in model.named_parameters() if p.requires_grad and _no_decay(n, p)]
        return [{"params": decay, "weight_decay": weight_decay, "lr": lr},
                {"params": no_decay, "weight_decay": 0.0, "lr": lr}]
    groups: dict[tuple, dict] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            factor, encoder = lr_scale(name)
            wd = 0.0 if _no_decay(name, p) else weight_decay
            g = groups.setdefault((factor, encoder, wd), {"params": [], "weight_decay": wd, "lr": lr * factor,
                                                          "lr_scale": factor, "encoder": encoder})
            g["params"].append(p)
    return list(groups.values())


def make_optimizer(model: nn.Module, cfg: Config, lr: float, lr_scale=None) -> torch.optim.Optimizer:
    # fused AdamW (CPU and CUDA): one kernel over all parameters; on CPU a ViT-B/16 MAE's update takes
    # 0.27x the time of PyTorch's default for-loop AdamW (benchmarks/bench_ablations.py)
    t = cfg.train
    return torch.optim.AdamW(param_groups(model, t.weight_decay, lr, lr_scale), lr=lr, betas=tuple(t.betas),
                             fused=True)


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: Config, total_steps: int, peak_lr: float):
    """Warm-up then cosine for every group; an encoder group stays at 0 for ``train.freeze_encoder_steps``."""
    t = cfg.train

    def schedule(step: int) -> float:
        return warmup_cosine(step, total_steps, t.warmup_steps, 1.0, t.min_lr / peak_lr)

    def frozen_first(step: int) -> float:
        return 0.0 if step < t.freeze_encoder_steps else schedule(step)

    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, [frozen_first if g.get("encoder") and t.freeze_encoder_steps else schedule
                    for g in optimizer.param_groups])


def accumulate_gradients(task: Task, model: nn.Module, next_batch, grad_accum: int, precision: str,
                         device: torch.device, scaler=None, no_sync=None) -> tuple[float, object, float]:
    """Forward and backward ``grad_accum`` micro-batches (gradients summed, each loss / grad_accum).

    ``next_batch()`` gives a micro-batch; ``no_sync()`` (DDP) skips the gradient all-reduce of all but the
    last. Returns (mean loss, the last micro-batch's outputs for a preview, seconds spent waiting for data).
    """
    loss_sum, wait, out = 0.0, 0.0, None
    for micro in range(grad_accum):
        tw = time.perf_counter()
        batch = next_batch()
        wait += time.perf_counter() - tw
        sync = no_sync() if (no_sync is not None and micro < grad_accum - 1) else nullcontext()
        with sync:
            with autocast(precision, device):
                loss, out = task.forward(model, batch)
            (scaler.scale(loss / grad_accum) if scaler is not None else loss / grad_accum).backward()
        loss_sum += float(loss.detach()) / grad_accum
    return loss_sum, out, wait


def measure_step_seconds(cfg: Config, repeats: int = 2) -> float:
    """Wall seconds of one optimizer step of ``cfg``'s run on this machine: the engine's own forward, loss,
    backward (``grad_accum`` micro-batches) and AdamW, timed on synthetic crops after one warm-up step.
    Data loading, validation and checkpoints are not in it."""
    from medmim.data.selection import RunCases
    from medmim.runtime import resolve_device

    dev = resolve_device(cfg.run.device)
    # the weights do not change the time; a study's dry run times cells whose pretraining has not run yet
    cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"pretrained": None})})
    if cfg.model.regions:
        from medmim.data.regions import BRATS_LABEL_NAMES as labels
    else:
        labels = {c: str(c) for c in range(cfg.model.num_classes)}
    cases = RunCases([], [], labels, [], cfg.model.in_channels)
    task = task_for(cfg, cases, dev)
    model = task.build_model(log=lambda s: None).to(dev).train()
    opt = make_optimizer(model, cfg, 1e-6)
    g = torch.Generator().manual_seed(0)
    batch = task.synthetic_batch(cfg.data.batch_size, g)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        accumulate_gradients(task, model, lambda: batch, cfg.train.grad_accum, cfg.train.precision, dev)
        opt.step()
        if dev.type == "cuda":
            torch.cuda.synchronize()

    step()
    t0 = time.perf_counter()
    for _ in range(repeats):
        step()
    return (time.perf_counter() - t0) / repeats
