"""``train(cfg)``: everything ``train.py`` does, callable from tests."""

from __future__ import annotations

import json
import logging
import os
import pickle
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from zoo.config import TrainConfig, to_container, validate

log = logging.getLogger(__name__)

__all__ = ["train", "build_trainer", "build_strategy", "cluster_plugins", "fsdp_wrap_classes", "launched_externally",
           "format_metrics", "check_accelerator"]


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
    drop its advertising tips and warnings that do not apply to the zoo. Called again in each process that
    ``ddp_spawn`` starts (:class:`zoo.callbacks.ProcessWarnings`: a fresh interpreter inherits no warning
    filters)."""
    for name in ("lightning.pytorch", "lightning.fabric"):
        lg = logging.getLogger(name)
        lg.propagate = False
        for target in (lg, *lg.handlers):  # once each: this runs at every train() and in every spawned process
            if not any(isinstance(f, _DropTips) for f in target.filters):
                target.addFilter(_DropTips())
    import warnings

    warnings.filterwarnings("ignore", message=".*isinstance.treespec, LeafSpec.*")
    warnings.filterwarnings("ignore", message=".*No positive samples found in target.*")
    warnings.filterwarnings("ignore", message=".*is smaller than the logging interval.*")
    # the validation metrics and losses are reduced over every rank before they are logged (MultiTask's
    # on_validation_epoch_end), so Lightning's advice to sync them again would only double-count
    warnings.filterwarnings("ignore", message=r"It is recommended to use `self.log\('val/")


def _set_threads(cfg: DictConfig) -> None:
    if cfg.trainer.threads:
        torch.set_num_threads(int(cfg.trainer.threads))


def launched_externally() -> bool:
    """This process is one of several started by a launcher (torchrun, srun, or anything setting ``LOCAL_RANK``),
    not by Lightning itself."""
    from lightning.fabric.plugins.environments import SLURMEnvironment, TorchElasticEnvironment

    return "LOCAL_RANK" in os.environ or TorchElasticEnvironment.detect() or SLURMEnvironment.detect()


def fsdp_wrap_classes(cfg: DictConfig) -> set[type]:
    """The module classes that become FSDP units: ``trainer.fsdp.wrap`` (import paths), or the block classes of the
    backbone's timm architecture (classes named ``*Block`` among its modules, found on the meta device)."""
    import importlib

    from zoo.config import ConfigError

    names = list(OmegaConf.select(cfg, "trainer.fsdp.wrap", default=None) or [])
    if names:
        out = set()
        for path in names:
            mod, _, attr = str(path).rpartition(".")
            try:
                out.add(getattr(importlib.import_module(mod), attr))
            except (ImportError, AttributeError, ValueError) as err:
                raise ConfigError(f"trainer.fsdp.wrap: cannot import {path!r} ({err}); give classes as import paths, "
                                  "e.g. timm.models.vision_transformer.Block") from None
        return out
    import timm

    name = str(cfg.backbone.name)
    try:
        with torch.device("meta"):
            arch = timm.create_model(name, pretrained=False)
    except Exception as err:  # noqa: BLE001 - any architecture timm cannot build on the meta device
        raise ConfigError(f"trainer.fsdp.wrap=null: could not inspect backbone {name!r} for its block class ({err}); "
                          "give trainer.fsdp.wrap=[<module.path.BlockClass>]") from None
    found = {type(m) for m in arch.modules() if type(m).__name__.endswith("Block")}
    if not found:
        raise ConfigError(f"trainer.fsdp.wrap=null: backbone {name!r} has no module class named *Block to shard by; "
                          "give trainer.fsdp.wrap=[<module.path.Class>] (its repeated layer)")
    return found


