"""The embedded synthetic "shapes" dataset, written in COCO layout on first use.

Every task of the zoo trains on it out of the box: it is read by the same COCO json code path as real COCO
(:class:`zoo.data.coco.CocoIndex`), so classification, detection, semantic / instance segmentation and
similarity all see one format.

Layout (identical in shape to COCO)::

    <root>/train/000000000001.jpg ...
    <root>/val/000000000001.jpg ...
    <root>/annotations/instances_train.json
    <root>/annotations/instances_val.json
    <root>/DONE.json            # written last: the parameters the folder was made with

Content of each image (``image_size`` square, RGB):

- a varied background: noise, gradients, stripes, smooth blotches or checkers, low-contrast clutter lines and a
  colour cast;
- 1-4 objects of the 6 :data:`SHAPE_NAMES` in the 6 :data:`COLOR_NAMES` (hue / saturation / value jitter and a
  little shading per object), sized ~8% to ~60% of the side, rotated, never overlapping each other (so every
  polygon is exactly the visible region), a few truncated by the border (polygon clipped to the image);
- one *primary* object whose polygon area is at least :data:`PRIMARY_AREA_RATIO` times that of any other
  non-crowd object: the single-label classification target ("category of the largest non-crowd object") is
  unambiguous;
- ~3% negatives (no object at all) and ~3% images that also hold a crowd: >= 5 tiny shapes of one kind and colour
  annotated as ONE ``iscrowd=1`` annotation with an uncompressed RLE ``{"size": [h, w], "counts": [...]}``;
- slight blur, pixel noise, global colour jitter and JPEG compression.

``layout="compositional"`` (for text-to-image: ``experiment=shapes_t2i``) keeps the backgrounds, colours, shading
and noise but composes each image the way the GenEval-style prompts of :mod:`zoo.generation.prompts` are built, so
that its captions hold every kind of phrase the prompts ask for: one large object (20%), two objects of different
kinds (25%), two or three objects of one kind and colour (25%: counted captions, which the default layout
seldom yields (~6% of images) since its extra objects draw kind and colour independently), or two objects of
different kinds in opposite halves of the image (30%: left / right / above / below), sized ~22-55% of the side and
never truncated; the ~3% negatives stay, crowds are left out. Objects of one scene may have equal sizes, so the
classification target ("largest object") is not guaranteed unambiguous in that layout.

Non-crowd annotations hold ``segmentation`` (one polygon ``[[x1, y1, x2, y2, ...]]``, circles as 32-gons), a tight
``bbox`` ``[x, y, w, h]`` around it, its polygon ``area``, ``iscrowd`` 0, and the extra fields ``color`` and
``identity`` (``"<color>_<shape>"``, the similarity identity). Category ids are non-contiguous, as in COCO
(:data:`CATEGORY_IDS`).

Generation is deterministic: each image draws from its own RNG seeded by ``(seed, split, index)``, so the same
parameters give byte-identical json and JPEG files, with or without a worker pool.
"""

from __future__ import annotations

import colorsys
import contextlib
import hashlib
import json
import math
import os
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

__all__ = [
    "SHAPE_NAMES",
    "COLOR_NAMES",
    "CATEGORY_IDS",
    "SUPERCATEGORY",
    "DATASET_VERSION",
    "PRIMARY_AREA_RATIO",
    "ShapeObject",
    "ShapesSample",
    "default_cache_dir",
    "ensure_shapes_dataset",
    "render_shapes_sample",
    "shapes_params",
    "mask_to_rle",
]

#: The shape kinds, in category-id order.
SHAPE_NAMES: tuple[str, ...] = ("circle", "square", "triangle", "star", "hexagon", "cross")
#: The named object colours (hue centres 0, 120, 240, 60, 300, 180 degrees).
COLOR_NAMES: tuple[str, ...] = ("red", "green", "blue", "yellow", "magenta", "cyan")
#: COCO category id of each shape: deliberately non-contiguous, like COCO's.
CATEGORY_IDS: dict[str, int] = {"circle": 1, "square": 3, "triangle": 4, "star": 7, "hexagon": 9, "cross": 12}
SUPERCATEGORY = "shape"
#: Bumped whenever the generator's output changes; part of the cache folder name and of ``DONE.json``.
DATASET_VERSION = "shapes-v1"
#: The primary object's area is at least this multiple of any other non-crowd object's area.
PRIMARY_AREA_RATIO = 1.6
JPEG_QUALITY = 90

_SPLITS = ("train", "val")
_HUES = {"red": 0.0, "green": 120.0, "blue": 240.0, "yellow": 60.0, "magenta": 300.0, "cyan": 180.0}
_SUPERSAMPLE = 4  # anti-aliasing factor of the object rasteriser
_NEGATIVE_RATE = 0.03
_CROWD_RATE = 0.03
_TRUNCATE_PROB = 0.1
_GOLDEN = (math.sqrt(5.0) - 1.0) / 2.0
_DONE = "DONE.json"
_LAYOUT = {"train", "val", "annotations", _DONE}


