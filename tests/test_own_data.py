"""Training on one's own data: fine-tuning from a zoo checkpoint (init_from, backbone.weights, offline pretrained),
a validation split held out of one folder (data.val_fraction), evaluate.py taking what the checkpoint knows, and the
small fixes around them (batch limits, top5, crop size, trainer=gpu, docstrings, the embedding index's model,
the segmentation benchmark at batch 1, FAISS, retrieval metrics against pytorch-metric-learning)."""

from __future__ import annotations

import importlib.util
import inspect
import re
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import FAST, ROOT, SMALL_SHAPES, compose
from zoo.config import ConfigError, EvalConfig, TrainConfig, validate


# ------------------------------------------------------------------------------------------------------ helpers
def colour_folders(root: Path, classes: dict[str, tuple[int, int, int]], n: int = 6, size: int = 40) -> Path:
    """``<root>/<class>/<i>.png``: noisy solid colours, one colour per class."""
    rng = np.random.default_rng(0)
    for c, colour in classes.items():
        d = root / c
        d.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            img = np.clip(rng.normal(0, 20, (size, size, 3)) + colour, 0, 255).astype(np.uint8)
            Image.fromarray(img).save(d / f"{i}.png")
    return root


def mask_pairs(root: Path, n: int = 8) -> Path:
    """``<root>/images/<i>.png`` and ``<root>/masks/<i>.png`` (index masks with classes 0..2, 255 ignored)."""
    rng = np.random.default_rng(1)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        mask = np.zeros((32, 32), np.uint8)
        x, y = rng.integers(0, 14, 2)
        mask[y:y + 16, x:x + 16] = 1 + i % 2
        mask[0, :] = 255
        img = np.stack([mask * 90, 255 - mask * 60, np.full_like(mask, 40)], -1).astype(np.uint8)
        Image.fromarray(img).save(root / "images" / f"{i}.png")
        Image.fromarray(mask, mode="L").save(root / "masks" / f"{i}.png")
    return root


def _datamodule(overrides: list[str], tmp_path: Path):
    from zoo.tasks.multitask import MultiTask

    cfg = validate(compose("train", [*FAST, *overrides], output_dir=tmp_path / "run"), TrainConfig)
    return MultiTask.build(cfg)[0]


def _parameters(sd: dict[str, torch.Tensor], prefix: str, names: set[str]) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix) and k[len(prefix):] in names}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> dict:
    """A tiny classification run on the embedded dataset (6 classes, test_resnet): checkpoints and a bundle."""
    from zoo.training import train

    out = tmp_path_factory.mktemp("tiny_cls")
    return train(compose("train", ["experiment=shapes_cls", *FAST, *SMALL_SHAPES, "trainer.max_epochs=1",
                                   "trainer.limit_train_batches=2"], output_dir=out))


# ------------------------------------------------------------------------- 2. fine-tuning from a zoo checkpoint
def test_fine_tune_from_bundle_with_other_classes(tiny_run: dict, tmp_path: Path) -> None:
    """A new run on other data (2 classes instead of 6) from the tiny run's bundle: the backbone starts from the
    bundle's weights (lr 0 keeps the parameters as they started), the 6-class head is re-initialised for 2."""
    from safetensors.torch import load_file

    from zoo.training import train

    bundle = Path(tiny_run["bundle"])
    root = colour_folders(tmp_path / "colours", {"red": (220, 30, 30), "blue": (30, 30, 220)})
    res = train(compose("train", ["data=image_folder", f"data.root={root}", "data.val_fraction=0.25", *FAST,
                                  "backbone=test_resnet", f"init_from={bundle}", "model.input_size=[32,32]",
                                  "data.batch_size=4", "trainer.max_epochs=1", "trainer.limit_train_batches=1",
                                  "optimizer.lr=0", "optimizer.weight_decay=0", "export_bundle=false"],
                        output_dir=tmp_path / "finetune"))
    report = res["init_from"]
    assert report["backbone"]["loaded"] == report["backbone"]["total"] > 0
    assert report["heads"]["cls"].startswith("reinitialised: 6 classes in the source, 2 here")
    src = load_file(str(bundle / "model.safetensors"))
    ckpt = torch.load(res["last_ckpt"], map_location="cpu", weights_only=True)
    from zoo.backbones import TimmBackbone

    names = {n for n, _ in TimmBackbone("test_resnet").named_parameters()}
    start = _parameters(src, "backbone.", names)
    after = _parameters(ckpt["state_dict"], "model.backbone.", names)
    assert set(start) == set(after) == names
    for k in names:
        torch.testing.assert_close(after[k], start[k], rtol=0, atol=0, msg=k)
    assert ckpt["state_dict"]["model.heads.cls.net.3.weight"].shape[0] == 2
    assert ckpt["hyper_parameters"]["spec"]["class_names"]["cls"] == ["blue", "red"]


