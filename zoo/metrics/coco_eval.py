"""COCO detection / instance-segmentation metrics with two interchangeable backends.

``evaluate_coco`` scores COCO-format results (boxes or RLE masks) against a COCO ground-truth json with either
`faster-coco-eval <https://github.com/MiXaiLL76/faster_coco_eval>`_ (C++ evaluate/accumulate, the default when it
is installed) or the reference ``pycocotools``. Both backends receive the same normalised inputs, and the 12 summary
numbers are computed here from the accumulated precision/recall arrays with the exact formula of
``pycocotools.cocoeval.COCOeval.summarize`` (which also makes custom ``max_dets`` work; pycocotools' own
``summarize`` hard-codes 100 for AP). The tests check the two backends agree, and agree with pycocotools' own
``summarize``, on the real COCO subsets in ``../shared/data``.

Conventions kept from pycocotools: a summary number is ``-1.0`` when no ground truth falls in its area range;
crowd ground truth (``iscrowd=1``) is ignored rather than counted as a miss. Two deliberate differences:

- results that are empty (or that fall on none of the evaluated images) give all-zero stats and a logged warning
  instead of pycocotools' ``IndexError``;
- for ``iou_type="segm"`` a result's own ``bbox`` is ignored, so a detection's area (used for the small/medium/large
  ranges) is always its mask area. ``pycocotools.COCO.loadRes`` would take ``w * h`` of the box when a result
  carries both (detectron2 drops the box for the same reason).

The results COCO object is built here exactly as ``loadRes`` builds it (ids 1..N, ``iscrowd`` 0, areas), after
validation that names bad image/category ids instead of pycocotools' bare ``AssertionError`` or silent ignore.

Nothing here is on the serving path; the backends are imported lazily so either one alone is enough.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

__all__ = [
    "BACKENDS",
    "IOU_TYPES",
    "STAT_NAMES",
    "CocoEvalResult",
    "evaluate_coco",
    "fake_results",
    "json_safe_results",
    "load_coco_gt",
    "resolve_backend",
    "results_to_json",
]

#: The 12 numbers of the standard COCO summary, in pycocotools' order. AR1/AR10/AR100 are the average recall at
#: ``max_dets[0]``, ``max_dets[1]`` and ``max_dets[2]`` (1, 10, 100 by default); AP and the area-range numbers use
#: ``max_dets[2]``.
STAT_NAMES: tuple[str, ...] = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
IOU_TYPES: tuple[str, ...] = ("bbox", "segm")
BACKENDS: tuple[str, ...] = ("auto", "faster", "pycocotools")

#: (ap?, IoU threshold or None for 0.50:0.95, area label, index into max_dets) for each of STAT_NAMES.
_SUMMARY_SPEC: tuple[tuple[bool, float | None, str, int], ...] = (
    (True, None, "all", 2),
    (True, 0.5, "all", 2),
    (True, 0.75, "all", 2),
    (True, None, "small", 2),
    (True, None, "medium", 2),
    (True, None, "large", 2),
    (False, None, "all", 0),
    (False, None, "all", 1),
    (False, None, "all", 2),
    (False, None, "small", 2),
    (False, None, "medium", 2),
    (False, None, "large", 2),
)

#: Metric names for training logs (``val/mAP`` ...), see DESIGN.md.
_METRIC_KEYS: dict[str, str] = {
    "AP": "mAP", "AP50": "mAP50", "AP75": "mAP75", "APs": "mAP_small", "APm": "mAP_medium", "APl": "mAP_large",
    "AR1": "mAR1", "AR10": "mAR10", "AR100": "mAR100", "ARs": "mAR_small", "ARm": "mAR_medium", "ARl": "mAR_large",
}


# ----------------------------------------------------------------------------------------------------------------
# result container
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class CocoEvalResult:
    """What ``evaluate_coco`` returns.

    Attributes:
        stats: the 12 summary numbers keyed by ``STAT_NAMES`` (``-1.0`` where no GT lies in that area range).
        per_class_ap: category name -> AP@[.50:.95] (area "all", ``max_dets[2]``); ``nan`` where the category has
            no (non-crowd) ground truth among the evaluated images. Keys follow the GT ``categories`` order; a name
            used by two categories gets `` (id N)`` appended.
        iou_type: ``"bbox"`` or ``"segm"``.
        backend: ``"faster"`` or ``"pycocotools"`` (the one that ran; ``"none"`` for empty results).
        max_dets: the three detection limits per image and category.
        num_images: number of images evaluated.
        timings: seconds spent in ``load_gt``, ``load_results``, ``evaluate``, ``accumulate`` and ``summarize``.
        precision: ``[T, R, K, A, M]`` array from ``accumulate`` (IoU thresholds x 101 recall points x categories
            x area ranges x max_dets), ``-1`` where undefined; ``None`` for empty results.
        recall: ``[T, K, A, M]`` array from ``accumulate``; ``None`` for empty results.
        category_ids: the GT category ids in the order of the ``K`` axis.
    """

    stats: dict[str, float]
    per_class_ap: dict[str, float]
    iou_type: str
    backend: str = ""
    max_dets: tuple[int, int, int] = (1, 10, 100)
    num_images: int = 0
    timings: dict[str, float] = field(default_factory=dict)
    precision: np.ndarray | None = field(default=None, repr=False)
    recall: np.ndarray | None = field(default=None, repr=False)
    category_ids: list[int] = field(default_factory=list, repr=False)

    def summary_lines(self) -> list[str]:
        """The 12 lines pycocotools' ``summarize()`` prints, for these stats.

        Returns:
            12 strings, e.g. ``" Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ] = 0.372"``.
        """
        lines = []
        for name, (is_ap, thr, area, m) in zip(STAT_NAMES, _SUMMARY_SPEC):
            title, kind = ("Average Precision", "(AP)") if is_ap else ("Average Recall", "(AR)")
            iou = "0.50:0.95" if thr is None else f"{thr:0.2f}"
            lines.append(f" {title:<18} {kind} @[ IoU={iou:<9} | area={area:>6s} | maxDets={self.max_dets[m]:>3d} ]"
                         f" = {self.stats[name]:0.3f}")
        return lines

    def table(self, columns: int = 3) -> str:
        """The standard 12-line COCO summary followed by a per-class AP table.

        Args:
            columns: how many (category, AP) pairs per row of the per-class table.

        Returns:
            Multi-line text; classes without ground truth show ``-``.
        """
        head = f"COCO {self.iou_type} evaluation ({self.backend}, {self.num_images} images)"
        out = [head, *self.summary_lines()]
        if self.per_class_ap:
            width = max(8, *(len(n) for n in self.per_class_ap))
            cells = [f"{n:<{width}} {('-' if math.isnan(v) else f'{v:0.3f}'):>6}" for n, v in self.per_class_ap.items()]
            header = "   ".join([f"{'category':<{width}} {'AP':>6}"] * min(columns, len(cells)))
            out += ["", f"per-class AP@[.50:.95] ({self.iou_type})", header, "-" * len(header)]
            out += ["   ".join(cells[i:i + columns]) for i in range(0, len(cells), columns)]
        return "\n".join(out)

    def to_metrics(self, prefix: str = "val/") -> dict[str, float]:
        """Stats under training-log names (``val/mAP``, ``val/mAP50``, ..., ``val/mAR100``).

        Args:
            prefix: prepended to every key.

        Returns:
            Dict of 12 floats.
        """
        return {f"{prefix}{_METRIC_KEYS[k]}": float(v) for k, v in self.stats.items()}


# ----------------------------------------------------------------------------------------------------------------
# backends and loading
# ----------------------------------------------------------------------------------------------------------------


def resolve_backend(backend: str = "auto") -> str:
    """Pick the evaluation backend.

    Args:
        backend: ``"auto"`` (faster-coco-eval when importable, else pycocotools), ``"faster"`` or ``"pycocotools"``.

    Returns:
        ``"faster"`` or ``"pycocotools"``.

    Raises:
        ValueError: unknown name. ImportError: the requested backend is not installed.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not one of {BACKENDS}")
    if backend in ("auto", "faster"):
        try:
            import faster_coco_eval  # noqa: F401

            return "faster"
        except ImportError:
            if backend == "faster":
                raise ImportError("backend='faster' needs faster-coco-eval: pip install faster-coco-eval "
                                  "(or use backend='pycocotools')") from None
    try:
        import pycocotools  # noqa: F401
    except ImportError:
        raise ImportError("COCO evaluation needs faster-coco-eval or pycocotools: pip install 'zoo[train]'") from None
    return "pycocotools"


