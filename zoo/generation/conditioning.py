"""Image-variation conditioning: a frozen zoo similarity model that embeds pictures for a diffusion head.

A :class:`~zoo.heads.generation.DiffusionHead` built with ``image_condition: {model: <similarity bundle or
registered name>, tokens: 4, prob: 0.5}`` trains, with probability ``prob`` per sample, on a learned projection of
the training image's own embedding instead of its caption; :meth:`zoo.Generator.vary` then samples variations of a
reference picture from its embedding. The similarity model is not part of the head's weights (nor of the
optimiser, the EMA copy or the bundle): the spec records its reference (``model``), the sha256 of its weights and its
embedding size, and loading the generation model loads it again from that reference (:func:`load_embedder`).

Pictures are embedded exactly as :class:`zoo.Predictor` embeds them with that model (its own ``input_size``,
``resize``, ``mean`` / ``std``, padding to ``size_divisor``, the embedding head's ``predict``):
:meth:`ImageEmbedder.embed` on ``(B, 3, H, W)`` pixels in ``[0, 1]``, :meth:`ImageEmbedder.embed_images` on files,
PIL images or arrays (through the Predictor itself).

Only torch, numpy and zoo's lean modules are imported (serving path).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["ImageEmbedder", "FrozenRef", "IMAGE_CONDITION_KEYS", "as_reference_list", "completed",
           "image_condition_config", "load_embedder", "pad_context"]

#: Keys of a diffusion head's ``image_condition`` option (``model`` is required).
IMAGE_CONDITION_KEYS = ("model", "tokens", "prob", "head", "sha256", "dim")


def image_condition_config(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """Check and complete an ``image_condition`` option: ``{"model": str, "tokens": int >= 1 (default 4),
    "prob": float in [0, 1] (default 0.5), "head": str | None, "sha256": str | None, "dim": int | None}``.

    A ``model`` that is an existing local path is made absolute (the spec must find it again from any folder)."""
    if not isinstance(cfg, Mapping):
        raise ValueError("diffusion: image_condition must be a mapping like {model: test_resnet.shapes_sim, tokens: 4, "
                         f"prob: 0.5}}, got {type(cfg).__name__}")
    unknown = sorted(set(cfg) - set(IMAGE_CONDITION_KEYS))
    if unknown:
        raise ValueError(f"diffusion: image_condition has unknown key(s) {unknown}; its keys are "
                         f"{list(IMAGE_CONDITION_KEYS)}")
    ref = cfg.get("model")
    if not isinstance(ref, (str, os.PathLike)) or not os.fspath(ref):
        raise ValueError("diffusion: image_condition.model is required: a similarity bundle folder or a registered "
                         "name such as 'test_resnet.shapes_sim' (zoo.list_models(task='similarity'))")
    ref = os.fspath(ref)
    local = Path(ref).expanduser()
    if local.exists():
        ref = str(local.resolve())
    tokens = int(cfg.get("tokens", 4) if cfg.get("tokens") is not None else 4)
    if tokens < 1:
        raise ValueError(f"diffusion: image_condition.tokens={tokens}; use at least 1 context token")
    prob = float(cfg.get("prob", 0.5) if cfg.get("prob") is not None else 0.5)
    if not 0.0 <= prob <= 1.0:
        raise ValueError(f"diffusion: image_condition.prob={prob}; use a probability in [0, 1] (the share of training "
                         "samples conditioned on their image's embedding instead of their caption)")
    dim = cfg.get("dim")
    return {"model": ref, "tokens": tokens, "prob": prob, "head": cfg.get("head"),
            "sha256": str(cfg["sha256"]).lower() if cfg.get("sha256") else None,
            "dim": int(dim) if dim is not None else None}


class FrozenRef:
    """Holds a module *outside* the owner's module tree: not in ``parameters()`` / ``state_dict()``, not moved by
    ``.to()``, not switched by ``.train()``, and shared (not copied) by ``copy.deepcopy`` (the EMA copy of the
    model uses the same frozen similarity model)."""

    def __init__(self, value: Any) -> None:
        self.value = value

    def __deepcopy__(self, memo: dict) -> FrozenRef:
        return self

    def __repr__(self) -> str:
        return f"FrozenRef({type(self.value).__name__})"


class ImageEmbedder:
    """A frozen zoo similarity model as a picture -> embedding function.

    Args:
        model: a :class:`~zoo.models.ZooModel` with an embedding head (eval mode, gradients off).
        head: which embedding head (default: the first).
        reference: where it was loaded from (for messages and the spec).
        sha256: the sha256 of its bundle's weights.
    """

    def __init__(self, model: Any, *, head: str | None = None, reference: str = "", sha256: str | None = None) -> None:
        embs = [n for n, h in model.heads.items() if h.result_kind == "embedding"]
        if not embs:
            raise ValueError(f"diffusion: image_condition.model={reference!r} has no embedding head (its heads: "
                             f"{ {n: h.result_kind for n, h in model.heads.items()} }); give a similarity model "
                             "(zoo.list_models(task='similarity'))")
        if head is not None and head not in embs:
            raise ValueError(f"diffusion: image_condition.head={head!r} is not an embedding head of {reference!r} "
                             f"(those are {embs})")
        self.model = model.eval().requires_grad_(False)
        self.head_name = head or embs[0]
        self.reference = reference
        self.sha256 = sha256

    @property
    def dim(self) -> int:
        return int(self.model.heads[self.head_name].embedding_dim)

    def _device(self) -> torch.device:
        p = next(iter(self.model.parameters()), None)
        return p.device if p is not None else torch.device("cpu")

    @torch.no_grad()
    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` RGB in ``[0, 1]`` -> ``(B, D)`` L2-normalised float32 embeddings, on ``pixels``'
        device. The Predictor's preprocessing, batched: resized by the model's ``resize`` to its ``input_size``
        (antialiased bilinear), normalised with its mean / std, zero-padded bottom / right to ``size_divisor``."""
        from zoo.preprocess import compute_resize, normalize

        if pixels.dim() != 4 or pixels.shape[1] != 3:
            raise ValueError(f"ImageEmbedder.embed takes (B, 3, H, W) pixels in [0, 1], got {tuple(pixels.shape)}")
        dev = pixels.device
        if self._device() != dev:
            self.model.to(dev)
        s = self.model.spec
        info = compute_resize(tuple(pixels.shape[-2:]), s.input_size, s.resize)
        x = pixels.float()
        if tuple(x.shape[-2:]) != tuple(info.size):
            x = F.interpolate(x, size=info.size, mode="bilinear", align_corners=False, antialias=True).clamp(0.0, 1.0)
        x = normalize(x, s.mean, s.std)
        d = max(1, int(s.size_divisor))
        h, w = x.shape[-2:]
        x = F.pad(x, (0, (-w) % d, 0, (-h) % d))
        raw = self.model(x, heads=[self.head_name])[self.head_name]
        return self.model.heads[self.head_name].predict(raw).float()

    def embed_images(self, images: Any) -> torch.Tensor:
        """Files, PIL images, uint8 arrays / tensors (one or a list) -> ``(N, D)`` float32, through
        :class:`zoo.Predictor` (the serving path, at each picture's own resolution)."""
        from zoo.predictor import Predictor

        res = Predictor(self.model, heads=[self.head_name], device=self._device())(images)
        return torch.stack([r.vector.float().cpu() for r in res])