def build_strategy(cfg: DictConfig) -> Any:
    """``trainer.strategy`` as Lightning takes it: ``fsdp`` becomes an ``FSDPStrategy`` (units = the backbone's
    blocks, optional activation checkpointing of the same blocks, full-state checkpoints); ``ddp_spawn`` under an
    external launcher (torchrun, srun), which already started one process per device, becomes ``ddp``."""
    t = cfg.trainer
    strategy = t.strategy
    if strategy == "fsdp":
        from lightning.pytorch.strategies import FSDPStrategy

        from zoo.config import ConfigError

        if OmegaConf.select(cfg, "model.ema.enabled", default=False):
            raise ConfigError("trainer.strategy=fsdp with model.ema.enabled=true: the EMA copy would be sharded with "
                              "the model and updated from shards; turn EMA off under FSDP")
        f = t.fsdp
        blocks = fsdp_wrap_classes(cfg)
        return FSDPStrategy(auto_wrap_policy=blocks,
                            activation_checkpointing_policy=set(blocks) if f.activation_checkpointing else None,
                            sharding_strategy=str(f.sharding_strategy), cpu_offload=bool(f.cpu_offload),
                            state_dict_type="full")
    if isinstance(strategy, str) and strategy in ("ddp_spawn", "ddp_fork", "ddp_notebook") and launched_externally():
        log.info("trainer.strategy=%s under an external launcher (torchrun / srun started the processes): using ddp",
                 strategy)
        return "ddp"
    return strategy


def cluster_plugins() -> list:
    """Under SLURM: Lightning's SLURM environment without its own auto-requeue (its SIGUSR1 handler writes an
    hpc_ckpt_*.ckpt beside zoo's checkpoints). Pre-emption and the time limit go through zoo's SIGTERM handling
    (finish the step, write last.ckpt, exit 143) and the requeue is the job script's (scripts/slurm/train.sbatch)."""
    from lightning.fabric.plugins.environments import SLURMEnvironment

    if not SLURMEnvironment.detect():
        return []
    return [SLURMEnvironment(auto_requeue=False)]


def build_trainer(cfg: DictConfig, out_dir: Path, *, monitor: str, mode: str, callbacks_extra: list | None = None):
    """A Lightning Trainer from the ``trainer``, ``callbacks`` and ``logger`` config groups."""
    import lightning.pytorch as pl
    from lightning.pytorch import callbacks as cb

    t = cfg.trainer
    c = cfg.callbacks
    from zoo.checkpointing import build_run_callbacks

    from zoo.callbacks import ProcessWarnings

    callbacks: list = [ProcessWarnings()]  # first: the filters hold before any other hook runs in a spawned process
    max_epochs = t.max_epochs
    if max_epochs is None:  # sized in optimizer steps (zoo.callbacks.AutoEpochs), unless max_steps ends the run
        if (t.max_steps or -1) > 0 or t.fast_dev_run:
            max_epochs = -1
        else:
            from zoo.callbacks import AutoEpochs

            a = t.auto_epochs
            callbacks.append(AutoEpochs(min_epochs=int(a.min_epochs), min_steps=int(a.min_steps), cap=int(a.cap)))
            max_epochs = int(a.min_epochs)  # replaced when fitting is set up, before the schedule is built
    # best.ckpt + an atomic last.ckpt on its own schedule, interrupt saves, writable check at fit setup
    # (zoo.checkpointing.ZooCheckpoint); mid-epoch resumable training data; the NaN/inf guard.
    ckpt_cb, safety_cbs = build_run_callbacks(cfg, out_dir, monitor=monitor, mode=mode)
    callbacks += [ckpt_cb, *safety_cbs]
    if c.early_stopping.enabled:
        es = c.early_stopping
        callbacks.append(cb.EarlyStopping(monitor=es.monitor or monitor, mode=es.mode or mode, patience=es.patience,
                                          min_delta=es.min_delta))
    loggers = build_loggers(cfg, out_dir)
    if c.lr_monitor and loggers:
        callbacks.append(cb.LearningRateMonitor(logging_interval="step"))
    enable_pb = bool(t.enable_progress_bar) and c.progress_bar != "none"
    if enable_pb:
        callbacks.append(cb.RichProgressBar() if c.progress_bar == "rich" else cb.TQDMProgressBar(refresh_rate=10))
    from zoo.callbacks import EpochSummary, ZooModelSummary

    # one line per epoch into the run's log file (train.log / evaluate.log), and on the console without a bar;
    # the model summary (Lightning's ModelSummary, shown through the same route) at the start of fitting
    callbacks.append(EpochSummary(console=not enable_pb))
    depth = int(OmegaConf.select(cfg, "callbacks.model_summary_depth", default=2) or 0)
    if depth:
        callbacks.append(ZooModelSummary(max_depth=depth))
    every = t.check_val_every_n_epoch
    if every == "auto":
        every = 1
        if t.val_check_interval in (None, 1.0) and not t.fast_dev_run:  # mid-epoch validation keeps its schedule
            from zoo.callbacks import ValidationSchedule

            schedule = ValidationSchedule(budget=float(t.auto_val.budget), max_minutes=float(t.auto_val.max_minutes),
                                          checkpoint_minutes=float(t.auto_val.checkpoint_minutes))
            callbacks.append(schedule)
            ckpt_cb.schedule = schedule
    elif isinstance(every, bool) or not isinstance(every, int) or every < 1:
        from zoo.config import ConfigError

        raise ConfigError(f"trainer.check_val_every_n_epoch={every!r}: give auto (validation paced by its cost) or a "
                          "whole number of epochs >= 1")
    callbacks += callbacks_extra or []
    kwargs: dict[str, Any] = dict(
        accelerator=t.accelerator, devices=t.devices, strategy=build_strategy(cfg), num_nodes=t.num_nodes,
        plugins=cluster_plugins() or None,
        precision=t.precision, max_epochs=max_epochs, max_steps=t.max_steps, min_epochs=t.min_epochs,
        check_val_every_n_epoch=every,
        # pcgrad steps by hand (manual optimisation) and clips there itself
        gradient_clip_val=None if OmegaConf.select(cfg, "model.balance") == "pcgrad" else t.gradient_clip_val,
        accumulate_grad_batches=t.accumulate_grad_batches, log_every_n_steps=t.log_every_n_steps,
        deterministic=t.deterministic, benchmark=t.benchmark, fast_dev_run=t.fast_dev_run,
        num_sanity_val_steps=t.num_sanity_val_steps, enable_progress_bar=enable_pb, sync_batchnorm=t.sync_batchnorm,
        default_root_dir=str(out_dir), callbacks=callbacks, logger=loggers or False,
        enable_model_summary=False,  # ZooModelSummary above is the summary (Lightning would add a second one)
    )
    for key in ("limit_train_batches", "limit_val_batches", "val_check_interval"):
        if t[key] is not None:
            v = t[key]  # an integer is a number of batches (1 = one batch), a float a fraction (1.0 = all)
            kwargs[key] = v if isinstance(v, int) else (int(v) if float(v) > 1 else float(v))
    return pl.Trainer(**kwargs), ckpt_cb


