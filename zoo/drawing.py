"""Drawing typed results on images: boxes with class + score labels, masks, class maps, text banners, and
side-by-side panels (ground truth | prediction).

Used by the ``plot()`` / ``save()`` methods of :mod:`zoo.results`, by ``predict.py`` and by the validation
visualisation callback. Only numpy, PIL and torch are imported (this module is on the lean serving path; no
matplotlib). Line widths and font sizes scale with the image so that drawings stay readable from thumbnails to
full-resolution photos; every drawing is made at the resolution of the image it is given.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

__all__ = [
    "PALETTE", "class_color", "line_width_for", "font_size_for", "as_rgb", "draw_boxes", "overlay_masks",
    "colorize_classes", "draw_banner", "side_by_side",
]

#: Distinct colours (RGB), one per class index (cycled).
PALETTE: tuple[tuple[int, int, int], ...] = (
    (230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240), (240, 50, 230),
    (210, 245, 60), (250, 190, 212), (0, 128, 128), (220, 190, 255), (170, 110, 40), (255, 250, 200), (128, 0, 0),
    (170, 255, 195), (128, 128, 0), (255, 215, 180), (0, 0, 128), (128, 128, 128), (255, 225, 25),
)


def class_color(index: int) -> tuple[int, int, int]:
    """The colour of class ``index`` (stable across drawings)."""
    return PALETTE[int(index) % len(PALETTE)]


def line_width_for(height: int, width: int) -> int:
    """Box line width for an image of this size: 1 px up to ~300 px, then about 1 px per 300 px of the long side."""
    return max(1, int(round(max(height, width) / 300)))


def font_size_for(height: int, width: int) -> int:
    """Label font size for an image of this size (at least 10 px, about 1/40 of the long side)."""
    return max(10, int(round(max(height, width) / 40)))


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: a fixed-size bitmap font
        return ImageFont.load_default()


def _text_size(draw: ImageDraw.ImageDraw, text: str, font: Any) -> tuple[int, int]:
    x0, y0, x1, y1 = draw.textbbox((0, 0), text, font=font)
    return int(x1 - x0), int(y1 - y0)


def _text_color(bg: Sequence[int]) -> tuple[int, int, int]:
    """Black on light backgrounds, white on dark ones."""
    r, g, b = (int(v) for v in bg[:3])
    return (0, 0, 0) if 0.299 * r + 0.587 * g + 0.114 * b > 150 else (255, 255, 255)


def as_rgb(image: Any = None, size: Sequence[int] | None = None) -> np.ndarray:
    """An ``(H, W, 3)`` uint8 RGB copy of ``image`` (anything :func:`zoo.predictor.to_rgb_array` reads: a path,
    bytes, a PIL image, an array, a uint8 ``(3, H, W)`` tensor), or a mid-grey canvas of ``size`` ``(H, W)`` when
    ``image`` is None."""
    if image is None:
        if size is None:
            raise ValueError("give an image to draw on (or a size for a blank canvas)")
        return np.full((int(size[0]), int(size[1]), 3), 114, dtype=np.uint8)
    from zoo.predictor import to_rgb_array

    return np.array(to_rgb_array(image), dtype=np.uint8, copy=True)


def _label_box(draw: ImageDraw.ImageDraw, xy: tuple[float, float], text: str, color: Sequence[int], font: Any,
               limits: tuple[int, int], above: bool = True) -> None:
    """A filled label with ``text`` whose bottom-left is at ``xy`` (above a box), moved inside the image."""
    tw, th = _text_size(draw, text, font)
    pad = max(1, th // 5)
    w, h = tw + 2 * pad, th + 2 * pad
    x = min(max(0.0, xy[0]), max(0.0, limits[1] - w))
    y = xy[1] - h if above else xy[1]
    if y < 0:
        y = xy[1] if above else 0
    y = min(y, max(0.0, limits[0] - h))
    draw.rectangle((x, y, x + w, y + h), fill=tuple(color))
    bx0, by0, _, _ = draw.textbbox((0, 0), text, font=font)
    draw.text((x + pad - bx0, y + pad - by0), text, fill=_text_color(color), font=font)


def draw_boxes(image: np.ndarray, boxes: Any, labels: Sequence[int], texts: Sequence[str] | None = None, *,
               line_width: int | None = None, font_size: int | None = None, dashed: bool = False) -> np.ndarray:
    """Boxes ``x1, y1, x2, y2`` (pixels of ``image``) in their class colour, each with a filled label (``texts``).

    Args:
        image: ``(H, W, 3)`` uint8 RGB (not modified).
        boxes: ``(N, 4)`` tensor / array / list.
        labels: ``N`` class indices (choose the colours).
        texts: ``N`` label texts (``None``: no labels).
        line_width, font_size: default scaled to the image (:func:`line_width_for`, :func:`font_size_for`).
        dashed: draw the outline dashed (ground truth beside predictions in one picture).

    Returns:
        A new ``(H, W, 3)`` uint8 array.
    """
    h, w = image.shape[:2]
    lw = int(line_width or line_width_for(h, w))
    font = _font(int(font_size or font_size_for(h, w)))
    b = torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4).tolist()
    pil = Image.fromarray(np.ascontiguousarray(image))
    draw = ImageDraw.Draw(pil)
    for i, (x1, y1, x2, y2) in enumerate(b):
        color = class_color(int(labels[i]))
        x2, y2 = max(x2, x1 + 1), max(y2, y1 + 1)
        if dashed:
            step = max(4, 4 * lw)
            for x in np.arange(x1, x2, 2 * step):
                draw.line((x, y1, min(x + step, x2), y1), fill=color, width=lw)
                draw.line((x, y2, min(x + step, x2), y2), fill=color, width=lw)
            for y in np.arange(y1, y2, 2 * step):
                draw.line((x1, y, x1, min(y + step, y2)), fill=color, width=lw)
                draw.line((x2, y, x2, min(y + step, y2)), fill=color, width=lw)
        else:
            draw.rectangle((x1, y1, x2, y2), outline=color, width=lw)
    if texts is not None:  # labels after all boxes, so no box line crosses a label
        for i, (x1, y1, _, _) in enumerate(b):
            if texts[i]:
                _label_box(draw, (x1, y1), str(texts[i]), class_color(int(labels[i])), font, (h, w))
    return np.asarray(pil).copy()


def overlay_masks(image: np.ndarray, masks: Any, labels: Sequence[int], alpha: float = 0.45) -> np.ndarray:
    """Blend boolean masks ``(N, H, W)`` over ``image`` in their class colours."""
    out = image.astype(np.float32)
    m = torch.as_tensor(masks).bool().cpu().numpy().reshape(-1, *image.shape[:2])
    for i in range(m.shape[0]):
        color = np.asarray(class_color(int(labels[i])), dtype=np.float32)
        out[m[i]] = out[m[i]] * (1 - alpha) + color * alpha
    return out.round().clip(0, 255).astype(np.uint8)


def colorize_classes(mask: Any, skip: Sequence[int] = ()) -> tuple[np.ndarray, np.ndarray]:
    """An RGB picture ``(H, W, 3)`` of a class map ``(H, W)`` and the ``(H, W)`` bool map of coloured pixels
    (classes in ``skip``, e.g. background, and out-of-range values such as 255 "ignore" stay uncoloured)."""
    m = torch.as_tensor(mask).long().cpu().numpy()
    lut = np.asarray([class_color(i) for i in range(256)], dtype=np.uint8)
    colored = (m >= 0) & (m < 255)
    for s in skip:
        colored &= m != int(s)
    rgb = np.zeros((*m.shape, 3), dtype=np.uint8)
    rgb[colored] = lut[m[colored] % 256]
    return rgb, colored


def draw_banner(image: np.ndarray, lines: Sequence[str], colors: Sequence[Sequence[int]] | None = None, *,
                font_size: int | None = None, where: str = "top") -> np.ndarray:
    """Text lines on filled backgrounds at the top-left (``where="top"``) or bottom-left of ``image``."""
    h, w = image.shape[:2]
    font = _font(int(font_size or font_size_for(h, w)))
    pil = Image.fromarray(np.ascontiguousarray(image))
    draw = ImageDraw.Draw(pil)
    y = 0
    heights = []
    for text in lines:
        th = _text_size(draw, text, font)[1]
        heights.append(th + 2 * max(1, th // 5))
    if where == "bottom":
        y = max(0, h - sum(heights))
    for i, text in enumerate(lines):
        color = tuple(colors[i]) if colors is not None else (32, 32, 32)
        _label_box(draw, (0, y), text, color, font, (h, w), above=False)
        y += heights[i]
    return np.asarray(pil).copy()


def side_by_side(panels: Sequence[np.ndarray], titles: Sequence[str] | None = None, gap: int | None = None
                 ) -> np.ndarray:
    """Panels of the same height next to each other, each under its title strip, on a white background."""
    if not panels:
        raise ValueError("side_by_side needs at least one panel")
    h = max(p.shape[0] for p in panels)
    w_total = sum(p.shape[1] for p in panels)
    gap = int(gap if gap is not None else max(2, h // 100))
    fs = font_size_for(h, max(p.shape[1] for p in panels))
    font = _font(fs)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    title_h = (_text_size(probe, "Ag", font)[1] + 2 * max(2, fs // 4)) if titles else 0
    canvas = Image.new("RGB", (w_total + gap * (len(panels) - 1), h + title_h), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    x = 0
    for i, p in enumerate(panels):
        canvas.paste(Image.fromarray(np.ascontiguousarray(p)), (x, title_h))
        if titles:
            bx0, by0, _, _ = draw.textbbox((0, 0), titles[i], font=font)
            draw.text((x + max(2, fs // 4) - bx0, max(2, fs // 4) - by0), titles[i], fill=(0, 0, 0), font=font)
        x += p.shape[1] + gap
    return np.asarray(canvas).copy()