def load_embedder(cfg: Mapping[str, Any]) -> ImageEmbedder:
    """Load the similarity model an ``image_condition`` names (:func:`image_condition_config` form), checking the
    weights digest the spec records; raises ValueError saying what to do when it cannot."""
    from zoo.hub.api import load
    from zoo.hub.bundle import read_bundle_meta
    from zoo.hub.download import HF_PREFIX, is_url
    from zoo.hub.registry import resolve

    ref = str(cfg["model"])
    if ref.startswith(HF_PREFIX) or is_url(ref):
        # a spec may come from an untrusted bundle: building it must not fetch whatever address it names
        raise ValueError(f"diffusion: image_condition.model={ref!r} is a URL; give a registered name or a local bundle "
                         "folder (download it first: zoo.hub.resolve(url) returns the folder)")
    fix = ("the similarity model a diffusion head was trained with must load again under the reference its spec "
           "records: put its bundle folder (model.json + model.safetensors) back at that path, or, for an 'arch.tag' "
           "name, register it (zoo.register(zoo.hub.entry_from_bundle(name, 'similarity', 'file://<folder>', "
           "'<folder>')))")
    try:
        folder = resolve(ref, progress=False)
        meta = read_bundle_meta(folder)
        digest = str(meta["weights"]["sha256"]).lower()
    except Exception as err:  # noqa: BLE001 - unknown name, missing path, offline, broken bundle: one clear message
        raise ValueError(f"diffusion: image_condition.model={ref!r} cannot be loaded ({type(err).__name__}: {err}); "
                         f"{fix}") from err
    want = cfg.get("sha256")
    if want and digest != want:
        raise ValueError(f"diffusion: image_condition.model={ref!r} resolves to a similarity model whose weights have "
                         f"sha256 {digest}, but this diffusion head was trained on the embeddings of weights "
                         f"{want}: its image projection does not fit other embeddings. {fix}")
    model = load(folder, device="cpu")
    emb = ImageEmbedder(model, head=cfg.get("head"), reference=ref, sha256=digest)
    if cfg.get("dim") is not None and int(cfg["dim"]) != emb.dim:
        raise ValueError(f"diffusion: image_condition.dim={cfg['dim']} but {ref!r} gives {emb.dim}-dim embeddings")
    return emb


def completed(cfg: Mapping[str, Any], embedder: ImageEmbedder) -> dict[str, Any]:
    """``cfg`` with what the embedder says filled in: ``sha256``, ``dim``, ``head``."""
    out = copy.deepcopy(dict(cfg))
    out.update(sha256=embedder.sha256, dim=embedder.dim, head=embedder.head_name)
    return out


def pad_context(ctx: torch.Tensor, mask: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, L, D)`` context and ``(B, L)`` mask padded with zeros / False to ``length`` tokens (``L <= length``)."""
    extra = int(length) - ctx.shape[1]
    if extra <= 0:
        return ctx, mask
    return F.pad(ctx, (0, 0, 0, extra)), F.pad(mask, (0, extra), value=False)


def as_reference_list(images: Any) -> list[Any]:
    """One reference picture or several (a list / tuple, a 4-D array or tensor) -> a list."""
    from zoo.predictor import _as_list

    return _as_list(images)