def check_accelerator(trainer_cfg: Any) -> None:
    """Refuse ``trainer.accelerator=gpu|cuda`` (``trainer=gpu``, ``ddp``) on a machine where torch sees no CUDA
    device, or more devices than it sees, with a message saying so, instead of Lightning's traceback."""
    from zoo.config import ConfigError

    acc = str(trainer_cfg.accelerator)
    if acc not in ("gpu", "cuda"):
        return
    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    where = (f"torch {torch.__version__}, " + (f"built for CUDA {torch.version.cuda}" if torch.version.cuda
                                               else "a CPU-only build") + (f", CUDA_VISIBLE_DEVICES={env!r}"
                                                                            if env is not None else ""))
    if visible == 0:
        raise ConfigError(f"trainer.accelerator={acc} (trainer=gpu) but no CUDA device is visible ({where}): use "
                          "trainer=cpu on this machine, or run on one with a GPU")
    devices = trainer_cfg.devices
    if isinstance(devices, int) and not isinstance(devices, bool) and devices > visible:
        raise ConfigError(f"trainer.devices={devices} but only {visible} CUDA device(s) are visible ({where}): "
                          f"use trainer.devices={visible} (or -1 for all)")


#: ``logger.names`` entries and the pip package each one needs beyond zoo's own dependencies.
LOGGERS = {"csv": None, "tensorboard": None, "wandb": "wandb", "mlflow": "mlflow"}


def _require(package: str, name: str) -> None:
    import importlib.util

    if importlib.util.find_spec(package) is None:
        raise ImportError(f"logger.names includes {name!r}, which needs the {package!r} package: pip install {package} "
                          f"(or drop {name} from logger.names; csv and tensorboard need nothing more)")


