"""An image's predictions do not depend on which images share its batch (issue: detections moved by up to ~22 px
when a portrait image joined the batch, and evaluate.py's mAP changed with the evaluation batch size)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

import zoo
from tests.conftest import compose
from zoo.models import create_model


def _detector(resize: str = "longest") -> torch.nn.Module:
    torch.manual_seed(0)
    spec = {"backbone": {"name": "resnet10t"}, "necks": {"fpn": {"type": "fpn", "out_channels": 64}},
            "heads": {"det": {"type": "fcos", "input": "fpn", "num_classes": 3, "score_thresh": 0.0,
                              "max_detections": 50}},
            "class_names": {"det": ["a", "b", "c"]}, "input_size": [160, 160], "resize": resize}
    return create_model(spec).eval()


def test_predictor_results_do_not_depend_on_batch_mates() -> None:
    rng = np.random.default_rng(0)
    landscape = rng.integers(0, 255, (120, 200, 3), dtype=np.uint8)
    portrait = rng.integers(0, 255, (200, 120, 3), dtype=np.uint8)
    pred = zoo.Predictor(_detector(), batch_size=4)
    alone = pred(landscape)[0]
    together = pred([portrait, landscape, portrait])[1]
    assert len(alone) == len(together) > 0
    torch.testing.assert_close(alone.boxes, together.boxes, atol=1e-3, rtol=0)
    torch.testing.assert_close(alone.scores, together.scores, atol=1e-5, rtol=0)


def test_evaluation_batches_hold_one_padded_size(coco128: Path, tmp_path: Path) -> None:
    from zoo.data.datamodule import datamodule_from_config
    from zoo.config import TrainConfig, validate

    cfg = validate(compose("train", ["model=detection", "data=coco", f"data.root={coco128}", "data.num_workers=0",
                                     "data.persistent_workers=false", "data.eval_batch_size=8",
                                     "data.limit_val_images=24"], output_dir=tmp_path), TrainConfig)
    pre = {"input_size": [256, 256], "resize": "longest", "mean": [0.5] * 3, "std": [0.5] * 3}
    dm = datamodule_from_config(cfg.data, "detection", pre, size_divisor=32, stages=("val",))
    seen = 0
    for batch in dm.val_dataloader():
        sizes = {tuple(s) for s in batch["image_sizes"]}
        padded = {((h + 31) // 32, (w + 31) // 32) for h, w in sizes}
        assert len(padded) == 1, sizes
        seen += len(batch["images"])
    assert seen == 24
