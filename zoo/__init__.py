"""zoo: a multi-task computer-vision model zoo on timm backbones.

Public API (lean: importing zoo and serving a model needs only torch, torchvision, timm, numpy, pillow and
safetensors)::

    zoo.create_model(spec)            # a ZooModel from a ModelSpec / dict
    zoo.list_models("*det*")          # named checkpoints
    model = zoo.load("test_resnet.shapes_cls")   # a name, a bundle folder/file, a URL or hf-hub:org/name
    zoo.Predictor(model)(["a.jpg"])   # typed results
    zoo.Generator(model)(["a red star"], steps=25, guidance=4.0, seed=0)   # text-to-image (diffusers extra)
"""

from __future__ import annotations

from zoo._lazy import lazy_getattr

__version__ = "0.1.0"

_LAZY = {
    "create_model": ("zoo.models", "create_model"),
    "ModelSpec": ("zoo.models", "ModelSpec"),
    "ZooModel": ("zoo.models", "ZooModel"),
    "load": ("zoo.hub.api", "load"),
    "list_models": ("zoo.hub.registry", "list_models"),
    "Predictor": ("zoo.predictor", "Predictor"),
    "Generator": ("zoo.generation.sampler", "Generator"),
}

__all__ = sorted(_LAZY) + ["__version__"]


__getattr__ = lazy_getattr("zoo", _LAZY, globals())
