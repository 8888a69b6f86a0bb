"""Start a new run from trained zoo weights (``init_from=``): fine-tuning, as Ultralytics' ``model=best.pt`` or
detectron2's ``MODEL.WEIGHTS``.

``init_from`` names a bundle folder (or its ``model.json`` / ``model.safetensors``), a zoo Lightning ``.ckpt`` or
a registered name (:func:`zoo.list_models`). The freshly built model of the new run (its heads, classes and data
from the new config) then takes from it:

* the backbone: tensors matched by name and shape; fewer than
  :data:`~zoo.backbones.timm_backbone.MIN_MATCH_FRACTION` of them matched is an error (another architecture);
* each neck whose name and type match, when all its tensors match;
* each head whose name and type match, when every tensor has the same shape and the class names are the same;
  any other head (another class count, other classes, another type, or absent) keeps its fresh initialisation.

Each case is logged with counts and returned as a report. Optimiser state, epoch and schedule are not taken (that is
``ckpt_path=``, resume).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

log = logging.getLogger(__name__)

__all__ = ["InitFromError", "read_init_source", "load_init_weights", "init_task_from"]


class InitFromError(ValueError):
    """``init_from`` cannot be read or does not fit the model of the new run."""


def read_init_source(ref: str | os.PathLike[str]) -> tuple[dict[str, Any], dict[str, torch.Tensor], str]:
    """``(spec dict, ZooModel state dict, description)`` of a bundle, a zoo ``.ckpt`` or a registered name."""
    from zoo.hub.api import checkpoint_parts
    from zoo.hub.bundle import BundleError, read_bundle, read_lightning_checkpoint
    from zoo.hub.registry import UnknownModelError, resolve

    text = os.fspath(ref)
    path = Path(text).expanduser()
    try:
        if path.is_file() and path.suffix in (".ckpt", ".pt", ".pth"):
            spec, sd, _, used_ema = checkpoint_parts(read_lightning_checkpoint(path), source=str(path))
            return spec, sd, f"checkpoint {path}{' (EMA weights)' if used_ema else ''}"
        folder = resolve(text)
        sd, meta = read_bundle(folder, map_location="cpu")
    except (FileNotFoundError, UnknownModelError, BundleError, OSError, ValueError) as err:
        raise InitFromError(f"init_from={text!r}: {err}. Give a bundle folder (<run>/bundle), a zoo checkpoint "
                            "(<run>/checkpoints/best.ckpt) or a registered name (zoo.list_models())") from err
    if not isinstance(meta.get("spec"), Mapping):
        raise InitFromError(f"init_from={text!r}: {folder} has no model spec in its model.json")
    return dict(meta["spec"]), dict(sd), f"bundle {folder}"


def _part(sd: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def _shape_diff(module: nn.Module, part: Mapping[str, torch.Tensor]) -> str | None:
    """``None`` when ``part`` has exactly ``module``'s tensors with the same shapes, else what differs."""
    own = module.state_dict()
    missing = [k for k in own if k not in part]
    extra = [k for k in part if k not in own]
    shapes = [(k, tuple(part[k].shape), tuple(v.shape)) for k, v in own.items()
              if k in part and tuple(part[k].shape) != tuple(v.shape)]
    if not (missing or extra or shapes):
        return None
    bits = []
    if shapes:
        k, a, b = shapes[0]
        bits.append(f"{len(shapes)} tensor(s) of another shape (e.g. {k}: {list(a)} in the source, {list(b)} here)")
    if missing:
        bits.append(f"{len(missing)} tensor(s) missing from the source (e.g. {missing[0]})")
    if extra:
        bits.append(f"{len(extra)} unknown tensor(s) in the source (e.g. {extra[0]})")
    return "; ".join(bits)


