"""Typed per-image results returned by :class:`zoo.Predictor`.

Every result holds CPU tensors in the *original* image's pixel frame and offers ``to_dict()``, a JSON-able form for
services (plain lists, floats, ints and strings), ``plot(image)`` (the result drawn on the image it was predicted on:
an ``(H, W, 3)`` uint8 array, or a PIL image with ``pil=True``) and ``save(path, image=None)`` (``.json``: the
``to_dict()`` form; ``.png``/``.jpg``/...: the drawing; ``.npy``: the embedding vector or the class map; a semantic
result saved as ``.png`` without an image is its class-index mask). Only torch, numpy and PIL are imported here
(serving path); the drawing code is :mod:`zoo.drawing`.

================================ =====================================================================
:class:`Classification`          top-k class names / scores / ids and the full probability vector
:class:`Detections`              boxes xyxy (original pixels), scores, contiguous labels, names, COCO ids
:class:`InstanceSegmentation`    :class:`Detections` plus one boolean mask per box at the original size
:class:`SemanticSegmentation`    ``(H, W)`` int64 class map at the original size and the class names
:class:`Embedding`               one ``(D,)`` L2-normalised vector
================================ =====================================================================
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
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


#: File suffixes :meth:`save` writes as pictures.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")


def _as_output(arr: np.ndarray, pil: bool) -> Any:
    if pil:
        from PIL import Image

        return Image.fromarray(arr)
    return arr


def _save(result: Any, path: str | Path, image: Any, plot_kwargs: dict[str, Any]) -> Path:
    """What every result's ``save`` does for ``.json`` and picture suffixes (``plot`` then write)."""
    p = Path(path).expanduser()
    suffix = p.suffix.lower()
    p.parent.mkdir(parents=True, exist_ok=True)
    if suffix == ".json":
        p.write_text(json.dumps(result.to_dict()), encoding="utf-8")
    elif suffix in IMAGE_SUFFIXES:
        from PIL import Image

        img = Image.fromarray(result.plot(image, **plot_kwargs))
        img.save(p, quality=92) if suffix in (".jpg", ".jpeg") else img.save(p)
    else:
        raise ValueError(f"cannot save a {type(result).__name__} as {p.name!r}: use .json or a picture suffix "
                         f"({', '.join(IMAGE_SUFFIXES)})")
    return p


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

    def plot(self, image: Any, *, top_k: int = 3, font_size: int | None = None, pil: bool = False) -> Any:
        """``image`` with the ``top_k`` classes and their scores written at its top-left, each line in its class
        colour (``image``: a path, PIL image, ``(H, W, 3)`` uint8 array or ``(3, H, W)`` uint8 tensor)."""
        from zoo.drawing import as_rgb, class_color, draw_banner

        if image is None:
            raise ValueError("Classification.plot needs the image that was classified")
        k = max(1, int(top_k))
        lines = [f"{n} {float(s):.2f}" for n, s in zip(self.labels[:k], self.scores[:k])]
        colors = [class_color(int(i)) for i in self.label_ids[:k]]
        return _as_output(draw_banner(as_rgb(image), lines, colors, font_size=font_size), pil)

    def save(self, path: str | Path, image: Any = None, **plot_kwargs: Any) -> Path:
        """``.json``: :meth:`to_dict`; a picture suffix: :meth:`plot` on ``image``. Returns the path."""
        return _save(self, path, image, plot_kwargs)


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

    def _draw_under(self, canvas: np.ndarray, keep: torch.Tensor) -> np.ndarray:
        """What is drawn below the boxes (instance masks); nothing for plain detections."""
        return canvas

    def plot(self, image: Any = None, *, score_thresh: float | None = None, max_boxes: int | None = None,
             show_scores: bool = True, line_width: int | None = None, font_size: int | None = None,
             dashed: bool = False, pil: bool = False) -> Any:
        """The detections drawn on ``image`` at its resolution (the original image: boxes are in its pixels; a grey
        canvas of ``image_size`` when ``image`` is None): one box per detection in its class colour with a filled
        ``"<class> <score>"`` label; line width and font scale with the image.

        Args:
            image: a path, PIL image, ``(H, W, 3)`` uint8 array or ``(3, H, W)`` uint8 tensor of ``image_size``.
            score_thresh: draw only detections scoring at least this. max_boxes: at most this many (best first).
            show_scores: put the score after the class name. dashed: dashed outlines (for ground truth).
            line_width, font_size: override the scaled defaults. pil: return a PIL image instead of an array.
        """
        from zoo.drawing import as_rgb, draw_boxes

        canvas = as_rgb(image, self.image_size)
        if image is not None and tuple(canvas.shape[:2]) != tuple(int(v) for v in self.image_size):
            raise ValueError(f"these detections are for an image of {self.image_size[0]}x{self.image_size[1]} "
                             f"(H x W) but the image given is {canvas.shape[0]}x{canvas.shape[1]}: draw on the "
                             "image that was predicted on")
        keep = torch.ones(len(self), dtype=torch.bool)
        if score_thresh is not None and len(self):
            keep &= self.scores.float().cpu() >= float(score_thresh)
        idx = torch.nonzero(keep).flatten()
        if max_boxes is not None:
            idx = idx[: int(max_boxes)]
        keep = torch.zeros_like(keep)
        keep[idx] = True
        canvas = self._draw_under(canvas, keep)
        labels = self.labels[idx].tolist()
        texts = [f"{self.names[i]} {float(self.scores[i]):.2f}" if show_scores else self.names[i] for i in idx.tolist()]
        out = draw_boxes(canvas, self.boxes[idx], labels, texts, line_width=line_width, font_size=font_size,
                         dashed=dashed)
        return _as_output(out, pil)

    def save(self, path: str | Path, image: Any = None, **plot_kwargs: Any) -> Path:
        """``.json``: :meth:`to_dict`; a picture suffix: :meth:`plot` (on ``image``, or a blank canvas). Returns
        the path."""
        return _save(self, path, image, plot_kwargs)


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

    def _draw_under(self, canvas: np.ndarray, keep: torch.Tensor) -> np.ndarray:
        from zoo.drawing import overlay_masks

        if not bool(keep.any()):
            return canvas
        return overlay_masks(canvas, self.masks[keep], self.labels[keep].tolist())


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

    def plot(self, image: Any = None, *, alpha: float = 0.5, legend: bool = True, show_background: bool = False,
             font_size: int | None = None, pil: bool = False) -> Any:
        """The class map blended over ``image`` (each class in its colour; class 0 is left clear when it is named
        ``background`` unless ``show_background``), with a legend of the classes present, largest first. Without
        an image: the colour map alone."""
        from zoo.drawing import as_rgb, class_color, colorize_classes, draw_banner

        skip = [0] if self.class_names[:1] == ["background"] and not show_background else []
        rgb, colored = colorize_classes(self.mask, skip)
        if image is None:
            out = rgb
        else:
            out = as_rgb(image).astype(np.float32)
            if out.shape[:2] != rgb.shape[:2]:
                raise ValueError(f"this mask is {rgb.shape[0]}x{rgb.shape[1]} (H x W) but the image given is "
                                 f"{out.shape[0]}x{out.shape[1]}: draw on the image that was predicted on")
            out[colored] = out[colored] * (1 - alpha) + rgb[colored].astype(np.float32) * alpha
            out = out.round().clip(0, 255).astype(np.uint8)
        if legend:
            ids, counts = torch.unique(self.mask, return_counts=True)
            order = [int(i) for i, _ in sorted(zip(ids.tolist(), counts.tolist()), key=lambda t: -t[1])
                     if int(i) not in skip and 0 <= int(i) < 255][:8]
            names = [self.class_names[i] if i < len(self.class_names) else str(i) for i in order]
            if names:
                out = draw_banner(out, names, [class_color(i) for i in order], font_size=font_size)
        return _as_output(out, pil)

    def save(self, path: str | Path, image: Any = None, **plot_kwargs: Any) -> Path:
        """``.png`` without ``image``: the class-index mask (8-bit, 16-bit above 255 classes); ``.npy``: the mask
        array; ``.json``: :meth:`to_dict`; a picture suffix with ``image``: :meth:`plot`. Returns the path."""
        p = Path(path).expanduser()
        if p.suffix.lower() == ".npy":
            p.parent.mkdir(parents=True, exist_ok=True)
            np.save(p, self.mask.cpu().numpy())
            return p
        if p.suffix.lower() == ".png" and image is None:
            from PIL import Image

            p.parent.mkdir(parents=True, exist_ok=True)
            m = self.mask.cpu().numpy()
            Image.fromarray(m.astype(np.uint8 if m.size == 0 or m.max() < 256 else np.uint16)).save(p)
            return p
        return _save(self, p, image, plot_kwargs)


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

    def plot(self, image: Any, *, font_size: int | None = None, pil: bool = False) -> Any:
        """``image`` with a caption naming the embedding's size (an embedding has nothing to draw)."""
        from zoo.drawing import as_rgb, draw_banner

        if image is None:
            raise ValueError("Embedding.plot needs the image that was embedded")
        return _as_output(draw_banner(as_rgb(image), [f"embedding, {self.dim} dims"], font_size=font_size), pil)

    def save(self, path: str | Path, image: Any = None, **plot_kwargs: Any) -> Path:
        """``.npy``: the vector (float32); ``.json``: :meth:`to_dict`; a picture suffix: :meth:`plot`."""
        p = Path(path).expanduser()
        if p.suffix.lower() == ".npy":
            p.parent.mkdir(parents=True, exist_ok=True)
            np.save(p, self.vector.detach().cpu().float().numpy())
            return p
        return _save(self, p, image, plot_kwargs)


#: Any per-head result.
Result = Classification | Detections | InstanceSegmentation | SemanticSegmentation | Embedding