def build_loggers(cfg: DictConfig, out_dir: Path) -> list:
    """Lightning loggers by name (``logger.names``): ``csv`` (``<run>/csv/metrics.csv``, continued on resume),
    ``tensorboard`` (``<run>/tensorboard``), ``wandb`` (offline by default, files in ``<run>/wandb``) and ``mlflow``
    (a ``file:`` tracking URI in ``<run>/mlruns`` by default). wandb and mlflow need their pip packages; a missing
    one stops the run with an error naming it."""
    from lightning.pytorch import loggers as pl_loggers

    from zoo.checkpointing import ResumableCSVLogger

    task = str(OmegaConf.select(cfg, "task_name", default=None) or "zoo")
    loggers = []
    for name in cfg.logger.names:
        if name not in LOGGERS:
            raise ValueError(f"logger.names: {name!r} unknown; use any of {', '.join(LOGGERS)}")
        if LOGGERS[name]:
            _require(LOGGERS[name], name)
        if name == "csv":
            loggers.append(ResumableCSVLogger(str(out_dir), name="csv", version=""))  # continues on resume
        elif name == "tensorboard":
            loggers.append(pl_loggers.TensorBoardLogger(str(out_dir), name="tensorboard", version=""))
        elif name == "wandb":
            w = OmegaConf.select(cfg, "logger.wandb", default=None) or {}
            loggers.append(pl_loggers.WandbLogger(name=w.get("name"), save_dir=str(out_dir), project=w.get("project") or task,
                                                  entity=w.get("entity"), offline=bool(w.get("offline", True)),
                                                  log_model=bool(w.get("log_model", False))))
        elif name == "mlflow":
            m = OmegaConf.select(cfg, "logger.mlflow", default=None) or {}
            uri = m.get("tracking_uri") or (out_dir / "mlruns").as_uri()
            loggers.append(pl_loggers.MLFlowLogger(experiment_name=m.get("experiment_name") or task,
                                                   run_name=m.get("run_name"), tracking_uri=uri,
                                                   save_dir=str(out_dir / "mlruns")))
    return loggers


def log_images(loggers: list, paths: list[Path], root: Path, step: int = 0) -> None:
    """Plots (PNG files under ``root``) to the image-capable loggers: TensorBoard (``add_image``), W&B
    (``log_image``), MLflow (as artifacts). Tags are the paths under ``root`` without suffix (``plots/confusion_matrix``)."""
    from lightning.pytorch import loggers as pl_loggers

    from zoo.plots import png_to_array

    for lg in loggers:
        for p in paths:
            tag = Path(p).relative_to(root).with_suffix("").as_posix()
            try:
                if isinstance(lg, pl_loggers.TensorBoardLogger):
                    lg.experiment.add_image(tag, png_to_array(p), global_step=step, dataformats="HWC")
                elif type(lg).__name__ == "WandbLogger":
                    lg.log_image(key=tag, images=[png_to_array(p)], step=step)
                elif type(lg).__name__ == "MLFlowLogger":
                    lg.experiment.log_artifact(lg.run_id, str(p), artifact_path=str(Path(tag).parent))
            except Exception as err:  # a logger that cannot take images must not fail a finished run
                log.warning("could not log %s to %s: %s", p, type(lg).__name__, err)
        if isinstance(lg, pl_loggers.TensorBoardLogger):
            lg.experiment.flush()


def training_curves_job(trainer: Any, module: Any, out_dir: Path) -> Any:
    """A function that draws ``<run>/plots/training_curves.png`` and returns its path, from the run's CSV log
    (``<run>/csv/metrics.csv``) or the epoch history the :class:`~zoo.callbacks.EpochSummary` callback kept when no
    CSV logger ran. The log is read now (a later validation appends to it); the drawing is safe on another thread
    (the plots use no pyplot state). ``None`` without matplotlib or without any epoch."""
    from zoo import plots
    from zoo.callbacks import EpochSummary

    if not plots.available():
        log.warning("matplotlib is not installed: no training curves written (pip install matplotlib)")
        return None
    csv_file = out_dir / "csv" / "metrics.csv"
    history = plots.read_csv_log(csv_file) if csv_file.is_file() else None
    if not history:
        history = next((c.history for c in trainer.callbacks if isinstance(c, EpochSummary)), None)
    if not history:
        return None
    keys = [k for k in getattr(module, "progress_keys", lambda: [])() if k.startswith("val/")
            and not k.endswith("/loss")]
    extra = [k for k in history if k.startswith("val/") and k not in keys and "loss" not in k
             and not any(t in k for t in ("_small", "_medium", "_large", "mAR"))]
    return lambda: plots.plot_training_curves(history, out_dir / "plots" / "training_curves.png",
                                              metrics=(keys + extra)[:8])


