"""Default recipes against a plain training loop: same backbone, image size, batch, epochs and optimizer, 3 seeds.

    python benchmarks/recipes.py --task cls --seeds 0,1,2
    python benchmarks/recipes.py --task cls --variant "ema=model.ema.enabled=true;model.ema.decay=0.998"

``cls``: person / other object on crops of real COCO photos (non-crowd objects at least 24 px on their short
side, 10 % context, as many other objects as people: coco128's 326 for training, tiny_coco's 146 for validation;
../shared/data, written to a scratch folder, never into the repository), resnet18 from random initialisation at
64 px, batch 32, 30 epochs (300 steps).
``sem``: person masks on coco128's photos (every 4th held out, plus tiny_coco's), resnet18 Semantic-FPN at 192 px
(the json's person polygons rasterised, crowd regions ignored), batch 8, 30 epochs.
``shapes``: the embedded dataset as an image folder (the largest object's shape; 300 training images, 600 for
validation; generated, needs no ../shared), resnet18 at 64 px, batch 32, 30 epochs: a low-noise setting for
telling recipe parts apart.
``sim``: retrieval of unseen categories on real crops (coco128 + tiny_coco objects at least 24 px, at most 40 per
category; 30 % of the categories held out: 439 training crops of 51 categories, 224 validation crops of 22), resnet18
at 64 px, batch 32, 30 epochs; R@1 with each validation crop a query among the others. ``sim_shapes``: the same over
the embedded dataset's colour-shape identities (unseen pairs at validation). Their plain loop is
pytorch-metric-learning's triplet example (semi-hard triplets of shuffled batches, a linear embedding).
``det``: boxes of the embedded dataset (300 training and 300 validation renderings at 128 px, read as a COCO folder
with ``data=coco``), the zoo's FCOS resnet18 FPN at 128 px, batch 16, 30 epochs; COCO box AP.

Sides per seed: ``plain`` (a hand-written loop: torchvision's ImageFolder / mask / COCO reading, RandomResizedCrop +
flip (a stretch resize + flip for boxes), AdamW lr 1e-3 wd 0.05 with a per-step cosine schedule, the task's plain loss
(cross-entropy; a triplet loss; the detector's own); the metric of the last epoch) and each zoo
variant through :func:`zoo.training.train` as ``python train.py data=image_folder data.root=<photos>`` runs it
(the metric of the last epoch from the run's metrics.csv, not of the best checkpoint: no selection on the
validation set). Wall time beside each. Writes ``benchmarks/results/recipes_<task>.md`` / ``.json``.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
ROOT = Path(__file__).resolve().parents[1]
try:
    import zoo  # noqa: F401
except ImportError:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
SETTINGS = {"cls": {"size": 64, "batch": 32, "epochs": 30, "backbone": "resnet18"},
            "sem": {"size": 192, "batch": 8, "epochs": 30, "backbone": "resnet18"},
            "shapes": {"size": 64, "batch": 32, "epochs": 30, "backbone": "resnet18"},
            "sim": {"size": 64, "batch": 32, "epochs": 30, "backbone": "resnet18"},
            "sim_shapes": {"size": 64, "batch": 32, "epochs": 30, "backbone": "resnet18"},
            "det": {"size": 128, "batch": 16, "epochs": 30, "backbone": "resnet18"}}
#: what each setting is scored as: single-label classification from an image folder, semantic masks, open-set
#: retrieval from an identity folder, or COCO boxes
KIND = {"cls": "cls", "shapes": "cls", "sem": "sem", "sim": "sim", "sim_shapes": "sim", "det": "det"}
#: the overrides column of the plain loop's own sides
PLAIN_NOTE = {"plain + warm-up": "(plain loop) 1 epoch of linear warm-up from 1 %, as the zoo's cosine schedule"}
#: what the floor line of the results names
FLOOR = {"cls": "A constant prediction (the most frequent class everywhere)",
         "sem": "A constant prediction (background everywhere)", "sim": "A random ranking",
         "det": "Predicting no boxes"}
METRIC = {"cls": ("top-1", "val/top1"), "sem": ("mIoU", "val/mIoU"), "sim": ("R@1", "val/R@1"),
          "det": ("mAP", "val/mAP")}


def photos(work: Path) -> Path:
    """``<work>/crops/{train,val}/{person,other}/``: non-crowd COCO objects at least 24 px on their short side,
    cropped with 10 % context; coco128's for training, tiny_coco's for validation. Balanced: every person crop and
    as many of the other objects' crops, drawn once with a fixed generator (the same set for every seed), so a
    constant prediction scores 0.5 (163 + 163 crops for training, 73 + 73 for validation)."""
    from PIL import Image

    root = work / "crops"
    if root.is_dir():
        return root
    rng = np.random.default_rng(0)
    for sub, split in (("coco128", "train"), ("tiny_coco", "val")):
        js = json.loads((SHARED / sub / "annotations" / "instances_train2017.json").read_text())
        files = {im["id"]: im["file_name"] for im in js["images"]}
        keep = sorted((a for a in js["annotations"] if not a.get("iscrowd") and min(a["bbox"][2:]) >= 24),
                      key=lambda a: a["id"])
        person = [a for a in keep if a["category_id"] == 1]
        other = [a for a in keep if a["category_id"] != 1]
        other = [other[i] for i in sorted(rng.choice(len(other), size=min(len(person), len(other)), replace=False))]
        for d in ("person", "other"):
            (root / split / d).mkdir(parents=True, exist_ok=True)
        for a in person + other:
            _save_crop(SHARED / sub / "train2017" / files[a["image_id"]], a["bbox"],
                       root / split / ("person" if a["category_id"] == 1 else "other") / f"{a['id']}.jpg")
    return root


def _save_crop(image: Path, bbox: list[float], out: Path, context: float = 0.1) -> None:
    """The COCO box ``[x, y, w, h]`` grown by ``context`` on each side (clipped to the image), saved as a JPEG."""
    from PIL import Image

    x, y, w, h = bbox
    with Image.open(image) as im:
        im = im.convert("RGB")
        box = (max(0, x - context * w), max(0, y - context * h), min(im.width, x + w * (1 + context)),
               min(im.height, y + h * (1 + context)))
        im.crop(tuple(int(round(v)) for v in box)).save(out, quality=95)


def category_crops(work: Path, cap: int = 40) -> Path:
    """``<work>/identities/{train,val}/<category>/``: retrieval of unseen categories (open set, as
    ``data=coco_crops`` splits them). Non-crowd objects at least 24 px on their short side from coco128 and
    tiny_coco, cropped with 10 % context; the category is the identity. 30 % of the categories are held out for
    validation (``zoo.data.crops.split_identities``, seed 0), the rest train. At most ``cap`` crops per category,
    drawn once with a fixed generator, so that people (236 crops) do not make up most of either split."""
    from zoo.data.crops import split_identities

    root = work / "identities"
    if root.is_dir():
        return root
    by_cat: dict[str, list[tuple[str, Path, dict]]] = {}
    for sub in ("coco128", "tiny_coco"):
        js = json.loads((SHARED / sub / "annotations" / "instances_train2017.json").read_text())
        files = {im["id"]: im["file_name"] for im in js["images"]}
        names = {c["id"]: c["name"] for c in js["categories"]}
        for a in sorted(js["annotations"], key=lambda a: a["id"]):
            if not a.get("iscrowd") and min(a["bbox"][2:]) >= 24:
                by_cat.setdefault(names[a["category_id"]], []).append(
                    (sub, SHARED / sub / "train2017" / files[a["image_id"]], a))
    train_ids, test_ids = split_identities(sorted(by_cat), 0.3, seed=0)
    rng = np.random.default_rng(0)
    for split, ids in (("train", train_ids), ("val", test_ids)):
        for name in ids:
            items = by_cat[name]
            if len(items) > cap:
                items = [items[i] for i in sorted(rng.choice(len(items), size=cap, replace=False))]
            d = root / split / name.replace(" ", "_")
            d.mkdir(parents=True, exist_ok=True)
            for sub, image, a in items:  # annotation ids of the two subsets may meet: the subset names the file
                _save_crop(image, a["bbox"], d / f"{sub}_{a['id']}.jpg")
    return root


def shapes_identities(work: Path, num_images: int = 300) -> Path:
    """``<work>/shape_identities/{train,val}/<colour>_<shape>/``: object crops of the embedded dataset (128 px
    renderings) under their identity, colour and shape together (36 of them); 30 % of the identities held out
    for validation (``split_identities``, seed 0), so validation retrieves unseen colour-shape pairs. Objects at
    least 16 px on their short side, 10 % context. A low-noise setting beside ``sim``'s real photos."""
    from zoo.data.crops import split_identities

    root = work / "shape_identities"
    if root.is_dir():
        return root
    src = shapes_coco(work, num_images, num_images)
    by_id: dict[str, list[tuple[Path, dict]]] = {}
    for split in ("train", "val"):
        js = json.loads((src / "annotations" / f"instances_{split}.json").read_text())
        files = {im["id"]: src / split / im["file_name"] for im in js["images"]}
        for a in js["annotations"]:
            if not a.get("iscrowd") and min(a["bbox"][2:]) >= 16:
                by_id.setdefault(a["identity"], []).append((files[a["image_id"]], {**a, "split": split}))
    train_ids, test_ids = split_identities(sorted(by_id), 0.3, seed=0)
    for split, ids in (("train", train_ids), ("val", test_ids)):
        for name in ids:
            d = root / split / name
            d.mkdir(parents=True, exist_ok=True)
            for image, a in by_id[name]:
                _save_crop(image, a["bbox"], d / f"{a['split']}_{a['id']}.jpg")
    return root


