"""``ZooModel``: one backbone, optional necks, several named heads; and the spec that rebuilds it.

The same object trains (wrapped by a ``zoo.tasks`` LightningModule), evaluates and ships in a bundle. Only torch,
torchvision, timm and numpy are imported here: this module is on the lean serving path.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping

import torch
from torch import nn

from zoo.backbones import TimmBackbone
from zoo.heads.base import check_head_kwargs, head_class, neck_class

__all__ = ["ModelSpec", "ZooModel", "create_model"]


@dataclass
class ModelSpec:
    """Everything that rebuilds a ``ZooModel`` and prepares its input; stored in checkpoints and bundles.

    Attributes:
        backbone: keyword arguments of :class:`TimmBackbone` (``name`` required). Weight-loading keys
            (``pretrained``, ``weights``) are dropped when rebuilding from a checkpoint.
        heads: ``{head_name: {"type": <registered head type>, "input": "backbone" | "images" | <neck name>,
            **head kwargs}}`` (``zoo.heads.list_heads()``); only registered classes can be built, whatever a spec says.
            ``"images"`` gives the head the normalised input batch itself as its one feature map, ``[(B, 3, H, W)]``
            (the autoencoder head: it needs pixels, not backbone features).
        necks: ``{neck_name: {"type": <registered neck type>, **kwargs}}``; a neck reads the backbone levels.
        class_names: ``{head_name: [names...]}`` for heads that predict classes.
        input_size: ``[height, width]`` the model was trained at.
        resize: how images are brought to the input size: ``"stretch"`` (resize to input_size), ``"longest"``
            (longest side to max(input_size), keep aspect ratio, pad to a multiple of ``size_divisor``) or
            ``"letterbox"`` (keep aspect ratio, pad to input_size).
        mean, std: normalisation on 0..1 RGB.
        size_divisor: padding multiple for ``"longest"``.
        task: the main task name (``classification``, ``detection``, ``semantic``, ``instance``, ``similarity``, ``multitask``).
        extra: free-form JSON-able metadata: ``category_ids`` (``{head_name: [ids]}``, or one list for every head
            in specs of single-head models), ...
    """

    backbone: dict[str, Any]
    heads: dict[str, dict[str, Any]]
    necks: dict[str, dict[str, Any]] = field(default_factory=dict)
    class_names: dict[str, list[str]] = field(default_factory=dict)
    input_size: list[int] = field(default_factory=lambda: [224, 224])
    resize: str = "stretch"
    mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])
    size_divisor: int = 32
    task: str = "classification"
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able copy."""
        return copy.deepcopy(asdict(self))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ModelSpec":
        """Rebuild from :meth:`to_dict` output; unknown keys are an error naming them."""
        known = set(cls.__dataclass_fields__)
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"model spec has unknown keys {sorted(unknown)}; known: {sorted(known)}. "
                             "Was it written by a newer zoo?")
        return cls(**copy.deepcopy(dict(d)))


class ZooModel(nn.Module):
    """Backbone -> optional necks -> named heads.

    ``forward(images)`` returns ``{head_name: raw output}`` from one backbone pass; each head's ``loss`` and
    ``postprocess`` turn raw outputs into losses and typed results. Every head gets ``name``, ``class_names`` and
    ``category_ids`` from the spec, so it can describe its own results.
    """

    def __init__(self, spec: ModelSpec, *, load_backbone_weights: bool = True) -> None:
        super().__init__()
        self.spec = spec
        bb_kwargs = dict(spec.backbone)
        if not load_backbone_weights:
            bb_kwargs.pop("pretrained", None)
            bb_kwargs.pop("weights", None)
        self.backbone = TimmBackbone(**bb_kwargs)
        self.necks = nn.ModuleDict()
        shapes = {"backbone": (list(self.backbone.channels), list(self.backbone.strides)), "images": ([3], [1])}
        for name, cfg in spec.necks.items():
            cfg = dict(cfg)
            cls = neck_class(cfg.pop("type"))
            check_head_kwargs(cls, cfg, f"necks.{name}")
            neck = cls(list(self.backbone.channels), list(self.backbone.strides), **cfg)
            self.necks[name] = neck
            shapes[name] = (list(neck.channels), list(neck.strides))
        self.heads = nn.ModuleDict()
        self.head_inputs: dict[str, str] = {}
        for name, cfg in spec.heads.items():
            cfg = dict(cfg)
            typ = cfg.pop("type")
            src = cfg.pop("input", "backbone")
            if src not in shapes:
                raise ValueError(f"head {name!r} reads input {src!r}, which is neither 'backbone', 'images' nor a neck "
                                 f"{sorted(spec.necks)}")
            channels, strides = shapes[src]
            cls = head_class(typ)
            check_head_kwargs(cls, cfg, f"heads.{name}")
            head = cls(channels, strides, **cfg)
            head.name = name
            head.class_names = list(spec.class_names.get(name) or [])
            head.category_ids = _category_ids(spec, name)
            self.heads[name] = head
            self.head_inputs[name] = src

    def features(self, images: torch.Tensor) -> dict[str, list[torch.Tensor]]:
        """Backbone levels and every neck's levels, keyed ``"backbone"`` and by neck name, and the input itself,
        ``"images"`` (``[images]``)."""
        feats = {"backbone": self.backbone(images), "images": [images]}
        for name, neck in self.necks.items():
            feats[name] = neck(feats["backbone"])
        return feats

    def forward(self, images: torch.Tensor, heads: list[str] | None = None) -> dict[str, Any]:
        """Args:
            images: normalised images ``(B, 3, H, W)``.
            heads: run only these heads (default: all).
        Returns: ``{head_name: raw head output}``.
        """
        names = heads if heads is not None else list(self.heads)
        if names and all(self.head_inputs[n] == "images" for n in names):  # no backbone pass for pixel heads only
            return {n: self.heads[n]([images]) for n in names}
        feats = self.features(images)
        return {n: self.heads[n](feats[self.head_inputs[n]]) for n in names}


def _category_ids(spec: ModelSpec, head: str) -> list[int] | None:
    ids = spec.extra.get("category_ids") if isinstance(spec.extra, Mapping) else None
    if isinstance(ids, Mapping):
        ids = ids.get(head)
    return [int(i) for i in ids] if ids else None


def create_model(spec: ModelSpec | Mapping[str, Any], *, load_backbone_weights: bool = True) -> ZooModel:
    """Build a :class:`ZooModel` from a spec or its dict form."""
    if not isinstance(spec, ModelSpec):
        spec = ModelSpec.from_dict(spec)
    return ZooModel(spec, load_backbone_weights=load_backbone_weights)