# ----------------------------------------------------------------------------------------------------- geometry
def _unit_polygon(kind: str) -> np.ndarray:
    """Vertices ``(V, 2)`` of a shape with circumradius 1, centred at the origin, before rotation."""
    if kind == "circle":
        t = np.arange(32) * (2 * np.pi / 32)
        return np.stack([np.cos(t), np.sin(t)], 1)
    if kind == "square":
        t = np.pi / 4 + np.arange(4) * (np.pi / 2)
        return np.stack([np.cos(t), np.sin(t)], 1)
    if kind == "triangle":
        t = -np.pi / 2 + np.arange(3) * (2 * np.pi / 3)
        return np.stack([np.cos(t), np.sin(t)], 1)
    if kind == "hexagon":
        t = np.arange(6) * (np.pi / 3)
        return np.stack([np.cos(t), np.sin(t)], 1)
    if kind == "star":
        t = -np.pi / 2 + np.arange(10) * (np.pi / 5)
        r = np.where(np.arange(10) % 2 == 0, 1.0, 0.45)
        return np.stack([r * np.cos(t), r * np.sin(t)], 1)
    if kind == "cross":
        w = 0.34
        pts = np.array([(w, 1), (w, w), (1, w), (1, -w), (w, -w), (w, -1), (-w, -1), (-w, -w), (-1, -w), (-1, w),
                        (-w, w), (-w, 1)], dtype=np.float64)
        return pts / math.hypot(1.0, w)
    raise ValueError(f"unknown shape kind {kind!r}; use one of {SHAPE_NAMES}")


_UNIT = {k: _unit_polygon(k) for k in SHAPE_NAMES}


def _polygon_area(poly: np.ndarray) -> float:
    """Absolute shoelace area of a ``(V, 2)`` polygon."""
    x, y = poly[:, 0], poly[:, 1]
    xn, yn = np.concatenate([x[1:], x[:1]]), np.concatenate([y[1:], y[:1]])
    return float(abs(float(x @ yn) - float(y @ xn)) / 2.0)


_UNIT_AREA = {k: _polygon_area(v) for k, v in _UNIT.items()}


def _clip_polygon(poly: np.ndarray, size: float) -> np.ndarray:
    """Clip a ``(V, 2)`` polygon to the square ``[0, size]^2`` (Sutherland-Hodgman, one half-plane at a time).

    The clip window is convex, so the result is exact for concave polygons too (it may contain zero-width
    segments along the border, which change neither area nor rasterisation). Returns ``(V', 2)``, possibly empty.
    """
    pts = [tuple(p) for p in poly]
    # each half-plane as (axis, bound, keep_if_greater)
    for axis, bound, greater in ((0, 0.0, True), (0, size, False), (1, 0.0, True), (1, size, False)):
        if not pts:
            break

        def inside(p: tuple[float, float]) -> bool:
            return p[axis] >= bound if greater else p[axis] <= bound

        out: list[tuple[float, float]] = []
        prev = pts[-1]
        for cur in pts:
            cin, pin = inside(cur), inside(prev)
            if cin != pin:  # the edge crosses the boundary: add the crossing point
                t = (bound - prev[axis]) / (cur[axis] - prev[axis])
                cross = [prev[0] + t * (cur[0] - prev[0]), prev[1] + t * (cur[1] - prev[1])]
                cross[axis] = bound
                out.append((cross[0], cross[1]))
            if cin:
                out.append(cur)
            prev = cur
        pts = out
    return np.asarray(pts, dtype=np.float64).reshape(-1, 2)


def _coverage(poly: np.ndarray, size: int) -> tuple[int, int, np.ndarray]:
    """Anti-aliased coverage of a polygon (already inside ``[0, size]^2``) over the pixels of its bounding box.

    Pixel ``(i, j)`` covers ``[j, j+1) x [i, i+1)`` (the COCO convention). Returns ``(y0, x0, cov)`` with ``cov``
    ``(h, w)`` float32 in ``[0, 1]`` for the pixel rows ``y0..y0+h`` and columns ``x0..x0+w``.
    """
    s = _SUPERSAMPLE
    x0 = max(int(math.floor(poly[:, 0].min())), 0)
    y0 = max(int(math.floor(poly[:, 1].min())), 0)
    x1 = min(int(math.ceil(poly[:, 0].max())), size)
    y1 = min(int(math.ceil(poly[:, 1].max())), size)
    w, h = max(x1 - x0, 1), max(y1 - y0, 1)
    canvas = Image.new("L", (w * s, h * s), 0)
    # PIL puts integer coordinates at pixel centres: shift by half a (supersampled) pixel
    pts = [((x - x0) * s - 0.5, (y - y0) * s - 0.5) for x, y in poly]
    ImageDraw.Draw(canvas).polygon(pts, fill=255)
    # box-filter down to pixel resolution: the fraction of supersamples inside, quantised to 1/255
    cov = np.asarray(canvas.resize((w, h), Image.BOX), dtype=np.float32) * np.float32(1.0 / 255.0)
    return y0, x0, cov


def _dilate(mask: np.ndarray, r: int) -> np.ndarray:
    """Binary dilation of a ``(H, W)`` bool mask by a ``(2r+1)^2`` square (shifted ORs, no scipy)."""
    out = mask.copy()
    for _ in range(r):
        grown = out.copy()
        grown[1:, :] |= out[:-1, :]
        grown[:-1, :] |= out[1:, :]
        grown[:, 1:] |= out[:, :-1]
        grown[:, :-1] |= out[:, 1:]
        out = grown
    return out