def _model(backbone: str, num_classes: int, class_names: list[str] | None = None):
    from zoo.models import create_model

    names = class_names or [f"c{i}" for i in range(num_classes)]
    return create_model({"backbone": {"name": backbone}, "heads": {"cls": {"type": "classification",
                                                                             "num_classes": num_classes}},
                         "class_names": {"cls": names}, "input_size": [64, 64]})


def test_init_from_checkpoint_and_registered_name(tiny_run: dict) -> None:
    import zoo
    from zoo.hub import read_bundle, resolve
    from zoo.transfer import load_init_weights

    assert "test_resnet.shapes_cls" in zoo.list_models()
    sd, meta = read_bundle(resolve("test_resnet.shapes_cls"))
    names = meta["spec"]["class_names"]["cls"]
    same = _model("test_resnet", len(names), names)
    report = load_init_weights(same, "test_resnet.shapes_cls")
    assert report["heads"] == {"cls": "loaded"}
    for k, v in same.state_dict().items():
        torch.testing.assert_close(v, sd[k], rtol=0, atol=0, msg=k)

    other = _model("test_resnet", 3)
    report = load_init_weights(other, tiny_run["best_ckpt"])
    assert report["source"].startswith("checkpoint") and report["heads"]["cls"].startswith("reinitialised: 6 classes")
    ck = torch.load(tiny_run["best_ckpt"], map_location="cpu", weights_only=True)["state_dict"]
    for k, v in other.backbone.state_dict().items():
        torch.testing.assert_close(v, ck[f"model.backbone.{k}"], rtol=0, atol=0, msg=k)

    renamed = _model("test_resnet", len(names), [f"x{i}" for i in range(len(names))])
    assert load_init_weights(renamed, "test_resnet.shapes_cls")["heads"]["cls"].startswith("reinitialised: other classes")


def test_init_from_errors_are_clear(tiny_run: dict, tmp_path: Path) -> None:
    from zoo.training import train
    from zoo.transfer import InitFromError, load_init_weights

    with pytest.raises(InitFromError, match=r"only \d+ of the \d+ tensors of this run's backbone 'resnet10t'"):
        load_init_weights(_model("resnet10t", 6), tiny_run["bundle"])
    with pytest.raises(InitFromError, match="zoo.list_models"):
        load_init_weights(_model("test_resnet", 6), tmp_path / "no_such_bundle")
    with pytest.raises(ConfigError, match="not both"):
        train(compose("train", [*FAST, f"init_from={tiny_run['bundle']}", f"ckpt_path={tiny_run['last_ckpt']}"],
                      output_dir=tmp_path / "both"))


