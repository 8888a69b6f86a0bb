"""The one post-processing step every detection head shares: score threshold, top-k, clipping, per-class NMS."""

from __future__ import annotations

from typing import Sequence

from typing import Any, Mapping

import torch
from torchvision.ops import batched_nms, clip_boxes_to_image, remove_small_boxes

from zoo.heads.base import Head
from zoo.preprocess import boxes_to_original
from zoo.results import Detections

__all__ = ["DetectionHead", "postprocess_detections", "resolve_thresholds", "DETECTION_OPTIONS"]

#: Post-processing options every detection head takes (defaults from its constructor / the bundle's ``postprocess``).
DETECTION_OPTIONS = ("score_thresh", "nms_thresh", "max_detections", "pre_nms_topk")


def resolve_thresholds(defaults: dict[str, float | int], **overrides: float | int | None) -> dict[str, float | int]:
    """Merge per-call overrides (``None`` = keep the default) into a head's post-processing defaults."""
    out = dict(defaults)
    for key, value in overrides.items():
        if key not in out:
            raise TypeError(f"unknown post-processing option {key!r}; known: {sorted(out)}")
        if value is not None:
            out[key] = value
    return out


def postprocess_detections(
    boxes: torch.Tensor | Sequence[torch.Tensor],
    scores: torch.Tensor | Sequence[torch.Tensor],
    image_sizes: Sequence[tuple[int, int]],
    *,
    score_thresh: float = 0.05,
    nms_thresh: float = 0.6,
    max_detections: int = 100,
    pre_nms_topk: int = 1000,
    min_size: float = 1e-2,
) -> list[dict[str, torch.Tensor]]:
    """Turn per-candidate boxes and per-class scores into final detections, one image at a time.

    Every (candidate, class) pair with a score above ``score_thresh`` is a detection candidate; the best
    ``pre_nms_topk`` of them are clipped to the image, tiny boxes dropped, per-class NMS
    (:func:`torchvision.ops.batched_nms`) applied and the best ``max_detections`` kept.

    Args:
        boxes: per image, candidate boxes xyxy in input pixels: class-agnostic ``(N, 4)`` or class-specific
            ``(N, K, 4)``; a batched tensor ``(B, N, 4)`` / ``(B, N, K, 4)`` or a list of per-image tensors.
        scores: per image, class probabilities ``(N, K)`` (no background column); batched ``(B, N, K)`` or a list.
        image_sizes: valid ``(height, width)`` of each image; boxes are clipped to it.
        score_thresh: minimum score of a kept detection.
        nms_thresh: IoU above which a lower-scoring box of the same class is suppressed.
        max_detections: detections kept per image.
        pre_nms_topk: candidates (box, class pairs) entering NMS per image.
        min_size: boxes narrower or shorter than this (pixels) after clipping are dropped.

    Returns:
        one dict per image: ``boxes`` ``(M, 4)`` float32 xyxy, ``scores`` ``(M,)`` float32 sorted descending,
        ``labels`` ``(M,)`` int64 in ``0..K-1``; ``M <= max_detections``.
    """
    if len(boxes) != len(scores) or len(scores) != len(image_sizes):
        raise ValueError(f"postprocess got {len(boxes)} box sets, {len(scores)} score sets and "
                         f"{len(image_sizes)} image sizes; they must match (one per image)")
    results: list[dict[str, torch.Tensor]] = []
    for img_boxes, img_scores, size in zip(boxes, scores, image_sizes):
        num_classes = img_scores.shape[-1]
        flat = img_scores.reshape(-1).float()
        cand = torch.nonzero(flat > score_thresh).squeeze(1)
        cand_scores = flat[cand]
        if cand.numel() > pre_nms_topk:
            cand_scores, order = cand_scores.topk(int(pre_nms_topk))
            cand = cand[order]
        box_idx = torch.div(cand, num_classes, rounding_mode="floor")
        labels = cand % num_classes
        if img_boxes.dim() == 2:
            sel = img_boxes[box_idx]
        elif img_boxes.dim() == 3:
            sel = img_boxes[box_idx, labels]
        else:
            raise ValueError(f"boxes per image must be (N, 4) or (N, K, 4), got {tuple(img_boxes.shape)}")
        sel = clip_boxes_to_image(sel.float(), (int(size[0]), int(size[1])))
        keep = remove_small_boxes(sel, min_size)
        sel, cand_scores, labels = sel[keep], cand_scores[keep], labels[keep]
        keep = batched_nms(sel, cand_scores, labels, float(nms_thresh))[: int(max_detections)]
        results.append({"boxes": sel[keep], "scores": cand_scores[keep], "labels": labels[keep].long()})
    return results


