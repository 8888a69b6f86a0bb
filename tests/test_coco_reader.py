"""The COCO reader: category mapping, crowd, empty images, degenerate boxes, and bad input handling."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from zoo.data.coco import BadAnnotationError, CocoDataset, CocoIndex

PRE = {"input_size": [64, 64], "resize": "stretch", "mean": [0.5] * 3, "std": [0.25] * 3}


def _write(tmp: Path, anns: list[dict], *, images: int = 2, extra_images: list[dict] | None = None) -> tuple[Path, Path]:
    img_dir = tmp / "imgs"
    img_dir.mkdir(exist_ok=True)
    imgs = []
    for i in range(1, images + 1):
        Image.fromarray(np.full((40, 60, 3), 30 * i, np.uint8)).save(img_dir / f"{i}.jpg")
        imgs.append({"id": i, "file_name": f"{i}.jpg", "width": 60, "height": 40})
    imgs += extra_images or []
    cats = [{"id": 3, "name": "cat"}, {"id": 17, "name": "dog"}, {"id": 90, "name": "toothbrush"}]
    ann_file = tmp / "ann.json"
    ann_file.write_text(json.dumps({"images": imgs, "annotations": anns, "categories": cats}))
    return ann_file, img_dir


def _ann(i: int, img: int, cat: int, bbox: list[float], crowd: int = 0) -> dict:
    x, y, w, h = bbox
    return {"id": i, "image_id": img, "category_id": cat, "bbox": bbox, "area": w * h, "iscrowd": crowd,
            "segmentation": [[x, y, x + w, y, x + w, y + h, x, y + h]]}


def test_category_ids_map_to_contiguous_labels_and_back(tmp_path: Path) -> None:
    ann, imgs = _write(tmp_path, [_ann(1, 1, 17, [1, 1, 10, 10]), _ann(2, 1, 90, [5, 5, 30, 20])])
    idx = CocoIndex(ann, imgs)
    assert idx.cat_ids == [3, 17, 90] and idx.class_names == ["cat", "dog", "toothbrush"]
    assert idx.cat_id_to_label == {3: 0, 17: 1, 90: 2} and idx.label_to_cat_id[2] == 90
    rec = idx.records[0]
    assert rec.labels.tolist() == [1, 2]
    assert np.allclose(rec.boxes[1], [5, 5, 35, 25])  # xyxy
    assert idx.primary_label(rec) == 2  # the largest object


def test_crowd_empty_and_degenerate(tmp_path: Path) -> None:
    ann, imgs = _write(tmp_path, [_ann(1, 1, 3, [0, 0, 20, 20], crowd=1), _ann(2, 1, 17, [2, 2, 0.5, 9]),
                                  _ann(3, 1, 3, [30, 10, 10, 10])], images=2)
    idx = CocoIndex(ann, imgs)
    rec = idx.records[0]
    assert rec.iscrowd.tolist() == [True, False]  # the 0.5 px wide box is dropped as degenerate
    assert idx.skipped == {"degenerate boxes": 1}
    assert len(idx.records) == 2 and len(idx.records[1].boxes) == 0  # image 2 kept as a negative
    det = CocoDataset(idx, "detection", **PRE)
    assert det[1]["target"]["boxes"].shape == (0, 4)
    assert len(CocoDataset(idx, "classification", **PRE)) == 1  # single-label needs a non-crowd object
    sem = CocoDataset(idx, "semantic", **PRE)[0]["target"]
    assert (sem == 255).any() and (sem == 1).any()  # crowd ignored, class 0 (cat) painted as 1
    multi = CocoDataset(idx, "multilabel", **PRE)[0]["target"]
    assert multi.tolist() == [1.0, 0.0, 0.0]


def test_boxes_are_clipped_to_the_image(tmp_path: Path) -> None:
    ann, imgs = _write(tmp_path, [_ann(1, 1, 3, [50, 30, 20, 20])])
    rec = CocoIndex(ann, imgs).records[0]
    assert np.allclose(rec.boxes[0], [50, 30, 60, 40])


@pytest.mark.parametrize("bad,needle,reason", [
    (_ann(1, 1, 3, [5, 5, -3, 4]), "negative", "negative-size boxes"),
    (_ann(1, 1, 3, [100, 100, 5, 5]), "outside", "boxes outside the image"),
    (_ann(1, 1, 42, [5, 5, 5, 5]), "category_id 42", "unknown category ids"),
])
def test_bad_annotations_raise_or_are_counted(tmp_path: Path, bad: dict, needle: str, reason: str) -> None:
    ann, imgs = _write(tmp_path, [bad, _ann(2, 2, 3, [1, 1, 5, 5])])
    with pytest.raises(BadAnnotationError, match=needle):
        CocoIndex(ann, imgs)
    idx = CocoIndex(ann, imgs, on_bad="skip")
    assert idx.skipped == {reason: 1}
    assert sum(len(r.boxes) for r in idx.records) == 1


def test_missing_image_file(tmp_path: Path) -> None:
    ann, imgs = _write(tmp_path, [], extra_images=[{"id": 9, "file_name": "gone.jpg", "width": 5, "height": 5}])
    with pytest.raises(BadAnnotationError, match="gone.jpg"):
        CocoIndex(ann, imgs)
    assert CocoIndex(ann, imgs, on_bad="skip").skipped == {"missing image files": 1}


def test_corrupt_image_names_the_file(tmp_path: Path) -> None:
    ann, imgs = _write(tmp_path, [_ann(1, 1, 3, [1, 1, 5, 5])])
    (imgs / "1.jpg").write_bytes(b"not a jpeg")
    ds = CocoDataset(CocoIndex(ann, imgs), "detection", **PRE)
    with pytest.raises(BadAnnotationError, match="1.jpg"):
        ds[0]


def test_missing_annotation_file_is_clear(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="instances_val.json"):
        CocoIndex(tmp_path / "instances_val.json", tmp_path)


def test_real_coco_subsets(coco128: Path, tiny_coco: Path) -> None:
    for root, n_imgs, n_crowd in ((coco128, 128, 10), (tiny_coco, 50, 5)):
        idx = CocoIndex(root / "annotations" / "instances_train2017.json", root / "train2017")
        assert len(idx.cat_ids) == 80 and idx.cat_ids[-1] == 90  # COCO's non-contiguous ids
        assert len(idx.records) == n_imgs
        assert sum(int(r.iscrowd.sum()) for r in idx.records) == n_crowd
        ds = CocoDataset(idx, "instance", input_size=[128, 128], resize="longest", mean=[0.5] * 3, std=[0.2] * 3)
        s = ds[0]
        t = s["target"]
        assert s["image"].shape[0] == 3 and max(s["image"].shape[1:]) == 128
        assert t["masks"].shape[0] == t["boxes"].shape[0] == t["labels"].shape[0]
        assert (t["boxes"][:, 2] <= s["size"][1] + 1e-3).all() and (t["boxes"][:, 3] <= s["size"][0] + 1e-3).all()


def test_multiscale_training_sizes(tmp_path: Path) -> None:
    ann, imgs = _write(tmp_path, [_ann(1, 1, 3, [10, 10, 20, 10])])
    ds = CocoDataset(CocoIndex(ann, imgs), "detection", input_size=[64, 64], resize="longest", mean=[0.5] * 3,
                     std=[0.25] * 3, train_sizes=[32, 48, 96])
    np.random.seed(0)
    seen = {ds[0]["size"] for _ in range(30)}
    assert seen == {(21, 32), (32, 48), (64, 96)}  # the 40x60 image, longest side drawn from the list
    s = ds[0]
    sy, sx = s["scale"]
    assert torch_allclose(s["target"]["boxes"][0], [10 * sx, 10 * sy, 30 * sx, 20 * sy])


def torch_allclose(t, ref) -> bool:
    import torch

    return bool(torch.allclose(t, torch.tensor(ref, dtype=t.dtype), atol=1e-4))
