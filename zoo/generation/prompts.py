"""A GenEval-style prompt set over the embedded dataset's vocabulary, and real images of each prompt.

Categories (each prompt says what a grader must find, :class:`Prompt`):

================ ==========================================================================
``single``       ``"a star"``: the shape is present
``two_objects``  ``"a star and a circle"``: both shapes are present
``counting``     ``"three squares"``: exactly that many of the shape
``colors``       ``"a red star"``: the shape is present and its pixels have that colour
``position``     ``"a star left of a circle"``: both present, the first where the prompt says
================ ==========================================================================

:func:`render_prompt` draws a real image of a prompt with the embedded dataset's renderer (its backgrounds, shapes,
colours and photometric noise), so the grader's accuracy on real images is the ceiling of a generator's.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from zoo.generation.captions import number_word, plural

__all__ = ["Prompt", "CATEGORIES", "prompt_set", "render_prompt"]

CATEGORIES = ("single", "two_objects", "counting", "colors", "position")


@dataclass(frozen=True)
class Prompt:
    """One prompt and what it requires: ``objects`` ``[{"shape", "color" (or None), "count" (or None: >= 1)}]``;
    ``relation`` (``"left of"`` ...) holds between ``objects[0]`` and ``objects[1]``."""

    text: str
    category: str
    objects: tuple = field(default_factory=tuple)
    relation: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"text": self.text, "category": self.category, "objects": [dict(o) for o in self.objects],
                "relation": self.relation}


def _obj(shape: str, color: str | None = None, count: int | None = None) -> dict[str, Any]:
    return {"shape": shape, "color": color, "count": count}


def prompt_set(shapes: Sequence[str] | None = None, colors: Sequence[str] | None = None, *,
               per_category: int | None = 12, seed: int = 0) -> list[Prompt]:
    """The prompts, category by category (:data:`CATEGORIES`), ``per_category`` of each (``None``: all),
    drawn deterministically from ``seed``."""
    from zoo.data.shapes import COLOR_NAMES, SHAPE_NAMES

    shapes = list(shapes or SHAPE_NAMES)
    colors = list(colors or COLOR_NAMES)
    rng = np.random.default_rng(seed)
    pairs = [(a, b) for a, b in itertools.permutations(shapes, 2)]
    cats: dict[str, list[Prompt]] = {
        "single": [Prompt(f"a {s}", "single", (_obj(s),)) for s in shapes],
        "two_objects": [Prompt(f"a {a} and a {b}", "two_objects", (_obj(a), _obj(b))) for a, b in pairs if a < b],
        "counting": [Prompt(f"{number_word(n)} {plural(s)}", "counting", (_obj(s, count=n),))
                     for n in (2, 3) for s in shapes],
        "colors": [Prompt(f"a {c} {s}", "colors", (_obj(s, c),)) for s in shapes for c in colors],
        "position": [Prompt(f"a {a} {r} a {b}", "position", (_obj(a), _obj(b)), r)
                     for a, b in pairs for r in ("left of", "right of", "above", "below")],
    }
    out: list[Prompt] = []
    for cat in CATEGORIES:
        ps = cats[cat]
        if per_category is not None and len(ps) > per_category:
            # the first `per_category` of a fixed shuffle: every shape appears in turn for the short categories
            idx = rng.permutation(len(ps))[:per_category] if cat not in ("single",) else np.arange(per_category)
            ps = [ps[i] for i in sorted(idx)]
        out.extend(ps)
    return out


def _regions() -> dict[str, tuple]:
    """Centres (fractions of the side) of the first and second object of each relation: the halves the embedded
    dataset's compositional layout places its related pairs in (:data:`zoo.data.shapes._HALVES`)."""
    from zoo.data.shapes import _HALVES

    (left, right), (top, bottom) = _HALVES
    return {"left of": (left, right), "right of": (right, left), "above": (top, bottom), "below": (bottom, top)}


def render_prompt(prompt: Prompt, *, image_size: int = 32, seed: int = 0, max_tries: int = 200) -> np.ndarray:
    """A real ``(S, S, 3)`` uint8 image of ``prompt``, drawn with the embedded dataset's renderer: its background,
    the prompt's shapes (colours as asked, else random), sizes ~30-45% of the side (~22-30% when counting),
    never overlapping, two related objects centred in the halves the relation names; deterministic in ``seed``."""
    from PIL import Image

    from zoo.data.shapes import _background, _paint, _Placer, _random_color

    S = int(image_size)
    regions = _regions()
    rng = np.random.default_rng([int(seed), 11])
    for _attempt in range(20):
        img = _background(rng, S)
        placer = _Placer(rng, S)
        todo: list[tuple[Any, np.ndarray]] = []
        ok = True
        for k, o in enumerate(prompt.objects):
            n = int(o.get("count") or 1)
            for _ in range(n):
                centre = None
                if prompt.relation is not None and k < 2:
                    cx, cy = regions[prompt.relation][k]
                    centre = (cx * S + rng.uniform(-0.06, 0.06) * S, cy * S + rng.uniform(-0.06, 0.06) * S)
                frac = (0.22, 0.3) if n > 1 else (0.3, 0.45) if prompt.relation or len(prompt.objects) > 1 \
                    else (0.35, 0.55)
                placed = None
                for _t in range(max_tries):
                    placed = placer.shape(o["shape"], rng.uniform(*frac) * S, truncate=False, center=centre)
                    if placed is not None:
                        break
                if placed is None:
                    ok = False
                    break
                _, rgb = _random_color(rng, o.get("color"))
                todo.append((placed, rgb))
            if not ok:
                break
        if ok:
            for placed, rgb in todo:
                _paint(img, placed, rgb, rng)
            u = rng.integers(0, 256, (2, *img.shape), dtype=np.uint8)
            img = img + (u[0].astype(np.float32) - u[1]) * np.float32(0.02 / (255.0 / np.sqrt(6.0)))
            return np.asarray(Image.fromarray((img.clip(0, 1) * 255.0 + 0.5).astype(np.uint8)))
    raise RuntimeError(f"could not render {prompt.text!r} at {S} px")
