"""Embedding head for similarity search / metric learning: pooling, projection, optional BNNeck, L2 normalisation.

The metric-learning loss is not part of the head (it may own trainable proxies, and the serving path must not need
``pytorch-metric-learning``): build it with :func:`zoo.losses.metric_learning.build_metric_loss` in the training task.
Only torch is imported here: this module is on the lean serving path.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from zoo.heads.base import Head, register_head
from zoo.results import Embedding

__all__ = ["EmbeddingHead", "GeM", "AttentionPool2d", "POOLINGS"]

#: Pooling names accepted by :class:`EmbeddingHead`.
POOLINGS = ("gem", "avg", "attention")


class GeM(nn.Module):
    """Generalised-mean pooling (Radenović et al. 2018) with a learnable exponent.

    ``out = (mean_{h,w} clamp(x, eps)^p)^(1/p)``; ``p = 1`` is average pooling and ``p -> inf`` max pooling.
    Computed in float32 so ``x^p`` does not overflow under fp16 autocast.

    Args:
        p: initial exponent (must be > 0).
        learnable: make ``p`` a trainable parameter.
        eps: lower clamp of the activations (GeM needs non-negative inputs).
    """

    def __init__(self, p: float = 3.0, *, learnable: bool = True, eps: float = 1e-6) -> None:
        super().__init__()
        if p <= 0:
            raise ValueError(f"gem_p must be > 0, got {p}")
        p_t = torch.tensor(float(p))
        if learnable:
            self.p = nn.Parameter(p_t)
        else:
            self.register_buffer("p", p_t)
        self.eps = float(eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x ``(B, C, H, W)``. Returns: ``(B, C)`` float32."""
        p = self.p.float().clamp(min=1e-3)  # keep the exponent positive even if training pushes it below 0
        pooled = x.float().clamp(min=self.eps).pow(p).mean(dim=(-2, -1))
        return pooled.pow(1.0 / p)

    def extra_repr(self) -> str:
        return f"p={float(self.p):.3f}, eps={self.eps}"


class AttentionPool2d(nn.Module):
    """Spatial attention pooling: a 1x1 convolution scores every location, a softmax over ``H*W`` turns the scores
    into weights, and the output is the weighted sum of the feature vectors.

    Args:
        channels: input channels ``C``.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.score = nn.Conv2d(channels, 1, kernel_size=1)
        nn.init.zeros_(self.score.weight)  # start as average pooling
        nn.init.zeros_(self.score.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x ``(B, C, H, W)``. Returns: ``(B, C)``."""
        weights = self.score(x).flatten(1).float().softmax(dim=-1)  # (B, H*W)
        return torch.einsum("bn,bcn->bc", weights.to(x.dtype), x.flatten(2))


