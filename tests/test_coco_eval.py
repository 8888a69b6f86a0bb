"""COCO evaluation: faster-coco-eval vs pycocotools parity on the real COCO subsets in ../shared/data (skipped
when absent), and behaviour checks on a tiny GT built here (runs everywhere)."""

from __future__ import annotations

import copy
import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest

from tests.coco_fakes import fake_results
from zoo.metrics.coco_eval import (
    STAT_NAMES,
    CocoEvalResult,
    evaluate_coco,
    json_safe_results,
    load_coco_gt,
    resolve_backend,
    results_to_json,
)

pytest.importorskip("pycocotools")
pytest.importorskip("faster_coco_eval")

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
BACKENDS = ("pycocotools", "faster")
TOL = 1e-4


# ------------------------------------------------------------------------------------------------------------
# tiny synthetic ground truth (no shared data needed)
# ------------------------------------------------------------------------------------------------------------


def _box_poly(x: float, y: float, w: float, h: float) -> list[list[float]]:
    return [[x, y, x + w, y, x + w, y + h, x, y + h]]


def tiny_gt() -> dict:
    """3 images, categories with COCO-like non-contiguous ids (1, 3, 7; 7 has no GT), one crowd region."""
    from pycocotools import mask as mask_utils

    images = [{"id": 10, "width": 64, "height": 48, "file_name": "a.jpg"},
              {"id": 11, "width": 80, "height": 60, "file_name": "b.jpg"},
              {"id": 12, "width": 64, "height": 64, "file_name": "c.jpg"}]
    cats = [{"id": 1, "name": "person"}, {"id": 3, "name": "car"}, {"id": 7, "name": "train"}]
    boxes = [(10, 1, (4, 4, 20, 30)), (10, 3, (30, 10, 25, 20)), (11, 1, (2, 2, 10, 12)),
             (11, 1, (40, 20, 30, 35)), (11, 3, (15, 30, 20, 10)), (12, 3, (5, 5, 50, 50))]
    anns = []
    for i, (img, cat, (x, y, w, h)) in enumerate(boxes, start=1):
        anns.append({"id": i, "image_id": img, "category_id": cat, "bbox": [x, y, w, h], "area": float(w * h),
                     "iscrowd": 0, "segmentation": _box_poly(x, y, w, h)})
    # a crowd of people on image 12, as uncompressed RLE like COCO stores crowds
    m = np.zeros((64, 64), np.uint8)
    m[40:60, 2:30] = 1
    rle = mask_utils.encode(np.asfortranarray(m))
    flat = m.ravel(order="F")
    change = np.flatnonzero(np.diff(flat)) + 1
    runs = np.diff(np.concatenate([[0], change, [flat.size]])).tolist()
    if flat[0] == 1:
        runs = [0, *runs]
    anns.append({"id": 99, "image_id": 12, "category_id": 1, "bbox": [2, 40, 28, 20], "iscrowd": 1,
                 "area": float(mask_utils.area(rle)), "segmentation": {"counts": runs, "size": [64, 64]}})
    return {"images": images, "categories": cats, "annotations": anns}


def perfect_results(gt: dict, iou_type: str, backend: str = "pycocotools") -> list[dict]:
    """GT itself as results (score 1), crowd regions left out; segm as RLE with bytes counts."""
    coco = load_coco_gt(gt, backend)
    out = []
    for a in gt["annotations"]:
        if a.get("iscrowd", 0):
            continue
        r = {"image_id": a["image_id"], "category_id": a["category_id"], "score": 1.0}
        if iou_type == "bbox":
            r["bbox"] = list(a["bbox"])
        else:
            r["segmentation"] = coco.annToRLE(coco.anns[a["id"]])
        out.append(r)
    return out


