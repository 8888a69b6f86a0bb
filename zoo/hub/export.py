"""Export: a training checkpoint to a serving bundle, and a model to ONNX or TorchScript.

    export_checkpoint("runs/x/checkpoints/best.ckpt", "runs/x/bundle", metrics={"val/top1": 0.91})
    export_onnx("runs/x/bundle", "runs/x/onnx/model.onnx")     # + runs/x/onnx/model.json
    export_onnx("runs/x/bundle", "runs/x/onnx_nms", postprocess=True)  # detectors: boxes/scores/labels in the graph
    zoo-export runs/x/checkpoints/best.ckpt runs/x/bundle --onnx --torchscript [--onnx-nms]

The bundle's ``model.json`` describes the model completely: ``spec`` (rebuilds the architecture; the backbone's
``pretrained``/``weights`` keys dropped), ``task``, ``class_names``, ``input_size``, ``resize``, ``mean``, ``std``,
``size_divisor``, ``postprocess`` defaults, ``category_ids`` (original dataset ids, when known), ``metrics`` with
``metrics_dataset`` (what they were measured on), ``source_checkpoint`` and ``provenance`` (resolved training config,
git commit, UTC date, zoo/torch/timm versions). When the task trained with EMA, the EMA weights are exported.

ONNX and TorchScript exports go into their own folder with a ``model.json`` that is the bundle's metadata plus the
export's inputs/outputs, and whose ``weights`` record names the exported file (sha256 checked like a bundle's).

Only torch, timm and zoo's lean modules are imported at module level; ``onnx``/``yaml``/``omegaconf`` on demand.
"""

from __future__ import annotations

import argparse
import copy
import datetime as _dt
import json
import math
import os
import subprocess
import sys
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from zoo.hub.api import checkpoint_parts, load, model_meta
from zoo.hub.bundle import FORMAT_VERSION, META_FILE, WEIGHTS_FILE, BundleError, read_lightning_checkpoint, save_bundle, sha256_file
from zoo.models import ZooModel, create_model

__all__ = ["ExportError", "export_checkpoint", "export_onnx", "export_torchscript", "provenance", "main"]

ONNX_FILE = "model.onnx"
TORCHSCRIPT_FILE = "model.torchscript.pt"


class ExportError(ValueError):
    """A model or checkpoint that cannot be exported the requested way; the message says why and what works."""