def final_validation_reusable(trainer: Any, ckpt_cb: Any, best: str | None) -> bool:
    """Whether the fit's last validation can stand for the final evaluation of ``best``: the validation schedule
    ran it as a final one (plots written) at the fit's last step, best.ckpt was written at that same step, and the
    run is a single process (a multi-process fit re-validates)."""
    schedule = getattr(ckpt_cb, "schedule", None)
    if schedule is None or best is None or trainer.world_size != 1:
        return False
    step = int(trainer.global_step)
    return schedule.final_step == step and ckpt_cb.saved_steps.get(str(best)) == step


def _plots_of(report: Any) -> list[str]:
    """Every ``plots`` entry of an evaluation report (top level and per head)."""
    if not isinstance(report, dict):
        return []
    out = [str(p) for p in report.get("plots") or []]
    for v in report.values():
        if isinstance(v, dict):
            out += _plots_of(v)
    return out


def train(cfg: DictConfig, *, callbacks: list | None = None) -> dict[str, Any]:
    """Train the configured task; returns ``{"metrics", "best_ckpt", "last_ckpt", "output_dir", "bundle"}``.

    ``callbacks``: extra Lightning callbacks for this run (timing, custom logging), added after the zoo's own.

    The run folder (``paths.output_dir``) receives ``config.yaml`` (the resolved config), ``checkpoints/best.ckpt`` and
    ``last.ckpt``, logs, ``metrics.json`` (validation metrics of the best checkpoint) and, when ``export_bundle``, a
    serving bundle ``bundle/`` (safetensors + json) of the best weights.
    """
    import lightning.pytorch as pl

    from zoo.tasks import task_class

    cfg = validate(cfg, TrainConfig)
    check_accelerator(cfg.trainer)
    if cfg.ckpt_path and cfg.init_from:
        from zoo.config import ConfigError

        raise ConfigError("give ckpt_path= (resume that run: weights, optimiser, epoch) or init_from= (a new run "
                          "starting from trained weights), not both")
    quiet_lightning()
    out_dir = Path(cfg.paths.output_dir).expanduser().resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    from zoo.checkpointing import prepare_run_folder  # run-folder lock; refuses another run's checkpoints

    prepare_run_folder(cfg, out_dir)
    if cfg.paths.cache_dir:
        os.environ["ZOO_CACHE"] = str(Path(cfg.paths.cache_dir).expanduser())
    from zoo.checkpointing import _is_rank_zero_process

    if _is_rank_zero_process():  # the other processes of a torchrun / srun launch share this folder
        (out_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    _set_threads(cfg)
    pl.seed_everything(int(cfg.seed), workers=True, verbose=False)
    t0 = time.perf_counter()

    cls = task_class(cfg.model.task)
    datamodule, kwargs = cls.build(cfg)
    if cfg.ckpt_path and not Path(cfg.ckpt_path).is_file():
        raise FileNotFoundError(f"ckpt_path={cfg.ckpt_path!r} does not exist: give <run>/checkpoints/last.ckpt to resume")
    if cfg.init_from and (cfg.backbone.pretrained or cfg.backbone.weights):
        log.warning("init_from=%s gives the backbone's weights: backbone.pretrained / backbone.weights are not used",
                    cfg.init_from)
    module = cls(**kwargs, init_weights=not (cfg.ckpt_path or cfg.init_from))
    init_report = None
    if cfg.init_from:
        from zoo.transfer import init_task_from

        init_report = init_task_from(module, cfg.init_from)
    from zoo.callbacks import Visualize

    trainer, ckpt_cb = build_trainer(cfg, out_dir, monitor=module.main_metric, mode=module.main_mode,
                                     callbacks_extra=[Visualize(int(cfg.callbacks.visualize),
                                                                score_thresh=float(cfg.callbacks.visualize_score_thresh)),
                                                      *(callbacks or [])])
    ckpt_cb.finish_last_after_fit = True  # the final last.ckpt is written while the final evaluation runs
    try:
        result = _fit_and_report(cfg, trainer, ckpt_cb, module, datamodule, out_dir, t0, init_report)
    except BaseException:
        try:
            ckpt_cb.finish_writes()  # the checkpoints already queued reach the disk whatever stopped the run
        except OSError as err:
            log.error("%s", err)
        raise
    ckpt_cb.finish_writes()  # every checkpoint on disk before train() returns; a failed write is raised here
    return result


def _fit_and_report(cfg: DictConfig, trainer: Any, ckpt_cb: Any, module: Any, datamodule: Any, out_dir: Path,
                    t0: float, init_report: Any) -> dict[str, Any]:
    """``train()``'s fit, final evaluation, plots and bundle (its result dict)."""
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.ckpt_path,
                    weights_only=True if cfg.ckpt_path else None)
    except pickle.UnpicklingError as err:
        if not cfg.ckpt_path:
            raise
        from zoo.hub.bundle import checkpoint_load_error

        # Lightning's weights-only load refused the resume checkpoint: zoo's clear CheckpointLoadError (which never
        # suggests weights_only=False) instead of torch's raw message
        raise checkpoint_load_error(cfg.ckpt_path, err) from None
    fit_s = time.perf_counter() - t0

    best = ckpt_cb.best_model_path or None
    last = str(Path(ckpt_cb.dirpath) / "last.ckpt") if ckpt_cb.save_last else None
    result: dict[str, Any] = {"output_dir": str(out_dir), "best_ckpt": best, "last_ckpt": last,
                              "metrics": {}, "fit_seconds": fit_s, "bundle": None, "init_from": init_report}
    if cfg.trainer.fast_dev_run:
        return result

    plot_files: list[Path] = []
    pool = curves = None
    if trainer.is_global_zero:
        job = training_curves_job(trainer, module, out_dir)  # the CSV log of the fit is complete once fit returned
        if job is not None:  # drawn on a thread while best.ckpt is evaluated and exported (~0.2 s off the end)
            from concurrent.futures import ThreadPoolExecutor

            pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="zoo-plots")
            curves = pool.submit(job)
    try:
        _final_report(cfg, trainer, ckpt_cb, module, datamodule, out_dir, best, result, plot_files)
    finally:
        if pool is not None:
            pool.shutdown(wait=True)
    path = curves.result() if curves is not None else None  # a plotting error is raised here
    plot_files[:0] = [path] if path else []
    if plot_files and trainer.is_global_zero:
        result["plots"] = [str(p) for p in plot_files]
        log_images(list(trainer.loggers), plot_files, out_dir, step=int(trainer.global_step))
    return result


