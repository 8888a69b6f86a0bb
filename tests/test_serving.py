"""Serving: checkpoint -> bundle export, zoo.load, Predictor (typed results, evaluation-identical preprocessing),
ONNX / TorchScript parity, the lean import path and hubconf.

Models are tiny (resnet10t, 64 px, random init, 3 classes); every export/load runs in seconds on CPU.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import zoo
from zoo.hub import registry as registry_mod
from zoo.hub.api import checkpoint_parts, head_kind, load, serving_spec
from zoo.hub.bundle import BundleError, BundleIntegrityError, read_bundle, read_bundle_meta, read_lightning_checkpoint, verify_file
from zoo.hub.export import ExportError, export_checkpoint, export_onnx, export_torchscript, main
from zoo.models import create_model
from zoo.predictor import Predictor, to_rgb_array
from zoo.results import Classification, Detections, Embedding, InstanceSegmentation, SemanticSegmentation, mask_to_rle, rle_to_mask

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
CLASSES = ["circle", "square", "triangle"]
CATEGORY_IDS = [3, 7, 9]
FORBIDDEN = ("lightning", "pytorch_lightning", "hydra", "omegaconf", "albumentations", "pycocotools", "torchmetrics",
             "faster_coco_eval")

# Digest of logits for a fixed input: computed here and in a fresh interpreter.
DIGEST_SRC = """
import hashlib, torch
def logits_digest(model):
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(123))
    with torch.inference_mode():
        out = model(x)["cls"].float().contiguous()
    return hashlib.sha256(out.numpy().tobytes()).hexdigest(), out.tolist()
"""
_ns: dict = {}
exec(DIGEST_SRC, _ns)
logits_digest = _ns["logits_digest"]


def cls_spec(**extra) -> dict:
    return {"backbone": {"name": "resnet10t", "pretrained": False},
            "heads": {"cls": {"type": "classification", "num_classes": 3}},
            "class_names": {"cls": list(CLASSES)}, "input_size": [64, 64], "resize": "stretch",
            "task": "classification", "extra": {"category_ids": list(CATEGORY_IDS)}, **extra}


def make_checkpoint(path: Path, *, ema: bool = False) -> Path:
    """A real (tiny) zoo task checkpoint, saved the way the brief's Lightning checkpoints hold it."""
    from zoo.tasks.multitask import MultiTask

    torch.manual_seed(0)
    options = {"postprocess": {"score_thresh": 0.2}}
    if ema:
        options["ema"] = {"enabled": True, "decay": 0.9}
    task = MultiTask(spec=cls_spec(), optimizer={"name": "adamw", "lr": 1e-3, "weight_decay": 0.0},
                      scheduler={"name": "none"}, options=options, data_info={"format": "classification"})
    if ema:  # make the live weights differ from the EMA copy, as after training
        with torch.no_grad():
            for p in task.model.parameters():
                p.add_(torch.randn_like(p) * 0.05)
    torch.save({"state_dict": task.state_dict(), "hyper_parameters": dict(task.hparams), "epoch": 3,
                "global_step": 42}, path)
    return path


