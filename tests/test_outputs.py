"""Outputs users expect from a run, the predict command and ONNX detection with NMS in the graph.

* Training / evaluation outputs: training curves from the CSV log, confusion matrices (classification and
  semantic; PNG + nested list in metrics.json), per-class accuracy / IoU (metrics.json and the console), detection
  PR and F1-vs-score curves, validation loss for segmentation, ground truth beside predictions in the
  visualisations, one progress line per epoch (console without a progress bar; train.log / evaluate.log under
  Hydra), the model summary, TensorBoard images, loggers by name (wandb / mlflow offline by default).
* ``predict.py`` / ``zoo-predict``: images, folders, globs and videos; per-head outputs (COCO results json, PNG class
  masks, embeddings .npy + index); ``plot()`` / ``save()`` of the typed results.
* ``export_onnx(..., postprocess=True)``: decoding and batched NMS in the graph for FCOS and RetinaNet, checked
  against ``zoo.Predictor`` with onnxruntime; semantic output axes labelled.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import FAST, ROOT, SMALL_SHAPES, compose
from zoo.training import train

TINY = [*SMALL_SHAPES, *FAST, "backbone=test_resnet", "model.input_size=[64,64]", "data.batch_size=16"]
SHAPE_CLASSES = ["circle", "square", "triangle", "star", "hexagon", "cross"]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "NO_ALBUMENTATIONS_UPDATE": "1"}


def _train(out: Path, overrides: list[str]) -> dict:
    """``train(cfg)`` with its console output captured (``emit`` prints when no log handler shows it)."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        res = train(compose("train", overrides, output_dir=out))
    res["stdout"] = buf.getvalue()
    return res


def _png(path: Path, min_size: tuple[int, int] = (100, 100)) -> Image.Image:
    """Open a PNG with PIL and check it is a real picture of at least ``min_size`` (w, h)."""
    assert path.is_file(), path
    im = Image.open(path)
    im.load()
    assert im.format == "PNG" and im.mode in ("RGB", "RGBA", "L", "P"), (im.format, im.mode)
    assert im.size[0] >= min_size[0] and im.size[1] >= min_size[1], im.size
    return im


@pytest.fixture(scope="module")
def cls_run(tmp_path_factory) -> dict:
    # validation every epoch: these outputs are per validated epoch (the auto schedule may skip epoch 0's)
    return _train(tmp_path_factory.mktemp("out_cls"), ["experiment=shapes_cls", *TINY, "trainer.max_epochs=2",
                                                       "trainer.check_val_every_n_epoch=1", "callbacks.visualize=2",
                                                       "logger.names=[csv,tensorboard]"])


@pytest.fixture(scope="module")
def det_run(tmp_path_factory) -> dict:
    return _train(tmp_path_factory.mktemp("out_det"), ["experiment=shapes_det", *TINY, "trainer.max_epochs=1",
                                                       "callbacks.visualize=2", "callbacks.visualize_score_thresh=0.0"])


@pytest.fixture(scope="module")
def sem_run(tmp_path_factory) -> dict:
    # no logger at all: the training curves come from the epoch history the progress callback keeps
    return _train(tmp_path_factory.mktemp("out_sem"), ["experiment=shapes_sem", *TINY, "trainer.max_epochs=2",
                                                       "logger.names=[]", "callbacks.visualize=1"])


# ---------------------------------------------------------------------------------------------------- item 4: outputs
def test_classification_run_writes_curves_confusion_matrix_and_console_lines(cls_run: dict) -> None:
    out = Path(cls_run["output_dir"])
    _png(out / "plots" / "training_curves.png", (600, 250))
    _png(out / "plots" / "confusion_matrix.png", (300, 300))
    saved = json.loads((out / "metrics.json").read_text())
    cm = np.array(saved["confusion_matrix"])
    assert cm.shape == (6, 6) and cm.dtype.kind == "i" and 28 <= cm.sum() <= 32  # each labelled image once
    acc = saved["per_class_accuracy"]
    assert list(acc) == SHAPE_CLASSES
    for i, name in enumerate(SHAPE_CLASSES):  # per-class accuracy is the confusion matrix's row recall
        assert acc[name] == (pytest.approx(cm[i, i] / cm[i].sum()) if cm[i].sum() else None)
    assert np.trace(cm) / cm.sum() == pytest.approx(saved["metrics"]["val/top1"], abs=1e-6)
    assert sorted(Path(p).name for p in saved["plots"]) == ["confusion_matrix.png"]
    text = cls_run["stdout"]
    # progress bar off: one line per epoch with the main metrics, the model summary, the per-class table
    assert "epoch 1/2: train/loss" in text and "epoch 2/2: train/loss" in text and "val/top1" in text
    assert "model summary" in text and "Trainable params" in text and "model.backbone" in text
    assert "per-class accuracy" in text and "hexagon" in text