def _final_report(cfg: DictConfig, trainer: Any, ckpt_cb: Any, module: Any, datamodule: Any, out_dir: Path,
                  best: str | None, result: dict[str, Any], plot_files: list[Path]) -> None:
    """The final evaluation of best.ckpt (metrics.json, the report and its plots, appended to ``plot_files``) and the
    serving bundle, filled into ``result``."""
    from zoo.callbacks import emit

    fit_s = result["fit_seconds"]
    if cfg.run_eval and best:
        from zoo.callbacks import EpochSummary

        for c in trainer.callbacks:
            if isinstance(c, EpochSummary):
                c.log_report = False  # the report's table is shown below, on the console and in the log
        if final_validation_reusable(trainer, ckpt_cb, best):
            # best.ckpt is the state the last epoch's (final) validation just measured: its metrics, report and plots
            # are those a second validation of best.ckpt would give
            metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
            log.info("final metrics: the last epoch's validation (best.ckpt holds that state)")
        else:
            res = trainer.validate(module, datamodule=datamodule, ckpt_path=best, verbose=False, weights_only=True)
            metrics = {k: float(v) for k, v in (res[0] if res else {}).items()}
        report = dict(getattr(module, "last_eval_report", None) or {})
        result["metrics"] = metrics
        result["report"] = report
        if trainer.is_global_zero:
            # the evaluation report as evaluate.py writes it: per-class tables, confusion matrices, plot files
            (out_dir / "metrics.json").write_text(json.dumps({"checkpoint": best, "metrics": metrics,
                                                               "fit_seconds": fit_s, **report}, indent=2, default=str))
            if report.get("table"):
                emit(str(report["table"]))
            emit(format_metrics(metrics, f"validation metrics of {best}"))
            plot_files += [Path(p) for p in _plots_of(report)]
    if cfg.export_bundle and best and trainer.is_global_zero:
        try:
            from zoo.hub.export import export_checkpoint
        except ImportError:
            log.info("zoo.hub.export not available: no bundle written")
        else:
            result["bundle"] = str(export_checkpoint(best, out_dir / "bundle", metrics=result["metrics"],
                                                     config=to_container(cfg)))
