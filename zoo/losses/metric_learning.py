"""Metric-learning losses for the embedding head, built on ``pytorch-metric-learning`` (PML).

:func:`build_metric_loss` returns a :class:`MetricLoss` module called as ``loss(embeddings (B, D), labels (B,))``.
PML is imported only when a loss is built: this module is training-only, never on the serving path.

- ``arcface``: ``ArcFaceLoss(margin=28.6 degrees, scale=64)``; trainable class weights ``W (D, C)``.
- ``cosface``: ``CosFaceLoss(margin=0.35, scale=64)``; trainable class weights ``W (D, C)``.
- ``proxy_anchor``: ``ProxyAnchorLoss(margin=0.1, alpha=32)``; trainable proxies ``(C, D)``.
- ``multi_similarity``: ``MultiSimilarityLoss(alpha=2, beta=50, base=0.5)`` on pairs mined by
  ``MultiSimilarityMiner(epsilon=0.1)``.
- ``triplet``: ``TripletMarginLoss(margin=0.2)`` on batch-hard triplets (``BatchHardMiner``: per anchor the farthest
  positive and the nearest negative, L2 distance of normalised embeddings); mean over the non-zero triplet losses.
- ``supcon``: ``SupConLoss(temperature=0.1)`` (Khosla et al. 2020).
- ``infonce``: ``NTXentLoss(temperature=0.07)`` (NT-Xent / InfoNCE; positives are same-label pairs, so give two
  views of an image the same label for SimCLR-style training).

Keyword arguments are passed to the PML loss constructor unchanged (so ArcFace's ``margin`` is in *degrees*, PML's
convention); ``miner_kwargs`` goes to the miner (``multi_similarity``: ``epsilon``).

Under DDP (``gather_across_ranks``, on by default) the loss and its miner see the embeddings and labels of every
rank (:func:`zoo.distributed.gather_for_loss`: cross-rank negatives, the same pairs mined on every rank), and the
gradient the model receives after DDP's mean is that of the loss on the union of the ranks' batches. PML's
``DistributedLossWrapper`` is not used: it puts the local rows first (a different order on each rank), wraps the
miner separately, and multiplies the loss by the world size, which also multiplies the gradient of the loss's own
parameters (ArcFace / CosFace weights, proxies) by it.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

__all__ = ["MetricLoss", "build_metric_loss", "METRIC_LOSSES"]

#: Valid names for :func:`build_metric_loss`.
METRIC_LOSSES = ("arcface", "cosface", "proxy_anchor", "multi_similarity", "triplet", "supcon", "infonce")

_PARAMETRIC = {"arcface", "cosface", "proxy_anchor"}


class MetricLoss(nn.Module):
    """A PML loss (and optional miner) behind the ``loss(embeddings, labels) -> scalar`` interface.

    The loss is computed in float32 with autocast disabled (PML casts its class weights / proxies to the
    embeddings' dtype, which must stay float32 under mixed precision).

    Args:
        name: the factory name (for logging and error messages).
        loss_fn: a ``pytorch_metric_learning.losses`` module.
        miner: an optional ``pytorch_metric_learning.miners`` module whose output is passed to ``loss_fn``.
        num_classes: number of classes (checked against the labels of parametric losses).
        gather_across_ranks: in a DDP training step, mine and compute the loss over every rank's embeddings (only
            this rank's rows carry gradient); nothing changes in one process or without gradients.

    Attributes:
        has_parameters: ``True`` when the loss owns trainable parameters (ArcFace/CosFace class weights,
            Proxy-Anchor proxies) that the optimizer must include (often with a larger learning rate).
    """

    def __init__(self, name: str, loss_fn: nn.Module, miner: nn.Module | None = None, *, num_classes: int,
                 gather_across_ranks: bool = True) -> None:
        super().__init__()
        self.name = name
        self.loss_fn = loss_fn
        self.miner = miner
        self.num_classes = int(num_classes)
        self.gather_across_ranks = bool(gather_across_ranks)

    @property
    def has_parameters(self) -> bool:
        """Whether the loss has trainable parameters that must be given to the optimizer."""
        return any(p.requires_grad for p in self.parameters())

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Args:
            embeddings: ``(B, D)`` embeddings (normalised or not: every loss here works on cosine similarity or
                on distances between L2-normalised vectors).
            labels: ``(B,)`` integer class labels; parametric losses need them in ``0..num_classes-1``.
        Returns: scalar loss (0, still attached to the graph, when nothing can be mined).
        """
        if embeddings.dim() != 2:
            raise ValueError(f"{self.name} loss expects embeddings (B, D), got shape {tuple(embeddings.shape)}")
        if labels.dim() != 1 or labels.shape[0] != embeddings.shape[0]:
            raise ValueError(f"{self.name} loss expects labels (B,) = ({embeddings.shape[0]},), "
                             f"got shape {tuple(labels.shape)}")
        if labels.dtype.is_floating_point or labels.dtype == torch.bool:
            raise TypeError(f"{self.name} loss expects integer labels, got {labels.dtype}")
        labels = labels.long()
        if self.name in _PARAMETRIC and labels.numel() and (int(labels.min()) < 0 or
                                                            int(labels.max()) >= self.num_classes):
            raise ValueError(f"{self.name} loss got labels in [{int(labels.min())}, {int(labels.max())}] but "
                             f"num_classes={self.num_classes}; labels must be 0..{self.num_classes - 1}")
        with torch.autocast(device_type=embeddings.device.type, enabled=False):
            emb = embeddings.float()
            if self.gather_across_ranks:
                from zoo.distributed import gather_for_loss

                emb, labels = gather_for_loss(emb, labels)
            indices = self.miner(emb, labels) if self.miner is not None else None
            return self.loss_fn(emb, labels, indices)

    def extra_repr(self) -> str:
        return (f"name={self.name!r}, num_classes={self.num_classes}, has_parameters={self.has_parameters}, "
                f"gather_across_ranks={self.gather_across_ranks}")


def _import_pml() -> tuple[Any, Any]:
    try:
        from pytorch_metric_learning import losses, miners
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("metric-learning losses need pytorch-metric-learning: "
                          "`pip install pytorch-metric-learning`") from err
    return losses, miners


def build_metric_loss(name: str, *, num_classes: int, embedding_dim: int,
                      miner_kwargs: dict[str, Any] | None = None, gather_across_ranks: bool = True,
                      **kwargs: Any) -> MetricLoss:
    """Build a metric-learning loss by name.

    Args:
        name: one of :data:`METRIC_LOSSES` (case-insensitive; ``-`` and ``_`` are equivalent).
        num_classes: number of training classes (size of the class weights / proxies).
        embedding_dim: embedding dimension ``D``.
        miner_kwargs: keyword arguments of the miner (``multi_similarity``, ``triplet``).
        gather_across_ranks: under DDP, the loss over every rank's embeddings (see :class:`MetricLoss`).
        **kwargs: keyword arguments of the PML loss (``margin``, ``scale``, ``alpha``, ``temperature``, ...).
    Returns: a :class:`MetricLoss` called as ``loss(embeddings (B, D), labels (B,)) -> scalar``.
    """
    key = str(name).lower().replace("-", "_")
    aliases = {"ntxent": "infonce", "nt_xent": "infonce", "multisimilarity": "multi_similarity",
               "proxyanchor": "proxy_anchor", "triplet_batch_hard": "triplet"}
    key = aliases.get(key, key)
    if key not in METRIC_LOSSES:
        raise ValueError(f"unknown metric loss {name!r}; valid names: {list(METRIC_LOSSES)}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if embedding_dim < 1:
        raise ValueError(f"embedding_dim must be >= 1, got {embedding_dim}")
    losses, miners = _import_pml()
    mk = dict(miner_kwargs or {})
    builders: dict[str, Callable[[], tuple[nn.Module, nn.Module | None]]] = {
        "arcface": lambda: (losses.ArcFaceLoss(num_classes, embedding_dim, **kwargs), None),
        "cosface": lambda: (losses.CosFaceLoss(num_classes, embedding_dim, **kwargs), None),
        "proxy_anchor": lambda: (losses.ProxyAnchorLoss(num_classes, embedding_dim, **kwargs), None),
        "multi_similarity": lambda: (losses.MultiSimilarityLoss(**kwargs), miners.MultiSimilarityMiner(**mk)),
        "triplet": lambda: (losses.TripletMarginLoss(**{"margin": 0.2, **kwargs}), miners.BatchHardMiner(**mk)),
        "supcon": lambda: (losses.SupConLoss(**kwargs), None),
        "infonce": lambda: (losses.NTXentLoss(**kwargs), None),
    }
    if mk and key not in ("multi_similarity", "triplet"):
        raise ValueError(f"metric loss {key!r} has no miner; remove miner_kwargs={mk}")
    try:
        loss_fn, miner = builders[key]()
    except TypeError as err:
        raise TypeError(f"bad keyword arguments for metric loss {key!r} ({kwargs}, miner {mk}): {err}") from err
    return MetricLoss(key, loss_fn, miner, num_classes=num_classes, gather_across_ranks=gather_across_ranks)