# ---------------------------------------------------------------------------------------------------- helpers
def _jsonable(obj: Any) -> Any:
    """A JSON-serialisable copy of ``obj`` (OmegaConf containers resolved, tuples -> lists, paths/other -> str)."""
    if type(obj).__module__.startswith("omegaconf"):
        from omegaconf import OmegaConf

        obj = OmegaConf.to_container(obj, resolve=True)
    if obj is None or isinstance(obj, (str, bool, int)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else str(obj)
    if isinstance(obj, torch.Tensor) and obj.numel() == 1:
        return _jsonable(obj.item())
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if hasattr(obj, "item") and callable(obj.item):  # numpy scalars
        try:
            return _jsonable(obj.item())
        except (TypeError, ValueError):
            pass
    return str(obj)


def _git(args: list[str], cwd: Path) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def provenance(config: Any = None) -> dict[str, Any]:
    """Where a bundle comes from.

    Args:
        config: the resolved training config (dict or OmegaConf), stored JSON-able.

    Returns:
        ``{"config", "git_commit" (None outside a git checkout), "git_dirty", "date" (UTC ISO 8601), "zoo_version",
        "torch_version", "timm_version"}``.
    """
    import timm

    import zoo

    repo = Path(zoo.__file__).resolve().parents[1]
    commit = _git(["rev-parse", "HEAD"], repo)
    dirty = None
    if commit:
        status = _git(["status", "--porcelain", "--untracked-files=no"], repo)
        dirty = bool(status) if status is not None else None
    return {
        "config": _jsonable(config) if config is not None else None,
        "git_commit": commit or None,
        "git_dirty": dirty,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "zoo_version": zoo.__version__,
        "torch_version": torch.__version__,
        "timm_version": timm.__version__,
    }


def _run_folder_config(ckpt_path: Path) -> Any:
    """``<run>/config.yaml`` beside ``<run>/checkpoints/<x>.ckpt`` (written by ``zoo.training.train``), or None."""
    cfg = ckpt_path.parent.parent / "config.yaml"
    if not cfg.is_file():
        return None
    try:
        import yaml
    except ImportError:
        return None
    try:
        return yaml.safe_load(cfg.read_text(encoding="utf-8"))
    except yaml.YAMLError:
        return None


def _run_folder_metrics(ckpt_path: Path) -> dict[str, Any] | None:
    """Metrics of this very checkpoint from ``<run>/metrics.json``, or None."""
    path = ckpt_path.parent.parent / "metrics.json"
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if Path(data.get("checkpoint", "")).resolve() != ckpt_path.resolve():
            return None
        return dict(data.get("metrics") or {})
    except (json.JSONDecodeError, OSError, TypeError, AttributeError):
        return None


def _dataset_record(dataset: Any, config: Any, hp: Mapping[str, Any]) -> Any:
    """What the metrics were measured on: the given ``dataset``, else the config's validation data, else the
    checkpoint's ``data_info``."""
    if dataset is not None:
        return _jsonable(dataset)
    data = config.get("data") if isinstance(config, Mapping) else None
    info = hp.get("data_info") if isinstance(hp.get("data_info"), Mapping) else {}
    if isinstance(data, Mapping):
        rec: dict[str, Any] = {"kind": data.get("kind"), "root": data.get("root"),
                               "split": data.get("val_split") or data.get("train_split")}
        for key in ("val_ann", "limit_val_images"):
            if data.get(key) is not None:
                rec[key] = data[key]
        if data.get("kind") == "shapes" and isinstance(data.get("shapes"), Mapping):
            rec["shapes"] = dict(data["shapes"])
    elif info.get("kind") or info.get("root"):
        rec = {"kind": info.get("kind"), "root": info.get("root")}
    else:
        return None
    if info.get("val_ann_file"):
        rec["annotations"] = info["val_ann_file"]
    return _jsonable(rec)


def _metric_values(metrics: Mapping[str, Any] | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in (metrics or {}).items():
        v = _jsonable(v)
        out[str(k)] = float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v
    return out


# ---------------------------------------------------------------------------------------------------- bundle
def export_checkpoint(ckpt_path: str | os.PathLike[str], out_dir: str | os.PathLike[str], *,
                      metrics: Mapping[str, Any] | None = None, dataset: Any = None, config: Any = None) -> Path:
    """Write a serving bundle (``model.safetensors`` + ``model.json``) from a zoo task's Lightning checkpoint.

    The checkpoint is read with ``weights_only=True``; the model is rebuilt from its stored spec and the weights
    loaded strictly before anything is written, so a bundle always loads.

    Args:
        ckpt_path: a ``.ckpt`` written by a ``zoo.tasks`` LightningModule (or ``{"state_dict", "hyper_parameters"}``
            saved with ``torch.save``).
        out_dir: the bundle folder (created; existing bundle files replaced).
        metrics: validation metrics of these weights (``{"val/top1": 0.91}``); default: ``<run>/metrics.json`` when it
            names this checkpoint.
        dataset: what the metrics were measured on (str or dict); default: the config's validation data.
        config: the resolved training config (dict or OmegaConf); default: ``<run>/config.yaml`` if present.

    Returns:
        The bundle folder.
    """
    ckpt_path = Path(ckpt_path).expanduser()
    ckpt = read_lightning_checkpoint(ckpt_path)
    spec, state_dict, hp, used_ema = checkpoint_parts(ckpt, source=str(ckpt_path))
    model = create_model(model_meta(spec)["spec"], load_backbone_weights=False)
    try:
        missing, unexpected = model.load_state_dict(state_dict, strict=False)
    except RuntimeError as e:
        raise ExportError(f"{ckpt_path}: its weights do not fit the model its spec builds: {e}") from e
    if missing or unexpected:
        raise ExportError(f"{ckpt_path}: its weights do not match the model its spec builds ({len(missing)} missing, "
                          f"e.g. {missing[:4]}; {len(unexpected)} unexpected, e.g. {unexpected[:4]})")
    if config is None:
        config = _run_folder_config(ckpt_path)
    if metrics is None:
        metrics = _run_folder_metrics(ckpt_path)
    config = _jsonable(config) if config is not None else None
    meta = model_meta(spec, hp.get("options"))
    meta["metrics"] = _metric_values(metrics)
    meta["metrics_dataset"] = _dataset_record(dataset, config, hp) if metrics else _jsonable(dataset)
    meta["source_checkpoint"] = {"file": ckpt_path.name, "epoch": _jsonable(ckpt.get("epoch")),
                                 "global_step": _jsonable(ckpt.get("global_step")), "ema": used_ema}
    meta["provenance"] = provenance(config)
    return save_bundle(out_dir, model.state_dict(), meta)


# ---------------------------------------------------------------------------------------------------- ONNX / TorchScript
class _ExportWrapper(nn.Module):
    """The model's raw forward as a flat tuple of tensors (ONNX/TorchScript want tensors, not dicts).

    Embedding heads output their post-processed (L2-normalised) embeddings: that is what a service compares.
    """

    def __init__(self, model: ZooModel, heads: list[str], kinds: dict[str, str], keys: dict[str, list[str] | None],
                 post: Mapping[str, Mapping[str, Any]] | None = None) -> None:
        super().__init__()
        self.model = model
        self.heads = heads
        self.kinds = kinds
        self.keys = keys
        self.post = {n: dict(o) for n, o in (post or {}).items()}

    def forward(self, images: torch.Tensor, image_sizes: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        raw = self.model(images, heads=self.heads)
        outs: list[torch.Tensor] = []
        for name in self.heads:
            r = _head_outputs(self.model, name, raw[name], image_sizes, self.post)
            keys = self.keys[name]
            if keys is None:
                outs.append(r)
            else:
                outs.extend(r[k] for k in keys)
        return tuple(outs)


def _head_outputs(model: ZooModel, name: str, raw: Any, image_sizes: torch.Tensor | None,
                  post: Mapping[str, Mapping[str, Any]]) -> torch.Tensor | dict[str, torch.Tensor]:
    """What the export returns for one head: its final detections when it is post-processed in the graph
    (``post`` names it), else :meth:`~zoo.heads.base.Head.export_outputs`."""
    head = model.heads[name]
    if name in post:
        return head.export_detections(raw, image_sizes, **post[name])
    return head.export_outputs(raw)


def _postprocess_options(model: ZooModel, options: Mapping[str, Any] | None) -> dict[str, dict[str, Any]]:
    """Per detection head that can post-process in the graph: the bundle's post-processing defaults (what
    evaluation and the Predictor use) with ``options`` over them."""
    from zoo.heads.detection.postprocess import DETECTION_OPTIONS

    meta = getattr(model, "bundle_meta", None) or {}
    defaults = dict(meta.get("postprocess") or {}) if isinstance(meta, Mapping) else {}
    given = dict(options or {})
    unknown = sorted(set(given) - set(DETECTION_OPTIONS))
    if unknown:
        raise ExportError(f"postprocess_options {unknown} unknown; detection post-processing takes {list(DETECTION_OPTIONS)}")
    out = {}
    for n, head in model.heads.items():
        if head.result_kind == "detection" and getattr(head, "exports_postprocessing", False):
            opts = {k: v for k, v in defaults.items() if k in DETECTION_OPTIONS and v is not None}
            opts.update({k: v for k, v in given.items() if v is not None})
            out[n] = opts
    if not out:
        raise ExportError("postprocess=True puts decoding and NMS of one-stage detection heads (fcos, retinanet) into "
                          f"the graph; this model has none (heads: "
                          f"{ {n: type(h).__name__ for n, h in model.heads.items()} })")
    return out


def _as_model(model_or_bundle: ZooModel | str | os.PathLike[str]) -> ZooModel:
    if isinstance(model_or_bundle, ZooModel):
        return model_or_bundle
    if isinstance(model_or_bundle, nn.Module):
        raise TypeError(f"export needs a zoo.models.ZooModel or a bundle reference, got {type(model_or_bundle).__name__}")
    return load(model_or_bundle)


def _example_size(model: ZooModel) -> tuple[int, int]:
    """The padded input size evaluation feeds: input_size (stretch/letterbox) or a square of its longest side
    (longest), rounded up to a multiple of size_divisor."""
    s = model.spec
    h, w = int(s.input_size[0]), int(s.input_size[1])
    if s.resize == "longest":
        h = w = max(h, w)
    d = max(1, int(s.size_divisor))
    return (h + d - 1) // d * d, (w + d - 1) // d * d


def _plan(model: ZooModel, size: tuple[int, int], purpose: str, dynamic_size: bool,
          post: Mapping[str, Mapping[str, Any]] | None = None
          ) -> tuple[_ExportWrapper, list[dict[str, Any]], torch.Tensor]:
    """Wrapper, output descriptions (name, head, kind, shape with 'batch' where it follows the input batch, and
    ``axes`` naming every axis where the kind says what they are) and an example input of batch 2. ``post``: the
    detection heads post-processed in the graph, with their options."""
    post = dict(post or {})
    heads = list(model.heads)
    kinds = {n: model.heads[n].result_kind for n in heads}
    for n in heads:
        if not model.heads[n].exportable:
            raise ExportError(
                f"head {n!r} ({type(model.heads[n]).__name__}) is not exportable (a two-stage head): its inference selects proposals "
                "with data-dependent NMS and per-image RoI lists, which this exporter does not "
                f"support for {purpose}. Serve it with zoo.Predictor (PyTorch), or train a one-stage detector "
                "(model.head=fcos or retinanet), whose raw outputs export.")
        if dynamic_size and kinds[n] in ("detection", "instance"):
            raise ExportError(f"head {n!r} is a detector whose raw outputs include the anchor points of the traced input "
                              "size: export it with dynamic_size=False and feed images padded to that size")
    was_training = model.training
    model.eval()
    keys: dict[str, list[str] | None] = {}
    shapes: dict[str, list[list[int]]] = {}
    with torch.no_grad():
        runs = []
        for b in (2, 3):  # two batch sizes: the axes that follow them are the batch axes (GroupNorm refuses 1x1 at B=1)
            x = torch.zeros(b, 3, *size, device=next(model.parameters()).device)
            raw = model(x)
            runs.append((raw, torch.tensor([list(size)] * b, dtype=torch.float32, device=x.device)))
        for n in heads:
            outs = []
            for raw, sizes in runs:
                r = _head_outputs(model, n, raw[n], sizes, post)
                if isinstance(r, torch.Tensor):
                    keys[n] = None
                    outs.append([list(r.shape)])
                elif isinstance(r, Mapping) and r and all(isinstance(v, torch.Tensor) for v in r.values()):
                    keys[n] = sorted(r)
                    outs.append([list(r[k].shape) for k in keys[n]])
                else:
                    raise ExportError(f"head {n!r} returns {type(r).__name__} (not a tensor or a dict of tensors); it "
                                      f"cannot be exported to {purpose}")
            shapes[n] = [[("batch" if a != b2 else a) for a, b2 in zip(s1, s2)] for s1, s2 in zip(*outs)]
    model.train(was_training)
    outputs = []
    for n in heads:
        names = [n] if keys[n] is None else [f"{n}.{k}" for k in keys[n]]
        for out_name, key, shape in zip(names, keys[n] or [None], shapes[n]):
            o = {"name": out_name, "head": n, "kind": kinds[n], "shape": shape}
            axes = _axis_names(kinds[n], key, n in post, len(shape))
            if axes:
                o["axes"] = axes
            outputs.append(o)
    wrapper = _ExportWrapper(model, heads, kinds, keys, post).eval()
    example = torch.zeros(2, 3, *size, device=next(model.parameters()).device)
    return wrapper, outputs, example


#: What the axes of an output mean, by (result kind, output key, post-processed in the graph).
_AXES: dict[tuple[str, str | None, bool], list[str]] = {
    ("semantic", "logits", False): ["batch", "classes", "height", "width"],
    ("detection", "boxes", True): ["batch", "detections", "xyxy"],
    ("detection", "scores", True): ["batch", "detections"],
    ("detection", "labels", True): ["batch", "detections"],
    ("detection", "num_detections", True): ["batch"],
}


def _axis_names(kind: str, key: str | None, post: bool, ndim: int) -> list[str] | None:
    axes = _AXES.get((kind, key, post))
    return list(axes) if axes is not None and len(axes) == ndim else None


def _label_graph_axes(path: Path, outputs: list[dict[str, Any]], axes: Mapping[str, Mapping[int, str]]) -> None:
    """Write each output's dimensions into the ONNX graph as they are: the dynamic ones under their names
    (``batch``, ``out_height``, ...), the others as their fixed sizes. The exporter's shape inference otherwise
    leaves names of its own there, e.g. ``batch`` on the height axis of an upsampled semantic map."""
    try:
        import onnx
    except ImportError:
        return
    if path.stat().st_size > 1 << 30:  # large graphs: leave them as the exporter wrote them (protobuf size limit)
        return
    proto = onnx.load(str(path))
    described = {o["name"]: o for o in outputs}
    changed = False
    for out in proto.graph.output:
        o = described.get(out.name)
        if o is None or not out.type.HasField("tensor_type"):
            continue
        dims = out.type.tensor_type.shape.dim
        if len(dims) != len(o["shape"]):
            continue
        dyn = axes.get(out.name, {})
        for i, (d, a) in enumerate(zip(dims, o["shape"])):
            if i in dyn:
                d.dim_param = str(dyn[i])
            elif isinstance(a, int):
                d.dim_value = int(a)
            else:
                continue
            changed = True
    if changed:
        onnx.save(proto, str(path))


def _export_target(path: str | os.PathLike[str], default_name: str, suffixes: tuple[str, ...]) -> Path:
    p = Path(path).expanduser()
    if p.suffix not in suffixes:
        p = p / default_name
    p.parent.mkdir(parents=True, exist_ok=True)
    if (p.parent / WEIGHTS_FILE).exists():
        raise ExportError(f"{p.parent} holds a bundle ({WEIGHTS_FILE}); writing an export there would replace the "
                          f"bundle's {META_FILE}. Choose another folder, e.g. {p.parent / 'onnx'}")
    return p


def _write_export_meta(model: ZooModel, file: Path, fmt: str, details: dict[str, Any]) -> Path:
    """``model.json`` beside an exported file: the bundle's metadata, the export details, and a ``weights`` record
    naming the exported file (so read_bundle_meta / verify_file check it like a bundle)."""
    base = getattr(model, "bundle_meta", None)
    meta = copy.deepcopy(dict(base)) if isinstance(base, Mapping) else model_meta(model.spec)
    meta.pop("weights", None)
    meta[fmt] = details
    meta["format_version"] = FORMAT_VERSION
    meta["weights"] = {"file": file.name, "sha256": sha256_file(file), "bytes": file.stat().st_size, "format": fmt}
    out = file.parent / META_FILE
    tmp = out.with_name(f".{META_FILE}.tmp")
    tmp.write_text(json.dumps(_jsonable(meta), sort_keys=True, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, out)
    return out


def _input_description(model: ZooModel, size: tuple[int, int], dynamic_batch: bool, dynamic_size: bool) -> dict[str, Any]:
    s = model.spec
    return {"name": "images", "dtype": "float32",
            "shape": ["batch" if dynamic_batch else 2, 3, "height" if dynamic_size else size[0],
                      "width" if dynamic_size else size[1]],
            "preprocessing": (f"RGB, x / 255, resized with resize={s.resize!r} to input_size={list(s.input_size)} "
                              f"(antialiased bilinear), normalised (x - mean) / std with mean={list(s.mean)} "
                              f"std={list(s.std)}, padded bottom/right with 0 to a multiple of {s.size_divisor}"
                              + ("" if dynamic_size else f" and to exactly {size[0]}x{size[1]}"))}


def export_onnx(model_or_bundle: ZooModel | str | os.PathLike[str], path: str | os.PathLike[str], *, opset: int = 17,
                dynamic_batch: bool = True, dynamic_size: bool = False, postprocess: bool = False,
                postprocess_options: Mapping[str, Any] | None = None) -> Path:
    """Export a model's raw forward to ONNX, with its ``model.json`` beside it.

    Outputs, one per head (dict outputs flattened to ``<head>.<key>``): classification ``<head>`` logits ``(B, K)``;
    embedding ``<head>`` L2-normalised embeddings ``(B, D)``; semantic ``<head>.logits`` ``(B, K, H/s, W/s)``
    (axes ``batch, classes, height, width``); one-stage detection (FCOS, RetinaNet) the raw outputs (class logits,
    box regression, anchors/points) for the traced size. Autoencoder (``vae``) ``<head>`` the reconstruction
    ``(B, 3, H, W)`` in ``[-1, 1]``. Faster/Mask R-CNN heads (and the diffusion head, whose sampler loop is Python: see
    :mod:`zoo.generation.export`) raise :class:`ExportError`.

    With ``postprocess=True`` one-stage detection heads end in their final detections instead, decoding and
    per-class NMS (ONNX ``NonMaxSuppression``, opset >= 11) inside the graph: ``<head>.boxes`` ``(B, M, 4)`` xyxy in
    input pixels, ``<head>.scores`` ``(B, M)`` descending, ``<head>.labels`` ``(B, M)`` int64 contiguous class ids
    and ``<head>.num_detections`` ``(B,)``; rows past ``num_detections`` are padding (0, 0, -1), ``M`` is
    ``max_detections`` (fewer only when the head has fewer candidates). The graph then takes a second input, ``image_sizes`` ``(B, 2)`` float32: the valid
    ``(height, width)`` of each image inside the padding (the resized image's size; boxes are clipped to it, as
    the Predictor does). Divide boxes by the resize scale to get original pixels.

    Args:
        model_or_bundle: a :class:`ZooModel` or anything :func:`zoo.load` accepts.
        path: ``.../model.onnx``, or a folder (``model.onnx`` is written into it). Not a bundle folder.
        opset: ONNX opset version.
        dynamic_batch: make the batch axis dynamic (else fixed at 2, the traced batch).
        dynamic_size: make height/width dynamic (classification / embedding / semantic heads; backbones with
            fixed position embeddings may not support it).
        postprocess: detection heads end in boxes / scores / labels with NMS in the graph (see above).
        postprocess_options: ``score_thresh``, ``nms_thresh``, ``max_detections``, ``pre_nms_topk`` over the
            bundle's post-processing defaults (the Predictor's).

    Returns:
        Path of the ``.onnx`` file.
    """
    model = _as_model(model_or_bundle)
    target = _export_target(path, ONNX_FILE, (".onnx",))
    size = _example_size(model)
    post = _postprocess_options(model, postprocess_options) if postprocess else {}
    if post and int(opset) < 11:
        raise ExportError(f"postprocess=True needs opset >= 11 (NonMaxSuppression with batches), got opset={opset}")
    wrapper, outputs, example = _plan(model, size, "ONNX", dynamic_size, post)
    input_names = ["images", "image_sizes"] if post else ["images"]
    args: tuple[torch.Tensor, ...] = (example,)
    if post:
        args = (example, torch.tensor([list(size)] * example.shape[0], dtype=torch.float32, device=example.device))
    axes: dict[str, dict[int, str]] = {}
    if dynamic_batch or dynamic_size:
        axes["images"] = {**({0: "batch"} if dynamic_batch else {}), **({2: "height", 3: "width"} if dynamic_size else {})}
        if post and dynamic_batch:
            axes["image_sizes"] = {0: "batch"}
        for o in outputs:
            d = {i: "batch" for i, a in enumerate(o["shape"]) if a == "batch" and dynamic_batch}
            if dynamic_size and o["kind"] == "semantic":
                d.update({2: "out_height", 3: "out_width"})
            if d:
                axes[o["name"]] = d
    if not dynamic_batch:
        for o in outputs:
            o["shape"] = [2 if a == "batch" else a for a in o["shape"]]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.no_grad():
            # The TorchScript-based exporter: it needs no extra package (the dynamo exporter needs onnxscript).
            torch.onnx.export(wrapper, args, str(target), dynamo=False, input_names=input_names,
                              output_names=[o["name"] for o in outputs], dynamic_axes=axes or None,
                              opset_version=int(opset), do_constant_folding=True)
    _label_graph_axes(target, outputs, axes)
    try:
        import onnx
    except ImportError:
        pass
    else:
        onnx.checker.check_model(str(target))
    details: dict[str, Any] = {
        "opset": int(opset), "dynamic_batch": bool(dynamic_batch), "dynamic_size": bool(dynamic_size),
        "input": _input_description(model, size, dynamic_batch, dynamic_size), "outputs": outputs}
    if post:
        from zoo.heads.detection.postprocess import resolve_thresholds

        details["postprocess"] = {n: resolve_thresholds(model.heads[n].post, **o) for n, o in post.items()}
        details["inputs"] = [details["input"], {
            "name": "image_sizes", "dtype": "float32", "shape": ["batch" if dynamic_batch else 2, 2],
            "description": "valid (height, width) of each image inside the padding: the resized image's size"}]
    _write_export_meta(model, target, "onnx", details)
    return target


def export_torchscript(model_or_bundle: ZooModel | str | os.PathLike[str], path: str | os.PathLike[str]) -> Path:
    """Trace a model's raw forward (as :func:`export_onnx` describes its outputs) with ``torch.jit.trace``.

    The traced module takes normalised ``(B, 3, H, W)`` images and returns a tuple of tensors in the order of
    ``model.json``'s ``torchscript.outputs``; the batch size may vary, the image size should be the traced one.

    Args:
        model_or_bundle: a :class:`ZooModel` or anything :func:`zoo.load` accepts.
        path: ``.../model.torchscript.pt`` (any ``.pt``), or a folder. Not a bundle folder.

    Returns:
        Path of the saved TorchScript file (load with ``torch.jit.load``).
    """
    model = _as_model(model_or_bundle)
    target = _export_target(path, TORCHSCRIPT_FILE, (".pt", ".pth"))
    size = _example_size(model)
    wrapper, outputs, example = _plan(model, size, "TorchScript", False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.no_grad():
            traced = torch.jit.trace(wrapper, (example,), check_trace=False)
        traced.save(str(target))
    _write_export_meta(model, target, "torchscript", {
        "input": _input_description(model, size, True, False), "outputs": outputs})
    return target


# ---------------------------------------------------------------------------------------------------- CLI
def main(argv: Sequence[str] | None = None) -> int:
    """``zoo-export CKPT OUT [--onnx] [--onnx-nms] [--torchscript]``: bundle into OUT, exports into OUT/onnx,
    OUT/onnx_nms (detection post-processing in the graph), OUT/torchscript."""
    parser = argparse.ArgumentParser(
        prog="zoo-export",
        description="Export a zoo training checkpoint (.ckpt) to a serving bundle (model.safetensors + model.json), "
                    "and optionally to ONNX / TorchScript.")
    parser.add_argument("ckpt", help="Lightning checkpoint written by a zoo task, e.g. runs/x/checkpoints/best.ckpt")
    parser.add_argument("out", help="bundle folder to write (ONNX goes to OUT/onnx, TorchScript to OUT/torchscript)")
    parser.add_argument("--onnx", action="store_true", help="also export ONNX (needs the onnx package to check it)")
    parser.add_argument("--torchscript", action="store_true", help="also export TorchScript (torch.jit.trace)")
    parser.add_argument("--opset", type=int, default=17, help="ONNX opset (default 17)")
    parser.add_argument("--static-batch", action="store_true", help="ONNX: fixed batch size instead of dynamic")
    parser.add_argument("--dynamic-size", action="store_true", help="ONNX: dynamic height/width")
    parser.add_argument("--onnx-nms", action="store_true",
                        help="also export ONNX with detection post-processing in the graph (decoding + NMS; outputs "
                             "<head>.boxes/scores/labels/num_detections) into OUT/onnx_nms")
    parser.add_argument("--score-thresh", type=float, help="--onnx-nms: score threshold (default: the bundle's)")
    parser.add_argument("--nms-thresh", type=float, help="--onnx-nms: NMS IoU threshold (default: the bundle's)")
    parser.add_argument("--max-detections", type=int, help="--onnx-nms: detections per image (default: the bundle's)")
    parser.add_argument("--metrics", help="JSON file with {metric: value} (or zoo's metrics.json) to record")
    parser.add_argument("--dataset", help="what the metrics were measured on (free text)")
    args = parser.parse_args(argv)
    try:
        metrics = None
        if args.metrics:
            data = json.loads(Path(args.metrics).read_text(encoding="utf-8"))
            metrics = data.get("metrics", data) if isinstance(data, dict) else None
            if not isinstance(metrics, dict):
                raise ExportError(f"--metrics {args.metrics} must hold a JSON object of metric values")
        out = export_checkpoint(args.ckpt, args.out, metrics=metrics, dataset=args.dataset)
        print(f"bundle: {out}")
        if args.onnx or args.torchscript or args.onnx_nms:
            model = load(out)
            if args.onnx:
                print(f"onnx: {export_onnx(model, out / 'onnx', opset=args.opset, dynamic_batch=not args.static_batch, dynamic_size=args.dynamic_size)}")
            if args.onnx_nms:
                opts = {"score_thresh": args.score_thresh, "nms_thresh": args.nms_thresh,
                        "max_detections": args.max_detections}
                path = export_onnx(model, out / "onnx_nms", opset=args.opset, dynamic_batch=not args.static_batch,
                                   postprocess=True, postprocess_options=opts)
                print(f"onnx (with NMS): {path}")
            if args.torchscript:
                print(f"torchscript: {export_torchscript(model, out / 'torchscript')}")
    except (ExportError, BundleError, FileNotFoundError, json.JSONDecodeError) as e:
        print(f"zoo-export: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
