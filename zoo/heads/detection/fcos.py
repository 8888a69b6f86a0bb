"""FCOS: anchor-free one-stage detection head (Tian et al., 2019) with batched target assignment."""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import generalized_box_iou_loss, sigmoid_focal_loss

from zoo.heads.detection.common import (
    PaddedTargets, check_levels, conv_tower, flatten_levels, grid_points, pad_targets, prior_bias,
)
from zoo.distributed import positive_count
from zoo.heads.base import register_head
from zoo.heads.detection.postprocess import DetectionHead

__all__ = ["FCOSHead", "fcos_size_ranges", "assign_fcos_targets"]


def fcos_size_ranges(strides: Sequence[int]) -> list[tuple[float, float]]:
    """FCOS regression ranges per level: level ``l`` takes boxes whose largest side distance from the point lies in
    ``[8 * s_{l-1}, 8 * s_l]``; the first level starts at 0 and the last is unbounded. For strides 8..128 this is
    the paper's ``[0, 64], [64, 128], [128, 256], [256, 512], [512, inf]``."""
    strides = list(strides)
    uppers = [8.0 * s for s in strides[:-1]] + [math.inf]
    lowers = [0.0] + uppers[:-1]
    return list(zip(lowers, uppers))


def assign_fcos_targets(points: torch.Tensor, point_strides: torch.Tensor, point_ranges: torch.Tensor,
                        gt: PaddedTargets, center_radius: float = 1.5) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Batched FCOS assignment of every point of every image to at most one ground-truth box.

    A point is a candidate for a (non-crowd, valid) box when it lies inside the box, inside the centre region
    (``center_radius * stride`` around the box centre, clipped to the box; ``0`` disables centre sampling), and its
    largest distance to the box sides lies in its level's range ``[lo, hi]``. Among
    candidates the box of smallest area wins (first one on ties). Points without a box that lie inside a crowd box
    are ignored.

    Args:
        points: ``(P, 2)`` (x, y) input pixels. point_strides: ``(P,)``. point_ranges: ``(P, 2)`` (lo, hi).
        gt: padded targets with ``G`` boxes per image.
        center_radius: centre-sampling radius in strides.
    Returns:
        ``matched`` ``(B, P)`` int64 box index, ``-1`` where negative; ``ignore`` ``(B, P)`` bool; ``ltrb``
        ``(B, P, 4)`` distances to the matched box sides (meaningful where matched >= 0).
    """
    px, py = points[:, 0][None, :, None], points[:, 1][None, :, None]
    x1, y1, x2, y2 = (gt.boxes[..., i][:, None, :] for i in range(4))
    ltrb = torch.stack([px - x1, py - y1, x2 - px, y2 - py], dim=-1)  # (B, P, G, 4)
    inside = ltrb.min(dim=-1).values > 0
    if center_radius > 0:
        r = (point_strides.to(ltrb.dtype) * center_radius)[None, :, None]
        cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
        in_center = ((px > torch.maximum(cx - r, x1)) & (px < torch.minimum(cx + r, x2))
                     & (py > torch.maximum(cy - r, y1)) & (py < torch.minimum(cy + r, y2)))
    else:
        in_center = inside
    reach = ltrb.max(dim=-1).values
    lo, hi = point_ranges[:, 0][None, :, None], point_ranges[:, 1][None, :, None]
    in_range = (reach >= lo) & (reach <= hi)
    cand = inside & in_center & in_range & gt.positive[:, None, :]
    area = ((gt.boxes[..., 2] - gt.boxes[..., 0]) * (gt.boxes[..., 3] - gt.boxes[..., 1]))[:, None, :]
    area = torch.where(cand, area.expand_as(cand), torch.full_like(cand, math.inf, dtype=ltrb.dtype))
    best_area, idx = area.min(dim=2)
    pos = torch.isfinite(best_area)
    matched = torch.where(pos, idx, torch.full_like(idx, -1))
    in_crowd = (inside & gt.crowd[:, None, :]).any(dim=2)
    ignore = ~pos & in_crowd
    ltrb = torch.gather(ltrb, 2, idx[:, :, None, None].expand(-1, -1, 1, 4)).squeeze(2)
    return matched, ignore, ltrb


@register_head("fcos")
class FCOSHead(DetectionHead):
    """FCOS head: shared GroupNorm towers over all levels, per-level learnable scale, centerness on the
    regression branch; sigmoid focal loss, GIoU box loss, centerness BCE.

    Args:
        in_channels: channels of each input level (an FPN's: all equal).
        strides: stride of each input level.
        num_classes: K foreground classes (contiguous labels ``0..K-1``).
        num_convs: depth of the classification and regression towers.
        norm: tower normalisation, ``"gn"`` or None.
        prior_prob: initial foreground probability of the classifier.
        center_radius: centre-sampling radius in strides (0 disables centre sampling).
        size_ranges: per-level ``(lo, hi)`` regression ranges (``hi=None`` = unbounded); default
            :func:`fcos_size_ranges`.
        focal_alpha, focal_gamma: sigmoid focal loss parameters.
        score_thresh, nms_thresh, max_detections, pre_nms_topk: post-processing defaults (overridable per call).
    """

    def __init__(self, in_channels: Sequence[int], strides: Sequence[int], *, num_classes: int, num_convs: int = 4,
                 norm: str | None = "gn", prior_prob: float = 0.01, center_radius: float = 1.5,
                 size_ranges: Sequence[Sequence[float]] | None = None, focal_alpha: float = 0.25,
                 focal_gamma: float = 2.0, score_thresh: float = 0.05, nms_thresh: float = 0.6,
                 max_detections: int = 100, pre_nms_topk: int = 1000) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"FCOSHead num_classes must be >= 1, got {num_classes}")
        ch = check_levels(in_channels, strides, "FCOSHead")
        self.num_classes = int(num_classes)
        self.strides = [int(s) for s in strides]
        if size_ranges is None:
            ranges = fcos_size_ranges(self.strides)
        else:  # None / null as an upper bound means unbounded (JSON has no infinity)
            ranges = [tuple(math.inf if v is None else float(v) for v in r) for r in size_ranges]
        if len(ranges) != len(self.strides):
            raise ValueError(f"FCOSHead size_ranges has {len(ranges)} entries for {len(self.strides)} levels")
        self.register_buffer("size_ranges", torch.tensor(ranges, dtype=torch.float32), persistent=False)
        self.center_radius = float(center_radius)
        self.focal_alpha, self.focal_gamma = float(focal_alpha), float(focal_gamma)
        self.post = {"score_thresh": score_thresh, "nms_thresh": nms_thresh, "max_detections": max_detections,
                     "pre_nms_topk": pre_nms_topk}
        self.cls_tower = conv_tower(ch, num_convs, norm)
        self.reg_tower = conv_tower(ch, num_convs, norm)
        self.cls_logits = nn.Conv2d(ch, self.num_classes, 3, padding=1)
        self.bbox_reg = nn.Conv2d(ch, 4, 3, padding=1)
        self.centerness = nn.Conv2d(ch, 1, 3, padding=1)
        for conv in (self.cls_logits, self.bbox_reg, self.centerness):
            nn.init.normal_(conv.weight, std=0.01)
            nn.init.zeros_(conv.bias)
        nn.init.constant_(self.cls_logits.bias, prior_bias(prior_prob))
        self.scales = nn.Parameter(torch.ones(len(self.strides)))

    def forward(self, features: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """Args:
            features: ``L`` maps ``(B, C, H_l, W_l)`` with strides ``self.strides``.
        Returns: dict with ``cls_logits`` ``(B, P, K)``, ``ltrb`` ``(B, P, 4)`` predicted distances (pixels) from
            each point to the box sides, ``centerness`` ``(B, P)`` logits, ``points`` ``(P, 2)`` and ``levels``
            ``(P,)`` (``P = sum H_l * W_l``).
        """
        if len(features) != len(self.strides):
            raise ValueError(f"FCOSHead was built for {len(self.strides)} levels, got {len(features)} maps")
        cls, reg, ctr = [], [], []
        for lvl, f in enumerate(features):
            c = self.cls_tower(f)
            r = self.reg_tower(f)
            cls.append(self.cls_logits(c))
            reg.append(F.relu(self.bbox_reg(r) * self.scales[lvl]) * self.strides[lvl])
            ctr.append(self.centerness(r))
        points, levels = grid_points([tuple(f.shape[-2:]) for f in features], self.strides, features[0].device)
        return {"cls_logits": flatten_levels(cls, self.num_classes), "ltrb": flatten_levels(reg, 4),
                "centerness": flatten_levels(ctr, 1).squeeze(-1), "points": points, "levels": levels}

    def assign(self, raw: dict[str, torch.Tensor], targets: Sequence[dict[str, torch.Tensor]]
               ) -> tuple[PaddedTargets, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Padded targets and :func:`assign_fcos_targets` for the points of ``raw``."""
        points, levels = raw["points"], raw["levels"]
        gt = pad_targets(targets, self.num_classes, points.device, torch.float32)
        point_strides = torch.tensor(self.strides, device=points.device, dtype=torch.float32)[levels]
        matched, ignore, ltrb = assign_fcos_targets(points.float(), point_strides, self.size_ranges[levels], gt,
                                                    self.center_radius)
        return gt, matched, ignore, ltrb

    def compute_loss(self, raw: dict[str, torch.Tensor], targets: Sequence[dict[str, torch.Tensor]],
             image_sizes: Sequence[tuple[int, int]] | None = None) -> dict[str, torch.Tensor]:
        """Args:
            raw: :meth:`forward` output. targets: per image ``boxes`` ``(N, 4)``, ``labels`` ``(N,)``, optional
                ``iscrowd`` ``(N,)``. image_sizes: valid ``(h, w)`` per image (unused: padding points are negatives).
        Returns: ``loss_cls`` (focal, sum / positives), ``loss_box`` (GIoU), ``loss_centerness`` (BCE). In a DDP
        training step the positives are averaged over the ranks (:func:`zoo.distributed.positive_count`), so the
        gradient DDP applies is that of one process on the union of the ranks' batches.
        """
        gt, matched, ignore, tgt_ltrb = self.assign(raw, targets)
        logits = raw["cls_logits"].float()
        pos = matched >= 0
        num_pos = positive_count(pos)  # the mean over ranks in a DDP training step
        labels = torch.gather(gt.labels, 1, matched.clamp(min=0))
        onehot = F.one_hot(labels, self.num_classes).to(logits.dtype) * pos[..., None]
        cls = sigmoid_focal_loss(logits, onehot, alpha=self.focal_alpha, gamma=self.focal_gamma, reduction="none")
        loss_cls = (cls * (~ignore)[..., None]).sum() / num_pos
        pts = raw["points"].float()[None].expand(pos.shape[0], -1, -1)[pos]
        pred, tgt = raw["ltrb"].float()[pos], tgt_ltrb[pos]
        pred_box = torch.cat([pts - pred[:, :2], pts + pred[:, 2:]], dim=1)
        tgt_box = torch.cat([pts - tgt[:, :2], pts + tgt[:, 2:]], dim=1)
        loss_box = generalized_box_iou_loss(pred_box, tgt_box, reduction="sum") / num_pos
        lr, tb = tgt[:, 0::2], tgt[:, 1::2]
        ctr_t = torch.sqrt((lr.min(1).values / lr.max(1).values) * (tb.min(1).values / tb.max(1).values))
        loss_ctr = F.binary_cross_entropy_with_logits(raw["centerness"].float()[pos], ctr_t, reduction="sum") / num_pos
        return {"loss_cls": loss_cls, "loss_box": loss_box, "loss_centerness": loss_ctr}

    def decode(self, raw: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns boxes ``(B, P, 4)`` xyxy input pixels and scores ``(B, P, K)`` = sqrt(cls * centerness)."""
        pts, ltrb = raw["points"].float()[None], raw["ltrb"].float()
        boxes = torch.cat([pts - ltrb[..., :2], pts + ltrb[..., 2:]], dim=-1)
        scores = torch.sqrt(raw["cls_logits"].float().sigmoid() * raw["centerness"].float().sigmoid()[..., None])
        return boxes, scores
