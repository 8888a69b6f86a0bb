"""What every semantic segmentation head shares: level selection, conv blocks, the auxiliary FCN head, the loss
(cross-entropy + optional dice + auxiliary) and post-processing (crop the padding, resize, argmax)."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import Conv2dNormActivation

from zoo.heads.base import Head, _set_num_classes
from zoo.heads.layers import norm_layer
from zoo.preprocess import IGNORE_INDEX
from zoo.losses.segmentation import check_mask_targets, dice_loss, masked_cross_entropy
from zoo.results import SemanticSegmentation

__all__ = ["SegmentationHead", "conv_norm_act", "make_norm", "select_levels", "resize_to"]


def make_norm(norm: str | None, channels: int) -> nn.Module:
    """A normalisation layer by name (:func:`zoo.heads.layers.norm_layer`): ``"gn"`` (GroupNorm, up to 32 groups of
    at least 4 channels, so GroupNorm on the 1x1 pooled branches normalises over several values), ``"bn"``
    (BatchNorm2d; needs batch >= 2 for the pooled branches in training), or ``None`` (identity)."""
    layer = norm_layer(norm, channels, min_per_group=4, what="segmentation head norm")
    return layer if layer is not None else nn.Identity()


def conv_norm_act(in_ch: int, out_ch: int, kernel: int = 3, *, norm: str | None = "gn", dilation: int = 1
                  ) -> nn.Module:
    """``kernel x kernel`` convolution (same padding, no bias when normalised), normalisation and ReLU."""
    has_norm = norm not in (None, "none", "")
    return Conv2dNormActivation(in_ch, out_ch, kernel, dilation=dilation, bias=not has_norm,
                                norm_layer=(lambda c: make_norm(norm, c)) if has_norm else None,
                                activation_layer=nn.ReLU)


def resize_to(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Bilinear resize of ``(B, C, h, w)`` to ``size = (H, W)`` (no-op when already that size, except while
    tracing, exporting or compiling, so that the graph follows the input size; ``size`` may be a tensor's shape)."""
    tracing = torch.jit.is_tracing() or torch.compiler.is_compiling()
    if not tracing and tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size[-2:]), mode="bilinear", align_corners=False)


def select_levels(strides: Sequence[int], in_levels: Sequence[int] | None) -> list[int]:
    """Indices of the feature levels a decoder reads, finest first.

    Args:
        strides: stride of every input level.
        in_levels: explicit indices (negative allowed), or ``None`` for every level with stride 4..32 (every level
            with stride >= 4 if none lies in that range, every level if none does).
    Returns:
        sorted level indices with strictly increasing strides.
    """
    n = len(strides)
    if n == 0:
        raise ValueError("segmentation head got no feature levels (empty in_channels/strides)")
    if in_levels is None:
        idx = [i for i, s in enumerate(strides) if 4 <= s <= 32]
        idx = idx or [i for i, s in enumerate(strides) if s >= 4] or list(range(n))
    else:
        idx = []
        for i in in_levels:
            j = int(i) + n if int(i) < 0 else int(i)
            if not 0 <= j < n:
                raise ValueError(f"in_levels={list(in_levels)} holds {i}, but the input has {n} levels with strides "
                                 f"{list(strides)}")
            idx.append(j)
        idx = sorted(set(idx))
    picked = [strides[i] for i in idx]
    if any(b <= a for a, b in zip(picked, picked[1:])):
        raise ValueError(f"segmentation decoders need levels of increasing stride; in_levels {idx} have strides "
                         f"{picked}")
    return idx