def test_training_curves_read_the_csv_log_per_epoch(cls_run: dict) -> None:
    from zoo.plots import read_csv_log

    hist = read_csv_log(Path(cls_run["output_dir"]) / "csv" / "metrics.csv")
    # the final validation of the best checkpoint adds a row after the last epoch: the curves are drawn before it
    assert sorted(hist["train/loss"]) == [0, 1] and {0, 1} <= set(hist["val/top1"])
    assert "train/loss_epoch" not in hist and "val/loss" in hist


def test_plots_are_logged_to_tensorboard_as_images(cls_run: dict) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = set()
    for f in (Path(cls_run["output_dir"]) / "tensorboard").glob("events.out.tfevents.*"):
        ea = EventAccumulator(str(f), size_guidance={"images": 0})
        ea.Reload()
        tags |= set(ea.Tags()["images"])
    assert {"plots/training_curves", "plots/confusion_matrix"} <= tags


def test_classification_visualisations_put_ground_truth_beside_prediction(cls_run: dict) -> None:
    files = sorted((Path(cls_run["output_dir"]) / "visualizations").glob("*.png"))
    assert len(files) == 2
    for f in files:
        im = _png(f, (2 * 96, 96))
        assert im.mode == "RGB" and im.size[0] >= 2 * 96 and im.size[1] > 96  # two 96-px panels under titles


def test_detection_run_writes_pr_and_f1_curves_and_full_size_drawings(det_run: dict) -> None:
    out = Path(det_run["output_dir"])
    for name in ("pr_curve.png", "f1_curve.png", "training_curves.png"):
        _png(out / "plots" / name, (400, 300))
    saved = json.loads((out / "metrics.json").read_text())
    assert "bbox_best_f1" in saved and "Average Precision" in saved["table"]
    assert {Path(p).name for p in saved["plots"]} == {"pr_curve.png", "f1_curve.png"}
    files = sorted((out / "visualizations").glob("*.png"))
    assert len(files) == 2
    for f in files:  # drawn at the original 96 px, not the 64 px input
        assert _png(f, (2 * 96, 96)).size[0] >= 2 * 96
    assert "val/mAP" in det_run["stdout"] and "epoch 1/1" in det_run["stdout"]


def test_segmentation_logs_validation_loss_and_per_class_iou(sem_run: dict) -> None:
    m = sem_run["metrics"]
    assert "val/loss" in m and np.isfinite(m["val/loss"]) and "val/mIoU" in m
    out = Path(sem_run["output_dir"])
    saved = json.loads((out / "metrics.json").read_text())
    names = ["background", *SHAPE_CLASSES]
    assert list(saved["per_class_iou"]) == names and list(saved["per_class_accuracy"]) == names
    cm = np.array(saved["confusion_matrix"])
    assert cm.shape == (7, 7) and cm.sum() > 0
    assert cm.diagonal().sum() / cm.sum() == pytest.approx(m["val/pixel_acc"], abs=1e-5)
    _png(out / "plots" / "confusion_matrix.png", (300, 300))
    _png(out / "plots" / "training_curves.png", (600, 250))  # from the in-memory history (no CSV logger)
    assert "per-class accuracy and IoU" in sem_run["stdout"] and "val/loss" in sem_run["stdout"]
    assert len(list((out / "visualizations").glob("*.png"))) == 1


