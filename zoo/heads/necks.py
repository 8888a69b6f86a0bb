"""Necks: modules between the backbone and the heads, registered like heads (``@register_neck``).

Feature pyramid network neck: top-down FPN over chosen backbone levels plus stride-2 extra levels (P6, P7).

Wraps :class:`torchvision.ops.FeaturePyramidNetwork`; works on any :class:`~zoo.backbones.TimmBackbone`, convnets and
ViTs alike (the backbone already turns a plain ViT into a multi-stride pyramid).
"""

from __future__ import annotations

from collections import OrderedDict
from functools import partial
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import ExtraFPNBlock

from zoo.heads.base import Neck, register_neck
from zoo.heads.layers import norm_layer

__all__ = ["FPN", "default_in_levels", "norm_layer_factory"]


def norm_layer_factory(norm: str | None) -> Callable[[int], nn.Module] | None:
    """A ``channels -> module`` factory for ``norm`` (see :func:`zoo.heads.layers.norm_layer`), ``None`` for no
    normalisation."""
    if norm_layer(norm, 8, what="FPN norm") is None:
        return None
    return partial(norm_layer, norm)


def default_in_levels(strides: Sequence[int]) -> tuple[int, ...]:
    """Indices of the backbone levels with strides 8, 16 and 32, or of the coarsest three levels when those are
    not all present (fewer when the backbone has fewer levels)."""
    strides = list(strides)
    wanted = [strides.index(s) for s in (8, 16, 32) if s in strides]
    if len(wanted) == 3:
        return tuple(wanted)
    n = len(strides)
    return tuple(range(max(0, n - 3), n))


class _ExtraLevels(ExtraFPNBlock):
    """``n`` extra coarser levels, each a 3x3 stride-2 convolution of the previous output (P6 from P5, P7 from
    ReLU(P6), ...), as in RetinaNet/FCOS."""

    def __init__(self, channels: int, n: int) -> None:
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(channels, channels, 3, stride=2, padding=1) for _ in range(n))
        for conv in self.convs:
            nn.init.kaiming_uniform_(conv.weight, a=1)
            nn.init.zeros_(conv.bias)

    def forward(self, results: list[torch.Tensor], x: list[torch.Tensor],
                names: list[str]) -> tuple[list[torch.Tensor], list[str]]:
        last = results[-1]
        for i, conv in enumerate(self.convs):
            last = conv(last if i == 0 else F.relu(last))
            results.append(last)
            names.append(f"extra{i}")
        return results, names


@register_neck("fpn")
class FPN(Neck):
    """Feature pyramid network over some backbone levels, with optional extra stride-2 levels.

    Args:
        in_channels: channels of every backbone level (``TimmBackbone.channels``).
        strides: strides of every backbone level (``TimmBackbone.strides``).
        out_channels: channels of every output level.
        in_levels: indices (into the backbone levels, negative allowed) of the levels the FPN reads, fine to
            coarse; default :func:`default_in_levels` (strides 8, 16, 32, or the coarsest three).
        extra_levels: number of extra levels after the coarsest, each a stride-2 3x3 convolution (2 = P6, P7).
        norm: normalisation after the FPN convolutions: ``None``, ``"gn"`` or ``"bn"``.

    Attributes:
        channels: ``[out_channels] * num_levels``.
        strides: stride of each output level, e.g. ``[8, 16, 32, 64, 128]``.
    """

    def __init__(self, in_channels: Sequence[int], strides: Sequence[int], *, out_channels: int = 256,
                 in_levels: Sequence[int] | None = None, extra_levels: int = 2, norm: str | None = None) -> None:
        super().__init__()
        in_channels, strides = list(in_channels), list(strides)
        if len(in_channels) != len(strides) or not in_channels:
            raise ValueError(f"FPN needs one stride per input level, got channels={in_channels} strides={strides}")
        n = len(strides)
        levels = default_in_levels(strides) if in_levels is None else tuple(int(i) for i in in_levels)
        if any(not -n <= i < n for i in levels):
            raise ValueError(f"FPN in_levels={list(levels)} out of range for a backbone with {n} levels "
                             f"(strides {strides}); use indices in 0..{n - 1}")
        levels = tuple(i % n for i in levels)
        if not levels or list(levels) != sorted(set(levels)):
            raise ValueError(f"FPN in_levels={list(levels)} must be non-empty, unique and ordered fine to coarse")
        if extra_levels < 0:
            raise ValueError(f"FPN extra_levels must be >= 0, got {extra_levels}")
        self.in_levels = levels
        extra = _ExtraLevels(out_channels, extra_levels) if extra_levels else None
        self.fpn = FeaturePyramidNetwork([in_channels[i] for i in levels], out_channels, extra_blocks=extra,
                                         norm_layer=norm_layer_factory(norm))
        in_strides = [strides[i] for i in levels]
        self.strides = in_strides + [in_strides[-1] * 2 ** (k + 1) for k in range(extra_levels)]
        self.channels = [int(out_channels)] * len(self.strides)

    def forward(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        """Args:
            features: backbone maps ``(B, C_i, H / s_i, W / s_i)``, all levels of the backbone.
        Returns:
            one map per output level ``(B, out_channels, ~H / strides[j], ~W / strides[j])``, fine to coarse.
        """
        if len(features) <= max(self.in_levels):
            raise ValueError(f"FPN got {len(features)} feature maps but reads levels {list(self.in_levels)}; "
                             "pass all backbone levels")
        x = OrderedDict((str(i), features[i]) for i in self.in_levels)
        return list(self.fpn(x).values())
