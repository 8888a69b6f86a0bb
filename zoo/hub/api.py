"""``zoo.load``: a ready-to-run :class:`~zoo.models.ZooModel` from a registered name, a bundle, a URL or a Lightning
checkpoint; plus the small helpers export and the predictor share (checkpoint unpacking, model metadata, head kinds).

Serving path: imports only torch, the standard library and zoo's lean modules at module level.

    model = zoo.load("test_resnet.shapes_cls")          # registry name (downloaded + sha256-checked)
    model = zoo.load("runs/x/bundle")                 # bundle folder / model.json / model.safetensors
    model = zoo.load("runs/x/checkpoints/best.ckpt")  # Lightning checkpoint, read with weights_only=True
    model.bundle_meta["class_names"]
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from zoo.hub.bundle import (
    META_FILE,
    BundleError,
    check_finite_weights,
    check_spec_bounds,
    read_bundle,
    read_bundle_meta,
    read_lightning_checkpoint,
)
from zoo.hub.registry import resolve
from zoo.models import ModelSpec, ZooModel, create_model

__all__ = [
    "checkpoint_parts",
    "head_kind",
    "load",
    "model_meta",
    "serving_spec",
]

#: Prefixes of the model inside a task's ``state_dict``: the EMA copy first (the task validated with it).
EMA_PREFIX = "ema.module."
MODEL_PREFIX = "model."


def head_kind(model: ZooModel, name: str) -> str:
    """What kind of result head ``name`` produces: the head's own ``result_kind`` (``"classification"``,
    ``"detection"``, ``"instance"``, ``"semantic"`` or ``"embedding"``)."""
    if name not in model.heads:
        raise KeyError(f"model has no head {name!r}; its heads are {list(model.heads)}")
    return model.heads[name].result_kind


def serving_spec(spec: ModelSpec | Mapping[str, Any]) -> dict[str, Any]:
    """A spec dict without the backbone's weight-loading keys (``pretrained``, ``weights``): the bundle holds the
    weights, and a service must never reach for timm's hub or a training machine's file.

    Args:
        spec: a :class:`ModelSpec` or its dict form.

    Returns:
        A complete, deep-copied spec dict.
    """
    # Through the dataclass: unknown keys are an error naming them, and missing optional keys get their defaults.
    d = (spec if isinstance(spec, ModelSpec) else ModelSpec.from_dict(spec)).to_dict()
    bb = dict(d.get("backbone") or {})
    bb.pop("pretrained", None)
    bb.pop("weights", None)
    d["backbone"] = bb
    return d


def model_meta(spec: ModelSpec | Mapping[str, Any], options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The model-describing part of a bundle's ``model.json``: spec, task, classes, preprocessing and
    post-processing defaults (no weights record, metrics or provenance).

    Args:
        spec: the model spec.
        options: the training task's options; only ``options["postprocess"]`` is used.

    Returns:
        ``{"spec", "task", "class_names", "input_size", "resize", "mean", "std", "size_divisor", "postprocess"}``
        plus ``"category_ids"`` when ``spec.extra`` has them.
    """
    s = serving_spec(spec)
    meta: dict[str, Any] = {
        "spec": s,
        "task": s.get("task", "classification"),
        "class_names": copy.deepcopy(s.get("class_names") or {}),
        "input_size": list(s.get("input_size") or []),
        "resize": s.get("resize", "stretch"),
        "mean": list(s.get("mean") or []),
        "std": list(s.get("std") or []),
        "size_divisor": int(s.get("size_divisor", 32)),
        "postprocess": copy.deepcopy(dict((options or {}).get("postprocess") or {})),
    }
    cat = (s.get("extra") or {}).get("category_ids")
    if isinstance(cat, Mapping):
        meta["category_ids"] = {str(h): [int(c) for c in ids] for h, ids in cat.items() if ids is not None}
    elif cat is not None:
        meta["category_ids"] = [int(c) for c in cat]
    return meta


def checkpoint_parts(ckpt: Mapping[str, Any], *, source: str = "checkpoint"
                     ) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, Any], bool]:
    """Split a zoo task's Lightning checkpoint into the model spec and the model's own weights.

    When the task trained with EMA the state dict holds ``ema.module.*`` beside ``model.*``; the EMA weights are
    returned, because those are the ones the task validated (and picked the best checkpoint) with.

    Args:
        ckpt: the dict :func:`~zoo.hub.bundle.read_lightning_checkpoint` returns.
        source: where it came from, for error messages.

    Returns:
        ``(spec dict, state_dict with ZooModel keys, hyper_parameters, used_ema)``.
    """
    hp = ckpt.get("hyper_parameters")
    if not isinstance(hp, Mapping) or not isinstance(hp.get("spec"), Mapping):
        raise BundleError(f"{source} was not written by a zoo task: its hyper_parameters hold no model 'spec' "
                          "(train with zoo's tasks, or build the model with zoo.create_model and save_bundle)")
    sd = ckpt.get("state_dict")
    if not isinstance(sd, Mapping):
        raise BundleError(f"{source} has no 'state_dict'")
    ema = {k[len(EMA_PREFIX):]: v for k, v in sd.items() if k.startswith(EMA_PREFIX)}
    if ema:
        return dict(hp["spec"]), ema, dict(hp), True
    weights = {k[len(MODEL_PREFIX):]: v for k, v in sd.items() if k.startswith(MODEL_PREFIX)}
    if not weights:
        raise BundleError(f"{source}: state_dict has no 'model.*' (or 'ema.module.*') entries; first keys: "
                          f"{list(sd)[:5]}")
    return dict(hp["spec"]), weights, dict(hp), False


