"""Layers every head and neck shares: normalisation by name (one factory for the FPN, the detection towers and the
segmentation decoders). Only torch is imported: lean serving path."""

from __future__ import annotations

from torch import nn

__all__ = ["group_count", "norm_layer", "NORMS"]

#: Accepted ``norm`` names (case-insensitive); ``None`` / ``"none"`` / ``""`` mean no normalisation.
NORMS = {"gn": "gn", "groupnorm": "gn", "group_norm": "gn", "bn": "bn", "batchnorm": "bn", "batch_norm": "bn",
         "none": None, "": None}


def group_count(channels: int, preferred: int = 32, min_per_group: int = 1) -> int:
    """The largest GroupNorm group count ``<= preferred`` that divides ``channels`` with at least ``min_per_group``
    channels per group where possible (1 when none does)."""
    for g in range(min(preferred, max(1, channels // max(1, min_per_group))), 0, -1):
        if channels % g == 0:
            return g
    return 1


def norm_layer(norm: str | None, channels: int, *, min_per_group: int = 1, what: str = "norm") -> nn.Module | None:
    """A normalisation layer by name: ``"gn"`` (GroupNorm, up to 32 groups, see :func:`group_count`), ``"bn"``
    (BatchNorm2d) or ``None`` (returns ``None``). ``what`` names the option in the error for other names."""
    key = None if norm is None else str(norm).lower()
    if key not in NORMS and key is not None:
        raise ValueError(f"{what}={norm!r} is not supported; use 'gn', 'bn' or None")
    kind = NORMS.get(key) if key is not None else None
    if kind == "gn":
        return nn.GroupNorm(group_count(channels, min_per_group=min_per_group), channels)
    if kind == "bn":
        return nn.BatchNorm2d(channels)
    return None
