"""``ZooModel``: one backbone, optional necks, several named heads; and the spec that rebuilds it.

The same object trains (wrapped by a ``zoo.tasks`` LightningModule), evaluates and ships in a bundle. Only torch,
torchvision, timm and numpy are imported here: this module is on the lean serving path.
"""

from __future__ import annotations

import copy
import importlib
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping

import torch
from torch import nn

from zoo.backbones import TimmBackbone

__all__ = ["ModelSpec", "ZooModel", "create_model", "HEAD_TYPES", "NECK_TYPES", "resolve_type"]

#: Short names for head classes usable in a spec's ``heads.<name>.type``.
HEAD_TYPES: dict[str, str] = {
    "classification": "zoo.heads.classification:ClassificationHead",
    "embedding": "zoo.heads.embedding:EmbeddingHead",
    "fcos": "zoo.heads.detection:FCOSHead",
    "retinanet": "zoo.heads.detection:RetinaNetHead",
    "faster_rcnn": "zoo.heads.detection:FasterRCNNHead",
    "semantic_fpn": "zoo.heads.segmentation:SemanticFPNHead",
    "upernet": "zoo.heads.segmentation:UPerNetHead",
    "deeplabv3plus": "zoo.heads.segmentation:DeepLabV3PlusHead",
    "mask_rcnn": "zoo.heads.instance:MaskRCNNHead",
}
#: Short names for necks usable in a spec's ``necks.<name>.type``.
NECK_TYPES: dict[str, str] = {
    "fpn": "zoo.backbones.fpn:FPN",
}


def resolve_type(name: str, table: Mapping[str, str]) -> type:
    """Resolve a short name from ``table`` or a ``zoo.`` dotted path (``zoo.heads.x:Cls`` or ``zoo.heads.x.Cls``)
    to a class. Only classes inside the ``zoo`` package are allowed: a spec read from a downloaded bundle can never
    make us import arbitrary code."""
    target = table.get(name, name)
    if ":" in target:
        mod_name, _, attr = target.partition(":")
    else:
        mod_name, _, attr = target.rpartition(".")
    if not (mod_name == "zoo" or mod_name.startswith("zoo.")) or not attr:
        raise ValueError(f"unknown type {name!r}: use one of {sorted(table)} or a class path inside the zoo package")
    try:
        module = importlib.import_module(mod_name)
        return getattr(module, attr)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"cannot import {target!r} for type {name!r}: {err}") from err


@dataclass
class ModelSpec:
    """Everything that rebuilds a ``ZooModel`` and prepares its input; stored in checkpoints and bundles.

    Attributes:
        backbone: keyword arguments of :class:`TimmBackbone` (``name`` required). Weight-loading keys
            (``pretrained``, ``weights``) are dropped when rebuilding from a checkpoint.
        heads: ``{head_name: {"type": <HEAD_TYPES key>, "input": "backbone" | <neck name>, **head kwargs}}``.
        necks: ``{neck_name: {"type": <NECK_TYPES key>, **kwargs}}``; a neck reads the backbone levels.
        class_names: ``{head_name: [names...]}`` for heads that predict classes.
        input_size: ``[height, width]`` the model was trained at.
        resize: how images are brought to the input size: ``"stretch"`` (resize to input_size), ``"longest"``
            (longest side to max(input_size), keep aspect ratio, pad to a multiple of ``size_divisor``) or
            ``"letterbox"`` (keep aspect ratio, pad to input_size).
        mean, std: normalisation on 0..1 RGB.
        size_divisor: padding multiple for ``"longest"``.
        task: the main task name (``classification``, ``detection``, ``semantic``, ``instance``, ``similarity``, ``multitask``).
        extra: free-form JSON-able metadata (category ids, post-processing defaults, ...).
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

    ``forward(images)`` returns ``{head_name: raw output}``; each head's ``loss`` and ``postprocess`` turn raw
    outputs into losses and typed results.
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
        shapes = {"backbone": (list(self.backbone.channels), list(self.backbone.strides))}
        for name, cfg in spec.necks.items():
            cfg = dict(cfg)
            cls = resolve_type(cfg.pop("type"), NECK_TYPES)
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
                raise ValueError(f"head {name!r} reads input {src!r}, which is neither 'backbone' nor a neck {sorted(spec.necks)}")
            channels, strides = shapes[src]
            self.heads[name] = resolve_type(typ, HEAD_TYPES)(channels, strides, **cfg)
            self.head_inputs[name] = src

    def features(self, images: torch.Tensor) -> dict[str, list[torch.Tensor]]:
        """Backbone levels and every neck's levels, keyed ``"backbone"`` and by neck name."""
        feats = {"backbone": self.backbone(images)}
        for name, neck in self.necks.items():
            feats[name] = neck(feats["backbone"])
        return feats

    def forward(self, images: torch.Tensor, heads: list[str] | None = None) -> dict[str, Any]:
        """Args:
            images: normalised images ``(B, 3, H, W)``.
            heads: run only these heads (default: all).
        Returns: ``{head_name: raw head output}``.
        """
        feats = self.features(images)
        names = heads if heads is not None else list(self.heads)
        return {n: self.heads[n](feats[self.head_inputs[n]]) for n in names}


def create_model(spec: ModelSpec | Mapping[str, Any], *, load_backbone_weights: bool = True) -> ZooModel:
    """Build a :class:`ZooModel` from a spec or its dict form."""
    if not isinstance(spec, ModelSpec):
        spec = ModelSpec.from_dict(spec)
    return ZooModel(spec, load_backbone_weights=load_backbone_weights)
