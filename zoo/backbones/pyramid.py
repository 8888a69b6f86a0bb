"""Simple feature pyramid that turns one single-stride map (a ViT's) into several strides."""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn
from timm.layers import LayerNorm2d

__all__ = ["SimpleFeaturePyramid"]


def _resample(in_ch: int, scale: float) -> tuple[nn.Module, int]:
    """Layers that resample a map by ``scale`` (a power of two); returns (module, out channels)."""
    if scale == 1:
        return nn.Identity(), in_ch
    if scale < 1:
        steps = int(round(math.log2(1 / scale)))
        return nn.Sequential(*[nn.MaxPool2d(2, 2) for _ in range(steps)]), in_ch
    steps = int(round(math.log2(scale)))
    layers: list[nn.Module] = []
    ch = in_ch
    for i in range(steps):
        out = max(ch // 2, 16)
        layers.append(nn.ConvTranspose2d(ch, out, 2, stride=2))
        ch = out
        if i < steps - 1:
            layers += [LayerNorm2d(ch), nn.GELU()]
    return nn.Sequential(*layers), ch


class SimpleFeaturePyramid(nn.Module):
    """Multi-scale maps from a plain backbone's last map: up-sampling by transposed convolutions, down-sampling by
    max-pooling, then a 1x1 and a 3x3 convolution with LayerNorm per level.

    Args:
        in_channels: channels of the input map.
        in_stride: its stride (16 for ``*_patch16_*`` ViTs).
        strides: output strides, each ``in_stride`` times a power of two.
        out_channels: channels of every output level (default ``in_channels``).
    """

    def __init__(self, in_channels: int, in_stride: int, *, strides: Sequence[int] = (4, 8, 16, 32),
                 out_channels: int | None = None) -> None:
        super().__init__()
        out_channels = out_channels or in_channels
        self.levels = nn.ModuleList()
        for s in strides:
            scale = in_stride / s
            if scale <= 0 or abs(math.log2(scale) - round(math.log2(scale))) > 1e-6:
                raise ValueError(f"pyramid stride {s} must be {in_stride} times a power of two")
            resample, ch = _resample(in_channels, scale)
            self.levels.append(nn.Sequential(
                resample,
                nn.Conv2d(ch, out_channels, 1, bias=False), LayerNorm2d(out_channels),
                nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False), LayerNorm2d(out_channels),
            ))
        self.channels = [out_channels] * len(strides)
        self.strides = list(strides)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Args: x ``(B, C, H, W)``. Returns: one map per stride, ``(B, out_channels, H*in_stride/s, W*in_stride/s)``."""
        return [level(x) for level in self.levels]