def load_init_weights(model: nn.Module, ref: str | os.PathLike[str], *, min_backbone_fraction: float | None = None
                      ) -> dict[str, Any]:
    """Load ``ref``'s weights into ``model`` (a :class:`~zoo.models.ZooModel`) as described in the module docs.

    Returns:
        ``{"source", "backbone": {"loaded", "total"}, "necks": {name: status}, "heads": {name: status}}`` where a
        status is ``"loaded"`` or ``"reinitialised: <why>"``.

    Raises:
        InitFromError: ``ref`` cannot be read, or too few backbone tensors match.
    """
    from zoo.backbones.timm_backbone import MIN_MATCH_FRACTION

    need = MIN_MATCH_FRACTION if min_backbone_fraction is None else float(min_backbone_fraction)
    spec, sd, source = read_init_source(ref)
    report: dict[str, Any] = {"source": source, "necks": {}, "heads": {}}

    src_bb = str((spec.get("backbone") or {}).get("name"))
    own = model.backbone.state_dict()
    part = _part(sd, "backbone.")
    got = {k: v for k, v in part.items() if k in own and tuple(own[k].shape) == tuple(v.shape)}
    if not own or len(got) / len(own) < need:
        raise InitFromError(
            f"init_from={os.fspath(ref)!r}: only {len(got)} of the {len(own)} tensors of this run's backbone "
            f"{model.backbone.name!r} are in {source} (backbone {src_bb!r}; {need:.0%} needed by name and shape). "
            f"Set backbone.name={src_bb} (and the same backbone options) to fine-tune it, or start without init_from.")
    model.backbone.load_state_dict(got, strict=False)
    report["backbone"] = {"loaded": len(got), "total": len(own), "source_name": src_bb}
    log.info("init_from %s: backbone %s: loaded %d of %d tensors%s", source, model.backbone.name, len(got), len(own),
             f" ({len(own) - len(got)} keep their initialisation)" if len(got) < len(own) else "")

    src_necks = dict(spec.get("necks") or {})
    for name, neck in model.necks.items():
        cfg = src_necks.get(name)
        own_type = (model.spec.necks.get(name) or {}).get("type")
        if cfg is None:
            status = f"reinitialised: the source has no neck {name!r} (its necks: {sorted(src_necks)})"
        elif cfg.get("type") != own_type:
            status = f"reinitialised: the source's neck {name!r} is a {cfg.get('type')}, this one a {own_type}"
        else:
            p = _part(sd, f"necks.{name}.")
            diff = _shape_diff(neck, p)
            if diff is None:
                neck.load_state_dict(p)
                status = "loaded"
            else:
                status = f"reinitialised: {diff}"
        report["necks"][name] = status
        log.info("init_from %s: neck %s: %s", source, name, status)

    src_heads = dict(spec.get("heads") or {})
    src_classes = dict(spec.get("class_names") or {})
    for name, head in model.heads.items():
        cfg = src_heads.get(name)
        own_type = model.spec.heads[name]["type"]
        n_params = sum(t.numel() for t in head.state_dict().values())
        if cfg is None:
            status = f"reinitialised: the source has no head {name!r} (its heads: {sorted(src_heads)})"
        elif cfg.get("type") != own_type:
            status = f"reinitialised: the source's head {name!r} is a {cfg.get('type')}, this one a {own_type}"
        else:
            p = _part(sd, f"heads.{name}.")
            diff = _shape_diff(head, p)
            theirs, ours = list(src_classes.get(name) or []), list(model.spec.class_names.get(name) or [])
            if diff is not None:
                if theirs and ours and len(theirs) != len(ours):
                    diff = f"{len(theirs)} classes in the source, {len(ours)} here ({diff})"
                status = f"reinitialised: {diff}"
            elif theirs and ours and theirs != ours:
                status = (f"reinitialised: other classes ({theirs[:4]}{'...' if len(theirs) > 4 else ''} in the "
                          f"source, {ours[:4]}{'...' if len(ours) > 4 else ''} here)")
            else:
                head.load_state_dict(p)
                status = "loaded"
        report["heads"][name] = status
        log.info("init_from %s: head %s (%s, %d values): %s", source, name, own_type, n_params, status)

    for key, label in (("mean", "normalisation mean"), ("std", "normalisation std")):
        theirs, ours = spec.get(key), getattr(model.spec, key, None)
        if theirs is not None and ours is not None and [round(float(x), 6) for x in theirs] != \
                [round(float(x), 6) for x in ours]:
            log.warning("init_from %s: the source was trained with %s %s, this run uses %s (model.%s=%s keeps the "
                        "source's)", source, label, list(theirs), list(ours), key, list(theirs))
    return report


def init_task_from(task: nn.Module, ref: str | os.PathLike[str]) -> dict[str, Any]:
    """:func:`load_init_weights` into a training task's model, and its EMA copy when it keeps one."""
    report = load_init_weights(task.model, ref)
    ema = getattr(task, "ema", None)
    if ema is not None:
        ema.module.load_state_dict(task.model.state_dict())
    return report
