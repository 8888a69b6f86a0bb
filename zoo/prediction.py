"""``predict(cfg)``: run a model on an image, a folder, a glob or a video and write what each head predicts.

    python predict.py ckpt=outputs/shapes_det/<date>/bundle source=photos/            # Hydra (conf/predict.yaml)
    zoo-predict ckpt=resnet10t.shapes_cls source='shots/*.jpg' paths.output_dir=out  # the same, installed

``ckpt`` is anything :func:`zoo.load` takes (a bundle folder, its ``model.json``, a Lightning ``.ckpt`` of a zoo
run, a registered name). Images go through :class:`zoo.Predictor` in batches (one backbone pass per batch for all
heads, evaluation's preprocessing). The output folder (``paths.output_dir``; a head's own subfolder when the model has
several heads) receives, per head:

=============== ================================================================================================
every head      ``predictions.json``: one entry per image (``image_id``, ``file``, ``frame`` for videos, size,
                the annotated picture's path and the head's result), and ``images/<name>.<fmt>`` annotated pictures
                (``draw=false`` skips them; embeddings have none)
detection,      ``detections.json``: the COCO results format (``image_id``, ``category_id``, ``bbox`` xywh,
instance        ``score``, RLE ``segmentation`` for instances) with ``images.json`` (the COCO ``images`` and
                ``categories`` those ids refer to)
semantic        ``masks/<name>.png``: the class-index mask at the original size (8-bit; 16-bit above 255 classes)
embedding       ``embeddings.npy`` ``(N, D)`` float32, row ``i`` the image with ``index`` ``i`` in
                ``embeddings.json``
=============== ================================================================================================

Videos (``.mp4``, ``.avi``, ``.mov``, ...) are read frame by frame with imageio, torchvision.io or OpenCV, whichever
is installed (``video_stride`` keeps every n-th frame, ``max_frames`` stops early). Training-side extras are not
needed: this module imports torch, numpy, PIL and omegaconf (for the config) and tqdm when present.
"""

from __future__ import annotations

import glob as _glob
import json
import logging
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