def shapes_coco(work: Path, num_train: int = 300, num_val: int = 300) -> Path:
    """``<work>/shapes_det``: the embedded dataset (128 px renderings, zoo.data.shapes) in its COCO layout
    (``annotations/instances_{train,val}.json``, ``{train,val}/``), read as a user's own COCO folder. Detection
    from random initialisation does not learn on coco128's 128 photos in a CPU budget, so the boxes setting is the
    generated one."""
    from zoo.data.shapes import ensure_shapes_dataset

    return Path(ensure_shapes_dataset(work / "shapes_det", num_train=num_train, num_val=num_val, image_size=128))


def shapes_folder(work: Path, num_train: int = 300, num_val: int = 600) -> Path:
    """``<work>/shapes_folder/{train,val}/<shape>/``: the embedded dataset (96 px renderings, zoo.data.shapes) as an
    image folder, each image under the category of its largest object: a few hundred training images, as a user's
    own small dataset, and a large validation split so that differences of a few points are above the noise (600
    images: standard error about 0.02 at 0.5 accuracy). Generated by the project, so it needs no ../shared."""
    from zoo.data.shapes import ensure_shapes_dataset

    root = work / "shapes_folder"
    if root.is_dir():
        return root
    src = Path(ensure_shapes_dataset(work / "shapes", num_train=num_train, num_val=num_val, image_size=96))
    for split in ("train", "val"):
        js = json.loads((src / "annotations" / f"instances_{split}.json").read_text())
        names = {c["id"]: c["name"] for c in js["categories"]}
        largest: dict[int, dict] = {}
        for a in js["annotations"]:
            if not a.get("iscrowd") and a["area"] > largest.get(a["image_id"], {}).get("area", -1):
                largest[a["image_id"]] = a
        for im in js["images"]:
            a = largest.get(im["id"])
            if a is None:
                continue  # an image without a (non-crowd) object has no class
            d = root / split / names[a["category_id"]]
            d.mkdir(parents=True, exist_ok=True)
            shutil.copy(src / split / im["file_name"], d / Path(im["file_name"]).name)
    classes = [sorted(p.name for p in (root / s).iterdir()) for s in ("train", "val")]
    if classes[0] != classes[1]:  # ImageFolder numbers classes per folder: both splits must hold the same ones
        shutil.rmtree(root)
        raise RuntimeError(f"shapes folder: train classes {classes[0]} differ from val classes {classes[1]}; "
                           "give more images")
    return root