def run_py(code: str, timeout: int = 240) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "NO_ALBUMENTATIONS_UPDATE": "1"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=str(ROOT), env=env,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def rand_image(h: int, w: int, seed: int) -> np.ndarray:
    """A smooth-ish random RGB image (noise plus gradients), uint8 (H, W, 3)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 / max(w - 1, 1), yy * 255 / max(h - 1, 1), (xx + yy) * 127 / max(h + w, 1)], -1)
    return np.clip(base + rng.normal(0, 40, (h, w, 3)), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "best.ckpt")


@pytest.fixture(scope="module")
def exported(ckpt: Path, tmp_path_factory) -> Path:
    """The CLI run once: bundle + ONNX + TorchScript."""
    out = tmp_path_factory.mktemp("export") / "bundle"
    assert main([str(ckpt), str(out), "--onnx", "--torchscript"]) == 0
    return out


@pytest.fixture(scope="module")
def ckpt_model(ckpt: Path):
    """The model as the checkpoint holds it (reference for every comparison)."""
    spec, sd, _, _ = checkpoint_parts(read_lightning_checkpoint(ckpt))
    model = create_model(serving_spec(spec), load_backbone_weights=False)
    model.load_state_dict(sd, strict=True)
    return model.eval()


# ---------------------------------------------------------------------------------------------------- export
def test_export_writes_self_describing_bundle(exported: Path, ckpt: Path) -> None:
    sd, meta = read_bundle(exported)
    assert meta["task"] == "classification" and meta["class_names"] == {"cls": CLASSES}
    assert meta["input_size"] == [64, 64] and meta["resize"] == "stretch" and len(meta["mean"]) == 3 == len(meta["std"])
    assert meta["category_ids"] == CATEGORY_IDS
    assert meta["postprocess"] == {"score_thresh": 0.2}
    assert "pretrained" not in meta["spec"]["backbone"] and "weights" not in meta["spec"]["backbone"]
    assert meta["spec"]["backbone"]["name"] == "resnet10t"
    prov = meta["provenance"]
    assert set(prov) >= {"config", "git_commit", "date", "zoo_version", "torch_version", "timm_version"}
    assert prov["torch_version"] == torch.__version__ and prov["zoo_version"] == zoo.__version__
    assert prov["date"].endswith("+00:00")
    assert prov["git_commit"] is None or len(prov["git_commit"]) == 40
    assert meta["source_checkpoint"] == {"file": ckpt.name, "epoch": 3, "global_step": 42, "ema": False}
    ref = {k[len("model."):]: v for k, v in torch.load(ckpt, weights_only=True)["state_dict"].items()
           if k.startswith("model.")}
    assert set(sd) == set(ref) and all(torch.equal(sd[k], ref[k]) for k in ref)


def test_export_records_metrics_dataset_and_config(ckpt: Path, tmp_path: Path) -> None:
    config = {"data": {"kind": "coco", "root": "/data/coco", "val_split": "val2017", "train_split": "train2017"},
              "seed": 1, "paths": {"output_dir": tmp_path}, "model": {"input_size": (64, 64)}}
    out = export_checkpoint(ckpt, tmp_path / "b", metrics={"val/top1": torch.tensor(0.75), "val/loss": 1},
                            config=config)
    meta = read_bundle_meta(out)
    assert meta["metrics"] == {"val/top1": 0.75, "val/loss": 1.0}
    assert meta["metrics_dataset"] == {"kind": "coco", "root": "/data/coco", "split": "val2017"}
    cfg = meta["provenance"]["config"]
    assert cfg["paths"]["output_dir"] == str(tmp_path) and cfg["model"]["input_size"] == [64, 64]
    out2 = export_checkpoint(ckpt, tmp_path / "b2", metrics={"val/top1": 0.5}, dataset="tiny_coco train2017")
    assert read_bundle_meta(out2)["metrics_dataset"] == "tiny_coco train2017"


def test_export_reads_run_folder(ckpt: Path, tmp_path: Path) -> None:
    """Without metrics/config, a run folder's metrics.json (for this checkpoint) and config.yaml are recorded."""
    yaml = pytest.importorskip("yaml")
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    best = Path(shutil.copy(ckpt, run / "checkpoints" / "best.ckpt"))
    (run / "config.yaml").write_text(yaml.safe_dump({"data": {"kind": "shapes", "root": None, "val_split": "val"},
                                                     "seed": 7}))
    (run / "metrics.json").write_text(json.dumps({"checkpoint": str(best), "metrics": {"val/top1": 0.5}}))
    meta = read_bundle_meta(export_checkpoint(best, run / "bundle"))
    assert meta["metrics"] == {"val/top1": 0.5} and meta["provenance"]["config"]["seed"] == 7
    assert meta["metrics_dataset"] == {"kind": "shapes", "root": None, "split": "val"}
    (run / "metrics.json").write_text(json.dumps({"checkpoint": "/elsewhere/last.ckpt", "metrics": {"val/top1": 0.1}}))
    assert read_bundle_meta(export_checkpoint(best, run / "bundle"))["metrics"] == {}


def test_export_takes_ema_weights(tmp_path: Path) -> None:
    path = make_checkpoint(tmp_path / "ema.ckpt", ema=True)
    sd_ckpt = torch.load(path, weights_only=True)["state_dict"]
    sd, meta = read_bundle(export_checkpoint(path, tmp_path / "bundle"))
    assert meta["source_checkpoint"]["ema"] is True
    key = [k for k in sd if k.startswith("heads.cls.") and k.endswith(".weight")][-1]  # the classifier
    assert torch.equal(sd[key], sd_ckpt["ema.module." + key])
    assert not torch.equal(sd[key], sd_ckpt["model." + key])
    # zoo.load of the checkpoint itself also serves the EMA weights
    m = load(path)
    assert torch.equal(m.state_dict()[key], sd_ckpt["ema.module." + key])


