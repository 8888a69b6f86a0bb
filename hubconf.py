"""torch.hub entry points for the zoo.

    model = torch.hub.load("<owner>/<repo>", "test_resnet_shapes_cls")          # a registered checkpoint
    model = torch.hub.load("<owner>/<repo>", "load", "path/to/bundle")        # any bundle / name / URL
    model = torch.hub.load("/local/checkout", "load", "hf-hub:org/name", source="local")

One entry per registered name (``zoo.list_models()``), its dots and dashes turned into underscores
(``test_resnet.shapes_cls`` -> ``test_resnet_shapes_cls``). Entries return a :class:`zoo.models.ZooModel` in eval mode
with ``model.bundle_meta`` (classes, preprocessing); ``pretrained=False`` gives the same architecture randomly
initialised. Wrap a model in ``zoo.Predictor`` for typed results.
"""

from __future__ import annotations

import keyword as _keyword
import re as _re
from typing import Any as _Any

dependencies = ["torch", "torchvision", "timm", "safetensors"]


def load(name_or_path: str, **kwargs: _Any):
    """Load any zoo model: registered name, bundle folder/file, URL, ``hf-hub:org/name`` or Lightning checkpoint.

    Args:
        name_or_path: the model reference (see :func:`zoo.load`).
        **kwargs: ``device``, ``verify`` (passed to :func:`zoo.load`).

    Returns:
        The :class:`zoo.models.ZooModel` in eval mode.
    """
    from zoo.hub.api import load as _load

    return _load(name_or_path, **kwargs)


def _entry_name(name: str) -> str:
    """A valid, public Python identifier for a registry name
    (``test_resnet.shapes_cls`` -> ``test_resnet_shapes_cls``)."""
    ident = _re.sub(r"\W", "_", name).strip("_") or "model"
    if ident[0].isdigit():
        ident = f"m_{ident}"
    if _keyword.iskeyword(ident) or ident in ("load", "dependencies"):
        ident = f"{ident}_model"
    return ident


def _make_entry(name: str):
    def entry(pretrained: bool = True, **kwargs: _Any):
        if pretrained:
            return load(name, **kwargs)
        from zoo.hub.api import serving_spec
        from zoo.hub.bundle import read_bundle_meta
        from zoo.hub.registry import resolve
        from zoo.models import create_model

        meta = read_bundle_meta(resolve(name))
        model = create_model(serving_spec(meta["spec"]), load_backbone_weights=False).eval()
        model.bundle_meta = meta
        return model.to(kwargs.get("device", "cpu"))

    entry.__doc__ = (f"The registered zoo model {name!r} (zoo.load({name!r})).\n\n"
                     "Args:\n    pretrained: load its trained weights (False: same architecture, random init).\n"
                     "    **kwargs: device, verify.\n\nReturns:\n    a zoo.models.ZooModel in eval mode.")
    return entry


def _define_entries() -> dict[str, str]:
    from zoo.hub.registry import list_models

    made: dict[str, str] = {}
    for name in list_models():
        ident = _entry_name(name)
        while ident in globals():
            ident = f"{ident}_"
        fn = _make_entry(name)
        fn.__name__ = fn.__qualname__ = ident
        globals()[ident] = fn
        made[ident] = name
    return made


#: entry function name -> registry name
_ENTRIES = _define_entries()
