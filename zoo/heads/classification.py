"""Image classification head (single-label softmax or multi-label sigmoid)."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ClassificationHead"]


class ClassificationHead(nn.Module):
    """Global pooling of one feature level, dropout and a linear classifier.

    Args:
        in_channels: channels of every backbone level (from ``TimmBackbone.channels``).
        strides: strides of every level (unused, part of the head contract).
        num_classes: number of classes.
        multilabel: sigmoid/BCE over independent labels instead of softmax/cross-entropy.
        feature_level: which level to pool (default: the last, coarsest one).
        hidden_dim: optional hidden layer (Linear-BN-GELU) before the classifier.
        dropout: dropout before the classifier.
        label_smoothing: cross-entropy label smoothing (single-label only).
        pos_weight: optional BCE positive weight (multi-label only).
    """

    def __init__(self, in_channels: Sequence[int], strides: Sequence[int] | None = None, *, num_classes: int,
                 multilabel: bool = False, feature_level: int = -1, hidden_dim: int | None = None,
                 dropout: float = 0.0, label_smoothing: float = 0.0, pos_weight: float | None = None) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = int(num_classes)
        self.multilabel = bool(multilabel)
        self.feature_level = int(feature_level)
        self.label_smoothing = float(label_smoothing)
        self.pos_weight = pos_weight
        ch = list(in_channels)[self.feature_level]
        layers: list[nn.Module] = [nn.AdaptiveAvgPool2d(1), nn.Flatten(1)]
        if hidden_dim:
            layers += [nn.Linear(ch, hidden_dim), nn.BatchNorm1d(hidden_dim), nn.GELU()]
            ch = hidden_dim
        layers += [nn.Dropout(dropout), nn.Linear(ch, self.num_classes)]
        self.net = nn.Sequential(*layers)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        """Args: features, the backbone levels. Returns: logits ``(B, num_classes)``."""
        return self.net(features[self.feature_level])

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        """Args:
            logits: ``(B, K)``.
            targets: class indices ``(B,)`` (single-label) or multi-hot ``(B, K)`` (multi-label).
        Returns: ``{"loss_cls": scalar}``.
        """
        if self.multilabel:
            pw = None
            if self.pos_weight is not None:
                pw = torch.full((self.num_classes,), float(self.pos_weight), device=logits.device)
            loss = F.binary_cross_entropy_with_logits(logits.float(), targets.float(), pos_weight=pw)
        else:
            loss = F.cross_entropy(logits.float(), targets.long(), label_smoothing=self.label_smoothing)
        return {"loss_cls": loss}

    def postprocess(self, logits: torch.Tensor, *, top_k: int = 5) -> list[dict[str, torch.Tensor]]:
        """Probabilities per image.

        Returns: one dict per image: ``scores`` ``(K,)`` probabilities (softmax, or per-label sigmoid), ``labels``
        the ``top_k`` label indices by score and ``top_scores`` their scores.
        """
        probs = logits.float().sigmoid() if self.multilabel else logits.float().softmax(-1)
        k = min(top_k, self.num_classes)
        top_s, top_i = probs.topk(k, dim=-1)
        return [{"scores": p, "labels": i, "top_scores": s} for p, i, s in zip(probs, top_i, top_s)]
