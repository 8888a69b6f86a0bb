"""Decoding and geometric augmentation on the training device (``data.decode_on=device``).

The loader workers do not decode: each sample carries the file's bytes (:class:`EncodedImages` in the batch) and a
*plan* drawn in the worker: a crop window ``(y0, x0, h, w)`` of the upright full-size image, a horizontal flip and
the output size. The workers apply the plan to the cheap parts (boxes, masks, class labels, exactly as the
augmentation would), and after the batch reaches the device :func:`decode_batch` decodes every JPEG there
(``torchvision.io.decode_jpeg`` with ``device=``: nvJPEG on a GPU, batched), crops, resizes (antialiased bilinear),
flips, normalises and pads, so a GPU is not starved by CPU decoding.

Why a plan instead of albumentations on the GPU: the random draws and the box / mask bookkeeping stay on the CPU,
where they cost next to nothing and stay identical to the CPU path's semantics, while the per-pixel work (decode,
resize) moves to the device. Without augmentation (validation) the geometry is exactly the CPU path's
(:func:`zoo.preprocess.compute_resize` of the full image), and the pixels match it up to the JPEG decoder's rounding.

Supported augmentation ops: ``RandomResizedCrop`` (``scale``, ``ratio``, ``p``) and ``HorizontalFlip`` (``p``);
anything else is refused by :func:`geometry_plan` with the op's name (run it with ``data.decode_on=workers``).
Files that are not JPEG (PNG, WebP, ...) are decoded in the worker and only moved, resized and normalised on the
device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["GeometryPlan", "geometry_plan", "draw_window", "EncodedImages", "encoded_image", "crop_flip_boxes",
           "crop_flip_mask", "decode_batch", "DEVICE_OPS", "DECODE_ON"]

DECODE_ON = ("workers", "device")
DEVICE_OPS = ("RandomResizedCrop", "HorizontalFlip")
_JPEG_MAGIC = b"\xff\xd8\xff"


@dataclass(frozen=True)
class GeometryPlan:
    """The augmentation a device-decoded sample gets: a random resized crop (``rrc_p`` > 0) and a flip."""

    rrc_p: float = 0.0
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip_p: float = 0.0
    #: boxes keeping less than this fraction of their area (or fewer pixels than min_area) in the crop are dropped
    min_visibility: float = 0.3
    min_area: float = 4.0

    @property
    def identity(self) -> bool:
        return self.rrc_p <= 0 and self.hflip_p <= 0


def geometry_plan(ops: Sequence[Mapping[str, Any]] | None, *, min_visibility: float = 0.3,
                  min_area: float = 4.0) -> GeometryPlan:
    """The :class:`GeometryPlan` of ``data.augment`` ops; any op other than :data:`DEVICE_OPS` is refused."""
    from zoo.config import ConfigError

    kw: dict[str, Any] = {"min_visibility": float(min_visibility), "min_area": float(min_area)}
    for op in ops or []:
        op = dict(op)
        name = str(op.pop("type", None) or op.pop("_target_", "")).removeprefix("albumentations.").removeprefix("A.")
        p = float(op.pop("p", 1.0 if name == "RandomResizedCrop" else 0.5))
        op.pop("size", None), op.pop("height", None), op.pop("width", None)  # the output size is model.input_size
        if name == "RandomResizedCrop":
            kw.update(rrc_p=p, scale=tuple(float(v) for v in op.pop("scale", (0.08, 1.0))),
                      ratio=tuple(float(v) for v in op.pop("ratio", (3 / 4, 4 / 3))))
        elif name == "HorizontalFlip":
            kw["hflip_p"] = p
        else:
            raise ConfigError(f"data.decode_on=device runs only {', '.join(DEVICE_OPS)} on the device; data.augment "
                              f"has {name!r}: remove it, or decode in the loader workers (data.decode_on=workers)")
        if op:
            raise ConfigError(f"data.decode_on=device: {name} options {sorted(op)} are not supported on the device "
                              "(supported: scale, ratio, p for RandomResizedCrop; p for HorizontalFlip)")
    plan = GeometryPlan(**kw)
    lo, hi = plan.scale
    if not (0 < lo <= hi <= 1) or not (0 < plan.ratio[0] <= plan.ratio[1]):
        raise ConfigError(f"RandomResizedCrop scale {plan.scale} / ratio {plan.ratio}: need 0 < min <= max (<= 1 "
                          "for the scale)")
    return plan


def draw_window(h: int, w: int, plan: GeometryPlan, rng: np.random.Generator | None = None
                ) -> tuple[tuple[int, int, int, int], bool]:
    """``((y0, x0, ch, cw), flip)`` for an ``h x w`` image: a crop of a random area fraction in ``plan.scale`` and a
    log-uniform aspect ratio in ``plan.ratio`` (10 tries, then the largest centred crop whose ratio fits), or the
    whole image; a flip with ``plan.hflip_p``."""
    rng = rng if rng is not None else np.random.default_rng(int(np.random.randint(2 ** 31)))
    window = (0, 0, int(h), int(w))
    if plan.rrc_p > 0 and rng.random() < plan.rrc_p:
        area = h * w
        lo, hi = math.log(plan.ratio[0]), math.log(plan.ratio[1])
        for _ in range(10):
            target = area * rng.uniform(*plan.scale)
            r = math.exp(rng.uniform(lo, hi))
            cw, ch = int(round(math.sqrt(target * r))), int(round(math.sqrt(target / r)))
            if 0 < cw <= w and 0 < ch <= h:
                window = (int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1)), ch, cw)
                break
        else:
            r = w / h
            if r < plan.ratio[0]:
                cw, ch = w, int(round(w / plan.ratio[0]))
            elif r > plan.ratio[1]:
                ch, cw = h, int(round(h * plan.ratio[1]))
            else:
                cw, ch = w, h
            window = ((h - ch) // 2, (w - cw) // 2, ch, cw)
    flip = bool(plan.hflip_p > 0 and rng.random() < plan.hflip_p)
    return window, flip


def crop_flip_boxes(boxes: np.ndarray, window: Sequence[int], flip: bool, *, min_visibility: float = 0.3,
                    min_area: float = 4.0) -> tuple[np.ndarray, np.ndarray]:
    """xyxy ``boxes`` ``(N, 4)`` of the full image -> ``(boxes in the window, kept indices)``: clipped to the window,
    dropped when less than ``min_visibility`` of their area or fewer than ``min_area`` pixels remain (the CPU
    augmentation's rule), mirrored with the window when ``flip``."""
    y0, x0, ch, cw = (float(v) for v in window)
    b = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    area = np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)
    c = b - np.array([x0, y0, x0, y0], dtype=np.float32)
    c[:, 0::2] = c[:, 0::2].clip(0, cw)
    c[:, 1::2] = c[:, 1::2].clip(0, ch)
    kept_area = (c[:, 2] - c[:, 0]) * (c[:, 3] - c[:, 1])
    keep = (kept_area >= min_area) & (kept_area >= min_visibility * np.maximum(area, 1e-9))
    c = c[keep]
    if flip:
        c = np.stack([cw - c[:, 2], c[:, 1], cw - c[:, 0], c[:, 3]], 1)
    return c.astype(np.float32), np.flatnonzero(keep)