def mask_to_rle(mask: np.ndarray) -> dict[str, Any]:
    """COCO *uncompressed* RLE of a binary mask, the form COCO uses for crowd annotations.

    Args:
        mask: ``(H, W)`` bool / {0, 1} array.

    Returns:
        ``{"size": [H, W], "counts": [n0, n1, ...]}``: run lengths in column-major (Fortran) order, starting with
        a (possibly empty) run of zeros, as ``pycocotools.mask.frPyObjects`` expects.
    """
    h, w = mask.shape
    flat = np.asarray(mask, dtype=bool).ravel(order="F")
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat.size and flat[0]:
        counts = [0] + counts
    return {"size": [int(h), int(w)], "counts": [int(c) for c in counts]}


# --------------------------------------------------------------------------------------------------- rendering
@dataclass
class ShapeObject:
    """One annotated thing in a rendered image (a shape, or a crowd of tiny shapes).

    Attributes:
        shape: shape kind (one of :data:`SHAPE_NAMES`).
        color: colour name (one of :data:`COLOR_NAMES`).
        rgb: the fill colour before shading, float ``(3,)`` in ``[0, 1]``.
        polygon: ``(V, 2)`` clipped polygon in pixels (rounded as written to the json); ``None`` for a crowd.
        mask: ``(H, W)`` bool, the pixels the renderer painted (anti-aliased coverage >= 0.5; for a crowd the
            annotated region).
        iscrowd: whether this is a crowd.
        truncated: whether the border clipped the shape.
        parts: for a crowd, the polygons ``(V, 2)`` of its tiny member shapes.
    """

    shape: str
    color: str
    rgb: np.ndarray
    polygon: np.ndarray | None
    mask: np.ndarray
    iscrowd: bool = False
    truncated: bool = False
    parts: list[np.ndarray] = field(default_factory=list)

    def annotation(self) -> dict[str, Any]:
        """The COCO annotation of this object.

        Returns:
            ``category_id``, ``segmentation`` (one polygon, or an uncompressed RLE for a crowd), ``area``, ``bbox``
            ``[x, y, w, h]``, ``iscrowd``, ``color``, ``identity``; ``id`` and ``image_id`` are added by the writer.
        """
        if self.iscrowd:
            ys, xs = np.nonzero(self.mask)
            bbox = [float(xs.min()), float(ys.min()), float(xs.max() + 1 - xs.min()), float(ys.max() + 1 - ys.min())]
            seg: Any = mask_to_rle(self.mask)
            area = float(self.mask.sum())
        else:
            p = self.polygon
            seg = [[float(v) for v in p.reshape(-1)]]
            x0, y0 = float(p[:, 0].min()), float(p[:, 1].min())
            bbox = [x0, y0, round(float(p[:, 0].max()) - x0, 2), round(float(p[:, 1].max()) - y0, 2)]
            area = round(_polygon_area(p), 2)
        return {"category_id": CATEGORY_IDS[self.shape], "segmentation": seg, "area": area, "bbox": bbox,
                "iscrowd": int(self.iscrowd), "color": self.color, "identity": f"{self.color}_{self.shape}"}


@dataclass
class ShapesSample:
    """A rendered image and its objects (debugging / tests; the dataset files hold the JPEG of ``image``).

    Attributes:
        image: ``(H, W, 3)`` uint8 RGB, before JPEG compression.
        objects: the annotated objects; for images with objects, ``objects[primary]`` is the largest non-crowd one.
        primary: index of the primary object in ``objects``, ``None`` for a negative image.
    """

    image: np.ndarray
    objects: list[ShapeObject] = field(default_factory=list)
    primary: int | None = None

    def annotations(self) -> list[dict[str, Any]]:
        """COCO annotations (without ``id`` / ``image_id``) in object order."""
        return [o.annotation() for o in self.objects]


def _weyl(index: int, offset: float) -> float:
    """Low-discrepancy sequence in [0, 1): any window of n images holds ~rate*n hits of ``_weyl(i) < rate``."""
    return (index * _GOLDEN + offset) % 1.0


def _split_offsets(seed: int, split: str) -> tuple[float, float]:
    rng = np.random.default_rng([int(seed), _SPLITS.index(split)])
    a, b = rng.random(2)
    return float(a), float(b)


def _random_color(rng: np.random.Generator, name: str | None = None) -> tuple[str, np.ndarray]:
    """A named colour (``name``, else drawn) with hue (+-12 deg), saturation and value jitter;
    ``(name, rgb (3,) float)``."""
    if name is None:
        name = COLOR_NAMES[int(rng.integers(len(COLOR_NAMES)))]
    h = ((_HUES[name] + rng.uniform(-12.0, 12.0)) % 360.0) / 360.0
    rgb = colorsys.hsv_to_rgb(h, rng.uniform(0.6, 1.0), rng.uniform(0.6, 1.0))
    return name, np.asarray(rgb, dtype=np.float32)


_GRIDS: dict[int, tuple[np.ndarray, np.ndarray]] = {}


