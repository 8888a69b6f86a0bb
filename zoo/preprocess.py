"""Deterministic evaluation/serving preprocessing: resize policy + normalisation.

Shared by the evaluation datasets and by :class:`zoo.Predictor`, so that a service sees exactly the tensors
evaluation saw (including how files are decoded). Only torch, numpy and PIL: this module is on the lean serving path.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = ["RESIZE_MODES", "ResizeInfo", "decode_rgb", "decode_rgb_reduced", "reduced_size", "subsample_to", "check_decodable", "compute_resize", "resize_image", "normalize", "resize_boxes",
           "resize_mask", "pad_batch", "boxes_to_original", "masks_to_original", "MASK_THRESHOLD", "IGNORE_INDEX"]

#: Label of pixels that carry no loss and no score (crowd regions, padding, unlabelled mask pixels).
IGNORE_INDEX = 255
#: Instance masks are binarised at this probability after resizing to the original size (evaluation and serving).
MASK_THRESHOLD = 0.5

RESIZE_MODES = ("stretch", "longest", "letterbox")


#: PIL modes holding one channel of 16-bit (or wider integer) samples, which ``convert("RGB")`` saturates to white.
_WIDE_GREY_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_EXIF_ORIENTATION = 0x0112


def _exif_upright(im: Image.Image) -> Image.Image:
    """``im`` turned as its EXIF Orientation tag says (as photo viewers and the COCO convention show it)."""
    try:
        orientation = int(im.getexif().get(_EXIF_ORIENTATION, 1))
    except Exception:  # unreadable EXIF: viewers ignore it too
        return im
    if orientation in (2, 3, 4, 5, 6, 7, 8):
        return ImageOps.exif_transpose(im)
    return im


def _rgb8(im: Image.Image) -> np.ndarray:
    """``(H, W, 3)`` uint8 RGB array of a loaded image; 16-bit grey is scaled to 8 bits (v / 257, rounded) instead of
    being clipped at 255 by PIL. (PIL already opens 16-bit RGB(A) PNGs reduced to 8-bit RGB(A).)"""
    if im.mode in _WIDE_GREY_MODES:
        a = np.asarray(im)
        if a.dtype.kind == "i":  # mode "I" (int32): 16-bit PNGs on some Pillow versions; negatives clip to black
            a = np.clip(a, 0, 65535)
        a = ((a.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
        return np.ascontiguousarray(np.repeat(a[..., None], 3, axis=2))
    return np.array(im.convert("RGB"))


def decode_rgb(src, what: str) -> np.ndarray:
    """Decode an image (a path or a binary file object) to an ``(H, W, 3)`` uint8 RGB array with PIL.

    The EXIF Orientation tag is applied (``PIL.ImageOps.exif_transpose``), 16-bit grey images are scaled to 8 bits.
    Raises ``FileNotFoundError`` for a missing file and ``ValueError`` for data PIL cannot read or an image over PIL's
    decompression-bomb limit (``PIL.Image.MAX_IMAGE_PIXELS``), both naming ``what``.
    """
    with _pil_errors(what), Image.open(src) as im:
        im.load()
        return _rgb8(_exif_upright(im))


def decode_rgb_reduced(src, what: str, min_side: int | None) -> tuple[np.ndarray, int, tuple[int, int]]:
    """:func:`decode_rgb`, but a JPEG much larger than needed is decoded at 1/2, 1/4 or 1/8 scale by libjpeg itself
    (DCT-domain scaling: several times faster, and no full-size array is made): the largest such reduction ``r``
    whose both sides stay >= ``min_side`` (PIL's ``draft``). Returns ``(image, r, (H, W))`` with ``(H, W)`` the
    full size (EXIF rotation applied); ``r == 1`` for other formats, for ``min_side=None`` and for images that are
    not large enough. The decoded size is ``ceil(H / r), ceil(W / r)``; full-size coordinates map to it by ``/ r``."""
    with _pil_errors(what), Image.open(src) as im:
        r = 1
        ow, oh = im.size
        if min_side and im.format == "JPEG":
            m = max(1, int(min_side))
            im.draft(None, (m, m))
            r = max(1, round(ow / im.size[0]))
        im.load()
        full = (ow, oh) if _turned(im) else (oh, ow)  # orientations 5-8 swap the axes
        return _rgb8(_exif_upright(im)), r, full


def _turned(im: Image.Image) -> bool:
    try:
        return int(im.getexif().get(_EXIF_ORIENTATION, 1)) in (5, 6, 7, 8)
    except Exception:
        return False


def reduced_size(size: Sequence[int], r: int) -> tuple[int, int]:
    """``(h, w)`` of an image of ``size`` decoded at ``1/r`` (see :func:`decode_rgb_reduced`)."""
    return -(-int(size[0]) // r), -(-int(size[1]) // r)


def subsample_to(a: np.ndarray, r: int, out_hw: Sequence[int]) -> np.ndarray:
    """A label map (masks, class-index maps) of an original-size image brought to the image's ``1/r`` decoded size
    ``out_hw`` by nearest sampling at the centre of every ``r x r`` block (what DCT scaling averages)."""
    if r == 1:
        return a
    ys = np.minimum(np.arange(int(out_hw[0])) * r + r // 2, a.shape[0] - 1)
    xs = np.minimum(np.arange(int(out_hw[1])) * r + r // 2, a.shape[1] - 1)
    return np.ascontiguousarray(a[ys][:, xs])


def pil_to_rgb(im: Image.Image) -> np.ndarray:
    """An in-memory PIL image as :func:`decode_rgb` decodes files: EXIF Orientation applied, 16-bit grey scaled."""
    return _rgb8(_exif_upright(im))


def check_decodable(src, what: str) -> None:
    """Raise as :func:`decode_rgb` would if ``src`` cannot be decoded, at a fraction of the cost for JPEGs (decoded
    at 1/8 scale: every byte of the file is still read, so truncated and corrupt data are found)."""
    with _pil_errors(what), Image.open(src) as im:
        if im.format == "JPEG":
            im.draft("RGB", (max(1, im.width // 8), max(1, im.height // 8)))
        im.load()


@contextlib.contextmanager
def _pil_errors(what: str):
    """Turn PIL's errors while opening/decoding into ``FileNotFoundError`` / ``ValueError`` naming ``what``."""
    try:
        with warnings.catch_warnings():
            # PIL only warns between MAX_IMAGE_PIXELS and twice that: refuse those too, with the same message
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    except FileNotFoundError:
        raise FileNotFoundError(f"image file {what} does not exist") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ValueError(f"{what} is larger than PIL's decompression-bomb limit PIL.Image.MAX_IMAGE_PIXELS="
                         f"{Image.MAX_IMAGE_PIXELS} pixels ({err}); if the image is genuine, raise "
                         "PIL.Image.MAX_IMAGE_PIXELS (None disables the check) before decoding it") from err
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise ValueError(f"{what} is corrupt or not an image PIL can read ({err})") from err


@dataclass(frozen=True)
class ResizeInfo:
    """How an image was resized: ``orig_size`` and ``size`` are ``(h, w)``; coordinates in the resized image are
    original coordinates times ``(scale_y, scale_x)``."""

    orig_size: tuple[int, int]
    size: tuple[int, int]
    scale_y: float
    scale_x: float


def compute_resize(orig_size: Sequence[int], input_size: Sequence[int], mode: str) -> ResizeInfo:
    """Target size for an image of ``orig_size`` (h, w) under ``mode``.

    ``stretch``: exactly ``input_size``. ``longest``: longest side becomes ``max(input_size)``, aspect kept.
    ``letterbox``: fits inside ``input_size``, aspect kept (padding happens at collation / in the predictor).
    """
    h, w = int(orig_size[0]), int(orig_size[1])
    if h <= 0 or w <= 0:
        raise ValueError(f"image size must be positive, got {(h, w)}")
    th, tw = int(input_size[0]), int(input_size[1])
    if mode == "stretch":
        nh, nw = th, tw
    elif mode in ("longest", "letterbox"):
        s = max(th, tw) / max(h, w) if mode == "longest" else min(th / h, tw / w)
        nh, nw = max(1, int(round(h * s))), max(1, int(round(w * s)))
    else:
        raise ValueError(f"resize mode {mode!r} unknown; use one of {RESIZE_MODES}")
    return ResizeInfo((h, w), (nh, nw), nh / h, nw / w)


def resize_image(image: np.ndarray | torch.Tensor, info: ResizeInfo) -> torch.Tensor:
    """Resize an RGB image to ``info.size`` with antialiased bilinear interpolation.

    Args:
        image: ``(H, W, 3)`` uint8 array or ``(3, H, W)`` uint8/float tensor (0..255).
    Returns: ``(3, h, w)`` float32 tensor in 0..1.
    """
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"expected an (H, W, 3) RGB image, got shape {image.shape}")
        ok = image.flags.writeable and image.flags.c_contiguous  # torch warns on read-only arrays (np.asarray(PIL))
        t = torch.from_numpy(image if ok else np.array(image)).permute(2, 0, 1)
    else:
        t = image
    t = t.float().div_(255.0) if t.dtype == torch.uint8 else t.float() / 255.0
    if tuple(t.shape[-2:]) != tuple(info.size):
        t = F.interpolate(t[None], size=info.size, mode="bilinear", align_corners=False,
                          antialias=True)[0].clamp_(0.0, 1.0)
    return t


