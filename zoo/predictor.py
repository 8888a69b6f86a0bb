"""``Predictor``: images in, typed results out, with exactly the preprocessing evaluation uses.

    predictor = zoo.Predictor("test_resnet.shapes_cls")            # or a loaded ZooModel / a bundle path
    [result] = predictor("cat.jpg")                               # zoo.results.Classification
    results = predictor([pil_image, numpy_rgb, uint8_chw_tensor])

Images go through :mod:`zoo.preprocess` as :class:`zoo.data.coco.CocoDataset` does at evaluation (decode to RGB
uint8 -> ``compute_resize`` -> ``resize_image`` -> ``normalize``), are batched with ``pad_batch`` (the evaluation
collate), run under ``torch.inference_mode()`` and post-processed by each head's own ``postprocess``; boxes and
masks are then mapped back to the original image's pixels. A service therefore gets the numbers evaluation
measured. Only torch, numpy, PIL and zoo's lean modules are imported (serving path).
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch
from PIL import Image

from zoo.hub.api import load, model_meta
from zoo.models import ZooModel
from zoo.preprocess import (  # noqa: F401  (boxes/masks_to_original: re-exported for callers of zoo.predictor)
    ResizeInfo, boxes_to_original, compute_resize, decode_rgb, decode_rgb_reduced, masks_to_original, normalize, pad_batch,
    pil_to_rgb, resize_image,
)
from zoo.results import Result, SemanticSegmentation

__all__ = ["Predictor", "ImageInput", "to_rgb_array"]

#: One image: a file path, encoded bytes, a PIL image, an ``(H, W, 3)`` uint8 RGB array or a ``(3, H, W)`` uint8 tensor.
ImageInput = Union[str, os.PathLike, bytes, Image.Image, np.ndarray, torch.Tensor]



def _decode(image: ImageInput, min_side: int | None) -> tuple[np.ndarray, tuple[int, int]]:
    """``(RGB array, full (H, W))``: files and bytes through :func:`zoo.preprocess.decode_rgb_reduced` (a large
    JPEG decoded at 1/2..1/8 scale, both sides >= ``min_side``), everything else through :func:`to_rgb_array`."""
    if min_side and isinstance(image, (str, os.PathLike)):
        arr, _, full = decode_rgb_reduced(Path(image).expanduser(), str(image), min_side)
        return arr, full
    if min_side and isinstance(image, (bytes, bytearray, memoryview)):
        arr, _, full = decode_rgb_reduced(io.BytesIO(bytes(image)), f"the given bytes ({len(image)} bytes)", min_side)
        return arr, full
    arr = to_rgb_array(image)
    return arr, arr.shape[:2]


def to_rgb_array(image: ImageInput) -> np.ndarray:
    """Bring one image to an ``(H, W, 3)`` uint8 RGB array, as evaluation decodes files (PIL, ``convert("RGB")``,
    EXIF Orientation applied, 16-bit grey scaled to 8 bits: :func:`zoo.preprocess.decode_rgb`).

    Args:
        image: a path (str / PathLike), encoded file bytes, a PIL image, an ``(H, W, 3)`` (or ``(H, W)`` / ``(H, W, 1)``
            grey) uint8 array, or a ``(3, H, W)`` (or ``(1, H, W)``) uint8 tensor.

    Returns:
        ``(H, W, 3)`` uint8 C-contiguous array.
    """
    if isinstance(image, (str, os.PathLike)):
        return decode_rgb(Path(image).expanduser(), str(image))
    if isinstance(image, (bytes, bytearray, memoryview)):
        return decode_rgb(io.BytesIO(bytes(image)), f"the given bytes ({len(image)} bytes)")
    if isinstance(image, Image.Image):
        return pil_to_rgb(image)
    if isinstance(image, torch.Tensor):
        if image.dtype != torch.uint8:
            raise TypeError(f"image tensors must be uint8 (0..255) (3, H, W), got {image.dtype}; convert a 0..1 float "
                            "tensor with (t * 255).round().to(torch.uint8)")
        if image.dim() != 3 or image.shape[0] not in (1, 3):
            raise ValueError(f"image tensors must be (3, H, W) uint8 RGB, got shape {tuple(image.shape)}"
                             + ("; it looks like (H, W, C): use t.permute(2, 0, 1)" if image.dim() == 3 and
                                image.shape[-1] in (1, 3) else ""))
        arr = image.detach().cpu().permute(1, 2, 0).numpy()
        return np.ascontiguousarray(np.repeat(arr, 3, axis=2) if arr.shape[2] == 1 else arr)
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise TypeError(f"image arrays must be uint8 (0..255) (H, W, 3) RGB, got dtype {image.dtype}; convert a "
                            "0..1 float array with (a * 255).round().astype(np.uint8)")
        if image.ndim == 2:
            image = image[:, :, None]
        if image.ndim != 3 or image.shape[2] not in (1, 3):
            hint = "; it looks like (C, H, W): use a.transpose(1, 2, 0)" if image.ndim == 3 and image.shape[0] in (1, 3) \
                else "; drop the alpha channel with a[..., :3]" if image.ndim == 3 and image.shape[2] == 4 else ""
            raise ValueError(f"image arrays must be (H, W, 3) uint8 RGB, got shape {image.shape}{hint}")
        if image.shape[2] == 1:
            image = np.repeat(image, 3, axis=2)
        return np.ascontiguousarray(image)
    raise TypeError(f"cannot read an image from a {type(image).__name__}: give a path, bytes, a PIL.Image, an "
                    "(H, W, 3) uint8 numpy array or a (3, H, W) uint8 torch tensor")


def _as_list(images: ImageInput | Iterable[ImageInput]) -> list[ImageInput]:
    """One image or many: lists/tuples are many, 4-D arrays/tensors are a batch, anything else is one image."""
    if isinstance(images, (list, tuple)):
        return list(images)
    if isinstance(images, torch.Tensor) and images.dim() == 4:
        return list(images.unbind(0))
    if isinstance(images, np.ndarray) and images.ndim == 4:
        return [images[i] for i in range(images.shape[0])]
    return [images]


class Predictor:
    """Run a zoo model on images and return typed results (:mod:`zoo.results`).

    Args:
        model: a :class:`~zoo.models.ZooModel` (moved to ``device`` and set to eval mode) or anything
            :func:`zoo.load` accepts (registered name, bundle path, URL, Lightning checkpoint).
        device: where the model runs; default: where a given model already is (CPU for a loaded one).
        batch_size: images per forward pass.
        score_thresh, nms_thresh, max_detections: detection post-processing; ``None`` keeps the bundle's defaults
            (``model.json`` ``postprocess``, i.e. what evaluation used), then the head's own.
        top_k: class names returned per image by classification heads.
        heads: run only these heads (default: all); all of them share one backbone pass.
        head_options: further post-processing options per head name (``{"det": {"pre_nms_topk": 500}}``); each
            head takes the options it declares (``Head.options``).
        seg_window: semantic heads only: predict at the image's *original* resolution from overlapping windows of
            this ``(h, w)`` (one int for a square; ``"input"`` for the model's ``input_size``) instead of one pass
            over the resized image; for large images where the model was trained on crops. Other heads are
            unaffected.
        seg_stride: step between windows (default: two thirds of the window, i.e. one third overlap).

    Calling the predictor with one image or a list returns a list with one entry per image: the head's result when
    the model has one head, else ``{head_name: result}``. Every head turns its raw output into typed results itself
    (``Head.postprocess``), so the predictor serves any registered head.
    """

    def __init__(self, model: ZooModel | str | os.PathLike[str], *, device: str | torch.device | None = None,
                 batch_size: int = 8, score_thresh: float | None = None, nms_thresh: float | None = None,
                 max_detections: int | None = None, top_k: int = 5, heads: Sequence[str] | None = None,
                 seg_window: int | Sequence[int] | str | None = None,
                 seg_stride: int | Sequence[int] | None = None,
                 head_options: Mapping[str, Mapping[str, Any]] | None = None, fast_decode: bool = True) -> None:
        if not isinstance(model, torch.nn.Module):
            model = load(model, device=device or "cpu")
        if not isinstance(model, ZooModel):
            raise TypeError(f"Predictor needs a zoo.models.ZooModel (or a name/path for zoo.load), got "
                            f"{type(model).__name__}")
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if int(top_k) < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        if device is None:
            first = next(iter(model.parameters()), None)
            device = first.device if first is not None else "cpu"
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.spec = model.spec
        self.meta: dict[str, Any] = dict(getattr(model, "bundle_meta", None) or model_meta(self.spec))
        self.batch_size = int(batch_size)
        self.top_k = int(top_k)
        # JPEG files / bytes much larger than the input decoded at 1/2..1/8 scale, as validation does (data.fast_decode)
        self.fast_decode = bool(fast_decode)
        names = list(heads) if heads is not None else list(model.heads)
        for n in names:
            if n not in model.heads:
                raise KeyError(f"heads: the model has no head {n!r}; its heads are {list(model.heads)}")
        self.heads = names
        self.kinds = {n: model.heads[n].result_kind for n in names}
        # Options per head: the bundle's post-processing defaults (what evaluation used), then the arguments.
        defaults = dict(self.meta.get("postprocess") or {})
        given = {"score_thresh": score_thresh, "nms_thresh": nms_thresh, "max_detections": max_detections,
                 "top_k": self.top_k}
        extra = dict(head_options or {})
        unknown = sorted(set(extra) - set(model.heads))
        if unknown:
            raise KeyError(f"head_options: the model has no head(s) {unknown}; its heads are {list(model.heads)}")
        self.options: dict[str, dict[str, Any]] = {}
        for n in names:
            declared = tuple(model.heads[n].options)
            opts = {k: v for k, v in defaults.items() if k in declared and v is not None}
            opts.update({k: v for k, v in given.items() if k in declared and v is not None})
            bad = sorted(set(extra.get(n, {})) - set(declared))
            if bad:
                raise KeyError(f"head_options[{n!r}]: {type(model.heads[n]).__name__} takes no option(s) {bad}; "
                               f"it takes {list(declared)}")
            opts.update(extra.get(n, {}))
            self.options[n] = opts
        self.seg_window: tuple[int, int] | None = None
        self.seg_stride: tuple[int, int] | None = None
        if seg_window is not None:
            if isinstance(seg_window, str):
                if seg_window != "input":
                    raise ValueError(f"seg_window must be an int, an (h, w) pair or 'input', got {seg_window!r}")
                seg_window = list(self.spec.input_size)
            win = [int(v) for v in ([seg_window] * 2 if isinstance(seg_window, (int, float)) else seg_window)]
            if len(win) != 2 or min(win) < 1:
                raise ValueError(f"seg_window must be a positive int or an (h, w) pair, got {seg_window!r}")
            self.seg_window = (win[0], win[1])
            st = seg_stride if seg_stride is not None else [max(1, 2 * v // 3) for v in win]
            st = [int(v) for v in ([st] * 2 if isinstance(st, (int, float)) else st)]
            if len(st) != 2 or min(st) < 1 or st[0] > win[0] or st[1] > win[1]:
                raise ValueError(f"seg_stride must be positive and no larger than seg_window {tuple(win)}, "
                                 f"got {seg_stride!r}")
            self.seg_stride = (st[0], st[1])
        elif seg_stride is not None:
            raise ValueError("seg_stride needs seg_window")

    def class_names(self, head: str) -> list[str]:
        """Class names of ``head`` from the spec (``"0"``, ``"1"``, ... when the spec has none)."""
        names = self.spec.class_names.get(head)
        if names:
            return list(names)
        k = getattr(self.model.heads[head], "num_classes", 0)
        return [str(i) for i in range(int(k))]

    # ------------------------------------------------------------------ preprocessing
    def preprocess(self, images: Sequence[np.ndarray], orig_sizes: Sequence[tuple[int, int]] | None = None
                   ) -> tuple[torch.Tensor, list[ResizeInfo]]:
        """Resize, normalise and pad RGB arrays exactly as evaluation does.

        Args:
            images: ``(H_i, W_i, 3)`` uint8 RGB arrays (see :func:`to_rgb_array`).
            orig_sizes: the images' full ``(H, W)`` when they were decoded reduced (results refer to it).

        Returns:
            ``(batch (B, 3, H, W) float32 on the predictor's device, resize records)``.
        """
        s = self.spec
        infos, tensors = [], []
        for k, arr in enumerate(images):
            info = compute_resize(orig_sizes[k] if orig_sizes else arr.shape[:2], s.input_size, s.resize)
            tensors.append(normalize(resize_image(arr, info), s.mean, s.std))
            infos.append(info)
        batch = pad_batch(tensors, size_divisor=s.size_divisor)
        return batch.to(self.device), infos

    # ------------------------------------------------------------------ inference
    def __call__(self, images: ImageInput | Iterable[ImageInput]) -> list[Result | dict[str, Result]]:
        """Predict on one image or a list of images.

        Args:
            images: one image or a list (see :func:`to_rgb_array` for the accepted types); a 4-D uint8 tensor
                ``(B, 3, H, W)`` or array ``(B, H, W, 3)`` is a batch.

        Returns:
            one entry per image, in order: a result (one head) or ``{head_name: result}`` (several heads).
        """
        items = _as_list(images)
        out: list[Result | dict[str, Result]] = []
        windowed = self.seg_window is not None and "semantic" in self.kinds.values()  # tiles need full resolution
        min_side = max(int(v) for v in self.spec.input_size) if self.fast_decode and not windowed else None
        for start in range(0, len(items), self.batch_size):
            decoded = [_decode(x, min_side) for x in items[start:start + self.batch_size]]
            out.extend(self._predict_arrays([a for a, _ in decoded], [hw for _, hw in decoded]))
        return out

    def predict_one(self, image: ImageInput) -> Result | dict[str, Result]:
        """:meth:`__call__` for a single image, returning its result rather than a one-element list."""
        return self([image])[0]

    def _predict_arrays(self, arrays: list[np.ndarray], orig_sizes: list[tuple[int, int]] | None = None
                        ) -> list[Result | dict[str, Result]]:
        sizes = orig_sizes or [a.shape[:2] for a in arrays]
        windowed = [n for n in self.heads if self.seg_window is not None and self.kinds[n] == "semantic"]
        rest = [n for n in self.heads if n not in windowed]
        per_head: dict[str, list[Result]] = {}
        with torch.inference_mode():
            if rest:
                # Images are batched only with images of the same padded size, so that no image's result depends
                # on which others share its call (padding would otherwise enter normalisation layers and borders).
                for idx in self._size_groups(sizes):
                    batch, infos = self.preprocess([arrays[i] for i in idx], [sizes[i] for i in idx])
                    raw = self.model(batch, heads=rest)
                    for name in rest:
                        res = self._postprocess(name, raw[name], infos)
                        slot = per_head.setdefault(name, [None] * len(arrays))  # type: ignore[list-item]
                        for i, r in zip(idx, res):
                            slot[i] = r
            for name in windowed:
                per_head[name] = [self._sliding_semantic(name, arr) for arr in arrays]
        if len(self.heads) == 1:
            return per_head[self.heads[0]]
        return [{name: per_head[name][i] for name in self.heads} for i in range(len(arrays))]

    def _size_groups(self, sizes: list[tuple[int, int]]) -> list[list[int]]:
        """Indices of images of ``(H, W)`` ``sizes`` grouped by the padded input size each gets (order kept)."""
        s = self.spec
        d = max(1, int(s.size_divisor))
        groups: dict[tuple[int, int], list[int]] = {}
        for i, hw in enumerate(sizes):
            h, w = compute_resize(hw, s.input_size, s.resize).size
            groups.setdefault(((h + d - 1) // d, (w + d - 1) // d), []).append(i)
        return list(groups.values())

    def _postprocess(self, name: str, raw: Any, infos: list[ResizeInfo]) -> list[Result]:
        return self.model.heads[name].postprocess(raw, infos, **self.options[name])

    def _sliding_semantic(self, name: str, arr: np.ndarray) -> SemanticSegmentation:
        """One image at its original resolution, from overlapping ``seg_window`` tiles (logits averaged)."""
        from zoo.heads.segmentation.inference import sliding_window_logits

        s = self.spec
        pixels = torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1).float().div_(255.0)
        image = normalize(pixels, s.mean, s.std).unsqueeze(0).to(self.device)
        head = self.model.heads[name]

        def logits_fn(tiles: torch.Tensor) -> Any:
            return self.model(tiles, heads=[name])[name]

        full = sliding_window_logits(logits_fn, image, self.seg_window, self.seg_stride,
                                     num_classes=getattr(head, "num_classes", None))
        [pred] = head.predict(full, [tuple(full.shape[-2:])])
        return SemanticSegmentation(mask=pred["mask"].long().cpu(), class_names=self.class_names(name))

    def __repr__(self) -> str:
        s = self.spec
        return (f"Predictor({s.backbone.get('name')}, heads={self.kinds}, input_size={s.input_size}, "
                f"resize={s.resize!r}, device={self.device}, batch_size={self.batch_size}"
                + (f", seg_window={self.seg_window}, seg_stride={self.seg_stride}" if self.seg_window else "") + ")")
