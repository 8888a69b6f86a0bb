"""Default recipes against a plain training loop: same backbone, image size, batch, epochs and optimizer, 3 seeds.

    python benchmarks/recipes.py --task cls --seeds 0,1,2
    python benchmarks/recipes.py --task cls --variant "ema=model.ema.enabled=true;model.ema.decay=0.998"

``cls``: person / other object on crops of real COCO photos (non-crowd objects at least 24 px on their short
side, 10 % context, as many other objects as people: coco128's 326 for training, tiny_coco's 146 for validation;
../shared/data, written to a scratch folder, never into the repository), resnet18 from random initialisation at
64 px, batch 32, 30 epochs (300 steps).
``sem``: person masks on coco128's photos (every 4th held out, plus tiny_coco's), resnet18 Semantic-FPN at 192 px
(the json's person polygons rasterised, crowd regions ignored), batch 8, 30 epochs.

Sides per seed: ``plain`` (a hand-written loop: torchvision's ImageFolder / mask reading, RandomResizedCrop + flip,
AdamW lr 1e-3 wd 0.05 with a per-step cosine schedule, cross-entropy; the metric of the last epoch) and each zoo
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
            "sem": {"size": 192, "batch": 8, "epochs": 30, "backbone": "resnet18"}}


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
            x, y, w, h = a["bbox"]
            with Image.open(SHARED / sub / "train2017" / files[a["image_id"]]) as im:
                im = im.convert("RGB")
                m = 0.1
                box = (max(0, x - m * w), max(0, y - m * h), min(im.width, x + w * (1 + m)), min(im.height, y + h * (1 + m)))
                im.crop(tuple(int(round(v)) for v in box)).save(
                    root / split / ("person" if a["category_id"] == 1 else "other") / f"{a['id']}.jpg", quality=95)
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
    (``cls``), or the mIoU of labelling every pixel background (``sem``: background IoU = its pixel share, person 0)."""
    if task == "cls":
        counts = [len(list(d.glob("*.jpg"))) for d in sorted((root / "val").iterdir()) if d.is_dir()]
        return max(counts) / max(1, sum(counts))
    from PIL import Image

    bg = total = 0
    for f in sorted((root / "val" / "masks").glob("*.png")):
        m = np.asarray(Image.open(f))
        ok = m != 255
        bg, total = bg + int(((m == 0) & ok).sum()), total + int(ok.sum())
    return bg / max(1, total) / 2


# --------------------------------------------------------------------------- plain loops
def _cosine(opt: torch.optim.Optimizer, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))


def plain_cls(root: Path, s: dict[str, Any], seed: int) -> dict[str, Any]:
    import timm
    from torchvision.datasets import ImageFolder
    from torchvision.transforms import v2 as T

    torch.manual_seed(seed)
    t0 = time.perf_counter()
    size = s["size"]
    tf = T.Compose([T.RandomResizedCrop(size, scale=(0.5, 1.0), antialias=True), T.RandomHorizontalFlip(),
                    T.ToImage(), T.ToDtype(torch.float32, scale=True), T.Normalize(MEAN, STD)])
    vt = T.Compose([T.Resize((size, size), antialias=True), T.ToImage(), T.ToDtype(torch.float32, scale=True),
                    T.Normalize(MEAN, STD)])
    train, val = ImageFolder(str(root / "train"), tf), ImageFolder(str(root / "val"), vt)
    dl = torch.utils.data.DataLoader(train, s["batch"], shuffle=True, num_workers=2, persistent_workers=True,
                                     drop_last=True)
    model = timm.create_model(s["backbone"], num_classes=len(train.classes))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    sched = _cosine(opt, s["epochs"] * len(dl))
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
    sched = _cosine(opt, s["epochs"] * len(dl))

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


