"""Speed on the path users run: ``train.py``'s Trainer + DataModule reading JPEG files, against a plain PyTorch loop
on the same files and a reference model, in one process; then serving speed (Predictor, bare model, ONNX Runtime).

    python benchmarks/speed.py --task all                      # CPU settings (2 cores: minutes)
    python benchmarks/speed.py --task cls,det --repeats 3
    python benchmarks/speed.py --task all --device cuda        # standard GPU settings (bf16, channels_last)

Per task (``cls``: single-label classification from an image folder; ``det``: FCOS from a COCO json; ``seg``:
Semantic-FPN from a COCO json's masks) and repeat, interleaved so every side sees the same machine load:

* ``zoo``: :func:`zoo.training.train` exactly as ``python train.py`` runs it (segmentation with ``recipe=none``,
  the plain loop's cross-entropy without the recipe's dice term; its default validation schedule,
  ``trainer.check_val_every_n_epoch=auto``: every epoch while a pass is cheap, else every n-th; checkpoints,
  logs, the final evaluation of the best checkpoint, the bundle), with its wall time split by a timing callback
  into start-up, training steps, waiting for data, validation, epoch ends (checkpoint writes, logging) and the
  finish (final evaluation, bundle, plots);
* ``zoo_val_once``: the same with validation once at the end (what the plain loop does);
* ``plain``: a hand-written loop over the same files with torchvision's readers and transforms (``ImageFolder`` /
  ``CocoDetection``), the same model class, optimizer, batch size, image size and epochs, one validation pass;
* ``plain_fused`` (opt-in): the plain loop with torch's fused AdamW, the optimizer the zoo uses: the rest of the gap
  to the zoo's steps is Lightning's and the zoo's own per-step work;
* ``memory``: the plain loop over the same batches already decoded and held in memory (the ceiling without data
  loading: "files vs synthetic tensors");
* ``zoo_device_decode`` (opt-in with ``--sides``): the zoo path with ``data.decode_on=device`` (JPEGs decoded and
  cropped / resized on the training device; classification only at these settings: the detection default's
  ColorJitter has no device version);
* ``reference``: the reference model in the same plain loop: timm's ``resnet18`` (classification: the same network
  as the zoo's, so ``plain`` and ``reference`` coincide) or torchvision's ``FCOS`` on a resnet18-FPN (detection).

Reported: training images/s over the whole run and over training steps only, the split, the ratios zoo / plain (the
issue's target: >= 0.95 on CPU) and, for serving, images/s and batch-1 latency p50 / p99 of the Predictor (from JPEG
bytes to typed results), the bare model (a tensor in, raw outputs) and the ONNX export under onnxruntime, with
parameters and GFLOPs (``torch.utils.flop_counter``), and the model FLOPs utilisation (MFU) of the training steps:
3 x the forward's FLOPs per image (forward + backward) x images/s over the steps, against a dense matrix product
measured in the same process (bf16 8192^3 on CUDA, the ceiling the issue names; fp32 2048^3 on CPU). On CUDA: peak
memory and bf16 autocast.

Data: ``../shared/data/coco128`` (real COCO photos, never copied into the repository; images for the image folder
are those photos sorted into "person" / "no person"), or the embedded dataset written as files when it is absent.
Writes ``benchmarks/results/speed.json`` and ``speed.md`` (hardware, versions, the command).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
ROOT = Path(__file__).resolve().parents[1]
try:
    import zoo  # noqa: F401
except ImportError:  # run as a script from a checkout
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

#: per task and device: (overrides of train.py, image size, batch size, epochs)
SETTINGS: dict[str, dict[str, dict[str, Any]]] = {
    # cls on CPU: 30 epochs at 128 px, the length of a real small-data run (96 photos: 3 steps an epoch, so the
    # per-epoch costs weigh more than with a few hundred photos)
    "cls": {"cpu": {"size": 128, "batch": 32, "epochs": 30, "backbone": "resnet18"},
            "cuda": {"size": 224, "batch": 256, "epochs": 3, "backbone": "resnet50"}},
    "det": {"cpu": {"size": 320, "batch": 8, "epochs": 2, "backbone": "resnet18"},
            "cuda": {"size": 640, "batch": 16, "epochs": 3, "backbone": "resnet50"}},
    "seg": {"cpu": {"size": 192, "batch": 8, "epochs": 10, "backbone": "resnet18"},
            "cuda": {"size": 512, "batch": 16, "epochs": 3, "backbone": "resnet50"}},
}


# --------------------------------------------------------------------------- timing
class PhaseTimer:
    """Lightning callback splitting a fit's wall time: ``setup`` (train() start to the first batch request),
    ``steps`` (forward, loss, backward, optimizer step and the step hooks), ``data`` (waiting for the next batch),
    ``val`` (validation loops), ``epoch_end`` (the rest of the fit: checkpoint writes, epoch logging) and
    ``finish`` (after fit: final evaluation, bundle, plots; filled by the caller)."""

    def __new__(cls, *args, **kwargs):  # a real Callback subclass, built lazily so the module imports without Lightning
        from lightning.pytorch.callbacks import Callback

        sub = type("_PhaseTimer", (cls, Callback), {})
        obj = object.__new__(sub)
        return obj

    def __init__(self, t0: float) -> None:
        self.t0 = t0
        self.split = {"setup": 0.0, "steps": 0.0, "data": 0.0, "val": 0.0, "epoch_end": 0.0, "finish": 0.0}
        self.images = 0
        self._mark: float | None = None
        self._fit_start = self._fit_end = 0.0

    def on_fit_start(self, trainer, pl_module) -> None:
        self._fit_start = time.perf_counter()
        self.split["setup"] = self._fit_start - self.t0

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._mark = time.perf_counter()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        now = time.perf_counter()
        if self._mark is not None:
            self.split["data"] += now - self._mark
        self._mark = now

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        now = time.perf_counter()
        self.split["steps"] += now - (self._mark or now)
        self._mark = now
        images = batch.get("images") if isinstance(batch, dict) else None
        self.images += len(images) if images is not None else 0

    def on_validation_start(self, trainer, pl_module) -> None:
        self._val0 = time.perf_counter()

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.state.fn == "fit":
            self.split["val"] += time.perf_counter() - self._val0

    def on_fit_end(self, trainer, pl_module) -> None:
        self._fit_end = time.perf_counter()
        fit = self._fit_end - self._fit_start
        self.split["epoch_end"] = max(0.0, fit - self.split["steps"] - self.split["data"] - self.split["val"])

    def finish(self, t_end: float) -> dict[str, float]:
        self.split["finish"] = max(0.0, t_end - self._fit_end)
        return dict(self.split)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def percentiles(times: list[float]) -> dict[str, float]:
    a = np.asarray(times) * 1000.0
    return {"p50_ms": float(np.percentile(a, 50)), "p99_ms": float(np.percentile(a, 99))}


# --------------------------------------------------------------------------- data on disk
def coco_root(out: Path) -> Path:
    """A COCO-style root: ../shared/data/coco128 (read in place), else the embedded dataset as COCO files."""
    coco = SHARED / "coco128"
    if (coco / "annotations").is_dir():
        return coco
    from zoo.data.shapes import ensure_shapes_dataset

    return Path(ensure_shapes_dataset(out / "shapes", num_train=64, num_val=16, image_size=256))


def _split_dir(root: Path) -> str:
    return "train2017" if (root / "train2017").is_dir() else "train"


def person_folder(out: Path) -> Path:
    """An image folder ``<out>/photos/{train,val}/{yes,no}/`` of the COCO root's images (every 4th to val), split
    by whether they show the most frequent category (people in coco128)."""
    root = out / "photos"
    if root.is_dir():
        return root
    coco = coco_root(out)
    split = _split_dir(coco)
    js = json.loads((coco / "annotations" / f"instances_{split}.json").read_text())
    top = statistics.mode(a["category_id"] for a in js["annotations"])
    has = {a["image_id"] for a in js["annotations"] if a["category_id"] == top}
    for i, im in enumerate(sorted(js["images"], key=lambda r: r["id"])):
        d = root / ("val" if i % 4 == 0 else "train") / ("yes" if im["id"] in has else "no")
        d.mkdir(parents=True, exist_ok=True)
        shutil.copy(coco / split / im["file_name"], d / Path(im["file_name"]).name)
    return root


def warm_files(root: Path) -> int:
    """Read every file under ``root`` once, untimed, so the first side measured does not also pay for a cold page
    cache (measured: without it the first of two identical runs was ~10% slower). Returns the bytes read."""
    n = 0
    for f in sorted(root.rglob("*")):
        if f.is_file():
            n += len(f.read_bytes())
    return n


# --------------------------------------------------------------------------- zoo path
def zoo_overrides(task: str, s: dict[str, Any], data_root: Path, device: str) -> list[str]:
    size, common = s["size"], [f"backbone.name={s['backbone']}", f"data.batch_size={s['batch']}",
                               f"trainer.max_epochs={s['epochs']}", "trainer.enable_progress_bar=false",
                               "logger.names=[csv]", "seed=0"]
    if device == "cuda":
        common += ["trainer=gpu"]
    if task == "cls":
        return ["data=image_folder", f"data.root={data_root}", f"model.input_size=[{size},{size}]", *common]
    split = ["data.train_split=train2017", "data.val_split=train2017"] if (data_root / "train2017").is_dir() else []
    # coco128 has one split: train and validate on it (speed, not accuracy, is measured)
    if task == "det":
        return ["model=detection", "data=coco", f"data.root={data_root}", *split,
                f"model.input_size=[{size},{size}]", *common]
    # recipe=none: the plain loop's loss (cross-entropy alone; the semantic recipe adds a dice term, a different
    # computation: its cost is in benchmarks/results/recipes_sem_default.md), so the ratio is the path's own
    return ["model=semantic", "data=coco", f"data.root={data_root}", *split, f"model.input_size=[{size},{size}]",
            "recipe=none", *common]


def run_zoo(task: str, overrides: list[str], work: Path, tag: str) -> dict[str, Any]:
    from hydra import compose, initialize_config_dir

    from zoo.training import train

    out = work / f"{task}_{tag}_{time.monotonic_ns()}"
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[*overrides, f"paths.output_dir={out}"])
    t0 = time.perf_counter()
    timer = PhaseTimer(t0)
    res = train(cfg, callbacks=[timer])
    wall = time.perf_counter() - t0
    split = timer.finish(time.perf_counter())
    return {"wall_s": wall, "split": split, "images": timer.images, "metrics": res.get("metrics", {}),
            "bundle": res.get("bundle"), "train_img_s": timer.images / wall,
            "step_img_s": timer.images / max(split["steps"], 1e-9)}


# --------------------------------------------------------------------------- plain loops
class _Ds(torch.utils.data.Dataset):
    """COCO images + targets with torchvision's CocoDetection and v2 transforms (boxes / masks moved along)."""

    def __init__(self, root: Path, split: str, ann: Path, size: int, task: str, train: bool) -> None:
        from torchvision import datasets, tv_tensors
        from torchvision.transforms import v2 as T

        self.tvt = tv_tensors
        self.ds = datasets.wrap_dataset_for_transforms_v2(
            datasets.CocoDetection(str(root / split), str(ann)),
            target_keys=("boxes", "labels", "masks") if task == "seg" else ("boxes", "labels"))
        ops = [T.Resize((size, size), antialias=True)] + ([T.RandomHorizontalFlip()] if train else [])
        self.tf = T.Compose([*ops, T.ToImage(), T.ToDtype(torch.float32, scale=True), T.Normalize(MEAN, STD)])
        self.task, self.size = task, size
        cats = sorted({c["id"] for c in self.ds._dataset.coco.loadCats(self.ds._dataset.coco.getCatIds())})
        self.cat_to_label = {c: i for i, c in enumerate(cats)}
        self.num_classes = len(cats)

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int):
        img, tgt = self.ds[i]
        if "boxes" not in tgt:
            h, w = img.height, img.width
            tgt = {"boxes": self.tvt.BoundingBoxes(torch.zeros(0, 4), format="XYXY", canvas_size=(h, w)),
                   "labels": torch.zeros(0, dtype=torch.long),
                   **({"masks": self.tvt.Mask(torch.zeros(0, h, w, dtype=torch.uint8))} if self.task == "seg" else {})}
        img, tgt = self.tf(img, tgt)
        labels = torch.as_tensor([self.cat_to_label[int(c)] for c in tgt["labels"]], dtype=torch.long)
        if self.task == "seg":
            sem = torch.zeros(self.size, self.size, dtype=torch.long)
            for m, lab in zip(tgt["masks"], labels):
                sem[m.bool()] = lab + 1
            return img, sem
        return img, {"boxes": torch.as_tensor(tgt["boxes"]).float(), "labels": labels}