def _coco_class(backend: str) -> type:
    if backend == "faster":
        from faster_coco_eval import COCO

        return COCO
    from pycocotools.coco import COCO

    return COCO


def _mask_api(backend: str) -> Any:
    if backend == "faster":
        from faster_coco_eval.core import mask

        return mask
    from pycocotools import mask

    return mask


def _silent(*args: Any, **kwargs: Any) -> None:
    """print_function for faster-coco-eval objects."""


def _copy_dataset(d: Mapping[str, Any]) -> dict[str, Any]:
    """Shallow copy of a COCO dataset dict with copied annotation dicts (the backends write into annotations)."""
    if "images" not in d or "annotations" not in d or "categories" not in d:
        missing = [k for k in ("images", "annotations", "categories") if k not in d]
        raise ValueError(f"ground truth dict lacks {missing}; pass a COCO instances json (images, annotations, "
                         "categories)")
    out = dict(d)
    out["annotations"] = [dict(a) for a in d["annotations"]]
    return out


def _fill_gt_defaults(coco: Any, mask_api: Any) -> None:
    """Give annotations the keys both backends read: ``iscrowd`` (0) and ``area`` (mask area, else box area)."""
    imgs = coco.imgs
    for ann in coco.dataset.get("annotations", []):
        ann.setdefault("iscrowd", 0)
        if "area" not in ann:
            seg = ann.get("segmentation")
            img = imgs.get(ann["image_id"], {})
            if seg and "height" in img and "width" in img:
                ann["area"] = float(mask_api.area(_to_rle(seg, img["height"], img["width"], mask_api)))
            elif "bbox" in ann:
                ann["area"] = float(ann["bbox"][2] * ann["bbox"][3])
            else:
                raise ValueError(f"GT annotation {ann.get('id')} has neither 'area', 'segmentation' nor 'bbox'")