__all__ = ["predict", "main", "find_inputs", "read_video", "IMAGE_SUFFIXES", "VIDEO_SUFFIXES", "PredictError"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm", ".pgm")
VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv", ".flv")


class PredictError(ValueError):
    """A source, model reference or option predict cannot use; the message says what to give instead."""


@dataclass
class Item:
    """One picture to predict on: its output ``name`` (unique), where it comes from, and how to get its pixels."""

    name: str
    file: str
    frame: int | None = None
    array: np.ndarray | None = None

    def rgb(self) -> np.ndarray:
        if self.array is not None:
            return self.array
        from zoo.predictor import to_rgb_array

        return to_rgb_array(self.file)


# ---------------------------------------------------------------------------------------------------- sources
def _is_glob(source: str) -> bool:
    return any(c in source for c in "*?[")


def find_inputs(source: str, recursive: bool = False) -> tuple[list[Path], list[Path]]:
    """``(images, videos)`` named by ``source``: one file, a folder (its images and videos, sorted; sub-folders with
    ``recursive``) or a glob pattern (``**`` descends with ``recursive``)."""
    src = str(source)
    if _is_glob(src):
        files = sorted(Path(p) for p in _glob.glob(str(Path(src).expanduser()), recursive=recursive))
        files = [p for p in files if p.is_file()]
        if not files:
            raise PredictError(f"source={src!r}: the pattern matches no file")
    else:
        p = Path(src).expanduser()
        if p.is_dir():
            it = p.rglob("*") if recursive else p.iterdir()
            files = sorted(f for f in it if f.is_file())
        elif p.is_file():
            files = [p]
        else:
            raise PredictError(f"source={src!r} does not exist: give an image, a folder of images, a glob "
                               "('photos/*.jpg') or a video file")
    images = [f for f in files if f.suffix.lower() in IMAGE_SUFFIXES]
    videos = [f for f in files if f.suffix.lower() in VIDEO_SUFFIXES]
    if not images and not videos:
        if len(files) == 1:
            images = files  # one file of an unusual suffix: let the decoder say whether it is an image
        else:
            raise PredictError(f"source={src!r}: no image ({', '.join(IMAGE_SUFFIXES)}) or video "
                               f"({', '.join(VIDEO_SUFFIXES)}) found among {len(files)} files")
    return images, videos


def _imageio_frames(path: Path) -> Iterator[np.ndarray]:
    import imageio.v3 as iio

    for frame in iio.imiter(str(path)):
        yield np.asarray(frame)


def _torchvision_frames(path: Path) -> Iterator[np.ndarray]:
    import torchvision.io as tio

    frames, _, _ = tio.read_video(str(path), pts_unit="sec", output_format="THWC")
    for f in frames:
        yield f.numpy()


def _opencv_frames(path: Path) -> Iterator[np.ndarray]:
    import cv2

    cap = cv2.VideoCapture(str(path))
    if not cap.isOpened():
        raise PredictError(f"{path}: OpenCV cannot open this video")
    try:
        while True:
            ok, frame = cap.read()
            if not ok:
                break
            yield cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
    finally:
        cap.release()


def _video_backends() -> list[tuple[str, Any]]:
    import importlib.util

    out = []
    if importlib.util.find_spec("imageio") is not None:
        out.append(("imageio", _imageio_frames))
    try:
        import torchvision.io as tio

        if hasattr(tio, "read_video"):
            out.append(("torchvision.io", _torchvision_frames))
    except ImportError:  # pragma: no cover - torchvision is a core dependency
        pass
    if importlib.util.find_spec("cv2") is not None:
        out.append(("opencv", _opencv_frames))
    return out


def read_video(path: str | Path, stride: int = 1, max_frames: int | None = None) -> Iterator[tuple[int, np.ndarray]]:
    """``(frame index, (H, W, 3) uint8 RGB)`` for every ``stride``-th frame of a video, at most ``max_frames`` of
    them, read with the first installed reader of imageio, torchvision.io (builds with video support) and OpenCV.

    Raises:
        PredictError: no video reader is installed, or none can read the file.
    """
    path = Path(path)
    backends = _video_backends()
    if not backends:
        raise PredictError(f"{path} is a video, and no video reader is installed: pip install imageio[pyav] (or "
                           "imageio[ffmpeg], or opencv-python-headless), or extract its frames to a folder of images")
    stride = max(1, int(stride))
    errors = []
    for name, frames in backends:
        kept = 0
        try:
            for i, frame in enumerate(frames(path)):
                if i % stride:
                    continue
                if max_frames is not None and kept >= int(max_frames):
                    return
                kept += 1
                yield i, np.ascontiguousarray(frame[..., :3])
            if kept:
                return
            errors.append(f"{name}: no frame decoded")
        except PredictError as err:
            errors.append(str(err))
        except Exception as err:  # a reader without the codec: try the next one
            if kept:
                raise
            errors.append(f"{name}: {type(err).__name__}: {err}")
    raise PredictError(f"{path}: no installed video reader could decode it ({'; '.join(errors)})")


def _video_length(path: Path) -> int | None:
    try:
        import cv2

        cap = cv2.VideoCapture(str(path))
        n = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
        cap.release()
        return n if n > 0 else None
    except Exception:
        return None


class _Names:
    """Unique output names from file stems (``a``, ``a_1``, ...)."""

    def __init__(self) -> None:
        self.used: set[str] = set()

    def __call__(self, stem: str) -> str:
        base = "".join(c if c.isalnum() or c in "-_." else "_" for c in stem) or "image"
        name, i = base, 1
        while name in self.used:
            name, i = f"{base}_{i}", i + 1
        self.used.add(name)
        return name


def _items(images: Sequence[Path], videos: Sequence[Path], stride: int, max_frames: int | None) -> Iterator[Item]:
    names = _Names()
    for p in images:
        yield Item(names(p.stem), str(p))
    for v in videos:
        for i, frame in read_video(v, stride=stride, max_frames=max_frames):
            yield Item(names(f"{v.stem}_{i:06d}"), str(v), frame=i, array=frame)


# ---------------------------------------------------------------------------------------------------- writers
class _HeadWriter:
    """Everything one head writes into its folder."""

    def __init__(self, folder: Path, name: str, kind: str, class_names: list[str], category_ids: list[int] | None,
                 draw: bool, image_format: str, draw_score_thresh: float) -> None:
        self.folder, self.name, self.kind = folder, name, kind
        self.class_names, self.category_ids = class_names, category_ids
        self.draw = draw and kind != "embedding"
        self.fmt, self.thresh = image_format, float(draw_score_thresh)
        self.entries: list[dict[str, Any]] = []
        self.coco: list[dict[str, Any]] = []
        self.images: list[dict[str, Any]] = []
        self.vectors: list[np.ndarray] = []
        folder.mkdir(parents=True, exist_ok=True)

    def add(self, image_id: int, item: Item, rgb: np.ndarray, result: Any) -> None:
        h, w = rgb.shape[:2]
        entry: dict[str, Any] = {"image_id": image_id, "file": item.file, "name": item.name, "height": h, "width": w}
        if item.frame is not None:
            entry["frame"] = item.frame
        if self.draw and callable(getattr(result, "save", None)):
            rel = Path("images") / f"{item.name}.{self.fmt}"
            kw = {"score_thresh": self.thresh} if self.kind in ("detection", "instance") else {}
            result.save(self.folder / rel, image=rgb, **kw)
            entry["image"] = rel.as_posix()
        if self.kind == "classification":
            d = result.to_dict()
            entry.update(labels=d["labels"], scores=d["scores"], label_ids=d["label_ids"])
        elif self.kind in ("detection", "instance"):
            d = result.to_dict()
            entry.update(boxes=d["boxes"], scores=d["scores"], labels=d["labels"], names=d["names"])
            self.coco += result.to_coco(image_id)
            self.images.append({"id": image_id, "file_name": item.file, "height": h, "width": w,
                                **({"frame": item.frame} if item.frame is not None else {})})
        elif self.kind == "semantic":
            rel = Path("masks") / f"{item.name}.png"
            result.save(self.folder / rel)
            entry.update(mask=rel.as_posix(), present=result.present())
        elif self.kind == "embedding":
            entry["index"] = len(self.vectors)
            self.vectors.append(result.vector.detach().cpu().float().numpy())
        elif callable(getattr(result, "to_dict", None)):  # a result kind of another head: its JSON-able form
            entry["result"] = result.to_dict()
        self.entries.append(entry)

    def close(self) -> list[Path]:
        out = [self.folder / "predictions.json"]
        meta: dict[str, Any] = {"head": self.name, "kind": self.kind, "class_names": self.class_names,
                                "predictions": self.entries}
        _write_json(out[0], meta)
        if self.kind in ("detection", "instance"):
            ids = self.category_ids or list(range(1, len(self.class_names) + 1))
            _write_json(self.folder / "detections.json", self.coco)
            _write_json(self.folder / "images.json", {
                "images": self.images,
                "categories": [{"id": int(c), "name": n} for c, n in zip(ids, self.class_names)]})
            out += [self.folder / "detections.json", self.folder / "images.json"]
        if self.kind == "embedding":
            dim = int(self.vectors[0].shape[-1]) if self.vectors else 0
            np.save(self.folder / "embeddings.npy", np.stack(self.vectors) if self.vectors
                    else np.zeros((0, dim), np.float32))
            _write_json(self.folder / "embeddings.json", {
                "dim": dim, "items": [{"index": e["index"], "image_id": e["image_id"], "file": e["file"],
                                       **({"frame": e["frame"]} if "frame" in e else {})} for e in self.entries]})
            out += [self.folder / "embeddings.npy", self.folder / "embeddings.json"]
        return out


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1), encoding="utf-8")
    tmp.replace(path)


