"""Shared pieces of the encoders: normalization layers, He initialization, parameter counts."""
from __future__ import annotations

import torch
from torch import nn

from ..config import NORMS, ConfigError, own_norm


def count_parameters(module: nn.Module) -> int:
    """Number of distinct parameter entries (a tensor shared by two layers counts once)."""
    return sum(p.numel() for p in module.parameters())


def resolve_norm(norm: str, encoder: str, allowed: tuple[str, ...] = NORMS) -> str:
    """'default' -> the architecture's own normalization (`config.own_norm`); reject kinds the encoder has no
    place for."""
    if norm not in NORMS:
        raise ConfigError(f"model.norm: {norm!r} is not one of {', '.join(NORMS)}")
    if norm not in allowed:
        raise ConfigError(f"model.norm={norm} is not available for encoder {encoder}; "
                          f"use one of {', '.join(allowed)}")
    return own_norm(encoder) if norm == "default" else norm


CHANNELS_PER_GROUP = 8


def group_norm8(channels: int, where: str) -> nn.GroupNorm:
    """The random-teacher paper's "GroupNorm8" (App. B, Fig. 11): groups of 8 channels, GroupNorm(C // 8, C)."""
    if channels % CHANNELS_PER_GROUP:
        raise ConfigError(f"model.norm=group uses groups of {CHANNELS_PER_GROUP} channels, but {where} has "
                          f"{channels}; choose a width whose channel counts are multiples of 8, or another norm")
    return nn.GroupNorm(channels // CHANNELS_PER_GROUP, channels)


def norm2d(kind: str, channels: int) -> nn.Module:
    """The normalization layer of a conv encoder after a conv with `channels` outputs."""
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "layer":
        # LayerNorm over (C, H, W) of each sample; the affine scale/shift is per channel
        # (as in GroupNorm), not per element as nn.LayerNorm([C, H, W]) would have it.
        return nn.GroupNorm(1, channels)
    if kind == "group":
        return group_norm8(channels, "a conv layer")
    if kind == "instance":
        return nn.InstanceNorm2d(channels, affine=True)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"unresolved norm kind {kind!r}")


def he_init_(module: nn.Module) -> nn.Module:
    """He et al. (2015) init of an encoder, as torchvision does for ResNet/VGG convs:
    convs N(0, 2/fan_out), linear layers N(0, 2/fan_in), biases 0, norm scales 1 and shifts 0."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.Linear):
            nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
        elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.GroupNorm, nn.InstanceNorm2d, nn.LayerNorm)):
            if m.weight is not None:
                nn.init.ones_(m.weight)
        else:
            continue
        if getattr(m, "bias", None) is not None:
            nn.init.zeros_(m.bias)
    return module


def fp32_channels_last(encoder: nn.Module, device: torch.device) -> bool:
    """Whether `encoder` runs faster in channels-last memory format in fp32 on `device`: on a CPU, for the
    encoders that say so (`fp32_cpu_channels_last`: the narrow conv nets, where torch's NCHW max-pool and
    narrow convolutions are slow); never elsewhere (user encoders, GPUs: not measured)."""
    return device.type == "cpu" and getattr(encoder, "fp32_cpu_channels_last", False)