def load_coco_gt(gt: Any, backend: str = "auto") -> Any:
    """Load ground truth as a COCO object of ``backend``.

    Args:
        gt: path to a COCO instances json, a dataset dict (copied: never modified), or a COCO object (pycocotools
            or faster-coco-eval). An object of the chosen backend is used as is (the backends annotate its
            annotations in place, as usual); one of the other backend is rebuilt from its ``dataset``.
        backend: ``"auto"``, ``"faster"`` or ``"pycocotools"``.

    Returns:
        A ``pycocotools.coco.COCO`` or ``faster_coco_eval.COCO`` with its index built.
    """
    backend = resolve_backend(backend)
    cls = _coco_class(backend)
    with contextlib.redirect_stdout(io.StringIO()):
        if isinstance(gt, cls):
            coco = gt
        else:
            if isinstance(gt, (str, Path)):
                p = Path(gt).expanduser()
                if not p.is_file():
                    raise FileNotFoundError(f"ground-truth json {p} does not exist")
                with open(p) as f:
                    data = json.load(f)
            elif isinstance(gt, Mapping):
                data = _copy_dataset(gt)
            elif hasattr(gt, "dataset") and hasattr(gt, "getImgIds"):
                data = _copy_dataset(gt.dataset)
            else:
                raise TypeError("gt must be a json path, a COCO dataset dict or a COCO object, "
                                f"not {type(gt).__name__}")
            coco = cls()
            if backend == "faster":
                coco.print_function = _silent
            coco.dataset = data
            coco.createIndex()
    _fill_gt_defaults(coco, _mask_api(backend))
    return coco


# ----------------------------------------------------------------------------------------------------------------
# results
# ----------------------------------------------------------------------------------------------------------------