def _progress(total: int | None, enabled: bool):
    if enabled:
        try:
            from tqdm import tqdm

            return tqdm(total=total, unit="img", desc="predict", dynamic_ncols=True)
        except ImportError:
            pass
    return None


# ---------------------------------------------------------------------------------------------------- predict
def predict(cfg: Any) -> dict[str, Any]:
    """Run ``cfg.ckpt`` on ``cfg.source`` and write the outputs (see the module docs) into ``cfg.paths.output_dir``.

    Returns:
        ``{"output_dir", "num_images", "heads": {head: folder}, "files": [written files]}``.
    """
    from zoo.config import PredictConfig, validate

    cfg = validate(cfg, PredictConfig)
    if not cfg.ckpt:
        raise PredictError("give ckpt=<bundle folder | model.json | run's .ckpt | registered name>")
    if not cfg.source:
        raise PredictError("give source=<image | folder | glob | video>")
    if cfg.threads:
        import torch

        torch.set_num_threads(int(cfg.threads))
    images, videos = find_inputs(str(cfg.source), recursive=bool(cfg.recursive))
    out_dir = Path(cfg.paths.output_dir).expanduser().resolve()
    out_dir.mkdir(parents=True, exist_ok=True)

    import torch

    import zoo
    from zoo.hub.api import load

    device = str(cfg.device)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        model = load(cfg.ckpt, device=device)
    except FileNotFoundError as err:
        raise PredictError(f"ckpt={cfg.ckpt!r}: {err}") from None
    predictor = zoo.Predictor(model, device=device, batch_size=int(cfg.batch_size), score_thresh=cfg.score_thresh,
                              nms_thresh=cfg.nms_thresh, max_detections=cfg.max_detections, top_k=int(cfg.top_k),
                              heads=list(cfg.heads) if cfg.heads else None, seg_window=cfg.seg_window)
    several = len(predictor.heads) > 1
    writers = {}
    for n in predictor.heads:
        ids = getattr(model.heads[n], "category_ids", None)
        writers[n] = _HeadWriter(out_dir / n if several else out_dir, n, predictor.kinds[n], predictor.class_names(n),
                                 list(ids) if ids else None, bool(cfg.draw), str(cfg.image_format),
                                 float(cfg.draw_score_thresh))
    total: int | None = len(images)
    for v in videos:  # frames to come, when every video tells its length
        n = _video_length(v)
        if n is None or total is None:
            total = None
            continue
        n = -(-n // max(1, int(cfg.video_stride)))
        total += min(n, int(cfg.max_frames)) if cfg.max_frames is not None else n
    bar = _progress(total or None, bool(cfg.progress))
    count = 0
    batch: list[tuple[Item, np.ndarray]] = []

    def flush() -> None:
        nonlocal count
        results = predictor([rgb for _, rgb in batch])
        for (item, rgb), res in zip(batch, results):
            count += 1
            per_head = res if several else {predictor.heads[0]: res}
            for n, r in per_head.items():
                writers[n].add(count, item, rgb, r)
        if bar is not None:
            bar.update(len(batch))
        batch.clear()

    try:
        for item in _items(images, videos, int(cfg.video_stride), cfg.max_frames):
            batch.append((item, item.rgb()))
            if len(batch) >= int(cfg.batch_size):
                flush()
        if batch:
            flush()
    finally:
        if bar is not None:
            bar.close()
    files = [str(f) for w in writers.values() for f in w.close()]
    from zoo.progress import emit

    emit(f"predict: {count} image(s) with {len(writers)} head(s) -> {out_dir}")
    return {"output_dir": str(out_dir), "num_images": count,
            "heads": {n: str(w.folder) for n, w in writers.items()}, "files": files}


# ---------------------------------------------------------------------------------------------------- CLI
USAGE = """usage: zoo-predict ckpt=<bundle|model.json|.ckpt|name> source=<image|folder|glob|video> [key=value ...]

Keys (conf/predict.yaml, checked against zoo.config.PredictConfig): paths.output_dir (default
outputs/predict/<date>), device (cpu | cuda | auto), batch_size, heads=[a,b], score_thresh, nms_thresh,
max_detections, top_k, seg_window, draw, draw_score_thresh, image_format (jpg | png), video_stride, max_frames,
recursive, progress, threads.
"""


def main(argv: Sequence[str] | None = None) -> int:
    """``zoo-predict key=value ...``: :func:`predict` without Hydra (the same keys as ``predict.py``)."""
    from omegaconf import OmegaConf

    from zoo.config import ConfigError, PredictConfig, run_id, validate

    args = list(sys.argv[1:] if argv is None else argv)
    if not args or any(a in ("-h", "--help") for a in args):
        print(USAGE)
        return 0 if args else 2
    bad = [a for a in args if "=" not in a]
    if bad:
        print(f"zoo-predict: error: arguments are key=value, got {bad}\n{USAGE}", file=sys.stderr)
        return 2
    try:
        if not any(a.startswith("paths.output_dir=") for a in args):
            args.append(f"paths.output_dir={Path('outputs') / 'predict' / run_id()}")
        cfg = validate(OmegaConf.from_dotlist(args), PredictConfig)  # a misspelled key: ConfigError naming it
        out = Path(cfg.paths.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(out / "predict.log", encoding="utf-8")
        handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
        zoo_log = logging.getLogger("zoo")
        level = zoo_log.level
        zoo_log.addHandler(handler)
        zoo_log.setLevel(logging.INFO)
        try:
            predict(cfg)
        finally:
            zoo_log.removeHandler(handler)
            zoo_log.setLevel(level)
            handler.close()
    except (PredictError, ConfigError, FileNotFoundError) as err:
        print(f"zoo-predict: error: {err}", file=sys.stderr)
        return 2
    except Exception as err:
        from zoo.hub.bundle import BundleError

        if isinstance(err, BundleError):
            print(f"zoo-predict: error: {err}", file=sys.stderr)
            return 2
        raise
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