def crop_flip_mask(mask: np.ndarray, window: Sequence[int], flip: bool) -> np.ndarray:
    """The window of an ``(H, W)`` mask, mirrored when ``flip``."""
    y0, x0, ch, cw = (int(v) for v in window)
    m = mask[y0: y0 + ch, x0: x0 + cw]
    return np.ascontiguousarray(m[:, ::-1] if flip else m)


class EncodedImages:
    """A batch's images as the workers send them: per image a 1-D uint8 tensor of JPEG bytes, or a decoded
    ``(3, H, W)`` uint8 tensor (other formats). Not a tensor collection on purpose: Lightning leaves it on the CPU
    when it moves the batch (the JPEG decoder reads its input from host memory)."""

    def __init__(self, data: Sequence[torch.Tensor]) -> None:
        self.data = list(data)

    def __len__(self) -> int:
        return len(self.data)


def encoded_image(path: str | Path) -> tuple[torch.Tensor, tuple[int, int]]:
    """``(data, (H, W))``: a JPEG's bytes as a 1-D uint8 tensor, or another format decoded to ``(3, H, W)`` uint8;
    ``(H, W)`` is the upright size (EXIF orientation applied, as every zoo reader does)."""
    from PIL import Image

    from zoo.preprocess import _turned, decode_rgb

    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"image file {path} does not exist (check data.root and the split names)") from None
    if raw[:3] == _JPEG_MAGIC:
        import io

        with Image.open(io.BytesIO(raw)) as im:
            w, h = im.size
            if _turned(im):
                h, w = w, h
        return torch.frombuffer(bytearray(raw), dtype=torch.uint8), (int(h), int(w))
    img = decode_rgb(path, str(path))
    return torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1).contiguous(), img.shape[:2]