def _to_rle(seg: Any, h: int, w: int, mask_api: Any) -> dict[str, Any]:
    """Polygons, uncompressed RLE or compressed RLE -> one compressed RLE dict (``counts`` bytes or str)."""
    if isinstance(seg, Mapping):
        counts = seg.get("counts")
        if isinstance(counts, (list, tuple, np.ndarray)):
            size = seg.get("size") or [h, w]
            return mask_api.frPyObjects(dict(counts=list(map(int, counts)), size=list(size)), size[0], size[1])
        if isinstance(counts, (str, bytes)) and "size" in seg:
            return dict(seg)
        raise ValueError(f"RLE segmentation needs 'counts' (str/bytes/list) and 'size' [h, w], got keys {list(seg)}")
    if isinstance(seg, (list, tuple)) and seg:
        polys = [list(map(float, p)) for p in (seg if isinstance(seg[0], (list, tuple, np.ndarray)) else [seg])]
        polys = [p for p in polys if len(p) >= 6]
        if not polys:
            raise ValueError("polygon segmentation needs at least 3 points (6 numbers) per polygon")
        return mask_api.merge(mask_api.frPyObjects(polys, h, w))
    raise ValueError(f"unsupported segmentation {type(seg).__name__}: give an RLE dict or a list of polygons")


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, bytes):
        return obj.decode("ascii")
    if isinstance(obj, np.ndarray):
        return _json_safe(obj.tolist())
    if isinstance(obj, np.generic):
        return obj.item()
    if hasattr(obj, "tolist") and hasattr(obj, "dim"):  # torch tensor, without importing torch
        return _json_safe(obj.tolist())
    return obj


