"""Faster R-CNN as a zoo head: torchvision's RPN and RoI heads driven from the zoo's FPN features.

``forward`` runs the RPN convolutions (no image sizes needed); ``loss`` and ``postprocess`` run proposal
selection and the second stage, because those need the image sizes and (for the loss) the targets. Outside the head
labels are contiguous ``0..K-1``; inside, torchvision's convention ``1..K`` with 0 = background is used.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
from torch import nn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.roi_heads import RoIHeads, fastrcnn_loss
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead, concat_box_prediction_layers
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops.poolers import initLevelMapper

from zoo.heads.detection.common import (
    IGNORE, PaddedTargets, box_iou_iof, cached_anchors, check_levels, match_anchors, pad_targets,
)
from zoo.heads.base import register_head
from zoo.heads.detection.postprocess import DetectionHead, postprocess_detections, resolve_thresholds

__all__ = ["FasterRCNNHead", "make_roi_pool"]


class _PhasedRPN(RegionProposalNetwork):
    """torchvision's RPN whose proposal counts follow an explicit ``phase`` (``"training"``/``"testing"``) rather
    than ``self.training``, so a validation loss computed in eval mode still uses the training proposal counts."""

    phase: str = "training"

    def pre_nms_top_n(self) -> int:
        return self._pre_nms_top_n[self.phase]

    def post_nms_top_n(self) -> int:
        return self._post_nms_top_n[self.phase]


def make_roi_pool(strides: Sequence[int], level_ids: Sequence[int], output_size: int,
                  sampling_ratio: int = 2) -> MultiScaleRoIAlign:
    """A :class:`MultiScaleRoIAlign` over the levels ``level_ids`` whose scales are fixed from their strides
    (torchvision would infer and cache them from the first batch's image sizes).

    Args:
        strides: strides of all head input levels. level_ids: the levels to pool from (consecutive powers of two).
        output_size: pooled side. sampling_ratio: RoIAlign sampling ratio.
    """
    pool_strides = [int(strides[i]) for i in level_ids]
    ks = [math.log2(s) for s in pool_strides]
    if any(k != int(k) for k in ks) or [int(k) for k in ks] != list(range(int(ks[0]), int(ks[0]) + len(ks))):
        raise ValueError(f"RoI pooling levels need consecutive power-of-two strides, got {pool_strides}")
    pool = MultiScaleRoIAlign([str(i) for i in level_ids], output_size, sampling_ratio)
    pool.scales = [1.0 / s for s in pool_strides]
    pool.map_levels = initLevelMapper(int(ks[0]), int(ks[-1]))
    return pool


@register_head("faster_rcnn")
class FasterRCNNHead(DetectionHead):
    """Two-stage detection head: torchvision ``RegionProposalNetwork`` (``RPNHead``, ``AnchorGenerator``) and
    ``RoIHeads`` (``MultiScaleRoIAlign``, ``TwoMLPHead``, ``FastRCNNPredictor``) on the zoo's feature levels.

    The RPN runs on every input level; RoI pooling reads the levels with stride <= 32 (``roi_levels``). Crowd boxes
    never become positives; anchors/proposals they cover by more than ``crowd_iof`` are not sampled as negatives.

    Args:
        in_channels: channels of each input level (an FPN's: all equal). strides: stride of each level.
        num_classes: K foreground classes (contiguous labels ``0..K-1``).
        anchor_size: anchor side in strides of its level (4: 32 px on stride 8). aspect_ratios: anchor h/w ratios.
        rpn_fg_iou, rpn_bg_iou, rpn_batch_size, rpn_positive_fraction: RPN anchor matching and sampling.
        rpn_pre_nms_topk, rpn_post_nms_topk: ``(training, testing)`` proposal counts (pre-NMS per level).
        rpn_nms_thresh: NMS IoU among proposals.
        roi_levels: indices of the levels RoI pooling reads (default: those with stride <= 32).
        roi_output_size, sampling_ratio: RoIAlign output side and sampling ratio.
        representation_size: width of the two-layer box MLP.
        box_fg_iou, box_bg_iou, box_batch_size, box_positive_fraction: second-stage matching and sampling.
        bbox_reg_weights: second-stage box coder weights (default (10, 10, 5, 5)).
        crowd_iof: anchors/proposals covered more than this by a crowd box are ignored instead of negative.
        score_thresh, nms_thresh, max_detections, pre_nms_topk: post-processing defaults (overridable per call).
    """

    # Proposal selection (data-dependent NMS, per-image RoI lists) does not trace to a static ONNX graph.
    exportable = False

    def __init__(self, in_channels: Sequence[int], strides: Sequence[int], *, num_classes: int,
                 anchor_size: float = 4.0, aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0),
                 rpn_fg_iou: float = 0.7, rpn_bg_iou: float = 0.3, rpn_batch_size: int = 256,
                 rpn_positive_fraction: float = 0.5, rpn_pre_nms_topk: Sequence[int] = (2000, 1000),
                 rpn_post_nms_topk: Sequence[int] = (2000, 1000), rpn_nms_thresh: float = 0.7,
                 roi_levels: Sequence[int] | None = None, roi_output_size: int = 7, sampling_ratio: int = 2,
                 representation_size: int = 1024, box_fg_iou: float = 0.5, box_bg_iou: float = 0.5,
                 box_batch_size: int = 512, box_positive_fraction: float = 0.25,
                 bbox_reg_weights: Sequence[float] | None = None, crowd_iof: float = 0.7,
                 score_thresh: float = 0.05, nms_thresh: float = 0.6, max_detections: int = 100,
                 pre_nms_topk: int = 1000) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"{type(self).__name__} num_classes must be >= 1, got {num_classes}")
        ch = check_levels(in_channels, strides, type(self).__name__)
        self.num_classes = int(num_classes)
        self.strides = [int(s) for s in strides]
        self.channels = ch
        if roi_levels is None:
            roi_levels = [i for i, s in enumerate(self.strides) if s <= 32] or [0]
        self.roi_levels = [int(i) % len(self.strides) for i in roi_levels]
        self.crowd_iof = float(crowd_iof)
        self.post = {"score_thresh": score_thresh, "nms_thresh": nms_thresh, "max_detections": max_detections,
                     "pre_nms_topk": pre_nms_topk}
        ratios = tuple(float(r) for r in aspect_ratios)
        generator = AnchorGenerator(tuple((float(anchor_size * s),) for s in self.strides), (ratios,) * len(self.strides))
        self.rpn = _PhasedRPN(
            generator, RPNHead(ch, len(ratios)), rpn_fg_iou, rpn_bg_iou, rpn_batch_size, rpn_positive_fraction,
            {"training": int(rpn_pre_nms_topk[0]), "testing": int(rpn_pre_nms_topk[1])},
            {"training": int(rpn_post_nms_topk[0]), "testing": int(rpn_post_nms_topk[1])}, rpn_nms_thresh)
        box_head = TwoMLPHead(ch * roi_output_size ** 2, representation_size)
        self.roi_heads = RoIHeads(
            make_roi_pool(self.strides, self.roi_levels, roi_output_size, sampling_ratio), box_head,
            FastRCNNPredictor(representation_size, self.num_classes + 1), box_fg_iou, box_bg_iou, box_batch_size,
            box_positive_fraction, tuple(bbox_reg_weights) if bbox_reg_weights else None, score_thresh, nms_thresh,
            max_detections, **self._mask_modules())
        self._anchor_cache: dict[tuple, torch.Tensor] = {}

    def _mask_modules(self) -> dict[str, nn.Module]:
        """Extra ``RoIHeads`` modules (the mask branch in :class:`~zoo.heads.instance.MaskRCNNHead`)."""
        return {}

    # ------------------------------------------------------------------ forward: RPN convolutions
    def forward(self, features: list[torch.Tensor]) -> dict[str, Any]:
        """Args:
            features: ``L`` maps ``(B, C, H_l, W_l)`` with strides ``self.strides``.
        Returns: dict with ``features`` (the input list), ``objectness`` (per level ``(B, A_l, H_l, W_l)``) and
            ``rpn_deltas`` (per level ``(B, 4 * A_l, H_l, W_l)``).
        """
        if len(features) != len(self.strides):
            raise ValueError(f"{type(self).__name__} was built for {len(self.strides)} levels, got {len(features)}")
        objectness, deltas = self.rpn.head(features)
        return {"features": list(features), "objectness": objectness, "rpn_deltas": deltas}

    def _feature_dict(self, raw: dict[str, Any]) -> dict[str, torch.Tensor]:
        return {str(i): raw["features"][i] for i in self.roi_levels}

    def _proposals(self, raw: dict[str, Any], image_sizes: Sequence[tuple[int, int]], phase: str
                   ) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor]:
        """Proposals per image ``(R_i, 4)``, flat objectness ``(B * A, 1)``, flat deltas ``(B * A, 4)``, anchors ``(A, 4)``."""
        feats = raw["features"]
        if len(image_sizes) != feats[0].shape[0]:
            raise ValueError(f"got {len(image_sizes)} image sizes for a batch of {feats[0].shape[0]} images")
        anchors = cached_anchors(self._anchor_cache, self.rpn.anchor_generator,
                                 [tuple(f.shape[-2:]) for f in feats], self.strides, feats[0].device)
        per_level = [o.shape[1] * o.shape[2] * o.shape[3] for o in raw["objectness"]]
        obj, deltas = concat_box_prediction_layers(raw["objectness"], raw["rpn_deltas"])
        obj, deltas = obj.float(), deltas.float()
        b = feats[0].shape[0]
        props = self.rpn.box_coder.decode_single(deltas.detach(), anchors.repeat(b, 1)).view(b, -1, 4)
        self.rpn.phase = phase
        sizes = [(int(h), int(w)) for h, w in image_sizes]
        boxes, _ = self.rpn.filter_proposals(props, obj, sizes, per_level)
        return boxes, obj, deltas, anchors

    # ------------------------------------------------------------------ training
    def _rpn_loss(self, gt: PaddedTargets, obj: torch.Tensor, deltas: torch.Tensor,
                  anchors: torch.Tensor) -> dict[str, torch.Tensor]:
        matched = match_anchors(anchors, gt, fg_iou=self.rpn.proposal_matcher.high_threshold,
                                bg_iou=self.rpn.proposal_matcher.low_threshold, low_quality=True,
                                crowd_iof=self.crowd_iof)
        labels = (matched >= 0).float()
        labels = torch.where(matched == IGNORE, torch.full_like(labels, -1.0), labels)
        b = matched.shape[0]
        matched_boxes = torch.gather(gt.boxes, 1, matched.clamp(min=0)[..., None].expand(-1, -1, 4))
        # non-positives regress to their own anchor (zero targets) instead of a padded all-zero box (-inf targets)
        matched_boxes = torch.where((matched >= 0)[..., None], matched_boxes, anchors[None])
        reg_t = self.rpn.box_coder.encode_single(matched_boxes.reshape(-1, 4), anchors.repeat(b, 1)).view(b, -1, 4)
        loss_obj, loss_reg = self.rpn.compute_loss(obj, deltas, list(labels.unbind(0)), list(reg_t.unbind(0)))
        return {"loss_objectness": loss_obj, "loss_rpn_box": loss_reg}

    def _sample_rois(self, proposals: list[torch.Tensor], gt: PaddedTargets
                     ) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
        """Add the boxes to the proposals, match (crowd-aware) and sample them.

        Returns per image: sampled proposals ``(S_i, 4)``, matched box indices into the image's non-crowd boxes
        ``(S_i,)``, labels ``(S_i,)`` in ``0..K`` (0 = background) and regression targets ``(S_i, 4)``.
        """
        rh = self.roi_heads
        props, matched, labels, gt_boxes = [], [], [], []
        for i, p in enumerate(proposals):
            keep = gt.positive[i]
            boxes_i = gt.boxes[i][keep]
            p = torch.cat([p, boxes_i.to(p.dtype)])
            (m,), (lab,) = rh.assign_targets_to_proposals([p], [boxes_i], [gt.labels[i][keep] + 1])
            if bool(gt.crowd[i].any()):
                _, iof = box_iou_iof(p, gt.boxes[i][gt.crowd[i]][None])
                lab = torch.where((lab == 0) & (iof[0].max(dim=1).values > self.crowd_iof),
                                  torch.full_like(lab, -1), lab)
            props.append(p)
            matched.append(m)
            labels.append(lab)
            gt_boxes.append(boxes_i if boxes_i.numel() else p.new_zeros(1, 4))
        sampled = rh.subsample(labels)
        props = [p[s] for p, s in zip(props, sampled)]
        matched = [m[s] for m, s in zip(matched, sampled)]
        labels = [lab[s] for lab, s in zip(labels, sampled)]
        reg_t = rh.box_coder.encode([g[m] for g, m in zip(gt_boxes, matched)], props)
        return props, matched, labels, list(reg_t)

    def _extra_losses(self, feats: dict[str, torch.Tensor], props: list[torch.Tensor], matched: list[torch.Tensor],
                      labels: list[torch.Tensor], gt: PaddedTargets, targets: Sequence[dict[str, torch.Tensor]],
                      image_sizes: list[tuple[int, int]]) -> dict[str, torch.Tensor]:
        """Losses of extra RoI branches (the mask branch in :class:`~zoo.heads.instance.MaskRCNNHead`)."""
        return {}

    def compute_loss(self, raw: dict[str, Any], targets: Sequence[dict[str, torch.Tensor]],
             image_sizes: Sequence[tuple[int, int]]) -> dict[str, torch.Tensor]:
        """Args:
            raw: :meth:`forward` output. targets: per image ``boxes`` ``(N, 4)`` xyxy input pixels, ``labels`` ``(N,)``
                in ``0..K-1``, optional ``iscrowd`` ``(N,)``. image_sizes: valid ``(h, w)`` per image.
        Returns: ``loss_objectness``, ``loss_rpn_box``, ``loss_cls``, ``loss_box`` (plus ``loss_mask`` for Mask R-CNN).
        Uses the training proposal counts whatever the module mode, so it also serves as a validation loss.
        """
        sizes = [(int(h), int(w)) for h, w in image_sizes]
        proposals, obj, deltas, anchors = self._proposals(raw, sizes, "training")
        gt = pad_targets(targets, self.num_classes, anchors.device, torch.float32)
        losses = self._rpn_loss(gt, obj, deltas, anchors)
        props, matched, labels, reg_t = self._sample_rois([p.detach() for p in proposals], gt)
        feats = self._feature_dict(raw)
        rh = self.roi_heads
        x = rh.box_head(rh.box_roi_pool(feats, props, sizes))
        class_logits, box_reg = rh.box_predictor(x)
        loss_cls, loss_box = fastrcnn_loss(class_logits.float(), box_reg.float(), labels, reg_t)
        losses.update(loss_cls=loss_cls, loss_box=loss_box)
        losses.update(self._extra_losses(feats, props, matched, labels, gt, targets, sizes))
        return losses

    # ------------------------------------------------------------------ inference
    def _detect(self, raw: dict[str, Any], image_sizes: Sequence[tuple[int, int]],
                opts: dict[str, Any]) -> list[dict[str, torch.Tensor]]:
        sizes = [(int(h), int(w)) for h, w in image_sizes]
        proposals, _, _, _ = self._proposals(raw, sizes, "testing")
        rh = self.roi_heads
        x = rh.box_head(rh.box_roi_pool(self._feature_dict(raw), proposals, sizes))
        class_logits, box_reg = rh.box_predictor(x)
        boxes = rh.box_coder.decode(box_reg.float(), proposals)  # (R, K + 1, 4)
        scores = class_logits.float().softmax(-1)
        counts = [len(p) for p in proposals]
        boxes = [b[:, 1:] for b in boxes.split(counts)]
        scores = [s[:, 1:] for s in scores.split(counts)]
        return postprocess_detections(boxes, scores, sizes, **opts)

    @torch.no_grad()
    def predict(self, raw: dict[str, Any], image_sizes: Sequence[tuple[int, int]], *,
                    score_thresh: float | None = None, nms_thresh: float | None = None,
                    max_detections: int | None = None, pre_nms_topk: int | None = None) -> list[dict[str, torch.Tensor]]:
        """Detections per image (see :func:`~zoo.heads.detection.postprocess.postprocess_detections`): ``boxes``
        ``(M, 4)`` xyxy input pixels clipped to ``image_sizes``, ``scores`` ``(M,)``, ``labels`` ``(M,)`` int64.
        Uses the testing proposal counts whatever the module mode."""
        opts = resolve_thresholds(self.post, score_thresh=score_thresh, nms_thresh=nms_thresh,
                                  max_detections=max_detections, pre_nms_topk=pre_nms_topk)
        return self._detect(raw, image_sizes, opts)
