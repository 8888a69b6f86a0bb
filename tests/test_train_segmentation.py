"""Segmentation end to end: semantic learning on the embedded dataset and evaluate.py, the image/mask PNG-pair
reader, augmentation keeping image, mask and boxes aligned, Mask R-CNN producing mask AP, and overfit checks on real
coco128 images."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import FAST, compose, overfit
from zoo.evaluation import evaluate
from zoo.training import train

SHAPES = ["data.shapes.num_train=400", "data.shapes.num_val=100", "data.shapes.image_size=96"]


def test_augmentation_moves_image_mask_and_boxes_together() -> None:
    from zoo.data.transforms import build_augment

    img = np.zeros((80, 120, 3), np.uint8)
    img[20:50, 30:70] = 255
    mask = (img[..., 0] > 0).astype(np.uint8)
    box = np.array([[30, 20, 70, 50]], np.float32)
    aug = build_augment([{"type": "HorizontalFlip", "p": 1.0},
                         {"type": "Affine", "scale": 1.3, "translate_px": {"x": 7, "y": -5}, "rotate": 0, "p": 1.0},
                         {"type": "RandomCrop", "height": 70, "width": 100, "p": 1.0}], boxes=True, seed=3)
    out = aug(image=img, masks=[mask], bboxes=box, box_index=np.arange(1))
    m = out["masks"][0].astype(bool)
    ys, xs = np.nonzero(m)
    x1, y1, x2, y2 = out["bboxes"][0]
    assert abs(xs.min() - x1) <= 1.5 and abs(xs.max() + 1 - x2) <= 1.5
    assert abs(ys.min() - y1) <= 1.5 and abs(ys.max() + 1 - y2) <= 1.5
    assert (out["image"][m][:, 0] > 128).mean() > 0.95  # the white rectangle is where the mask is


@pytest.fixture(scope="module")
def sem_run(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("sem_run")
    cfg = compose("train", ["experiment=shapes_sem", "backbone=test_resnet", *FAST, *SHAPES, "model.input_size=[96,96]",
                            "trainer.max_epochs=8", "data.batch_size=8", "optimizer.lr=3e-3"], output_dir=out)
    return train(cfg)


def test_semantic_learns_and_evaluate_reproduces(sem_run: dict, tmp_path: Path) -> None:
    m = sem_run["metrics"]
    print(f"shapes semantic FPN: mIoU {m['val/mIoU']:.3f} pixel acc {m['val/pixel_acc']:.3f}")
    assert m["val/mIoU"] > 0.2 and m["val/pixel_acc"] > 0.85  # background-only: mIoU ~0.13
    cfg = compose("evaluate", [f"ckpt_path={sem_run['best_ckpt']}", *SHAPES, "data.num_workers=0",
                               "data.persistent_workers=false", "trainer.enable_progress_bar=false", "visualize=2"],
                  output_dir=tmp_path)
    res = evaluate(cfg)
    assert res["metrics"]["val/mIoU"] == pytest.approx(m["val/mIoU"], abs=1e-6)
    assert "background" in res["per_class_iou"] and len(list((tmp_path / "visualizations").glob("*.png"))) == 2


def _write_mask_folder(root: Path, n: int = 6) -> None:
    """A small image/mask PNG-pair dataset: a palette PNG per image with classes 0..2 and 255 = ignore."""
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        (root / split / "images").mkdir(parents=True)
        (root / split / "masks").mkdir(parents=True)
        for i in range(n):
            mask = np.zeros((48, 64), np.uint8)
            x, y = rng.integers(0, 30), rng.integers(0, 20)
            mask[y:y + 20, x:x + 24] = 1 + i % 2
            mask[0, :] = 255
            img = np.stack([mask * 90, 255 - mask * 60, np.full_like(mask, 40)], -1).astype(np.uint8)
            Image.fromarray(img).save(root / split / "images" / f"{i}.jpg")
            pal = Image.fromarray(mask, mode="P")
            pal.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * (256 * 3 - 9))
            pal.save(root / split / "masks" / f"{i}.png")


def test_mask_folder_reader_and_training(tmp_path: Path) -> None:
    from zoo.data.mask_folder import MaskFolderDataset

    root = tmp_path / "pairs"
    _write_mask_folder(root)
    ds = MaskFolderDataset(root / "train", input_size=[32, 48], mean=[0.5] * 3, std=[0.25] * 3,
                           class_names=["bg", "a", "b"])
    s = ds[1]
    assert s["target"].shape == (32, 48) and set(s["target"].unique().tolist()) <= {0, 1, 2, 255}
    assert (s["target"] == 2).any() and (s["target"][0] == 255).all()
    assert MaskFolderDataset(root / "train", input_size=[32, 48], mean=[0.5] * 3, std=[0.25] * 3).class_names == \
        ["class_0", "class_1", "class_2"]
    cfg = compose("train", ["model=semantic", "data=mask_folder", f"data.root={root}", *FAST, "backbone=resnet10t",
                            "model.input_size=[48,64]", "data.batch_size=3", "trainer.max_epochs=1",
                            "data.extra.class_names=[bg,a,b]", "export_bundle=false"], output_dir=tmp_path / "run")
    res = train(cfg)
    assert 0.0 <= res["metrics"]["val/mIoU"] <= 1.0


def test_mask_folder_errors_name_the_file(tmp_path: Path) -> None:
    from zoo.data.coco import BadAnnotationError
    from zoo.data.mask_folder import MaskFolderDataset

    root = tmp_path / "pairs"
    _write_mask_folder(root, n=2)
    (root / "train" / "masks" / "1.png").unlink()
    with pytest.raises(FileNotFoundError, match="no mask"):
        MaskFolderDataset(root / "train", input_size=[32, 32], mean=[0.5] * 3, std=[0.25] * 3)
    ds = MaskFolderDataset(root / "val", input_size=[32, 32], mean=[0.5] * 3, std=[0.25] * 3, class_names=["bg", "a"])
    with pytest.raises(BadAnnotationError, match="holds class 2"):
        [ds[i] for i in range(len(ds))]


@pytest.mark.slow
def test_mask_rcnn_overfits_a_few_real_coco_images(tmp_path: Path, coco128: Path) -> None:
    """The instance preset (Mask R-CNN on the zoo backbone) trained on 4 coco128 images: mask AP50 clearly above
    zero on them (0.50, box AP50 0.85, after these 60 steps; 0.76 after 100 on 2 CPU cores), scored by the COCO
    evaluator from RLE-encoded masks."""
    cfg = compose("train", ["experiment=shapes_inst", *overfit(coco128, epochs=60, warmup=10),
                            "model.input_size=[192,192]", "callbacks.visualize=2"], output_dir=tmp_path)
    m = train(cfg)["metrics"]
    print(f"coco128 Mask R-CNN overfit (4 images): box AP50 {m['val/mAP50']:.3f} mask AP {m['val/segm_mAP']:.3f} "
          f"mask AP50 {m['val/segm_mAP50']:.3f}")
    assert m["val/segm_mAP50"] >= 0.3 and m["val/mAP50"] >= 0.5
    results = json.loads((tmp_path / "detections.json").read_text())
    assert results and all(isinstance(r["segmentation"]["counts"], str) for r in results)
    assert len(list((tmp_path / "visualizations").glob("*.png"))) == 2


@pytest.mark.slow
def test_semantic_overfits_a_few_real_coco_images(tmp_path: Path, coco128: Path) -> None:
    """mIoU >= 0.5 over the classes present, on a few coco128 images it trained on (0.66 after these 75 steps)."""
    cfg = compose("train", ["model=semantic", *overfit(coco128, epochs=75, warmup=10), "backbone=resnet10t",
                            "model.input_size=[128,128]", "++model.heads.seg.channels=64", "optimizer.lr=2e-3"],
                  output_dir=tmp_path)
    m = train(cfg)["metrics"]
    print(f"coco128 semantic overfit (4 images): mIoU {m['val/mIoU']:.3f}")
    assert m["val/mIoU"] >= 0.5