def test_export_rejects_foreign_checkpoint(tmp_path: Path) -> None:
    bad = tmp_path / "x.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "hyper_parameters": {"lr": 1.0}}, bad)
    with pytest.raises(BundleError, match="no model 'spec'"):
        export_checkpoint(bad, tmp_path / "out")
    assert main([str(bad), str(tmp_path / "out")]) == 2


# ---------------------------------------------------------------------------------------------------- load
@pytest.fixture(scope="module")
def fresh_process(exported: Path) -> dict:
    """One fresh interpreter: the lean serving path (import zoo, load, Predictor) and the logits digest."""
    code = DIGEST_SRC + f"""
import json, sys
import numpy as np
torch.set_num_threads({torch.get_num_threads()})
import zoo
model = zoo.load({str(exported)!r})
pred = zoo.Predictor(model)
res = pred(np.full((40, 50, 3), 128, dtype=np.uint8))[0]
digest, values = logits_digest(model)
print(json.dumps({{"digest": digest, "values": values, "result": res.to_dict(),
                   "modules": sorted(m for m in sys.modules if m.split(".")[0] in {FORBIDDEN!r})}}))
"""
    return json.loads(run_py(code).strip().splitlines()[-1])


def test_bundle_loads_identically_in_another_process(fresh_process: dict, ckpt_model) -> None:
    digest, values = logits_digest(ckpt_model)
    assert fresh_process["digest"] == digest, (fresh_process["values"], values)


def test_lean_serving_path_imports_no_training_stack(fresh_process: dict) -> None:
    assert fresh_process["modules"] == []
    assert fresh_process["result"]["type"] == "classification"


def test_load_bundle_and_checkpoint_agree(exported: Path, ckpt: Path, ckpt_model) -> None:
    m = zoo.load(exported)
    assert not m.training and m.bundle_meta["class_names"] == {"cls": CLASSES} and m.bundle_path == exported
    assert logits_digest(m)[0] == logits_digest(ckpt_model)[0]
    m2 = zoo.load(str(exported / "model.json"))
    assert logits_digest(m2)[0] == logits_digest(ckpt_model)[0]
    mc = zoo.load(ckpt)
    assert logits_digest(mc)[0] == logits_digest(ckpt_model)[0]
    assert mc.bundle_meta["category_ids"] == CATEGORY_IDS