def _assert_stats_close(a: CocoEvalResult, b: CocoEvalResult, tol: float = TOL) -> None:
    assert list(a.stats) == list(STAT_NAMES) == list(b.stats)
    diff = {k: (a.stats[k], b.stats[k]) for k in STAT_NAMES if abs(a.stats[k] - b.stats[k]) > tol}
    assert not diff, f"{a.backend} vs {b.backend} ({a.iou_type}) differ: {diff}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_tiny_perfect_detections_score_one(backend: str, iou_type: str) -> None:
    gt = tiny_gt()
    res = evaluate_coco(gt, perfect_results(gt, iou_type), iou_type, backend=backend)
    assert res.backend == backend and res.iou_type == iou_type and res.num_images == 3
    for k in ("AP", "AP50", "AP75", "AR10", "AR100"):
        assert res.stats[k] == pytest.approx(1.0), (k, res.stats)
    # present area ranges score 1, absent ones keep pycocotools' -1
    for k in ("APs", "APm", "APl", "ARs", "ARm", "ARl"):
        assert res.stats[k] in (pytest.approx(1.0), -1.0), (k, res.stats)
    assert res.per_class_ap["person"] == pytest.approx(1.0)
    assert res.per_class_ap["car"] == pytest.approx(1.0)
    assert math.isnan(res.per_class_ap["train"])  # no GT of category 7
    assert res.precision is not None and res.precision.shape == (10, 101, 3, 4, 3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_tiny_hand_computed_ap(backend: str) -> None:
    """One GT, a higher-scored false positive then the exact box: precision is 0.5 at every recall -> AP 0.5."""
    gt = tiny_gt()
    gt["annotations"] = [a for a in gt["annotations"] if a["id"] == 6]  # the car on image 12
    res = evaluate_coco(gt, [
        {"image_id": 12, "category_id": 3, "bbox": [58, 58, 5, 5], "score": 0.9},
        {"image_id": 12, "category_id": 3, "bbox": [5, 5, 50, 50], "score": 0.8},
    ], "bbox", backend=backend)
    assert res.stats["AP"] == pytest.approx(0.5)
    assert res.stats["AP50"] == pytest.approx(0.5)
    assert res.stats["AR1"] == pytest.approx(0.0)  # the first detection per image is the false positive
    assert res.stats["AR10"] == pytest.approx(1.0)
    # the GT (50x50) is "medium"; the 5x5 false positive is "small", so it is ignored in the medium range
    assert res.stats["APs"] == -1.0 and res.stats["APl"] == -1.0 and res.stats["APm"] == pytest.approx(1.0)
    assert res.per_class_ap["car"] == pytest.approx(0.5)
    assert math.isnan(res.per_class_ap["person"])


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_tiny_backends_agree_on_noisy_results(iou_type: str) -> None:
    gt = tiny_gt()
    dets = fake_results(gt, iou_type, seed=3, drop=0.2, false_positives=4)
    a = evaluate_coco(gt, dets, iou_type, backend="pycocotools")
    b = evaluate_coco(gt, dets, iou_type, backend="faster")
    _assert_stats_close(a, b)
    assert 0.0 < a.stats["AP50"] < 1.0


def test_empty_results_give_zeros_with_warning(caplog: pytest.LogCaptureFixture) -> None:
    gt = tiny_gt()
    with caplog.at_level(logging.WARNING, logger="zoo.metrics.coco_eval"):
        res = evaluate_coco(gt, [], "segm")
    assert res.stats == {k: 0.0 for k in STAT_NAMES}
    assert res.per_class_ap["person"] == 0.0 and math.isnan(res.per_class_ap["train"])
    assert any("no segm results" in r.getMessage() for r in caplog.records)
    assert "Average Precision" in res.table()


def test_bad_category_id_raises_with_fix() -> None:
    gt = tiny_gt()
    dets = perfect_results(gt, "bbox") + [{"image_id": 10, "category_id": 0, "bbox": [1, 1, 5, 5], "score": 0.5},
                                          {"image_id": 10, "category_id": 2, "bbox": [1, 1, 5, 5], "score": 0.5}]
    with pytest.raises(ValueError, match=r"category_id\(s\) \[0, 2\].*\[1, 3, 7\].*contiguous labels back"):
        evaluate_coco(gt, dets, "bbox")


def test_bad_image_id_and_malformed_results_raise() -> None:
    gt = tiny_gt()
    with pytest.raises(ValueError, match=r"image_id\(s\) \[555\]"):
        evaluate_coco(gt, [{"image_id": 555, "category_id": 1, "bbox": [1, 1, 5, 5], "score": 0.5}], "bbox")
    with pytest.raises(ValueError, match=r"result #0 lacks \['segmentation'\]"):
        evaluate_coco(gt, [{"image_id": 10, "category_id": 1, "bbox": [1, 1, 5, 5], "score": 0.5}], "segm")
    with pytest.raises(ValueError, match="iou_type"):
        evaluate_coco(gt, [], "keypoints")
    with pytest.raises(ValueError, match="max_dets"):
        evaluate_coco(gt, [], "bbox", max_dets=(10, 1, 100))
    with pytest.raises(ValueError, match="image_ids"):
        evaluate_coco(gt, [], "bbox", image_ids=[10, 404])
    with pytest.raises(ValueError, match="backend"):
        evaluate_coco(gt, [], "bbox", backend="detectron")


def test_image_ids_restrict_evaluation() -> None:
    gt = tiny_gt()
    good = [r for r in perfect_results(gt, "bbox") if r["image_id"] == 10]
    junk = [{"image_id": 11, "category_id": 1, "bbox": [60, 50, 5, 5], "score": 0.9}]
    full = evaluate_coco(gt, good + junk, "bbox")
    part = evaluate_coco(gt, good + junk, "bbox", image_ids=[10])
    assert full.stats["AP"] < 0.9
    assert part.num_images == 1 and part.stats["AP"] == pytest.approx(1.0)


def test_results_json_roundtrip_and_inputs_untouched(tmp_path: Path) -> None:
    gt = tiny_gt()
    dets = perfect_results(gt, "segm")
    assert isinstance(dets[0]["segmentation"]["counts"], bytes)
    dets[0]["score"] = np.float32(0.75)  # numpy scalars must be written as plain numbers
    gt_before, dets_before = copy.deepcopy(gt), copy.deepcopy(dets)
    from_list = evaluate_coco(gt, dets, "segm")
    assert gt == gt_before and dets == dets_before  # neither input was modified
    path = results_to_json(dets, tmp_path / "sub" / "segm.json")
    loaded = json.loads(path.read_text())
    assert isinstance(loaded[0]["segmentation"]["counts"], str) and loaded[0]["score"] == 0.75
    gt_path = tmp_path / "gt.json"
    gt_path.write_text(json.dumps(gt))
    from_file = evaluate_coco(str(gt_path), str(path), "segm")
    assert from_file.stats == from_list.stats
    assert json_safe_results(dets) == loaded


def test_polygon_and_uncompressed_rle_results_equal_compressed() -> None:
    from pycocotools import mask as mask_utils

    gt = tiny_gt()
    compressed = perfect_results(gt, "segm")
    poly, raw = [], []
    for r, a in zip(compressed, [a for a in gt["annotations"] if not a["iscrowd"]]):
        poly.append({**r, "segmentation": a["segmentation"]})
        m = mask_utils.decode(r["segmentation"]).ravel(order="F")
        change = np.flatnonzero(np.diff(m)) + 1
        runs = np.diff(np.concatenate([[0], change, [m.size]])).tolist()
        raw.append({**r, "segmentation": {"counts": [0, *runs] if m[0] else runs,
                                          "size": r["segmentation"]["size"]}})
    ref = evaluate_coco(gt, compressed, "segm").stats
    assert evaluate_coco(gt, poly, "segm").stats == ref
    assert evaluate_coco(gt, raw, "segm").stats == ref


def test_custom_max_dets_and_table() -> None:
    gt = tiny_gt()
    dets = fake_results(gt, "bbox", seed=1, false_positives=6)
    a = evaluate_coco(gt, dets, "bbox", backend="pycocotools", max_dets=(1, 2, 5))
    b = evaluate_coco(gt, dets, "bbox", backend="faster", max_dets=(1, 2, 5))
    _assert_stats_close(a, b)
    assert a.stats["AR1"] <= a.stats["AR10"] <= a.stats["AR100"]
    table = a.table()
    lines = table.splitlines()
    assert len([ln for ln in lines if ln.startswith(" Average")]) == 12
    assert "maxDets=  5 ]" in lines[1] and "maxDets=  2 ]" in lines[8]
    assert "person" in table and "train" in table
    assert set(a.to_metrics()) >= {"val/mAP", "val/mAP50", "val/mAR100"}


@pytest.mark.parametrize("max_dets", [(1, 100, 300), (2, 3, 4)])
def test_custom_max_dets_ap_at_last_limit_and_quiet(max_dets: tuple, capsys: pytest.CaptureFixture) -> None:
    """pycocotools' summarize() reads AP at a hard-coded 100: AP must still be taken at max_dets[2] (as
    faster-coco-eval does), and neither library may print."""
    gt = tiny_gt()
    dets = fake_results(gt, "bbox", seed=4, false_positives=6)
    a = evaluate_coco(gt, dets, "bbox", backend="pycocotools", max_dets=max_dets)
    b = evaluate_coco(gt, dets, "bbox", backend="faster", max_dets=max_dets)
    assert capsys.readouterr().out == ""
    _assert_stats_close(a, b)
    assert a.stats["AP"] > 0.0


def test_coco_object_of_other_backend_is_accepted() -> None:
    from pycocotools.coco import COCO

    gt = tiny_gt()
    obj = COCO()
    obj.dataset = copy.deepcopy(gt)
    obj.createIndex()
    dets = fake_results(gt, "bbox", seed=2)
    ref = evaluate_coco(gt, dets, "bbox", backend="faster").stats
    assert evaluate_coco(obj, dets, "bbox", backend="faster").stats == ref
    assert evaluate_coco(obj, dets, "bbox", backend="pycocotools").stats == pytest.approx(ref, abs=TOL)


def test_auto_backend_falls_back_to_pycocotools(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    assert resolve_backend("auto") == "faster"
    monkeypatch.setitem(sys.modules, "faster_coco_eval", None)  # as if it were not installed
    assert resolve_backend("auto") == "pycocotools"
    with pytest.raises(ImportError, match="pip install faster-coco-eval"):
        resolve_backend("faster")
    gt = tiny_gt()
    res = evaluate_coco(gt, perfect_results(gt, "bbox"), "bbox")
    assert res.backend == "pycocotools" and res.stats["AP"] == pytest.approx(1.0)


# ------------------------------------------------------------------------------------------------------------
# real COCO subsets in ../shared/data
# ------------------------------------------------------------------------------------------------------------

_CACHE: dict = {}


def real_gt(name: str) -> dict:
    ann = SHARED_DATA / name / "annotations" / "instances_train2017.json"
    if not ann.is_file():
        pytest.skip(f"{ann} not present (real COCO subsets live in ../shared/data beside the repository)")
    if name not in _CACHE:
        _CACHE[name] = json.loads(ann.read_text())
    return _CACHE[name]


def real_fake(name: str, iou_type: str) -> list[dict]:
    key = (name, iou_type)
    if key not in _CACHE:
        _CACHE[key] = fake_results(real_gt(name), iou_type, seed=7, false_positives=5)
    return _CACHE[key]


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
@pytest.mark.parametrize("name", ["coco128", "tiny_coco"])
def test_real_faster_matches_pycocotools(name: str, iou_type: str, tmp_path: Path) -> None:
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gt = real_gt(name)
    dets = real_fake(name, iou_type)
    assert any(a["iscrowd"] for a in gt["annotations"])  # crowd regions are part of what is compared
    ref = evaluate_coco(gt, dets, iou_type, backend="pycocotools")
    fast = evaluate_coco(gt, dets, iou_type, backend="faster")
    _assert_stats_close(ref, fast)
    assert 0.05 < ref.stats["AP"] < 0.95 and ref.stats["AP50"] > ref.stats["AP75"]
    for cls, ap in ref.per_class_ap.items():
        assert (math.isnan(ap) and math.isnan(fast.per_class_ap[cls])) or abs(ap - fast.per_class_ap[cls]) <= TOL
    # per-class AP exists exactly for the classes with (non-crowd) GT
    with_gt = {c["name"] for c in gt["categories"]
               if any(a["category_id"] == c["id"] and not a["iscrowd"] for a in gt["annotations"])}
    assert {k for k, v in fast.per_class_ap.items() if not math.isnan(v)} == with_gt
    assert len(fast.per_class_ap) == len(gt["categories"])

    # the 12 numbers are exactly what pycocotools' own evaluate/accumulate/summarize prints (checked on the
    # smaller subset only, to keep the suite fast)
    if name != "tiny_coco":
        return
    plain = [{k: v for k, v in r.items() if not (iou_type == "segm" and k == "bbox")} for r in dets]
    res_path = results_to_json(plain, tmp_path / "res.json")
    coco = COCO(str(SHARED_DATA / name / "annotations" / "instances_train2017.json"))
    ev = COCOeval(coco, coco.loadRes(str(res_path)), iou_type)
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    assert np.allclose(list(fast.stats.values()), ev.stats, atol=TOL, rtol=0), (fast.stats, ev.stats)
    assert list(ref.stats.values()) == pytest.approx(list(ev.stats), abs=1e-12)


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
@pytest.mark.parametrize("name", ["coco128", "tiny_coco"])
def test_real_perfect_detections_score_one(name: str, iou_type: str) -> None:
    gt = real_gt(name)
    res = evaluate_coco(gt, perfect_results(gt, iou_type), iou_type, backend="faster")
    for k in ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR100"):
        assert res.stats[k] == pytest.approx(1.0), (k, res.stats)


def test_real_image_slice_parity() -> None:
    gt = real_gt("coco128")
    dets = real_fake("coco128", "bbox")
    ids = sorted(i["id"] for i in gt["images"])[::4]
    a = evaluate_coco(gt, dets, "bbox", backend="pycocotools", image_ids=ids)
    b = evaluate_coco(gt, dets, "bbox", backend="faster", image_ids=ids)
    _assert_stats_close(a, b)
    assert a.num_images == len(ids) == 32
    assert a.stats != evaluate_coco(gt, dets, "bbox", backend="faster").stats
