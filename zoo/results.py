"""Typed per-image results returned by :class:`zoo.Predictor`.

Every result holds CPU tensors in the *original* image's pixel frame and offers ``to_dict()``, a JSON-able form for
services (plain lists, floats, ints and strings). Only torch and numpy are imported here (serving path).

================================ =====================================================================
:class:`Classification`          top-k class names / scores / ids and the full probability vector
:class:`Detections`              boxes xyxy (original pixels), scores, contiguous labels, names, COCO ids
:class:`InstanceSegmentation`    :class:`Detections` plus one boolean mask per box at the original size
:class:`SemanticSegmentation`    ``(H, W)`` int64 class map at the original size and the class names
:class:`Embedding`               one ``(D,)`` L2-normalised vector
================================ =====================================================================
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

__all__ = [
    "Classification",
    "Detections",
    "InstanceSegmentation",
    "SemanticSegmentation",
    "Embedding",
    "Result",
    "mask_to_rle",
    "rle_to_mask",
]


def _floats(t: torch.Tensor | list[float], ndigits: int | None = None) -> list[float]:
    values = t.detach().cpu().float().tolist() if isinstance(t, torch.Tensor) else [float(v) for v in t]
    return [round(v, ndigits) for v in values] if ndigits is not None else values


def mask_to_rle(mask: torch.Tensor | np.ndarray) -> dict[str, Any]:
    """Uncompressed COCO run-length encoding of a binary mask.

    The counts alternate runs of 0 and 1 over the pixels in column-major (Fortran) order, starting with a run of
    zeros (possibly of length 0): the format ``pycocotools.mask.frPyObjects`` reads.

    Args:
        mask: ``(H, W)`` boolean (or 0/1) mask.

    Returns:
        ``{"size": [H, W], "counts": [int, ...]}``.
    """
    m = mask.detach().cpu().numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)
    if m.ndim != 2:
        raise ValueError(f"mask_to_rle needs one (H, W) mask, got shape {tuple(m.shape)}")
    flat = m.astype(bool).reshape(-1, order="F")
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat.size and flat[0]:
        counts = [0, *counts]
    return {"size": [int(m.shape[0]), int(m.shape[1])], "counts": [int(c) for c in counts]}


def rle_to_mask(rle: dict[str, Any]) -> torch.Tensor:
    """Inverse of :func:`mask_to_rle`.

    Args:
        rle: ``{"size": [H, W], "counts": [...]}`` (uncompressed counts).

    Returns:
        ``(H, W)`` bool tensor.
    """
    h, w = (int(v) for v in rle["size"])
    counts = np.asarray(rle["counts"], dtype=np.int64)
    if counts.sum() != h * w:
        raise ValueError(f"RLE counts sum to {int(counts.sum())}, expected H*W = {h * w}")
    values = np.arange(len(counts)) % 2 == 1
    flat = np.repeat(values, counts)
    return torch.from_numpy(flat.reshape((h, w), order="F").copy())


@dataclass(eq=False)
class Classification:
    """Image classification result.

    Attributes:
        labels: the ``top_k`` class names, best first.
        scores: their probabilities (softmax, or per-label sigmoid for multi-label models).
        label_ids: their contiguous class indices ``0..K-1``.
        probs: ``(K,)`` float32 probabilities of every class.
        class_names: all ``K`` class names (index = class id).
        multilabel: whether ``probs`` are independent sigmoids rather than a softmax.
    """

    labels: list[str]
    scores: list[float]
    label_ids: list[int]
    probs: torch.Tensor
    class_names: list[str]
    multilabel: bool = False

    @property
    def label(self) -> str:
        """The best class name."""
        return self.labels[0]

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form: ``labels``, ``scores``, ``label_ids``, ``probs`` (list of K floats), ``multilabel``."""
        return {"type": "classification", "labels": list(self.labels), "scores": _floats(self.scores),
                "label_ids": [int(i) for i in self.label_ids], "probs": _floats(self.probs),
                "multilabel": bool(self.multilabel)}


