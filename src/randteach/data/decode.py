"""Decode image files with Pillow into one uint8 (N, C, H, W) array (TinyImageNet, image folders)."""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

# Pillow releases the GIL while decoding, so a few threads decode JPEGs in parallel.
_THREADS = min(8, os.cpu_count() or 1)


def _fit(img: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Center-crop to the aspect ratio of `size` (height, width), then resize bilinearly."""
    h, w = size
    if img.size == (w, h):
        return img
    iw, ih = img.size
    if iw * h > ih * w:   # too wide
        cw = ih * w // h
        img = img.crop(((iw - cw) // 2, 0, (iw - cw) // 2 + cw, ih))
    elif iw * h < ih * w:  # too tall
        ch = iw * h // w
        img = img.crop((0, (ih - ch) // 2, iw, (ih - ch) // 2 + ch))
    return img.resize((w, h), Image.BILINEAR)


def _eight_bit(img: Image.Image) -> Image.Image:
    """16-bit ("I;16*", and "I" as Pillow opens 16-bit PNGs) and float ("F", values in [0, 1]) greyscale
    scaled to 8 bits: Pillow's convert("L") would clip every value above 255 to white instead."""
    if img.mode.startswith("I;16") or img.mode == "I":
        arr, top, kind = np.asarray(img, np.float64) / 257, 65535, "16-bit"  # 65535 -> 255
    elif img.mode == "F":
        arr, top, kind = np.asarray(img, np.float64) * 255, 1, "floating-point"
    else:
        return img
    if arr.size and (arr.min() < 0 or arr.max() > 255):
        raise ValueError(f"{kind} pixel values outside [0, {top}]; save the image with 8 or 16 bits per channel")
    return Image.fromarray(np.rint(arr).astype(np.uint8), "L")


def _decode(path: Path, mode: str, size: tuple[int, int]) -> np.ndarray | str:
    try:
        with Image.open(path) as img:
            arr = np.asarray(_fit(_eight_bit(img).convert(mode), size))
    except Exception as e:  # Pillow raises many types for broken files; report, do not crash
        return f"{type(e).__name__}: {e}"
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def _header(path: Path) -> tuple[str, tuple[int, int]] | None:
    try:
        with Image.open(path) as img:  # reads the header only
            return img.mode, img.size
    except Exception:  # unreadable: read_images reports why
        return None


def read_headers(paths: Sequence[Path]) -> list[tuple[str, tuple[int, int]] | None]:
    """(mode, (width, height)) of each file without decoding its pixels; None where Pillow cannot open it."""
    with ThreadPoolExecutor(_THREADS) as pool:
        return list(pool.map(_header, paths))


def read_images(paths: Sequence[Path], mode: str, size: tuple[int, int]
                ) -> tuple[np.ndarray, list[int], list[tuple[Path, str]]]:
    """Decode `paths` to `mode` ("RGB" or "L") at `size` (height, width).

    Returns (images (n_ok, C, H, W) uint8, positions of the decoded paths, [(path, error)] of the rest).
    """
    channels = 1 if mode == "L" else 3
    out = np.empty((len(paths), channels, *size), np.uint8)
    ok, failed = [], []
    with ThreadPoolExecutor(_THREADS) as pool:
        for i, (path, arr) in enumerate(zip(paths, pool.map(lambda p: _decode(p, mode, size), paths))):
            if isinstance(arr, str):
                failed.append((path, arr))
            else:
                out[len(ok)] = arr
                ok.append(i)
    return out[:len(ok)], ok, failed
