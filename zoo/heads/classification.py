"""Image classification head (single-label softmax or multi-label sigmoid)."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from zoo.heads.base import Head, register_head
from zoo.results import Classification

__all__ = ["ClassificationHead", "MISSING_LABEL"]

#: Single-label target of an image that has no label for this head (multi-task data): ignored by the loss.
MISSING_LABEL = -100


@register_head("classification")
class ClassificationHead(Head):
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

    result_kind = "classification"
    target_format = "classification"
    default_name = "cls"
    feature_levels = "one level (feature_level, default the coarsest)"
    options = ("top_k",)

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

    @property
    def data_format(self) -> str:
        return "multilabel" if self.multilabel else "classification"

    @classmethod
    def format_for(cls, kwargs: Mapping[str, Any]) -> str:
        return "multilabel" if kwargs.get("multilabel") else "classification"

    @classmethod
    def from_model_config(cls, kwargs: dict[str, Any], model_cfg: Mapping[str, Any], data_cfg: Mapping[str, Any]) -> None:
        """``model.multilabel`` (``null``: ``data.multilabel``) and ``model.label_smoothing`` (single-label only)."""
        if kwargs.get("multilabel") is None:
            ml = model_cfg.get("multilabel")
            kwargs["multilabel"] = bool(data_cfg.get("multilabel", False) if ml is None else ml)
        if "label_smoothing" not in kwargs and not kwargs["multilabel"]:
            kwargs["label_smoothing"] = float(model_cfg.get("label_smoothing", 0.0) or 0.0)

    def compute_loss(self, logits: torch.Tensor, targets: torch.Tensor,
                     image_sizes: Sequence[tuple[int, int]] | None = None) -> dict[str, torch.Tensor]:
        """Args:
            logits: ``(B, K)``.
            targets: class indices ``(B,)`` (single-label; :data:`MISSING_LABEL` where an image has none) or
                multi-hot ``(B, K)`` (multi-label).
        Returns: ``{"loss_cls": scalar}`` (0 with a gradient when no image of the batch has a label).
        """
        if self.multilabel:
            pw = None
            if self.pos_weight is not None:
                pw = torch.full((self.num_classes,), float(self.pos_weight), device=logits.device)
            loss = F.binary_cross_entropy_with_logits(logits.float(), targets.float(), pos_weight=pw)
        else:
            targets = targets.long()
            if bool((targets == MISSING_LABEL).all()):
                return {"loss_cls": logits.float().sum() * 0.0}
            loss = F.cross_entropy(logits.float(), targets, label_smoothing=self.label_smoothing,
                                   ignore_index=MISSING_LABEL)
        return {"loss_cls": loss}

    def predict(self, logits: torch.Tensor, image_sizes: Sequence[tuple[int, int]] | None = None, *,
                top_k: int = 5) -> list[dict[str, torch.Tensor]]:
        """Probabilities per image.

        Returns: one dict per image: ``scores`` ``(K,)`` probabilities (softmax, or per-label sigmoid), ``labels``
        the ``top_k`` label indices by score and ``top_scores`` their scores.
        """
        probs = logits.float().sigmoid() if self.multilabel else logits.float().softmax(-1)
        k = min(top_k, self.num_classes)
        top_s, top_i = probs.topk(k, dim=-1)
        return [{"scores": p, "labels": i, "top_scores": s} for p, i, s in zip(probs, top_i, top_s)]

    def postprocess(self, logits: torch.Tensor, infos: Sequence[Any] | None = None, *, top_k: int = 5
                    ) -> list[Classification]:
        """One :class:`~zoo.results.Classification` per image: the ``top_k`` class names and scores, and the full
        probability vector."""
        names = self.class_names or [str(i) for i in range(self.num_classes)]
        out = []
        for r in self.predict(logits, top_k=top_k):
            ids = [int(i) for i in r["labels"].cpu().tolist()]
            out.append(Classification(labels=[names[i] for i in ids], scores=r["top_scores"].float().cpu().tolist(),
                                      label_ids=ids, probs=r["scores"].float().cpu(), class_names=list(names),
                                      multilabel=self.multilabel))
        return out

    def export_outputs(self, logits: torch.Tensor) -> torch.Tensor:
        """The logits ``(B, K)`` (one output named after the head)."""
        return logits
