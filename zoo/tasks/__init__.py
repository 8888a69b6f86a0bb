"""The training task. One LightningModule, :class:`zoo.tasks.multitask.MultiTask`, trains any set of heads; every
``model.task`` name (``classification``, ``detection``, ``semantic``, ``instance``, ``similarity``, ``multitask``)
is a preset of heads for it, so checkpoints of every preset rebuild through :func:`task_class`."""

from __future__ import annotations

#: ``model.task`` names (the presets in conf/model/); all are trained by the one task.
TASK_NAMES = ("classification", "detection", "semantic", "instance", "similarity", "multitask")


def task_class(name: str = "multitask"):
    """The task class for a ``model.task`` name (every preset is the one :class:`MultiTask`)."""
    if name not in TASK_NAMES:
        raise ValueError(f"unknown task {name!r}; use one of {list(TASK_NAMES)}")
    from zoo.tasks.multitask import MultiTask

    return MultiTask