@dataclass(eq=False)
class Detections:
    """Object detection result for one image.

    Attributes:
        boxes: ``(N, 4)`` float32 boxes ``x1, y1, x2, y2`` in the original image's pixels, clipped to it.
        scores: ``(N,)`` float32 confidences, descending.
        labels: ``(N,)`` int64 contiguous class ids ``0..K-1``.
        names: ``N`` class names.
        category_ids: ``N`` original dataset category ids (e.g. COCO's non-contiguous ids), or ``None`` when the
            model does not record them.
        image_size: ``(H, W)`` of the original image.
    """

    boxes: torch.Tensor
    scores: torch.Tensor
    labels: torch.Tensor
    names: list[str]
    category_ids: list[int] | None
    image_size: tuple[int, int]

    def __len__(self) -> int:
        return int(self.boxes.shape[0])

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form: ``boxes`` (list of ``[x1, y1, x2, y2]``), ``scores``, ``labels``, ``names``,
        ``category_ids``, ``image_size``."""
        return {"type": "detection", "boxes": [_floats(b) for b in self.boxes],
                "scores": _floats(self.scores), "labels": [int(v) for v in self.labels.tolist()],
                "names": list(self.names),
                "category_ids": None if self.category_ids is None else [int(c) for c in self.category_ids],
                "image_size": [int(self.image_size[0]), int(self.image_size[1])]}

    def to_coco(self, image_id: int) -> list[dict[str, Any]]:
        """COCO results-format entries (``bbox`` as ``[x, y, w, h]``) for this image.

        Args:
            image_id: the COCO image id.

        Returns:
            one dict per detection with ``image_id``, ``category_id``, ``bbox``, ``score``.
        """
        cat = self.category_ids if self.category_ids is not None else [int(v) + 1 for v in self.labels.tolist()]
        out = []
        for b, s, c in zip(self.boxes.tolist(), self.scores.tolist(), cat):
            out.append({"image_id": int(image_id), "category_id": int(c),
                        "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]], "score": float(s)})
        return out


@dataclass(eq=False)
class InstanceSegmentation(Detections):
    """Instance segmentation result: :class:`Detections` plus one mask per detection.

    Attributes:
        masks: ``(N, H, W)`` bool masks at the original image size (probabilities thresholded at 0.5).
    """

    masks: torch.Tensor = None  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self.masks is None:
            self.masks = torch.zeros((0, *self.image_size), dtype=torch.bool)
        if self.masks.dim() != 3 or self.masks.shape[0] != len(self):
            raise ValueError(f"InstanceSegmentation masks must be (N={len(self)}, H, W), got {tuple(self.masks.shape)}")

    def to_dict(self) -> dict[str, Any]:
        """:meth:`Detections.to_dict` plus ``masks``: one uncompressed COCO RLE (:func:`mask_to_rle`) per box."""
        d = super().to_dict()
        d["type"] = "instance"
        d["masks"] = [mask_to_rle(m) for m in self.masks]
        return d

    def to_coco(self, image_id: int) -> list[dict[str, Any]]:
        """COCO results entries with ``segmentation`` as uncompressed RLE as well as ``bbox``."""
        out = super().to_coco(image_id)
        for entry, m in zip(out, self.masks):
            entry["segmentation"] = mask_to_rle(m)
        return out


@dataclass(eq=False)
class SemanticSegmentation:
    """Semantic segmentation result.

    Attributes:
        mask: ``(H, W)`` int64 class index per pixel at the original image size.
        class_names: name of each class index.
    """

    mask: torch.Tensor
    class_names: list[str]

    def present(self) -> dict[str, int]:
        """Pixel count of every class that occurs in the mask, by class name."""
        ids, counts = torch.unique(self.mask, return_counts=True)
        return {(self.class_names[i] if 0 <= i < len(self.class_names) else str(i)): int(c)
                for i, c in zip(ids.tolist(), counts.tolist())}

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form: ``mask`` as nested lists (rows), ``class_names``, ``size`` and per-class pixel counts."""
        return {"type": "semantic", "mask": self.mask.to(torch.int64).tolist(), "class_names": list(self.class_names),
                "size": [int(self.mask.shape[0]), int(self.mask.shape[1])], "present": self.present()}


@dataclass(eq=False)
class Embedding:
    """Image embedding.

    Attributes:
        vector: ``(D,)`` float32, L2-normalised by the head's post-processing (cosine similarity = dot product).
    """

    vector: torch.Tensor

    @property
    def dim(self) -> int:
        return int(self.vector.shape[-1])

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form: ``vector`` (list of D floats) and ``dim``."""
        return {"type": "embedding", "vector": _floats(self.vector), "dim": self.dim}


#: Any per-head result.
Result = Classification | Detections | InstanceSegmentation | SemanticSegmentation | Embedding
