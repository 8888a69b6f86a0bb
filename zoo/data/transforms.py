"""albumentations training pipelines from plain config lists.

A pipeline is a list of ops, each ``{"type": "<albumentations class>", **kwargs}`` (``_target_`` with a full
``albumentations.X`` path is accepted too), e.g. from Hydra::

    augment:
      - {type: HorizontalFlip, p: 0.5}
      - {type: ColorJitter, brightness: 0.2, contrast: 0.2, saturation: 0.2, hue: 0.02, p: 0.8}

An op whose output size is a required argument (``RandomResizedCrop``'s ``size``; ``RandomCrop``, ``CenterCrop``,
``Resize``'s ``height`` and ``width``) and leaves it out gets the model's input size (``model.input_size``), so a
crop follows the model instead of a number written into the data config.

torchvision's policies are ops too: ``{type: TrivialAugmentWide}``, ``RandAugment``, ``AutoAugment``, ``AugMix``
(:class:`TorchvisionPolicy`; image-only, for classification and similarity).

Boxes (pascal_voc xyxy pixels) travel with a ``box_index`` label field, so a box dropped by a crop drops its
label, crowd flag and mask with it; boxes are clipped to the image, and boxes left with less than
``min_visibility`` of their area or ``min_area`` pixels are dropped.
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import albumentations as A  # noqa: E402

__all__ = ["build_augment", "TorchvisionPolicy"]


def _fill_size(cls: type, spec: dict[str, Any], input_size: Sequence[int] | None) -> None:
    """Give ``input_size`` (``[h, w]``) to a required ``size`` / ``height`` + ``width`` argument left out."""
    import inspect

    if input_size is None:
        return
    h, w = (int(input_size[0]), int(input_size[-1]))
    try:
        params = inspect.signature(cls.__init__).parameters
    except (TypeError, ValueError):
        return
    required = {k for k, p in params.items() if p.default is inspect.Parameter.empty}
    if "size" in required and "size" not in spec:
        spec["size"] = (h, w)
    elif {"height", "width"} <= required and "height" not in spec and "width" not in spec:
        spec["height"], spec["width"] = h, w


class TorchvisionPolicy(A.ImageOnlyTransform):
    """torchvision's learned / random augmentation policies as a pipeline op (image only: classification and
    similarity crops; they would move pixels away from boxes and masks): ``TrivialAugmentWide``
    (``num_magnitude_bins``), ``RandAugment`` (``num_ops``, ``magnitude``), ``AutoAugment`` (``policy``: imagenet,
    cifar10, svhn), ``AugMix`` (``severity``, ``mixture_width``). Keyword arguments go to the torchvision class;
    randomness comes from torch's generator, which the data loader seeds per worker."""

    POLICIES = ("TrivialAugmentWide", "RandAugment", "AutoAugment", "AugMix")

    def __init__(self, name: str, p: float = 1.0, **kwargs: Any) -> None:
        super().__init__(p=p)
        from torchvision.transforms import v2

        if name == "AutoAugment" and isinstance(kwargs.get("policy"), str):
            kwargs["policy"] = v2.AutoAugmentPolicy(kwargs["policy"].lower())
        self.name = name
        self.op = getattr(v2, name)(**kwargs)

    def apply(self, img, **params):  # (H, W, 3) uint8 -> same
        import numpy as np
        import torch

        t = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1)
        return np.ascontiguousarray(self.op(t).permute(1, 2, 0).numpy())

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("name",)


def _build_op(spec: Mapping[str, Any], input_size: Sequence[int] | None = None) -> A.BasicTransform:
    spec = dict(spec)
    name = spec.pop("type", None) or spec.pop("_target_", None)
    if not name:
        raise ValueError(f"augmentation op {spec} needs a 'type' (an albumentations class name, e.g. HorizontalFlip)")
    name = str(name).removeprefix("albumentations.").removeprefix("A.")
    if name in TorchvisionPolicy.POLICIES:
        try:
            return TorchvisionPolicy(name, **spec)
        except TypeError as err:
            raise ValueError(f"augmentation {name}: bad arguments {spec}: {err}") from err
    cls = getattr(A, name, None)
    if cls is None:
        raise ValueError(f"augmentation type {name!r} is not an albumentations transform (see albumentations docs)")
    if "transforms" in spec:  # OneOf / SomeOf / Sequential
        spec["transforms"] = [_build_op(t, input_size) for t in spec["transforms"]]
    _fill_size(cls, spec, input_size)
    try:
        return cls(**spec)
    except TypeError as err:
        raise ValueError(f"augmentation {name}: bad arguments {spec}: {err}") from err


def build_augment(ops: Sequence[Mapping[str, Any]] | None, *, boxes: bool = False, min_visibility: float = 0.3,
                  min_area: float = 4.0, seed: int | None = None,
                  input_size: Sequence[int] | None = None) -> A.Compose | None:
    """Compose the ops; ``None`` or an empty list gives ``None`` (no augmentation).

    Args:
        ops: op configs (see module docs).
        boxes: add box handling (pascal_voc, clipped, filtered by ``min_visibility``/``min_area``).
        seed: seed albumentations' RNG (per worker seeding is done by the data loader).
        input_size: ``[h, w]`` given to ops that need an output size and leave it out (see module docs).
    """
    if not ops:
        return None
    kwargs: dict[str, Any] = {}
    if boxes:
        kwargs["bbox_params"] = A.BboxParams(format="pascal_voc", label_fields=["box_index"], clip=True,
                                             min_visibility=min_visibility, min_area=min_area)
    if seed is not None:
        kwargs["seed"] = seed
    return A.Compose([_build_op(o, input_size) for o in ops], **kwargs)