class SegmentationHead(Head):
    """Base class of the semantic segmentation decoders.

    Subclasses build their decoder in ``__init__`` (after calling this one) and implement :meth:`decode`, which maps
    the selected levels (finest first) to a ``(B, channels, H / s0, W / s0)`` map at the finest selected stride
    ``s0`` (normally 4). This class adds the dropout + 1x1 classifier, the optional auxiliary FCN head, the loss and
    post-processing.

    Args:
        in_channels: channels of every input level (``TimmBackbone.channels`` or a neck's).
        strides: stride of every input level.
        num_classes: K, classes predicted per pixel (background included when the dataset has one).
        channels: decoder width.
        dropout: ``Dropout2d`` rate before the classifier (and in the auxiliary head).
        in_levels: which input levels the decoder reads (default: those with stride 4..32).
        norm: ``"gn"`` (default; works for any batch size), ``"bn"`` or ``None``.
        aux_head: add an auxiliary FCN head on the level whose stride is closest to 16 (training only).
        aux_weight: weight of the auxiliary cross-entropy.
        aux_channels: width of the auxiliary head (default: ``channels``).
        ignore_index: target label that carries no loss.
        dice_weight: weight of a multi-class soft dice term added to the cross-entropy (0 disables it).
        class_weights: optional per-class cross-entropy weights (K floats).
    """

    result_kind = "semantic"
    target_format = "semantic"
    default_name = "seg"
    feature_levels = "in_levels (default: strides 4 to 32)"

    def __init__(self, in_channels: Sequence[int], strides: Sequence[int], *, num_classes: int, channels: int = 256,
                 dropout: float = 0.1, in_levels: Sequence[int] | None = None, norm: str | None = "gn",
                 aux_head: bool = False, aux_weight: float = 0.4, aux_channels: int | None = None,
                 ignore_index: int = IGNORE_INDEX, dice_weight: float = 0.0,
                 class_weights: Sequence[float] | None = None) -> None:
        super().__init__()
        in_channels, strides = [int(c) for c in in_channels], [int(s) for s in strides]
        if len(in_channels) != len(strides):
            raise ValueError(f"in_channels {in_channels} and strides {strides} must have one entry per level")
        if int(num_classes) < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if int(channels) < 1:
            raise ValueError(f"channels (decoder width) must be >= 1, got {channels}")
        self.num_classes = int(num_classes)
        self.channels = int(channels)
        self.norm = norm
        self.ignore_index = int(ignore_index)
        self.dice_weight = float(dice_weight)
        self.aux_weight = float(aux_weight)
        self.in_levels = select_levels(strides, in_levels)
        self.level_channels = [in_channels[i] for i in self.in_levels]
        self.level_strides = [strides[i] for i in self.in_levels]
        #: stride of the logits w.r.t. the input image.
        self.output_stride = self.level_strides[0]
        if class_weights is not None:
            w = torch.as_tensor(list(class_weights), dtype=torch.float32)
            if w.numel() != self.num_classes or bool((w < 0).any()):
                raise ValueError(f"class_weights must hold num_classes={self.num_classes} non-negative floats, "
                                 f"got {list(class_weights)}")
            self.register_buffer("class_weights", w, persistent=False)
        else:
            self.class_weights = None
        self.classifier = nn.Sequential(nn.Dropout2d(float(dropout)), nn.Conv2d(self.channels, self.num_classes, 1))
        nn.init.normal_(self.classifier[1].weight, std=0.01)
        nn.init.zeros_(self.classifier[1].bias)
        self.aux: nn.Module | None = None
        self.aux_level: int | None = None
        if aux_head:
            pos = min(range(len(self.in_levels)), key=lambda i: (abs(self.level_strides[i] - 16), -i))
            self.aux_level = pos
            width = int(aux_channels or self.channels)
            self.aux = nn.Sequential(conv_norm_act(self.level_channels[pos], width, 3, norm=norm),
                                     nn.Dropout2d(float(dropout)), nn.Conv2d(width, self.num_classes, 1))

    # ------------------------------------------------------------------ forward
    def decode(self, feats: list[torch.Tensor]) -> torch.Tensor:
        """Args: feats, the selected levels finest first. Returns: ``(B, channels, H / s0, W / s0)``."""
        raise NotImplementedError(f"{type(self).__name__} must implement decode(feats)")

    def forward(self, features: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """Args:
            features: every input level ``(B, C_i, H / s_i, W / s_i)``.
        Returns:
            ``{"logits": (B, K, H / s0, W / s0)}`` plus, in training with ``aux_head``, ``"aux"``
            ``(B, K, H / 16, W / 16)``.
        """
        if len(features) <= max(self.in_levels):
            raise ValueError(f"{type(self).__name__} reads levels {self.in_levels} but got {len(features)} "
                             "feature maps")
        feats = [features[i] for i in self.in_levels]
        out = {"logits": self.classifier(self.decode(feats))}
        if self.aux is not None and self.training:
            out["aux"] = self.aux(feats[self.aux_level])
        return out

    # ------------------------------------------------------------------ loss
    def _targets(self, targets: Any, image_sizes: Sequence[Sequence[int]] | None, device: torch.device
                 ) -> torch.Tensor:
        """Targets as one ``(B, H, W)`` int64 tensor, pixels outside each image's valid size set to ignore."""
        if isinstance(targets, torch.Tensor):
            parts = [targets]
        else:
            parts = list(targets) if isinstance(targets, (list, tuple)) else []
        bad = [t.dtype for t in parts
               if isinstance(t, torch.Tensor) and (t.dtype.is_floating_point or t.dtype == torch.bool)]
        if bad:
            raise TypeError("semantic segmentation targets must hold integer class indices (int64, 255 = ignore), "
                            f"got {bad[0]}; convert class maps with .long(), not a float/bool mask")
        if isinstance(targets, torch.Tensor):
            tgt = targets
        elif isinstance(targets, (list, tuple)) and targets and all(isinstance(t, torch.Tensor) for t in targets):
            h = max(int(t.shape[-2]) for t in targets)
            w = max(int(t.shape[-1]) for t in targets)
            tgt = torch.full((len(targets), h, w), self.ignore_index, dtype=torch.long, device=device)
            for i, t in enumerate(targets):
                tgt[i, : t.shape[-2], : t.shape[-1]] = t.reshape(t.shape[-2], t.shape[-1])
        else:
            raise TypeError("semantic segmentation targets must be a (B, H, W) int64 tensor (255 = ignore) or a list "
                            f"of (H, W) tensors, got {type(targets).__name__}")
        if tgt.dim() == 4 and tgt.shape[1] == 1:
            tgt = tgt[:, 0]
        if tgt.dim() != 3:
            raise ValueError(f"semantic segmentation targets must be (B, H, W), got shape {tuple(tgt.shape)}")
        tgt = tgt.to(device=device, dtype=torch.long)
        if image_sizes is not None:
            if len(image_sizes) != tgt.shape[0]:
                raise ValueError(f"got {len(image_sizes)} image sizes for {tgt.shape[0]} targets")
            H, W = tgt.shape[-2:]
            if any(int(h) < H or int(w) < W for h, w in image_sizes):
                tgt = tgt.clone()
                for i, (h, w) in enumerate(image_sizes):
                    tgt[i, int(h):, :] = self.ignore_index
                    tgt[i, :, int(w):] = self.ignore_index
        return tgt

    @classmethod
    def bind_data(cls, kwargs: dict[str, Any], info: Mapping[str, Any]) -> list[str] | None:
        """Classes of the dataset, preceded by ``background`` when its masks have one (COCO-style data)."""
        names = list(info["class_names"])
        if info.get("has_background", True):
            names = ["background", *names]
        _set_num_classes(cls, kwargs, len(names), names)
        return names

    def compute_loss(self, raw: Mapping[str, torch.Tensor], targets: Any,
                     image_sizes: Sequence[Sequence[int]] | None = None) -> dict[str, torch.Tensor]:
        """Cross-entropy (+ dice, + auxiliary cross-entropy) at the target resolution.

        Args:
            raw: :meth:`forward` output; logits are upsampled (bilinear) to the target size.
            targets: ``(B, H, W)`` int64 class maps, ``ignore_index`` (255) where unlabelled or padded; a list of
                ``(H_i, W_i)`` maps is padded with ``ignore_index``.
            image_sizes: optional valid ``(h, w)`` per image; pixels beyond it are ignored too.
        Returns:
            ``{"loss_seg"}`` plus ``"loss_dice"`` when ``dice_weight > 0`` and ``"loss_aux"`` when ``raw`` has
            ``"aux"``; each already weighted, so the total is their sum.
        """
        logits = raw["logits"] if isinstance(raw, Mapping) else raw
        tgt = self._targets(targets, image_sizes, logits.device)
        full = resize_to(logits.float(), tgt.shape[-2:])
        check_mask_targets(full, tgt, self.ignore_index)
        out = {"loss_seg": masked_cross_entropy(full, tgt, ignore_index=self.ignore_index, weight=self.class_weights)}
        if self.dice_weight > 0:
            out["loss_dice"] = self.dice_weight * dice_loss(full, tgt, self.ignore_index)
        if isinstance(raw, Mapping) and raw.get("aux") is not None:
            aux = resize_to(raw["aux"].float(), tgt.shape[-2:])
            out["loss_aux"] = self.aux_weight * masked_cross_entropy(aux, tgt, ignore_index=self.ignore_index,
                                                                     weight=self.class_weights)
        return out

    # ------------------------------------------------------------------ post-processing
    @torch.no_grad()
    def predict(self, raw: Mapping[str, torch.Tensor] | torch.Tensor, image_sizes: Sequence[Sequence[int]], *,
                    output_sizes: Sequence[Sequence[int]] | None = None, input_size: Sequence[int] | None = None,
                    return_probs: bool = False) -> list[dict[str, torch.Tensor]]:
        """Per-image class maps.

        Logits are upsampled to the padded input size, cropped to each image's valid size, then resized to
        ``output_sizes`` (e.g. the original resolution) when given.

        Args:
            raw: :meth:`forward` output (logits at ``output_stride``), or a tensor of full-resolution logits
                ``(B, K, H, W)`` such as :func:`sliding_window_logits` returns.
            image_sizes: valid ``(h, w)`` of each image inside the padded input batch.
            output_sizes: ``(H, W)`` to return each mask at (default: its valid size).
            input_size: ``(H, W)`` of the padded input batch (default: logits size x ``output_stride`` for a
                :meth:`forward` dict, the logits size for a tensor).
            return_probs: also return softmax ``probs``.
        Returns:
            one dict per image: ``mask`` ``(H, W)`` int64 class indices and, with ``return_probs``, ``probs``
            ``(K, H, W)`` float32.
        """
        logits = raw["logits"] if isinstance(raw, Mapping) else raw
        b = logits.shape[0]
        if len(image_sizes) != b:
            raise ValueError(f"got {len(image_sizes)} image sizes for a batch of {b} logits")
        if output_sizes is not None and len(output_sizes) != b:
            raise ValueError(f"got {len(output_sizes)} output sizes for a batch of {b} logits")
        if input_size is None:
            s = self.output_stride if isinstance(raw, Mapping) else 1
            input_size = (logits.shape[-2] * s, logits.shape[-1] * s)
        results = []
        for i in range(b):
            ih, iw = int(image_sizes[i][0]), int(image_sizes[i][1])
            x = resize_to(logits[i:i + 1].float(), input_size)[..., :ih, :iw]
            if output_sizes is not None:
                x = resize_to(x, output_sizes[i])
            res = {"mask": x[0].argmax(0)}
            if return_probs:
                res["probs"] = x[0].softmax(0)
            results.append(res)
        return results

    def postprocess(self, raw: Mapping[str, torch.Tensor] | torch.Tensor, infos: Sequence[Any], **options: Any
                    ) -> list[SemanticSegmentation]:
        """One :class:`~zoo.results.SemanticSegmentation` per image: the class map at the original size."""
        preds = self.predict(raw, [tuple(i.size) for i in infos], output_sizes=[tuple(i.orig_size) for i in infos],
                             **options)
        names = self.class_names or [str(i) for i in range(self.num_classes)]
        return [SemanticSegmentation(mask=p["mask"].long().cpu(), class_names=list(names)) for p in preds]
