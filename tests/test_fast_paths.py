"""The training path's speed features keep results right: reduced JPEG decoding (``data.fast_decode``), the
validation sample cache (``data.val_cache_mb``), fused optimizers on CPU and background checkpoint writes."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from zoo.preprocess import decode_rgb, decode_rgb_reduced


def _photo(h: int, w: int, seed: int = 0) -> Image.Image:
    """A smooth colourful image with a sharp-edged square (JPEG-friendly, with structure at every scale)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.stack([127 + 100 * np.sin(x / (37 + 11 * c) + y / (53 - 7 * c) + c) for c in range(3)], -1)
    img[h // 3: h // 2, w // 4: w // 2] = rng.integers(0, 255, 3)
    return Image.fromarray(img.clip(0, 255).astype(np.uint8))


def _jpeg(im: Image.Image, path: Path, orientation: int | None = None) -> Path:
    exif = Image.Exif()
    if orientation:
        exif[0x0112] = orientation
    im.save(path, quality=92, exif=exif.tobytes())
    return path


def test_reduced_decode_picks_the_largest_reduction_that_keeps_both_sides(tmp_path: Path) -> None:
    f = _jpeg(_photo(1200, 1600), tmp_path / "a.jpg")
    for min_side, r, shape in [(None, 1, (1200, 1600)), (100, 8, (150, 200)), (160, 4, (300, 400)),
                               (400, 2, (600, 800)), (601, 1, (1200, 1600))]:
        arr, got, full = decode_rgb_reduced(f, "a", min_side)
        assert (got, arr.shape[:2], full) == (r, shape, (1200, 1600)), min_side
    full = decode_rgb(f, "a").astype(np.float32)
    small, r, _ = decode_rgb_reduced(f, "a", 100)
    # libjpeg's DCT scaling is close to an 8x8 box average of the full decode
    box = full.reshape(150, 8, 200, 8, 3).mean((1, 3))
    assert np.abs(small.astype(np.float32) - box).mean() < 4.0
    png = tmp_path / "a.png"
    _photo(400, 300).save(png)
    assert decode_rgb_reduced(png, "a", 10)[1] == 1  # only JPEG has DCT scaling


def test_reduced_decode_reports_the_upright_full_size_of_rotated_photos(tmp_path: Path) -> None:
    f = _jpeg(_photo(400, 800), tmp_path / "r.jpg", orientation=6)  # stored 800 wide, shown 400 wide
    arr, r, full = decode_rgb_reduced(f, "r", 50)
    assert full == (800, 400) and r == 8 and arr.shape[:2] == (100, 50)
    assert decode_rgb(f, "r").shape[:2] == (800, 400)


def _coco(tmp_path: Path, n: int = 3, size: tuple[int, int] = (960, 1280)) -> Path:
    root = tmp_path / "coco"
    (root / "train").mkdir(parents=True)
    (root / "annotations").mkdir()
    h, w = size
    images, anns = [], []
    for i in range(n):
        _jpeg(_photo(h, w, seed=i), root / "train" / f"{i}.jpg")
        images.append({"id": i + 1, "file_name": f"{i}.jpg", "height": h, "width": w})
        x0, y0 = w // 4, h // 3
        anns.append({"id": i + 1, "image_id": i + 1, "category_id": 1, "iscrowd": 0, "area": float(w * h / 24),
                     "bbox": [x0, y0, w // 4, h // 6],
                     "segmentation": [[x0, y0, x0 + w // 4, y0, x0 + w // 4, y0 + h // 6, x0, y0 + h // 6]]})
    js = {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "square"}]}
    (root / "annotations" / "instances_train.json").write_text(json.dumps(js))
    return root


@pytest.mark.parametrize("fmt", ["detection", "semantic", "instance"])
def test_validation_samples_keep_full_size_geometry_under_fast_decode(tmp_path: Path, fmt: str) -> None:
    """Without augmentation only the pixels' source changes: sizes, scales and targets are the full decode's, and
    the image differs by no more than resampling noise."""
    from zoo.data.coco import CocoDataset, CocoIndex

    root = _coco(tmp_path)
    index = CocoIndex(root / "annotations" / "instances_train.json", root / "train")
    pre = {"input_size": [120, 160], "resize": "longest", "mean": [0.5] * 3, "std": [0.25] * 3}
    full_ds, fast_ds = CocoDataset(index, fmt, **pre), CocoDataset(index, fmt, **pre)
    fast_ds.decode_min_side = 160
    a, b = full_ds[0], fast_ds[0]
    assert (a["size"], a["scale"], a["orig_size"]) == (b["size"], b["scale"], b["orig_size"])
    ta, tb = a["target"], b["target"]
    if fmt == "semantic":
        assert torch.equal(ta, tb)
    else:
        assert torch.equal(ta["boxes"], tb["boxes"]) and torch.equal(ta["labels"], tb["labels"])
        if fmt == "instance":
            assert torch.equal(ta["masks"], tb["masks"])
    assert (a["image"] - b["image"]).abs().mean() < 0.03  # 0.25 std: under 1 % of the 0..1 range on average


def test_augmented_samples_under_fast_decode_keep_boxes_and_masks_on_the_object(tmp_path: Path) -> None:
    """With augmentation the reduced image is augmented with boxes and masks brought to it: the box still frames
    the square's mask, and maps back to the original box through the sample's scale."""
    from zoo.data.coco import CocoDataset, CocoIndex
    from zoo.data.transforms import build_augment

    root = _coco(tmp_path)
    index = CocoIndex(root / "annotations" / "instances_train.json", root / "train")
    aug = build_augment([{"type": "HorizontalFlip", "p": 0.0}], boxes=True)
    ds = CocoDataset(index, ["instance", "semantic"], augment=aug, input_size=[120, 160], resize="longest",
                     mean=[0.5] * 3, std=[0.25] * 3)
    ds.decode_min_side = 200  # 960x1280 -> decoded at 1/4 (240x320)
    s = ds[0]
    box = s["targets"]["instance"]["boxes"][0]
    m = s["targets"]["instance"]["masks"][0]
    ys, xs = torch.nonzero(m, as_tuple=True)
    assert abs(float(xs.min()) - float(box[0])) <= 1.5 and abs(float(xs.max()) + 1 - float(box[2])) <= 1.5
    assert abs(float(ys.min()) - float(box[1])) <= 1.5 and abs(float(ys.max()) + 1 - float(box[3])) <= 1.5
    sem = s["targets"]["semantic"]
    assert torch.equal(sem == 1, m.bool())  # the semantic map and the instance mask still agree
    sy, sx = s["scale"]
    x0, y0, bw, bh = index.coco.anns[1]["bbox"]
    assert np.allclose([float(box[0]) / sx, float(box[1]) / sy, float(box[2]) / sx, float(box[3]) / sy],
                       [x0, y0, x0 + bw, y0 + bh], atol=1.0)


def test_decode_min_side_follows_input_size_and_augmentation() -> None:
    from zoo.data.datamodule import decode_min_side

    pre = {"input_size": [128, 96]}
    assert decode_min_side(pre, {"augment": []}, train=False) == 128
    assert decode_min_side(pre, {"augment": [{"type": "HorizontalFlip"}, {"type": "ColorJitter"}]}, train=True) == 128
    rrc = decode_min_side(pre, {"augment": [{"type": "RandomResizedCrop", "scale": [0.5, 1.0]}]}, train=True)
    assert rrc == int(np.ceil(128 / np.sqrt(0.375)))
    assert decode_min_side(pre, {"augment": [{"type": "Affine", "scale": [0.5, 1.5]}]}, train=True) == 256
    assert decode_min_side(pre, {"augment": [], "extra": {"multiscale": [160, [200, 100]]}}, train=True) == 200


def test_predictor_decodes_files_as_validation_does(tmp_path: Path) -> None:
    """A large JPEG given as a path, as bytes and as a decoded array: the path and bytes are decoded reduced (as
    validation does) and give the same input tensor as the validation sample; results refer to the full size."""
    import zoo
    from zoo.data.folders import ImageFolderDataset
    from zoo.predictor import _decode

    d = tmp_path / "f" / "a"
    d.mkdir(parents=True)
    f = _jpeg(_photo(900, 1200), d / "x.jpg")
    spec = {"backbone": {"name": "test_resnet"}, "heads": {"cls": {"type": "classification", "num_classes": 2}},
            "input_size": [64, 64], "task": "classification"}
    model = zoo.create_model(spec, load_backbone_weights=False).eval()
    pred = zoo.Predictor(model)
    arr, full = _decode(str(f), 64)
    assert full == (900, 1200) and arr.shape[:2] == (113, 150)
    ds = ImageFolderDataset(tmp_path / "f", input_size=[64, 64], mean=pred.spec.mean, std=pred.spec.std)
    ds.decode_min_side = 64
    batch, infos = pred.preprocess([arr], [full])
    assert torch.allclose(batch[0, :, :64, :64], ds[0]["image"], atol=1e-5)
    assert infos[0].orig_size == (900, 1200)
    a = pred([str(f)])[0]
    b = pred([f.read_bytes()])[0]
    assert torch.equal(a.probs, b.probs)
    c = zoo.Predictor(model, fast_decode=False)([str(f)])[0]  # full decode: close, not identical
    assert torch.allclose(a.probs, c.probs, atol=0.05)


def test_validation_cache_returns_the_same_samples_and_skips_decoding(tmp_path: Path) -> None:
    from zoo.data.datamodule import SampleCache

    class Counting(torch.utils.data.Dataset):
        augment = None

        def __init__(self):
            self.calls = 0

        def __len__(self):
            return 5

        def __getitem__(self, i):
            self.calls += 1
            return {"image": torch.full((3, 4, 4), float(i)), "target": {"boxes": torch.ones(1, 4) * i},
                    "image_id": i}

    base = Counting()
    cache = SampleCache(base, budget_mb=1)
    first = [cache[i] for i in range(5)]
    first[0]["image"].add_(100)  # a consumer writing in place must not change the cache
    second = [cache[i] for i in range(5)]
    assert base.calls == 5
    assert all(torch.equal(s["image"], torch.full((3, 4, 4), float(i))) for i, s in enumerate(second))
    assert len(cache) == 5
    tiny = SampleCache(Counting(), budget_mb=0)
    [tiny[i] for i in range(5)], [tiny[i] for i in range(5)]
    assert tiny.dataset.calls == 10 and not tiny.cache  # over budget: nothing kept, nothing wrong


@pytest.mark.parametrize("name", ["adamw", "adam", "sgd"])
def test_cpu_optimizers_are_fused_and_step_like_the_loop(name: str) -> None:
    """The zoo's optimizers take torch's fused kernels on CPU too (torch's CPU default is a Python loop over the
    tensors); the fused step gives the loop's parameters."""
    from zoo.tasks.base import build_optimizer

    torch.manual_seed(0)
    cfg = {"name": name, "lr": 1e-2, "weight_decay": 0.05, "momentum": 0.9, "nesterov": True}
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, bias=False), torch.nn.BatchNorm2d(8), torch.nn.Flatten(),
                                torch.nn.LazyLinear(2))
    model(torch.randn(2, 3, 8, 8))
    twin = __import__("copy").deepcopy(model)
    opt = build_optimizer(model, cfg)
    assert opt.defaults.get("fused") is True, opt.defaults
    ref_cls = type(opt)
    ref = ref_cls([{"params": g["params"], "lr": g["lr"], "weight_decay": g["weight_decay"]}
                   for g in build_optimizer(twin, cfg).param_groups],
                  **{k: v for k, v in opt.defaults.items() if k in ("betas", "momentum", "nesterov")},
                  foreach=False)
    for _ in range(3):
        x = torch.randn(4, 3, 8, 8)
        for m, o in ((model, opt), (twin, ref)):
            o.zero_grad()
            m(x).square().mean().backward()
            o.step()
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_auto_workers_follow_the_cores_and_the_local_processes(monkeypatch, tmp_path: Path) -> None:
    """``data.num_workers=-1`` (the default): one loader process per core this process may use, shared by the
    training processes of the machine, capped at 8; below -1 is refused naming the key."""
    import os

    from tests.conftest import compose
    from zoo.config import ConfigError, TrainConfig, validate
    from zoo.data.datamodule import ZooDataModule, auto_workers

    cores = len(os.sched_getaffinity(0))
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert auto_workers() == max(1, min(8, cores)) and auto_workers(cap=1) == 1
    assert ZooDataModule(None, None, num_workers=-1).num_workers == auto_workers()
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(32)), raising=False)
    assert auto_workers() == 8
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert auto_workers() == 4
    assert compose("train", []).data.num_workers == -1
    with pytest.raises(ConfigError, match="data.num_workers"):
        validate(compose("train", ["data.num_workers=-2"], output_dir=tmp_path), TrainConfig)


