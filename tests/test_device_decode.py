"""``data.decode_on=device``: the workers send bytes and a drawn crop / flip, the device decodes and finishes the
batch (``zoo.data.device_decode``). Run here with the device being the CPU: the same code paths a GPU takes, with
torchvision's CPU JPEG decoder in place of nvJPEG."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import FAST, compose
from zoo.config import ConfigError

MEAN, STD = [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]
SQUARE = (200, 30, 40)


def _photo(h: int, w: int, seed: int) -> np.ndarray:
    """A smooth background with a flat-coloured square at rows h/3..h/2, columns w/4..w/2 (the annotated box)."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.stack([127 + 90 * np.sin(x / (41 + 9 * c) + y / (57 - 5 * c) + c + seed) for c in range(3)], -1)
    img[h // 3: h // 2, w // 4: w // 2] = SQUARE
    return img.clip(0, 255).astype(np.uint8)


def _coco(root: Path, sizes=((240, 320), (300, 200), (256, 256))) -> Path:
    (root / "train").mkdir(parents=True)
    (root / "annotations").mkdir()
    images, anns = [], []
    for i, (h, w) in enumerate(sizes):
        Image.fromarray(_photo(h, w, i)).save(root / "train" / f"{i}.jpg", quality=95)
        images.append({"id": i + 1, "file_name": f"{i}.jpg", "height": h, "width": w})
        x0, y0, bw, bh = w // 4, h // 3, w // 2 - w // 4, h // 2 - h // 3
        anns.append({"id": i + 1, "image_id": i + 1, "category_id": 1, "iscrowd": 0, "area": float(bw * bh),
                     "bbox": [x0, y0, bw, bh], "segmentation": [[x0, y0, x0 + bw, y0, x0 + bw, y0 + bh, x0, y0 + bh]]})
    js = {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "square"}]}
    (root / "annotations" / "instances_train.json").write_text(json.dumps(js))
    return root


def _folder(root: Path, n: int = 6) -> Path:
    for split in ("train", "val"):
        for c, name in enumerate(("a", "b")):
            d = root / split / name
            d.mkdir(parents=True)
            for i in range(n):
                img = Image.fromarray(_photo(96 + 16 * i, 128, i + 7 * c))
                img.save(d / (f"{i}.png" if i == 0 else f"{i}.jpg"), **({} if i == 0 else {"quality": 95}))
    return root


def _datamodule(data: dict, fmt, pre: dict, stages=("train", "val")):
    from zoo.data.datamodule import datamodule_from_config

    cfg = {"num_workers": 0, "pin_memory": False, "persistent_workers": False, "batch_size": 3, "val_cache_mb": 0,
           "fast_decode": False, "augment": [], **data}
    return datamodule_from_config(cfg, fmt, pre, stages=stages, boxes=fmt in ("detection", "instance"))


@pytest.mark.parametrize("fmt", ["detection", "semantic", "instance", "classification"])
def test_device_decoded_validation_batches_match_the_worker_path(tmp_path: Path, fmt: str) -> None:
    """Without augmentation the device path gives the worker path's batch: same sizes, scales, targets and padding,
    pixels equal up to the JPEG decoders' rounding (also for a PNG, decoded in the worker)."""
    if fmt == "classification":
        data = {"kind": "image_folder", "root": str(_folder(tmp_path / "f")), "train_split": "train",
                "val_split": "val", "val_fraction": None, "val_seed": 0, "multilabel": False}
    else:
        data = {"kind": "coco", "root": str(_coco(tmp_path / "c")), "train_split": "train", "val_split": "train"}
    pre = {"input_size": [128, 160], "resize": "longest", "mean": MEAN, "std": STD}
    ref = next(iter(_datamodule(data, fmt, pre).val_dataloader()))
    dm = _datamodule({**data, "decode_on": "device"}, fmt, pre)
    raw = next(iter(dm.val_dataloader()))
    assert "images" not in raw and len(raw["encoded"]) == len(ref["image_ids"])
    got = dm.on_after_batch_transfer(raw, 0)
    for key in ("image_sizes", "orig_sizes", "scales", "image_ids"):
        assert got[key] == ref[key], key
    assert got["images"].shape == ref["images"].shape and got["images"].dtype == torch.float32
    diff = (got["images"] - ref["images"]).abs()
    assert float(diff.mean()) < 0.01 and float(diff.max()) < 0.5, (float(diff.mean()), float(diff.max()))
    if fmt == "classification" or fmt == "semantic":
        assert torch.equal(got["targets"], ref["targets"])
    else:
        for a, b in zip(got["targets"], ref["targets"]):
            assert torch.equal(a["boxes"], b["boxes"]) and torch.equal(a["labels"], b["labels"])
            if fmt == "instance":
                assert torch.equal(a["masks"], b["masks"])