def _collate(batch):
    return torch.stack([b[0] for b in batch]), [b[1] for b in batch]


def _loader(ds, batch: int, shuffle: bool, device: str, collate=None):
    workers = 2 if device == "cpu" else min(8, os.cpu_count() or 1)
    return torch.utils.data.DataLoader(ds, batch, shuffle=shuffle, num_workers=workers, collate_fn=collate,
                                       persistent_workers=True, pin_memory=device == "cuda", drop_last=False)


def _optimizer(model: torch.nn.Module, fused: bool = False) -> torch.optim.Optimizer:
    """torch's AdamW as a plain script writes it (on CPU: torch's default loop over the tensors), or ``fused``."""
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.05,
                             **({"fused": True} if fused else {}))


def run_plain(task: str, s: dict[str, Any], data_root: Path, device: str, reference: bool,
              memory: bool = False, fused: bool = False) -> dict[str, Any]:
    """The hand-written loop: the zoo's network (or the reference model) trained on the same files; ``memory``:
    over the first epoch's batches loaded before the clock starts (no decoding while timed)."""
    from torchvision.transforms import v2 as T

    dev = torch.device(device)
    t0 = time.perf_counter()
    size, bs = s["size"], s["batch"]
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else _null()
    if task == "cls":
        import timm
        from torchvision.datasets import ImageFolder

        tf = T.Compose([T.RandomResizedCrop(size, scale=(0.5, 1.0), antialias=True), T.RandomHorizontalFlip(),
                        T.ToImage(), T.ToDtype(torch.float32, scale=True), T.Normalize(MEAN, STD)])
        vt = T.Compose([T.Resize((size, size), antialias=True), T.ToImage(), T.ToDtype(torch.float32, scale=True),
                        T.Normalize(MEAN, STD)])
        train_ds, val_ds = ImageFolder(str(data_root / "train"), tf), ImageFolder(str(data_root / "val"), vt)
        model = timm.create_model(s["backbone"], num_classes=len(train_ds.classes)).to(dev)

        def loss_fn(x, y):
            return torch.nn.functional.cross_entropy(model(x), y.to(dev), label_smoothing=0.1)

        collate = None
    else:
        split = _split_dir(data_root)
        vsplit = "val" if (data_root / "val").is_dir() else split
        train_ds = _Ds(data_root, split, data_root / "annotations" / f"instances_{split}.json", size, task, True)
        val_ds = _Ds(data_root, vsplit, data_root / "annotations" / f"instances_{vsplit}.json", size, task, False)
        model = _plain_model(task, s, train_ds.num_classes, reference).to(dev)
        collate = _collate

        def loss_fn(x, y):
            if task == "seg":
                out = model(x)
                logits = out["out"] if isinstance(out, dict) else out
                logits = torch.nn.functional.interpolate(logits, size=x.shape[-2:], mode="bilinear")
                return torch.nn.functional.cross_entropy(logits, torch.stack(y).to(dev))
            tg = [{k: v.to(dev) for k, v in t.items()} for t in y]
            if reference:
                return sum(model(list(x), tg).values())
            sizes = torch.tensor([[size, size]] * len(x), device=dev)
            raw = model(x)["det"]
            return sum(model.heads["det"].compute_loss(raw, tg, sizes).values())

    if device == "cuda":
        model = model.to(memory_format=torch.channels_last)
    opt = _optimizer(model, fused)
    loader = _loader(train_ds, bs, True, device, collate)
    if memory:
        loader = list(loader)  # decoded once, before the clock starts; every epoch replays these batches
        t0 = time.perf_counter()
    steps_s = data_s = 0.0
    images = 0
    for _ in range(int(s["epochs"])):
        model.train()
        mark = time.perf_counter()
        for x, y in loader:
            t = time.perf_counter()
            data_s += t - mark
            x = x.to(dev, non_blocking=True)
            if device == "cuda":
                x = x.contiguous(memory_format=torch.channels_last)
            with amp:
                loss = loss_fn(x, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            _sync(dev)
            mark = time.perf_counter()
            steps_s += mark - t
            images += len(x)
    model.eval()
    t_val = time.perf_counter()
    with torch.no_grad(), amp:
        for x, _ in _loader(val_ds, bs, False, device, collate):
            model(x.to(dev)) if not (reference and task == "det") else model(list(x.to(dev)))
    _sync(dev)
    wall = time.perf_counter() - t0
    return {"wall_s": wall, "images": images, "train_img_s": images / wall, "step_img_s": images / max(steps_s, 1e-9),
            "split": {"steps": steps_s, "data": data_s, "val": time.perf_counter() - t_val}}


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def _plain_model(task: str, s: dict[str, Any], num_classes: int, reference: bool) -> torch.nn.Module:
    if task == "det" and reference:
        from torchvision.models.detection import FCOS
        from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
        from torchvision.ops.feature_pyramid_network import LastLevelP6P7

        bb = resnet_fpn_backbone(backbone_name=s["backbone"], weights=None, trainable_layers=5,
                                 returned_layers=[2, 3, 4], extra_blocks=LastLevelP6P7(256, 256))
        return FCOS(bb, num_classes=num_classes, min_size=s["size"], max_size=s["size"])
    from zoo.models import create_model

    if task == "det":
        spec = {"backbone": {"name": s["backbone"]}, "necks": {"fpn": {"type": "fpn", "out_channels": 256}},
                "heads": {"det": {"type": "fcos", "input": "fpn", "num_classes": num_classes}},
                "input_size": [s["size"], s["size"]], "task": "detection"}
    else:
        spec = {"backbone": {"name": s["backbone"]},
                "heads": {"seg": {"type": "semantic_fpn", "num_classes": num_classes + 1, "channels": 128}},
                "input_size": [s["size"], s["size"]], "task": "semantic"}
    model = create_model(spec, load_backbone_weights=False)

    if task == "seg":
        class _Seg(torch.nn.Module):
            def __init__(self, m):
                super().__init__()
                self.m = m

            def forward(self, x):
                out = self.m(x)["seg"]
                return out["logits"] if isinstance(out, dict) else out

        return _Seg(model)
    return model


# --------------------------------------------------------------------------- serving
def serving(bundle: str, files: list[Path], device: str, repeats: int) -> dict[str, Any]:
    """Predictor (files -> typed results), bare model (tensor -> raw outputs), ONNX Runtime (same tensor)."""
    import zoo
    from torch.utils.flop_counter import FlopCounterMode

    pred = zoo.Predictor(bundle, device=device)
    model = pred.model
    h, w = model.spec.input_size
    x1 = torch.randn(1, 3, h, w, device=device)
    out: dict[str, Any] = {"params_M": sum(p.numel() for p in model.parameters()) / 1e6}
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        model(x1)
    out["gflops"] = fc.get_total_flops() / 1e9 / 2  # multiply-adds, as papers count them
    data = [f.read_bytes() for f in files]
    for d in data[:2]:
        pred([d])
    lat = []
    for i in range(repeats):
        t = time.perf_counter()
        pred([data[i % len(data)]])
        _sync(torch.device(device))
        lat.append(time.perf_counter() - t)
    out["predictor_b1"] = percentiles(lat)
    t = time.perf_counter()
    pred(data)
    out["predictor_img_s"] = len(data) / (time.perf_counter() - t)
    lat = []
    with torch.no_grad():
        model(x1)
        for _ in range(repeats):
            t = time.perf_counter()
            model(x1)
            _sync(torch.device(device))
            lat.append(time.perf_counter() - t)
    out["model_b1"] = percentiles(lat)
    try:
        import onnxruntime as ort

        from zoo.hub.export import export_onnx

        path = export_onnx(model, Path(tempfile.mkdtemp()) / "model.onnx")
        so = ort.SessionOptions()
        sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        name = sess.get_inputs()[0].name
        xn = x1.cpu().numpy()
        sess.run(None, {name: xn})
        lat = []
        for _ in range(repeats):
            t = time.perf_counter()
            sess.run(None, {name: xn})
            lat.append(time.perf_counter() - t)
        out["onnx_b1"] = percentiles(lat)
    except Exception as err:  # export refused (two-stage heads) or onnxruntime missing
        out["onnx_b1"] = {"error": f"{type(err).__name__}: {err}"[:200]}
    return out


def matmul_peak(device: str) -> dict[str, Any]:
    """The measured dense matrix-product throughput of ``device``: the MFU ceiling (bf16 8192^3 on CUDA, fp32
    2048^3 on CPU, the best of a few timed products after a warm-up)."""
    dev = torch.device(device)
    n, dtype, reps = (8192, torch.bfloat16, 20) if dev.type == "cuda" else (2048, torch.float32, 5)
    a, b = torch.randn(n, n, device=dev, dtype=dtype), torch.randn(n, n, device=dev, dtype=dtype)
    for _ in range(2):
        a @ b
    _sync(dev)
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        for _ in range(reps):
            a @ b
        _sync(dev)
        best = min(best, (time.perf_counter() - t) / reps)
    return {"n": n, "dtype": str(dtype).replace("torch.", ""), "tflops": 2 * n ** 3 / best / 1e12}


def mfu(step_img_s: float, gmacs: float, peak_tflops: float) -> float:
    """Model FLOPs utilisation of training steps: (forward + backward = 3 x the forward's 2 x MACs) per image x
    images/s, over the measured peak."""
    return step_img_s * 3 * 2 * gmacs * 1e9 / (peak_tflops * 1e12)


# --------------------------------------------------------------------------- report
def hardware(device: str) -> dict[str, Any]:
    import lightning
    import timm
    import torchvision

    info = {"machine": platform.machine(), "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "torch": torch.__version__, "torchvision": torchvision.__version__, "timm": timm.__version__,
            "lightning": lightning.__version__}
    try:
        info["cpu"] = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                           if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def median(rows: list[dict[str, Any]], key: str) -> float:
    return float(statistics.median(r[key] for r in rows))


def report(res: dict[str, Any]) -> str:
    lines = [f"# Speed: the zoo's training path against a plain loop ({res['device']})", "",
             f"Command: `{res['command']}`  ", f"Hardware / versions: `{json.dumps(res['hardware'])}`", "",
             "Training (medians over repeats; images/s over the whole run from start-up to bundle, and over the "
             "training steps alone):", "",
             "| task | side | wall s | img/s (run) | img/s (steps) | setup | steps | data wait | val | epoch ends | "
             "finish | ratio run vs plain |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for task, t in res["tasks"].items():
        plain = median(t["plain"], "wall_s")
        for side in ("zoo", "zoo_val_once", "zoo_device_decode", "plain", "plain_fused", "memory", "reference"):
            rows = t.get(side) or []
            if not rows:
                continue
            sp = {k: statistics.median(r["split"].get(k, 0.0) for r in rows)
                  for k in ("setup", "steps", "data", "val", "epoch_end", "finish")}
            wall = median(rows, "wall_s")
            lines.append(f"| {task} | {side} | {wall:.1f} | {median(rows, 'train_img_s'):.1f} | "
                         f"{median(rows, 'step_img_s'):.1f} | " + " | ".join(f"{sp[k]:.1f}" for k in sp) +
                         f" | {plain / wall:.2f}x |")
    lines += ["", "Ratio = plain wall time / this side's wall time (>= 1: faster than the plain loop).", "",
              "Serving (batch 1 unless noted; Predictor from JPEG bytes to typed results):", "",
              "| task | params M | GMACs | Predictor p50 / p99 ms | Predictor img/s (batch of files) | model p50 / "
              "p99 ms | ONNX Runtime p50 / p99 ms |", "|---|---|---|---|---|---|---|"]
    for task, t in res["tasks"].items():
        s = t.get("serving")
        if not s:
            continue
        onnx = s["onnx_b1"]
        o = f"{onnx['p50_ms']:.1f} / {onnx['p99_ms']:.1f}" if "p50_ms" in onnx else onnx.get("error", "")
        lines.append(f"| {task} | {s['params_M']:.1f} | {s['gflops']:.2f} | {s['predictor_b1']['p50_ms']:.1f} / "
                     f"{s['predictor_b1']['p99_ms']:.1f} | {s['predictor_img_s']:.1f} | "
                     f"{s['model_b1']['p50_ms']:.1f} / {s['model_b1']['p99_ms']:.1f} | {o} |")
    peak = res.get("matmul_peak")
    if peak and any(t.get("serving") for t in res["tasks"].values()):
        lines += ["", f"Model FLOPs utilisation of the training steps (3 x the forward's FLOPs per image x img/s over "
                      f"the steps) against the measured {peak['dtype']} {peak['n']}^3 matrix product, "
                      f"{peak['tflops']:.3f} TFLOP/s:", "",
                  "| task | training GFLOP / image | side | img/s (steps) | MFU |", "|---|---|---|---|---|"]
        for task, t in res["tasks"].items():
            s = t.get("serving")
            if not s:
                continue
            for side in ("zoo", "plain", "memory"):  # the zoo's own network on every one of these sides
                rows = t.get(side) or []
                if rows:
                    ips = median(rows, "step_img_s")
                    lines.append(f"| {task} | {6 * s['gflops']:.2f} | {side} | {ips:.1f} | "
                                 f"{mfu(ips, s['gflops'], peak['tflops']):.1%} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--task", default="all", help="cls,det,seg or all")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=None, help="override every task's epochs")
    ap.add_argument("--size", type=int, default=None, help="override every task's image size")
    ap.add_argument("--batch", type=int, default=None, help="override every task's batch size")
    ap.add_argument("--sides", default="zoo,zoo_val_once,plain,memory,reference")
    ap.add_argument("--latency-repeats", type=int, default=30)
    ap.add_argument("--zoo-overrides", nargs="*", default=[],
                    help="extra train.py overrides for the zoo sides, e.g. model.resize=stretch (the plain loop's "
                         "geometry: detection and segmentation default to the longest side, aspect kept)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "speed"))
    ap.add_argument("--work", default=None, help="scratch folder (default: a temporary one)")
    args = ap.parse_args(argv)
    tasks = ["cls", "det", "seg"] if args.task == "all" else args.task.split(",")
    sides = args.sides.split(",")
    work = Path(args.work or tempfile.mkdtemp(prefix="zoo_speed_"))
    work.mkdir(parents=True, exist_ok=True)
    res: dict[str, Any] = {"device": args.device, "command": "python benchmarks/speed.py " + " ".join(argv or sys.argv[1:]),
                           "hardware": hardware(args.device), "matmul_peak": matmul_peak(args.device), "tasks": {}}
    for task in tasks:
        s = dict(SETTINGS[task][args.device])
        for key in ("epochs", "size", "batch"):
            if getattr(args, key):
                s[key] = getattr(args, key)
        data_root = person_folder(work) if task == "cls" else coco_root(work)
        ov = [*zoo_overrides(task, s, data_root, args.device), *args.zoo_overrides]
        rows: dict[str, list] = {k: [] for k in sides}
        warm_files(data_root)
        runs: dict[str, Callable[[], dict]] = {
            "zoo": lambda: run_zoo(task, ov, work, "zoo"),
            "zoo_val_once": lambda: run_zoo(task, [*ov, f"trainer.check_val_every_n_epoch={s['epochs']}"], work, "v1"),
            "plain": lambda: run_plain(task, s, data_root, args.device, reference=False),
            "memory": lambda: run_plain(task, s, data_root, args.device, reference=False, memory=True),
            "plain_fused": lambda: run_plain(task, s, data_root, args.device, reference=False, fused=True),
            "zoo_device_decode": lambda: run_zoo(task, [*ov, "data.decode_on=device"], work, "dd"),
            "reference": lambda: run_plain(task, s, data_root, args.device, reference=True),
        }
        if task == "cls":
            runs.pop("reference")  # timm's resnet in the plain loop is the plain side itself
            sides_t = [x for x in sides if x != "reference"]
        else:
            sides_t = sides
        for rep in range(args.repeats):
            order = sides_t if rep % 2 == 0 else list(reversed(sides_t))
            for side in order:
                r = runs[side]()
                rows[side].append(r)
                print(f"[{task} #{rep}] {side}: {r['wall_s']:.1f} s, {r['train_img_s']:.1f} img/s, split "
                      + ", ".join(f"{k} {v:.1f}" for k, v in r["split"].items()), flush=True)
        entry: dict[str, Any] = {k: [{kk: vv for kk, vv in r.items() if kk != "bundle"} for r in v]
                                 for k, v in rows.items() if v}
        bundle = next((r["bundle"] for r in rows.get("zoo", []) if r.get("bundle")), None)
        if bundle and args.latency_repeats > 0:  # --latency-repeats 0: training sides only
            files = sorted((data_root / "val").rglob("*.jpg")) if task == "cls" else \
                sorted((data_root / _split_dir(data_root)).glob("*.jpg"))
            entry["serving"] = serving(bundle, files[:32], args.device, args.latency_repeats)
        res["tasks"][task] = entry
    text = report(res)
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(res, indent=2, default=str))
    out.with_suffix(".md").write_text(text)
    return res


if __name__ == "__main__":
    main()
