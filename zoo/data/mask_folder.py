"""Semantic segmentation from a folder of image/mask PNG pairs (VOC- / ADE-style).

Layout: ``<root>/<split>/images/<name>.(jpg|png)`` and ``<root>/<split>/masks/<name>.png``. A mask is an index PNG
(mode ``P``, palette ignored: the index is the class) or a single-channel PNG (``L``/``I``) whose values are class
indices; 255 is ignored. Classes come from ``data.extra.class_names`` (index order) or are counted from the masks.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from zoo.data.coco import BadAnnotationError, load_rgb_reduced
from zoo.data.folders import list_images
from zoo.preprocess import IGNORE_INDEX, compute_resize, normalize, reduced_size, resize_image, resize_mask, subsample_to

__all__ = ["MaskFolderDataset", "read_index_mask"]



def read_index_mask(path: Path) -> np.ndarray:
    """A class-index mask ``(H, W)`` uint8 from an index/palette or single-channel PNG."""
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode in ("P", "L"):
                return np.array(im, dtype=np.uint8)
            if im.mode in ("I", "I;16"):
                arr = np.array(im)
                if arr.max(initial=0) > 255:
                    raise BadAnnotationError(f"mask {path} has class values above 255; at most 255 classes are supported")
                return arr.astype(np.uint8)
            raise BadAnnotationError(f"mask {path} is mode {im.mode}: save masks as index (P) or grayscale (L) PNGs "
                                     "whose pixel values are class indices (255 = ignore)")
    except FileNotFoundError:
        raise FileNotFoundError(f"mask file {path} does not exist (every image needs <split>/masks/<name>.png)") from None
    except OSError as err:
        raise BadAnnotationError(f"mask file {path} is corrupt or not a PNG ({err})") from err


class MaskFolderDataset(Dataset):
    """Image/mask pairs; samples as in :class:`zoo.data.coco.CocoDataset` with a ``(h, w)`` int64 target.

    Args:
        root: the split folder holding ``images/`` and ``masks/``.
        class_names: names in index order; ``None`` counts classes from the masks (``class_0``...).
        input_size, resize, mean, std, augment: the model's preprocessing and the training augmentation.
    """

    def __init__(self, root: str | Path, *, input_size: Sequence[int], resize: str = "stretch",
                 mean: Sequence[float], std: Sequence[float], augment: Callable | None = None,
                 class_names: Sequence[str] | None = None) -> None:
        self.root = Path(root)
        img_dir, mask_dir = self.root / "images", self.root / "masks"
        for d in (img_dir, mask_dir):
            if not d.is_dir():
                raise FileNotFoundError(f"{d} does not exist: data=mask_folder expects <root>/<split>/images and "
                                        "<root>/<split>/masks")
        images = list_images(img_dir)
        if not images:
            raise ValueError(f"no images in {img_dir}")
        self.pairs: list[tuple[Path, Path]] = []
        missing = [p.name for p in images if not (mask_dir / f"{p.stem}.png").is_file()]
        if missing:
            raise FileNotFoundError(f"{len(missing)} images in {img_dir} have no mask in {mask_dir} "
                                    f"(e.g. {missing[:3]}); every image needs masks/<same name>.png")
        self.pairs = [(p, mask_dir / f"{p.stem}.png") for p in images]
        if class_names is None:
            top = max(int(np.max(np.where((m := read_index_mask(mp)) == IGNORE_INDEX, 0, m))) for _, mp in self.pairs)
            class_names = [f"class_{i}" for i in range(top + 1)]
        self.class_names = list(class_names)
        self.input_size = tuple(int(s) for s in input_size)
        self.resize, self.mean, self.std, self.augment = resize, list(mean), list(std), augment

    def __len__(self) -> int:
        return len(self.pairs)

    def take(self, indices: Sequence[int], *, augment: Callable | None = None) -> "MaskFolderDataset":
        """A copy holding only the pairs at ``indices`` (same classes), with ``augment``."""
        import copy

        out = copy.copy(self)
        out.pairs = [self.pairs[int(i)] for i in indices]
        out.augment = augment
        return out

    #: decode JPEGs at 1/2, 1/4 or 1/8 scale when both sides stay >= this many pixels (None: full size); set by the
    #: data module (``data.fast_decode``)
    decode_min_side: int | None = None

    def __getitem__(self, i: int) -> dict[str, Any]:
        img_path, mask_path = self.pairs[i]
        img, r, _ = load_rgb_reduced(img_path, self.decode_min_side)
        return self.make_sample(img, read_index_mask(mask_path), i, img_path=img_path, mask_path=mask_path,
                                reduction=r)

    def make_sample(self, img: np.ndarray, mask: np.ndarray, image_id: int, *, img_path: Any = None,
                    mask_path: Any = None, reduction: int = 1) -> dict[str, Any]:
        """The sample of a decoded image and its class-index mask (augmented when this dataset augments): what
        :meth:`__getitem__` returns for item ``image_id``; also used by the shard reader (``img_path`` /
        ``mask_path`` name the data in error messages). ``reduction``: the image was decoded at ``1/reduction``
        scale; without augmentation it is resized straight to the full-size image's input size, with augmentation
        the mask is sampled down to it first."""
        r = int(reduction)
        if reduced_size(mask.shape, r) != img.shape[:2]:
            raise BadAnnotationError(f"mask {mask_path} is {mask.shape[::-1]} but image {img_path} is "
                                     f"{(img.shape[1] * r, img.shape[0] * r)}: they must have the same size")
        K = len(self.class_names)
        bad = (mask >= K) & (mask != IGNORE_INDEX)
        if bad.any():
            raise BadAnnotationError(f"mask {mask_path} holds class {int(mask[bad].max())} but only {K} classes are "
                                     "configured (data.extra.class_names); use 255 for pixels to ignore")
        H, W = mask.shape
        if self.augment is not None:
            out = self.augment(image=img, mask=subsample_to(mask, r, img.shape[:2]))
            img, mask = out["image"], out["mask"]
            info = compute_resize(img.shape[:2], self.input_size, self.resize)
        else:
            info, r = compute_resize((H, W), self.input_size, self.resize), 1
        target = resize_mask(torch.from_numpy(np.ascontiguousarray(mask)).long(), info.size)
        return {"image": normalize(resize_image(np.ascontiguousarray(img), info), self.mean, self.std),
                "target": target, "image_id": image_id, "orig_size": (H, W), "size": info.size,
                "scale": (info.scale_y / r, info.scale_x / r)}
