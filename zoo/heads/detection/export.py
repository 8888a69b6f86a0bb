"""Detection post-processing written to trace into an ONNX graph: score threshold, top-k candidates, clipping, small
boxes dropped, per-class NMS (the ONNX ``NonMaxSuppression`` op, batched over images and classes) and the best
``max_detections`` per image, padded to a fixed count.

It computes what :func:`zoo.heads.detection.postprocess.postprocess_detections` computes (the eager loop the
Predictor uses), with fixed-size tensors instead of per-image lists, so that the batch axis stays dynamic in the
graph. Only torch / torchvision are imported (lean path).
"""

from __future__ import annotations

import torch
from torchvision.ops import batched_nms

__all__ = ["BatchedNMS", "traceable_detections", "EXPORT_KEYS"]

#: The outputs of :func:`traceable_detections`, in the order an export lists them (sorted).
EXPORT_KEYS = ("boxes", "labels", "num_detections", "scores")


class BatchedNMS(torch.autograd.Function):
    """Per-image, per-class NMS over ``boxes`` ``(B, N, 4)`` xyxy and ``scores`` ``(B, C, N)``: the ONNX
    ``NonMaxSuppression`` operator, exported as that operator; eager (and while tracing) computed with torchvision.

    Returns ``(S, 3)`` int64 rows ``(image, class, box)`` of the kept boxes: scores strictly above
    ``score_thresh``, at most ``max_per_class`` per image and class, by descending score within each.
    """

    @staticmethod
    def forward(ctx, boxes: torch.Tensor, scores: torch.Tensor, max_per_class: int, iou_thresh: float,
                score_thresh: float) -> torch.Tensor:  # noqa: D102
        rows = []
        for b in range(boxes.shape[0]):
            img_scores = scores[b]
            cls, idx = torch.nonzero(img_scores > score_thresh, as_tuple=True)
            if idx.numel() == 0:
                continue
            s = img_scores[cls, idx]
            keep = batched_nms(boxes[b][idx].float(), s.float(), cls, float(iou_thresh))
            cls_k, idx_k = cls[keep], idx[keep]
            # at most max_per_class per class, best first (keep is sorted by score)
            order = torch.argsort(cls_k, stable=True)
            cls_s, idx_s = cls_k[order], idx_k[order]
            first = torch.searchsorted(cls_s, cls_s, right=False)
            rank = torch.arange(len(cls_s), device=cls_s.device) - first
            ok = rank < int(max_per_class)
            cls_s, idx_s = cls_s[ok], idx_s[ok]
            rows.append(torch.stack([torch.full_like(idx_s, b), cls_s, idx_s], dim=1))
        if not rows:
            return torch.zeros((0, 3), dtype=torch.long, device=boxes.device)
        return torch.cat(rows).long()

    @staticmethod
    def symbolic(g, boxes, scores, max_per_class: int, iou_thresh: float, score_thresh: float):  # noqa: D102
        max_out = g.op("Constant", value_t=torch.tensor([int(max_per_class)], dtype=torch.long))
        iou = g.op("Constant", value_t=torch.tensor([float(iou_thresh)], dtype=torch.float32))
        score = g.op("Constant", value_t=torch.tensor([float(score_thresh)], dtype=torch.float32))
        return g.op("NonMaxSuppression", boxes, scores, max_out, iou, score, center_point_box_i=0)


def traceable_detections(boxes: torch.Tensor, scores: torch.Tensor, image_sizes: torch.Tensor, *,
                         score_thresh: float = 0.05, nms_thresh: float = 0.6, max_detections: int = 100,
                         pre_nms_topk: int = 1000, min_size: float = 1e-2) -> dict[str, torch.Tensor]:
    """Final detections of a batch with tensor operations only (see the module docs).

    Args:
        boxes: ``(B, N, 4)`` class-agnostic candidate boxes xyxy, input pixels.
        scores: ``(B, N, K)`` class probabilities.
        image_sizes: ``(B, 2)`` valid ``(height, width)`` of each image inside the padding (boxes are clipped to it).
        score_thresh, nms_thresh, max_detections, pre_nms_topk, min_size: as in ``postprocess_detections``.

    Returns:
        ``boxes`` ``(B, M, 4)`` float32, ``scores`` ``(B, M)`` float32 (descending), ``labels`` ``(B, M)`` int64 and
        ``num_detections`` ``(B,)`` int64, with ``M = min(max_detections, candidates)``; rows past an image's
        ``num_detections`` are padding (boxes and scores 0, labels -1).
    """
    n, k = int(boxes.shape[1]), int(scores.shape[2])
    t = min(int(pre_nms_topk), n * k)
    flat = scores.float().reshape(-1, n * k)
    cand_scores, cand = flat.topk(t, dim=1)  # best (box, class) pairs of each image
    box_idx = torch.div(cand, k, rounding_mode="floor")
    labels = cand - box_idx * k
    sel = torch.gather(boxes.float(), 1, box_idx.unsqueeze(-1).expand(-1, -1, 4))
    sizes = image_sizes.to(sel.dtype)
    hi = torch.stack([sizes[:, 1], sizes[:, 0], sizes[:, 1], sizes[:, 0]], dim=1).unsqueeze(1)  # x to w, y to h
    sel = torch.minimum(sel.clamp(min=0), hi)
    wh = sel[..., 2:] - sel[..., :2]
    big = (wh[..., 0] >= min_size) & (wh[..., 1] >= min_size)
    cand_scores = torch.where(big, cand_scores, torch.full_like(cand_scores, -1.0))
    # (B, K, T): each candidate scores only in its own class, so NMS runs per class as batched_nms does
    classes = torch.arange(k, device=labels.device).view(1, k, 1)
    per_class = torch.where(labels.unsqueeze(1) == classes, cand_scores.unsqueeze(1),
                            torch.full_like(cand_scores.unsqueeze(1), -1.0))
    keep = BatchedNMS.apply(sel, per_class, int(max_detections), float(nms_thresh), float(score_thresh))
    kept = torch.full_like(cand_scores, -1.0)
    kept = kept.index_put((keep[:, 0], keep[:, 2]), cand_scores[keep[:, 0], keep[:, 2]])
    m = min(int(max_detections), t)
    out_scores, order = kept.topk(m, dim=1)
    valid = out_scores > float(score_thresh)
    out_boxes = torch.gather(sel, 1, order.unsqueeze(-1).expand(-1, -1, 4))
    out_labels = torch.gather(labels, 1, order)
    return {"boxes": torch.where(valid.unsqueeze(-1), out_boxes, torch.zeros_like(out_boxes)),
            "scores": torch.where(valid, out_scores, torch.zeros_like(out_scores)),
            "labels": torch.where(valid, out_labels, torch.full_like(out_labels, -1)),
            "num_detections": valid.sum(dim=1)}