def test_backbone_weights_accepts_a_zoo_bundle_and_refuses_a_wrong_file(tiny_run: dict, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from zoo.backbones import TimmBackbone

    file = Path(tiny_run["bundle"]) / "model.safetensors"
    bb = TimmBackbone("test_resnet", weights=file)
    src = load_file(str(file))
    for k, v in bb.state_dict().items():
        torch.testing.assert_close(v, src[f"backbone.{k}"], rtol=0, atol=0, msg=k)
    with pytest.raises(ValueError, match=r"only \d+ of the \d+ tensors of backbone 'resnet10t'.*init_from"):
        TimmBackbone("resnet10t", weights=file)
    # a zoo checkpoint works as well (model.backbone.* keys)
    bb2 = TimmBackbone("test_resnet", weights=tiny_run["best_ckpt"])
    ck = torch.load(tiny_run["best_ckpt"], map_location="cpu", weights_only=True)["state_dict"]
    first = next(iter(bb2.state_dict()))
    torch.testing.assert_close(bb2.state_dict()[first], ck[f"model.backbone.{first}"])


@pytest.fixture
def empty_weight_caches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No cached timm weights anywhere (Hugging Face cache and torch.hub folder point into tmp_path)."""
    import huggingface_hub.constants as hfc

    monkeypatch.setattr(hfc, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.delenv("ZOO_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    return tmp_path / "hf"


def test_pretrained_offline_fails_fast_with_a_way_out(empty_weight_caches: Path, monkeypatch) -> None:
    import socket

    from zoo.backbones import TimmBackbone
    from zoo.hub.download import OfflineError

    monkeypatch.setenv("ZOO_OFFLINE", "1")
    t = time.perf_counter()
    with pytest.raises(OfflineError, match=r"ZOO_OFFLINE.*backbone\.weights=.*init_from="):
        TimmBackbone("test_resnet", pretrained=True)
    assert time.perf_counter() - t < 5
    monkeypatch.delenv("ZOO_OFFLINE")

    def no_network(*args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(socket, "create_connection", no_network)
    with pytest.raises(OfflineError, match=r"did not answer within .*backbone\.weights="):
        TimmBackbone("test_resnet", pretrained=True)


def test_pretrained_offline_uses_cached_weights(empty_weight_caches: Path, monkeypatch) -> None:
    import timm
    from safetensors.torch import save_file

    from zoo.backbones import TimmBackbone

    full = timm.create_model("test_resnet")
    repo = timm.get_pretrained_cfg("test_resnet").hf_hub_id
    folder = empty_weight_caches / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text("0" * 40)
    (folder / "snapshots" / ("0" * 40)).mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in full.state_dict().items()},
              str(folder / "snapshots" / ("0" * 40) / "model.safetensors"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    bb = TimmBackbone("test_resnet", pretrained=True)
    torch.testing.assert_close(bb.body.state_dict()["conv1.0.weight"], full.state_dict()["conv1.0.weight"])


# ----------------------------------------------------------------------- 3. a validation split from one folder
def test_holdout_split_is_seeded_and_stratified() -> None:
    from zoo.data.datamodule import holdout_split

    labels = [0] * 10 + [1] * 5 + [2] * 1
    train, val = holdout_split(16, 0.25, seed=0, labels=labels)
    assert len(val) == 4 and sorted(train + val) == list(range(16))
    counts = [sum(labels[i] == c for i in val) for c in range(3)]
    assert counts[2] == 0 and counts[0] in (2, 3) and sum(counts) == 4  # every class keeps a training image
    assert holdout_split(16, 0.25, seed=0, labels=labels) == (train, val)
    assert holdout_split(16, 0.25, seed=1, labels=labels) != (train, val)
    plain = holdout_split(10, 0.3, seed=0)
    assert len(plain[1]) == 3 and holdout_split(10, 0.3, seed=0) == plain


@pytest.mark.parametrize("layout", ["split_folder", "flat"])
def test_image_folder_val_fraction(layout: str, tmp_path: Path) -> None:
    root = tmp_path / "data"
    colour_folders(root / "train" if layout == "split_folder" else root,
                   {"a": (200, 0, 0), "b": (0, 200, 0), "c": (0, 0, 200)}, n=10, size=16)
    ov = ["data=image_folder", f"data.root={root}", "data.val_fraction=0.2", "backbone=test_resnet",
          "model.input_size=[32,32]"]
    dm = _datamodule(ov, tmp_path)
    val = [p for p, _ in dm.val_set.samples]
    train = [p for p, _ in dm.train_set.samples]
    assert len(val) == 6 and len(train) == 24 and not set(val) & set(train)
    assert sorted(p.parent.name for p in val) == ["a", "a", "b", "b", "c", "c"]
    assert dm.val_set.augment is None and dm.train_set.augment is not None
    assert [p for p, _ in _datamodule(ov, tmp_path).val_set.samples] == val
    assert [p for p, _ in _datamodule([*ov, "data.val_seed=3"], tmp_path).val_set.samples] != val
    assert dm.info["class_names"] == ["a", "b", "c"]


def test_mask_folder_val_fraction(tmp_path: Path) -> None:
    root = mask_pairs(tmp_path / "pairs", n=8)
    dm = _datamodule(["model=semantic", "data=mask_folder", f"data.root={root}", "data.val_fraction=0.25",
                      "backbone=test_resnet", "model.input_size=[32,32]"], tmp_path)
    assert len(dm.val_set) == 2 and len(dm.train_set) == 6
    assert not {p for p, _ in dm.val_set.pairs} & {p for p, _ in dm.train_set.pairs}
    assert dm.train_set[0]["target"].shape == (32, 32)


def test_val_fraction_errors_name_the_fix(tmp_path: Path) -> None:
    root = tmp_path / "data"
    colour_folders(root / "train", {"a": (200, 0, 0), "b": (0, 200, 0)}, n=3, size=16)
    base = ["data=image_folder", f"data.root={root}", "backbone=test_resnet", "model.input_size=[32,32]"]
    dm = _datamodule(base, tmp_path)  # no val folder: 20 % held out by default, as data.val_fraction=0.2 does
    assert len(dm.val_set) >= 1 and len(dm.train_set) + len(dm.val_set) == 6
    assert dm.val_set.samples == _datamodule([*base, "data.val_fraction=0.2"], tmp_path).val_set.samples
    with pytest.raises(ConfigError, match="leaves the validation split empty"):
        _datamodule([*base, "data.val_fraction=0.05"], tmp_path)
    with pytest.raises(ConfigError, match="between 0 and 1"):
        _datamodule([*base, "data.val_fraction=1.5"], tmp_path)
    colour_folders(root / "val", {"a": (200, 0, 0)}, n=1, size=16)
    with pytest.raises(ConfigError, match="validation split folder .* exists too"):
        _datamodule([*base, "data.val_fraction=0.3"], tmp_path)


def _coco_train_only(tmp_path: Path, n: int = 20) -> Path:
    """A COCO folder with a training json and no validation json (the embedded dataset's boxes, 64 px)."""
    from zoo.data.shapes import ensure_shapes_dataset

    src = Path(ensure_shapes_dataset(tmp_path / "shapes", num_train=n, num_val=0, image_size=64))
    root = tmp_path / "coco"
    (root / "annotations").mkdir(parents=True)
    (root / "annotations" / "instances_train.json").symlink_to(src / "annotations" / "instances_train.json")
    (root / "train").symlink_to(src / "train")
    return root


def test_coco_without_a_validation_json_holds_out_images_instead_of_validating_on_the_training_ones(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """It validated on the training images (a warning said so), so best.ckpt was picked by how well the model fitted
    them. Now 20 % of the training json's images are held out, as data.val_fraction=0.2, and COCO AP reads those."""
    root = _coco_train_only(tmp_path)
    base = ["model=detection", "data=coco", f"data.root={root}", "data.train_split=train", "data.val_split=val",
            "backbone=test_resnet", "model.input_size=[64,64]"]
    with caplog.at_level("WARNING", logger="zoo"):
        dm = _datamodule(base, tmp_path)
    tr = [r.image_id for r in dm.train_set.records]
    va = [r.image_id for r in dm.val_set.records]
    assert len(tr) == 16 and len(va) == 4 and not set(tr) & set(va)
    assert dm.val_set.augment is None and dm.train_set.augment is not None
    assert "holding out 20% of the images" in caplog.text and "data.val_fraction" in caplog.text
    assert dm.info["val_ann_file"].endswith("instances_train.json")
    assert [r.image_id for r in _datamodule([*base, "data.val_fraction=0.2"], tmp_path).val_set.records] == va
    assert [r.image_id for r in _datamodule([*base, "data.val_seed=1"], tmp_path).val_set.records] != va
    # validating on the training images is still one override away (the overfit checks do so)
    same = _datamodule([*base, "data.val_split=train"], tmp_path)
    assert len(same.val_set) == len(same.train_set) == 20
    (root / "annotations" / "instances_val.json").write_bytes((root / "annotations" / "instances_train.json").read_bytes())
    with pytest.raises(ConfigError, match="validation json .* exists too"):
        _datamodule([*base, "data.val_fraction=0.2"], tmp_path)


@pytest.mark.parametrize("layout", ["split_folder", "flat"])
def test_identity_folder_without_a_validation_folder_holds_out_identities(layout: str, tmp_path: Path) -> None:
    """It stopped with 'image folder <root>/val does not exist'. Now 20 % of the identities (not of the images: the
    validation is open-set retrieval) are held out, and the training labels stay 0..n-1 over the kept ones."""
    root = tmp_path / "ids"
    colours = {f"id{i}": (40 * i, 200 - 30 * i, 90) for i in range(5)}
    colour_folders(root / "train" if layout == "split_folder" else root, colours, n=4, size=16)
    base = ["model=similarity", "data=identity_folder", f"data.root={root}", "backbone=test_resnet",
            "model.input_size=[32,32]"]
    dm = _datamodule(base, tmp_path)
    train_ids, val_ids = dm.info["train_identities"], dm.info["test_identities"]
    assert len(val_ids) == 1 and len(train_ids) == 4 and not set(train_ids) & set(val_ids)
    assert sorted({p.parent.name for p, _ in dm.val_set.samples}) == val_ids and len(dm.val_set) == 4
    assert sorted({p.parent.name for p, _ in dm.train_set.samples}) == sorted(train_ids)
    assert sorted(set(dm.train_set.labels())) == [0, 1, 2, 3] and dm.train_set.class_names == train_ids
    assert all(dm.train_set.class_names[lab] == p.parent.name for p, lab in dm.train_set.samples)
    assert dm.val_set.augment is None and dm.train_set.augment is not None
    drawn = {tuple(_datamodule([*base, f"data.val_seed={k}"], tmp_path).info["test_identities"]) for k in range(4)}
    assert len(drawn) > 1  # seeded: another val_seed holds out another identity
    with pytest.raises(ConfigError, match="identities"):
        _datamodule([*base, "data.val_fraction=0.99"], tmp_path)


def test_evaluate_redraws_the_coco_images_a_run_held_out(tmp_path: Path) -> None:
    from zoo.tasks.multitask import _held_out_split_of_training

    root = _coco_train_only(tmp_path)
    info = {"root": str(root), "val_fraction": 0.25, "val_seed": 3}
    dcfg = {"kind": "coco", "root": str(root), "val_split": "val", "val_fraction": None}
    _held_out_split_of_training(dcfg, info, single=True)
    assert (dcfg["val_fraction"], dcfg["val_seed"]) == (0.25, 3)
    (root / "annotations" / "instances_val.json").symlink_to(root / "annotations" / "instances_train.json")
    dcfg = {"kind": "coco", "root": str(root), "val_split": "val", "val_fraction": None}
    _held_out_split_of_training(dcfg, info, single=True)  # a validation json now: evaluate on it
    assert dcfg["val_fraction"] is None


# --------------------------------------------------------------------- 7. evaluate.py takes what the ckpt knows
def test_evaluate_mask_folder_takes_class_names_from_the_checkpoint(tmp_path: Path) -> None:
    from zoo.evaluation import evaluate
    from zoo.training import train

    root = mask_pairs(tmp_path / "pairs", n=8)
    res = train(compose("train", ["model=semantic", "data=mask_folder", f"data.root={root}", "data.val_fraction=0.25",
                                  *FAST, "backbone=test_resnet", "model.input_size=[32,32]", "data.batch_size=3",
                                  "trainer.max_epochs=1", "data.extra.class_names=[bg,a,b]", "export_bundle=false"],
                        output_dir=tmp_path / "run"))
    # neither the class names nor the held-out split (val_fraction, val_seed) are repeated: the checkpoint has them
    out = evaluate(compose("evaluate", [f"ckpt_path={res['best_ckpt']}", "data=mask_folder", f"data.root={root}",
                                        "data.num_workers=0", "data.persistent_workers=false",
                                        "trainer.enable_progress_bar=false"], output_dir=tmp_path / "eval"))
    assert out["metrics"]["val/mIoU"] == pytest.approx(res["metrics"]["val/mIoU"], abs=1e-6)
    assert out["per_class_iou"].keys() >= {"bg", "a", "b"}


def test_evaluate_help_lists_only_groups_it_accepts(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, str(ROOT / "evaluate.py"), "--help"], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    section = proc.stdout.split("== Configuration groups ==")[1].split("==")[0]
    groups = dict(re.findall(r"^(\w+): (.+)$", section, flags=re.M))
    assert set(groups) == {"data", "trainer", "paths"}, groups
    for group, options in groups.items():
        for option in [o.strip() for o in options.split(",")]:
            ov = [f"{group}={option}", "ckpt_path=x.ckpt"] + (["data.root=/x"] if group == "data" else [])
            validate(compose("evaluate", ov, output_dir=tmp_path), EvalConfig)


# ------------------------------------------------------------------------------------------- 8. small ones
@pytest.mark.parametrize("value,expected", [("1", 1), ("1.0", 1.0), ("3", 3), ("0.5", 0.5)])
def test_limit_batches_integer_one_is_one_batch(value: str, expected, tmp_path: Path) -> None:
    from zoo.training import build_trainer

    cfg = validate(compose("train", [*FAST, f"trainer.limit_train_batches={value}",
                                     f"trainer.limit_val_batches={value}"], output_dir=tmp_path), TrainConfig)
    trainer, _ = build_trainer(cfg, tmp_path, monitor="val/top1", mode="max")
    for v in (trainer.limit_train_batches, trainer.limit_val_batches):
        assert v == expected and type(v) is type(expected)
    with pytest.raises(ConfigError, match="trainer.limit_train_batches"):
        validate(compose("train", ["trainer.limit_train_batches=all"], output_dir=tmp_path), TrainConfig)


@pytest.mark.parametrize("k", [2, 5, 6])
def test_top5_only_with_more_than_five_classes(k: int) -> None:
    from zoo.heads.base import head_class
    from zoo.metrics.evaluators import evaluator_for

    head = head_class("classification")([8], [32], num_classes=k)
    ev = evaluator_for(head, {})
    logits = torch.randn(4, k)
    ev.update(head, logits, {"targets": torch.tensor([0, 1, 0, 1]), "target_format": "classification"})
    metrics, _ = ev.compute(SimpleNamespace(trainer=SimpleNamespace(world_size=1)))
    assert ("top5" in metrics) == (k > 5) and "top1" in metrics


def test_image_folder_default_crop_follows_input_size(tmp_path: Path) -> None:
    colour_folders(tmp_path / "data" / "train", {"a": (200, 0, 0), "b": (0, 200, 0)}, n=5, size=20)
    dm = _datamodule(["data=image_folder", f"data.root={tmp_path / 'data'}", "data.val_fraction=0.2",
                      "backbone=test_resnet", "model.input_size=[48,40]"], tmp_path)
    crop = dm.train_set.augment.transforms[0]
    assert type(crop).__name__ == "RandomResizedCrop" and tuple(crop.size) == (48, 40)
    assert tuple(dm.train_set[0]["image"].shape) == (3, 48, 40)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is visible")
def test_trainer_gpu_without_cuda_says_so(tmp_path: Path) -> None:
    from zoo.training import train

    with pytest.raises(ConfigError, match="no CUDA device is visible.*trainer=cpu"):
        train(compose("train", ["trainer=gpu", *FAST], output_dir=tmp_path))


def test_docstring_model_names_are_registered() -> None:
    import hubconf
    import zoo
    import zoo.hub
    import zoo.hub.api
    import zoo.predictor

    registered = set(zoo.list_models())
    for mod in (zoo, zoo.hub, zoo.hub.api, zoo.predictor, hubconf):
        doc = inspect.getdoc(mod) or ""
        for name in re.findall(r"(?:load|resolve|Predictor)\(\"([\w-]+\.[\w-]+)\"\)", doc):
            assert name in registered, f"{mod.__name__} names {name!r}; registered: {sorted(registered)}"
        for entry in re.findall(r"torch\.hub\.load\(\"<owner>/<repo>\", \"(\w+)\"\)", doc):
            assert entry in hubconf._ENTRIES, f"hubconf names entry {entry!r}; entries: {sorted(hubconf._ENTRIES)}"


def test_embedding_index_records_its_model_and_search_checks_it(tmp_path: Path) -> None:
    from zoo.models import create_model
    from zoo.similarity_cli import embed_images, search_images
    from zoo.similarity_index import EmbeddingIndex

    rng = np.random.default_rng(0)
    paths = []
    for i in range(4):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(paths[-1])
    index = embed_images("test_resnet.shapes_sim", paths, progress=False)
    assert index.meta["model"] == "test_resnet.shapes_sim" and len(index.meta["weights_sha256"]) == 64
    saved = EmbeddingIndex.load(index.save(tmp_path / "index.npz"))
    assert saved.meta == index.meta
    hits = search_images("test_resnet.shapes_sim", saved, [str(paths[0])], k=2)
    assert hits[0][0][0] == str(paths[0])
    other = create_model({"backbone": {"name": "test_resnet"},
                          "heads": {"emb": {"type": "embedding", "embedding_dim": saved.dim}}, "task": "similarity"})
    with pytest.raises(ValueError, match="built with 'test_resnet.shapes_sim'.*other weights"):
        search_images(other, saved, [str(paths[0])], k=2)


def _load_script(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_segmentation_speed_benchmark_runs_at_batch_1() -> None:
    bench = _load_script(ROOT / "benchmarks" / "segmentation_speed.py")
    res = bench.main(["--decoders", "semantic_fpn", "--batch", "1", "--size", "64", "--steps", "1", "--warmup", "0",
                      "--device", "cpu"])
    assert set(res) == {"torchvision_deeplabv3", "semantic_fpn"}
    assert all(r["train"] > 0 and r["infer"] > 0 for r in res.values())


def test_faiss_is_installed_with_the_dev_extra() -> None:
    """pyproject's dev extra installs faiss-cpu, so the FAISS backend's test (test_similarity_parts.py) runs."""
    from zoo.metrics.retrieval import faiss_available

    assert "faiss-cpu" in (ROOT / "pyproject.toml").read_text()
    assert faiss_available(), "faiss is not installed: pip install -e '.[dev]' (faiss-cpu)"


# ------------------------------------------------------- 9. hand-written only where a test shows the reason
@pytest.mark.parametrize("loo", [True, False])
def test_retrieval_metrics_equal_pytorch_metric_learning(loo: bool) -> None:
    from pytorch_metric_learning.distances import CosineSimilarity
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator
    from pytorch_metric_learning.utils.inference import CustomKNN

    from zoo.metrics.retrieval import retrieval_metrics

    g = torch.Generator().manual_seed(7)
    q, ql = torch.randn(300, 16, generator=g), torch.randint(0, 12, (300,), generator=g)
    ref, rl = (None, None) if loo else (torch.randn(400, 16, generator=g), torch.arange(400) % 12)
    calc = AccuracyCalculator(include=("precision_at_1", "mean_average_precision_at_r"),
                              knn_func=CustomKNN(CosineSimilarity()))
    expected = calc.get_accuracy(q, ql) if loo else calc.get_accuracy(q, ql, ref, rl, ref_includes_query=False)
    for backend in ("torch", "faiss"):
        got = retrieval_metrics(q, ql, ref, rl, ks=(1,), backend=backend, batch_size=64)
        assert got["R@1"] == pytest.approx(expected["precision_at_1"], abs=1e-9)
        assert got["mAP@R"] == pytest.approx(expected["mean_average_precision_at_r"], abs=1e-9)


def test_retrieval_benchmark_reports_equal_metrics_and_both_timings() -> None:
    """benchmarks/retrieval_metrics.py is the record of why zoo keeps its retrieval metrics (pml's are 20-45x
    slower, same values); it runs here at a tiny size so it keeps working."""
    bench = _load_script(ROOT / "benchmarks" / "retrieval_metrics.py")
    (row,) = bench.main(["--sizes", "400", "--dim", "16", "--classes", "10"])
    assert row["max_abs_diff"] < 1e-9 and row["zoo_s"] > 0 and row["pml_s"] > 0


def test_class_balanced_sampler_is_kept_for_ddp_and_coverage() -> None:
    """Why zoo keeps ClassBalancedBatchSampler rather than pml's MPerClassSampler: ours yields whole P x M batches
    sharded over DDP ranks (pml's takes no rank; under DDP Lightning would split its flat index stream with a
    DistributedSampler, breaking the class blocks), and an epoch of ours sees every item before any repeats (pml draws
    each class's M items independently, so items repeat and others are missed)."""
    from pytorch_metric_learning.samplers import MPerClassSampler

    from zoo.data.samplers import ClassBalancedBatchSampler

    params = inspect.signature(MPerClassSampler.__init__).parameters
    assert "rank" not in params and "num_replicas" not in params
    labels = [c for c in range(4) for _ in range(6)]
    ours = ClassBalancedBatchSampler(labels, m_per_class=2, batch_size=4, seed=0)
    assert sorted(i for b in ours for i in b) == list(range(24))
    ranks = [list(ClassBalancedBatchSampler(labels, m_per_class=2, batch_size=4, seed=0, num_replicas=2, rank=r,
                                            length=48)) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == 6
    assert [b for pair in zip(*ranks) for b in pair] == list(
        ClassBalancedBatchSampler(labels, m_per_class=2, batch_size=4, seed=0, length=48))
    np.random.seed(0)
    theirs = list(MPerClassSampler(labels, m=2, batch_size=4, length_before_new_iter=24))
    assert len(theirs) == 24 and len(set(theirs)) < 24
