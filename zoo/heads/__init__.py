"""Heads: each offers ``forward(features) -> raw``, ``loss(raw, targets) -> dict`` and ``postprocess(raw, ...)``."""
