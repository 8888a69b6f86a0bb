"""COCO-format datasets for every task: one reader, task-specific targets.

:class:`CocoIndex` reads a COCO instances json with pycocotools, validates it, and maps COCO's (non-contiguous)
category ids to contiguous labels ``0..K-1`` and back. :class:`CocoDataset` turns an index into samples for a task:

=============== ==============================================================================================
``classification`` single label: category of the largest non-crowd object (images without one are skipped)
``multilabel``     multi-hot over categories present (crowd included), images without objects give all zeros
``detection``      boxes (xyxy), labels, iscrowd; crowd and empty images kept
``semantic``       per-pixel class map, 255 where crowd regions or ``ignore`` lie, background = class 0
``instance``       detection targets + one binary mask per box
``captions``       one caption string (``captions_<split>.json`` beside the instances json, else written from the
                   annotations: :func:`zoo.generation.captions.record_caption`)
=============== ==============================================================================================
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import numbers
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from zoo.preprocess import (IGNORE_INDEX, ResizeInfo, check_decodable, compute_resize, decode_rgb_reduced, normalize,
                            reduced_size, resize_boxes, resize_image, resize_mask, subsample_to)

log = logging.getLogger(__name__)

__all__ = ["CocoIndex", "CocoDataset", "ImageRecord", "BadAnnotationError", "TARGET_FORMATS", "load_rgb", "load_rgb_reduced"]

TARGET_FORMATS = ("classification", "multilabel", "detection", "semantic", "instance", "captions")


class BadAnnotationError(ValueError):
    """An annotation or image entry that cannot be used; the message names it and how to proceed."""


def load_rgb(path: str | Path) -> np.ndarray:
    """Read an image file as an ``(H, W, 3)`` uint8 RGB array; a clear error for missing or corrupt files."""
    return load_rgb_reduced(path, None)[0]


def load_rgb_reduced(path: str | Path, min_side: int | None) -> tuple[np.ndarray, int, tuple[int, int]]:
    """:func:`load_rgb` with libjpeg's 1/2, 1/4, 1/8 reduction when both sides stay >= ``min_side``
    (:func:`zoo.preprocess.decode_rgb_reduced`); returns ``(image, r, full (H, W))``."""
    path = Path(path)
    try:
        return decode_rgb_reduced(path, str(path), min_side)
    except FileNotFoundError:
        raise FileNotFoundError(f"image file {path} does not exist (check data.root and the split names)") from None
    except ValueError as err:
        raise BadAnnotationError(f"{err}; delete or replace the file, or remove its entry from the annotation "
                                 "json") from err


def _is_xywh(bbox: Any) -> bool:
    """A COCO box: a list of 4 finite numbers (strings, booleans, None, NaN are malformed)."""
    return (isinstance(bbox, (list, tuple)) and len(bbox) == 4
            and all(isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v) for v in bbox))


def _sorted_ids(ids) -> list:
    ids = list(ids)
    try:
        return sorted(ids)
    except TypeError:  # mixed id types
        return sorted(ids, key=repr)


def _few(ids: Sequence[Any], n: int = 5) -> str:
    """``[1, 2, 3, 4, 5, ...]``: the first ``n`` ids, for messages."""
    ids = list(ids)
    return "[" + ", ".join(repr(i) for i in ids[:n]) + (", ..." if len(ids) > n else "") + "]"


@dataclass
class ImageRecord:
    """One image and its usable annotations (boxes in original pixels, xyxy)."""

    image_id: int
    file: Path
    height: int
    width: int
    boxes: np.ndarray  # (N, 4) float32 xyxy
    labels: np.ndarray  # (N,) int64 contiguous
    iscrowd: np.ndarray  # (N,) bool
    areas: np.ndarray  # (N,) float32
    ann_ids: np.ndarray  # (N,) int64
    extra: list[dict[str, Any]] = field(default_factory=list)  # per annotation: non-standard fields (e.g. identity)


class CocoIndex:
    """A validated view of a COCO instances json.

    Args:
        ann_file: path to the json (``instances_<split>.json``).
        images_dir: folder holding the image files named in ``images[].file_name``.
        on_bad: ``"raise"`` stops at the first bad entry with a message naming it; ``"skip"`` drops bad annotations
            (and images whose file is missing), counts them per reason and logs the counts.
        min_box_size: boxes whose width or height (after clipping to the image) is below this many pixels are
            dropped as degenerate (counted, never an error).
        check_files: verify every image file exists when the index is built.
        verify_images: also decode every image file when the index is built (JPEGs at 1/8 scale, see
            :func:`zoo.preprocess.check_decodable`); undecodable ones are bad entries like missing files (reason
            ``"corrupt image files"``), so that with ``on_bad="skip"`` no DataLoader worker meets them later.

    Entries that cannot be used are refused (``on_bad="raise"``) or dropped and counted per reason in
    :attr:`skipped` (``on_bad="skip"``; the first few messages per reason are kept in :attr:`examples`): duplicate
    image ids (every entry of the id), duplicate annotation ids (every annotation of the id), annotations whose
    ``image_id`` is not in ``images``, unknown category ids, malformed / negative-size / outside boxes, images
    without size, missing (and, with ``verify_images``, undecodable) image files.
    """

    #: how many messages per reason :attr:`examples` keeps
    MAX_EXAMPLES = 5

    def __init__(self, ann_file: str | Path, images_dir: str | Path, *, on_bad: str = "raise",
                 min_box_size: float = 1.0, check_files: bool = True, verify_images: bool = False) -> None:
        from pycocotools.coco import COCO

        self.ann_file = Path(ann_file)
        self.images_dir = Path(images_dir)
        if on_bad not in ("raise", "skip"):
            raise ValueError(f"on_bad must be 'raise' or 'skip', got {on_bad!r}")
        if not self.ann_file.is_file():
            raise FileNotFoundError(f"COCO annotation file {self.ann_file} does not exist: check data.root "
                                    "(expected <root>/annotations/instances_<split>.json)")
        if not self.images_dir.is_dir():
            raise FileNotFoundError(f"image folder {self.images_dir} does not exist: check data.root and the split")
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                self.coco = COCO(str(self.ann_file))
        except (json.JSONDecodeError, KeyError, TypeError, AssertionError) as err:
            raise BadAnnotationError(f"{self.ann_file} is not a valid COCO instances json: {err!r}") from err
        if "images" not in self.coco.dataset:
            raise BadAnnotationError(
                f"{self.ann_file} has no \"images\" key (it has {sorted(self.coco.dataset)[:10]}): a COCO instances "
                "json needs an \"images\" list (id, file_name, width, height) beside \"annotations\" and "
                "\"categories\"; check that this is the instances json of the split, not e.g. a captions, panoptic "
                "or results file")
        self.on_bad = on_bad
        self.min_box_size = float(min_box_size)
        self.skipped: dict[str, int] = {}
        self.examples: dict[str, list[str]] = {}
        cats = sorted(self.coco.loadCats(self.coco.getCatIds()), key=lambda c: c["id"])
        if not cats:
            raise BadAnnotationError(f"{self.ann_file} has no categories")
        self.cat_ids: list[int] = [int(c["id"]) for c in cats]
        self.class_names: list[str] = [str(c["name"]) for c in cats]
        self.cat_id_to_label = {cid: i for i, cid in enumerate(self.cat_ids)}
        self.label_to_cat_id = dict(enumerate(self.cat_ids))
        dup_img_ids = self._check_ids()
        self.records: list[ImageRecord] = []
        for img_id in sorted(self.coco.getImgIds()):
            if img_id in dup_img_ids:
                continue
            rec = self._build_record(img_id, check_files, verify_images)
            if rec is not None:
                self.records.append(rec)
        if self.skipped:
            log.warning("%s: skipped %s (data.on_bad_annotation=skip)", self.ann_file.name,
                        ", ".join(f"{n} {k}" for k, n in sorted(self.skipped.items())))
        if not any(len(r.boxes) for r in self.records):
            n_raw = len(self.coco.dataset.get("annotations") or [])
            log.warning("%s: no image has annotations (%s): training on it learns no objects and detection / "
                        "segmentation evaluation scores mAP -1; check that this is the annotation file you meant",
                        self.ann_file.name, "the json's annotations list is empty" if not n_raw else
                        f"none of its {n_raw} annotations is usable, see the skip counts")

    @property
    def num_classes(self) -> int:
        return len(self.cat_ids)

    def _bad(self, reason: str, message: str, count: int = 1) -> None:
        if self.on_bad == "raise":
            raise BadAnnotationError(f"{self.ann_file}: {message}. Fix the annotation, or set "
                                     "data.on_bad_annotation=skip to drop such entries (they are counted and logged).")
        self.skipped[reason] = self.skipped.get(reason, 0) + count
        ex = self.examples.setdefault(reason, [])
        if len(ex) < self.MAX_EXAMPLES:
            ex.append(message)

    def _check_ids(self) -> set:
        """Check the raw json lists (pycocotools' dicts keyed by id hide duplicates): duplicate image ids, duplicate
        annotation ids, annotations of images not in ``images``. Returns the image ids to drop; the annotation ids
        to drop are kept in ``self._drop_ann_ids``."""
        raw_imgs = self.coco.dataset.get("images") or []
        raw_anns = self.coco.dataset.get("annotations") or []
        img_count = Counter(img["id"] for img in raw_imgs)
        dup_imgs = _sorted_ids(i for i, n in img_count.items() if n > 1)
        if dup_imgs:
            n = sum(img_count[i] for i in dup_imgs)
            self._bad("duplicate image ids", f"image ids {_few(dup_imgs)} appear more than once in images[] "
                      f"({len(dup_imgs)} ids, {n} entries): their annotations cannot be told apart and would be "
                      "attached to one of the files; give every image entry a unique id and point each "
                      "annotation's image_id at the right one", count=n)
        ann_count = Counter(ann["id"] for ann in raw_anns)
        dup_anns = _sorted_ids(i for i, n in ann_count.items() if n > 1)
        if dup_anns:
            n = sum(ann_count[i] for i in dup_anns)
            self._bad("duplicate annotation ids", f"annotation ids {_few(dup_anns)} appear more than once in "
                      f"annotations[] ({len(dup_anns)} ids, {n} annotations): masks are looked up by id, so these "
                      "would get another annotation's mask; renumber annotations[].id so every id is unique",
                      count=n)
        self._drop_ann_ids = set(dup_anns)
        orphans = [a for a in raw_anns if a.get("image_id") not in img_count and a["id"] not in self._drop_ann_ids]
        if orphans:
            self._bad("annotations of unknown images", f"{len(orphans)} annotations (ids "
                      f"{_few([a['id'] for a in orphans])}) have an image_id "
                      f"({_few(_sorted_ids({a.get('image_id') for a in orphans}))}) that is not in images[]; add the "
                      "missing image entries, or remove those annotations", count=len(orphans))
        return set(dup_imgs)

    def _build_record(self, img_id: int, check_files: bool, verify_images: bool = False) -> ImageRecord | None:
        info = self.coco.imgs[img_id]
        file = self.images_dir / info["file_name"]
        if check_files and not file.is_file():
            self._bad("missing image files", f"image id {img_id}: file {file} does not exist")
            return None
        if verify_images:
            try:
                check_decodable(file, str(file))
            except FileNotFoundError:
                self._bad("missing image files", f"image id {img_id}: file {file} does not exist")
                return None
            except ValueError as err:
                self._bad("corrupt image files", f"image id {img_id}: {err}; delete or replace the file, or remove "
                          "its entry from images[]")
                return None
        W, H = int(info.get("width", 0)), int(info.get("height", 0))
        if W <= 0 or H <= 0:
            self._bad("images without size", f"image id {img_id} ({info['file_name']}) has no valid width/height")
            return None
        boxes, labels, crowd, areas, ann_ids, extra = [], [], [], [], [], []
        for ann in self.coco.imgToAnns.get(img_id, []):
            if ann["id"] in self._drop_ann_ids:
                continue
            cid = ann.get("category_id")
            if cid not in self.cat_id_to_label:
                self._bad("unknown category ids", f"annotation id {ann.get('id')} (image {img_id}) has category_id "
                          f"{cid}, which is not in the json's categories {self.cat_ids[:10]}...")
                continue
            bbox = ann.get("bbox")
            if not _is_xywh(bbox):
                self._bad("malformed boxes", f"annotation id {ann.get('id')} (image {img_id}) has bbox {bbox!r}; "
                          "expected [x, y, width, height]")
                continue
            x, y, w, h = (float(v) for v in bbox)
            if w < 0 or h < 0:
                self._bad("negative-size boxes", f"annotation id {ann.get('id')} (image {img_id}) has negative "
                          f"width/height in bbox {bbox}")
                continue
            x1, y1, x2, y2 = max(0.0, x), max(0.0, y), min(float(W), x + w), min(float(H), y + h)
            if x2 <= x1 or y2 <= y1:
                if w > 0 and h > 0 and (x >= W or y >= H or x + w <= 0 or y + h <= 0):
                    self._bad("boxes outside the image", f"annotation id {ann.get('id')} (image {img_id}, "
                              f"{W}x{H}) has bbox {bbox} entirely outside the image")
                    continue
            if (x2 - x1) < self.min_box_size or (y2 - y1) < self.min_box_size:
                self.skipped["degenerate boxes"] = self.skipped.get("degenerate boxes", 0) + 1
                continue
            boxes.append([x1, y1, x2, y2])
            labels.append(self.cat_id_to_label[cid])
            crowd.append(bool(ann.get("iscrowd", 0)))
            areas.append(float(ann.get("area", w * h)))
            ann_ids.append(int(ann.get("id", -1)))
            extra.append({k: v for k, v in ann.items() if k not in
                          ("segmentation", "bbox", "area", "iscrowd", "image_id", "category_id", "id")})
        return ImageRecord(
            image_id=int(img_id), file=file, height=H, width=W,
            boxes=np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
            labels=np.asarray(labels, dtype=np.int64), iscrowd=np.asarray(crowd, dtype=bool),
            areas=np.asarray(areas, dtype=np.float32), ann_ids=np.asarray(ann_ids, dtype=np.int64), extra=extra,
        )

    # ------------------------------------------------------------------ masks
    def ann_mask(self, ann_id: int) -> np.ndarray:
        """Binary ``(H, W)`` uint8 mask of one annotation (polygons or RLE)."""
        return self.coco.annToMask(self.coco.anns[int(ann_id)])

    def semantic_mask(self, rec: ImageRecord, *, background: bool = True) -> np.ndarray:
        """``(H, W)`` uint8 class map: ``label + 1`` per object pixel when ``background`` (0 = background), crowd
        regions 255 (ignored). Later (smaller) objects are painted over larger ones."""
        out = np.zeros((rec.height, rec.width), dtype=np.uint8)
        order = np.argsort(-rec.areas, kind="stable")
        crowd_px = np.zeros_like(out, dtype=bool)
        for i in order:
            m = self.ann_mask(rec.ann_ids[i]).astype(bool)
            if rec.iscrowd[i]:
                crowd_px |= m
            else:
                out[m] = rec.labels[i] + (1 if background else 0)
        out[crowd_px] = IGNORE_INDEX
        return out

    def primary_label(self, rec: ImageRecord) -> int | None:
        """Label of the largest non-crowd object (by annotated area), ``None`` if there is none."""
        keep = ~rec.iscrowd
        if not keep.any():
            return None
        idx = np.flatnonzero(keep)[int(np.argmax(rec.areas[keep]))]
        return int(rec.labels[idx])


class CocoDataset(Dataset):
    """Samples for one task from a :class:`CocoIndex`.

    Each sample is a dict: ``image`` ``(3, h, w)`` float normalised, ``target`` (task specific, see module docs),
    ``image_id``, ``orig_size`` ``(H, W)``, ``size`` ``(h, w)`` after resizing.

    Args:
        index: the validated COCO index.
        target: one of :data:`TARGET_FORMATS`, or several (a dataset feeding several heads): samples then carry
            ``targets`` ``{format: target}`` built from the same augmented image, so every target stays aligned;
            ``classification`` is then ``-100`` (ignored) for images without a non-crowd object instead of
            dropping them, and ``detection`` is left out when ``instance`` (its superset) is asked for too.
        input_size, resize, mean, std: the model's preprocessing (see :class:`zoo.models.ModelSpec`).
        augment: optional albumentations ``Compose`` applied to the original-resolution image (and boxes / masks)
            before the deterministic resize; ``None`` at evaluation.
        image_ids: restrict to these image ids.
        train_sizes: multi-scale training: each sample is resized to a size drawn from this list (each entry an
            int or ``[h, w]``; with ``resize="longest"`` only the longest side matters) instead of ``input_size``.
    """

    def __init__(self, index: CocoIndex, target: str, *, input_size: Sequence[int], resize: str = "stretch",
                 mean: Sequence[float], std: Sequence[float], augment: Callable | None = None,
                 image_ids: Sequence[int] | None = None, train_sizes: Sequence[Any] | None = None) -> None:
        formats = (target,) if isinstance(target, str) else tuple(dict.fromkeys(target))
        for f in formats:
            if f not in TARGET_FORMATS:
                raise ValueError(f"target format {f!r} unknown; use one of {TARGET_FORMATS}")
        if "instance" in formats and "detection" in formats:
            formats = tuple(f for f in formats if f != "detection")
        self.index = index
        self.formats = formats
        self.multi = not isinstance(target, str)
        self.target = target if isinstance(target, str) else formats[0]
        self.input_size = tuple(int(s) for s in input_size)
        self.resize = resize
        self.mean, self.std = list(mean), list(std)
        self.augment = augment
        self.train_sizes = [(int(t), int(t)) if isinstance(t, (int, float)) else (int(t[0]), int(t[1]))
                            for t in (train_sizes or [])]
        recs = index.records
        if image_ids is not None:
            wanted = set(int(i) for i in image_ids)
            recs = [r for r in recs if r.image_id in wanted]
        if target == "classification" and not self.multi:
            n0 = len(recs)
            recs = [r for r in recs if index.primary_label(r) is not None]
            if n0 - len(recs):
                log.info("%s: %d images without a non-crowd object are not used for single-label classification",
                         index.ann_file.name, n0 - len(recs))
        self.records = recs

    @property
    def class_names(self) -> list[str]:
        return self.index.class_names

    def __len__(self) -> int:
        return len(self.records)

    def padded_sizes(self, size_divisor: int) -> list[tuple[int, int]]:
        """The padded input size of every sample at evaluation (no augmentation): for size-grouped batches."""
        d = max(1, int(size_divisor))
        out = []
        for r in self.records:
            h, w = compute_resize((r.height, r.width), self.input_size, self.resize).size
            out.append(((h + d - 1) // d * d, (w + d - 1) // d * d))
        return out

    def labels(self) -> list[int]:
        """Single-label targets of every sample (for samplers), classification format only."""
        return [int(self.index.primary_label(r)) for r in self.records]

    #: decode JPEGs at 1/2, 1/4 or 1/8 scale when both sides stay >= this many pixels (None: full size); set by the
    #: data module from the model's input size and the augmentation (``data.fast_decode``)
    decode_min_side: int | None = None

    #: ``data.decode_on=device``: the augmentation plan drawn per sample (:mod:`zoo.data.device_decode`); samples
    #: then carry the file's bytes instead of a decoded image (set by the data module)
    device_plan: Any = None

    def __getitem__(self, i: int) -> dict[str, Any]:
        rec = self.records[i]
        if self.device_plan is not None:
            return self.encoded_sample(rec)
        img, r, _ = load_rgb_reduced(rec.file, self.decode_min_side)
        return self.make_sample(rec, img, reduction=r)

    def encoded_sample(self, rec: ImageRecord) -> dict[str, Any]:
        """The sample of ``rec`` for decoding on the device: the file's bytes (``encoded``), the crop ``window`` and
        ``flip`` drawn from :attr:`device_plan`, and targets already cropped, flipped and resized to the output
        size (:func:`zoo.data.device_decode.decode_batch` does the same to the pixels)."""
        from zoo.data.device_decode import crop_flip_boxes, crop_flip_mask, draw_window, encoded_image

        data, hw = encoded_image(rec.file)
        if hw != (rec.height, rec.width):
            raise BadAnnotationError(f"{rec.file} is {hw[1]}x{hw[0]} but the json says {rec.width}x{rec.height}: fix "
                                     f"images[].width/height for image id {rec.image_id}")
        plan = self.device_plan
        window, flip = draw_window(rec.height, rec.width, plan)
        boxes, labels, crowd = rec.boxes, rec.labels, rec.iscrowd
        sem = self.index.semantic_mask(rec) if "semantic" in self.formats else None
        masks = [self.index.ann_mask(a) for a in rec.ann_ids] if "instance" in self.formats else None
        if flip or window != (0, 0, rec.height, rec.width):
            boxes, keep = crop_flip_boxes(boxes, window, flip, min_visibility=plan.min_visibility,
                                          min_area=plan.min_area)
            labels, crowd = np.asarray(labels)[keep], np.asarray(crowd)[keep]
            masks = [crop_flip_mask(masks[j], window, flip) for j in keep] if masks is not None else None
            sem = crop_flip_mask(sem, window, flip) if sem is not None else None
        size = self.input_size
        if self.train_sizes and not plan.identity:
            size = self.train_sizes[int(np.random.randint(len(self.train_sizes)))]
        info = compute_resize(window[2:], size, self.resize)
        sample: dict[str, Any] = {"encoded": data, "window": window, "flip": flip, "image_id": rec.image_id,
                                  "orig_size": (rec.height, rec.width), "size": info.size,
                                  "scale": (info.scale_y, info.scale_x)}
        return self._with_targets(sample, rec, boxes, labels, crowd, masks, sem, info)

    def make_sample(self, rec: ImageRecord, img: np.ndarray, *, reduction: int = 1) -> dict[str, Any]:
        """The sample of record ``rec`` from its decoded ``(H, W, 3)`` uint8 image (augmented when this dataset
        augments): what :meth:`__getitem__` returns, also used by readers that get the image elsewhere (shards,
        :mod:`zoo.data.shards`). ``reduction``: the image was decoded at ``1/reduction`` of the record's size.
        Without augmentation only the pixels' source changes (sizes, scales, boxes and masks are the full-size
        image's); augmentation runs on the reduced image, with boxes and masks brought to it."""
        r = int(reduction)
        if img.shape[:2] != reduced_size((rec.height, rec.width), r):
            raise BadAnnotationError(f"{rec.file} is {img.shape[1] * r}x{img.shape[0] * r} but the json says "
                                     f"{rec.width}x{rec.height}: fix images[].width/height for image id {rec.image_id} "
                                     "(if the file carries an EXIF Orientation tag, its width/height are those of "
                                     "the rotated image, as photo viewers show it)")
        boxes, labels, crowd = rec.boxes, rec.labels, rec.iscrowd
        masks = None
        sem = None
        if "semantic" in self.formats:
            sem = self.index.semantic_mask(rec)
        if "instance" in self.formats:
            masks = [self.index.ann_mask(a) for a in rec.ann_ids]
        geometry = (rec.height, rec.width)  # the size boxes, masks and the resize refer to
        if self.augment is not None:
            if r > 1:
                boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4) / r
                sem = subsample_to(sem, r, img.shape[:2]) if sem is not None else None
                masks = [subsample_to(m, r, img.shape[:2]) for m in masks] if masks is not None else None
            img, boxes, labels, crowd, masks, sem = self._augment(img, boxes, labels, crowd, masks, sem)
            geometry = img.shape[:2]
        else:
            r = 1  # the reduced image is resized straight to the full-size geometry's input size
        size = self.input_size
        if self.train_sizes:
            size = self.train_sizes[int(np.random.randint(len(self.train_sizes)))]
        info = compute_resize(geometry, size, self.resize)
        image = normalize(resize_image(img, info), self.mean, self.std)
        sample: dict[str, Any] = {"image": image, "image_id": rec.image_id, "orig_size": (rec.height, rec.width),
                                  "size": info.size, "scale": (info.scale_y / r, info.scale_x / r)}
        return self._with_targets(sample, rec, boxes, labels, crowd, masks, sem, info)

    def _with_targets(self, sample: dict[str, Any], rec: ImageRecord, boxes, labels, crowd, masks, sem,
                      info: ResizeInfo) -> dict[str, Any]:
        """``sample`` with the target of every format (``targets``) or of the one format (``target``)."""
        targets = {f: self._target(f, rec, boxes, labels, crowd, masks, sem, info) for f in self.formats}
        if self.multi:
            sample["targets"] = targets
        else:
            sample["target"] = targets[self.target]
        return sample

    def _target(self, fmt: str, rec: ImageRecord, boxes, labels, crowd, masks, sem, info: ResizeInfo) -> Any:
        """One format's target for an (augmented) image resized by ``info``."""
        if fmt == "captions":  # a caption string (zoo.generation.captions); the generation head tokenises it
            from zoo.generation.captions import record_caption

            return record_caption(self.index, rec)
        if fmt == "classification":
            label = self.index.primary_label(rec)  # of the annotation, as in evaluation
            return torch.tensor(-100 if label is None else label, dtype=torch.long)
        if fmt == "multilabel":
            t = torch.zeros(self.index.num_classes)
            t[torch.as_tensor(rec.labels, dtype=torch.long)] = 1.0
            return t
        if fmt == "semantic":
            return resize_mask(torch.from_numpy(np.ascontiguousarray(sem)).long(), info.size)
        tgt = {"boxes": resize_boxes(torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4), info),
               "labels": torch.as_tensor(labels, dtype=torch.long),
               "iscrowd": torch.as_tensor(crowd, dtype=torch.bool)}
        if fmt == "instance":
            if masks:
                m = torch.from_numpy(np.stack(masks).astype(np.uint8))
                tgt["masks"] = resize_mask(m, info.size)
            else:
                tgt["masks"] = torch.zeros((0, *info.size), dtype=torch.uint8)
        return tgt

    def _augment(self, img, boxes, labels, crowd, masks, sem):
        """Run the albumentations pipeline, keeping each box with its label, crowd flag and mask."""
        kwargs: dict[str, Any] = {"image": img}
        has_boxes = "detection" in self.formats or "instance" in self.formats
        if has_boxes:
            kwargs["bboxes"] = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
            kwargs["box_index"] = np.arange(len(boxes))
        if masks is not None:
            kwargs["masks"] = masks
        if sem is not None:
            kwargs["mask"] = sem
        out = self.augment(**kwargs)
        img = out["image"]
        if has_boxes:
            idx = np.asarray(out["box_index"], dtype=np.int64).reshape(-1)
            boxes = np.asarray(out["bboxes"], dtype=np.float32).reshape(-1, 4)
            labels, crowd = labels[idx], crowd[idx]
            if masks is not None:
                masks = [out["masks"][j] for j in idx]
        if sem is not None:
            sem = out["mask"]
        return img, boxes, labels, crowd, masks, sem
