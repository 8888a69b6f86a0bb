"""``evaluate(cfg)``: rebuild a model from what a checkpoint stores and score it on a dataset; or score an
existing COCO results json (``results=...``)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from zoo.config import EvalConfig, to_container, validate
from zoo.training import build_trainer, check_accelerator, format_metrics, quiet_lightning

log = logging.getLogger(__name__)

__all__ = ["evaluate", "load_task_from_checkpoint"]


def load_task_from_checkpoint(path: str | Path):
    """Rebuild a task (LightningModule) from a Lightning checkpoint alone (read with ``weights_only=True``): the
    architecture comes from the stored spec, never from the current config."""
    from zoo.hub.bundle import read_lightning_checkpoint
    from zoo.tasks import task_class

    ckpt = read_lightning_checkpoint(path)
    hp = ckpt.get("hyper_parameters")
    if not hp or "spec" not in hp:
        raise ValueError(f"{path} was not written by a zoo task (no model spec among its hyper-parameters)")
    cls = task_class(hp.get("spec", {}).get("task", "multitask"))
    module = cls(**{k: v for k, v in hp.items() if k in ("spec", "optimizer", "scheduler", "options", "data_info")},
                 init_weights=False)
    missing, unexpected = module.load_state_dict(ckpt["state_dict"], strict=False)
    if missing or unexpected:
        raise ValueError(f"{path}: weights do not match the stored spec (missing {missing[:5]}, unexpected {unexpected[:5]})")
    return module


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Score a checkpoint (``ckpt_path``) or a results json (``results``) on ``data``'s validation split.

    Writes ``metrics.json`` into ``paths.output_dir`` and prints a metrics table. Returns ``{"metrics": ...}``.
    """
    cfg = validate(cfg, EvalConfig)
    check_accelerator(cfg.trainer)
    quiet_lightning()
    out_dir = Path(cfg.paths.output_dir).expanduser().resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    if cfg.trainer.threads:
        import torch

        torch.set_num_threads(int(cfg.trainer.threads))
    if cfg.results:
        return _score_results(cfg, out_dir)
    if not cfg.ckpt_path:
        raise ValueError("give ckpt_path=<run>/checkpoints/best.ckpt (or results=<detections.json> to score a results file)")
    module = load_task_from_checkpoint(cfg.ckpt_path)
    if cfg.postprocess:
        module.options.setdefault("postprocess", {}).update(to_container(cfg.postprocess))
    module.options["output_dir"] = str(out_dir)
    for ev in module.evaluators.values():
        ev.options["postprocess"] = dict(module.options.get("postprocess") or {})
    datamodule = module.eval_datamodule(cfg.data)
    from zoo.callbacks import Visualize

    trainer, _ = build_trainer(cfg_for_eval(cfg), out_dir, monitor=module.main_metric, mode=module.main_mode,
                               callbacks_extra=[Visualize(int(cfg.visualize))])
    res = trainer.validate(module, datamodule=datamodule, verbose=False)
    metrics = {k: float(v) for k, v in (res[0] if res else {}).items()}
    extra = getattr(module, "last_eval_report", None) or {}
    payload = {"checkpoint": str(cfg.ckpt_path), "data": to_container(cfg.data), "metrics": metrics, **extra}
    if trainer.is_global_zero:  # the other processes of a torchrun / srun launch share the folder
        (out_dir / "metrics.json").write_text(json.dumps(payload, indent=2, default=str))
        if extra.get("table"):
            print(extra["table"], flush=True)
        print(format_metrics(metrics, f"metrics of {cfg.ckpt_path}"), flush=True)
    return {"metrics": metrics, "output_dir": str(out_dir), **extra}


def cfg_for_eval(cfg: DictConfig) -> DictConfig:
    """Evaluation reuses the training trainer builder with no checkpointing or loggers."""
    from omegaconf import OmegaConf

    from zoo.config import CallbacksConf, LoggerConf

    c = OmegaConf.create({"trainer": to_container(cfg.trainer),
                          "callbacks": OmegaConf.structured(CallbacksConf(lr_monitor=False)),
                          "logger": OmegaConf.structured(LoggerConf(names=[]))})
    return c


def _score_results(cfg: DictConfig, out_dir: Path) -> dict[str, Any]:
    from zoo.data.datamodule import resolve_coco_split
    from zoo.metrics.coco_eval import evaluate_coco

    if not cfg.data.root:
        raise ValueError("results=... needs data=coco data.root=<folder with annotations/instances_<split>.json>")
    ann, _ = resolve_coco_split(Path(cfg.data.root), cfg.data.val_split, ann_file=cfg.data.val_ann)
    if not ann.is_file():
        ann, _ = resolve_coco_split(Path(cfg.data.root), cfg.data.train_split, ann_file=cfg.data.train_ann)
    res = evaluate_coco(str(ann), str(cfg.results), cfg.iou_type)
    table = res.table()
    print(table, flush=True)
    payload = {"results": str(cfg.results), "annotations": str(ann), "metrics": res.stats,
               "per_class_ap": res.per_class_ap, "iou_type": cfg.iou_type}
    (out_dir / "metrics.json").write_text(json.dumps(payload, indent=2))
    return {"metrics": res.stats, "per_class_ap": res.per_class_ap, "table": table, "output_dir": str(out_dir)}