def test_pr_and_f1_curves_from_a_coco_evaluation(tmp_path: Path, coco128: Path) -> None:
    from tests.coco_fakes import fake_results
    from zoo.metrics.coco_eval import evaluate_coco, load_coco_gt
    from zoo.plots import best_f1, f1_from_coco, plot_f1_curves, plot_pr_curves

    ann = tmp_path / "instances.json"
    shutil.copy(coco128 / "annotations" / "instances_train2017.json", ann)
    res = evaluate_coco(str(ann), fake_results(load_coco_gt(str(ann))), "bbox")
    assert res.scores is not None and res.scores.shape == res.precision.shape
    names = list(res.per_class_ap)
    _png(plot_pr_curves(res.precision, names, tmp_path / "pr.png"), (600, 450))
    _png(plot_f1_curves(res.precision, res.scores, names, tmp_path / "f1.png"), (600, 450))
    best = best_f1(res.precision, res.scores, names)
    assert best and all(0 < v["f1"] <= 1 and 0 < v["score"] <= 1 for v in best.values())
    s, f1 = f1_from_coco(res.precision, res.scores, names)["person"]
    assert (np.diff(s) >= 0).all() and f1.max() == pytest.approx(best["person"]["f1"], abs=1e-4)


def test_train_log_gets_the_progress_lines(tmp_path: Path) -> None:
    run = tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "train.py"), "experiment=shapes_cls", *TINY, "trainer.max_epochs=1",
           "export_bundle=false", f"hydra.run.dir={run}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=str(tmp_path), env=ENV, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = (run / "train.log").read_text()
    assert "epoch 1/1: train/loss" in log and "model summary" in log and "per-class accuracy" in log
    assert "epoch 1/1: train/loss" in proc.stdout  # progress bar off: the line is on the console too


def test_evaluate_log_gets_the_progress_lines(tmp_path: Path, cls_run: dict) -> None:
    ev = tmp_path / "ev"
    cmd = [sys.executable, str(ROOT / "evaluate.py"), f"ckpt_path={cls_run['best_ckpt']}", *SMALL_SHAPES,
           "data.num_workers=0", "data.persistent_workers=false", "trainer.enable_progress_bar=false",
           f"hydra.run.dir={ev}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=str(tmp_path), env=ENV, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = (ev / "evaluate.log").read_text()
    assert "validation: " in log and "val/top1" in log and "per-class accuracy" in log
    _png(ev / "plots" / "confusion_matrix.png", (300, 300))


def test_loggers_by_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    import lightning.pytorch.loggers as pl_loggers

    from zoo.training import build_loggers

    cfg = compose("train", ["logger.names=[csv,tensorboard]"], output_dir=tmp_path)
    assert [type(lg).__name__ for lg in build_loggers(cfg, tmp_path)] == ["ResumableCSVLogger", "TensorBoardLogger"]
    with pytest.raises(ValueError, match="unknown; use any of csv, tensorboard, wandb, mlflow"):
        build_loggers(compose("train", ["logger.names=[neptune]"], output_dir=tmp_path), tmp_path)

    real = importlib.util.find_spec
    missing = {"wandb", "mlflow"}
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n in missing else real(n, *a))
    for name in ("wandb", "mlflow"):
        with pytest.raises(ImportError, match=f"pip install {name}"):
            build_loggers(compose("train", [f"logger.names=[{name}]"], output_dir=tmp_path), tmp_path)

    made = {}

    def stub(kind):
        def make(**kwargs):
            made[kind] = kwargs
            return object()
        return make

    missing.clear()  # pretend both are installed: check what the loggers are given
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: object() if n in ("wandb", "mlflow") else real(n, *a))
    monkeypatch.setattr(pl_loggers, "WandbLogger", stub("wandb"))
    monkeypatch.setattr(pl_loggers, "MLFlowLogger", stub("mlflow"))
    cfg = compose("train", ["logger.names=[wandb,mlflow]", "task_name=shapes_x"], output_dir=tmp_path)
    assert len(build_loggers(cfg, tmp_path)) == 2
    assert made["wandb"]["offline"] is True and made["wandb"]["save_dir"] == str(tmp_path)
    assert made["wandb"]["project"] == "shapes_x"
    uri = made["mlflow"]["tracking_uri"]
    assert uri.startswith("file:") and uri == (tmp_path / "mlruns").as_uri()
    assert made["mlflow"]["experiment_name"] == "shapes_x"
    cfg = compose("train", ["logger.names=[wandb]", "logger.wandb.offline=false", "logger.wandb.project=p"],
                  output_dir=tmp_path)
    build_loggers(cfg, tmp_path)
    assert made["wandb"]["offline"] is False and made["wandb"]["project"] == "p"


