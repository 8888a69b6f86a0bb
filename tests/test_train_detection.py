"""Detection and instance segmentation end to end: learning on the embedded dataset, an overfit check on real
coco128 images, evaluate.py from the checkpoint and on an existing results json, and visualisations."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import FAST, compose, overfit
from zoo.evaluation import evaluate
from zoo.training import train

SHAPES = ["data.shapes.num_train=400", "data.shapes.num_val=100", "data.shapes.image_size=96"]


@pytest.fixture(scope="module")
def det_run(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("det_run")
    cfg = compose("train", ["experiment=shapes_det", "backbone=test_resnet", *FAST, *SHAPES, "model.input_size=[96,96]",
                            "trainer.max_epochs=6", "data.batch_size=8", "callbacks.visualize=0"], output_dir=out)
    return train(cfg)


def test_detector_learns_on_the_embedded_dataset(det_run: dict) -> None:
    m = det_run["metrics"]
    print(f"shapes FCOS: AP {m['val/mAP']:.3f} AP50 {m['val/mAP50']:.3f}")
    assert m["val/mAP50"] > 0.1 and m["val/mAP"] > 0.03
    results = json.loads((Path(det_run["output_dir"]) / "detections.json").read_text())
    assert results and {"image_id", "category_id", "bbox", "score"} <= set(results[0])
    assert {r["category_id"] for r in results} <= {1, 3, 4, 7, 9, 12}  # original (non-contiguous) ids


def test_evaluate_checkpoint_and_results_file(det_run: dict, tmp_path: Path) -> None:
    ev = compose("evaluate", [f"ckpt_path={det_run['best_ckpt']}", *SHAPES, "data.num_workers=0",
                              "data.persistent_workers=false", "trainer.enable_progress_bar=false", "visualize=3"],
                 output_dir=tmp_path / "ckpt")
    res = evaluate(ev)
    assert res["metrics"]["val/mAP"] == pytest.approx(det_run["metrics"]["val/mAP"], abs=1e-6)
    assert "Average Precision" in res["table"] and len(list((tmp_path / "ckpt" / "visualizations").glob("*.png"))) == 3
    # Score the detections json that the run wrote, as one would score someone else's.
    from zoo.data.shapes import ensure_shapes_dataset

    root = ensure_shapes_dataset(None, num_train=400, num_val=100, image_size=96)
    ev2 = compose("evaluate", [f"results={Path(res['output_dir']) / 'detections.json'}", "data=coco",
                               f"data.root={root}", "data.val_split=val"], output_dir=tmp_path / "res")
    scored = evaluate(ev2)
    assert scored["metrics"]["AP"] == pytest.approx(det_run["metrics"]["val/mAP"], abs=1e-6)
    assert json.loads((tmp_path / "res" / "metrics.json").read_text())["metrics"]["AP50"] == pytest.approx(
        det_run["metrics"]["val/mAP50"], abs=1e-6)


@pytest.mark.slow
def test_fcos_overfits_a_few_real_coco_images(tmp_path: Path, coco128: Path) -> None:
    """A detector trained on a few coco128 images reaches AP50 >= 0.5 on those images (0.99 after these 40 steps
    on 2 CPU cores)."""
    cfg = compose("train", ["model=detection", *overfit(coco128, epochs=40, warmup=10), "backbone=resnet10t",
                            "model.input_size=[256,256]", "++model.necks.fpn.out_channels=64",
                            "++model.heads.det.num_convs=2", "trainer.gradient_clip_val=10", "optimizer.lr=1e-3"],
                  output_dir=tmp_path)
    m = train(cfg)["metrics"]
    print(f"coco128 overfit (4 images): AP {m['val/mAP']:.3f} AP50 {m['val/mAP50']:.3f}")
    assert m["val/mAP50"] >= 0.5