def _load_weights(model: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str) -> None:
    """``load_state_dict(strict=True)`` with an error that names the mismatch and what to do."""
    try:
        missing, unexpected = model.load_state_dict(state_dict, strict=False)
    except RuntimeError as e:  # shape mismatches
        raise BundleError(f"{source}: weights do not fit the model its spec builds ({e}). The bundle is inconsistent "
                          "or was written by a different zoo version: re-export it from its checkpoint.") from e
    if missing or unexpected:
        raise BundleError(f"{source}: weights do not match the model its spec builds: {len(missing)} missing "
                          f"(e.g. {list(missing)[:4]}), {len(unexpected)} unexpected (e.g. {list(unexpected)[:4]}). "
                          "Re-export the bundle from its checkpoint with this zoo version.")


def _is_checkpoint(ref: str) -> bool:
    return ref.endswith((".ckpt", ".pth", ".pt")) and Path(ref).expanduser().is_file()


def load(name_or_path: str | os.PathLike[str], *, device: str | torch.device = "cpu", verify: bool = True,
         max_input_side: int | None = None, limits: Mapping[str, int] | None = None,
         allow_nonfinite: bool = False) -> ZooModel:
    """Load a model ready for inference (``eval()`` mode, on ``device``).

    A bundle or checkpoint may come from an untrusted download, so its spec's sizes are bounded
    (:func:`~zoo.hub.bundle.check_spec_bounds`; limits from :data:`~zoo.hub.bundle.DEFAULT_SPEC_LIMITS`, the
    ``ZOO_MAX_INPUT_SIDE`` / ``ZOO_MAX_SIZE_DIVISOR`` / ``ZOO_MAX_HEADS`` / ``ZOO_MAX_HEAD_DIM`` environment
    variables, then the keywords below) and weights holding NaN or inf are refused.

    Args:
        name_or_path: a registered ``arch.tag`` name (:func:`zoo.list_models`), a bundle folder or its
            ``model.json`` / ``model.safetensors``, an ``http(s)://`` / ``file://`` bundle URL, ``hf-hub:org/name``,
            or a Lightning ``.ckpt`` written by a zoo task (read with ``weights_only=True``; EMA weights preferred).
        device: where the model goes (``"cpu"``, ``"cuda"``, ``"cuda:1"``, a ``torch.device``).
        verify: check the weights' sha256 against ``model.json`` and ``model.json`` against the digest in the
            weights' metadata (always done for registered names by resolve()).
        max_input_side: largest allowed side of the spec's ``input_size`` (default 8192, or ``$ZOO_MAX_INPUT_SIDE``).
        limits: other overrides, ``{"max_size_divisor": 1024, "max_heads": 64, "max_head_dim": 1_000_000}``
            (and ``"max_input_side"``), any subset.
        allow_nonfinite: load weights holding NaN/inf instead of raising :class:`~zoo.hub.bundle.BundleError`.

    Returns:
        The :class:`~zoo.models.ZooModel`, with ``model.bundle_meta`` (the ``model.json`` content, or for a
        checkpoint the same model description) and ``model.bundle_path``.
    """
    ref = os.fspath(name_or_path)
    bounds = dict(limits or {})
    if max_input_side is not None:
        bounds["max_input_side"] = max_input_side
    if _is_checkpoint(ref):
        path = Path(ref).expanduser()
        spec, sd, hp, used_ema = checkpoint_parts(read_lightning_checkpoint(path), source=str(path))
        check_spec_bounds(spec, path, bounds)
        if not allow_nonfinite:
            check_finite_weights(sd, path)
        meta = model_meta(spec, hp.get("options"))
        meta["source_checkpoint"] = {"file": path.name, "ema": used_ema}
        source = str(path)
    else:
        folder = resolve(name_or_path)
        head = read_bundle_meta(folder)
        fmt = (head.get("weights") or {}).get("format", "safetensors")
        if fmt != "safetensors":
            raise BundleError(f"{folder} holds a {fmt} export ({head['weights']['file']}), not a zoo bundle: run it "
                              f"with {'onnxruntime' if fmt == 'onnx' else 'torch.jit.load'}, or load the bundle folder "
                              "(model.safetensors + model.json) it was exported from")
        sd, meta = read_bundle(folder, map_location="cpu", verify=verify)
        if not isinstance(meta.get("spec"), Mapping):
            raise BundleError(f"{folder}/model.json has no model 'spec'; it was not written by zoo's export_checkpoint")
        meta_path = folder / META_FILE
        check_spec_bounds(meta["spec"], meta_path, bounds)
        check_spec_bounds(meta, meta_path, bounds, where="model.json")  # its top-level input_size / size_divisor
        if not allow_nonfinite:
            check_finite_weights(sd, folder / meta["weights"]["file"])
        spec = meta["spec"]
        path = folder
        source = str(folder)
    try:
        model = create_model(serving_spec(spec), load_backbone_weights=False)
    except (ValueError, TypeError) as e:
        raise BundleError(f"{source}: cannot build the model from its spec: {e}") from e
    _load_weights(model, sd, source)
    model.eval()
    model.to(device)
    model.bundle_meta = meta
    model.bundle_path = path
    return model