def test_tampered_bundle_is_refused(exported: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(exported, bad, ignore=shutil.ignore_patterns("onnx", "torchscript"))
    w = bad / "model.safetensors"
    data = bytearray(w.read_bytes())
    data[-10] ^= 0xFF
    w.write_bytes(bytes(data))
    with pytest.raises(BundleIntegrityError, match="sha256 mismatch"):
        zoo.load(bad)
    # a spec edited to disagree with the weights is refused with a message naming the mismatch
    shutil.copy(exported / "model.safetensors", w)
    meta = json.loads((bad / "model.json").read_text())
    meta["spec"]["heads"]["cls"]["num_classes"] = 4
    (bad / "model.json").write_text(json.dumps(meta))
    with pytest.raises(BundleError, match="do not fit|do not match|was modified after the bundle was written"):
        zoo.load(bad)


def test_head_kinds() -> None:
    m = create_model(cls_spec(), load_backbone_weights=False)
    assert head_kind(m, "cls") == "classification"
    with pytest.raises(KeyError, match="no head 'det'"):
        head_kind(m, "det")


# ---------------------------------------------------------------------------------------------------- predictor
def test_predictor_accepts_every_input_type(exported: Path, tmp_path: Path) -> None:
    pred = Predictor(exported, top_k=2)
    img = rand_image(45, 70, seed=1)
    path = tmp_path / "img.png"
    Image.fromarray(img).save(path)
    inputs = [img, Image.fromarray(img), torch.from_numpy(img).permute(2, 0, 1).contiguous(), path, str(path),
              path.read_bytes()]
    results = pred(inputs)
    assert len(results) == len(inputs)
    first = results[0]
    assert isinstance(first, Classification) and len(first.labels) == 2 == len(first.scores)
    assert first.labels == [CLASSES[i] for i in first.label_ids]
    assert abs(float(first.probs.sum()) - 1.0) < 1e-5 and first.probs.shape == (3,)
    for r in results[1:]:
        torch.testing.assert_close(r.probs, first.probs, rtol=0, atol=1e-6)
    # one image (not a list) and predict_one
    assert len(pred(img)) == 1 and isinstance(pred.predict_one(img), Classification)
    json.dumps(first.to_dict())
    # grey images are expanded to RGB
    grey = pred(img[..., 0])[0]
    assert grey.probs.shape == (3,)


def test_predictor_rejects_bad_inputs(exported: Path) -> None:
    pred = Predictor(zoo.load(exported))
    with pytest.raises(TypeError, match="uint8"):
        pred(np.zeros((10, 10, 3), dtype=np.float32))
    with pytest.raises(ValueError, match=r"\(C, H, W\)"):
        pred(np.zeros((3, 10, 12), dtype=np.uint8))
    with pytest.raises(ValueError, match="alpha"):
        pred(np.zeros((10, 12, 4), dtype=np.uint8))
    with pytest.raises(TypeError, match="uint8"):
        pred(torch.rand(3, 10, 10))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        pred("/nonexistent/image.jpg")
    with pytest.raises(ValueError, match="not an image"):
        pred(b"not an image")
    with pytest.raises(TypeError, match="cannot read an image"):
        pred(12345)


def test_predictor_on_real_coco_image(exported: Path) -> None:
    folder = SHARED_DATA / "coco128" / "train2017"
    if not folder.is_dir():
        pytest.skip(f"{folder} not present (real COCO subsets live in ../shared/data beside the repository)")
    path = sorted(folder.glob("*.jpg"))[0]
    pred = Predictor(exported)
    [res] = pred(path)
    assert isinstance(res, Classification) and res.label in CLASSES and len(res.labels) == 3
    arr = np.array(Image.open(path).convert("RGB"))
    # a file is decoded as validation decodes it: reduced by libjpeg when much larger than the input
    # (data.fast_decode), full size with fast_decode=False, which an array decoded by PIL then matches exactly
    full = Predictor(exported, fast_decode=False)
    torch.testing.assert_close(full(arr)[0].probs, full(path)[0].probs, rtol=0, atol=0)
    torch.testing.assert_close(pred(arr)[0].probs, res.probs, rtol=0, atol=2e-3)


def make_tiny_coco(root: Path, sizes: list[tuple[int, int]]) -> tuple[Path, Path]:
    """A COCO instances json with one box + polygon per image; categories with non-contiguous ids."""
    images_dir = root / "images"
    images_dir.mkdir(parents=True)
    images, anns = [], []
    for i, (h, w) in enumerate(sizes):
        name = f"{i:03d}.png"
        Image.fromarray(rand_image(h, w, seed=10 + i)).save(images_dir / name)
        images.append({"id": i + 1, "file_name": name, "height": h, "width": w})
        x1, y1, x2, y2 = w * 0.2, h * 0.25, w * 0.7, h * 0.8
        anns.append({"id": i + 1, "image_id": i + 1, "category_id": CATEGORY_IDS[i % 3], "iscrowd": 0,
                     "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1),
                     "segmentation": [[x1, y1, x2, y1, x2, y2, x1, y2]]})
    cats = [{"id": c, "name": n} for c, n in zip(CATEGORY_IDS, CLASSES)]
    ann = root / "instances.json"
    ann.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return ann, images_dir


def eval_batch(model, ann: Path, images_dir: Path, target: str = "detection") -> tuple[dict, list[Path]]:
    """The evaluation path: CocoDataset samples collated as the validation loader does."""
    from zoo.data.coco import CocoDataset, CocoIndex
    from zoo.data.datamodule import collate

    s = model.spec
    ds = CocoDataset(CocoIndex(ann, images_dir), target, input_size=s.input_size, resize=s.resize, mean=s.mean,
                     std=s.std)
    return collate([ds[i] for i in range(len(ds))], size_divisor=s.size_divisor), [r.file for r in ds.records]


def eval_items(model, ann: Path, images_dir: Path, target: str = "detection") -> tuple[list[dict], list[Path]]:
    """The evaluation path for images of different sizes: the validation loader batches images of one padded size
    (SizeGroupedBatchSampler); returns, per image in dataset order, its batch and its index in that batch."""
    from zoo.data.coco import CocoDataset, CocoIndex
    from zoo.data.datamodule import collate
    from zoo.data.samplers import SizeGroupedBatchSampler

    s = model.spec
    ds = CocoDataset(CocoIndex(ann, images_dir), target, input_size=s.input_size, resize=s.resize, mean=s.mean,
                     std=s.std)
    items: dict[int, dict] = {}
    for idx in SizeGroupedBatchSampler(ds.padded_sizes(s.size_divisor), len(ds)):
        batch = collate([ds[i] for i in idx], size_divisor=s.size_divisor)
        for j, i in enumerate(idx):
            items[i] = {"batch": batch, "j": j}
    return [items[i] for i in range(len(ds))], [r.file for r in ds.records]


def test_predictor_matches_evaluation_path_classification(exported: Path, tmp_path: Path) -> None:
    model = zoo.load(exported)
    ann, images_dir = make_tiny_coco(tmp_path, [(50, 70), (90, 40), (64, 64)])
    batch, files = eval_batch(model, ann, images_dir, "classification")
    with torch.inference_mode():
        probs = model(batch["images"])["cls"].softmax(-1)
    results = Predictor(model)(files)
    torch.testing.assert_close(torch.stack([r.probs for r in results]), probs, rtol=0, atol=1e-6)


DET_HEADS = {
    "fcos": ({"type": "fcos", "num_convs": 1}, "detection"),
    "mask_rcnn": ({"type": "mask_rcnn", "representation_size": 32, "box_batch_size": 32, "rpn_pre_nms_topk": (100, 50),
                   "rpn_post_nms_topk": (50, 20), "mask_layers": [16], "mask_dim": 16}, "instance"),
}


def det_model(head: str, resize: str = "longest"):
    torch.manual_seed(0)
    cfg, _ = DET_HEADS[head]
    spec = {"backbone": {"name": "resnet10t"}, "necks": {"fpn": {"type": "fpn", "out_channels": 32}},
            "heads": {"det": {**cfg, "input": "fpn", "num_classes": 3}}, "class_names": {"det": CLASSES},
            "input_size": [64, 64], "resize": resize, "task": DET_HEADS[head][1],
            "extra": {"category_ids": CATEGORY_IDS}}
    return create_model(spec, load_backbone_weights=False).eval()


@pytest.mark.parametrize("head", list(DET_HEADS))
def test_predictor_matches_evaluation_path_detection(head: str, tmp_path: Path) -> None:
    import torch.nn.functional as F

    def to_original_boxes(boxes, scale, size):  # independent reference of the mapping back
        sy, sx = scale
        out = boxes / boxes.new_tensor([sx, sy, sx, sy])
        out[:, 0::2] = out[:, 0::2].clamp(0, size[1])
        out[:, 1::2] = out[:, 1::2].clamp(0, size[0])
        return out

    def masks_to_original(masks, valid, size):
        h, w = valid
        m = F.interpolate(masks[:, :, :h, :w].float(), size=tuple(size), mode="bilinear", align_corners=False)
        return m[:, 0] >= 0.5

    model = det_model(head)
    ann, images_dir = make_tiny_coco(tmp_path, [(50, 80), (96, 40)])
    items, files = eval_items(model, ann, images_dir)
    opts = {"score_thresh": 0.01, "max_detections": 20}
    results = Predictor(model, score_thresh=0.01, max_detections=20)(files)
    kind = DET_HEADS[head][1]
    for res, item in zip(results, items):
        b, i = item["batch"], item["j"]
        with torch.inference_mode():
            det = model.heads["det"].predict(model(b["images"])["det"], b["image_sizes"], **opts)[i]
        batch = {k: {i: v[i]} for k, v in b.items() if k in ("orig_sizes", "scales", "image_sizes")}
        assert isinstance(res, InstanceSegmentation if kind == "instance" else Detections)
        assert len(res) > 0, "random-init detector should give candidates above score 0.01"
        H, W = batch["orig_sizes"][i]
        assert res.image_size == (H, W)
        torch.testing.assert_close(res.boxes, to_original_boxes(det["boxes"].float(), batch["scales"][i], (H, W)),
                                   rtol=0, atol=1e-4)
        torch.testing.assert_close(res.scores, det["scores"].float(), rtol=0, atol=1e-6)
        assert res.labels.tolist() == det["labels"].tolist()
        assert res.names == [CLASSES[j] for j in res.labels.tolist()]
        assert res.category_ids == [CATEGORY_IDS[j] for j in res.labels.tolist()]
        assert (res.boxes[:, 0::2] <= W).all() and (res.boxes[:, 1::2] <= H).all() and (res.boxes >= 0).all()
        if kind == "instance":
            ref = masks_to_original(det["masks"], batch["image_sizes"][i], (H, W))
            assert res.masks.dtype == torch.bool and res.masks.shape == (len(res), H, W)
            assert torch.equal(res.masks, ref)
        d = res.to_dict()
        json.dumps(d)
        coco = res.to_coco(image_id=7)
        assert coco[0]["category_id"] in CATEGORY_IDS and len(coco[0]["bbox"]) == 4


def test_predictor_matches_evaluation_path_semantic(tmp_path: Path) -> None:
    torch.manual_seed(0)
    names = ["background", *CLASSES]
    model = create_model({"backbone": {"name": "resnet10t"},
                          "heads": {"seg": {"type": "semantic_fpn", "num_classes": 4, "channels": 16, "fpn_channels": 16}},
                          "class_names": {"seg": names}, "input_size": [64, 64], "resize": "longest",
                          "task": "semantic"}, load_backbone_weights=False).eval()
    ann, images_dir = make_tiny_coco(tmp_path, [(50, 80), (96, 40)])
    items, files = eval_items(model, ann, images_dir, "semantic")
    preds, sizes = [], []
    for item in items:
        b, i = item["batch"], item["j"]
        with torch.inference_mode():
            preds.append(model.heads["seg"].predict(model(b["images"])["seg"], b["image_sizes"],
                                                    output_sizes=b["orig_sizes"])[i])
        sizes.append(b["orig_sizes"][i])
    results = Predictor(model)(files)
    for res, p, size in zip(results, preds, sizes):
        assert isinstance(res, SemanticSegmentation) and res.class_names == names
        assert res.mask.shape == tuple(size) and res.mask.dtype == torch.int64
        assert torch.equal(res.mask, p["mask"])
        d = res.to_dict()
        assert sum(d["present"].values()) == size[0] * size[1]
        json.dumps(d)


def test_predictor_sliding_window_semantic() -> None:
    """seg_window: logits of overlapping tiles at the original resolution, averaged where they overlap."""
    torch.manual_seed(0)
    model = create_model({"backbone": {"name": "resnet10t"},
                          "heads": {"seg": {"type": "semantic_fpn", "num_classes": 3, "channels": 16, "fpn_channels": 16}},
                          "class_names": {"seg": ["bg", "a", "b"]}, "input_size": [64, 64], "task": "semantic"},
                          load_backbone_weights=False).eval()
    img = rand_image(80, 112, 5)
    res = Predictor(model, seg_window=64, seg_stride=48)(img)[0]
    assert res.mask.shape == (80, 112)
    # reference: tiles at y in {0, 16}, x in {0, 48} (the last flush with the edge), each upsampled to 64x64
    x = (torch.from_numpy(img).permute(2, 0, 1).float() / 255 - torch.tensor(model.spec.mean).view(3, 1, 1)) \
        / torch.tensor(model.spec.std).view(3, 1, 1)
    total, count = torch.zeros(3, 80, 112), torch.zeros(1, 80, 112)
    with torch.inference_mode():
        for y0 in (0, 16):
            for x0 in (0, 48):
                logits = model(x[None, :, y0:y0 + 64, x0:x0 + 64])["seg"]["logits"]
                total[:, y0:y0 + 64, x0:x0 + 64] += F.interpolate(logits, size=(64, 64), mode="bilinear",
                                                                  align_corners=False)[0]
                count[:, y0:y0 + 64, x0:x0 + 64] += 1
    ref = (total / count).argmax(0)
    assert (res.mask == ref).float().mean() > 0.999
    assert "seg_window=(64, 64)" in repr(Predictor(model, seg_window="input"))
    with pytest.raises(ValueError, match="seg_stride"):
        Predictor(model, seg_window=32, seg_stride=48)
    with pytest.raises(ValueError, match="seg_window"):
        Predictor(model, seg_window="whole")


def test_multi_head_model_returns_dict(tmp_path: Path) -> None:
    spec = {"backbone": {"name": "resnet10t"},
            "heads": {"cls": {"type": "classification", "num_classes": 3},
                      "seg": {"type": "semantic_fpn", "num_classes": 2, "channels": 16, "fpn_channels": 16}},
            "class_names": {"cls": CLASSES, "seg": ["bg", "fg"]}, "input_size": [64, 64], "task": "multitask"}
    model = create_model(spec, load_backbone_weights=False)
    out = Predictor(model, batch_size=2)([rand_image(30, 40, 0), rand_image(60, 20, 1), rand_image(64, 64, 2)])
    assert len(out) == 3 and set(out[0]) == {"cls", "seg"}
    assert isinstance(out[1]["cls"], Classification) and out[1]["seg"].mask.shape == (60, 20)
    only = Predictor(model, heads=["seg"])(rand_image(30, 40, 0))[0]
    assert isinstance(only, SemanticSegmentation)


def test_results_serialise() -> None:
    mask = torch.zeros(5, 7, dtype=torch.bool)
    mask[1:4, 2:6] = True
    mask[0, 0] = True
    rle = mask_to_rle(mask)
    assert rle["size"] == [5, 7] and sum(rle["counts"]) == 35
    assert torch.equal(rle_to_mask(rle), mask)
    assert mask_to_rle(torch.zeros(3, 3, dtype=torch.bool))["counts"] == [9]
    assert mask_to_rle(torch.ones(2, 2, dtype=torch.bool))["counts"] == [0, 4]
    try:
        from pycocotools import mask as mask_util
    except ImportError:
        pass
    else:  # COCO's own decoder reads the uncompressed RLE
        decoded = mask_util.decode(mask_util.frPyObjects(rle, 5, 7))
        assert np.array_equal(decoded.astype(bool), mask.numpy())
    inst = InstanceSegmentation(boxes=torch.tensor([[1.0, 1.0, 5.0, 4.0]]), scores=torch.tensor([0.9]),
                                labels=torch.tensor([1]), names=["square"], category_ids=[7], image_size=(5, 7),
                                masks=mask[None])
    d = json.loads(json.dumps(inst.to_dict()))
    assert d["masks"][0] == rle and d["category_ids"] == [7] and d["type"] == "instance"
    assert inst.to_coco(3)[0]["bbox"] == [1.0, 1.0, 4.0, 3.0]
    with pytest.raises(ValueError, match="masks must be"):
        InstanceSegmentation(boxes=torch.zeros(2, 4), scores=torch.zeros(2), labels=torch.zeros(2, dtype=torch.long),
                             names=["a", "b"], category_ids=None, image_size=(5, 7), masks=mask[None])
    emb = Embedding(vector=torch.nn.functional.normalize(torch.randn(8), dim=0))
    assert emb.dim == 8 and len(json.loads(json.dumps(emb.to_dict()))["vector"]) == 8


# ---------------------------------------------------------------------------------------------------- ONNX / TorchScript
def ort_run(path: Path, x: torch.Tensor) -> dict[str, np.ndarray]:
    ort = pytest.importorskip("onnxruntime")
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(None, {"images": x.numpy()})))


