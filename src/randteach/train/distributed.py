"""Data parallelism under `torchrun`: torch's DistributedDataParallel over shards of every global batch.

Each rank takes a contiguous shard of the global batch and weights each chunk's loss by its share of the
*global* batch times the world size; DDP averages the gradients over ranks (overlapping the all-reduce
with the backward pass), so the result is the gradient of the global-batch mean: the global batch size,
and with it the optimization, is the same for any number of processes (up to float summation order).
Micro-batches accumulate locally under `no_sync` and all-reduce once per step. Batch-norm statistics are
per rank unless `train.sync_bn` converts them to SyncBatchNorm. Only rank 0 writes files.
"""
from __future__ import annotations

import atexit
import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .. import launcher
from ..errors import UserError
from ..text import counted


@dataclass
class Dist:
    rank: int = 0
    world: int = 1

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, idx: torch.Tensor) -> torch.Tensor:
        """This rank's part of a global batch (every rank gets a contiguous, near-equal block)."""
        return idx.tensor_split(self.world)[self.rank] if self.enabled else idx

    def wrap(self, module: nn.Module, sync_bn: bool = False) -> nn.Module:
        """`module` under DistributedDataParallel (itself in one process). Buffers (batch-norm statistics)
        stay per rank, as the hand-written all-reduce kept them, unless sync_bn."""
        if not self.enabled:
            return module
        device = next(module.parameters()).device
        if sync_bn:
            if device.type != "cuda":
                raise UserError("train.sync_bn=true needs CUDA devices (torch's SyncBatchNorm runs on GPUs only); "
                                "set --train.sync_bn false on the CPU")
            module = nn.SyncBatchNorm.convert_sync_batchnorm(module)
        ids = [device.index] if device.type == "cuda" else None
        return DistributedDataParallel(module, device_ids=ids, forward_sync_buffers=False)

    def no_sync(self, module: nn.Module):
        """Skip the gradient all-reduce of this backward (all micro-batches but the last of a step)."""
        return module.no_sync() if isinstance(module, DistributedDataParallel) else contextlib.nullcontext()

    def sum_(self, t: torch.Tensor) -> torch.Tensor:
        """Sum `t` over ranks, in place."""
        if self.enabled:
            dist.all_reduce(t)
        return t

    def any(self, flag: bool, device: torch.device) -> bool:
        """True on every rank if it is true on one (so all ranks stop at the same step)."""
        if not self.enabled:
            return flag
        return bool(self.sum_(torch.tensor([float(flag)], device=device)) > 0)

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()


def process_gpu() -> int:
    """The index of this process's GPU: its local rank's; or, for processes started by another launcher
    (srun with --gpus-per-task=1, say) that sees one GPU, that one. torchrun's processes share one
    CUDA_VISIBLE_DEVICES, so under torchrun one visible GPU for several processes is refused."""
    local, count = launcher.local_rank() or 0, torch.cuda.device_count()
    if count == 1 and not launcher.torchrun():
        return 0
    if local >= count:
        raise UserError(f"this process has local rank {local} but sees {counted(count, 'GPU')} "
                        f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); NCCL needs a GPU "
                        f"per process: start at most {count} processes per node (torchrun --nproc_per_node {count})")
    return local


def from_environment(device: torch.device) -> Dist:
    """Join the process group that torchrun describes in the environment (one process: no group). On GPUs
    each process is bound to its own first, so that NCCL's first collective (a barrier, before any tensor
    names a device) does not run every process on GPU 0."""
    world = launcher.world_size()
    if world <= 1:
        return Dist()
    if not dist.is_initialized():
        if device.type == "cuda":
            gpu = torch.device("cuda", process_gpu())
            torch.cuda.set_device(gpu)
            dist.init_process_group(backend="nccl", device_id=gpu)
        else:
            dist.init_process_group(backend="gloo")
        # the group this process made is taken down before the interpreter's own teardown: left to it, the
        # backend's threads were sometimes destroyed still running (gloo: "terminate called", SIGABRT)
        atexit.register(_destroy_process_group)
    return Dist(rank=dist.get_rank(), world=dist.get_world_size())


def _destroy_process_group() -> None:
    """At exit: the process group, unless the user's code took it down already."""
    if dist.is_initialized():
        dist.destroy_process_group()