def person_masks(work: Path) -> Path:
    """``<work>/masks/{train,val}/{images,masks}/``: the same split, person pixels = 1 (crowd regions ignored)."""
    from pycocotools import mask as mask_api
    from PIL import Image

    root = work / "masks"
    if root.is_dir():
        return root
    for sub, every in (("coco128", 4), ("tiny_coco", 1)):
        js = json.loads((SHARED / sub / "annotations" / "instances_train2017.json").read_text())
        by_img: dict[int, list] = {}
        for a in js["annotations"]:
            if a["category_id"] == 1:
                by_img.setdefault(a["image_id"], []).append(a)
        for i, im in enumerate(sorted(js["images"], key=lambda r: r["id"])):
            split = "val" if i % every == 0 else "train"
            h, w = im["height"], im["width"]
            m = np.zeros((h, w), np.uint8)
            for a in by_img.get(im["id"], []):
                seg = a["segmentation"]
                rle = mask_api.merge(mask_api.frPyObjects(seg, h, w)) if isinstance(seg, list) else (
                    mask_api.frPyObjects(seg, h, w) if isinstance(seg.get("counts"), list) else seg)
                px = mask_api.decode(rle).astype(bool)
                m[px] = 255 if a.get("iscrowd") else 1
            for d in ("images", "masks"):
                (root / split / d).mkdir(parents=True, exist_ok=True)
            shutil.copy(SHARED / sub / "train2017" / im["file_name"], root / split / "images" / im["file_name"])
            Image.fromarray(m).save(root / split / "masks" / (Path(im["file_name"]).stem + ".png"))
    return root