def test_onnx_classification_parity(exported: Path, ckpt_model) -> None:
    onnx_file = exported / "onnx" / "model.onnx"
    assert onnx_file.is_file()
    meta = read_bundle_meta(onnx_file.parent)
    verify_file(onnx_file, meta["weights"]["sha256"], meta["weights"]["bytes"])
    assert meta["weights"]["format"] == "onnx" and meta["class_names"] == {"cls": CLASSES}
    assert meta["onnx"]["outputs"] == [{"name": "cls", "head": "cls", "kind": "classification", "shape": ["batch", 3]}]
    assert meta["onnx"]["input"]["shape"] == ["batch", 3, 64, 64]
    for b in (2, 3):
        x = torch.randn(b, 3, 64, 64, generator=torch.Generator().manual_seed(b))
        with torch.inference_mode():
            ref = ckpt_model(x)["cls"].numpy()
        np.testing.assert_allclose(ort_run(onnx_file, x)["cls"], ref, atol=1e-4, rtol=0)
    with pytest.raises(BundleError, match="onnx export"):
        zoo.load(onnx_file.parent)


def test_onnx_dynamic_size_and_bundle_guard(exported: Path, tmp_path: Path) -> None:
    model = zoo.load(exported)
    path = export_onnx(model, tmp_path / "dyn" / "m.onnx", dynamic_size=True)
    assert path.name == "m.onnx" and (path.parent / "model.json").is_file()
    x = torch.randn(2, 3, 96, 64)
    with torch.inference_mode():
        ref = model(x)["cls"].numpy()
    np.testing.assert_allclose(ort_run(path, x)["cls"], ref, atol=1e-4, rtol=0)
    with pytest.raises(ExportError, match="holds a bundle"):
        export_onnx(model, exported)


