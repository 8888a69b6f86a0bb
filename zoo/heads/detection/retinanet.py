"""RetinaNet: anchor-based one-stage detection head (Lin et al., 2017) with batched, crowd-aware IoU matching."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.detection._utils import BoxCoder
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.ops import generalized_box_iou_loss, sigmoid_focal_loss

from zoo.heads.detection.common import (
    IGNORE, cached_anchors, check_levels, conv_tower, flatten_levels, match_anchors, pad_targets, prior_bias,
)
from zoo.distributed import positive_count
from zoo.heads.base import register_head
from zoo.heads.detection.postprocess import DetectionHead

__all__ = ["RetinaNetHead"]

_BOX_LOSSES = ("giou", "smooth_l1", "l1")


@register_head("retinanet")
class RetinaNetHead(DetectionHead):
    """RetinaNet head: classification and box-delta towers shared across levels, ``len(scales) * len(ratios)``
    anchors per location, focal loss and a GIoU or (smooth) L1 box loss.

    Args:
        in_channels: channels of each input level (an FPN's: all equal).
        strides: stride of each input level.
        num_classes: K foreground classes (contiguous labels ``0..K-1``).
        num_convs: tower depth. norm: tower normalisation, ``"gn"`` or None.
        anchor_size: base anchor side in strides (4 gives 32 px anchors on stride 8).
        anchor_scales: multipliers of the base side per location (default ``2^0, 2^(1/3), 2^(2/3)``).
        aspect_ratios: anchor height/width ratios.
        fg_iou, bg_iou: IoU at or above which an anchor is positive, below which it is background.
        crowd_iof: a background anchor covered more than this by a crowd box is ignored.
        box_loss: ``"giou"`` (on decoded boxes), ``"smooth_l1"`` or ``"l1"`` (on deltas).
        smooth_l1_beta: beta of the smooth-L1 loss.
        prior_prob, focal_alpha, focal_gamma: classifier initialisation and focal-loss parameters.
        score_thresh, nms_thresh, max_detections, pre_nms_topk: post-processing defaults (overridable per call).
    """

    def __init__(self, in_channels: Sequence[int], strides: Sequence[int], *, num_classes: int, num_convs: int = 4,
                 norm: str | None = "gn", anchor_size: float = 4.0,
                 anchor_scales: Sequence[float] = (1.0, 2 ** (1 / 3), 2 ** (2 / 3)),
                 aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0), fg_iou: float = 0.5, bg_iou: float = 0.4,
                 crowd_iof: float = 0.7, box_loss: str = "giou", smooth_l1_beta: float = 0.1,
                 prior_prob: float = 0.01, focal_alpha: float = 0.25, focal_gamma: float = 2.0,
                 score_thresh: float = 0.05, nms_thresh: float = 0.6, max_detections: int = 100,
                 pre_nms_topk: int = 1000) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"RetinaNetHead num_classes must be >= 1, got {num_classes}")
        if box_loss not in _BOX_LOSSES:
            raise ValueError(f"RetinaNetHead box_loss={box_loss!r}; use one of {_BOX_LOSSES}")
        if not bg_iou <= fg_iou:
            raise ValueError(f"RetinaNetHead needs bg_iou <= fg_iou, got bg_iou={bg_iou} fg_iou={fg_iou}")
        ch = check_levels(in_channels, strides, "RetinaNetHead")
        self.num_classes = int(num_classes)
        self.strides = [int(s) for s in strides]
        sizes = tuple(tuple(float(anchor_size * s * m) for m in anchor_scales) for s in self.strides)
        self.anchor_generator = AnchorGenerator(sizes, (tuple(float(r) for r in aspect_ratios),) * len(self.strides))
        self.num_anchors = len(anchor_scales) * len(aspect_ratios)
        self.box_coder = BoxCoder(weights=(1.0, 1.0, 1.0, 1.0))
        self.fg_iou, self.bg_iou, self.crowd_iof = float(fg_iou), float(bg_iou), float(crowd_iof)
        self.box_loss, self.smooth_l1_beta = box_loss, float(smooth_l1_beta)
        self.focal_alpha, self.focal_gamma = float(focal_alpha), float(focal_gamma)
        self.post = {"score_thresh": score_thresh, "nms_thresh": nms_thresh, "max_detections": max_detections,
                     "pre_nms_topk": pre_nms_topk}
        self.cls_tower = conv_tower(ch, num_convs, norm)
        self.reg_tower = conv_tower(ch, num_convs, norm)
        self.cls_logits = nn.Conv2d(ch, self.num_anchors * self.num_classes, 3, padding=1)
        self.bbox_reg = nn.Conv2d(ch, self.num_anchors * 4, 3, padding=1)
        for conv in (self.cls_logits, self.bbox_reg):
            nn.init.normal_(conv.weight, std=0.01)
            nn.init.zeros_(conv.bias)
        nn.init.constant_(self.cls_logits.bias, prior_bias(prior_prob))
        self._anchor_cache: dict[tuple, torch.Tensor] = {}

    def anchors(self, shapes: Sequence[tuple[int, int]], device: torch.device) -> torch.Tensor:
        """Anchors ``(A, 4)`` xyxy input pixels for feature maps of these shapes (cached per shapes/device)."""
        return cached_anchors(self._anchor_cache, self.anchor_generator, shapes, self.strides, device)

    def forward(self, features: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """Args:
            features: ``L`` maps ``(B, C, H_l, W_l)`` with strides ``self.strides``.
        Returns: dict with ``cls_logits`` ``(B, A, K)``, ``deltas`` ``(B, A, 4)`` box deltas w.r.t. the anchors and
            ``anchors`` ``(A, 4)`` (``A = sum H_l * W_l * num_anchors``).
        """
        if len(features) != len(self.strides):
            raise ValueError(f"RetinaNetHead was built for {len(self.strides)} levels, got {len(features)} maps")
        cls = [self.cls_logits(self.cls_tower(f)) for f in features]
        reg = [self.bbox_reg(self.reg_tower(f)) for f in features]
        anchors = self.anchors([tuple(f.shape[-2:]) for f in features], features[0].device)
        return {"cls_logits": flatten_levels(cls, self.num_classes), "deltas": flatten_levels(reg, 4),
                "anchors": anchors}

    def compute_loss(self, raw: dict[str, torch.Tensor], targets: Sequence[dict[str, torch.Tensor]],
             image_sizes: Sequence[tuple[int, int]] | None = None) -> dict[str, torch.Tensor]:
        """Args:
            raw: :meth:`forward` output. targets: per image ``boxes`` ``(N, 4)``, ``labels`` ``(N,)``, optional
                ``iscrowd`` ``(N,)``. image_sizes: valid ``(h, w)`` per image (unused: padding anchors are negatives).
        Returns: ``loss_cls`` (focal, sum / positives) and ``loss_box``; in a DDP training step the positives are
        averaged over the ranks (:func:`zoo.distributed.positive_count`).
        """
        anchors = raw["anchors"].float()
        gt = pad_targets(targets, self.num_classes, anchors.device, torch.float32)
        matched = match_anchors(anchors, gt, fg_iou=self.fg_iou, bg_iou=self.bg_iou, low_quality=True,
                                crowd_iof=self.crowd_iof)
        pos = matched >= 0
        num_pos = positive_count(pos)  # the mean over ranks in a DDP training step
        idx = matched.clamp(min=0)
        labels = torch.gather(gt.labels, 1, idx)
        logits = raw["cls_logits"].float()
        onehot = F.one_hot(labels, self.num_classes).to(logits.dtype) * pos[..., None]
        cls = sigmoid_focal_loss(logits, onehot, alpha=self.focal_alpha, gamma=self.focal_gamma, reduction="none")
        loss_cls = (cls * (matched != IGNORE)[..., None]).sum() / num_pos
        gt_boxes = torch.gather(gt.boxes, 1, idx[..., None].expand(-1, -1, 4))[pos]
        pos_anchors = anchors[None].expand(pos.shape[0], -1, -1)[pos]
        deltas = raw["deltas"].float()[pos]
        if self.box_loss == "giou":
            pred = self.box_coder.decode_single(deltas, pos_anchors)
            loss_box = generalized_box_iou_loss(pred, gt_boxes, reduction="sum")
        else:
            tgt = self.box_coder.encode_single(gt_boxes, pos_anchors)
            if self.box_loss == "l1":
                loss_box = F.l1_loss(deltas, tgt, reduction="sum")
            else:
                loss_box = F.smooth_l1_loss(deltas, tgt, beta=self.smooth_l1_beta, reduction="sum")
        return {"loss_cls": loss_cls, "loss_box": loss_box / num_pos}

    def export_outputs(self, raw: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``cls_logits``, ``deltas`` and the ``anchors`` of the traced size. The anchors come from a cache, not
        from the input; ``+ 0 * deltas[0]`` ties them to the graph so tracing keeps them as an output."""
        return {"cls_logits": raw["cls_logits"], "deltas": raw["deltas"],
                "anchors": raw["anchors"].to(raw["deltas"].dtype) + 0 * raw["deltas"][0]}

    def decode(self, raw: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns boxes ``(B, A, 4)`` xyxy input pixels and sigmoid scores ``(B, A, K)``."""
        deltas = raw["deltas"].float()
        b, a, _ = deltas.shape
        anchors = raw["anchors"].float()[None].expand(b, -1, -1).reshape(-1, 4)
        boxes = self.box_coder.decode_single(deltas.reshape(-1, 4), anchors).view(b, a, 4)
        return boxes, raw["cls_logits"].float().sigmoid()
