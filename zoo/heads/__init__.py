"""Heads and necks, each registered at its definition (``@register_head`` / ``@register_neck``, see
:mod:`zoo.heads.base` for the contract). Importing this package registers every built-in one; a new head is one file
plus one import line below. Only torch / torchvision are imported: this package is on the lean serving path."""

from zoo.heads.base import (
    Head, Neck, describe_heads, head_class, list_heads, list_necks, neck_class, register_head, register_neck,
)
from zoo.heads import classification, embedding, necks  # noqa: F401  (registration)
from zoo.heads import detection, instance, segmentation  # noqa: F401  (registration)
from zoo.heads import autoencoder, generation  # noqa: F401  (registration; diffusers is imported only when a head is built)

__all__ = ["Head", "Neck", "register_head", "register_neck", "head_class", "neck_class", "list_heads", "list_necks",
           "describe_heads"]
