"""Losses. ``zoo.losses.segmentation``: per-pixel cross-entropy and dice; ``zoo.losses.metric_learning``:
metric-learning losses for the embedding head (pytorch-metric-learning, imported only when a loss is built).

Only torch is imported at module level here, so heads on the serving path may import their losses from this package.
"""

from zoo.losses.metric_learning import METRIC_LOSSES, MetricLoss, build_metric_loss

__all__ = ["METRIC_LOSSES", "MetricLoss", "build_metric_loss"]
