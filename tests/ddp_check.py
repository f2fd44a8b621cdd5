"""Run under torchrun (2 CPU processes, gloo) by tests/test_train.py; not a test module itself.

On a fixed batch with fixed masks, each rank takes its half of the batch. Rank 0 writes the DDP
gradients and, after a few optimiser steps, every rank's parameter checksum to OUT (a .pt file).
"""

import gc
import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from medmim.config import load_config
from medmim.models import build_pretrainer


def fixed_batch(n: int = 4):
    g = torch.Generator().manual_seed(1)
    x = torch.rand(n, 1, 32, 32, 32, generator=g)
    L = 4 ** 3
    mask = torch.zeros(n, L, dtype=torch.bool)
    for i in range(n):
        mask[i, torch.randperm(L, generator=g)[: L * 3 // 4]] = True
    return x, mask


def main(out: str, method: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = build_pretrainer(load_config(f"{method}-tiny"))
    ddp = DDP(model)
    x, mask = fixed_batch()
    half = x.shape[0] // world
    sl = slice(rank * half, (rank + 1) * half)
    ddp(x[sl], mask=mask[sl]).loss.backward()
    grads = {k: p.grad.detach().clone() for k, p in model.named_parameters() if p.grad is not None}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for step in range(3):
        opt.step()
        opt.zero_grad()
        ddp(x[sl], mask=mask[sl]).loss.backward()
    checksum = torch.stack([p.detach().double().sum() for p in model.parameters()])
    sums = [torch.zeros_like(checksum) for _ in range(world)]
    dist.all_gather(sums, checksum)
    if rank == 0:
        torch.save({"grads": grads, "checksums": torch.stack(sums)}, out)
    del ddp  # DDP holds the process group; left alive, gloo can abort at interpreter exit
    gc.collect()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
