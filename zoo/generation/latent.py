"""Latent diffusion: a frozen zoo autoencoder (the ``vae`` head, :mod:`zoo.heads.autoencoder`) for a diffusion head.

A :class:`~zoo.heads.generation.DiffusionHead` built with ``latent: {vae: <VAE bundle folder, .ckpt or registered
name>}`` trains its UNet on the autoencoder's latents of the training pictures (the posterior mean times the VAE's
scaling factor) and decodes the final latents of sampling back to pixels. As with image conditioning
(:mod:`zoo.generation.conditioning`) the autoencoder is not part of the head's weights, its optimiser or its EMA copy
(:class:`~zoo.generation.conditioning.FrozenRef`): the spec records its reference (``vae``), the sha256 of its weights
(a bundle's ``model.safetensors`` digest; for a Lightning ``.ckpt``, the file's), its head, scaling factor, latent
channels and downsampling, and building the head loads it again from that reference, refusing a missing one or one
whose weights or latent geometry changed (the UNet only knows the latents it was trained on).

Only torch and zoo's lean modules are imported (serving path); diffusers comes with the autoencoder model.
"""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

__all__ = ["LATENT_KEYS", "LatentCodec", "completed_latent", "latent_config", "load_codec"]

#: Keys of a diffusion head's ``latent`` option (``vae`` is required; the others are filled in from the VAE).
LATENT_KEYS = ("vae", "head", "sha256", "scaling_factor", "latent_channels", "downsample")

_FIX = ("the autoencoder a latent diffusion head was trained with must load again under the reference its spec "
        "records: put its bundle folder (model.json + model.safetensors) or checkpoint back at that path, or, for an "
        "'arch.tag' name, register it; to train one: python train.py experiment=shapes_vae, then pass "
        "model.heads.gen.latent.vae=<run>/bundle")