def trivial_metric(task: str, root: Path) -> float:
    """The validation metric of a constant prediction: the most frequent class's share of the validation crops
    (``cls``), the mIoU of labelling every pixel background (``sem``: background IoU = its pixel share, person 0),
    R@1 of a random ranking (``sim``), or 0 for detection (no boxes)."""
    if KIND[task] in ("cls", "sim"):
        counts = [len(list(d.glob("*.jpg"))) for d in sorted((root / "val").iterdir()) if d.is_dir()]
        if KIND[task] == "cls":
            return max(counts) / max(1, sum(counts))
        # a random ranking: the nearest other crop shares the query's category with probability (n_c - 1)/(N - 1);
        # queries of a category with one crop cannot be answered and are left out, as by retrieval_metrics
        n = sum(counts)
        answerable = [c for c in counts if c > 1]
        return sum(c * (c - 1) / (n - 1) for c in answerable) / max(1, sum(answerable))
    if KIND[task] == "det":
        return 0.0  # no boxes: AP 0
    from PIL import Image

    bg = total = 0
    for f in sorted((root / "val" / "masks").glob("*.png")):
        m = np.asarray(Image.open(f))
        ok = m != 255
        bg, total = bg + int(((m == 0) & ok).sum()), total + int(ok.sum())
    return bg / max(1, total) / 2


