"""Autoencoder head: a small KL-regularised VAE (diffusers' ``AutoencoderKL``) trained in the zoo, whose latents a
latent diffusion head (:class:`~zoo.heads.generation.DiffusionHead` with ``latent: {vae: <this model>}``) learns on.

Size: ``channels`` are the ``block_out_channels``, one encoder / decoder level per entry; every level but the last
halves the resolution, so the downsampling factor is ``2 ** (len(channels) - 1)``: the default ``(16, 32, 64)``
turns a 64 px picture into a ``4 x 16 x 16`` latent (4x downsampling, ``latent_channels`` 4, 0.65 M parameters;
the decoder at full resolution dominates the cost, so its first level is kept narrow); ``(16, 32)`` is 2x (64 px ->
32 x 32). The mid block's self-attention is off by default (``mid_attention``: cheap on
CPU).

Contract notes (how this head differs from the discriminative ones):

- it reads the *input pictures*, not backbone features: its default input is ``"images"`` (the model hands it the
  normalised batch itself, ``[(B, 3, H, W)]``, and a model whose heads all read ``"images"`` skips the backbone
  pass). The spec still names a backbone (use the tiny ``test_resnet``; its weights stay untrained);
- :meth:`forward` returns ``{"recon", "mean", "logvar"}``: the reconstruction in ``[-1, 1]`` (decoded from the
  posterior mean in eval mode, from a posterior sample in training) and the posterior's moments; its ONNX export
  (``exportable``) is the reconstruction, output ``<head>`` ``(B, 3, H, W)`` in ``[-1, 1]``;
- :meth:`loss` needs no targets beyond the batch's pictures; it trains on batches of its data format
  (``captions``: the same data as the text-to-image head, so one source can feed both) and returns ``{}`` for the
  others, as every head does. ``loss_recon`` is the L1 (``recon_loss: l1``, default) or squared (``mse``) error on
  ``[-1, 1]`` pixels, ``loss_kl`` the KL divergence to ``N(0, 1)`` averaged per latent element times
  ``kl_weight`` (default 1e-3: small, the latents stay informative; their scale is fixed by the scaling factor);
- :meth:`postprocess` returns one :class:`~zoo.generation.results.Reconstruction` per picture, in original pixels.

Latent scaling factor: the latent diffusion model works on ``mean * scaling_factor`` so that its latents have about
unit variance, as its noise schedule assumes. It is ``1 / std`` of the posterior means, tracked over the training
batches in :meth:`loss` (a running variance, :meth:`measure_scale`, so it ends at the trained encoder's) and
stored in the persistent buffer ``latent_scale``: it travels with the weights in checkpoints and bundles and the EMA
copy takes it over; ``scaling_factor: <value>`` in the spec fixes it instead. An untrained head that never measured it reports
1.0. :meth:`export_description` records it with the latent channels and downsampling; a latent diffusion head
records them in its own spec.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from zoo.heads.base import Head, register_head

__all__ = ["VAEHead", "RECON_LOSSES"]

RECON_LOSSES = ("l1", "mse")


def _autoencoder_kl():
    try:
        from diffusers import AutoencoderKL
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("the vae head needs diffusers: pip install -e \".[gen]\" (or pip install "
                          "'diffusers>=0.30')") from err
    return AutoencoderKL


@register_head("vae")
class VAEHead(Head):
    """A small KL autoencoder (diffusers ``AutoencoderKL``) trained on the input pictures; see the module docs.

    Args:
        channels: ``block_out_channels`` (downsampling ``2 ** (len(channels) - 1)``).
        latent_channels: channels of the latent.
        layers_per_block, norm_groups: ``AutoencoderKL`` settings (``norm_groups`` divides every entry of
            ``channels``).
        mid_attention: self-attention in the mid blocks.
        recon_loss: ``l1`` or ``mse`` on ``[-1, 1]`` pixels. kl_weight: weight of the mean per-element KL term.
        scaling_factor: fixes the latent scaling factor (default: tracked over the training batches).
        pixel_mean, pixel_std: the normalisation of the batch images (the spec's mean / std), undone to ``[-1, 1]``.

    Shapes: ``forward([images (B, 3, H, W)])`` (``H``, ``W`` multiples of the downsampling) ->
    ``{"recon": (B, 3, H, W), "mean": (B, C, H / d, W / d), "logvar": (B, C, H / d, W / d)}``.
    """

    result_kind = "reconstruction"
    target_format = "captions"
    default_name = "vae"
    neck = None
    default_input = "images"
    feature_levels = "none (reads the input pictures: input 'images')"
    exportable = True
    options = ()

    def __init__(self, in_channels: Sequence[int] = (), strides: Sequence[int] = (), *,
                 channels: Sequence[int] = (16, 32, 64), latent_channels: int = 4, layers_per_block: int = 1,
                 norm_groups: int = 8, mid_attention: bool = False, recon_loss: str = "l1", kl_weight: float = 1e-3,
                 scaling_factor: float | None = None, pixel_mean: Sequence[float] = (0.5, 0.5, 0.5),
                 pixel_std: Sequence[float] = (0.5, 0.5, 0.5)) -> None:
        super().__init__()
        if recon_loss not in RECON_LOSSES:
            raise ValueError(f"vae: recon_loss={recon_loss!r}; use one of {RECON_LOSSES}")
        chans = [int(c) for c in channels]
        if not chans or any(c % int(norm_groups) for c in chans):
            raise ValueError(f"vae: channels={chans} must be non-empty multiples of norm_groups={norm_groups}")
        if in_channels and list(in_channels)[0] != 3:
            raise ValueError(f"vae: the head reads the input pictures (input: images), but it is given "
                             f"{list(in_channels)[0]}-channel features; remove its 'input' or set input: images")
        AE = _autoencoder_kl()
        n = len(chans)
        self.vae = AE(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * n,
                      up_block_types=("UpDecoderBlock2D",) * n, block_out_channels=tuple(chans),
                      layers_per_block=int(layers_per_block), latent_channels=int(latent_channels),
                      norm_num_groups=int(norm_groups), mid_block_add_attention=bool(mid_attention))
        self.latent_channels = int(latent_channels)
        self.downsample = 2 ** (n - 1)
        self.recon_loss = recon_loss
        self.kl_weight = float(kl_weight)
        self.fixed_scale = float(scaling_factor) if scaling_factor is not None else None
        if self.fixed_scale is not None and not self.fixed_scale > 0:
            raise ValueError(f"vae: scaling_factor={scaling_factor}; give a positive factor (or leave it out: it is "
                             "tracked over the training batches)")
        # 0: not measured yet (persistent: travels with the weights)
        self.register_buffer("latent_scale", torch.tensor(self.fixed_scale or 0.0))
        self.register_buffer("pixel_mean", torch.tensor([float(v) for v in pixel_mean]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor([float(v) for v in pixel_std]).view(1, 3, 1, 1), persistent=False)

    # ------------------------------------------------------------------ data binding
    @classmethod
    def bind_data(cls, kwargs: dict[str, Any], info: Mapping[str, Any]) -> list[str] | None:
        """No classes and nothing from the data (the scaling factor is tracked over the training batches)."""
        return None

    @classmethod
    def from_model_config(cls, kwargs: dict[str, Any], model_cfg: Mapping[str, Any], data_cfg: Mapping[str, Any]) -> None:
        if "pixel_mean" not in kwargs and model_cfg.get("mean") is not None:
            kwargs["pixel_mean"] = [float(v) for v in model_cfg["mean"]]
        if "pixel_std" not in kwargs and model_cfg.get("std") is not None:
            kwargs["pixel_std"] = [float(v) for v in model_cfg["std"]]

    # ------------------------------------------------------------------ the networks
    @property
    def scaling_factor(self) -> float:
        """The latent scaling factor (see the module docs); 1.0 while not measured."""
        v = float(self.latent_scale)
        return v if v > 0 else 1.0

    @property
    def scale_measured(self) -> bool:
        return float(self.latent_scale) > 0

    def to_pixels(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised batch images -> ``[-1, 1]``."""
        return ((images * self.pixel_std.to(images) + self.pixel_mean.to(images)) * 2.0 - 1.0).clamp(-1.0, 1.0)

    def moments(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, 3, H, W)`` pixels in ``[-1, 1]`` -> the posterior's ``(mean, logvar)``, each ``(B, C, H/d, W/d)``."""
        d = self.downsample
        if pixels.shape[-1] % d or pixels.shape[-2] % d:
            raise ValueError(f"vae: image side {tuple(pixels.shape[-2:])} must be a multiple of the downsampling "
                             f"{d} (set the model's size_divisor / input_size accordingly)")
        h = self.vae.encoder(pixels)
        if self.vae.quant_conv is not None:
            h = self.vae.quant_conv(h)
        mean, logvar = h.chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Unscaled latents ``(B, C, h, w)`` -> pixels ``(B, 3, h*d, w*d)`` (about ``[-1, 1]``, not clamped)."""
        if self.vae.post_quant_conv is not None:
            z = self.vae.post_quant_conv(z)
        return self.vae.decoder(z)

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels in ``[-1, 1]`` -> scaled latents: the posterior mean times :attr:`scaling_factor`."""
        return self.moments(pixels)[0] * self.scaling_factor

    def decode_scaled(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents (what :meth:`encode` gives) -> pixels, clamped to ``[-1, 1]``."""
        return self.decode(latents / self.scaling_factor).clamp(-1.0, 1.0)

    # ------------------------------------------------------------------ the calls
    def forward(self, features: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """``features``: ``[normalised images (B, 3, H, W)]`` (input ``images``) -> ``{"recon", "mean", "logvar"}``."""
        x = features[0]
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"vae: forward takes [images (B, 3, H, W)] (input: images), got {tuple(x.shape)}")
        mean, logvar = self.moments(self.to_pixels(x))
        z = mean + torch.randn_like(mean) * torch.exp(0.5 * logvar) if self.training else mean
        return {"recon": self.decode(z), "mean": mean, "logvar": logvar}

    def losses(self, raw: Mapping[str, torch.Tensor], images: torch.Tensor) -> dict[str, torch.Tensor]:
        """``loss_recon`` and ``loss_kl`` of :meth:`forward`'s output for the normalised ``images``."""
        target = self.to_pixels(images)
        recon = raw["recon"].float()
        if tuple(recon.shape[-2:]) != tuple(target.shape[-2:]):
            raise ValueError(f"vae: reconstruction {tuple(recon.shape)} and images {tuple(target.shape)} differ")
        rec = F.l1_loss(recon, target) if self.recon_loss == "l1" else F.mse_loss(recon, target)
        mean, logvar = raw["mean"].float(), raw["logvar"].float()
        kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).mean()
        return {"loss_recon": rec, "loss_kl": self.kl_weight * kl}

    #: weight of each training batch in the running latent variance behind the scaling factor
    SCALE_MOMENTUM = 0.1

    @torch.no_grad()
    def measure_scale(self, mean: torch.Tensor) -> float:
        """Track the scaling factor from the posterior means ``mean`` of a training batch (unless it is fixed):
        ``1 / sqrt(v)`` with ``v`` the running variance of the means (the first batch's, then a running mean with
        weight :attr:`SCALE_MOMENTUM` per batch), so it follows the encoder as it trains and ends at the trained
        encoder's (measured once, on the first and untrained batch, it was 7x off by the end of a run)."""
        if self.fixed_scale is None:
            var = float(mean.detach().float().var())
            if self.scale_measured:
                var = (1 - self.SCALE_MOMENTUM) / float(self.latent_scale) ** 2 + self.SCALE_MOMENTUM * var
            self.latent_scale.fill_(1.0 / max(var, 1e-12) ** 0.5)
        return self.scaling_factor

    def loss(self, raw: Any, batch: Mapping[str, Any], criterion: nn.Module | None = None) -> dict[str, torch.Tensor]:
        if self.batch_targets(batch) is None:
            return {}
        if self.training:
            self.measure_scale(raw["mean"])
        return self.losses(raw, batch["images"])

    def compute_loss(self, raw: Any, targets: Any, image_sizes: Sequence[tuple[int, int]] | None = None
                     ) -> dict[str, torch.Tensor]:
        raise TypeError("VAEHead's loss needs the batch images: call head.loss(raw, batch)")

    def _uint8(self, raw: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return ((raw["recon"].detach().float().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)

    def predict(self, raw: Any, image_sizes: Sequence[tuple[int, int]], **options: Any) -> list[dict[str, Any]]:
        """Per image ``{"image": (3, h, w) uint8}``: the reconstruction cropped to its input size."""
        imgs = self._uint8(raw)
        return [{"image": im[:, : int(h), : int(w)].cpu()} for im, (h, w) in zip(imgs, image_sizes)]

    def postprocess(self, raw: Any, infos: Sequence[Any], **options: Any) -> list[Any]:
        """One :class:`~zoo.generation.results.Reconstruction` per image, resized back to its original size."""
        from zoo.generation.results import Reconstruction

        imgs = self._uint8(raw)
        c = int(raw["mean"].shape[1])
        out = []
        for im, info in zip(imgs, infos):
            h, w = (int(v) for v in info.size)
            x = im[:, :h, :w].float()[None]
            oh, ow = (int(v) for v in info.orig_size)
            if (oh, ow) != (h, w):
                x = F.interpolate(x, size=(oh, ow), mode="bilinear", align_corners=False, antialias=(oh < h or ow < w))
            arr = x[0].round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).contiguous().cpu().numpy()
            out.append(Reconstruction(image=arr, latent_shape=(c, -(-h // self.downsample), -(-w // self.downsample))))
        return out

    def export_outputs(self, raw: Any) -> torch.Tensor:
        """The reconstruction ``(B, 3, H, W)`` in ``[-1, 1]``."""
        return raw["recon"]

    def export_description(self) -> dict[str, Any]:
        return {"output": "reconstruction (B, 3, H, W) in [-1, 1]", "latent_channels": self.latent_channels,
                "downsample": self.downsample, "scaling_factor": self.scaling_factor,
                "scaling_factor_measured": self.scale_measured or self.fixed_scale is not None}

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