def test_onnx_semantic_parity(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = create_model({"backbone": {"name": "resnet10t"},
                          "heads": {"seg": {"type": "semantic_fpn", "num_classes": 4, "channels": 16,
                                            "fpn_channels": 16}},
                          "input_size": [64, 64], "task": "semantic"}, load_backbone_weights=False).eval()
    path = export_onnx(model, tmp_path / "seg")
    assert path == tmp_path / "seg" / "model.onnx"
    outputs = read_bundle_meta(path.parent)["onnx"]["outputs"]
    assert outputs == [{"name": "seg.logits", "head": "seg", "kind": "semantic", "shape": ["batch", 4, 16, 16],
                        "axes": ["batch", "classes", "height", "width"]}]
    for b in (2, 3):
        x = torch.randn(b, 3, 64, 64)
        with torch.inference_mode():
            ref = model(x)["seg"]["logits"].numpy()
        np.testing.assert_allclose(ort_run(path, x)["seg.logits"], ref, atol=1e-4, rtol=0)


def test_onnx_detection_raw_outputs_and_two_stage_refused(tmp_path: Path) -> None:
    model = det_model("fcos", resize="stretch")
    path = export_onnx(model, tmp_path / "det")
    x = torch.randn(3, 3, 64, 64)
    with torch.inference_mode():
        raw = model(x)["det"]
    got = ort_run(path, x)
    for key in ("cls_logits", "ltrb", "centerness"):
        np.testing.assert_allclose(got[f"det.{key}"], raw[key].numpy(), atol=1e-4, rtol=0)
    np.testing.assert_array_equal(got["det.points"], raw["points"].numpy())
    with pytest.raises(ExportError, match="dynamic_size=False"):
        export_onnx(model, tmp_path / "det2", dynamic_size=True)
    with pytest.raises(ExportError, match="two-stage"):
        export_onnx(det_model("mask_rcnn"), tmp_path / "rcnn")


def test_onnx_embedding_parity(tmp_path: Path) -> None:
    if importlib.util.find_spec("zoo.heads.embedding") is None:
        pytest.skip("zoo.heads.embedding is not written yet")
    head = {"type": "embedding", "embedding_dim": 16}
    torch.manual_seed(0)
    model = create_model({"backbone": {"name": "resnet10t"}, "heads": {"emb": head}, "input_size": [64, 64],
                          "task": "similarity"}, load_backbone_weights=False).eval()
    assert head_kind(model, "emb") == "embedding"
    path = export_onnx(model, tmp_path / "emb")
    x = torch.randn(2, 3, 64, 64)
    [r0, r1] = Predictor(model)([(torch.rand(3, 64, 64) * 255).to(torch.uint8) for _ in range(2)])
    assert isinstance(r0, Embedding) and abs(float(r0.vector.norm()) - 1) < 1e-4
    with torch.inference_mode():
        ref = model.heads["emb"].predict(model(x)["emb"])
    for b in (2, 3):
        xb = torch.cat([x, x[:1]])[:b]
        np.testing.assert_allclose(ort_run(path, xb)["emb"], torch.cat([ref, ref[:1]])[:b].numpy(), atol=1e-4, rtol=0)


def test_torchscript_parity(exported: Path, ckpt_model) -> None:
    ts_file = exported / "torchscript" / "model.torchscript.pt"
    meta = read_bundle_meta(ts_file.parent)
    assert meta["weights"]["format"] == "torchscript"
    traced = torch.jit.load(str(ts_file))
    x = torch.randn(3, 3, 64, 64)
    with torch.inference_mode():
        torch.testing.assert_close(traced(x)[0], ckpt_model(x)["cls"], rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------------------- hubconf
def load_hubconf():
    spec = importlib.util.spec_from_file_location("zoo_hubconf_test", ROOT / "hubconf.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_hubconf_load_and_registry_entries(exported: Path, monkeypatch: pytest.MonkeyPatch, ckpt_model) -> None:
    monkeypatch.setattr(registry_mod, "_ENTRIES", {})
    m = torch.hub.load(str(ROOT), "load", str(exported), source="local")
    assert logits_digest(m)[0] == logits_digest(ckpt_model)[0]
    entry = registry_mod.entry_from_bundle("resnet10t.serving_test", "classification", exported.as_uri(), exported)
    registry_mod.register(entry)
    hubconf = load_hubconf()  # torch.hub.list only reads GitHub; check the generated entries directly
    assert hubconf._ENTRIES == {"resnet10t_serving_test": "resnet10t.serving_test"}
    assert callable(hubconf.resnet10t_serving_test) and hubconf.resnet10t_serving_test.__doc__
    named = torch.hub.load(str(ROOT), "resnet10t_serving_test", source="local")
    assert logits_digest(named)[0] == logits_digest(ckpt_model)[0]
    blank = torch.hub.load(str(ROOT), "resnet10t_serving_test", source="local", pretrained=False)
    assert blank.bundle_meta["class_names"] == {"cls": CLASSES}
    assert logits_digest(blank)[0] != logits_digest(ckpt_model)[0]


def test_hubconf_entry_names() -> None:
    mod = load_hubconf()
    assert mod.dependencies == ["torch", "torchvision", "timm", "safetensors"]
    assert mod._entry_name("resnet10t.shapes_cls") == "resnet10t_shapes_cls"
    assert mod._entry_name("convnext-atto.coco_det") == "convnext_atto_coco_det"
    assert mod._entry_name("3d.x") == "m_3d_x"
    assert mod._entry_name("load") == "load_model"
    assert all(n.isidentifier() for n in mod._ENTRIES)
