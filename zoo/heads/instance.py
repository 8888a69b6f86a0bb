"""Instance segmentation head: Mask R-CNN = the zoo's Faster R-CNN head plus torchvision's mask branch."""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.roi_heads import maskrcnn_inference, maskrcnn_loss, paste_masks_in_image

from zoo.heads.detection.common import PaddedTargets
from zoo.heads.base import register_head
from zoo.heads.detection.postprocess import resolve_thresholds
from zoo.preprocess import masks_to_original
from zoo.results import InstanceSegmentation
from zoo.heads.detection.two_stage import FasterRCNNHead, make_roi_pool

__all__ = ["MaskRCNNHead"]


@register_head("mask_rcnn")
class MaskRCNNHead(FasterRCNNHead):
    """Mask R-CNN head: :class:`~zoo.heads.detection.FasterRCNNHead` plus torchvision's mask branch
    (``mask_roi_pool`` = ``MultiScaleRoIAlign`` at 14 px, ``MaskRCNNHeads``, ``MaskRCNNPredictor`` at 28 px).

    Args:
        in_channels, strides, num_classes: as for :class:`~zoo.heads.detection.FasterRCNNHead`.
        mask_layers: channels of the mask head's 3x3 convolutions (default four of 256).
        mask_dim: channels of the mask predictor's transposed convolution.
        mask_roi_size: RoIAlign side for the mask branch (masks are predicted at twice that).
        **kwargs: every other :class:`~zoo.heads.detection.FasterRCNNHead` option.

    Targets additionally carry ``masks`` ``(N, H, W)`` uint8 in input pixels (H, W covering the boxes, e.g. the
    padded batch size). ``postprocess`` adds ``masks`` ``(M, 1, h, w)`` float probabilities at each image's
    valid size ``(h, w)``.
    """

    result_kind = "instance"
    target_format = "instance"
    accepts = ()

    def __init__(self, in_channels: Sequence[int], strides: Sequence[int], *, num_classes: int,
                 mask_layers: Sequence[int] = (256, 256, 256, 256), mask_dim: int = 256, mask_roi_size: int = 14,
                 **kwargs: Any) -> None:
        self._mask_cfg = (tuple(int(c) for c in mask_layers), int(mask_dim), int(mask_roi_size))
        super().__init__(in_channels, strides, num_classes=num_classes, **kwargs)

    def _mask_modules(self) -> dict[str, nn.Module]:
        layers, dim, size = self._mask_cfg
        if not layers:
            raise ValueError("MaskRCNNHead mask_layers must name at least one convolution width")
        return {"mask_roi_pool": make_roi_pool(self.strides, self.roi_levels, size),
                "mask_head": MaskRCNNHeads(self.channels, list(layers), 1),
                "mask_predictor": MaskRCNNPredictor(layers[-1], dim, self.num_classes + 1)}

    def _mask_logits(self, feats: dict[str, torch.Tensor], boxes: list[torch.Tensor],
                     sizes: list[tuple[int, int]]) -> torch.Tensor:
        rh = self.roi_heads
        return rh.mask_predictor(rh.mask_head(rh.mask_roi_pool(feats, boxes, sizes)))

    def _extra_losses(self, feats: dict[str, torch.Tensor], props: list[torch.Tensor], matched: list[torch.Tensor],
                      labels: list[torch.Tensor], gt: PaddedTargets, targets: Sequence[dict[str, torch.Tensor]],
                      image_sizes: list[tuple[int, int]]) -> dict[str, torch.Tensor]:
        """``loss_mask``: per-pixel BCE of the ground-truth class's 28x28 mask on the positive sampled proposals."""
        pos_props, pos_matched, gt_masks, gt_labels = [], [], [], []
        for i, t in enumerate(targets):
            if "masks" not in t:
                raise KeyError(f"MaskRCNNHead target {i} has no 'masks'; give (N, H, W) uint8 masks in input pixels")
            n = int(torch.as_tensor(t["labels"]).numel())
            masks = torch.as_tensor(t["masks"], device=props[i].device)
            if masks.dim() != 3 or masks.shape[0] != n:
                raise ValueError(f"MaskRCNNHead target {i}: masks must be (N, H, W) with N={n}, got {tuple(masks.shape)}")
            keep = gt.positive[i][:n]
            pos = labels[i] > 0
            pos_props.append(props[i][pos])
            pos_matched.append(matched[i][pos])
            gt_masks.append(masks[keep])
            gt_labels.append(gt.labels[i][:n][keep] + 1)
        logits = self._mask_logits(feats, pos_props, image_sizes)
        return {"loss_mask": maskrcnn_loss(logits.float(), pos_props, gt_masks, gt_labels, pos_matched)}

    @torch.no_grad()
    def predict(self, raw: dict[str, Any], image_sizes: Sequence[tuple[int, int]], *,
                    score_thresh: float | None = None, nms_thresh: float | None = None,
                    max_detections: int | None = None, pre_nms_topk: int | None = None,
                    mask_thresh: float | None = None) -> list[dict[str, torch.Tensor]]:
        """Detections per image as :meth:`FasterRCNNHead.postprocess` plus ``masks`` ``(M, 1, h, w)`` float
        probabilities pasted at the image's valid size ``image_sizes[i]``; with ``mask_thresh`` they are binarised
        to 0/1 (still float)."""
        opts = resolve_thresholds(self.post, score_thresh=score_thresh, nms_thresh=nms_thresh,
                                  max_detections=max_detections, pre_nms_topk=pre_nms_topk)
        sizes = [(int(h), int(w)) for h, w in image_sizes]
        results = self._detect(raw, sizes, opts)
        boxes = [r["boxes"] for r in results]
        if sum(len(b) for b in boxes):
            logits = self._mask_logits(self._feature_dict(raw), boxes, sizes).float()
            probs = maskrcnn_inference(logits, [r["labels"] + 1 for r in results])
        else:
            probs = [b.new_zeros((0, 1, 1, 1)) for b in boxes]
        for r, p, size in zip(results, probs, sizes):
            masks = paste_masks_in_image(p, r["boxes"], size) if len(r["boxes"]) else p.new_zeros((0, 1, *size))
            r["masks"] = (masks > mask_thresh).float() if mask_thresh is not None else masks
        return results

    def postprocess(self, raw: dict[str, Any], infos: Sequence[Any], **options: Any) -> list[InstanceSegmentation]:
        """One :class:`~zoo.results.InstanceSegmentation` per image: boxes and boolean masks in original pixels."""
        dets = self.predict(raw, [tuple(info.size) for info in infos], **options)
        return [InstanceSegmentation(**self._result_fields(d, info), masks=masks_to_original(d["masks"].cpu(), info))
                for d, info in zip(dets, infos)]