class _FakeCompileError(RuntimeError):
    """Stands for torch._dynamo's BackendCompilerFailed (no C++ compiler, no triton): raised by dynamo's code."""


_FakeCompileError.__module__ = "torch._dynamo.exc"


@pytest.mark.parametrize("error, falls_back", [(_FakeCompileError, True), (ValueError, False)])
def test_a_failing_torch_compile_falls_back_to_eager_training(tmp_path: Path, monkeypatch, caplog, error,
                                                             falls_back: bool) -> None:
    """trainer.compile=true where torch.compile cannot work (its first call raises from dynamo): one warning and the
    run trains eagerly with the same weights; an error of the model itself (any other exception) is not swallowed."""
    from torch import nn

    from tests.conftest import FAST, SMALL_SHAPES, compose
    from zoo.training import train

    class Broken(nn.Module):
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, *args, **kwargs):
            raise error("backend='inductor' raised: no working C++ compiler found")

    monkeypatch.setattr(torch, "compile", lambda model, **kw: Broken(model))
    ov = ["backbone=test_resnet", "model.input_size=[32,32]", *FAST, *SMALL_SHAPES, "data.batch_size=16",
          "data.augment=[]", "export_bundle=false", "trainer.max_epochs=1", "trainer.compile=true"]
    cfg = compose("train", ov, output_dir=tmp_path)
    if not falls_back:
        with pytest.raises(ValueError, match="C\\+\\+ compiler"):
            train(cfg)
        return
    with caplog.at_level("WARNING", logger="zoo.tasks.base"):
        res = train(cfg)
    assert caplog.text.count("torch.compile failed") == 1, caplog.text
    assert "val/top1" in res["metrics"] and Path(res["best_ckpt"]).is_file()