# ---------------------------------------------------------------------------------------------------- results: plot/save
def _image(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(40, 200, (h, w, 3), dtype=np.uint8)


def test_results_plot_and_save(tmp_path: Path) -> None:
    from zoo.drawing import class_color, line_width_for
    from zoo.results import Classification, Detections, Embedding, InstanceSegmentation, SemanticSegmentation

    img = _image(300, 400)
    det = Detections(boxes=torch.tensor([[10.0, 20.0, 200.0, 150.0], [220.0, 100.0, 390.0, 290.0]]),
                     scores=torch.tensor([0.9, 0.2]), labels=torch.tensor([0, 2]), names=["cat", "dog"],
                     category_ids=[1, 3], image_size=(300, 400))
    drawn = det.plot(img)
    assert drawn.shape == img.shape and drawn.dtype == np.uint8 and not np.array_equal(drawn, img)
    assert tuple(drawn[100, 10]) == class_color(0)  # left edge of the first box, in its class colour
    few = det.plot(img, score_thresh=0.5)
    assert tuple(few[200, 220]) != class_color(2) and tuple(drawn[200, 220]) == class_color(2)
    assert isinstance(det.plot(img, pil=True), Image.Image)
    with pytest.raises(ValueError, match="draw on the image that was predicted on"):
        det.plot(_image(30, 40))
    # line width scales with the image: 1 px at 300 px, 4 px at 1200 px
    big = Detections(boxes=det.boxes * 3, scores=det.scores, labels=det.labels, names=det.names,
                     category_ids=None, image_size=(900, 1200)).plot()
    assert line_width_for(900, 1200) == 4
    assert all(tuple(big[300, 30 + i]) == class_color(0) for i in range(4))
    assert tuple(big[300, 30 + 5]) != class_color(0)
    _png(det.save(tmp_path / "det.png", image=img), (400, 300))
    assert json.loads(det.save(tmp_path / "d.json").read_text())["names"] == det.names

    masks = torch.zeros(2, 300, 400, dtype=torch.bool)
    masks[0, 40:120, 30:180] = True
    inst = InstanceSegmentation(boxes=det.boxes, scores=det.scores, labels=det.labels, names=det.names,
                                category_ids=None, image_size=(300, 400), masks=masks)
    assert not np.array_equal(inst.plot(img)[80, 100], drawn[80, 100])  # the mask is blended in

    mask = torch.zeros(300, 400, dtype=torch.long)
    mask[50:100, 50:200] = 2
    sem = SemanticSegmentation(mask=mask, class_names=["background", "a", "b"])
    over = sem.plot(img, legend=False)
    assert np.array_equal(over[10, 300], img[10, 300]) and not np.array_equal(over[70, 100], img[70, 100])
    saved = Image.open(sem.save(tmp_path / "mask.png"))
    assert saved.mode == "L" and np.array_equal(np.asarray(saved), mask.numpy())
    _png(sem.save(tmp_path / "overlay.png", image=img), (400, 300))
    assert np.array_equal(np.load(sem.save(tmp_path / "mask.npy")), mask.numpy())

    cls = Classification(labels=["cat", "dog"], scores=[0.8, 0.1], label_ids=[0, 1], probs=torch.tensor([0.8, 0.1, 0.1]),
                         class_names=["cat", "dog", "x"])
    assert cls.plot(img).shape == img.shape and not np.array_equal(cls.plot(img), img)
    with pytest.raises(ValueError, match="needs the image"):
        cls.plot(None)
    emb = Embedding(vector=torch.nn.functional.normalize(torch.randn(8), dim=0))
    assert np.load(emb.save(tmp_path / "e.npy")).shape == (8,)
    with pytest.raises(ValueError, match="cannot save"):
        emb.save(tmp_path / "e.txt")


def test_results_module_stays_lean() -> None:
    code = ("import sys, numpy as np, torch, zoo.results as r\n"
            "d = r.Detections(torch.zeros(1, 4) + torch.tensor([1., 1., 5., 5.]), torch.ones(1), torch.zeros(1).long(),"
            " ['a'], None, (8, 8))\n"
            "d.plot(np.zeros((8, 8, 3), np.uint8))\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('matplotlib', 'lightning', 'hydra')))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, cwd=str(ROOT),
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "[]"


# ---------------------------------------------------------------------------------------------------- item 5: predict
CLASSES = ["a", "b", "c"]


def _multi_head_bundle(path: Path) -> Path:
    from zoo.hub.api import model_meta
    from zoo.hub.bundle import save_bundle
    from zoo.models import create_model

    torch.manual_seed(0)
    spec = {"backbone": {"name": "resnet10t"}, "necks": {"fpn": {"type": "fpn", "out_channels": 64}},
            "heads": {"cls": {"type": "classification", "num_classes": 3},
                      "det": {"type": "fcos", "num_convs": 1, "input": "fpn", "num_classes": 3},
                      "seg": {"type": "semantic_fpn", "num_classes": 4, "channels": 16, "fpn_channels": 16},
                      "emb": {"type": "embedding", "embedding_dim": 16}},
            "class_names": {"cls": CLASSES, "det": CLASSES, "seg": ["background", *CLASSES]},
            "extra": {"category_ids": {"det": [3, 7, 9]}},
            "input_size": [64, 64], "task": "multitask"}
    model = create_model(spec, load_backbone_weights=False)
    return save_bundle(path, model.state_dict(), model_meta(model.spec))


def _image_folder(path: Path, sizes=((50, 70), (90, 40), (64, 64))) -> Path:
    path.mkdir(parents=True)
    for i, (h, w) in enumerate(sizes):
        Image.fromarray(_image(h, w, seed=i)).save(path / f"im{i}.png")
    (path / "notes.txt").write_text("not an image")
    return path


def test_predict_cli_writes_every_head_into_its_folder(tmp_path: Path) -> None:
    bundle = _multi_head_bundle(tmp_path / "bundle")
    src = _image_folder(tmp_path / "imgs")
    out = tmp_path / "pred"
    cmd = [sys.executable, str(ROOT / "predict.py"), f"ckpt={bundle}", f"source={src}", "draw_score_thresh=0.0",
           "image_format=png", f"hydra.run.dir={out}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=str(tmp_path), env=ENV, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "predict: 3 image(s)" in proc.stdout and "100%" in proc.stderr  # tqdm bar
    assert "predict: 3 image(s)" in (out / "predict.log").read_text()
    for head in ("cls", "det", "seg", "emb"):
        meta = json.loads((out / head / "predictions.json").read_text())
        assert meta["head"] == head and [e["name"] for e in meta["predictions"]] == ["im0", "im1", "im2"]
    cls = json.loads((out / "cls" / "predictions.json").read_text())["predictions"]
    assert cls[0]["labels"][0] in CLASSES and len(cls[0]["scores"]) == 3
    for head in ("cls", "det", "seg"):
        for e in json.loads((out / head / "predictions.json").read_text())["predictions"]:
            im = Image.open(out / head / e["image"])
            assert im.size == (e["width"], e["height"])  # drawn at the original resolution
    coco = json.loads((out / "det" / "detections.json").read_text())
    assert coco and {"image_id", "category_id", "bbox", "score"} <= set(coco[0])
    assert {d["category_id"] for d in coco} <= {3, 7, 9} and {d["image_id"] for d in coco} <= {1, 2, 3}
    images = json.loads((out / "det" / "images.json").read_text())
    assert [i["id"] for i in images["images"]] == [1, 2, 3]
    assert images["categories"] == [{"id": 3, "name": "a"}, {"id": 7, "name": "b"}, {"id": 9, "name": "c"}]
    mask = np.asarray(Image.open(out / "seg" / "masks" / "im1.png"))
    assert mask.shape == (90, 40) and mask.max() < 4
    emb = np.load(out / "emb" / "embeddings.npy")
    index = json.loads((out / "emb" / "embeddings.json").read_text())
    assert emb.shape == (3, 16) and index["dim"] == 16 and [i["index"] for i in index["items"]] == [0, 1, 2]
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-4)
    assert not (out / "emb" / "images").exists()


def test_predict_matches_the_predictor(tmp_path: Path) -> None:
    import zoo
    from zoo.prediction import predict

    bundle = _multi_head_bundle(tmp_path / "bundle")
    src = _image_folder(tmp_path / "imgs")
    res = predict(compose("predict", [f"ckpt={bundle / 'model.json'}", f"source={src}/*.png", "progress=false",
                                      "draw=false", "heads=[det,emb]"], output_dir=tmp_path / "out"))
    assert res["num_images"] == 3 and set(res["heads"]) == {"det", "emb"}
    ref = zoo.Predictor(zoo.load(bundle), heads=["det", "emb"])([src / f"im{i}.png" for i in range(3)])
    coco = json.loads((tmp_path / "out" / "det" / "detections.json").read_text())
    assert len(coco) == sum(len(r["det"]) for r in ref)
    first = [d for d in coco if d["image_id"] == 1]
    np.testing.assert_allclose([d["score"] for d in first], ref[0]["det"].scores.numpy(), atol=1e-6)
    np.testing.assert_allclose(np.load(tmp_path / "out" / "emb" / "embeddings.npy"),
                               torch.stack([r["emb"].vector for r in ref]).numpy(), atol=1e-5)
    assert not (tmp_path / "out" / "det" / "images").exists()


def test_predict_from_a_run_checkpoint_and_a_video(tmp_path: Path, cls_run: dict) -> None:
    cv2 = pytest.importorskip("cv2")
    from zoo.prediction import main

    video = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 5, (80, 60))
    assert writer.isOpened()
    for i in range(6):
        writer.write(np.full((60, 80, 3), 40 * i, dtype=np.uint8))
    writer.release()
    out = tmp_path / "out"
    assert main([f"ckpt={cls_run['best_ckpt']}", f"source={video}", "video_stride=2", "progress=false",
                 f"paths.output_dir={out}"]) == 0
    meta = json.loads((out / "predictions.json").read_text())  # one head: no subfolder
    assert [e["frame"] for e in meta["predictions"]] == [0, 2, 4]
    assert [e["name"] for e in meta["predictions"]] == ["clip_000000", "clip_000002", "clip_000004"]
    assert meta["kind"] == "classification" and meta["class_names"] == SHAPE_CLASSES
    assert Image.open(out / meta["predictions"][0]["image"]).size == (80, 60)
    assert (out / "predict.log").is_file()


def test_predict_errors_are_clear(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    from zoo import prediction
    from zoo.prediction import PredictError, main, predict, read_video

    bundle = _multi_head_bundle(tmp_path / "bundle")
    with pytest.raises(PredictError, match="does not exist"):
        predict(compose("predict", [f"ckpt={bundle}", f"source={tmp_path / 'nope'}"], output_dir=tmp_path / "o"))
    with pytest.raises(PredictError, match="matches no file"):
        predict(compose("predict", [f"ckpt={bundle}", f"source={tmp_path}/*.jpg"], output_dir=tmp_path / "o"))
    with pytest.raises(PredictError, match="give source="):
        predict(compose("predict", [f"ckpt={bundle}"], output_dir=tmp_path / "o"))
    monkeypatch.setattr(prediction, "_video_backends", lambda: [])
    (tmp_path / "v.mp4").write_bytes(b"\0" * 64)
    with pytest.raises(PredictError, match="no video reader is installed: pip install imageio"):
        list(read_video(tmp_path / "v.mp4"))
    assert main(["ckpt=x", "sorce=y"]) == 2 and "sorce" in capsys.readouterr().err
    assert main(["--help"]) == 0 and "zoo-predict ckpt=" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------------- item 6: ONNX
def _det_model(head: str, resize: str = "stretch"):
    from zoo.models import create_model

    torch.manual_seed(0)
    spec = {"backbone": {"name": "resnet10t"}, "necks": {"fpn": {"type": "fpn", "out_channels": 64}},
            "heads": {"det": {"type": head, "num_convs": 1, "input": "fpn", "num_classes": 3}},
            "class_names": {"det": CLASSES}, "input_size": [64, 64], "resize": resize, "task": "detection"}
    model = create_model(spec, load_backbone_weights=False).eval()
    with torch.no_grad():  # spread the random classifier's scores so that the ranking is not a tie
        for name, p in model.heads["det"].named_parameters():
            if name.startswith(("cls_logits", "centerness")):
                p.normal_(0, 0.1)
    return model


def _ort(path: Path):
    ort = pytest.importorskip("onnxruntime")
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _run(sess, batch: torch.Tensor, sizes) -> dict[str, np.ndarray]:
    names = [o.name for o in sess.get_outputs()]
    feed = {"images": batch.numpy(), "image_sizes": np.asarray(sizes, dtype=np.float32)}
    return dict(zip(names, sess.run(None, feed)))


def _same_detections(boxes, scores, labels, ref_boxes, ref_scores, ref_labels, atol=1e-3) -> None:
    """The same detections, up to the order of equal scores."""
    assert len(boxes) == len(ref_boxes)
    free = list(range(len(ref_boxes)))
    for b, s, lab in zip(boxes, scores, labels):
        match = [j for j in free if int(ref_labels[j]) == int(lab) and abs(float(ref_scores[j]) - float(s)) < 1e-4
                 and np.abs(np.asarray(ref_boxes[j]) - np.asarray(b)).max() <= atol]
        assert match, f"no reference detection for label {lab} score {s} box {b}"
        free.remove(match[0])


@pytest.mark.parametrize("head", ["fcos", "retinanet"])
def test_onnx_with_nms_matches_the_predictor(head: str, tmp_path: Path) -> None:
    from zoo.hub.bundle import read_bundle_meta
    from zoo.hub.export import export_onnx
    from zoo.predictor import Predictor
    from zoo.preprocess import boxes_to_original

    model = _det_model(head)
    path = export_onnx(model, tmp_path / "onnx", postprocess=True, postprocess_options={"max_detections": 50})
    meta = read_bundle_meta(path.parent)["onnx"]
    assert [o["name"] for o in meta["outputs"]] == ["det.boxes", "det.labels", "det.num_detections", "det.scores"]
    assert meta["outputs"][0]["shape"] == ["batch", 50, 4] and meta["outputs"][0]["axes"] == ["batch", "detections", "xyxy"]
    assert meta["postprocess"]["det"]["max_detections"] == 50 and [i["name"] for i in meta["inputs"]] == [
        "images", "image_sizes"]
    import onnx

    assert "NonMaxSuppression" in {n.op_type for n in onnx.load(str(path)).graph.node}
    sess = _ort(path)
    pred = Predictor(model, max_detections=50)
    images = [_image(64, 64, 1), _image(50, 90, 2), _image(100, 40, 3)]
    batch, infos = pred.preprocess(images)  # stretch: every image fills the 64x64 input
    got = _run(sess, batch, [list(i.size) for i in infos])  # one batch of 3 (dynamic batch axis)
    refs = pred(images)
    for i, (ref, info) in enumerate(zip(refs, infos)):
        n = int(got["det.num_detections"][i])
        assert n == len(ref) and n > 0
        boxes = boxes_to_original(torch.from_numpy(got["det.boxes"][i, :n].copy()), info)
        _same_detections(boxes.numpy(), got["det.scores"][i, :n], got["det.labels"][i, :n], ref.boxes.numpy(),
                         ref.scores.numpy(), ref.labels.numpy())
        assert (np.diff(got["det.scores"][i, :n]) <= 1e-7).all()  # best first
        assert (got["det.labels"][i, n:] == -1).all() and (got["det.scores"][i, n:] == 0).all()
    one = _run(sess, batch[1:2], [list(infos[1].size)])
    assert int(one["det.num_detections"][0]) == int(got["det.num_detections"][1])


def test_onnx_with_nms_clips_to_the_valid_image_size(tmp_path: Path) -> None:
    from zoo.hub.export import export_onnx

    model = _det_model("fcos", resize="longest")
    path = export_onnx(model, tmp_path / "onnx", postprocess=True)
    x = torch.randn(2, 3, 64, 64)
    sizes = [[40, 64], [64, 28]]  # letterboxed content inside the padded 64x64 input
    got = _run(_ort(path), x, sizes)
    with torch.inference_mode():
        ref = model.heads["det"].predict(model(x)["det"], [tuple(s) for s in sizes])
    for i in range(2):
        n = int(got["det.num_detections"][i])
        _same_detections(got["det.boxes"][i, :n], got["det.scores"][i, :n], got["det.labels"][i, :n],
                         ref[i]["boxes"].numpy(), ref[i]["scores"].numpy(), ref[i]["labels"].numpy())
        assert (got["det.boxes"][i, :n, 0::2] <= sizes[i][1]).all() and (got["det.boxes"][i, :n, 1::2] <= sizes[i][0]).all()


def test_traceable_detections_equal_the_eager_post_processing() -> None:
    from zoo.heads.detection.export import traceable_detections
    from zoo.heads.detection.postprocess import postprocess_detections

    g = torch.Generator().manual_seed(0)
    xy = torch.rand(2, 300, 2, generator=g) * 80
    boxes = torch.cat([xy, xy + torch.rand(2, 300, 2, generator=g) * 40], -1)
    scores = torch.rand(2, 300, 4, generator=g) ** 3
    sizes = [(90, 100), (60, 120)]
    opts = dict(score_thresh=0.2, nms_thresh=0.5, max_detections=30, pre_nms_topk=200)
    ref = postprocess_detections(boxes, scores, sizes, **opts)
    got = traceable_detections(boxes, scores, torch.tensor(sizes, dtype=torch.float32), **opts)
    for i in range(2):
        n = int(got["num_detections"][i])
        assert n == len(ref[i]["boxes"]) == 30
        torch.testing.assert_close(got["boxes"][i, :n], ref[i]["boxes"])
        torch.testing.assert_close(got["scores"][i, :n], ref[i]["scores"])
        assert torch.equal(got["labels"][i, :n], ref[i]["labels"])


def test_onnx_semantic_axes_are_labelled(tmp_path: Path) -> None:
    import onnx

    from zoo.hub.bundle import read_bundle_meta
    from zoo.hub.export import ExportError, export_onnx
    from zoo.models import create_model

    model = create_model({"backbone": {"name": "resnet10t"},
                          "heads": {"seg": {"type": "semantic_fpn", "num_classes": 4, "channels": 16, "fpn_channels": 16}},
                          "input_size": [64, 64], "task": "semantic"}, load_backbone_weights=False).eval()

    def dims(p):
        out = onnx.load(str(p)).graph.output[0]
        return [d.dim_param or d.dim_value for d in out.type.tensor_type.shape.dim]

    path = export_onnx(model, tmp_path / "fixed")
    assert dims(path) == ["batch", 4, 16, 16]  # the height axis is no longer called "batch"
    assert read_bundle_meta(path.parent)["onnx"]["outputs"][0]["axes"] == ["batch", "classes", "height", "width"]
    assert dims(export_onnx(model, tmp_path / "dyn", dynamic_size=True)) == ["batch", 4, "out_height", "out_width"]
    assert dims(export_onnx(model, tmp_path / "static", dynamic_batch=False)) == [2, 4, 16, 16]
    with pytest.raises(ExportError, match="one-stage detection heads"):
        export_onnx(model, tmp_path / "nms", postprocess=True)


def test_zoo_export_cli_onnx_nms(tmp_path: Path) -> None:
    from zoo.hub.bundle import read_bundle_meta
    from zoo.hub.export import main
    from zoo.tasks.multitask import MultiTask

    torch.manual_seed(0)
    spec = {"backbone": {"name": "resnet10t"}, "necks": {"fpn": {"type": "fpn", "out_channels": 64}},
            "heads": {"det": {"type": "retinanet", "num_convs": 1, "input": "fpn", "num_classes": 3}},
            "class_names": {"det": CLASSES}, "input_size": [64, 64], "task": "detection"}
    task = MultiTask(spec=spec, optimizer={"name": "adamw", "lr": 1e-3, "weight_decay": 0.0},
                     scheduler={"name": "none"}, options={"postprocess": {"score_thresh": 0.1}},
                     data_info={"format": "detection"})
    ckpt = tmp_path / "best.ckpt"
    torch.save({"state_dict": task.state_dict(), "hyper_parameters": dict(task.hparams), "epoch": 1, "global_step": 2},
               ckpt)
    assert main([str(ckpt), str(tmp_path / "bundle"), "--onnx-nms", "--max-detections", "20"]) == 0
    meta = read_bundle_meta(tmp_path / "bundle" / "onnx_nms")["onnx"]
    # the bundle's post-processing defaults (score_thresh from training), with the command line over them
    assert meta["postprocess"]["det"]["score_thresh"] == 0.1 and meta["postprocess"]["det"]["max_detections"] == 20
    got = _run(_ort(tmp_path / "bundle" / "onnx_nms" / "model.onnx"), torch.randn(1, 3, 64, 64), [[64, 64]])
    assert got["det.boxes"].shape == (1, 20, 4) and got["det.labels"].dtype == np.int64
