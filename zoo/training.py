"""``train(cfg)``: everything ``train.py`` does, callable from tests."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from zoo.config import TrainConfig, to_container, validate

log = logging.getLogger(__name__)

__all__ = ["train", "build_trainer", "format_metrics"]


def format_metrics(metrics: dict[str, float], title: str = "metrics") -> str:
    """A two-column table of metrics."""
    if not metrics:
        return f"{title}: (none)"
    w = max(len(k) for k in metrics)
    lines = [title, "-" * (w + 14)]
    lines += [f"{k:<{w}}  {v:>10.4f}" if isinstance(v, (int, float)) else f"{k:<{w}}  {v}" for k, v in metrics.items()]
    return "\n".join(lines)


class _DropTips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "litlogger" not in record.getMessage() and "LitLogger" not in record.getMessage()


def quiet_lightning() -> None:
    """Lightning logs through its own handler; stop its records from reaching Hydra's root handler twice, and
    drop its advertising tips."""
    for name in ("lightning.pytorch", "lightning.fabric"):
        lg = logging.getLogger(name)
        lg.propagate = False
        lg.addFilter(_DropTips())
        for h in lg.handlers:
            h.addFilter(_DropTips())
    import warnings

    warnings.filterwarnings("ignore", message=".*isinstance.treespec, LeafSpec.*")
    warnings.filterwarnings("ignore", message=".*No positive samples found in target.*")
    warnings.filterwarnings("ignore", message=".*is smaller than the logging interval.*")


def _set_threads(cfg: DictConfig) -> None:
    if cfg.trainer.threads:
        torch.set_num_threads(int(cfg.trainer.threads))


def build_trainer(cfg: DictConfig, out_dir: Path, *, monitor: str, mode: str, callbacks_extra: list | None = None):
    """A Lightning Trainer from the ``trainer``, ``callbacks`` and ``logger`` config groups."""
    import lightning.pytorch as pl
    from lightning.pytorch import callbacks as cb
    from lightning.pytorch import loggers as pl_loggers

    t = cfg.trainer
    c = cfg.callbacks
    from zoo.checkpointing import ResumableCSVLogger, build_run_callbacks

    callbacks: list = []
    # best.ckpt + an atomic last.ckpt on its own schedule, interrupt saves, writable check at fit setup
    # (zoo.checkpointing.ZooCheckpoint); mid-epoch resumable training data; the NaN/inf guard.
    ckpt_cb, safety_cbs = build_run_callbacks(cfg, out_dir, monitor=monitor, mode=mode)
    callbacks += [ckpt_cb, *safety_cbs]
    if c.early_stopping.enabled:
        es = c.early_stopping
        callbacks.append(cb.EarlyStopping(monitor=es.monitor or monitor, mode=es.mode or mode, patience=es.patience,
                                          min_delta=es.min_delta))
    loggers = []
    for name in cfg.logger.names:
        if name == "csv":
            loggers.append(ResumableCSVLogger(str(out_dir), name="csv", version=""))  # continues on resume
        elif name == "tensorboard":
            loggers.append(pl_loggers.TensorBoardLogger(str(out_dir), name="tensorboard", version=""))
        else:
            raise ValueError(f"logger.names: {name!r} unknown; use csv and/or tensorboard")
    if c.lr_monitor and loggers:
        callbacks.append(cb.LearningRateMonitor(logging_interval="step"))
    enable_pb = bool(t.enable_progress_bar) and c.progress_bar != "none"
    if enable_pb:
        callbacks.append(cb.RichProgressBar() if c.progress_bar == "rich" else cb.TQDMProgressBar(refresh_rate=10))
    callbacks += callbacks_extra or []
    kwargs: dict[str, Any] = dict(
        accelerator=t.accelerator, devices=t.devices, strategy=t.strategy, num_nodes=t.num_nodes,
        precision=t.precision, max_epochs=t.max_epochs, max_steps=t.max_steps, min_epochs=t.min_epochs,
        check_val_every_n_epoch=t.check_val_every_n_epoch,
        # pcgrad steps by hand (manual optimisation) and clips there itself
        gradient_clip_val=None if OmegaConf.select(cfg, "model.balance") == "pcgrad" else t.gradient_clip_val,
        accumulate_grad_batches=t.accumulate_grad_batches, log_every_n_steps=t.log_every_n_steps,
        deterministic=t.deterministic, benchmark=t.benchmark, fast_dev_run=t.fast_dev_run,
        num_sanity_val_steps=t.num_sanity_val_steps, enable_progress_bar=enable_pb, sync_batchnorm=t.sync_batchnorm,
        default_root_dir=str(out_dir), callbacks=callbacks, logger=loggers or False,
        enable_model_summary=False,
    )
    for key in ("limit_train_batches", "limit_val_batches", "val_check_interval"):
        if t[key] is not None:
            v = float(t[key])
            kwargs[key] = int(v) if v > 1 else v
    return pl.Trainer(**kwargs), ckpt_cb


def train(cfg: DictConfig) -> dict[str, Any]:
    """Train the configured task; returns ``{"metrics", "best_ckpt", "last_ckpt", "output_dir", "bundle"}``.

    The run folder (``paths.output_dir``) receives ``config.yaml`` (the resolved config), ``checkpoints/best.ckpt`` and
    ``last.ckpt``, logs, ``metrics.json`` (validation metrics of the best checkpoint) and, when ``export_bundle``, a
    serving bundle ``bundle/`` (safetensors + json) of the best weights.
    """
    import lightning.pytorch as pl

    from zoo.tasks import task_class

    cfg = validate(cfg, TrainConfig)
    quiet_lightning()
    out_dir = Path(cfg.paths.output_dir).expanduser().resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    from zoo.checkpointing import prepare_run_folder  # run-folder lock; refuses another run's checkpoints

    prepare_run_folder(cfg, out_dir)
    if cfg.paths.cache_dir:
        os.environ["ZOO_CACHE"] = str(Path(cfg.paths.cache_dir).expanduser())
    (out_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    _set_threads(cfg)
    pl.seed_everything(int(cfg.seed), workers=True, verbose=False)
    t0 = time.perf_counter()

    cls = task_class(cfg.model.task)
    datamodule, kwargs = cls.build(cfg)
    if cfg.ckpt_path and not Path(cfg.ckpt_path).is_file():
        raise FileNotFoundError(f"ckpt_path={cfg.ckpt_path!r} does not exist: give <run>/checkpoints/last.ckpt to resume")
    if cfg.ckpt_path:
        from zoo.hub.bundle import read_lightning_checkpoint

        # Same weights-only load Lightning does in fit(), but a refused pickle gets zoo's clear CheckpointLoadError
        # (which never suggests weights_only=False) instead of torch's raw message from deep inside fit().
        read_lightning_checkpoint(cfg.ckpt_path)
    module = cls(**kwargs, init_weights=not bool(cfg.ckpt_path))
    from zoo.callbacks import Visualize

    trainer, ckpt_cb = build_trainer(cfg, out_dir, monitor=module.main_metric, mode=module.main_mode,
                                     callbacks_extra=[Visualize(int(cfg.callbacks.visualize))])
    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.ckpt_path, weights_only=True if cfg.ckpt_path else None)
    fit_s = time.perf_counter() - t0

    best = ckpt_cb.best_model_path or None
    last = str(Path(ckpt_cb.dirpath) / "last.ckpt") if ckpt_cb.save_last else None
    result: dict[str, Any] = {"output_dir": str(out_dir), "best_ckpt": best, "last_ckpt": last,
                              "metrics": {}, "fit_seconds": fit_s, "bundle": None}
    if cfg.trainer.fast_dev_run:
        return result
    if cfg.run_eval and best:
        res = trainer.validate(module, datamodule=datamodule, ckpt_path=best, verbose=False, weights_only=True)
        metrics = {k: float(v) for k, v in (res[0] if res else {}).items()}
        result["metrics"] = metrics
        if trainer.is_global_zero:
            (out_dir / "metrics.json").write_text(json.dumps({"checkpoint": best, "metrics": metrics,
                                                               "fit_seconds": fit_s}, indent=2))
            print(format_metrics(metrics, f"validation metrics of {best}"), flush=True)
    if cfg.export_bundle and best and trainer.is_global_zero:
        try:
            from zoo.hub.export import export_checkpoint
        except ImportError:
            log.info("zoo.hub.export not available: no bundle written")
        else:
            result["bundle"] = str(export_checkpoint(best, out_dir / "bundle", metrics=result["metrics"],
                                                     config=to_container(cfg)))
    return result