def latent_config(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """Check and complete a ``latent`` option: ``{"vae": str, "head": str | None, "sha256": str | None,
    "scaling_factor": float | None, "latent_channels": int | None, "downsample": int | None}``. A ``vae`` that is an
    existing local path is made absolute (the spec must find it again from any folder)."""
    if not isinstance(cfg, Mapping):
        raise ValueError("diffusion: latent must be a mapping like {vae: <run>/bundle} (a VAE bundle folder, checkpoint "
                         f"or registered name), got {type(cfg).__name__}")
    unknown = sorted(set(cfg) - set(LATENT_KEYS))
    if unknown:
        raise ValueError(f"diffusion: latent has unknown key(s) {unknown}; its keys are {list(LATENT_KEYS)}")
    ref = cfg.get("vae")
    if not isinstance(ref, (str, os.PathLike)) or not os.fspath(ref):
        raise ValueError("diffusion: latent.vae is required: the autoencoder to diffuse in, a VAE bundle folder, a "
                         "checkpoint or a registered name. Train one first: python train.py experiment=shapes_vae, "
                         "then pass model.heads.gen.latent.vae=<that run>/bundle")
    ref = os.fspath(ref)
    local = Path(ref).expanduser()
    if local.exists():
        ref = str(local.resolve())
    out: dict[str, Any] = {"vae": ref, "head": cfg.get("head"),
                           "sha256": str(cfg["sha256"]).lower() if cfg.get("sha256") else None}
    out["scaling_factor"] = float(cfg["scaling_factor"]) if cfg.get("scaling_factor") is not None else None
    for k in ("latent_channels", "downsample"):
        out[k] = int(cfg[k]) if cfg.get(k) is not None else None
    return out


class LatentCodec:
    """A frozen zoo VAE as the pixels <-> latents map of a latent diffusion head.

    Args:
        model: a :class:`~zoo.models.ZooModel` with a ``vae`` head (eval mode, gradients off).
        head: which autoencoder head (default: the first). reference, sha256: where it came from, its digest.
    """

    def __init__(self, model: Any, *, head: str | None = None, reference: str = "", sha256: str | None = None) -> None:
        vaes = [n for n, h in model.heads.items() if h.result_kind == "reconstruction"]
        if not vaes:
            raise ValueError(f"diffusion: latent.vae={reference!r} has no autoencoder head (its heads: "
                             f"{ {n: h.result_kind for n, h in model.heads.items()} }); give a model trained with "
                             "python train.py experiment=shapes_vae")
        if head is not None and head not in vaes:
            raise ValueError(f"diffusion: latent.head={head!r} is not an autoencoder head of {reference!r} "
                             f"(those are {vaes})")
        self.model = model.eval().requires_grad_(False)
        self.head_name = head or vaes[0]
        self.head = model.heads[self.head_name]
        self.reference = reference
        self.sha256 = sha256

    @property
    def scaling_factor(self) -> float:
        return float(self.head.scaling_factor)

    @property
    def latent_channels(self) -> int:
        return int(self.head.latent_channels)

    @property
    def downsample(self) -> int:
        return int(self.head.downsample)

    def _to(self, ref: torch.Tensor) -> None:
        p = next(iter(self.head.parameters()), None)
        if p is not None and p.device != ref.device:
            self.model.to(ref.device)

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` pixels in ``[-1, 1]`` -> scaled latents ``(B, C, H/d, W/d)`` float32 (posterior mean
        times the scaling factor), on ``pixels``' device."""
        self._to(pixels)
        return self.head.encode(pixels.float()).float()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> ``(B, 3, h*d, w*d)`` float32 pixels clamped to ``[-1, 1]``."""
        self._to(latents)
        return self.head.decode_scaled(latents.float()).float()


def _sha256_file(path: Path) -> str:
    from zoo.hub.bundle import sha256_file

    return sha256_file(path)


def load_codec(cfg: Mapping[str, Any]) -> LatentCodec:
    """Load the autoencoder a ``latent`` option names (:func:`latent_config` form), checking what the spec records;
    raises ValueError saying what to do when it cannot."""
    from zoo.hub.api import _is_checkpoint, load
    from zoo.hub.bundle import read_bundle_meta
    from zoo.hub.download import HF_PREFIX, is_url
    from zoo.hub.registry import resolve

    ref = str(cfg["vae"])
    if ref.startswith(HF_PREFIX) or is_url(ref):
        raise ValueError(f"diffusion: latent.vae={ref!r} is a URL; give a registered name, a local bundle folder or a "
                         "checkpoint (download it first: zoo.hub.resolve(url) returns the folder)")
    try:
        if _is_checkpoint(ref):
            source: Any = Path(ref).expanduser()
            if not source.is_file():
                raise FileNotFoundError(f"no checkpoint file {source}")
            digest = _sha256_file(source)
        else:
            source = resolve(ref, progress=False)
            digest = str(read_bundle_meta(source)["weights"]["sha256"]).lower()
    except Exception as err:  # noqa: BLE001 - unknown name, missing path, broken bundle: one clear message
        raise ValueError(f"diffusion: latent.vae={ref!r} cannot be loaded ({type(err).__name__}: {err}); {_FIX}") from err
    want = cfg.get("sha256")
    if want and digest != want:
        raise ValueError(f"diffusion: latent.vae={ref!r} resolves to an autoencoder whose weights have sha256 {digest}, "
                         f"but this diffusion head was trained on the latents of weights {want}: its UNet does not fit "
                         f"other latents. {_FIX}")
    codec = LatentCodec(load(source, device="cpu"), head=cfg.get("head"), reference=ref, sha256=digest)
    for key, have in (("latent_channels", codec.latent_channels), ("downsample", codec.downsample)):
        if cfg.get(key) is not None and int(cfg[key]) != have:
            raise ValueError(f"diffusion: latent.{key}={cfg[key]} is recorded in the spec but {ref!r} gives {have}; "
                             f"{_FIX}")
    sf = cfg.get("scaling_factor")
    if sf is not None and not math.isclose(float(sf), codec.scaling_factor, rel_tol=1e-5):
        raise ValueError(f"diffusion: latent.scaling_factor={sf} is recorded in the spec but {ref!r} has "
                         f"{codec.scaling_factor}; {_FIX}")
    return codec


def completed_latent(cfg: Mapping[str, Any], codec: LatentCodec) -> dict[str, Any]:
    """``cfg`` with what the autoencoder says filled in: ``head``, ``sha256``, ``scaling_factor``,
    ``latent_channels``, ``downsample``."""
    out = copy.deepcopy(dict(cfg))
    out.update(head=codec.head_name, sha256=codec.sha256, scaling_factor=codec.scaling_factor,
               latent_channels=codec.latent_channels, downsample=codec.downsample)
    return out
