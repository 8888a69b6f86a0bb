"""Semantic segmentation decoders: Semantic FPN (Panoptic FPN's semantic branch), UPerNet and DeepLabV3+.

Each reads the selected feature levels (finest first, normally strides 4, 8, 16, 32) and returns a map at the
finest stride; :class:`~zoo.heads.segmentation.base.SegmentationHead` adds classifier, auxiliary head, loss and
post-processing.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import FeaturePyramidNetwork

from zoo.heads.base import register_head
from zoo.heads.segmentation.base import SegmentationHead, conv_norm_act, resize_to

__all__ = ["SemanticFPNHead", "UPerNetHead", "DeepLabV3PlusHead", "ASPP"]


@register_head("semantic_fpn")
class SemanticFPNHead(SegmentationHead):
    """Panoptic FPN's semantic branch (Kirillov et al., 2019).

    An FPN (lateral 1x1 convolutions, top-down sum, 3x3 output convolutions; torchvision's
    ``FeaturePyramidNetwork``) over the selected levels; every FPN level then goes through ``log2(s / s0)`` stages
    of 3x3 conv-norm-ReLU + 2x bilinear upsampling (one stage without upsampling for the finest level) to the finest
    stride ``s0``; the maps are summed and classified by a 1x1 convolution.

    Args:
        in_channels, strides, num_classes: see :class:`SegmentationHead`.
        channels: width of the upsampling branches (128 in the paper).
        fpn_channels: width of the FPN.
        **kwargs: ``dropout``, ``in_levels``, ``norm``, ``aux_head``, ``aux_weight``, ``ignore_index``,
            ``dice_weight``, ``class_weights`` (see :class:`SegmentationHead`).
    """

    def __init__(self, in_channels: Sequence[int], strides: Sequence[int], *, num_classes: int, channels: int = 128,
                 fpn_channels: int = 256, **kwargs) -> None:
        super().__init__(in_channels, strides, num_classes=num_classes, channels=channels, **kwargs)
        self.fpn = FeaturePyramidNetwork(self.level_channels, int(fpn_channels))
        self.scale_heads = nn.ModuleList()
        for s in self.level_strides:
            n_up = max(0, int(round(math.log2(s / self.output_stride))))
            stages = [conv_norm_act(fpn_channels if k == 0 else channels, channels, 3, norm=self.norm)
                      for k in range(max(1, n_up))]
            self.scale_heads.append(nn.ModuleList(stages))

    def decode(self, feats: list[torch.Tensor]) -> torch.Tensor:
        pyramid = list(self.fpn(OrderedDict((str(i), f) for i, f in enumerate(feats))).values())
        size = pyramid[0].shape[-2:]
        out: torch.Tensor | None = None
        for x, stages, s in zip(pyramid, self.scale_heads, self.level_strides):
            upsample = s > self.output_stride
            for stage in stages:
                x = stage(x)
                if upsample:
                    x = F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)
            x = resize_to(x, size)  # exact size when input sides are not multiples of the coarsest stride
            out = x if out is None else out + x
        assert out is not None
        return out


@register_head("upernet")
class UPerNetHead(SegmentationHead):
    """UPerNet (Xiao et al., 2018): a pyramid pooling module on the coarsest level, an FPN over the others, and a
    fusion of all FPN levels upsampled to the finest stride.

    Args:
        in_channels, strides, num_classes: see :class:`SegmentationHead`.
        channels: width of PPM, FPN and fusion.
        pool_scales: output sizes of the PPM's adaptive average pools.
        **kwargs: see :class:`SegmentationHead`.
    """

    def __init__(self, in_channels: Sequence[int], strides: Sequence[int], *, num_classes: int, channels: int = 256,
                 pool_scales: Sequence[int] = (1, 2, 3, 6), **kwargs) -> None:
        super().__init__(in_channels, strides, num_classes=num_classes, channels=channels, **kwargs)
        c, norm = self.channels, self.norm
        top = self.level_channels[-1]
        self.ppm = nn.ModuleList(nn.Sequential(nn.AdaptiveAvgPool2d(int(p)), conv_norm_act(top, c, 1, norm=norm))
                                 for p in pool_scales)
        self.ppm_bottleneck = conv_norm_act(top + len(self.ppm) * c, c, 3, norm=norm)
        self.lateral = nn.ModuleList(conv_norm_act(ch, c, 1, norm=norm) for ch in self.level_channels[:-1])
        self.fpn_convs = nn.ModuleList(conv_norm_act(c, c, 3, norm=norm) for _ in self.level_channels[:-1])
        self.fuse = conv_norm_act(c * len(self.level_channels), c, 3, norm=norm)

    def decode(self, feats: list[torch.Tensor]) -> torch.Tensor:
        top = feats[-1]
        pooled = [top] + [resize_to(m(top), top.shape[-2:]) for m in self.ppm]
        laterals = [lat(f) for lat, f in zip(self.lateral, feats[:-1])]
        laterals.append(self.ppm_bottleneck(torch.cat(pooled, dim=1)))
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + resize_to(laterals[i], laterals[i - 1].shape[-2:])
        outs = [conv(x) for conv, x in zip(self.fpn_convs, laterals[:-1])] + [laterals[-1]]
        size = outs[0].shape[-2:]
        return self.fuse(torch.cat([resize_to(o, size) for o in outs], dim=1))


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling: a 1x1 branch, one dilated 3x3 branch per rate and an image-pooling branch,
    concatenated and projected by a 1x1 conv-norm-ReLU.

    Args:
        in_channels: input channels.
        channels: width of every branch and of the output.
        rates: dilation rates of the 3x3 branches.
        norm: normalisation (``"gn"``, ``"bn"``, ``None``).
    """

    def __init__(self, in_channels: int, channels: int, rates: Sequence[int], *, norm: str | None = "gn") -> None:
        super().__init__()
        self.branches = nn.ModuleList([conv_norm_act(in_channels, channels, 1, norm=norm)] + [
            conv_norm_act(in_channels, channels, 3, norm=norm, dilation=int(r)) for r in rates])
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), conv_norm_act(in_channels, channels, 1, norm=norm))
        self.project = conv_norm_act(channels * (len(self.branches) + 1), channels, 1, norm=norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x ``(B, C_in, h, w)``. Returns: ``(B, channels, h, w)``."""
        outs = [b(x) for b in self.branches]
        outs.append(self.pool(x).expand(-1, -1, x.shape[-2], x.shape[-1]))
        return self.project(torch.cat(outs, dim=1))


@register_head("deeplabv3plus")
class DeepLabV3PlusHead(SegmentationHead):
    """DeepLabV3+ (Chen et al., 2018): ASPP on a coarse level, upsampled to the finest (stride-4) level and fused
    with a 1x1 projection of it by two 3x3 conv-norm-ReLU layers.

    Args:
        in_channels, strides, num_classes: see :class:`SegmentationHead`.
        channels: width of ASPP and decoder.
        atrous_rates: ASPP dilation rates as DeepLab sets them at stride 16; they are scaled by ``16 / stride`` of the
            ASPP level so that they span the same image area (``(3, 6, 9)`` on a stride-32 level).
        aspp_stride: stride of the level ASPP reads (default: the coarsest selected level; timm backbones are not
            dilated, so that is stride 32). Must be one of the selected levels' strides.
        low_level_channels: width of the projection of the finest level.
        **kwargs: see :class:`SegmentationHead`.
    """

    def __init__(self, in_channels: Sequence[int], strides: Sequence[int], *, num_classes: int, channels: int = 256,
                 atrous_rates: Sequence[int] = (6, 12, 18), aspp_stride: int | None = None,
                 low_level_channels: int = 48, **kwargs) -> None:
        super().__init__(in_channels, strides, num_classes=num_classes, channels=channels, **kwargs)
        if len(self.in_levels) < 2:
            raise ValueError(f"DeepLabV3PlusHead needs a fine and a coarse level, got strides {self.level_strides}")
        if aspp_stride is None:
            self.aspp_pos = len(self.level_strides) - 1
        elif int(aspp_stride) in self.level_strides[1:]:
            self.aspp_pos = self.level_strides.index(int(aspp_stride))
        else:
            raise ValueError(f"aspp_stride={aspp_stride} is not among the strides {self.level_strides[1:]} of the "
                             "selected coarse levels; pick one of them or leave it None (coarsest)")
        s = self.level_strides[self.aspp_pos]
        self.atrous_rates = [max(1, int(round(r * 16 / s))) for r in atrous_rates]
        c, norm = self.channels, self.norm
        self.aspp = ASPP(self.level_channels[self.aspp_pos], c, self.atrous_rates, norm=norm)
        self.low_proj = conv_norm_act(self.level_channels[0], int(low_level_channels), 1, norm=norm)
        self.fuse = nn.Sequential(conv_norm_act(c + int(low_level_channels), c, 3, norm=norm),
                                  conv_norm_act(c, c, 3, norm=norm))

    def decode(self, feats: list[torch.Tensor]) -> torch.Tensor:
        low = self.low_proj(feats[0])
        x = resize_to(self.aspp(feats[self.aspp_pos]), low.shape[-2:])
        return self.fuse(torch.cat([x, low], dim=1))