@register_head("embedding")
class EmbeddingHead(Head):
    """Pool one feature level into an L2-normalised embedding.

    ``features[feature_level]`` -> pooling (GeM / average / attention) -> projection (one ``Linear``, or an MLP
    ``Linear-BN-ReLU-Linear`` when ``hidden_dim`` is given) -> ``features`` -> optional BNNeck
    (``BatchNorm1d`` without a learned shift, Luo et al. 2019) -> L2 normalisation -> ``embedding``.

    Train pair/triplet losses on ``features`` or ``embedding``, classification-style losses (ArcFace, CosFace,
    proxies) on ``embedding``; serve ``embedding`` (cosine similarity = dot product).

    Args:
        in_channels: channels of every input level (``TimmBackbone.channels`` or a neck's).
        strides: strides of every level (unused; part of the head contract).
        embedding_dim: output dimension ``D``.
        pooling: ``"gem"``, ``"avg"`` or ``"attention"``.
        hidden_dim: ``None`` for a single linear projection, else the width of the MLP's hidden layer.
        bnneck: apply a BNNeck between ``features`` and the normalised ``embedding``.
        feature_level: index of the level to pool (default: the last, coarsest one).
        gem_p: initial GeM exponent (learnable).
        dropout: dropout on the pooled vector before the projection.

    Training options (head config keys that are not constructor arguments): ``loss`` (a
    :data:`~zoo.losses.metric_learning.METRIC_LOSSES` name, default ``multi_similarity``), ``loss_kwargs`` (passed to
    the pytorch-metric-learning loss) and ``m_per_class`` (crops per identity in a class-balanced batch).
    """

    result_kind = "embedding"
    target_format = "similarity"
    default_name = "emb"
    feature_levels = "one level (feature_level, default the coarsest)"
    training_keys = ("loss", "loss_kwargs", "m_per_class", "gather_across_ranks")

    def __init__(self, in_channels: Sequence[int], strides: Sequence[int] | None = None, *,
                 embedding_dim: int = 256, pooling: str = "gem", hidden_dim: int | None = None,
                 bnneck: bool = False, feature_level: int = -1, gem_p: float = 3.0, dropout: float = 0.0) -> None:
        super().__init__()
        channels = list(in_channels)
        if not channels:
            raise ValueError("EmbeddingHead needs at least one input level; in_channels is empty")
        if not -len(channels) <= feature_level < len(channels):
            raise ValueError(f"feature_level={feature_level} is out of range for {len(channels)} input levels "
                             f"(channels {channels}); use -1 for the last level")
        if embedding_dim < 1:
            raise ValueError(f"embedding_dim must be >= 1, got {embedding_dim}")
        if hidden_dim is not None and hidden_dim < 1:
            raise ValueError(f"hidden_dim must be None (single Linear) or >= 1, got {hidden_dim}")
        pooling = str(pooling).lower()
        if pooling not in POOLINGS:
            raise ValueError(f"pooling={pooling!r} is not supported; use one of {list(POOLINGS)}")
        self.feature_level = int(feature_level)
        self.embedding_dim = int(embedding_dim)
        self.pooling_name = pooling
        ch = channels[self.feature_level]
        self.in_features = ch
        if pooling == "gem":
            self.pool: nn.Module = GeM(gem_p, learnable=True)
        elif pooling == "avg":
            self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1))
        else:
            self.pool = AttentionPool2d(ch)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        if hidden_dim is None:
            self.projection: nn.Module = nn.Linear(ch, self.embedding_dim)
        else:
            self.projection = nn.Sequential(
                nn.Linear(ch, hidden_dim, bias=False),
                nn.BatchNorm1d(hidden_dim),
                nn.ReLU(inplace=True),
                nn.Linear(hidden_dim, self.embedding_dim),
            )
        self.bnneck: nn.Module | None = None
        if bnneck:
            bn = nn.BatchNorm1d(self.embedding_dim)
            bn.bias.requires_grad_(False)  # BNNeck: scale only, no learned shift
            self.bnneck = bn

    def forward(self, features: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """Args:
            features: the input levels, each ``(B, C_i, H_i, W_i)``.
        Returns: ``{"embedding": (B, D)`` L2-normalised, ``"features": (B, D)`` before BNNeck and normalisation``}``.
        """
        if not isinstance(features, (list, tuple)):
            raise TypeError(f"EmbeddingHead expects a list of feature maps, got {type(features).__name__}")
        x = features[self.feature_level]
        if x.dim() != 4 or x.shape[1] != self.in_features:
            raise ValueError(f"EmbeddingHead level {self.feature_level} must be (B, {self.in_features}, H, W), "
                             f"got {tuple(x.shape)}")
        pooled = self.dropout(self.pool(x).to(x.dtype))
        feats = self.projection(pooled)
        out = self.bnneck(feats) if self.bnneck is not None else feats
        return {"embedding": F.normalize(out.float(), dim=-1), "features": feats}

    @classmethod
    def bind_data(cls, kwargs: dict[str, Any], info: Mapping[str, Any]) -> list[str] | None:
        """Identities are not classes of the served model (held-out identities differ by design): no class names."""
        return None

    @classmethod
    def from_model_config(cls, kwargs: dict[str, Any], model_cfg: Mapping[str, Any], data_cfg: Mapping[str, Any]) -> None:
        """``model.embedding_dim``, ``model.loss`` and ``model.extra.m_per_class`` / ``loss_kwargs`` /
        ``gather_across_ranks`` of the similarity preset, where the head's config does not set them."""
        kwargs.setdefault("embedding_dim", int(model_cfg.get("embedding_dim") or 256))
        extra = dict(model_cfg.get("extra") or {})
        if model_cfg.get("loss"):
            kwargs.setdefault("loss", model_cfg["loss"])
        for key in ("m_per_class", "loss_kwargs", "gather_across_ranks"):
            if key in extra:
                kwargs.setdefault(key, extra[key])

    def make_criterion(self, options: Mapping[str, Any]) -> nn.Module:
        """The metric-learning loss (``options``: ``loss``, ``loss_kwargs``, ``num_train_identities``,
        ``gather_across_ranks``: under DDP the loss over every rank's batch, default on)."""
        from zoo.losses import build_metric_loss

        gather = options.get("gather_across_ranks")
        return build_metric_loss(options.get("loss") or "multi_similarity",
                                 num_classes=int(options.get("num_train_identities") or 1),
                                 embedding_dim=self.embedding_dim, gather_across_ranks=True if gather is None
                                 else bool(gather), **dict(options.get("loss_kwargs") or {}))

    def batch_sampler(self, options: Mapping[str, Any], seed: int):
        """Class-balanced ``P x M`` batches (pair and proxy losses need several crops of each identity)."""
        return BalancedSamplerFactory(int(options.get("m_per_class") or 4), seed)

    def loss(self, raw: dict[str, torch.Tensor], batch: Mapping[str, Any],
             criterion: nn.Module | None = None) -> dict[str, torch.Tensor]:
        """``{"loss_metric"}``: ``criterion(embedding, identity labels)``; ``{}`` without identity targets."""
        targets = self.batch_targets(batch)
        if targets is None:
            return {}
        if criterion is None:
            raise ValueError("EmbeddingHead.loss needs the metric-learning criterion built by make_criterion()")
        return {"loss_metric": criterion(raw["embedding"], targets)}

    def compute_loss(self, raw: Any, targets: Any, image_sizes: Any = None) -> dict[str, torch.Tensor]:
        raise TypeError("EmbeddingHead's loss needs its criterion: call loss(raw, batch, criterion)")

    @torch.no_grad()
    def predict(self, raw: dict[str, torch.Tensor], image_sizes: Sequence[tuple[int, int]] | None = None
                ) -> torch.Tensor:
        """Args: raw, the output of :meth:`forward`. Returns: L2-normalised embeddings ``(B, D)`` float32."""
        return F.normalize(raw["embedding"].float(), dim=-1)

    def postprocess(self, raw: dict[str, torch.Tensor], infos: Sequence[Any] | None = None) -> list[Embedding]:
        """One :class:`~zoo.results.Embedding` per image."""
        return [Embedding(vector=v.float().cpu()) for v in self.predict(raw)]

    def export_outputs(self, raw: dict[str, torch.Tensor]) -> torch.Tensor:
        """The L2-normalised embeddings ``(B, D)`` (one output named after the head)."""
        return F.normalize(raw["embedding"].float(), dim=-1)


class BalancedSamplerFactory:
    """``(dataset, batch_size) -> ClassBalancedBatchSampler`` over the dataset's identity labels, sharded over
    DDP ranks (picklable, so loaders with workers can carry it)."""

    def __init__(self, m_per_class: int, seed: int) -> None:
        self.m_per_class, self.seed = int(m_per_class), int(seed)

    def __call__(self, ds, batch_size: int):
        import torch.distributed as dist

        from zoo.data.samplers import ClassBalancedBatchSampler

        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        rank = dist.get_rank() if world > 1 else 0
        labels = ds.labels() if hasattr(ds, "labels") else ds.dataset.labels()[: len(ds)]
        return ClassBalancedBatchSampler(labels, m_per_class=self.m_per_class, batch_size=batch_size, seed=self.seed,
                                         num_replicas=world, rank=rank)
