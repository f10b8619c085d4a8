"""Optimizers and learning-rate schedules.

A schedule is a pure function of the step, so a resumed run continues it exactly:
- constant:    lr
- warmup:      lr * min(1, (step + 1) / warmup_steps)                     (linear warm-up, then constant)
- cosine:      linear warm-up, then min_lr + (lr - min_lr) * (1 + cos(pi * progress)) / 2
- exponential: lr * (lr_end / lr) ** (step / (total_steps - 1))          (LR range test: lr at step 0, lr_end at the last)
"""
from __future__ import annotations

import math

import torch

from .config import OptimConfig


def build_optimizer(cfg: OptimConfig, params) -> torch.optim.Optimizer:
    """torch.optim's AdamW (Loshchilov & Hutter 2019, Alg. 2), Adam or SGD with momentum, in its fused
    implementation where every parameter lives on a CPU or CUDA device: the same update, one kernel per
    parameter instead of one per operation (AdamW on the demo's 1.5M-parameter student, one CPU core: about
    1.0 ms per step instead of 5.5; benchmarks/cpu_step_parts.py). Elsewhere (e.g. MPS) torch's default."""
    params = [p for p in params if p.requires_grad]
    fused = bool(params) and all(p.device.type in ("cpu", "cuda") for p in params)
    if cfg.name == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay,
                                 fused=fused or None)
    if cfg.name == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay,
                                fused=fused or None)
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                               fused=fused or None)
    raise ValueError(f"unknown optimizer {cfg.name!r}")


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """optimizer.load_state_dict, with every moment buffer laid out in memory as its parameter is.

    A checkpoint may come from a run whose student had another memory format (a stacked run resumed alone,
    channels-last on one device and not on another), and torch's fused kernels walk parameter, gradient and
    moments as flat memory: a buffer in another layout would pair the wrong elements without an error."""
    optimizer.load_state_dict(state)
    for param, buffers in optimizer.state.items():
        for name, value in buffers.items():
            if torch.is_tensor(value) and value.shape == param.shape and value.stride() != param.stride():
                buffers[name] = torch.empty_like(param, dtype=value.dtype).copy_(value)


def lr_at(cfg: OptimConfig, step: int, total_steps: int) -> float:
    """Learning rate of optimizer step `step` (0-based) out of `total_steps`."""
    if cfg.schedule == "constant":
        return cfg.lr
    warm = 1.0
    if cfg.warmup_steps > 0:
        warm = min(1.0, (step + 1) / cfg.warmup_steps)
    if cfg.schedule == "warmup":
        return cfg.lr * warm
    if cfg.schedule == "cosine":
        if step < cfg.warmup_steps:
            return cfg.lr * warm
        span = max(1, total_steps - cfg.warmup_steps - 1)
        progress = min(1.0, (step - cfg.warmup_steps) / span)
        return cfg.min_lr + (cfg.lr - cfg.min_lr) * 0.5 * (1 + math.cos(math.pi * progress))
    if cfg.schedule == "exponential":
        if total_steps <= 1:
            return cfg.lr
        return cfg.lr * (cfg.lr_end / cfg.lr) ** (step / (total_steps - 1))
    raise ValueError(f"unknown schedule {cfg.schedule!r}")


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
