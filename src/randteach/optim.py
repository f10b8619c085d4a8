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
    params = [p for p in params if p.requires_grad]
    if cfg.name == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
    if cfg.name == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    raise ValueError(f"unknown optimizer {cfg.name!r}")


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