def test_device_decoded_training_crops_keep_boxes_and_masks_on_the_object(tmp_path: Path) -> None:
    """Random resized crops and flips drawn in the worker, applied to the pixels on the device: every kept box
    still frames the flat-coloured square in the decoded image, and the semantic map marks the same pixels."""
    data = {"kind": "coco", "root": str(_coco(tmp_path / "c")), "train_split": "train", "val_split": "train",
            "decode_on": "device", "augment": [{"type": "RandomResizedCrop", "scale": [0.3, 1.0]},
                                               {"type": "HorizontalFlip", "p": 0.5}]}
    pre = {"input_size": [96, 96], "resize": "stretch", "mean": MEAN, "std": STD}
    dm = _datamodule(data, ["detection", "semantic"], pre, stages=("train",))
    ds = dm.train_set
    np.random.seed(0)
    colour = (torch.tensor(SQUARE) / 255.0 - torch.tensor(MEAN)) / torch.tensor(STD)
    checked = 0
    for _ in range(8):
        batch = dm.on_after_batch_transfer(dm.collate([ds[i] for i in range(len(ds))]), 0)
        for img, det, sem in zip(batch["images"], batch["targets"]["detection"], batch["targets"]["semantic"]):
            for x0, y0, x1, y1 in det["boxes"].round().long().tolist():
                if x1 - x0 < 6 or y1 - y0 < 6:
                    continue
                inner = img[:, y0 + 2: y1 - 2, x0 + 2: x1 - 2]
                assert torch.allclose(inner.mean((1, 2)), colour, atol=0.25), (inner.mean((1, 2)), colour)
                assert float((sem[y0 + 2: y1 - 2, x0 + 2: x1 - 2] == 1).float().mean()) > 0.95
                checked += 1
    assert checked >= 8


def test_drawn_windows_follow_the_scale_and_ratio_ranges() -> None:
    from zoo.data.device_decode import draw_window, geometry_plan

    plan = geometry_plan([{"type": "RandomResizedCrop", "scale": [0.25, 0.5], "ratio": [0.5, 2.0]},
                          {"type": "HorizontalFlip", "p": 0.5}])
    rng = np.random.default_rng(0)
    wins = [draw_window(400, 600, plan, rng) for _ in range(400)]
    areas = np.array([w[2] * w[3] / (400 * 600) for w, _ in wins])
    ratios = np.array([w[3] / w[2] for w, _ in wins])
    assert areas.min() > 0.24 and areas.max() < 0.51 and ratios.min() > 0.49 and ratios.max() < 2.05
    assert all(0 <= w[0] and w[0] + w[2] <= 400 and 0 <= w[1] and w[1] + w[3] <= 600 for w, _ in wins)
    assert 0.4 < np.mean([f for _, f in wins]) < 0.6
    assert draw_window(400, 600, geometry_plan([]), rng) == ((0, 0, 400, 600), False)


@pytest.mark.parametrize("op", [{"type": "ColorJitter"}, {"type": "RandomResizedCrop", "interpolation": 0}])
def test_ops_the_device_cannot_run_are_refused_by_name(op: dict) -> None:
    from zoo.data.device_decode import geometry_plan

    with pytest.raises(ConfigError, match=r"decode_on=(device|workers)") as err:
        geometry_plan([op])
    assert op["type"] in str(err.value)


def test_kinds_without_files_are_refused_for_device_decode() -> None:
    from zoo.data.datamodule import datamodule_from_config

    cfg = compose("train", ["data=shapes", "data.decode_on=device", "data.shapes.num_train=8", "data.shapes.num_val=4"])
    with pytest.raises(ConfigError, match="data.decode_on=workers"):
        datamodule_from_config(cfg.data, "classification",
                               {"input_size": [32, 32], "resize": "stretch", "mean": MEAN, "std": STD})


def test_training_with_device_decode_runs_through_train_py(tmp_path: Path) -> None:
    """``python train.py data=image_folder data.decode_on=device``: batches decoded on the training device (here
    the CPU) train, validate and export like the worker path."""
    from zoo.training import train

    root = _folder(tmp_path / "f", n=4)
    res = train(compose("train", ["data=image_folder", f"data.root={root}", "data.decode_on=device",
                                  "backbone=test_resnet", "model.input_size=[48,48]", "data.batch_size=4",
                                  "trainer.max_epochs=1", *FAST], output_dir=tmp_path / "run"))
    assert res["bundle"] and "val/top1" in res["metrics"]