def _unit_grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Cached ``(yy, xx)`` ``(size, size)`` float32 coordinate grids scaled to [0, 1)."""
    if size not in _GRIDS:
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
        _GRIDS[size] = (yy, xx)
    return _GRIDS[size]


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A muted, textured background ``(size, size, 3)`` float32 in [0, 1]."""

    def muted() -> np.ndarray:
        return np.clip(rng.uniform(0.15, 0.85) + rng.uniform(-0.12, 0.12, 3), 0.0, 1.0).astype(np.float32)

    yy, xx = _unit_grid(size)
    kind = int(rng.integers(5))
    base = muted()
    if kind == 0:  # flat colour + noise
        img = np.broadcast_to(base, (size, size, 3)).copy()
    elif kind == 1:  # linear gradient between two colours
        a = float(rng.uniform(0, 2 * np.pi))
        t = math.cos(a) * xx + math.sin(a) * yy
        t = (t - t.min()) * (1.0 / max(float(t.max() - t.min()), 1e-6))
        img = base + t[..., None] * (muted() - base)
    elif kind == 2:  # stripes
        a = float(rng.uniform(0, np.pi))
        k = 2 * math.pi * float(rng.uniform(2.0, 12.0))
        wave = np.sin((k * math.cos(a)) * xx + (k * math.sin(a)) * yy + float(rng.uniform(0, 2 * np.pi)))
        tint = (float(rng.uniform(0.03, 0.1)) * rng.uniform(0.5, 1.0, 3)).astype(np.float32)
        img = base + wave[..., None] * tint
    elif kind == 3:  # smooth blotches: a coarse random grid, upsampled bilinearly
        g = int(rng.integers(3, 9))
        coarse = (base + rng.uniform(-0.12, 0.12, (g, g, 3))).clip(0, 1)
        coarse_im = Image.fromarray((coarse * 255).astype(np.uint8))
        img = np.asarray(coarse_im.resize((size, size), Image.BILINEAR), dtype=np.float32) / 255.0
    else:  # low-contrast checkers
        inv_cell = 1.0 / float(rng.uniform(0.06, 0.25))
        chk = ((np.floor(xx * inv_cell) + np.floor(yy * inv_cell)) % 2)[..., None]
        img = base + (chk - 0.5) * float(rng.uniform(0.04, 0.12))
    img = np.asarray(img, dtype=np.float32).clip(0, 1)
    # clutter lines of low contrast: coloured like the background under their midpoint, +-0.12
    n_lines = int(rng.integers(0, 7))
    if n_lines:
        im = Image.fromarray((img * 255).astype(np.uint8))
        draw = ImageDraw.Draw(im)
        for _ in range(n_lines):
            p = rng.uniform(-0.1, 1.1, 4) * size
            mx, my = (int(np.clip((p[0] + p[2]) / 2, 0, size - 1)), int(np.clip((p[1] + p[3]) / 2, 0, size - 1)))
            c = np.clip(img[my, mx] + rng.uniform(-0.12, 0.12, 3), 0, 1)
            draw.line([(p[0], p[1]), (p[2], p[3])], fill=tuple(int(v * 255) for v in c), width=int(rng.integers(1, 3)))
        img = np.asarray(im, dtype=np.float32) / 255.0
    cast = rng.uniform(0.85, 1.15, 3).astype(np.float32)
    return (img * cast).clip(0, 1)


@dataclass
class _Placed:
    """A placed shape: clipped polygon ``(V, 2)``, mask ``(S, S)`` bool, and coverage ``cov`` ``(h, w)`` at
    ``(y0, x0)``."""

    poly: np.ndarray
    mask: np.ndarray
    truncated: bool
    y0: int
    x0: int
    cov: np.ndarray


