"""Object crops with identities, for visual similarity (metric learning and retrieval).

From COCO-style annotations: every non-crowd object becomes a crop (its box grown by ``context`` on each side,
clipped to the image); objects smaller than ``min_size`` pixels on either side are left out (counted). The identity
of a crop is its category (``identity="category"``) or any annotation field (``identity="identity"`` on the
embedded dataset: colour + shape). Identities are split deterministically into training and held-out sets, so
evaluation is open-set: test identities are never seen in training.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from zoo.data.coco import CocoIndex, load_rgb
from zoo.preprocess import compute_resize, normalize, resize_image

log = logging.getLogger(__name__)

__all__ = ["CocoCropsDataset", "split_identities"]


def split_identities(identities: Sequence[str], test_fraction: float, seed: int = 0) -> tuple[list[str], list[str]]:
    """Deterministic disjoint split of identity names into (train, test) by a hash of (seed, name)."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test identity fraction must be in (0, 1), got {test_fraction}")
    names = sorted(set(identities))
    scored = sorted(names, key=lambda n: hashlib.sha1(f"{seed}:{n}".encode()).hexdigest())
    n_test = max(1, int(round(len(names) * test_fraction)))
    if n_test >= len(names):
        raise ValueError(f"only {len(names)} identities: cannot hold out {test_fraction:.0%} and still train")
    test = sorted(scored[:n_test])
    return sorted(set(names) - set(test)), test


class CocoCropsDataset(Dataset):
    """Crops of the annotated objects of a :class:`CocoIndex`.

    Args:
        index: the COCO index.
        identity: ``"category"`` or the name of an annotation field holding the identity.
        identities: keep only crops of these identities (e.g. the training or the held-out split); their order
            defines the integer labels.
        context: fraction of the box size added on every side.
        min_size: smallest box side (original pixels) to keep.
        input_size, resize, mean, std, augment: preprocessing and training augmentation, as elsewhere.
    """

    def __init__(self, index: CocoIndex, *, identity: str = "category", identities: Sequence[str] | None = None,
                 context: float = 0.1, min_size: float = 8.0, input_size: Sequence[int], resize: str = "stretch",
                 mean: Sequence[float], std: Sequence[float], augment: Callable | None = None) -> None:
        self.index = index
        self.identity = identity
        self.context = float(context)
        self.input_size = tuple(int(s) for s in input_size)
        self.resize, self.mean, self.std, self.augment = resize, list(mean), list(std), augment
        items: list[tuple[int, int, str]] = []  # (record index, annotation index, identity)
        small = missing = 0
        for r, rec in enumerate(index.records):
            for j in range(len(rec.boxes)):
                if rec.iscrowd[j]:
                    continue
                x1, y1, x2, y2 = rec.boxes[j]
                if min(x2 - x1, y2 - y1) < min_size:
                    small += 1
                    continue
                ident = self._identity_of(rec, j)
                if ident is None:
                    missing += 1
                    continue
                items.append((r, j, ident))
        if missing:
            raise ValueError(f"{missing} annotations in {index.ann_file} have no field {identity!r}: set "
                             "data.extra.identity=category or add the field to every annotation")
        if small:
            log.info("%s: %d objects smaller than %s px left out of the crops", index.ann_file.name, small, min_size)
        names = sorted({i for _, _, i in items}) if identities is None else list(identities)
        keep = set(names)
        self.items = [it for it in items if it[2] in keep]
        self.identity_names = names
        self.label_of = {n: i for i, n in enumerate(names)}
        if not self.items:
            raise ValueError(f"no crops left in {index.ann_file} for identities {names[:5]}...")

    def _identity_of(self, rec, j: int) -> str | None:
        if self.identity == "category":
            return self.index.class_names[int(rec.labels[j])]
        v = rec.extra[j].get(self.identity)
        return None if v is None else str(v)

    @property
    def class_names(self) -> list[str]:
        return self.identity_names

    def all_identities(self) -> list[str]:
        return sorted({i for _, _, i in self.items})

    def labels(self) -> list[int]:
        return [self.label_of[i] for _, _, i in self.items]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, k: int) -> dict[str, Any]:
        r, j, ident = self.items[k]
        rec = self.index.records[r]
        img = load_rgb(rec.file)
        x1, y1, x2, y2 = (float(v) for v in rec.boxes[j])
        pw, ph = (x2 - x1) * self.context, (y2 - y1) * self.context
        H, W = img.shape[:2]
        cx1, cy1 = int(max(0, np.floor(x1 - pw))), int(max(0, np.floor(y1 - ph)))
        cx2, cy2 = int(min(W, np.ceil(x2 + pw))), int(min(H, np.ceil(y2 + ph)))
        crop = np.ascontiguousarray(img[cy1:cy2, cx1:cx2])
        if self.augment is not None:
            crop = np.ascontiguousarray(self.augment(image=crop)["image"])
        info = compute_resize(crop.shape[:2], self.input_size, self.resize)
        return {"image": normalize(resize_image(crop, info), self.mean, self.std),
                "target": torch.tensor(self.label_of[ident], dtype=torch.long),
                "image_id": int(rec.ann_ids[j]), "orig_size": crop.shape[:2], "size": info.size,
                "scale": (info.scale_y, info.scale_x)}
