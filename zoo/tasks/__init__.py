"""LightningModules per task. ``TASKS`` maps ``model.task`` to the task class path (imported on demand)."""

from __future__ import annotations

import importlib

TASKS: dict[str, str] = {
    "classification": "zoo.tasks.classification:ClassificationTask",
    "detection": "zoo.tasks.detection:DetectionTask",
    "semantic": "zoo.tasks.semantic:SemanticTask",
    "instance": "zoo.tasks.instance:InstanceTask",
    "similarity": "zoo.tasks.similarity:SimilarityTask",
    "multitask": "zoo.tasks.multitask:MultiTask",
}


def task_class(name_or_path: str):
    """The task class for a ``model.task`` name or a ``zoo.tasks...:Class`` path (only inside zoo)."""
    target = TASKS.get(name_or_path, name_or_path)
    mod, _, attr = target.partition(":")
    if not mod.startswith("zoo.") or not attr:
        raise ValueError(f"unknown task {name_or_path!r}; use one of {sorted(TASKS)}")
    return getattr(importlib.import_module(mod), attr)