class _Placer:
    """Places non-overlapping shapes on a ``size`` x ``size`` canvas and keeps the occupancy map."""

    def __init__(self, rng: np.random.Generator, size: int) -> None:
        self.rng = rng
        self.size = size
        self.occupied = np.zeros((size, size), dtype=bool)

    def shape(self, kind: str, diameter: float, *, truncate: bool, min_visible: float = 0.5,
              max_area: float = math.inf, center: tuple[float, float] | None = None, gap: int = 2
              ) -> _Placed | None:
        """Try once to place a shape of this circumdiameter (pixels), rotated and slightly stretched at random.

        Args:
            kind: shape kind. diameter: circumdiameter in pixels.
            truncate: allow the centre to leave the fully-inside range (the border then clips the polygon).
            min_visible: reject when clipping keeps less than this fraction of the area.
            max_area: reject when the (clipped) polygon area exceeds this.
            center: fixed centre ``(x, y)`` instead of a random one.
            gap: free pixels kept around the shape in the occupancy map.

        Returns:
            The placement (polygon rounded to 0.01 px, as written to the json), or ``None`` when it overlaps
            something, breaks an area limit or degenerates. Only accepted placements mark the occupancy map.
        """
        rng, S = self.rng, self.size
        theta = rng.uniform(0, 2 * np.pi)
        aspect = rng.uniform(0.9, 1.1)
        unit = _UNIT[kind] * np.array([aspect, 1.0 / aspect])
        rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
        local = unit @ rot.T * (diameter / 2.0)
        lo, hi = local.min(0), local.max(0)
        if center is None:
            slack = 0.5 * (hi - lo) if truncate else np.zeros(2)
            cmin, cmax = -lo - slack, S - hi + slack
            if np.any(cmax < cmin):
                return None
            c = rng.uniform(cmin, cmax)
        else:
            c = np.asarray(center, dtype=np.float64)
        poly = local + c
        # cheap early rejection: the centre or a vertex lies on an occupied pixel
        probe = np.floor(np.vstack([poly, c[None]])).astype(np.int64).clip(0, S - 1)
        if self.occupied[probe[:, 1], probe[:, 0]].any():
            return None
        full_area = _polygon_area(poly)
        truncated = bool(poly.min() < 0 or poly.max() > S)
        if truncated:
            poly = _clip_polygon(poly, float(S))
            if len(poly) < 3:
                return None
        poly = np.round(poly, 2).clip(0, S)
        area = _polygon_area(poly)
        if area <= 0 or area < min_visible * full_area or area > max_area:
            return None
        if np.ptp(poly[:, 0]) < 2.0 or np.ptp(poly[:, 1]) < 2.0:
            return None
        y0, x0, cov = _coverage(poly, S)
        h, w = cov.shape
        touched = cov > 0
        if self.occupied[y0:y0 + h, x0:x0 + w][touched].any():
            return None
        inside = cov >= 0.5
        if not inside.any():
            return None
        mask = np.zeros((S, S), dtype=bool)
        mask[y0:y0 + h, x0:x0 + w] = inside
        # mark the touched pixels grown by `gap` (dilate a padded crop, not the whole canvas)
        py0, px0 = max(y0 - gap, 0), max(x0 - gap, 0)
        py1, px1 = min(y0 + h + gap, S), min(x0 + w + gap, S)
        crop = np.zeros((py1 - py0, px1 - px0), dtype=bool)
        crop[y0 - py0:y0 - py0 + h, x0 - px0:x0 - px0 + w] = touched
        self.occupied[py0:py1, px0:px1] |= _dilate(crop, gap)
        return _Placed(poly, mask, truncated, y0, x0, cov)


def _paint(img: np.ndarray, p: _Placed, rgb: np.ndarray, rng: np.random.Generator) -> None:
    """Alpha-blend a shaded fill of ``rgb`` into ``img`` ``(S, S, 3)`` (in place) under the placement's coverage."""
    y0, x0, cov = p.y0, p.x0, p.cov
    h, w = cov.shape
    # gentle linear shading across the object (+-5..12% brightness) so fills are not flat
    yy, xx = _unit_grid(max(h, w))
    a = rng.uniform(0, 2 * np.pi)
    t = np.float32(np.cos(a)) * xx[:h, :w] + np.float32(np.sin(a)) * yy[:h, :w]
    t = (t - t.mean()) / max(float(np.ptp(t)), 1e-3)
    fill = (rgb[None, None, :] * (1.0 + np.float32(rng.uniform(0.1, 0.25)) * t[..., None])).clip(0, 1)
    region = img[y0:y0 + h, x0:x0 + w]
    alpha = cov[..., None]
    region += alpha * (fill - region)


#: The layouts of :func:`render_shapes_sample` (see the module docs).
LAYOUTS = ("mixed", "compositional")
#: compositional scenes: (kind, probability); "pair" objects sit in opposite halves along a random axis
_SCENES = (("single", 0.2), ("two", 0.25), ("count", 0.25), ("pair", 0.3))
_HALVES = (((0.27, 0.5), (0.73, 0.5)), ((0.5, 0.27), (0.5, 0.73)))


def _compositional(rng: np.random.Generator, placer: _Placer, S: int
                   ) -> list[tuple[str, str, np.ndarray, _Placed]] | None:
    """One compositional scene (module docs): ``[(kind, colour name, rgb, placement)]``, or ``None`` when a shape
    did not fit (the caller draws the scene again)."""
    scene = _SCENES[int(rng.choice(len(_SCENES), p=[w for _, w in _SCENES]))][0]
    if scene == "single":
        specs = [(SHAPE_NAMES[int(rng.integers(len(SHAPE_NAMES)))], None, (0.35, 0.55), None)]
    elif scene == "count":
        kind, color = SHAPE_NAMES[int(rng.integers(len(SHAPE_NAMES)))], COLOR_NAMES[int(rng.integers(len(COLOR_NAMES)))]
        specs = [(kind, color, (0.22, 0.3), None)] * int(rng.integers(2, 4))
    else:
        a, b = rng.choice(len(SHAPE_NAMES), 2, replace=False)
        centres: list[Any] = [None, None]
        if scene == "pair":
            halves = _HALVES[int(rng.integers(2))]
            order = rng.permutation(2)
            centres = [tuple((np.asarray(halves[int(k)]) + rng.uniform(-0.06, 0.06, 2)) * S) for k in order]
        specs = [(SHAPE_NAMES[int(a)], None, (0.3, 0.45), centres[0]), (SHAPE_NAMES[int(b)], None, (0.3, 0.45), centres[1])]
    out = []
    for kind, color, frac, centre in specs:
        for _ in range(100):
            placed = placer.shape(kind, rng.uniform(*frac) * S, truncate=False, center=centre)
            if placed is not None:
                break
        else:
            return None
        name, rgb = _random_color(rng, color)
        out.append((kind, name, rgb, placed))
    return out


