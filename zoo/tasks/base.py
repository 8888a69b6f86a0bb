"""Shared LightningModule machinery: the ZooModel, optimiser and schedule from config, EMA, channels_last,
torch.compile, and the hooks every task fills in (``build`` from config, ``main_metric``)."""

from __future__ import annotations

import logging
import math
from typing import Any, Mapping

import lightning.pytorch as pl
import torch
from torch import nn

from zoo.models import ModelSpec, ZooModel, create_model

log = logging.getLogger(__name__)

__all__ = ["ZooTask", "build_optimizer", "build_lr_lambda", "default_mean_std"]


def is_compile_error(err: BaseException) -> bool:
    """Whether ``err`` (or an exception it was raised from) comes from torch.compile's machinery (dynamo, inductor,
    a missing compiler or triton) rather than from the model itself."""
    seen: set[int] = set()
    e: BaseException | None = err
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if type(e).__module__.startswith(("torch._dynamo", "torch._inductor")):
            return True
        e = e.__cause__ or e.__context__
    return False


def default_mean_std(backbone_name: str) -> tuple[list[float], list[float]]:
    """The backbone's pretrained normalisation (timm's pretrained_cfg), ImageNet's when it has none."""
    import timm

    try:
        pcfg = timm.get_pretrained_cfg(backbone_name)
        mean, std = pcfg.mean, pcfg.std  # type: ignore[union-attr]
        if mean and std:
            return [float(m) for m in mean], [float(s) for s in std]
    except Exception:  # noqa: BLE001 - any model without a pretrained cfg
        pass
    return [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def lr_scaling_rule(rule: str, optimizer: str) -> str:
    """``optimizer.lr_scaling`` resolved: ``auto`` is ``linear`` for sgd and ``sqrt`` for the Adam family."""
    if rule == "auto":
        return "linear" if optimizer == "sgd" else "sqrt"
    if rule not in ("linear", "sqrt"):
        raise ValueError(f"optimizer.lr_scaling={rule!r}: use auto, linear or sqrt")
    return rule


def scaled_lr(lr: float, batch: int, lr_batch: int, rule: str = "auto", optimizer: str = "adamw") -> float:
    """``lr`` given for a global batch of ``lr_batch``, rescaled for ``batch``: ``linear`` (lr x batch / lr_batch,
    the rule that keeps SGD's update per image), ``sqrt`` (lr x sqrt(batch / lr_batch), the usual rule for the
    Adam family, whose step size does not grow with the gradient's scale), ``auto``: linear for sgd, else sqrt."""
    if lr_batch < 1 or batch < 1:
        raise ValueError(f"optimizer.lr_batch={lr_batch} and the global batch {batch} must be >= 1")
    rule = lr_scaling_rule(rule, optimizer)
    ratio = batch / lr_batch
    return float(lr) * (ratio if rule == "linear" else math.sqrt(ratio))


def build_optimizer(model: nn.Module, cfg: Mapping[str, Any], extra_params: list[nn.Parameter] | None = None, *,
                    head_lr_mult: Mapping[str, float] | None = None,
                    extra_groups: Mapping[str, list[nn.Parameter]] | None = None) -> torch.optim.Optimizer:
    """AdamW / Adam / SGD over ``model``'s trainable parameters.

    Norm and bias parameters get no weight decay when ``no_weight_decay_norm_bias``; backbone parameters are scaled
    by ``backbone_lr_mult``, each head's (``heads.<name>.*``) by ``head_lr_mult[name]``. ``extra_params`` (e.g. loss
    proxies) join the plain group; ``extra_groups`` ``{head: params}`` join that head's group (no weight decay).
    """
    lr, wd = float(cfg["lr"]), float(cfg["weight_decay"])
    mult = float(cfg.get("backbone_lr_mult", 1.0))
    head_mult = dict(head_lr_mult or {})
    groups: dict[tuple[float, bool], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = bool(cfg.get("no_weight_decay_norm_bias", True)) and (p.ndim <= 1 or name.endswith(".bias"))
        if name.startswith("backbone."):
            m = mult
        elif name.startswith("heads."):
            m = float(head_mult.get(name.split(".")[1], 1.0))
        else:
            m = 1.0
        groups.setdefault((m, no_decay), []).append(p)
    for p in extra_params or []:
        groups.setdefault((1.0, False), []).append(p)
    for head, ps in (extra_groups or {}).items():
        groups.setdefault((float(head_mult.get(head, 1.0)), True), []).extend(ps)
    param_groups = [{"params": ps, "lr": lr * m, "weight_decay": 0.0 if nd else wd}
                    for (m, nd), ps in groups.items() if ps]
    name = cfg["name"]
    # one fused kernel per step instead of a loop over tensors (torch's default off the GPU is that loop: on CPU the
    # loop took ~140 ms a step for a resnet18's 11 M parameters, the fused kernel ~17 ms), when every parameter is a
    # floating-point tensor on the CPU or a CUDA GPU (the devices torch's fused optimizers run on)
    params = [p for g in param_groups for p in g["params"]]
    fused = {"fused": True} if params and all(p.device.type in ("cpu", "cuda") and p.dtype.is_floating_point
                                              for p in params) else {}
    if name == "adamw":
        return torch.optim.AdamW(param_groups, lr=lr, betas=tuple(cfg.get("betas", (0.9, 0.999))), weight_decay=wd,
                                 **fused)
    if name == "adam":
        return torch.optim.Adam(param_groups, lr=lr, betas=tuple(cfg.get("betas", (0.9, 0.999))), **fused)
    if name == "sgd":
        return torch.optim.SGD(param_groups, lr=lr, momentum=float(cfg.get("momentum", 0.9)),
                               nesterov=bool(cfg.get("nesterov", False)), weight_decay=wd, **fused)
    raise ValueError(f"optimizer.name={name!r} unknown; use adamw, adam or sgd")


def build_lr_lambda(cfg: Mapping[str, Any], total_steps: int, steps_per_epoch: int):
    """Per-step LR multiplier: linear warm-up (``warmup_epochs``, from ``warmup_start_factor``) then cosine to
    ``min_lr_factor`` / constant / step decay at ``step_epochs`` by ``gamma``."""
    name = cfg["name"]
    warm = int(round(float(cfg.get("warmup_epochs", 0.0)) * steps_per_epoch))
    total = max(1, int(total_steps))
    warm = min(warm, total - 1) if total > 1 else 0
    start = float(cfg.get("warmup_start_factor", 0.01))
    floor = float(cfg.get("min_lr_factor", 0.0))
    milestones = [int(e * steps_per_epoch) for e in cfg.get("step_epochs", [])]
    gamma = float(cfg.get("gamma", 0.1))

    def fn(step: int) -> float:
        if step < warm:
            return start + (1.0 - start) * step / max(1, warm)
        if name == "cosine":
            t = min(1.0, (step - warm) / max(1, total - warm))
            return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * t))
        if name == "step":
            return gamma ** sum(step >= m for m in milestones)
        return 1.0

    return fn