def json_safe_results(results: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Copy results into plain JSON types: RLE ``counts`` bytes -> ascii str, numpy/torch numbers -> Python.

    Args:
        results: COCO result dicts.

    Returns:
        New list of new dicts; the input is not modified.
    """
    return [_json_safe(r) for r in results]


def results_to_json(results: Iterable[Mapping[str, Any]], path: str | Path) -> Path:
    """Write COCO results to a json file (segm RLE ``counts`` bytes are written as str).

    Args:
        results: COCO result dicts (``image_id``, ``category_id``, ``bbox`` and/or ``segmentation``, ``score``).
        path: file to write; parent folders are created.

    Returns:
        The path written.
    """
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        json.dump(json_safe_results(results), f)
    return path


def _load_results(results: Any) -> list[Mapping[str, Any]]:
    if isinstance(results, (str, Path)):
        p = Path(results).expanduser()
        if not p.is_file():
            raise FileNotFoundError(f"results json {p} does not exist")
        with open(p) as f:
            results = json.load(f)
    if isinstance(results, Mapping) and "annotations" in results:
        results = results["annotations"]
    if not isinstance(results, (list, tuple)):
        raise TypeError(f"results must be a json path or a list of result dicts, not {type(results).__name__}")
    return list(results)


def _prepare_results(raw: Sequence[Mapping[str, Any]], coco_gt: Any, iou_type: str,
                     mask_api: Any) -> list[dict[str, Any]]:
    """Validate and normalise results into fresh dicts both backends read the same way."""
    geometry = "bbox" if iou_type == "bbox" else "segmentation"
    img_ids, cat_ids, imgs = set(coco_gt.imgs), set(coco_gt.cats), coco_gt.imgs
    bad_imgs: set[Any] = set()
    bad_cats: set[Any] = set()
    out: list[dict[str, Any]] = []
    for i, r in enumerate(raw):
        try:
            img_id, cat_id, score, geo = int(r["image_id"]), int(r["category_id"]), float(r["score"]), r[geometry]
        except (KeyError, TypeError) as e:
            if not isinstance(r, Mapping):
                raise TypeError(f"result #{i} is a {type(r).__name__}, expected a dict") from None
            missing = [k for k in ("image_id", "category_id", geometry, "score") if k not in r]
            raise ValueError(f"result #{i} lacks {missing} (has {sorted(r)}); {iou_type} results need image_id, "
                             f"category_id, {geometry}{' [x, y, w, h]' if geometry == 'bbox' else ' (RLE)'} and "
                             "score") from e
        if img_id not in img_ids:
            bad_imgs.add(img_id)
            continue
        if cat_id not in cat_ids:
            bad_cats.add(cat_id)
            continue
        d: dict[str, Any] = {"image_id": img_id, "category_id": cat_id, "score": score}
        if iou_type == "bbox":
            box = [float(v) for v in (geo if isinstance(geo, list) else _json_safe(geo))]
            if len(box) != 4:
                raise ValueError(f"result #{i}: bbox must be [x, y, w, h] (4 numbers), got {len(box)}")
            d["bbox"] = box
        else:
            counts = geo.get("counts") if isinstance(geo, Mapping) else None
            if isinstance(counts, (str, bytes)) and "size" in geo:  # compressed RLE: the usual case
                size = geo["size"]
            else:
                img = imgs[img_id]
                rle = _to_rle(geo, img["height"], img["width"], mask_api)
                counts, size = rle["counts"], rle["size"]
            d["segmentation"] = {"size": [int(size[0]), int(size[1])],
                                 "counts": counts.decode("ascii") if isinstance(counts, bytes) else counts}
        out.append(d)
    if bad_imgs or bad_cats:
        msg = []
        if bad_imgs:
            msg.append(f"image_id(s) {sorted(bad_imgs)[:10]}{' ...' if len(bad_imgs) > 10 else ''} "
                       f"({len(bad_imgs)} in all) are not in the ground truth ({len(img_ids)} images); evaluate "
                       "against the annotation file the predictions were made for")
        if bad_cats:
            known = f"{sorted(cat_ids)[:10]}{' ...' if len(cat_ids) > 10 else ''}"
            msg.append(f"category_id(s) {sorted(bad_cats)[:10]}{' ...' if len(bad_cats) > 10 else ''} are not "
                       f"among the ground-truth category ids {known}; "
                       "map the model's contiguous labels back to COCO ids first, e.g. "
                       "category_id = sorted(coco.getCatIds())[label]")
        raise ValueError("results do not match the ground truth: " + "; ".join(msg))
    return out


def _fast_mask_api(backend: str) -> Any:
    """Mask API for per-RLE area/box: pycocotools' is ~4x quicker per call than faster-coco-eval's, and the
    numbers are integers/pixel bounds, identical in both."""
    try:
        from pycocotools import mask

        return mask
    except ImportError:
        return _mask_api(backend)


def _results_coco(coco_gt: Any, dets: list[dict[str, Any]], iou_type: str, backend: str) -> Any:
    """Results COCO object, built as ``COCO.loadRes`` builds it (ids 1..N, iscrowd 0, area = box ``w * h`` for bbox
    results and the mask area for segm results, segm box from the mask) from already validated ``dets``."""
    res = type(coco_gt)()
    if backend == "faster":
        res.print_function = _silent
    if iou_type == "bbox":
        for i, d in enumerate(dets, start=1):
            b = d["bbox"]
            d["area"] = b[2] * b[3]
            d["id"] = i
            d["iscrowd"] = 0
    else:
        api = _fast_mask_api(backend)
        for i, d in enumerate(dets, start=1):
            seg = d["segmentation"]
            d["area"] = float(api.area(seg))
            d["bbox"] = [float(v) for v in api.toBbox(seg)]
            d["id"] = i
            d["iscrowd"] = 0
    res.dataset = {"info": dict(coco_gt.dataset.get("info", {})), "images": list(coco_gt.dataset["images"]),
                   "categories": [dict(c) for c in coco_gt.dataset["categories"]], "annotations": dets}
    res.createIndex()
    return res


# ----------------------------------------------------------------------------------------------------------------
# evaluation
# ----------------------------------------------------------------------------------------------------------------


def _mean_valid(s: np.ndarray) -> float:
    v = s[s > -1]
    return float(np.mean(v)) if v.size else -1.0


def _summarize(precision: np.ndarray, recall: np.ndarray, iou_thrs: np.ndarray,
               area_labels: Sequence[str]) -> dict[str, float]:
    """The 12 COCO numbers from accumulated arrays, as pycocotools' ``summarize`` computes them.

    Args:
        precision: ``[T, R, K, A, M]``. recall: ``[T, K, A, M]``. iou_thrs: ``[T]``. area_labels: ``A`` labels.

    Returns:
        Dict keyed by ``STAT_NAMES``.
    """
    stats = {}
    for name, (is_ap, thr, area, m) in zip(STAT_NAMES, _SUMMARY_SPEC):
        a = list(area_labels).index(area)
        s = precision[..., a, m] if is_ap else recall[..., a, m]
        if thr is not None:
            s = s[np.isclose(iou_thrs, thr)]
        stats[name] = _mean_valid(s)
    return stats


def _category_names(coco_gt: Any, cat_ids: Sequence[int]) -> list[str]:
    names = [str(coco_gt.cats[c].get("name", c)) for c in cat_ids]
    seen: dict[str, int] = {}
    for n in names:
        seen[n] = seen.get(n, 0) + 1
    return [f"{n} (id {c})" if seen[n] > 1 else n for n, c in zip(names, cat_ids)]


def _per_class_ap(precision: np.ndarray, names: Sequence[str]) -> dict[str, float]:
    out = {}
    for k, name in enumerate(names):
        v = _mean_valid(precision[:, :, k, 0, -1])
        out[name] = float("nan") if v < 0 else v
    return out


def evaluate_coco(
    gt: Any,
    results: Any,
    iou_type: str = "bbox",
    *,
    backend: str = "auto",
    image_ids: Iterable[int] | None = None,
    max_dets: Sequence[int] = (1, 10, 100),
) -> CocoEvalResult:
    """COCO AP/AR for box or mask results, with faster-coco-eval or pycocotools.

    Args:
        gt: ground truth: a COCO instances json path, a dataset dict, or a COCO object (see ``load_coco_gt``).
        results: a results json path or a list of dicts with ``image_id``, ``category_id`` (the GT's own ids,
            e.g. COCO's non-contiguous 1..90), ``score`` and ``bbox`` ``[x, y, w, h]`` in absolute pixels
            (``iou_type="bbox"``) or ``segmentation`` (``"segm"``: compressed RLE with str or bytes ``counts``;
            uncompressed RLE and polygons are encoded here). The input is never modified.
        iou_type: ``"bbox"`` or ``"segm"``.
        backend: ``"auto"`` (faster-coco-eval if installed, else pycocotools), ``"faster"`` or ``"pycocotools"``.
        image_ids: evaluate only these GT images (e.g. a validation slice); results on other images are ignored.
        max_dets: three increasing per-image, per-category detection limits.

    Returns:
        ``CocoEvalResult`` with the 12 stats, per-class AP and timings. Quiet: nothing is printed; use ``table()``.

    Raises:
        ValueError: unknown ``iou_type``, bad ``max_dets``/``image_ids``, or results naming image/category ids that
            are not in the ground truth (the message lists them).
    """
    if iou_type not in IOU_TYPES:
        raise ValueError(f"iou_type={iou_type!r} is not supported; use one of {IOU_TYPES}")
    max_dets = tuple(int(m) for m in max_dets)
    if len(max_dets) != 3 or any(m < 1 for m in max_dets) or list(max_dets) != sorted(set(max_dets)):
        raise ValueError(f"max_dets={max_dets} must be three increasing positive ints, like (1, 10, 100)")
    backend = resolve_backend(backend)
    mask_api = _mask_api(backend)
    timings: dict[str, float] = {}

    t0 = time.perf_counter()
    coco_gt = load_coco_gt(gt, backend)
    timings["load_gt"] = time.perf_counter() - t0

    if image_ids is None:
        img_ids = sorted(coco_gt.getImgIds())
    else:
        img_ids = sorted({int(i) for i in image_ids})
        unknown = sorted(set(img_ids) - set(coco_gt.imgs))
        if unknown:
            raise ValueError(f"image_ids {unknown[:10]} ({len(unknown)} in all) are not in the ground truth; "
                             "pass ids from coco.getImgIds()")
        if not img_ids:
            raise ValueError("image_ids is empty; pass None to evaluate every ground-truth image")
    cat_ids = sorted(coco_gt.getCatIds())
    names = _category_names(coco_gt, cat_ids)

    t0 = time.perf_counter()
    dets = _prepare_results(_load_results(results), coco_gt, iou_type, mask_api)
    if image_ids is not None:  # results on other images cannot change the numbers: skip loading them
        wanted = set(img_ids)
        dets = [d for d in dets if d["image_id"] in wanted]
    if not dets:
        timings["load_results"] = time.perf_counter() - t0
        return _empty_result(coco_gt, img_ids, cat_ids, names, iou_type, max_dets, timings)
    with contextlib.redirect_stdout(io.StringIO()):
        coco_dt = _results_coco(coco_gt, dets, iou_type, backend)
        timings["load_results"] = time.perf_counter() - t0
        if backend == "faster":
            from faster_coco_eval import COCOeval_faster

            coco_dt.print_function = _silent
            ev = COCOeval_faster(coco_gt, coco_dt, iouType=iou_type, print_function=_silent)
        else:
            from pycocotools.cocoeval import COCOeval

            ev = COCOeval(coco_gt, coco_dt, iouType=iou_type)
        ev.params.imgIds = img_ids
        ev.params.catIds = cat_ids
        ev.params.maxDets = list(max_dets)
        t0 = time.perf_counter()
        ev.evaluate()
        timings["evaluate"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        ev.accumulate()
        timings["accumulate"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    precision = np.asarray(ev.eval["precision"], dtype=np.float64)
    recall = np.asarray(ev.eval["recall"], dtype=np.float64)
    stats = _summarize(precision, recall, np.asarray(ev.params.iouThrs), ev.params.areaRngLbl)
    per_class = _per_class_ap(precision, names)
    timings["summarize"] = time.perf_counter() - t0
    return CocoEvalResult(stats=stats, per_class_ap=per_class, iou_type=iou_type, backend=backend,
                          max_dets=max_dets, num_images=len(img_ids), timings=timings, precision=precision,
                          recall=recall, category_ids=cat_ids)


def _empty_result(coco_gt: Any, img_ids: list[int], cat_ids: list[int], names: list[str], iou_type: str,
                  max_dets: tuple[int, ...], timings: dict[str, float]) -> CocoEvalResult:
    log.warning("no %s results on the %d evaluated images: every COCO metric is 0 (check that the model "
                "produced detections and that image_ids match the ground truth)", iou_type, len(img_ids))
    wanted = set(img_ids)
    has_gt = {a["category_id"] for a in coco_gt.dataset["annotations"]
              if a["image_id"] in wanted and not a.get("iscrowd", 0)}
    per_class = {n: (0.0 if c in has_gt else float("nan")) for n, c in zip(names, cat_ids)}
    return CocoEvalResult(stats={k: 0.0 for k in STAT_NAMES}, per_class_ap=per_class, iou_type=iou_type,
                          backend="none", max_dets=tuple(max_dets), num_images=len(img_ids), timings=timings,
                          category_ids=list(cat_ids))


# ----------------------------------------------------------------------------------------------------------------
# fake results for tests and benchmarks
# ----------------------------------------------------------------------------------------------------------------


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
    """Deterministic imperfect detections built from ground truth, for tests and benchmarks.

    Each non-crowd GT object is dropped with probability ``drop``; otherwise it yields a detection whose box is
    jittered by ``~N(0, jitter * size)`` in position and ``exp(N(0, jitter))`` in scale (for masks: GT polygons
    moved and scaled the same way; RLE masks shifted by the same offset and, half the time, eroded by one
    pixel), with its class swapped at random with probability ``wrong_class``, plus a second, lower-scored
    duplicate with probability ``duplicates``. Each image then gets false positives (random boxes /
    octagon masks, random classes, low-ish scores): ``false_positives`` of them, or enough to reach ``per_image``
    detections. Scores are distinct random floats.

    Args:
        gt: ground truth as accepted by ``load_coco_gt``.
        iou_type: ``"bbox"`` (results carry ``bbox``) or ``"segm"`` (``segmentation`` RLE with str counts, and
            ``bbox``).
        seed: numpy random seed.
        per_image: target number of detections per image (false positives fill up to it), or None.
        drop, wrong_class, jitter, duplicates, false_positives: see above.
        backend: which mask API encodes masks.

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
                    m = mask_api.decode(_to_rle(seg, h, w, mask_api)).astype(np.uint8)
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
