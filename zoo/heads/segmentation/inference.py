"""Whole-image and sliding-window inference for semantic segmentation: full-resolution logits from any function
that maps images to logits (a head's ``forward`` output at stride 4 is upsampled to the tile size)."""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn.functional as F

from zoo.heads.segmentation.base import resize_to

__all__ = ["sliding_window_logits", "whole_image_logits"]

LogitsFn = Callable[[torch.Tensor], Any]


def _pair(v: int | Sequence[int], name: str) -> tuple[int, int]:
    pair = (int(v), int(v)) if isinstance(v, (int, float)) else tuple(int(x) for x in v)
    if len(pair) != 2 or min(pair) < 1:
        raise ValueError(f"{name} must be a positive int or an (h, w) pair of positive ints, got {v!r}")
    return pair  # type: ignore[return-value]


def _logits(fn: LogitsFn, images: torch.Tensor, num_classes: int | None) -> torch.Tensor:
    """``fn(images)`` as float logits ``(N, K, h, w)`` at the images' size (bilinear upsampling when coarser)."""
    out = fn(images)
    if isinstance(out, Mapping):
        if "logits" not in out:
            raise KeyError(f"fn returned a dict with keys {sorted(out)}; it must return logits or a dict with 'logits'")
        out = out["logits"]
    if not isinstance(out, torch.Tensor) or out.dim() != 4 or out.shape[0] != images.shape[0]:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"fn must return logits (N, K, h, w) for N={images.shape[0]} images, got {shape}")
    if num_classes is not None and out.shape[1] != num_classes:
        raise ValueError(f"fn returned {out.shape[1]} channels but num_classes={num_classes}")
    return resize_to(out.float(), images.shape[-2:])


def _starts(size: int, window: int, stride: int) -> list[int]:
    """Window origins along one side: every ``stride`` pixels, the last one flush with the end."""
    if size <= window:
        return [0]
    n = math.ceil((size - window) / stride) + 1
    return sorted({min(i * stride, size - window) for i in range(n)})


def sliding_window_logits(fn: LogitsFn, images: torch.Tensor, window: int | Sequence[int],
                          stride: int | Sequence[int] | None = None, num_classes: int | None = None, *,
                          tiles_per_batch: int = 1, pad_value: float = 0.0) -> torch.Tensor:
    """Full-resolution logits from overlapping windows, averaged where windows overlap.

    Images smaller than the window (on either side) are padded bottom/right with ``pad_value`` (0 = the mean colour
    of normalised images) and the result is cropped back.

    Args:
        fn: maps images ``(N, 3, h, w)`` to logits ``(N, K, h', w')`` (or a dict with ``"logits"``, e.g. a
            segmentation head's output); coarser logits are upsampled (bilinear) to ``(h, w)``.
        images: ``(B, 3, H, W)`` normalised images.
        window: tile ``(h, w)`` (or one int for a square).
        stride: step between tiles ``(h, w)`` (default: the window, i.e. no overlap).
        num_classes: K, checked against ``fn``'s output when given.
        tiles_per_batch: how many tile positions to stack into one ``fn`` call (``N = B * tiles_per_batch``).
        pad_value: value of the padding for images smaller than the window.
    Returns:
        logits ``(B, K, H, W)`` float32.
    """
    if images.dim() != 4:
        raise ValueError(f"images must be (B, 3, H, W), got shape {tuple(images.shape)}")
    wh, ww = _pair(window, "window")
    sh, sw = _pair(stride if stride is not None else (wh, ww), "stride")
    if sh > wh or sw > ww:
        raise ValueError(f"stride {(sh, sw)} is larger than window {(wh, ww)}: pixels between tiles would get no "
                         "logits; use a stride <= window")
    b, _, h, w = images.shape
    pad_h, pad_w = max(wh - h, 0), max(ww - w, 0)
    if pad_h or pad_w:
        images = F.pad(images, (0, pad_w, 0, pad_h), value=pad_value)
    hp, wp = images.shape[-2:]
    boxes = [(y, x) for y in _starts(hp, wh, sh) for x in _starts(wp, ww, sw)]
    total: torch.Tensor | None = None
    count = torch.zeros(1, 1, hp, wp, device=images.device)
    per_call = max(1, int(tiles_per_batch))
    for i in range(0, len(boxes), per_call):
        chunk = boxes[i:i + per_call]
        tiles = torch.cat([images[:, :, y:y + wh, x:x + ww] for y, x in chunk], dim=0)
        logits = _logits(fn, tiles, num_classes)
        if total is None:
            total = logits.new_zeros(b, logits.shape[1], hp, wp)
        for j, (y, x) in enumerate(chunk):
            total[:, :, y:y + wh, x:x + ww] += logits[j * b:(j + 1) * b]
            count[:, :, y:y + wh, x:x + ww] += 1
    assert total is not None
    return (total / count)[:, :, :h, :w]


def whole_image_logits(fn: LogitsFn, images: torch.Tensor, num_classes: int | None = None, *,
                       size_divisor: int = 1, pad_value: float = 0.0) -> torch.Tensor:
    """Full-resolution logits from one pass over the whole image.

    Args:
        fn: as in :func:`sliding_window_logits`.
        images: ``(B, 3, H, W)`` normalised images.
        num_classes: K, checked against ``fn``'s output when given.
        size_divisor: pad bottom/right to a multiple of it first (e.g. 32 for exact feature-map alignment).
        pad_value: value of that padding.
    Returns:
        logits ``(B, K, H, W)`` float32.
    """
    if images.dim() != 4:
        raise ValueError(f"images must be (B, 3, H, W), got shape {tuple(images.shape)}")
    h, w = images.shape[-2:]
    d = max(1, int(size_divisor))
    pad_h, pad_w = (-h) % d, (-w) % d
    if pad_h or pad_w:
        images = F.pad(images, (0, pad_w, 0, pad_h), value=pad_value)
    return _logits(fn, images, num_classes)[:, :, :h, :w]