class ZooTask(pl.LightningModule):
    """The plumbing every task shares (the model from its spec, EMA, optimiser and schedule, channels_last,
    compile). :class:`zoo.tasks.multitask.MultiTask` is the task; it sets :attr:`main_metric`/:attr:`main_mode` and
    implements the steps and :meth:`build` (data module + constructor kwargs from a validated config).

    Args:
        spec: the model spec (dict form), stored in the checkpoint so a model rebuilds from it alone.
        optimizer, scheduler: config dicts (see ``zoo.config``).
        options: task options (loss settings, EMA, post-processing, channels_last, compile, ...).
        data_info: dataset facts stored with the model (class names, category ids, dataset name).
        init_weights: load the backbone's pretrained/local weights when building (``False`` when the weights come
            from a checkpoint anyway).
    """

    main_metric = "val/loss"
    main_mode = "min"

    def __init__(self, spec: dict, optimizer: dict, scheduler: dict, options: dict | None = None,
                 data_info: dict | None = None, init_weights: bool = True) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["init_weights"])
        self.options = dict(options or {})
        self.data_info = dict(data_info or {})
        self.model: ZooModel = create_model(ModelSpec.from_dict(spec), load_backbone_weights=init_weights)
        ema = self.options.get("ema") or {}
        self.ema = None
        if ema.get("enabled"):
            from timm.utils import ModelEmaV3

            self.ema = ModelEmaV3(self.model, decay=float(ema.get("decay", 0.999)), use_warmup=bool(ema.get("warmup", True)))
            # the EMA copy is updated by averaging, never by gradients; as trainable parameters DDP would wait for
            # gradients the loss never gives them ("parameters that were not used in producing the loss")
            self.ema.requires_grad_(False)
        self._compiled = None

    # ------------------------------------------------------------------ plumbing
    @property
    def spec(self) -> ModelSpec:
        return self.model.spec

    @property
    def eval_model(self) -> ZooModel:
        """The weights used for validation and export: the EMA copy when EMA is on."""
        return self.ema.module if self.ema is not None else self.model

    def extra_parameters(self) -> list[nn.Parameter]:
        """Trainable parameters outside the model (e.g. metric-learning proxies)."""
        return []

    def on_fit_start(self) -> None:
        if self.options.get("channels_last"):
            self.model.to(memory_format=torch.channels_last)
        if self.options.get("compile") and self._compiled is None:
            object.__setattr__(self, "_compiled", torch.compile(self.model, mode=self.options.get("compile_mode")))

    def train_model(self) -> nn.Module:
        """The module used in training steps (compiled when ``trainer.compile``)."""
        return self._compiled if self._compiled is not None else self.model

    def forward_train(self, model: nn.Module, *args: Any, **kwargs: Any) -> Any:
        """``model(*args, **kwargs)``; when ``model`` is the compiled one and torch.compile fails (no C++ compiler or
        triton, an unsupported op, a backend error), warn once and go on eagerly with the same weights for the rest
        of the run. Errors of the model itself are raised as they are."""
        if self._compiled is None or model is not self._compiled:
            return model(*args, **kwargs)
        try:
            return model(*args, **kwargs)
        except Exception as err:  # noqa: BLE001 - only compile errors are handled, the rest re-raised
            if not is_compile_error(err):
                raise
            log.warning("torch.compile failed (%s: %s); training goes on without it (trainer.compile=false skips the "
                        "attempt)", type(err).__name__, str(err).splitlines()[0][:300] if str(err) else "")
            object.__setattr__(self, "_compiled", None)
            return self.model(*args, **kwargs)

    def prepare_images(self, images: torch.Tensor) -> torch.Tensor:
        if self.options.get("channels_last"):
            images = images.contiguous(memory_format=torch.channels_last)
        return images

    def log_losses(self, losses: dict[str, torch.Tensor], batch_size: int) -> torch.Tensor:
        """Log the total training loss (and each term when there are several); return the total."""
        loss = sum(losses.values())
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=batch_size)
        if len(losses) > 1:
            for k, v in losses.items():
                self.log(f"train/{k}", v, on_step=False, on_epoch=True, batch_size=batch_size)
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        if self.ema is not None:
            self.ema.update(self.model, step=self.global_step)

    def configure_optimizers(self):
        return self._with_schedule(build_optimizer(self.model, self.optimizer_config(), self.extra_parameters()))

    def optimizer_config(self) -> dict[str, Any]:
        """``hparams.optimizer``, its ``lr`` rescaled to the run's global batch when ``optimizer.lr_batch`` is set
        (:func:`scaled_lr`; the images of one optimizer step over every process: the data module's batch size x
        world size x ``accumulate_grad_batches``). The effective lr is logged."""
        cfg = dict(self.hparams.optimizer)
        ref = cfg.get("lr_batch")
        if not ref:
            return cfg
        from zoo.config import ConfigError

        trainer = self.trainer
        per_process = getattr(trainer.datamodule, "batch_size", None) if trainer.datamodule is not None else None
        if not isinstance(per_process, int):
            raise ConfigError(f"optimizer.lr_batch={ref} rescales lr to the run's batch, but this run's data has no "
                              "single batch size (several data sources): give optimizer.lr for the run's batch and "
                              "optimizer.lr_batch=null")
        world, accumulate = int(trainer.world_size), max(1, int(trainer.accumulate_grad_batches or 1))
        batch = per_process * world * accumulate
        rule = lr_scaling_rule(str(cfg.get("lr_scaling") or "auto"), str(cfg["name"]))
        lr = scaled_lr(float(cfg["lr"]), batch, int(ref), rule, str(cfg["name"]))
        log.info("optimizer.lr=%g for a batch of %d (optimizer.lr_batch), %s-scaled to %g for this run's global batch "
                 "of %d (%d x %d processes x %d accumulated)", float(cfg["lr"]), int(ref), rule, lr, batch,
                 per_process, world, accumulate)
        cfg["lr"] = lr
        return cfg

    def _with_schedule(self, opt: torch.optim.Optimizer):
        """The optimiser with the configured per-step schedule, in Lightning's return format."""
        sched_cfg = self.hparams.scheduler
        if sched_cfg["name"] == "none":
            return opt
        total = int(self.trainer.estimated_stepping_batches)  # also sets up the training data
        # optimizer steps of one real epoch (so warmup_epochs / step_epochs mean epochs even when max_steps ends the
        # run long before max_epochs would)
        batches = self.trainer.num_training_batches
        accumulate = max(1, int(self.trainer.accumulate_grad_batches or 1))
        if isinstance(batches, (int, float)) and math.isfinite(batches) and batches > 0:
            per_epoch = max(1, math.ceil(int(batches) / accumulate))
        else:
            epochs = max(1, int(self.trainer.max_epochs or 1))
            per_epoch = max(1, total // epochs) if self.trainer.max_epochs and self.trainer.max_epochs > 0 else total
        sched = torch.optim.lr_scheduler.LambdaLR(opt, build_lr_lambda(sched_cfg, total, per_epoch))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # ------------------------------------------------------------------ construction from config
    @classmethod
    def build(cls, cfg: Any, *, stages: tuple[str, ...] = ("train", "val")) -> tuple[Any, dict]:
        """Return ``(datamodule, constructor kwargs)`` for a validated config. Implemented by each task."""
        raise NotImplementedError

    @staticmethod
    def base_spec(cfg: Any, heads: dict, *, necks: dict | None = None, class_names: dict | None = None,
                  extra: dict | None = None) -> dict:
        """A spec dict from the config's backbone and model preprocessing settings."""
        from zoo.config import to_container

        bb = {k: v for k, v in to_container(cfg.backbone).items() if v is not None and k != "pyramid_channels"}
        if cfg.backbone.pyramid_channels:
            bb["pyramid_channels"] = int(cfg.backbone.pyramid_channels)
        mean, std = default_mean_std(cfg.backbone.name)
        m = cfg.model
        return ModelSpec(
            backbone=bb, heads=heads, necks=necks or {}, class_names=class_names or {},
            input_size=[int(s) for s in m.input_size], resize=str(m.resize),
            mean=list(m.mean) if m.mean is not None else mean, std=list(m.std) if m.std is not None else std,
            size_divisor=int(m.size_divisor), task=str(m.task), extra=extra or {},
        ).to_dict()

    @staticmethod
    def task_options(cfg: Any) -> dict:
        from zoo.config import to_container

        return {"ema": to_container(cfg.model.ema), "mixup": to_container(cfg.model.get("mixup") or {}),
                "channels_last": bool(cfg.trainer.channels_last),
                "compile": bool(cfg.trainer.compile), "compile_mode": cfg.trainer.compile_mode,
                "postprocess": to_container(cfg.model.postprocess), "visualize": int(cfg.callbacks.visualize),
                **to_container(cfg.model.extra)}

    @staticmethod
    def preprocessing(spec: dict) -> dict:
        return {"input_size": spec["input_size"], "resize": spec["resize"], "mean": spec["mean"], "std": spec["std"]}