class DetectionHead(Head):
    """What every detection head shares: it reads the FPN neck, trains on ``detection`` (or ``instance``) targets,
    and post-processes through :func:`postprocess_detections` into :class:`~zoo.results.Detections` in original
    pixels. Dense one-stage heads implement ``decode(raw) -> (boxes, scores)``; two-stage heads override
    :meth:`predict`. ``self.post`` holds the head's default thresholds."""

    result_kind = "detection"
    target_format = "detection"
    accepts = ("instance",)
    default_name = "det"
    neck = "fpn"
    feature_levels = "every FPN level (P3-P7 by default)"
    options = DETECTION_OPTIONS

    post: dict[str, float | int]

    @classmethod
    def from_model_config(cls, kwargs: dict[str, Any], model_cfg: Mapping[str, Any], data_cfg: Mapping[str, Any]) -> None:
        """``model.postprocess`` (score_thresh, nms_thresh, max_detections, pre_nms_topk) as the head's defaults."""
        for key, value in dict(model_cfg.get("postprocess") or {}).items():
            if key in DETECTION_OPTIONS and value is not None:
                kwargs.setdefault(key, value)

    def decode(self, raw: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    @torch.no_grad()
    def predict(self, raw: dict[str, torch.Tensor], image_sizes: Sequence[tuple[int, int]], *,
                score_thresh: float | None = None, nms_thresh: float | None = None,
                max_detections: int | None = None, pre_nms_topk: int | None = None) -> list[dict[str, torch.Tensor]]:
        """Detections per image (see :func:`postprocess_detections`): ``boxes`` ``(M, 4)`` xyxy input pixels clipped
        to ``image_sizes``, ``scores`` ``(M,)``, ``labels`` ``(M,)`` int64; ``None`` keeps the head's default."""
        opts = resolve_thresholds(self.post, score_thresh=score_thresh, nms_thresh=nms_thresh,
                                  max_detections=max_detections, pre_nms_topk=pre_nms_topk)
        boxes, scores = self.decode(raw)
        return postprocess_detections(boxes, scores, image_sizes, **opts)

    @property
    def exports_postprocessing(self) -> bool:
        """Whether :meth:`export_detections` can put this head's decoding and NMS into an exported graph (one-stage
        heads, which implement :meth:`decode`)."""
        return self.exportable and type(self).decode is not DetectionHead.decode

    def export_detections(self, raw: dict[str, torch.Tensor], image_sizes: torch.Tensor, **options: Any
                          ) -> dict[str, torch.Tensor]:
        """Final detections with tensor operations only, for an ONNX export with post-processing in the graph
        (:func:`zoo.heads.detection.export.traceable_detections`): ``boxes`` ``(B, M, 4)`` xyxy input pixels,
        ``scores`` ``(B, M)``, ``labels`` ``(B, M)`` (``-1`` padding) and ``num_detections`` ``(B,)``.

        Args:
            raw: :meth:`forward` output. image_sizes: ``(B, 2)`` valid ``(height, width)`` per image.
            options: post-processing options (``None`` keeps the head's default).
        """
        from zoo.heads.detection.export import traceable_detections

        if not self.exports_postprocessing:
            raise NotImplementedError(f"{type(self).__name__} cannot export its post-processing (a two-stage head)")
        opts = resolve_thresholds(self.post, **{k: v for k, v in options.items() if k in DETECTION_OPTIONS})
        boxes, scores = self.decode(raw)
        return traceable_detections(boxes, scores, image_sizes, **opts)

    def _result_fields(self, det: dict[str, torch.Tensor], info: Any) -> dict[str, Any]:
        names = self.class_names or [str(i) for i in range(int(getattr(self, "num_classes", 0)))]
        labels = det["labels"].long().cpu()
        ids = labels.tolist()
        cats = self.category_ids
        return dict(boxes=boxes_to_original(det["boxes"].float().cpu(), info), scores=det["scores"].float().cpu(),
                    labels=labels, names=[names[i] if i < len(names) else str(i) for i in ids],
                    category_ids=[int(cats[i]) for i in ids] if cats else None, image_size=tuple(info.orig_size))

    def postprocess(self, raw: dict[str, Any], infos: Sequence[Any], **options: Any) -> list[Detections]:
        """One :class:`~zoo.results.Detections` per image: boxes in original pixels, class names, dataset ids."""
        dets = self.predict(raw, [tuple(info.size) for info in infos], **options)
        return [Detections(**self._result_fields(d, info)) for d, info in zip(dets, infos)]
