"""Detection heads on FPN features: FCOS (default), RetinaNet and Faster R-CNN.

Every head is built ``Head(in_channels, strides, *, num_classes, ...)`` and offers ``forward(features) -> raw``,
``loss(raw, targets, image_sizes) -> dict`` and ``postprocess(raw, image_sizes, ...) -> list[dict]`` with boxes
xyxy in input pixels, scores and contiguous int64 labels ``0..K-1``. All heads share
:func:`~zoo.heads.detection.postprocess.postprocess_detections`.
"""

from zoo.heads.detection.fcos import FCOSHead
from zoo.heads.detection.postprocess import postprocess_detections
from zoo.heads.detection.retinanet import RetinaNetHead
from zoo.heads.detection.two_stage import FasterRCNNHead

__all__ = ["FCOSHead", "RetinaNetHead", "FasterRCNNHead", "postprocess_detections"]
