"""Data parallelism under `torchrun`: each rank takes a shard of every global batch; gradients are summed.

The loss of each chunk is weighted by its share of the *global* batch, so the all-reduced sum of the
ranks' gradients is exactly the gradient of the global-batch mean: the global batch size, and with it
the optimization, is the same for any number of processes (up to float summation order). Batch-norm
statistics are per rank (no SyncBatchNorm), as in DistributedDataParallel. Only rank 0 writes files.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, idx: torch.Tensor) -> torch.Tensor:
        """This rank's part of a global batch (every rank gets a contiguous, near-equal block)."""
        return idx.tensor_split(self.world)[self.rank] if self.enabled else idx

    def sum_gradients(self, params) -> None:
        if not self.enabled:
            return
        grads = [p.grad for p in params if p.grad is not None]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()

    def sum_scalar(self, x: float, device: torch.device) -> float:
        if not self.enabled:
            return x
        t = torch.tensor([x], dtype=torch.float64, device=device)
        dist.all_reduce(t)
        return float(t)

    def any(self, flag: bool, device: torch.device) -> bool:
        """True on every rank if it is true on one (so all ranks stop at the same step)."""
        return self.sum_scalar(float(flag), device) > 0 if self.enabled else flag

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()


def from_environment(device: torch.device) -> Dist:
    """Join the process group that torchrun describes in the environment (one process: no group)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Dist(rank=dist.get_rank(), world=dist.get_world_size(), local_rank=int(os.environ.get("LOCAL_RANK", "0")))