# --------------------------------------------------------------------------- plain loops
def _cosine(opt: torch.optim.Optimizer, total: int, warmup: int = 0) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step cosine decay to 0 over ``total`` steps; with ``warmup``, a linear ramp from 1 % over its first steps
    (what the zoo's scheduler does by default: ``--plain-warmup`` tells that part apart from the rest)."""
    def factor(s: int) -> float:
        cos = 0.5 * (1 + math.cos(math.pi * min(s, total) / total))
        return cos * (0.01 + 0.99 * s / warmup) if s < warmup else cos

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def _folders(root: Path, size: int):
    """torchvision ImageFolders of ``root/train`` (RandomResizedCrop 0.5-1 + flip) and ``root/val`` (a resize)."""
    from torchvision.datasets import ImageFolder
    from torchvision.transforms import v2 as T

    tf = T.Compose([T.RandomResizedCrop(size, scale=(0.5, 1.0), antialias=True), T.RandomHorizontalFlip(),
                    T.ToImage(), T.ToDtype(torch.float32, scale=True), T.Normalize(MEAN, STD)])
    vt = T.Compose([T.Resize((size, size), antialias=True), T.ToImage(), T.ToDtype(torch.float32, scale=True),
                    T.Normalize(MEAN, STD)])
    return ImageFolder(str(root / "train"), tf), ImageFolder(str(root / "val"), vt)


def plain_cls(root: Path, s: dict[str, Any], seed: int) -> dict[str, Any]:
    import timm

    torch.manual_seed(seed)
    t0 = time.perf_counter()
    size = s["size"]
    train, val = _folders(root, size)
    dl = torch.utils.data.DataLoader(train, s["batch"], shuffle=True, num_workers=2, persistent_workers=True,
                                     drop_last=True)
    model = timm.create_model(s["backbone"], num_classes=len(train.classes))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    sched = _cosine(opt, s["epochs"] * len(dl), int(s.get("warmup_epochs", 0) * len(dl)))
    for _ in range(s["epochs"]):
        model.train()
        for x, y in dl:
            loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    correct = 0
    with torch.no_grad():
        for x, y in torch.utils.data.DataLoader(val, 32, num_workers=2):
            correct += int((model(x).argmax(1) == y).sum())
    return {"metric": correct / len(val), "wall_s": time.perf_counter() - t0}


class _Pairs(torch.utils.data.Dataset):
    def __init__(self, root: Path, size: int, train: bool) -> None:
        from torchvision.transforms import v2 as T

        self.items = sorted((root / "images").glob("*.jpg"))
        self.masks = root / "masks"
        ops = [T.RandomResizedCrop(size, scale=(0.5, 1.0), antialias=True), T.RandomHorizontalFlip()] if train \
            else [T.Resize((size, size), antialias=True)]
        self.tf = T.Compose(ops)
        self.norm = T.Compose([T.ToDtype(torch.float32, scale=True), T.Normalize(MEAN, STD)])

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        from PIL import Image
        from torchvision import tv_tensors

        img = tv_tensors.Image(torch.from_numpy(np.array(Image.open(self.items[i]).convert("RGB"))).permute(2, 0, 1))
        m = tv_tensors.Mask(torch.from_numpy(np.array(Image.open(self.masks / (self.items[i].stem + ".png")))))
        img, m = self.tf(img, m)
        return self.norm(img), m.long()


def plain_sem(root: Path, s: dict[str, Any], seed: int) -> dict[str, Any]:
    """The zoo's own Semantic-FPN network (same architecture as the zoo side) in a hand-written loop."""
    from zoo.models import create_model

    torch.manual_seed(seed)
    t0 = time.perf_counter()
    train, val = _Pairs(root / "train", s["size"], True), _Pairs(root / "val", s["size"], False)
    dl = torch.utils.data.DataLoader(train, s["batch"], shuffle=True, num_workers=2, persistent_workers=True,
                                     drop_last=True)
    spec = {"backbone": {"name": s["backbone"]}, "heads": {"seg": {"type": "semantic_fpn", "num_classes": 2}},
            "input_size": [s["size"], s["size"]], "task": "semantic"}
    model = create_model(spec, load_backbone_weights=False)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    sched = _cosine(opt, s["epochs"] * len(dl), int(s.get("warmup_epochs", 0) * len(dl)))

    def logits(x):
        out = model(x)["seg"]["logits"]
        return torch.nn.functional.interpolate(out, size=x.shape[-2:], mode="bilinear", align_corners=False)

    for _ in range(s["epochs"]):
        model.train()
        for x, y in dl:
            loss = torch.nn.functional.cross_entropy(logits(x), y, ignore_index=255)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    inter = torch.zeros(2)
    union = torch.zeros(2)
    with torch.no_grad():
        for x, y in torch.utils.data.DataLoader(val, 8, num_workers=2):
            p = logits(x).argmax(1)
            ok = y != 255
            for c in range(2):
                inter[c] += ((p == c) & (y == c) & ok).sum()
                union[c] += (((p == c) | (y == c)) & ok).sum()
    return {"metric": float((inter / union.clamp(min=1)).mean()), "wall_s": time.perf_counter() - t0}


def zoo_network(task: str, root: Path, s: dict[str, Any], work: Path) -> torch.nn.Module:
    """The network the zoo side trains, from random initialisation: the spec its composed config builds
    (``task_class(...).build``), so both sides train the same architecture."""
    from zoo.config import TrainConfig, validate
    from zoo.models import create_model
    from zoo.tasks import task_class

    cfg = zoo_config(task, root, s, 0, [], work / "spec")
    validate(cfg, TrainConfig)
    _, kwargs = task_class(cfg.model.task).build(cfg)
    return create_model(kwargs["spec"], load_backbone_weights=False)


def plain_sim(root: Path, s: dict[str, Any], seed: int) -> dict[str, Any]:
    """pytorch-metric-learning's own example recipe: a timm backbone's pooled features and a linear embedding,
    a triplet margin loss (margin 0.2) on the semi-hard triplets of shuffled batches; R@1 over the held-out
    categories' crops, each crop a query among all the others (the metric the zoo side logs)."""
    import timm
    from pytorch_metric_learning import losses, miners

    from zoo.metrics.retrieval import retrieval_metrics

    torch.manual_seed(seed)
    size = s["size"]
    train, val = _folders(root, size)
    backbone = timm.create_model(s["backbone"], num_classes=0)
    model = torch.nn.Sequential(backbone, torch.nn.Linear(backbone.num_features, 128))

    def recall_at_1() -> float:
        model.eval()
        embs, labels = [], []
        with torch.no_grad():
            for x, y in torch.utils.data.DataLoader(val, 64, num_workers=2):
                embs.append(model(x))
                labels.append(y)
        return retrieval_metrics(torch.cat(embs), torch.cat(labels))["R@1"]

    untrained = recall_at_1()  # random features already retrieve by colour and layout: the floor that counts
    t0 = time.perf_counter()
    dl = torch.utils.data.DataLoader(train, s["batch"], shuffle=True, num_workers=2, persistent_workers=True,
                                     drop_last=True)
    loss_fn, miner = losses.TripletMarginLoss(margin=0.2), miners.TripletMarginMiner(margin=0.2,
                                                                                      type_of_triplets="semihard")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    sched = _cosine(opt, s["epochs"] * len(dl), int(s.get("warmup_epochs", 0) * len(dl)))
    for _ in range(s["epochs"]):
        model.train()
        for x, y in dl:
            emb = model(x)
            loss = loss_fn(emb, y, miner(emb, y))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return {"metric": recall_at_1(), "wall_s": time.perf_counter() - t0, "untrained": untrained}


def plain_det(root: Path, s: dict[str, Any], seed: int, work: Path) -> dict[str, Any]:
    """The zoo's own detector (the spec the zoo side builds: FCOS on an FPN) in a hand-written loop: torchvision's
    CocoDetection with a stretch resize and a flip, the head's loss, AdamW with a per-step cosine; COCO box AP of
    the val split at the zoo side's post-processing (score 0.05, NMS 0.6, 100 boxes) through the same evaluator."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from speed import _collate, _Ds

    from zoo.metrics.coco_eval import evaluate_coco

    torch.manual_seed(seed)
    model = zoo_network("det", root, s, work)  # before the clock: composing a config is no part of a plain loop
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    size = s["size"]
    ann = {k: root / "annotations" / f"instances_{k}.json" for k in ("train", "val")}
    train, val = _Ds(root, "train", ann["train"], size, "det", True), _Ds(root, "val", ann["val"], size, "det", False)
    dl = torch.utils.data.DataLoader(train, s["batch"], shuffle=True, num_workers=2, persistent_workers=True,
                                     drop_last=True, collate_fn=_collate)
    head = model.heads["det"]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    sched = _cosine(opt, s["epochs"] * len(dl), int(s.get("warmup_epochs", 0) * len(dl)))
    for _ in range(s["epochs"]):
        model.train()
        for x, y in dl:
            sizes = torch.tensor([[size, size]] * len(x))
            loss = sum(head.compute_loss(model(x)["det"], y, sizes).values())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    dets = []
    with torch.no_grad():
        for x, _ in torch.utils.data.DataLoader(val, s["batch"], num_workers=2, collate_fn=_collate):
            dets += head.predict(model(x)["det"], [(size, size)] * len(x), score_thresh=0.05, nms_thresh=0.6,
                                 max_detections=100)
    res = evaluate_coco(str(ann["val"]), coco_results(val, dets, size), "bbox", image_ids=list(val.ds._dataset.ids))
    return {"metric": res.to_metrics(prefix="")["mAP"], "wall_s": time.perf_counter() - t0}


def coco_results(ds: Any, dets: list[dict[str, torch.Tensor]], size: int) -> list[dict[str, Any]]:
    """COCO result dicts of per-image detections (xyxy boxes in the ``size`` x ``size`` input, contiguous labels)
    of the dataset's images in order: boxes stretched back to each image's own size, labels back to category ids."""
    coco, ids = ds.ds._dataset.coco, list(ds.ds._dataset.ids)
    label_to_cat = {v: k for k, v in ds.cat_to_label.items()}
    results = []
    for image_id, d in zip(ids, dets, strict=True):
        im = coco.imgs[image_id]
        scale = torch.tensor([im["width"], im["height"]] * 2, dtype=torch.float32) / size
        for b, sc, lab in zip((d["boxes"].float() * scale).tolist(), d["scores"].tolist(), d["labels"].tolist()):
            results.append({"image_id": image_id, "category_id": label_to_cat[int(lab)], "score": float(sc),
                            "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]]})
    return results


# --------------------------------------------------------------------------- zoo side
def zoo_config(task: str, root: Path, s: dict[str, Any], seed: int, extra: list[str], out: Path):
    """The composed train.py config of one zoo side (raises at once on an override that does not apply)."""
    from hydra import compose, initialize_config_dir

    base = [f"data.root={root}", f"backbone.name={s['backbone']}", f"model.input_size=[{s['size']},{s['size']}]",
            f"data.batch_size={s['batch']}", f"trainer.max_epochs={s['epochs']}", f"seed={seed}",
            "trainer.enable_progress_bar=false", "logger.names=[csv]", "export_bundle=false", "run_eval=false"]
    base = {"cls": ["data=image_folder"], "sem": ["model=semantic", "data=mask_folder"],
            "sim": ["model=similarity", "data=identity_folder"],
            "det": ["model=detection", "data=coco", "data.train_split=train", "data.val_split=val"]}[KIND[task]] + base
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("train", overrides=[*base, *extra, f"paths.output_dir={out}"])


def zoo_run(task: str, root: Path, s: dict[str, Any], seed: int, extra: list[str], work: Path) -> dict[str, Any]:
    from zoo.training import train

    out = work / f"zoo_{task}_{seed}_{time.monotonic_ns()}"
    cfg = zoo_config(task, root, s, seed, extra, out)
    t0 = time.perf_counter()
    train(cfg)
    wall = time.perf_counter() - t0
    key = METRIC[KIND[task]][1]
    rows = [r for r in csv.DictReader(open(out / "csv" / "metrics.csv")) if r.get(key)]
    return {"metric": float(rows[-1][key]), "wall_s": wall, "epochs_logged": len(rows)}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--task", default="cls", choices=sorted(SETTINGS))
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--epochs", type=int, default=None)
    ap.add_argument("--size", type=int, default=None, help="override the task's image size (the tests: a tiny one)")
    ap.add_argument("--variant", action="append", default=None,
                    help="name=override[;override...] (repeatable); default: the zoo default recipe only")
    ap.add_argument("--plain-warmup", action="store_true",
                    help="also run the plain loop with the zoo's default warm-up (1 epoch, linear from 1 %%)")
    ap.add_argument("--out", default=None, help="results path without suffix; default: "
                    "benchmarks/results/recipes_<task> (.md and .json)")
    ap.add_argument("--work", default=None)
    args = ap.parse_args(argv)
    if args.task not in ("shapes", "sim_shapes", "det") and not (SHARED / "coco128" / "annotations").is_dir():
        print(f"{SHARED} is not present: this benchmark needs the real COCO subsets")
        return {}
    s = dict(SETTINGS[args.task])
    for key in ("epochs", "size"):
        if getattr(args, key):
            s[key] = getattr(args, key)
    work = Path(args.work or tempfile.mkdtemp(prefix="zoo_recipes_"))
    work.mkdir(parents=True, exist_ok=True)
    root = {"cls": photos, "sem": person_masks, "shapes": shapes_folder, "sim": category_crops,
            "sim_shapes": shapes_identities, "det": shapes_coco}[args.task](work)
    variants = {"zoo default": []}
    for v in args.variant or []:
        name, _, ov = v.partition("=")
        variants[name] = [o for o in ov.split(";") if o] if ov else []
    seeds = [int(x) for x in args.seeds.split(",")]
    from zoo.config import TrainConfig, validate

    for name, ov in variants.items():  # a mistyped override stops here, not after the runs before it
        try:
            validate(zoo_config(args.task, root, s, seeds[0], ov, work / "check"), TrainConfig)
        except Exception as err:
            raise SystemExit(f"--variant {name!r}: {err}") from None
    plains = {"plain": s, **({"plain + warm-up": {**s, "warmup_epochs": 1}} if args.plain_warmup else {})}
    rows: dict[str, list[dict[str, Any]]] = {**{k: [] for k in plains}, **{k: [] for k in variants}}
    plain = {"cls": plain_cls, "sem": plain_sem, "sim": plain_sim, "det": plain_det}[KIND[args.task]]
    for seed in seeds:
        for name, ps in plains.items():
            r = plain(root, ps, seed, work) if KIND[args.task] == "det" else plain(root, ps, seed)
            rows[name].append(r)
            print(f"[seed {seed}] {name}: {r['metric']:.4f} in {r['wall_s']:.0f} s", flush=True)
        for name, ov in variants.items():
            r = zoo_run(args.task, root, s, seed, ov, work)
            rows[name].append(r)
            print(f"[seed {seed}] {name}: {r['metric']:.4f} in {r['wall_s']:.0f} s", flush=True)
    metric = METRIC[KIND[args.task]][0]
    base = statistics.mean(r["metric"] for r in rows["plain"])
    base_t = statistics.mean(r["wall_s"] for r in rows["plain"])
    floor = trivial_metric(args.task, root)
    lines = [f"# Recipes: {args.task} ({metric}, last epoch), zoo variants against a plain loop", "",
             f"Command: `python benchmarks/recipes.py {' '.join(argv or sys.argv[1:])}`  ",
             f"Settings: `{json.dumps(s)}`, seeds {seeds}; torch {torch.__version__}, {os.cpu_count()} cores  ",
             f"{FLOOR[KIND[args.task]]} scores {floor:.3f}: a side at or below it has learned nothing usable.  ",
             *([f"The plain loop's network before training (random weights) scores "
                f"{statistics.mean(r['untrained'] for r in rows['plain']):.3f}: below it, training made the "
                "embedding worse for unseen identities."] if "untrained" in rows["plain"][0] else []), "",
             f"| side | {metric} mean | spread (min-max) | per seed | vs plain | wall s | wall vs plain | overrides |",
             "|---|---|---|---|---|---|---|---|"]
    for name, rs in rows.items():
        m = [r["metric"] for r in rs]
        t = statistics.mean(r["wall_s"] for r in rs)
        lines.append(f"| {name} | {statistics.mean(m):.3f} | {min(m):.3f}-{max(m):.3f} | "
                     f"{' '.join(f'{x:.3f}' for x in m)} | {statistics.mean(m) - base:+.3f} | {t:.0f} | "
                     f"{t / base_t:.2f}x | {PLAIN_NOTE.get(name) or ' '.join(variants.get(name, [])) or '-'} |")
    text = "\n".join(lines) + "\n"
    print(text)
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"recipes_{args.task}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"settings": s, "seeds": seeds, "rows": rows, "constant": floor,
                                                    "variants": variants}, indent=2))
    out.with_suffix(".md").write_text(text)
    return rows


if __name__ == "__main__":
    main()
