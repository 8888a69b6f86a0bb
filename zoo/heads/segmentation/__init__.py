"""Semantic segmentation heads on multi-scale features, their inference helpers.

Every head is built ``Head(in_channels, strides, *, num_classes, **options)`` and offers
``forward(features) -> {"logits": (B, K, H/4, W/4)[, "aux"]}``, ``loss(raw, targets, image_sizes=None) -> dict`` and
``postprocess(raw, image_sizes, *, output_sizes=None) -> [{"mask": (H, W) int64}]``.
"""

from zoo.heads.segmentation.base import SegmentationHead, select_levels
from zoo.heads.segmentation.decoders import ASPP, DeepLabV3PlusHead, SemanticFPNHead, UPerNetHead
from zoo.heads.segmentation.inference import sliding_window_logits, whole_image_logits

__all__ = [
    "SegmentationHead", "SemanticFPNHead", "UPerNetHead", "DeepLabV3PlusHead", "ASPP", "select_levels",
    "sliding_window_logits", "whole_image_logits",
]