def render_shapes_sample(split: str, index: int, *, image_size: int = 128, seed: int = 0,
                         layout: str = "mixed") -> ShapesSample:
    """Render one image of the dataset with its objects (what :func:`ensure_shapes_dataset` writes, before JPEG).

    Deterministic in ``(seed, split, index, image_size)``; the i-th file of a split (image id ``index + 1``) is the
    JPEG of ``render_shapes_sample(split, index, ...).image``.

    Args:
        split: ``"train"`` or ``"val"``.
        index: 0-based image index within the split.
        image_size: side of the square image in pixels.
        seed: dataset seed.
        layout: ``"mixed"`` (the default dataset) or ``"compositional"`` (scenes like the text-to-image prompts;
            module docs).

    Returns:
        :class:`ShapesSample` with the ``(S, S, 3)`` uint8 image and its objects (masks ``(S, S)`` bool).
    """
    if split not in _SPLITS:
        raise ValueError(f"split must be one of {_SPLITS}, got {split!r}")
    if layout not in LAYOUTS:
        raise ValueError(f"shapes layout={layout!r}; use one of {LAYOUTS}")
    S = int(image_size)
    rng = np.random.default_rng([int(seed), _SPLITS.index(split), int(index)])
    neg_off, crowd_off = _split_offsets(seed, split)
    negative = _weyl(index, neg_off) < _NEGATIVE_RATE
    has_crowd = (not negative) and _weyl(index, crowd_off) < _CROWD_RATE
    img = _background(rng, S)
    placer = _Placer(rng, S)
    objects: list[ShapeObject] = []
    primary: int | None = None

    def pick_kind() -> str:
        return SHAPE_NAMES[int(rng.integers(len(SHAPE_NAMES)))]

    if not negative and layout == "compositional":
        for _attempt in range(20):
            placer = _Placer(rng, S)
            scene = _compositional(rng, placer, S)
            if scene is not None:
                break
        else:  # pragma: no cover - the sizes leave ample room
            raise RuntimeError(f"shapes: could not compose {split} image {index} (image_size={S})")
        for kind, name, rgb, placed in scene:
            objects.append(ShapeObject(kind, name, rgb, placed.poly, placed.mask, truncated=False))
            _paint(img, placed, rgb, rng)
        primary = int(np.argmax([_polygon_area(o.polygon) for o in objects]))
    elif not negative:
        n_objects = int(rng.integers(1, 5))
        to_paint: list[tuple[_Placed, np.ndarray]] = []
        # primary: large, placed first on the empty canvas
        placed = None
        for _ in range(50):
            kind = pick_kind()
            placed = placer.shape(kind, rng.uniform(0.3, 0.6) * S, truncate=rng.random() < _TRUNCATE_PROB)
            if placed is not None:
                break
        if placed is None:  # practically unreachable; fall back to a centred, untruncated shape
            placed = placer.shape(kind, 0.4 * S, truncate=False, center=(S / 2, S / 2))
            if placed is None:
                raise RuntimeError(f"shapes: could not place the primary object of {split} image {index} "
                                   f"(image_size={S}); please report this with the parameters")
        name, rgb = _random_color(rng)
        primary = 0
        objects.append(ShapeObject(kind, name, rgb, placed.poly, placed.mask, truncated=placed.truncated))
        to_paint.append((placed, rgb))
        area_limit = _polygon_area(placed.poly) / PRIMARY_AREA_RATIO
        if has_crowd:
            crowd = _place_crowd(placer, rng, S)
            if crowd is not None:
                objects.append(crowd[0])
                to_paint.extend((p, crowd[0].rgb) for p in crowd[1])
        min_d = 0.08 * S
        for _ in range(n_objects - 1):
            kind = pick_kind()
            # circumdiameter reaching the area limit for this kind (the exact area is checked on placement)
            max_d = min(0.55 * S, 2.0 * math.sqrt(area_limit / _UNIT_AREA[kind]))
            if max_d <= min_d:
                continue
            for _ in range(25):
                placed = placer.shape(kind, rng.uniform(min_d, max_d), truncate=rng.random() < _TRUNCATE_PROB,
                                      max_area=area_limit)
                if placed is not None:
                    name, rgb = _random_color(rng)
                    objects.append(ShapeObject(kind, name, rgb, placed.poly, placed.mask, truncated=placed.truncated))
                    to_paint.append((placed, rgb))
                    break
        for placed, rgb in to_paint:
            _paint(img, placed, rgb, rng)
    # global photometric noise: colour jitter, pixel noise, slight blur
    gain = rng.uniform(0.9, 1.1)
    contrast = rng.uniform(0.85, 1.1)
    mean = img.mean()
    img = ((img - mean) * contrast + mean) * gain
    # pixel noise: triangular (sum of two uniform bytes, cheaper than normal draws), std ~0.01-0.06
    u = rng.integers(0, 256, (2, *img.shape), dtype=np.uint8)
    tri = u[0].astype(np.float32) - u[1]
    img = img + tri * np.float32(rng.uniform(0.01, 0.06) / (255.0 / math.sqrt(6.0)))
    out = Image.fromarray((img.clip(0, 1) * 255.0 + 0.5).astype(np.uint8))
    if rng.random() < 0.6:  # slight blur: a separable 3x3 kernel [w, 1, w] (sigma ~0.5-0.8 px)
        w = float(rng.uniform(0.15, 0.6))
        out = out.filter(ImageFilter.Kernel((3, 3), [w * w, w, w * w, w, 1.0, w, w * w, w, w * w]))
    return ShapesSample(image=np.asarray(out), objects=objects, primary=primary)


