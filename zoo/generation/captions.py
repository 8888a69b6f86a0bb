"""Captions: written from annotations for the embedded dataset, read from COCO ``captions_<split>.json`` for real
data, and tokenised with a small word-level :class:`Vocabulary` that lives in the model spec (so serving tokenises
exactly as training did).

A caption of an embedded-dataset image names every non-crowd object by colour and shape with counts
(``"two red stars and a blue circle"``), the relative position of two objects (``"a red star left of a blue
circle"``), a crowd (``"with a group of tiny green crosses"``) and the background's brightness (``"on a dark
background"``). It is deterministic per image: the template choices (colour words kept or left out, ``and`` or a
relation for two objects) draw from an RNG seeded by the image id. Only numpy and the standard library are
imported here (serving path).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "Vocabulary", "CaptionObject", "caption_for_objects", "plural", "number_word", "relation", "shapes_vocabulary",
    "build_vocabulary", "read_coco_captions", "record_caption", "tokenize", "NUMBER_WORDS", "RELATIONS",
]

PAD, BOS, UNK = "<pad>", "<bos>", "<unk>"
SPECIALS = (PAD, BOS, UNK)
NUMBER_WORDS = ("zero", "a", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
#: relation words: (phrase, what it means for the first object's centre relative to the second's)
RELATIONS = ("left of", "right of", "above", "below")
#: probability that a caption keeps its colour words (the rest name shapes only, so shape-only prompts are known)
COLOR_WORD_PROB = 0.8
#: probability that a caption of two different objects states their relation instead of joining them with "and"
RELATION_PROB = 0.5
_FIXED_WORDS = ("a", "an", "one", "two", "three", "four", "five", "six", "and", "left", "right", "of", "above",
                "below", "on", "dark", "light", "background", "with", "group", "tiny", "nothing", "the", "empty",
                "scene")


def tokenize(text: str) -> list[str]:
    """Lower-cased words (letters and digits); punctuation is dropped."""
    return re.findall(r"[a-z0-9]+", str(text).lower())


def plural(word: str) -> str:
    """English plural of a shape / category name (``cross`` -> ``crosses``, ``star`` -> ``stars``)."""
    if word.endswith(("s", "x", "z", "ch", "sh")):
        return word + "es"
    if word.endswith("y") and len(word) > 1 and word[-2] not in "aeiou":
        return word[:-1] + "ies"
    return word + "s"


def number_word(n: int) -> str:
    return NUMBER_WORDS[n] if 0 <= n < len(NUMBER_WORDS) else str(n)


@dataclass
class CaptionObject:
    """One annotated object as a caption sees it: category name, colour name (or ``None``), box xyxy, crowd flag."""

    name: str
    color: str | None
    box: Sequence[float]
    iscrowd: bool = False

    @property
    def center(self) -> tuple[float, float]:
        x1, y1, x2, y2 = [float(v) for v in self.box]
        return (x1 + x2) / 2.0, (y1 + y2) / 2.0

    @property
    def area(self) -> float:
        x1, y1, x2, y2 = [float(v) for v in self.box]
        return max(0.0, x2 - x1) * max(0.0, y2 - y1)


def relation(a: Sequence[float], b: Sequence[float]) -> str:
    """Where box ``a`` lies relative to box ``b`` (xyxy): along the axis where their centres differ most."""
    ax, ay = (a[0] + a[2]) / 2.0, (a[1] + a[3]) / 2.0
    bx, by = (b[0] + b[2]) / 2.0, (b[1] + b[3]) / 2.0
    dx, dy = ax - bx, ay - by
    if abs(dx) >= abs(dy):
        return "left of" if dx < 0 else "right of"
    return "above" if dy < 0 else "below"


def _phrase(n: int, color: str | None, name: str) -> str:
    noun = name if n == 1 else plural(name)
    return " ".join(w for w in (number_word(n), color, noun) if w)


def caption_for_objects(objects: Sequence[CaptionObject], *, seed: int = 0, background: str | None = None,
                        color_prob: float = COLOR_WORD_PROB, relation_prob: float = RELATION_PROB) -> str:
    """The caption of an image holding ``objects`` (deterministic in ``seed``, e.g. the image id).

    Non-crowd objects are grouped by (colour, name), largest group member first, and counted
    (``"two red stars and a blue circle"``); exactly two objects of different groups may instead be related
    (``"a red star left of a blue circle"``, the larger object first); crowds add ``"with a group of tiny <colour>
    <names>"``; ``background`` (``"dark"`` / ``"light"``) adds ``"on a dark background"``.
    """
    rng = np.random.default_rng([int(seed) & 0x7FFFFFFF, 7])
    with_color = bool(rng.random() < color_prob)
    use_relation = bool(rng.random() < relation_prob)
    things = sorted((o for o in objects if not o.iscrowd), key=lambda o: -o.area)
    crowds = [o for o in objects if o.iscrowd]
    col = (lambda o: o.color) if with_color else (lambda o: None)
    groups: dict[tuple[str | None, str], int] = {}
    for o in things:
        key = (col(o), o.name)
        groups[key] = groups.get(key, 0) + 1
    if not things:
        text = "nothing" if not crowds else ""
    elif len(things) == 2 and len(groups) == 2 and use_relation:
        a, b = things
        text = f"{_phrase(1, col(a), a.name)} {relation(a.box, b.box)} {_phrase(1, col(b), b.name)}"
    else:
        text = " and ".join(_phrase(n, c, name) for (c, name), n in groups.items())
    for c in crowds:
        part = f"a group of tiny {' '.join(w for w in (col(c), plural(c.name)) if w)}"
        text = f"{text} with {part}" if text else part
    if background:
        text = f"{text} on a {background} background"
    return text


def background_word(image: np.ndarray, boxes: Sequence[Sequence[float]], *, dark: float = 0.35,
                    light: float = 0.65) -> str | None:
    """``"dark"`` / ``"light"`` when the mean brightness (0..1) of the pixels outside every box is below ``dark`` /
    above ``light``, else ``None`` (a mid-grey background is not mentioned)."""
    img = np.asarray(image, dtype=np.float32)
    if img.max() > 1.5:
        img = img / 255.0
    keep = np.ones(img.shape[:2], dtype=bool)
    for x1, y1, x2, y2 in boxes:
        keep[max(0, int(y1)):int(np.ceil(y2)), max(0, int(x1)):int(np.ceil(x2))] = False
    if not keep.any():
        return None
    v = float(img[keep].mean())
    return "dark" if v < dark else "light" if v > light else None


# ------------------------------------------------------------------------------------------------ vocabulary
class Vocabulary:
    """Word-level tokeniser: ``<pad>`` (0), ``<bos>`` (1), ``<unk>`` (2), then ``words``.

    :meth:`encode` gives ``(ids, mask)``: ``<bos>`` then the caption's words (unknown ones as ``<unk>``), cut and
    padded to ``max_tokens``; the empty caption is ``<bos>`` alone (the unconditional input of classifier-free
    guidance).
    """

    def __init__(self, words: Iterable[str], max_tokens: int = 16) -> None:
        seen = list(dict.fromkeys(w for w in words if w not in SPECIALS))
        self.words: list[str] = [*SPECIALS, *seen]
        self.index = {w: i for i, w in enumerate(self.words)}
        self.max_tokens = int(max_tokens)

    def __len__(self) -> int:
        return len(self.words)

    def encode_one(self, text: str) -> list[int]:
        ids = [self.index[BOS]] + [self.index.get(w, self.index[UNK]) for w in tokenize(text)]
        return ids[: self.max_tokens]

    def encode(self, texts: Sequence[str]):
        """``(ids (N, max_tokens) int64, mask (N, max_tokens) bool)`` as torch tensors (mask: real tokens)."""
        import torch

        ids = torch.zeros(len(texts), self.max_tokens, dtype=torch.long)
        for i, t in enumerate(texts):
            row = self.encode_one(t)
            ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        return ids, ids != 0

    def decode(self, ids: Sequence[int]) -> str:
        return " ".join(self.words[int(i)] for i in ids if int(i) > 1)

    def unknown_words(self, text: str) -> list[str]:
        return [w for w in tokenize(text) if w not in self.index]


def shapes_vocabulary(class_names: Sequence[str], colors: Sequence[str] | None = None) -> list[str]:
    """Every word a caption of the embedded dataset (or a prompt of :mod:`zoo.generation.prompts`) can hold."""
    from zoo.data.shapes import COLOR_NAMES

    words = list(_FIXED_WORDS) + list(colors if colors is not None else COLOR_NAMES)
    for n in class_names:
        for w in tokenize(n) + tokenize(plural(n)):
            words.append(w)
    return list(dict.fromkeys(words))


def build_vocabulary(captions: Iterable[str], *, min_count: int = 2, max_size: int = 5000) -> list[str]:
    """The ``max_size`` most frequent words seen at least ``min_count`` times (ties by first appearance)."""
    counts: Counter[str] = Counter()
    for c in captions:
        counts.update(tokenize(c))
    return [w for w, n in counts.most_common(max_size) if n >= min_count]


# ------------------------------------------------------------------------------------------------ COCO captions
def read_coco_captions(path: str | Path) -> dict[int, list[str]]:
    """``{image_id: [captions]}`` from a COCO ``captions_<split>.json`` (``annotations``: ``image_id``,
    ``caption``); each image's captions in file order, stripped. A file without ``annotations`` or with an entry
    missing ``image_id`` / ``caption`` is an error naming it."""
    p = Path(path)
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{p}: not a readable COCO captions json ({err})") from err
    anns = data.get("annotations") if isinstance(data, Mapping) else None
    if not isinstance(anns, list):
        raise ValueError(f"{p}: a COCO captions json needs an 'annotations' list of {{image_id, caption}}")
    out: dict[int, list[str]] = {}
    for i, a in enumerate(anns):
        if not isinstance(a, Mapping) or "image_id" not in a or not isinstance(a.get("caption"), str):
            raise ValueError(f"{p}: annotations[{i}] needs 'image_id' and a string 'caption', got {a!r}")
        out.setdefault(int(a["image_id"]), []).append(" ".join(a["caption"].split()))
    return out


def captions_file_for(ann_file: str | Path) -> Path:
    """The captions json beside an instances json (``instances_val2017.json`` -> ``captions_val2017.json``)."""
    p = Path(ann_file)
    return p.with_name(p.name.replace("instances_", "captions_", 1))


def record_caption(index: Any, rec: Any) -> str:
    """The caption of one :class:`~zoo.data.coco.ImageRecord` of a :class:`~zoo.data.coco.CocoIndex`: the first
    caption of ``captions_<split>.json`` beside the instances json when that file exists (real COCO), else one
    written from the annotations (names, colours from the annotations' ``color`` field, counts, relations, the
    background's brightness from the image file). Cached per image on the index."""
    cache = index.__dict__.setdefault("_zoo_captions", {})
    if rec.image_id in cache:
        return cache[rec.image_id]
    if "_zoo_caption_file" not in index.__dict__:
        f = captions_file_for(index.ann_file)
        index._zoo_caption_file = read_coco_captions(f) if f.is_file() and f != Path(index.ann_file) else None
    read = index._zoo_caption_file
    if read is not None:
        caps = read.get(int(rec.image_id)) or [""]
        cache[rec.image_id] = caps[0]
        return caps[0]
    objs = [CaptionObject(index.class_names[int(lab)], (ex or {}).get("color"), box.tolist(), bool(cr))
            for lab, box, cr, ex in zip(rec.labels, rec.boxes, rec.iscrowd, rec.extra or [{}] * len(rec.labels))]
    bg = None
    try:
        from zoo.data.coco import load_rgb

        bg = background_word(load_rgb(rec.file), [o.box for o in objs])
    except (OSError, ValueError):
        bg = None
    text = caption_for_objects(objs, seed=int(rec.image_id), background=bg)
    cache[rec.image_id] = text
    return text
