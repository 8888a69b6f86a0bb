"""Deterministic imperfect COCO detections built from ground truth, for ``tests/test_coco_eval.py`` and
``benchmarks/coco_eval_speed.py`` (the benchmark puts the repository root on ``sys.path`` to import this)."""

from __future__ import annotations

from typing import Any

import numpy as np

from zoo.metrics.coco_eval import IOU_TYPES, load_coco_gt, resolve_backend

__all__ = ["fake_results"]


def _mask_api(backend: str) -> Any:
    if backend == "faster":
        from faster_coco_eval.core import mask

        return mask
    from pycocotools import mask

    return mask


def _erode(m: np.ndarray) -> np.ndarray:
    """One-pixel 4-neighbour erosion of a ``[H, W]`` uint8 mask."""
    e = m.copy()
    e[1:, :] &= m[:-1, :]
    e[:-1, :] &= m[1:, :]
    e[:, 1:] &= m[:, :-1]
    e[:, :-1] &= m[:, 1:]
    e[0, :] = e[-1, :] = 0
    e[:, 0] = e[:, -1] = 0
    return e


def _shift(m: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """Shift a ``[H, W]`` mask by (dy, dx) pixels, filling with zeros."""
    out = np.zeros_like(m)
    h, w = m.shape
    ys, yd = (slice(0, h - dy), slice(dy, h)) if dy >= 0 else (slice(-dy, h), slice(0, h + dy))
    xs, xd = (slice(0, w - dx), slice(dx, w)) if dx >= 0 else (slice(-dx, w), slice(0, w + dx))
    out[yd, xd] = m[ys, xs]
    return out


def fake_results(
    gt: Any,
    iou_type: str = "bbox",
    *,
    seed: int = 0,
    per_image: int | None = None,
    drop: float = 0.15,
    wrong_class: float = 0.1,
    jitter: float = 0.08,
    duplicates: float = 0.1,
    false_positives: int = 3,
    backend: str = "auto",
) -> list[dict[str, Any]]:
    """Deterministic imperfect detections built from ground truth.

    Each non-crowd GT object is dropped with probability ``drop``; otherwise it yields a detection whose box is
    jittered by ``~N(0, jitter * size)`` in position and ``exp(N(0, jitter))`` in scale (for masks: GT polygons
    moved and scaled the same way; RLE masks shifted by the same offset and, half the time, eroded by one
    pixel), with its class swapped at random with probability ``wrong_class``, plus a second, lower-scored
    duplicate with probability ``duplicates``. Each image then gets false positives (random boxes /
    octagon masks, random classes, low-ish scores): ``false_positives`` of them, or enough to reach ``per_image``
    detections. Scores are distinct random floats.

    Args:
        gt: ground truth as accepted by ``zoo.metrics.load_coco_gt``.
        iou_type: ``"bbox"`` (results carry ``bbox``) or ``"segm"`` (``segmentation`` RLE with str counts, and
            ``bbox``).
        seed: numpy random seed.
        per_image: target number of detections per image (false positives fill up to it), or None.
        drop, wrong_class, jitter, duplicates, false_positives: see above.
        backend: which library's COCO object and mask API build the masks.

    Returns:
        List of COCO result dicts with GT category ids.
    """
    if iou_type not in IOU_TYPES:
        raise ValueError(f"iou_type={iou_type!r} is not supported; use one of {IOU_TYPES}")
    backend = resolve_backend(backend)
    mask_api = _mask_api(backend)
    coco = load_coco_gt(gt, backend)
    rng = np.random.default_rng(seed)
    cat_ids = np.array(sorted(coco.getCatIds()))
    by_image: dict[int, list[dict[str, Any]]] = {i: [] for i in coco.imgs}
    for a in sorted(coco.dataset["annotations"], key=lambda a: a["id"]):
        if not a.get("iscrowd", 0) and a["image_id"] in by_image:
            by_image[a["image_id"]].append(a)

    def det(img_id: int, cat: int, score: float, box: list[float], mask: np.ndarray | dict | None) -> dict:
        d: dict[str, Any] = {"image_id": img_id, "category_id": int(cat), "score": float(score),
                             "bbox": [round(float(v), 2) for v in box]}
        if iou_type == "segm":
            rle = mask if isinstance(mask, dict) else mask_api.encode(np.asfortranarray(mask))
            c = rle["counts"]
            d["segmentation"] = {"size": [int(s) for s in rle["size"]],
                                 "counts": c.decode("ascii") if isinstance(c, bytes) else c}
        return d

    out: list[dict[str, Any]] = []
    for img_id in sorted(by_image):
        img = coco.imgs[img_id]
        h, w = int(img["height"]), int(img["width"])
        dets: list[dict[str, Any]] = []
        for a in by_image[img_id]:
            if rng.random() < drop:
                continue
            x, y, bw, bh = (float(v) for v in a["bbox"])
            dx, dy = rng.normal(0.0, jitter * max(bw, 1.0)), rng.normal(0.0, jitter * max(bh, 1.0))
            sw, sh = np.exp(rng.normal(0.0, jitter, size=2))
            nx, ny = float(np.clip(x + dx, 0, w - 1)), float(np.clip(y + dy, 0, h - 1))
            box = [nx, ny, float(min(max(bw * sw, 1.0), w - nx)), float(min(max(bh * sh, 1.0), h - ny))]
            cat = a["category_id"] if rng.random() >= wrong_class else int(rng.choice(cat_ids))
            score = rng.uniform(0.3, 1.0)
            mask = None
            if iou_type == "segm":
                seg = a["segmentation"]
                if isinstance(seg, list) and seg:  # polygons: move/scale them like the box (fast)
                    polys = []
                    for poly in seg:
                        q = np.asarray(poly, dtype=np.float64).reshape(-1, 2)
                        q = np.stack([box[0] + (q[:, 0] - x) * sw, box[1] + (q[:, 1] - y) * sh], 1)
                        polys.append(q.ravel().tolist())
                    mask = mask_api.merge(mask_api.frPyObjects(polys, h, w))
                else:  # RLE: shift the decoded mask, erode it half the time
                    m = coco.annToMask(a).astype(np.uint8)
                    m = _shift(m, int(round(dy)), int(round(dx)))
                    mask = _erode(m) if rng.random() < 0.5 else m
            dets.append(det(img_id, cat, score, box, mask))
            if rng.random() < duplicates:
                dets.append(det(img_id, cat, score * rng.uniform(0.3, 0.9), box, mask))
        n_fp = false_positives if per_image is None else max(per_image - len(dets), 0)
        for _ in range(n_fp):
            bw, bh = rng.uniform(4, max(w / 2, 5)), rng.uniform(4, max(h / 2, 5))
            x, y = rng.uniform(0, max(w - bw, 1)), rng.uniform(0, max(h - bh, 1))
            mask = None
            if iou_type == "segm":
                t = np.linspace(0, 2 * np.pi, 8, endpoint=False)
                poly = np.stack([x + bw / 2 * (1 + np.cos(t)), y + bh / 2 * (1 + np.sin(t))], 1).ravel()
                mask = mask_api.merge(mask_api.frPyObjects([poly.tolist()], h, w))
            dets.append(det(img_id, int(rng.choice(cat_ids)), rng.uniform(0.01, 0.7), [x, y, bw, bh], mask))
        out.extend(dets)
    return out