# --------------------------------------------------------------------------- zoo side
def zoo_run(task: str, root: Path, s: dict[str, Any], seed: int, extra: list[str], work: Path) -> dict[str, Any]:
    from hydra import compose, initialize_config_dir

    from zoo.training import train

    out = work / f"zoo_{task}_{seed}_{time.monotonic_ns()}"
    base = [f"data.root={root}", f"backbone.name={s['backbone']}", f"model.input_size=[{s['size']},{s['size']}]",
            f"data.batch_size={s['batch']}", f"trainer.max_epochs={s['epochs']}", f"seed={seed}",
            "trainer.enable_progress_bar=false", "logger.names=[csv]", "export_bundle=false", "run_eval=false"]
    base = (["data=image_folder"] if task == "cls" else ["model=semantic", "data=mask_folder"]) + base
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[*base, *extra, f"paths.output_dir={out}"])
    t0 = time.perf_counter()
    train(cfg)
    wall = time.perf_counter() - t0
    key = "val/top1" if task == "cls" else "val/mIoU"
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
    ap.add_argument("--out", default=None, help="results path without suffix; default: "
                    "benchmarks/results/recipes_<task> (.md and .json)")
    ap.add_argument("--work", default=None)
    args = ap.parse_args(argv)
    if not (SHARED / "coco128" / "annotations").is_dir():
        print(f"{SHARED} is not present: this benchmark needs the real COCO subsets")
        return {}
    s = dict(SETTINGS[args.task])
    for key in ("epochs", "size"):
        if getattr(args, key):
            s[key] = getattr(args, key)
    work = Path(args.work or tempfile.mkdtemp(prefix="zoo_recipes_"))
    work.mkdir(parents=True, exist_ok=True)
    root = photos(work) if args.task == "cls" else person_masks(work)
    variants = {"zoo default": []}
    for v in args.variant or []:
        name, _, ov = v.partition("=")
        variants[name] = [o for o in ov.split(";") if o] if ov else []
    seeds = [int(x) for x in args.seeds.split(",")]
    rows: dict[str, list[dict[str, Any]]] = {"plain": [], **{k: [] for k in variants}}
    plain = plain_cls if args.task == "cls" else plain_sem
    for seed in seeds:
        r = plain(root, s, seed)
        rows["plain"].append(r)
        print(f"[seed {seed}] plain: {r['metric']:.4f} in {r['wall_s']:.0f} s", flush=True)
        for name, ov in variants.items():
            r = zoo_run(args.task, root, s, seed, ov, work)
            rows[name].append(r)
            print(f"[seed {seed}] {name}: {r['metric']:.4f} in {r['wall_s']:.0f} s", flush=True)
    metric = "top-1" if args.task == "cls" else "mIoU"
    base = statistics.mean(r["metric"] for r in rows["plain"])
    base_t = statistics.mean(r["wall_s"] for r in rows["plain"])
    floor = trivial_metric(args.task, root)
    lines = [f"# Recipes: {args.task} ({metric}, last epoch), zoo variants against a plain loop", "",
             f"Command: `python benchmarks/recipes.py {' '.join(argv or sys.argv[1:])}`  ",
             f"Settings: `{json.dumps(s)}`, seeds {seeds}; torch {torch.__version__}, {os.cpu_count()} cores  ",
             f"A constant prediction (the most frequent class everywhere) scores {floor:.3f}: a side at or below it has "
             "learned nothing usable.", "",
             f"| side | {metric} mean | spread (min-max) | per seed | vs plain | wall s | wall vs plain | overrides |",
             "|---|---|---|---|---|---|---|---|"]
    for name, rs in rows.items():
        m = [r["metric"] for r in rs]
        t = statistics.mean(r["wall_s"] for r in rs)
        lines.append(f"| {name} | {statistics.mean(m):.3f} | {min(m):.3f}-{max(m):.3f} | "
                     f"{' '.join(f'{x:.3f}' for x in m)} | {statistics.mean(m) - base:+.3f} | {t:.0f} | "
                     f"{t / base_t:.2f}x | {' '.join(variants.get(name, [])) or '-'} |")
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
