"""COCO detection / instance-segmentation metrics with two interchangeable backends.

``evaluate_coco`` scores COCO-format results (boxes or RLE masks) against a COCO ground-truth json with either
`faster-coco-eval <https://github.com/MiXaiLL76/faster_coco_eval>`_ (C++ evaluate/accumulate, the default when it
is installed) or the reference ``pycocotools``. The libraries do the work: ``COCO.loadRes`` builds the results
object, ``COCOeval.evaluate/accumulate/summarize`` the numbers (``stats``), with their printing silenced. The tests
check the two backends agree, and agree with a plain pycocotools run, on the real COCO subsets in
``../shared/data``.

What is added here, because the libraries lack it: input validation that names bad image/category ids (instead of
a bare ``AssertionError`` or a silent ignore) and normalises masks (polygons and uncompressed RLE are encoded, as
``loadRes`` only takes compressed RLE), ground truth without ``area``/``iscrowd``, ``image_ids`` filtering, per-class
AP from the accumulated precision array, timings, and the empty-results case.

Conventions kept from pycocotools: a summary number is ``-1.0`` when no ground truth falls in its area range;
crowd ground truth (``iscrowd=1``) is ignored rather than counted as a miss. Deliberate differences:

- results that are empty (or that fall on none of the evaluated images) give all-zero stats and a logged warning
  instead of pycocotools' ``IndexError``;
- for ``iou_type="segm"`` a result's own ``bbox`` is dropped before ``loadRes``, so a detection's area (used for
  the small/medium/large ranges) is always its mask area; ``loadRes`` would take ``w * h`` of the box when a result
  carries both (detectron2 drops the box for the same reason);
- with custom ``max_dets`` AP is taken at ``max_dets[2]`` like every other number (faster-coco-eval does this;
  pycocotools' ``summarize`` reads AP at a hard-coded 100, so that one number is taken from its precision array).

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

#: How ``summary_lines`` labels each of STAT_NAMES, as pycocotools prints it: (AP?, IoU label, area, max_dets index).
_LINE_LABELS: tuple[tuple[bool, str, str, int], ...] = (
    (True, "0.50:0.95", "all", 2), (True, "0.50", "all", 2), (True, "0.75", "all", 2),
    (True, "0.50:0.95", "small", 2), (True, "0.50:0.95", "medium", 2), (True, "0.50:0.95", "large", 2),
    (False, "0.50:0.95", "all", 0), (False, "0.50:0.95", "all", 1), (False, "0.50:0.95", "all", 2),
    (False, "0.50:0.95", "small", 2), (False, "0.50:0.95", "medium", 2), (False, "0.50:0.95", "large", 2),
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
        scores: ``[T, R, K, A, M]`` array from ``accumulate``: the detection score at which each precision point
            is reached (for F1-vs-score curves and score thresholds); ``None`` for empty results.
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
    scores: np.ndarray | None = field(default=None, repr=False)

    def summary_lines(self) -> list[str]:
        """The 12 lines pycocotools' ``summarize()`` prints, for these stats.

        Returns:
            12 strings, e.g. ``" Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ] = 0.372"``.
        """
        lines = []
        for name, (is_ap, iou, area, m) in zip(STAT_NAMES, _LINE_LABELS):
            title, kind = ("Average Precision", "(AP)") if is_ap else ("Average Recall", "(AR)")
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


# ----------------------------------------------------------------------------------------------------------------
# evaluation
# ----------------------------------------------------------------------------------------------------------------


def _mean_valid(s: np.ndarray) -> float:
    """Mean of the defined (``> -1``) entries, ``-1.0`` when there are none (pycocotools' rule)."""
    v = s[s > -1]
    return float(np.mean(v)) if v.size else -1.0


def _summary_stats(ev: Any, backend: str, max_dets: tuple[int, ...]) -> dict[str, float]:
    """The 12 numbers of the library's own ``summarize()`` (``ev.stats``), keyed by ``STAT_NAMES``.

    pycocotools' ``summarize`` (only meant for "the default parameter setting") reads AP, and only AP, at a
    hard-coded ``maxDets=100``: with custom ``max_dets`` that is ``-1`` (100 not a limit) or the wrong column (100
    not the last limit). There AP is taken at ``max_dets[2]``, as faster-coco-eval and every other number do.
    """
    ev.summarize()  # printing: pycocotools' stdout is redirected by the caller, faster-coco-eval's is _silent
    stats = [float(v) for v in ev.stats[:len(STAT_NAMES)]]
    if backend == "pycocotools" and max_dets[2] != 100:
        area_all = list(ev.params.areaRngLbl).index("all")
        stats[0] = _mean_valid(np.asarray(ev.eval["precision"])[:, :, :, area_all, 2])
    return dict(zip(STAT_NAMES, stats))


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
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints every step
        # ids 1..N, iscrowd 0, area (box w * h, or the mask area: segm results carry no bbox), segm box from the mask
        coco_dt = coco_gt.loadRes(dets)
        timings["load_results"] = time.perf_counter() - t0
        if backend == "faster":
            from faster_coco_eval import COCOeval_faster

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
        stats = _summary_stats(ev, backend, max_dets)
    precision = np.asarray(ev.eval["precision"], dtype=np.float64)
    recall = np.asarray(ev.eval["recall"], dtype=np.float64)
    scores = np.asarray(ev.eval["scores"], dtype=np.float64) if "scores" in ev.eval else None
    per_class = _per_class_ap(precision, names)
    timings["summarize"] = time.perf_counter() - t0
    return CocoEvalResult(stats=stats, per_class_ap=per_class, iou_type=iou_type, backend=backend,
                          max_dets=max_dets, num_images=len(img_ids), timings=timings, precision=precision,
                          recall=recall, category_ids=cat_ids, scores=scores)


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
