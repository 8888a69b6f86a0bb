"""A wrapper that turns any timm model into a multi-scale feature extractor.

Heads never import timm: they receive ``channels`` and ``strides`` from :class:`TimmBackbone` and a list of
NCHW feature maps from its ``forward``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Sequence

import timm
import torch
from torch import nn

from zoo.backbones.pyramid import SimpleFeaturePyramid

log = logging.getLogger(__name__)

__all__ = ["TimmBackbone"]


class TimmBackbone(nn.Module):
    """Any timm model name as a feature extractor returning a list of NCHW maps.

    Args:
        name: a timm model name (``timm.list_models()``), e.g. ``"resnet18"``, ``"convnext_tiny"``, ``"vit_small_patch16_224"``.
        pretrained: load the timm hub weights (network access needed on first use).
        weights: path to a local weights file (``.pth``/``.bin``/``.safetensors``) for the *full* timm model;
            takes precedence over ``pretrained``. ``None`` and ``pretrained=False`` give random initialisation.
        out_indices: which feature levels to return (timm level numbering); ``None`` returns all.
        freeze: ``0`` trains everything, ``"all"`` (or ``-1``) freezes the whole backbone, ``N > 0`` freezes the
            stem and every parameter up to and including feature level ``N - 1``. Frozen batch-norm layers stay in
            eval mode so their running statistics do not drift.
        grad_checkpointing: trade compute for memory in the backbone's blocks (where timm supports it).
        pyramid: for plain (single-stride) backbones such as ViTs, build a simple feature pyramid with these
            strides from the last level; ``None`` chooses ``(4, 8, 16, 32)`` for plain backbones and nothing otherwise.
        pyramid_channels: output channels of the simple pyramid (default: the ViT's width).
        img_size: input size for models that need one fixed at construction (ViTs also get ``dynamic_img_size``).
        drop_path_rate: stochastic depth rate passed to timm where supported.

    Attributes:
        channels: channels of each returned level.
        strides: stride (reduction w.r.t. the input) of each returned level.
    """

    def __init__(
        self,
        name: str,
        *,
        pretrained: bool = False,
        weights: str | os.PathLike | None = None,
        out_indices: Sequence[int] | None = None,
        freeze: int | str = 0,
        grad_checkpointing: bool = False,
        pyramid: Sequence[int] | None = None,
        pyramid_channels: int | None = None,
        img_size: int | Sequence[int] | None = None,
        drop_path_rate: float | None = None,
    ) -> None:
        super().__init__()
        self.name = name
        if not timm.is_model(name):
            close = timm.list_models(f"*{name.split('_')[0]}*")[:10]
            raise ValueError(
                f"backbone.name={name!r} is not a timm model. Close names: {close}. "
                "List them with `python -c \"import timm; print(timm.list_models('*pattern*'))\"`."
            )
        kwargs: dict = {"features_only": True}
        if out_indices is not None:
            kwargs["out_indices"] = tuple(int(i) for i in out_indices)
        if drop_path_rate:
            kwargs["drop_path_rate"] = float(drop_path_rate)
        if img_size is not None:
            kwargs["img_size"] = img_size if isinstance(img_size, int) else tuple(img_size)
        load_pretrained = bool(pretrained)
        if weights is not None:
            path = Path(weights).expanduser()
            if not path.is_file():
                raise FileNotFoundError(
                    f"backbone.weights={str(weights)!r} does not exist. Give the path of a weights file saved from "
                    f"timm.create_model({name!r}) (state_dict as .pth/.bin/.safetensors), or set backbone.weights=null."
                )
            kwargs["pretrained_cfg_overlay"] = {"file": str(path)}
            load_pretrained = True
        self.body = self._create(name, load_pretrained, kwargs)
        info = self.body.feature_info
        self._fmt = str(getattr(self.body, "output_fmt", "NCHW"))
        self._fmt = "NHWC" if "NHWC" in self._fmt else "NCHW"
        body_channels = list(info.channels())
        body_strides = list(info.reduction())
        self.pretrained_cfg = dict(getattr(self.body, "pretrained_cfg", {}) or {})

        plain = len(set(body_strides)) == 1 and len(body_strides) >= 1
        if pyramid is None and plain:
            pyramid = (4, 8, 16, 32)
        self.pyramid: SimpleFeaturePyramid | None = None
        if pyramid:
            self.pyramid = SimpleFeaturePyramid(
                body_channels[-1], body_strides[-1], strides=tuple(pyramid), out_channels=pyramid_channels
            )
            self.channels = list(self.pyramid.channels)
            self.strides = list(self.pyramid.strides)
        else:
            self.channels = body_channels
            self.strides = body_strides

        if grad_checkpointing:
            self.set_grad_checkpointing(True)
        self._frozen_norms: list[nn.Module] = []
        self.freeze(freeze)

    @staticmethod
    def _create(name: str, pretrained: bool, kwargs: dict) -> nn.Module:
        try:
            return timm.create_model(name, pretrained=pretrained, dynamic_img_size=True, **kwargs)
        except TypeError:
            # Most non-ViT models do not take dynamic_img_size.
            return timm.create_model(name, pretrained=pretrained, **kwargs)

    # ------------------------------------------------------------------ freezing / checkpointing
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Enable gradient checkpointing in the timm body where the architecture supports it."""
        target = getattr(self.body, "model", self.body)
        fn = getattr(self.body, "set_grad_checkpointing", None) or getattr(target, "set_grad_checkpointing", None)
        if fn is None:
            log.warning("backbone %s does not support gradient checkpointing; ignoring the switch", self.name)
            return
        try:
            fn(enable)
        except (AssertionError, NotImplementedError) as err:
            log.warning("backbone %s: gradient checkpointing unavailable (%s)", self.name, err)

    def _level_param_prefixes(self, level: int) -> list[str]:
        mod = self.body.feature_info.module_name()[level]
        return [mod + ".", mod.replace(".", "_") + ".", "model." + mod + "."]

    def freeze(self, spec: int | str) -> None:
        """Freeze all (``"all"``/``-1``) or the first ``N`` feature levels of the body (see class docs)."""
        if spec in (None, 0, "0", False, "none"):
            return
        names = [n for n, _ in self.body.named_parameters()]
        if spec in ("all", -1, "-1", True):
            cut = len(names)
        else:
            try:
                n_levels = int(spec)
            except (TypeError, ValueError):
                raise ValueError(f"backbone.freeze must be 0, 'all' or a number of stages, got {spec!r}") from None
            n_info = len(self.body.feature_info.module_name())
            if not 0 < n_levels <= n_info:
                raise ValueError(f"backbone.freeze={n_levels} but {self.name} has {n_info} feature levels (use 1..{n_info} or 'all')")
            prefixes = tuple(self._level_param_prefixes(n_levels - 1))
            matches = [i for i, n in enumerate(names) if n.startswith(prefixes)]
            cut = (max(matches) + 1) if matches else 0
        frozen = set(names[:cut])
        for n, p in self.body.named_parameters():
            if n in frozen:
                p.requires_grad_(False)
        for mod_name, m in self.body.named_modules():
            params = list(m.parameters(recurse=False))
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and params and all(not p.requires_grad for p in params):
                self._frozen_norms.append(m)
        if spec in ("all", -1, "-1", True) and self.pyramid is not None:
            # "all" means the body; the simple pyramid stays trainable: it is new, not pretrained.
            pass
        self.train(self.training)

    def train(self, mode: bool = True) -> "TimmBackbone":
        super().train(mode)
        for m in self._frozen_norms:
            m.eval()
        return self

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Args:
            x: images ``(B, 3, H, W)``.
        Returns:
            list of feature maps ``(B, C_i, H / s_i, W / s_i)`` with ``C_i = channels[i]``, ``s_i = strides[i]``.
        """
        feats = self.body(x)
        if isinstance(feats, torch.Tensor):
            feats = [feats]
        if self._fmt == "NHWC":
            feats = [f.permute(0, 3, 1, 2) for f in feats]
        feats = list(feats)
        if self.pyramid is not None:
            feats = self.pyramid(feats[-1])
        return feats
