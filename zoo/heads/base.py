"""The head contract: one base class, one registration decorator, one registry.

A head is the unit of the zoo. It declares what it needs and what it gives, and implements three calls:

``forward(features) -> raw``
    raw outputs from a list of feature maps (the backbone's levels or a neck's).
``loss(raw, batch) -> {"loss_<term>": scalar}``
    the training losses from a collated batch (:func:`zoo.data.datamodule.collate`); the head picks its own
    targets out of the batch (:meth:`Head.batch_targets`) and returns ``{}`` when the batch carries none for it, so
    a multi-task model trains each head only on the data that feeds it.
``postprocess(raw, infos, **options) -> list of typed results``
    one :mod:`zoo.results` object per image in *original* image pixels, with class names and original dataset
    category ids; ``infos`` are the images' :class:`~zoo.preprocess.ResizeInfo`. Validation, evaluate.py and the
    serving :class:`~zoo.Predictor` all go through it (or through :meth:`Head.predict`, the same predictions in
    input pixels, which evaluation uses where targets live in input pixels).

What a head declares (class attributes), so that the Predictor, export, the hub and the training task ask the
head instead of keeping tables:

=================== ============================================================================================
``result_kind``     what :meth:`postprocess` returns: ``classification``, ``detection``, ``instance``,
                    ``semantic``, ``embedding``, ``generation`` or ``reconstruction`` (chooses the evaluator and the
                    visualisation)
``target_format``   the targets its loss needs from the data (``classification``, ``multilabel``, ``detection``,
                    ``instance``, ``semantic``, ``similarity``); ``accepts`` lists every format it can train on
``default_name``    its key in ``ModelSpec.heads`` when it is a model's only head (``cls``, ``det``, ...)
``neck``            the neck it reads by default (``"fpn"``) or ``None`` for the backbone's levels
``default_input``   ``"images"`` for a head that reads the normalised input pictures themselves (``[(B, 3, H, W)]``)
                    instead of features (the autoencoder); ``None``: the neck or the backbone
``feature_levels``  which of those levels it uses (``"coarsest"``, ``"all"``, ``"strides 4-32"``, ...)
``exportable``      whether :meth:`export_outputs` traces to ONNX / TorchScript
``options``         the post-processing options :meth:`postprocess` takes (score_thresh, top_k, ...)
``training_keys``   config keys that configure training, not the architecture (loss weight, lr multiplier, ...)
=================== ============================================================================================

Adding a head is one file::

    @register_head("my_head")
    class MyHead(Head):
        result_kind = "classification"; target_format = "classification"; default_name = "cls"
        def __init__(self, in_channels, strides, *, num_classes): ...
        def forward(self, features): ...
        def compute_loss(self, raw, targets, image_sizes=None): ...
        def predict(self, raw, image_sizes, **options): ...
        def postprocess(self, raw, infos, **options): ...

plus an import line in ``zoo/heads/__init__.py``; the contract test (tests/test_head_contract.py) then builds,
trains, post-processes, bundles, reloads and exports it without being edited. Only torch is imported here: this
module is on the lean serving path.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import nn

__all__ = [
    "Head", "Neck", "register_head", "register_neck", "head_class", "neck_class", "list_heads", "list_necks",
    "RESULT_KINDS", "TARGET_FORMATS", "COMMON_TRAINING_KEYS", "check_head_kwargs", "describe_heads",
]

#: What a head's ``postprocess`` can return.
RESULT_KINDS = ("classification", "detection", "instance", "semantic", "embedding", "generation", "reconstruction")
#: Target formats the data layer produces (``zoo.data``): one per kind of supervision.
TARGET_FORMATS = ("classification", "multilabel", "detection", "instance", "semantic", "similarity", "captions")
#: Keys every head's config may carry besides its constructor arguments (they configure training, not the model):
#: ``type`` and ``input`` (the spec's), ``weight`` (loss weight), ``lr_mult`` (learning-rate multiplier),
#: ``data`` (a data config for this head's own dataset), ``frozen_epochs`` (epochs before the head trains).
COMMON_TRAINING_KEYS = ("type", "input", "weight", "lr_mult", "data", "frozen_epochs")

_HEADS: dict[str, type["Head"]] = {}
_NECKS: dict[str, type["Neck"]] = {}
# Modules whose import registers the built-in heads and necks (imported on first registry lookup).
_BUILTIN_MODULES = ("zoo.heads",)


class Head(nn.Module):
    """Base class of every head. Subclasses are built ``Head(in_channels, strides, **kwargs)`` from a spec.

    Attributes set by :class:`~zoo.models.ZooModel` after construction: ``name`` (the key in the spec),
    ``class_names`` (this head's class names, possibly empty) and ``category_ids`` (the dataset's original ids
    of the classes, or ``None``).
    """

    type_name: ClassVar[str] = ""
    result_kind: ClassVar[str] = ""
    target_format: ClassVar[str] = ""
    accepts: ClassVar[tuple[str, ...]] = ()
    default_name: ClassVar[str] = "head"
    neck: ClassVar[str | None] = None
    default_input: ClassVar[str | None] = None
    feature_levels: ClassVar[str] = ""
    exportable: ClassVar[bool] = True
    options: ClassVar[tuple[str, ...]] = ()
    training_keys: ClassVar[tuple[str, ...]] = ()

    name: str = ""
    class_names: list[str]
    category_ids: list[int] | None = None

    # ------------------------------------------------------------------ the three calls
    def forward(self, features: list[torch.Tensor]) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    def compute_loss(self, raw: Any, targets: Any, image_sizes: Sequence[tuple[int, int]] | None = None
                     ) -> dict[str, torch.Tensor]:  # pragma: no cover - abstract
        """Losses from this head's targets (already picked out of the batch)."""
        raise NotImplementedError

    def loss(self, raw: Any, batch: Mapping[str, Any], criterion: nn.Module | None = None) -> dict[str, torch.Tensor]:
        """Losses on a collated batch; ``{}`` when the batch carries no targets for this head.

        Args:
            raw: :meth:`forward` output for ``batch["images"]``.
            batch: a collated batch (``targets``, ``target_format``, ``image_sizes``, ...).
            criterion: the loss module the training task built with :meth:`make_criterion` (heads whose loss owns
                trainable state, such as metric-learning proxies); ``None`` for the others.
        """
        targets = self.batch_targets(batch)
        if targets is None:
            return {}
        return self.compute_loss(raw, targets, batch.get("image_sizes"))

    def predict(self, raw: Any, image_sizes: Sequence[tuple[int, int]], **options: Any) -> list[Any]:
        """Predictions per image in *input* pixels (dicts of tensors); what :meth:`postprocess` maps back."""
        raise NotImplementedError(f"{type(self).__name__} does not implement predict()")

    def postprocess(self, raw: Any, infos: Sequence[Any], **options: Any) -> list[Any]:  # pragma: no cover
        """One typed :mod:`zoo.results` object per image, in original pixels (``infos``: ResizeInfo per image)."""
        raise NotImplementedError

    @classmethod
    def describe(cls) -> dict[str, Any]:
        """What the head declares, as a dict (for listings and docs)."""
        return {"type": cls.type_name, "class": f"{cls.__module__}.{cls.__qualname__}", "result_kind": cls.result_kind,
                "target_format": cls.target_format, "accepts": list(cls.accepts), "default_name": cls.default_name,
                "neck": cls.neck, "feature_levels": cls.feature_levels, "exportable": cls.exportable,
                "options": list(cls.options), "training_keys": list(cls.training_keys),
                "summary": (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""}

    # ------------------------------------------------------------------ what the training side asks
    @property
    def data_format(self) -> str:
        """The target format this head instance trains on."""
        return self.target_format

    @classmethod
    def format_for(cls, kwargs: Mapping[str, Any]) -> str:
        """The target format a head built with ``kwargs`` trains on (before it is built)."""
        return cls.target_format

    def batch_targets(self, batch: Mapping[str, Any]) -> Any | None:
        """This head's targets in ``batch``, or ``None`` when the batch does not carry them.

        A batch from a single-format dataset has ``targets`` and ``target_format`` (a string); a batch from a
        dataset serving several heads has ``targets`` ``{format: targets}`` and ``target_format`` a tuple.
        A batch without ``target_format`` (hand-made) is taken as this head's.
        """
        fmt = batch.get("target_format")
        targets = batch.get("targets")
        wanted = (self.data_format, *[f for f in self.accepts if f != self.data_format])
        if fmt is None:
            return targets
        if isinstance(fmt, str):
            return targets if fmt in wanted else None
        if not isinstance(targets, Mapping):
            return None
        for f in wanted:
            if f in targets:
                return targets[f]
        return None

    @classmethod
    def bind_data(cls, kwargs: dict[str, Any], info: Mapping[str, Any]) -> list[str] | None:
        """Complete constructor ``kwargs`` from what the dataset says (``info``: ``class_names``, ...) and return
        the head's class names (``None`` for heads without classes). Default: ``num_classes`` from the classes."""
        names = list(info["class_names"])
        _set_num_classes(cls, kwargs, len(names), names)
        return names

    @classmethod
    def from_model_config(cls, kwargs: dict[str, Any], model_cfg: Mapping[str, Any], data_cfg: Mapping[str, Any]) -> None:
        """Fill head arguments from the model-level shorthand keys of the single-task presets (``model.loss``,
        ``model.postprocess``, ...) where the head's own config does not set them. Default: nothing."""

    def make_criterion(self, options: Mapping[str, Any]) -> nn.Module | None:
        """A loss module with trainable state, owned by the training task (never part of the served model)."""
        return None

    def batch_sampler(self, options: Mapping[str, Any], seed: int):
        """A ``(dataset, batch_size) -> batch sampler`` factory this head's training data needs, or ``None``."""
        return None

    def export_outputs(self, raw: Any) -> torch.Tensor | dict[str, torch.Tensor]:
        """What an ONNX / TorchScript export returns for this head: one tensor (output ``<head>``) or a dict of
        tensors (outputs ``<head>.<key>``, keys sorted). Default: the raw output itself."""
        if not self.exportable:
            raise NotImplementedError(f"{type(self).__name__} is not exportable")
        if isinstance(raw, torch.Tensor):
            return raw
        return {k: v for k, v in raw.items() if isinstance(v, torch.Tensor)}

    def export_description(self) -> dict[str, Any]:
        """What an export's ``model.json`` says about this head's outputs beyond their shapes."""
        return {}


def _set_num_classes(cls: type, kwargs: dict[str, Any], n: int, names: Sequence[str]) -> None:
    """``kwargs["num_classes"] = n``; a different value the user gave is an error, not silently replaced."""
    given = kwargs.get("num_classes")
    if given is not None and int(given) != n:
        raise ValueError(f"{cls.type_name or cls.__name__}: num_classes={given} is set in the head's config, but the "
                         f"data has {n} classes ({list(names)[:6]}{'...' if n > 6 else ''}); remove num_classes (it "
                         "comes from the data) or use data with that many classes")
    kwargs["num_classes"] = n


class Neck(nn.Module):
    """Base class of necks: built ``Neck(in_channels, strides, **kwargs)`` on the backbone's levels; exposes its own
    ``channels`` and ``strides`` and maps the list of backbone maps to a list of its maps."""

    type_name: ClassVar[str] = ""
    channels: list[int]
    strides: list[int]


def _register(table: dict, base: type, what: str, name: str):
    def deco(cls):
        if not (isinstance(cls, type) and issubclass(cls, base)):
            raise TypeError(f"@register_{what}({name!r}) decorates {cls!r}, which is not a zoo {base.__name__} subclass")
        if name in table and table[name] is not cls:
            raise ValueError(f"{what} type {name!r} is registered twice ({table[name].__qualname__} and "
                             f"{cls.__qualname__}): pick another name")
        if what == "head":
            if cls.result_kind not in RESULT_KINDS:
                raise ValueError(f"head {cls.__qualname__}: result_kind {cls.result_kind!r} must be one of {RESULT_KINDS}")
            for f in (cls.target_format, *cls.accepts):
                if f not in TARGET_FORMATS:
                    raise ValueError(f"head {cls.__qualname__}: target format {f!r} must be one of {TARGET_FORMATS}")
        cls.type_name = name
        table[name] = cls
        return cls

    return deco


def register_head(name: str):
    """Class decorator: make a :class:`Head` subclass buildable from a spec as ``heads.<n>.type: <name>``."""
    return _register(_HEADS, Head, "head", name)


def register_neck(name: str):
    """Class decorator: make a :class:`Neck` subclass buildable from a spec as ``necks.<n>.type: <name>``."""
    return _register(_NECKS, Neck, "neck", name)


def _ensure_builtins() -> None:
    for mod in _BUILTIN_MODULES:
        importlib.import_module(mod)


def _lookup(table: dict, what: str, name: str) -> type:
    _ensure_builtins()
    if name in table:
        return table[name]
    # Specs written before the registry named classes by path ("zoo.heads.detection:FCOSHead"): accept a path only
    # when it names a registered class, so a downloaded spec can never make us call anything else.
    path = str(name).replace(":", ".")
    for cls in table.values():
        if path == f"{cls.__module__}.{cls.__qualname__}" or (
                path.startswith("zoo.") and path.rsplit(".", 1)[-1] == cls.__qualname__
                and cls.__module__.startswith(path.rsplit(".", 1)[0])):
            return cls
    raise ValueError(f"unknown {what} type {name!r}: registered {what}s are {sorted(table)} "
                     f"(a new one is a class decorated with @register_{what})")


def head_class(name: str) -> type[Head]:
    """The registered head class for a spec's ``type``."""
    return _lookup(_HEADS, "head", name)


def neck_class(name: str) -> type[Neck]:
    """The registered neck class for a spec's ``type``."""
    return _lookup(_NECKS, "neck", name)


def list_heads() -> list[str]:
    """Every registered head type, sorted."""
    _ensure_builtins()
    return sorted(_HEADS)


def describe_heads() -> list[dict[str, Any]]:
    """:meth:`Head.describe` of every registered head, sorted by type."""
    return [head_class(n).describe() for n in list_heads()]


def list_necks() -> list[str]:
    """Every registered neck type, sorted."""
    _ensure_builtins()
    return sorted(_NECKS)


def check_head_kwargs(cls: type, kwargs: Mapping[str, Any], where: str) -> None:
    """Refuse constructor arguments ``cls`` does not take, naming them, ``where`` they came from and the valid ones
    (a typo in a head's config must not be silently ignored or fail deep inside the constructor)."""
    params = {}
    for klass in cls.__mro__:
        if klass in (Head, Neck, nn.Module, object):
            break
        sig = inspect.signature(klass.__init__)
        params.update({k: p for k, p in sig.parameters.items() if k not in ("self", "in_channels", "strides")})
        if not any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values()):
            break
    named = {k for k, p in params.items() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
    unknown = sorted(set(kwargs) - named)
    if unknown:
        raise ValueError(f"{where}: {cls.type_name or cls.__name__} has no argument(s) {unknown}; its arguments are "
                         f"{sorted(named)}")