def normalize(t: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """``(t - mean) / std`` per channel on a ``(3, H, W)`` or ``(B, 3, H, W)`` tensor in 0..1."""
    m = torch.as_tensor(mean, dtype=t.dtype, device=t.device).view(-1, 1, 1)
    s = torch.as_tensor(std, dtype=t.dtype, device=t.device).view(-1, 1, 1)
    return (t - m) / s


def resize_boxes(boxes: torch.Tensor, info: ResizeInfo) -> torch.Tensor:
    """Scale xyxy boxes ``(N, 4)`` from original to resized coordinates."""
    scale = boxes.new_tensor([info.scale_x, info.scale_y, info.scale_x, info.scale_y])
    return boxes * scale


def resize_mask(mask: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Nearest-neighbour resize of an integer mask ``(H, W)`` or masks ``(N, H, W)`` to ``size`` (h, w)."""
    if tuple(mask.shape[-2:]) == tuple(size):
        return mask
    squeeze = mask.dim() == 2
    m = mask[None] if squeeze else mask
    out = F.interpolate(m[None].float(), size=tuple(size), mode="nearest")[0].to(mask.dtype)
    return out[0] if squeeze else out


def pad_batch(images: Sequence[torch.Tensor], *, size_divisor: int = 32, min_size: Sequence[int] | None = None,
              value: float = 0.0) -> torch.Tensor:
    """Stack ``(3, h_i, w_i)`` images into ``(B, 3, H, W)``, padding bottom/right to a multiple of ``size_divisor``
    (and at least ``min_size``)."""
    H = max(int(im.shape[-2]) for im in images)
    W = max(int(im.shape[-1]) for im in images)
    if min_size is not None:
        H, W = max(H, int(min_size[0])), max(W, int(min_size[1]))
    d = max(1, int(size_divisor))
    H, W = (H + d - 1) // d * d, (W + d - 1) // d * d
    out = images[0].new_full((len(images), images[0].shape[0], H, W), value)
    for i, im in enumerate(images):
        out[i, :, : im.shape[-2], : im.shape[-1]] = im
    return out


def boxes_to_original(boxes: torch.Tensor, info: ResizeInfo) -> torch.Tensor:
    """Map xyxy boxes from resized-input pixels to original pixels and clip them to the original image.

    Args:
        boxes: ``(N, 4)`` xyxy in the resized image.
        info: the image's resize record.

    Returns:
        ``(N, 4)`` float32 xyxy in the original image.
    """
    out = boxes.float() / boxes.new_tensor([info.scale_x, info.scale_y, info.scale_x, info.scale_y]).float()
    h, w = info.orig_size
    out[:, 0::2] = out[:, 0::2].clamp(0, w)
    out[:, 1::2] = out[:, 1::2].clamp(0, h)
    return out


def masks_to_original(masks: torch.Tensor, info: ResizeInfo, threshold: float = MASK_THRESHOLD) -> torch.Tensor:
    """Mask probabilities at the resized size -> boolean masks at the original size.

    Args:
        masks: ``(M, 1, h', w')`` or ``(M, h', w')`` probabilities, ``h' >= h``, ``w' >= w`` (``info.size``).
        info: the image's resize record.
        threshold: probability at or above which a pixel belongs to the instance.

    Returns:
        ``(M, H, W)`` bool at ``info.orig_size``.
    """
    if masks.dim() == 3:
        masks = masks[:, None]
    h, w = info.size
    m = masks[:, :, :h, :w].float()
    if len(m):
        m = F.interpolate(m, size=tuple(info.orig_size), mode="bilinear", align_corners=False)
    else:
        m = m.new_zeros((0, 1, *info.orig_size))
    return m[:, 0] >= threshold