def _place_crowd(placer: _Placer, rng: np.random.Generator, S: int) -> tuple[ShapeObject, list[_Placed]] | None:
    """A cluster of 5-10 tiny shapes of one kind and colour, annotated as ONE crowd region.

    Returns the crowd object (its mask: the members' pixels grown by one pixel) and the member placements to paint,
    or ``None`` when no cluster of >= 5 fits (the occupancy map is then left as it was).
    """
    kind = SHAPE_NAMES[int(rng.integers(len(SHAPE_NAMES)))]
    name, rgb = _random_color(rng)
    tiny = max(0.045 * S, 4.0)
    for _ in range(15):
        radius = rng.uniform(0.08, 0.14) * S
        centre = rng.uniform(radius, S - radius, 2)
        saved = placer.occupied.copy()
        members: list[_Placed] = []
        for _ in range(60):
            r, a = radius * math.sqrt(rng.random()), rng.uniform(0, 2 * np.pi)
            c = (centre[0] + r * math.cos(a), centre[1] + r * math.sin(a))
            placed = placer.shape(kind, rng.uniform(1.0, 1.5) * tiny, truncate=False, center=c, min_visible=0.99,
                                  gap=1)
            if placed is not None:
                members.append(placed)
                if len(members) >= 10:
                    break
        if len(members) >= 5:
            union = np.logical_or.reduce([m.mask for m in members])
            region = _dilate(union, 1)
            placer.occupied |= _dilate(region, 2)
            obj = ShapeObject(kind, name, rgb, None, region, iscrowd=True, parts=[m.poly for m in members])
            return obj, members
        placer.occupied = saved
    return None


# ----------------------------------------------------------------------------------------------------- dataset
def default_cache_dir() -> Path:
    """The zoo's cache folder: ``$ZOO_CACHE`` if set, else ``~/.cache/zoo``."""
    env = os.environ.get("ZOO_CACHE")
    return Path(env).expanduser() if env else Path("~/.cache/zoo").expanduser()


def shapes_params(*, num_train: int = 1600, num_val: int = 400, image_size: int = 128, seed: int = 0,
                  layout: str = "mixed") -> dict[str, Any]:
    """The parameters that define a shapes dataset (what ``DONE.json`` records and the cache name hashes); the
    default layout is not recorded, so datasets written before layouts existed keep their folder."""
    if layout not in LAYOUTS:
        raise ValueError(f"shapes layout={layout!r}; use one of {LAYOUTS}")
    params: dict[str, Any] = {"version": DATASET_VERSION, "num_train": int(num_train), "num_val": int(num_val),
                              "image_size": int(image_size), "seed": int(seed)}
    if layout != "mixed":
        params["layout"] = layout
    return params


def _params_hash(params: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:10]