def _decode(data: list[torch.Tensor], device: torch.device, ids: Sequence[Any]) -> list[torch.Tensor]:
    from torchvision.io import ImageReadMode, decode_jpeg

    jpeg = [i for i, t in enumerate(data) if t.dim() == 1]
    out: list[torch.Tensor] = [t.to(device, non_blocking=True) if t.dim() == 3 else t for t in data]
    if jpeg:
        dev = "cuda" if device.type == "cuda" else "cpu"
        try:
            imgs = decode_jpeg([data[i] for i in jpeg], mode=ImageReadMode.RGB, device=dev,
                               apply_exif_orientation=True)
        except RuntimeError as err:
            bad = [ids[i] for i in jpeg] if ids else jpeg
            raise RuntimeError(f"decoding the JPEGs of images {bad} on {device} failed ({err}): check those files "
                               "(python -m zoo.data.check), or decode in the workers (data.decode_on=workers)") from err
        for i, img in zip(jpeg, imgs):
            out[i] = img.to(device, non_blocking=True)
    return out


def decode_batch(batch: dict[str, Any], *, mean: Sequence[float], std: Sequence[float], size_divisor: int = 32,
                 device: torch.device | str | None = None) -> dict[str, Any]:
    """Replace the batch's ``encoded`` images (:class:`EncodedImages`) by ``images`` ``(B, 3, H, W)`` float on
    ``device``: decoded, cropped to each sample's window, resized to its ``image_sizes`` entry (antialiased
    bilinear, as :func:`zoo.preprocess.resize_image`), flipped, normalised, padded bottom/right with 0 to a
    multiple of ``size_divisor`` (as :func:`zoo.data.datamodule.collate`)."""
    from zoo.preprocess import normalize, pad_batch

    enc = batch.pop("encoded")
    windows, flips = batch.pop("windows"), batch.pop("flips")
    device = torch.device(device) if device is not None else torch.device("cpu")
    imgs = _decode(enc.data, device, batch.get("image_ids") or [])
    out = []
    for img, (y0, x0, ch, cw), flip, size in zip(imgs, windows, flips, batch["image_sizes"]):
        t = img[:, y0: y0 + ch, x0: x0 + cw].float().div_(255.0)
        if tuple(t.shape[-2:]) != tuple(size):
            t = F.interpolate(t[None], size=tuple(size), mode="bilinear", align_corners=False,
                              antialias=True)[0].clamp_(0.0, 1.0)
        if flip:
            t = t.flip(-1)
        out.append(normalize(t, mean, std))
    images = pad_batch(out, size_divisor=size_divisor)
    padded = batch.pop("padded_hw", None)
    if padded is not None and tuple(images.shape[-2:]) != tuple(padded):
        raise AssertionError(f"device decode padded to {tuple(images.shape[-2:])}, the targets to {padded}")
    batch["images"] = images
    return batch
