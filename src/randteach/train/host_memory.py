"""Keep freed host memory for the next training step instead of handing it back to the operating system.

glibc's malloc returns the top of its heap to the kernel once more than a threshold of it is free (by
default twice the largest block it has served from mmap, at most 64 MiB), and serves blocks above a
second threshold (128 KiB rising to 32 MiB) from fresh mmaps that are unmapped when freed. A CPU training
step frees its feature maps and gradients, tens of MiB at a time, at its end, so the next step takes the
same memory back page by page, each page a fault. `keep_freed_memory()` raises both thresholds: blocks up
to 32 MiB come from the heap, and the heap is never trimmed, so the process keeps its peak footprint until
it exits. The CPU training loops call it (distillation, stacked runs, the supervised recipe). Measured on
one core of the AMD VM of 2026-12-02, batch 256: our loop with everything off at 1.05x (VGG11) and 1.09x
(ResNet18) the plain hand-written loop (benchmarks/RESULTS-amd-malloc.md), against 0.94x and 0.84x without
this (benchmarks/RESULTS-amd.md as of commit 3cd9332). Blocks above 32 MiB (VGG11's first feature map at
batch 256) are still mapped and unmapped each time; glibc allows no higher threshold.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import sys

import torch

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt's parameter numbers (glibc's malloc.h)
MMAP_THRESHOLD_MAX = 32 << 20  # glibc's upper limit for M_MMAP_THRESHOLD on 64-bit machines
NEVER_TRIM = (1 << 31) - 1     # mallopt takes an int


def keep_freed_memory(device: torch.device) -> bool:
    """For a run on `device`: tell glibc's malloc to keep freed memory (see the module note) if it is the CPU;
    False where nothing was changed (a GPU run, or a C library other than glibc)."""
    if device.type != "cpu" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other C libraries
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX)) and bool(mallopt(M_TRIM_THRESHOLD, NEVER_TRIM))
