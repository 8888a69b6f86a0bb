"""Folder datasets: ImageFolder-style classification (``root/<split>/<class>/*.jpg``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from zoo.data.coco import load_rgb_reduced
from zoo.preprocess import compute_resize, normalize, resize_image

__all__ = ["ImageFolderDataset", "IMAGE_EXTENSIONS", "list_images"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def list_images(folder: Path) -> list[Path]:
    """Image files directly inside ``folder``, sorted."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


class ImageFolderDataset(Dataset):
    """Single-label classification from ``root/<class name>/<image>`` (one sub-folder per class, sorted names).

    Args:
        root: the split folder.
        class_names: fix the class list (e.g. the training split's for validation); default: the sub-folders.
        input_size, resize, mean, std, augment: as in :class:`zoo.data.coco.CocoDataset`; the augmentation runs on
            the decoded image and its output is resized to ``input_size`` (``data=image_folder``'s default crop
            takes its size from ``model.input_size``, see :func:`zoo.data.transforms.build_augment`).

    :meth:`take` keeps some of the items (a validation split held out of one folder, ``data.val_fraction``).
    """

    def __init__(self, root: str | Path, *, input_size: Sequence[int], resize: str = "stretch",
                 mean: Sequence[float], std: Sequence[float], augment: Callable | None = None,
                 class_names: Sequence[str] | None = None) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder {self.root} does not exist: expected <data.root>/<split>/<class>/*.jpg")
        found = sorted(p.name for p in self.root.iterdir() if p.is_dir())
        self.class_names = list(class_names) if class_names is not None else found
        if not self.class_names:
            raise ValueError(f"{self.root} has no class sub-folders: expected {self.root}/<class name>/<images>")
        unknown = sorted(set(found) - set(self.class_names))
        if unknown:
            raise ValueError(f"{self.root} has class folders {unknown} that the training split does not have")
        self.samples: list[tuple[Path, int]] = []
        for label, name in enumerate(self.class_names):
            d = self.root / name
            if d.is_dir():
                self.samples += [(p, label) for p in list_images(d)]
        if not self.samples:
            raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {self.root}/<class>/")
        self.input_size = tuple(int(s) for s in input_size)
        self.resize, self.mean, self.std, self.augment = resize, list(mean), list(std), augment

    def __len__(self) -> int:
        return len(self.samples)

    def labels(self) -> list[int]:
        return [lab for _, lab in self.samples]

    def take(self, indices: Sequence[int], *, augment: Callable | None = None) -> "ImageFolderDataset":
        """A copy holding only the items at ``indices`` (same classes), with ``augment``."""
        import copy

        out = copy.copy(self)
        out.samples = [self.samples[int(i)] for i in indices]
        out.augment = augment
        return out

    def with_classes(self, names: Sequence[str], *, augment: Callable | None = None) -> "ImageFolderDataset":
        """A copy holding only the items of the classes ``names``, labelled by their position in ``names`` (the
        identities held out of one folder for open-set validation, ``data=identity_folder`` with
        ``data.val_fraction``)."""
        import copy

        new = {n: i for i, n in enumerate(names)}
        missing = sorted(set(new) - set(self.class_names))
        if missing:
            raise ValueError(f"{self.root} has no class folders {missing}")
        out = copy.copy(self)
        out.class_names = list(names)
        out.samples = [(p, new[self.class_names[lab]]) for p, lab in self.samples if self.class_names[lab] in new]
        out.augment = augment
        return out

    #: decode JPEGs at 1/2, 1/4 or 1/8 scale when both sides stay >= this many pixels (None: full size); set by the
    #: data module (``data.fast_decode``)
    decode_min_side: int | None = None

    #: ``data.decode_on=device``: the augmentation plan drawn per sample (:mod:`zoo.data.device_decode`); samples
    #: then carry the file's bytes instead of a decoded image (set by the data module)
    device_plan: Any = None

    def __getitem__(self, i: int) -> dict[str, Any]:
        path, label = self.samples[i]
        if self.device_plan is not None:
            from zoo.data.device_decode import draw_window, encoded_image

            data, (H, W) = encoded_image(path)
            window, flip = draw_window(H, W, self.device_plan)
            info = compute_resize(window[2:], self.input_size, self.resize)
            return {"encoded": data, "window": window, "flip": flip, "target": torch.tensor(label, dtype=torch.long),
                    "image_id": i, "orig_size": (H, W), "size": info.size, "scale": (info.scale_y, info.scale_x)}
        img, r, full = load_rgb_reduced(path, self.decode_min_side)
        return self.make_sample(img, label, i, reduction=r, full_size=full)

    def make_sample(self, img: np.ndarray, label: int, image_id: int, *, reduction: int = 1,
                    full_size: Sequence[int] | None = None) -> dict[str, Any]:
        """The sample of a decoded ``(H, W, 3)`` uint8 image with class index ``label`` (augmented when this dataset
        augments): what :meth:`__getitem__` returns for item ``image_id``; also used by the shard reader.
        ``reduction``: the image was decoded at ``1/reduction`` scale of the file's ``full_size`` ``(H, W)``."""
        r = int(reduction)
        H, W = (int(full_size[0]), int(full_size[1])) if full_size is not None else (img.shape[0] * r, img.shape[1] * r)
        if self.augment is not None:
            img = self.augment(image=img)["image"]
            info = compute_resize(img.shape[:2], self.input_size, self.resize)
        else:  # the reduced image resized straight to the full-size image's input size
            info, r = compute_resize((H, W), self.input_size, self.resize), 1
        return {"image": normalize(resize_image(np.ascontiguousarray(img), info), self.mean, self.std),
                "target": torch.tensor(label, dtype=torch.long), "image_id": image_id, "orig_size": (H, W),
                "size": info.size, "scale": (info.scale_y / r, info.scale_x / r)}