def _is_complete(root: Path, params: dict[str, Any]) -> bool:
    """Whether ``root`` holds a finished dataset made with exactly ``params``."""
    try:
        done = json.loads((root / _DONE).read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(done, dict) or done.get("params") != params:
        return False
    return all((root / "annotations" / f"instances_{s}.json").is_file() and (root / s).is_dir() for s in _SPLITS)


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    """Exclusive inter-process lock on ``path`` where ``fcntl`` exists (POSIX); a no-op elsewhere, where the
    temp-folder + rename protocol alone keeps concurrent generators safe."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    with open(path, "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _encode_image(split: str, index: int, image_size: int, seed: int, layout: str = "mixed"
                  ) -> tuple[bytes, list[dict[str, Any]]]:
    """JPEG bytes and annotations (without ids) of one image."""
    import io

    sample = render_shapes_sample(split, index, image_size=image_size, seed=seed, layout=layout)
    buf = io.BytesIO()
    Image.fromarray(sample.image).save(buf, format="JPEG", quality=JPEG_QUALITY, subsampling=2, optimize=False)
    return buf.getvalue(), sample.annotations()


def _file_name(index: int) -> str:
    return f"{index + 1:012d}.jpg"


def _generate_one(job: tuple[str, int, int, int, str, str]) -> list[dict[str, Any]]:
    """Worker: render image ``index`` of ``split``, write its JPEG into ``out_dir``, return its annotations."""
    split, index, image_size, seed, out_dir, layout = job
    data, anns = _encode_image(split, index, image_size, seed, layout)
    with open(os.path.join(out_dir, _file_name(index)), "wb") as fh:
        fh.write(data)
    return anns


def _write_split(tmp: Path, split: str, n: int, params: dict[str, Any], pool: Any) -> dict[str, int]:
    S, seed = params["image_size"], params["seed"]
    img_dir = tmp / split
    img_dir.mkdir(parents=True)
    layout = params.get("layout", "mixed")
    jobs = [(split, i, S, seed, str(img_dir), layout) for i in range(n)]
    results = pool.imap(_generate_one, jobs, chunksize=16) if pool is not None else map(_generate_one, jobs)
    images, annotations = [], []
    for i, anns in enumerate(results):
        images.append({"id": i + 1, "file_name": _file_name(i), "width": S, "height": S, "license": 1})
        for a in anns:
            annotations.append({"id": len(annotations) + 1, "image_id": i + 1, **a})
    doc = {
        "info": {"description": "zoo synthetic shapes dataset (generated by zoo.data.shapes)",
                 "version": DATASET_VERSION, "year": 2024, "contributor": "zoo", "date_created": "",
                 "split": split, "params": params},
        "licenses": [{"id": 1, "name": "CC0 1.0 (synthetic data)",
                      "url": "https://creativecommons.org/publicdomain/zero/1.0/"}],
        "images": images,
        "annotations": annotations,
        "categories": [{"id": CATEGORY_IDS[k], "name": k, "supercategory": SUPERCATEGORY} for k in SHAPE_NAMES],
    }
    (tmp / "annotations").mkdir(exist_ok=True)
    (tmp / "annotations" / f"instances_{split}.json").write_text(json.dumps(doc, separators=(",", ":")))
    return {"images": len(images), "annotations": len(annotations),
            "crowd": sum(a["iscrowd"] for a in annotations),
            "negatives": len(images) - len({a["image_id"] for a in annotations})}


def _generate(tmp: Path, params: dict[str, Any], num_workers: int) -> None:
    counts: dict[str, Any] = {}
    pool = None
    if num_workers > 0:
        import multiprocessing as mp

        pool = mp.get_context("spawn").Pool(num_workers)
    try:
        counts["train"] = _write_split(tmp, "train", params["num_train"], params, pool)
        counts["val"] = _write_split(tmp, "val", params["num_val"], params, pool)
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    (tmp / _DONE).write_text(json.dumps({"params": params, "counts": counts}, indent=1, sort_keys=True))


def _looks_like_ours(root: Path) -> bool:
    """An existing folder we may replace: empty, or holding only the shapes layout."""
    return all(p.name in _LAYOUT for p in root.iterdir())


def _install(tmp: Path, root: Path, params: dict[str, Any]) -> None:
    """Move the finished ``tmp`` folder to ``root``; if another process won the race, keep theirs."""
    try:
        os.rename(tmp, root)  # atomic; succeeds when root is absent (or an empty folder on POSIX)
        return
    except OSError:
        pass
    if _is_complete(root, params):  # a concurrent generator finished first: use its output
        shutil.rmtree(tmp, ignore_errors=True)
        return
    trash = root.with_name(f".{root.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        os.rename(root, trash)
    except FileNotFoundError:
        pass
    try:
        os.rename(tmp, root)
    except OSError:
        if not _is_complete(root, params):
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(trash, ignore_errors=True)


def ensure_shapes_dataset(root: str | Path | None = None, *, num_train: int = 1600, num_val: int = 400,
                          image_size: int = 128, seed: int = 0, layout: str = "mixed", num_workers: int = 0) -> Path:
    """Return a folder holding the shapes dataset with these parameters, generating it on first use.

    A folder whose ``DONE.json`` records the same parameters is returned at once. Otherwise the dataset is written
    into a temporary sibling folder and renamed into place, so ``root`` never holds a half-written dataset; when
    several processes (e.g. DDP ranks) call this together, one generates and the others use its result.

    Args:
        root: target folder; ``None`` -> ``default_cache_dir()/datasets/shapes-v1-<hash of the parameters>``.
            An existing folder with other content than the dataset layout is never overwritten (error instead).
        num_train: images in the ``train`` split (>= 1).
        num_val: images in the ``val`` split (>= 0).
        image_size: side of the square RGB images, in pixels (>= 32).
        seed: dataset seed; every image draws from an RNG seeded by ``(seed, split, index)``.
        layout: ``"mixed"`` (default) or ``"compositional"`` (scenes like the text-to-image prompts; module docs).
        num_workers: > 0 renders with a process pool of this size (same bytes as serial generation).

    Returns:
        The dataset root: ``train/``, ``val/``, ``annotations/instances_{train,val}.json``, ``DONE.json``.
    """
    if int(num_train) < 1 or int(num_val) < 0:
        raise ValueError(f"shapes dataset needs num_train >= 1 and num_val >= 0, got num_train={num_train}, "
                         f"num_val={num_val}")
    if int(image_size) < 32:
        raise ValueError(f"shapes dataset image_size must be >= 32 pixels, got {image_size}")
    if int(num_workers) < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    params = shapes_params(num_train=num_train, num_val=num_val, image_size=image_size, seed=seed, layout=layout)
    if root is None:
        root = default_cache_dir() / "datasets" / f"{DATASET_VERSION}-{_params_hash(params)}"
    root = Path(root).expanduser().absolute()
    if _is_complete(root, params):
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    with _lock(root.with_name(f".{root.name}.lock")):
        if _is_complete(root, params):  # made by another process while we waited
            return root
        if root.exists() and not (root.is_dir() and _looks_like_ours(root)):
            raise FileExistsError(
                f"{root} exists and holds files that are not a shapes dataset "
                f"({sorted(p.name for p in root.iterdir())[:5] if root.is_dir() else 'a file'}); refusing to "
                "overwrite it. Pass another root (or root=None for the cache folder), or empty that folder.")
        tmp = root.with_name(f".{root.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        try:
            _generate(tmp, params, int(num_workers))
            _install(tmp, root, params)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return root
