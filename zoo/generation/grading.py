"""GenEval-style grading with the zoo's own models: a detector finds the prompt's shapes, their count and their
relative position; the colour of a found shape is read from the pixels inside its box (the hue of its saturated
pixels, nearest of the dataset's named hues).

    grader = Grader("test_resnet.shapes_det")            # a registered name, bundle folder or loaded ZooModel
    ok, why = grader.check(image, prompt)                # one image
    table = grader.evaluate(images, prompts)             # per-category and overall accuracy
"""

from __future__ import annotations

import colorsys
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import numpy as np

from zoo.generation.captions import relation as box_relation
from zoo.generation.prompts import CATEGORIES, Prompt

__all__ = ["Grader", "pixel_color", "format_table"]


def pixel_color(image: np.ndarray, box: Sequence[float] | None = None, *, min_saturation: float = 0.3,
                min_value: float = 0.25, min_fraction: float = 0.15) -> str | None:
    """The named colour (:data:`zoo.data.shapes.COLOR_NAMES`) of the saturated pixels in ``box`` (xyxy, default the
    whole image): the circular mean of their hues, nearest named hue; ``None`` when fewer than ``min_fraction`` of
    the box's pixels are saturated (a grey or washed-out region has no colour)."""
    from zoo.data.shapes import _HUES

    img = np.asarray(image)
    if box is not None:
        H, W = img.shape[:2]
        x1, y1, x2, y2 = [float(v) for v in box]
        x1, y1 = int(max(0, np.floor(x1))), int(max(0, np.floor(y1)))
        x2, y2 = int(min(W, np.ceil(x2))), int(min(H, np.ceil(y2)))
        if x2 <= x1 or y2 <= y1:
            return None
        img = img[y1:y2, x1:x2]
    rgb = img.reshape(-1, 3).astype(np.float32) / 255.0
    mx, mn = rgb.max(1), rgb.min(1)
    sat = (mx - mn) / np.maximum(mx, 1e-6)
    keep = (sat >= min_saturation) & (mx >= min_value)
    if keep.mean() < min_fraction:
        return None
    hues = np.array([colorsys.rgb_to_hsv(*p)[0] for p in rgb[keep]]) * 2 * np.pi
    mean = float(np.arctan2(np.sin(hues).mean(), np.cos(hues).mean())) % (2 * np.pi)
    deg = np.degrees(mean)
    return min(_HUES, key=lambda n: min(abs(deg - _HUES[n]), 360 - abs(deg - _HUES[n])))


class Grader:
    """Scores images against :class:`~zoo.generation.prompts.Prompt` s with a zoo detector.

    Args:
        detector: a registered name (``test_resnet.shapes_det``), a bundle path or a loaded detection ZooModel.
        score_thresh: detections below this score are not counted (0.4: real 32 px images of the prompts pass
            ~0.9, uniform noise and flat images 0.0 with test_resnet.shapes_det).
        device: where the detector runs.
    """

    def __init__(self, detector: Any = "test_resnet.shapes_det", *, score_thresh: float = 0.4,
                 device: str = "cpu", batch_size: int = 32) -> None:
        import zoo

        model = zoo.load(detector, device=device) if isinstance(detector, (str, bytes)) or hasattr(detector, "__fspath__") \
            else detector
        heads = [n for n, h in model.heads.items() if h.result_kind in ("detection", "instance")]
        if not heads:
            raise ValueError(f"grader: the model has no detection head (heads: {list(model.heads)})")
        self.model = model
        self.head = heads[0]
        self.score_thresh = float(score_thresh)
        self.predictor = zoo.Predictor(model, device=device, heads=[self.head], batch_size=batch_size,
                                       score_thresh=min(0.05, self.score_thresh))

    def detect(self, images: Sequence[np.ndarray]) -> list[list[tuple[str, float, list[float]]]]:
        """``[(name, score, box xyxy)]`` per image, scores >= ``score_thresh``, best first."""
        out = []
        for r in self.predictor(list(images)):
            r = r[self.head] if isinstance(r, dict) else r
            dets = [(n, float(s), [float(v) for v in b]) for n, s, b in zip(r.names, r.scores.tolist(), r.boxes.tolist())
                    if float(s) >= self.score_thresh]
            out.append(sorted(dets, key=lambda d: -d[1]))
        return out

    def check(self, image: np.ndarray, prompt: Prompt, detections: list | None = None) -> tuple[bool, str]:
        """``(passed, reason)`` for one image."""
        dets = detections if detections is not None else self.detect([image])[0]
        found: list[tuple[str, float, list[float]]] = []
        for o in prompt.objects:
            mine = [d for d in dets if d[0] == o["shape"]]
            if o.get("count") is not None:
                if len(mine) != int(o["count"]):
                    return False, f"{len(mine)} {o['shape']}(s), wanted {o['count']}"
                continue
            if not mine:
                return False, f"no {o['shape']}"
            if o.get("color") is not None:
                colored = [d for d in mine if pixel_color(image, d[2]) == o["color"]]
                if not colored:
                    return False, f"{o['shape']} is {pixel_color(image, mine[0][2])}, wanted {o['color']}"
                mine = colored
            found.append(mine[0])
        if prompt.relation is not None:
            a, b = found[0], found[1]
            got = box_relation(a[2], b[2])
            if got != prompt.relation:
                return False, f"{prompt.objects[0]['shape']} is {got} the {prompt.objects[1]['shape']}"
        return True, "ok"

    def evaluate(self, images: Sequence[np.ndarray], prompts: Sequence[Prompt]) -> dict[str, Any]:
        """Per-category accuracy (``accuracy/<category>``), ``accuracy/overall`` (mean over categories, as GenEval)
        and per-image verdicts."""
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images for {len(prompts)} prompts")
        dets = self.detect(images)
        per: dict[str, list[bool]] = defaultdict(list)
        rows = []
        for im, p, d in zip(images, prompts, dets):
            ok, why = self.check(im, p, d)
            per[p.category].append(ok)
            rows.append({"prompt": p.text, "category": p.category, "passed": ok, "reason": why})
        acc = {f"accuracy/{c}": float(np.mean(per[c])) for c in CATEGORIES if per.get(c)}
        acc["accuracy/overall"] = float(np.mean([acc[f"accuracy/{c}"] for c in CATEGORIES if per.get(c)]))
        return {"metrics": acc, "images": rows}


def format_table(columns: dict[str, dict[str, float]]) -> str:
    """A text table: one row per category (+ overall), one column per result set (``{"trained": metrics}``)."""
    names = list(columns)
    keys = [f"accuracy/{c}" for c in CATEGORIES] + ["accuracy/overall"]
    lines = [f"{'category':<14}" + "".join(f"{n:>12}" for n in names), "-" * (14 + 12 * len(names))]
    for k in keys:
        if not any(k in columns[n] for n in names):
            continue
        lines.append(f"{k.split('/')[1]:<14}" + "".join(f"{columns[n].get(k, float('nan')):>12.3f}" for n in names))
    return "\n".join(lines)
