"""The one training task: any set of heads on one backbone, fed by one dataset or several.

``MultiTask`` trains whatever heads the spec holds. The single-task presets (``model=classification``,
``detection``, ``semantic``, ``instance``, ``similarity``) are its one-head case and keep their metric names
(``val/top1``, ``val/mAP``, ``val/mIoU``, ``val/segm_mAP``, ``val/R@1``); with several heads every metric is
logged under the head's name (``val/cls/top1``, ``val/det/mAP``, ...) and ``val/score``, the mean of the heads'
main metrics, is what checkpoint selection and early stopping use.

Per batch, each data source's images go through the backbone once, every head that source feeds computes its loss
(``Head.loss`` returns nothing for a batch without its targets), and the losses are combined by
``model.balance``:

``fixed``        ``sum_h w_h L_h`` with ``model.heads.<h>.weight`` (default 1).
``uncertainty``  ``sum_h exp(-s_h) L_h + s_h`` with learned log-variances ``s_h`` (Kendall et al., 2018).
``pcgrad``       each head's gradient on the shared parameters (backbone, necks) is projected off the other heads'
                 gradients it conflicts with (negative dot product) before they are summed (Yu et al., 2020);
                 head parameters get their own gradients. Uses manual optimisation (gradient clipping is done
                 here; gradient accumulation is not supported with it).

Validation runs one evaluator per head (:mod:`zoo.metrics.evaluators`), the same objects evaluate.py uses.
"""

from __future__ import annotations

import json
import logging
import random
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from zoo.heads.base import COMMON_TRAINING_KEYS, check_head_kwargs, head_class
from zoo.tasks.base import ZooTask

log = logging.getLogger(__name__)

__all__ = ["MultiTask", "MultiSourceDataModule", "head_configs", "pcgrad_combine", "BALANCE_METHODS"]

#: Values of ``model.balance``.
BALANCE_METHODS = ("fixed", "uncertainty", "pcgrad")


def head_configs(model_cfg: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Each head's config from ``model.heads``: a mapping ``{name: {type, **arguments}}`` or a list of head types
    (``[fcos, semantic_fpn]``, named by each class's ``default_name``). A single-task preset may leave ``type``
    out of its one head and give it as ``model.head`` / ``model.decoder``."""
    from zoo.config import ConfigError

    heads = model_cfg.get("heads") or {}
    if isinstance(heads, (list, tuple)):
        out: dict[str, dict[str, Any]] = {}
        for item in heads:
            cfg = {"type": item} if isinstance(item, str) else dict(item)
            if "type" not in cfg:
                raise ConfigError(f"model.heads: list entry {item!r} needs a head type (one of the registered heads)")
            try:
                cls = head_class(cfg["type"])
            except ValueError as err:
                raise ConfigError(f"model.heads: {err}") from None
            name = str(cfg.pop("name", None) or cls.default_name)
            if name in out:
                raise ConfigError(f"model.heads: two heads would be named {name!r}; give one a name "
                                  f"(model.heads='[{{type: {cfg['type']}, name: {name}2}}]')")
            out[name] = cfg
        return out
    out = {str(k): dict(v or {}) for k, v in dict(heads).items()}
    shorthand = model_cfg.get("head") or model_cfg.get("decoder")
    for name, cfg in out.items():
        if not cfg.get("type"):
            if shorthand and len(out) == 1:
                cfg["type"] = shorthand
            else:
                raise ConfigError(f"model.heads.{name}: no head type; set model.heads.{name}.type to a registered "
                                  "head")
    if not out:
        raise ConfigError("model.heads is empty: name at least one head (model.heads='[classification]')")
    return out


def pcgrad_combine(grads: Sequence[torch.Tensor], seed: int = 0) -> torch.Tensor:
    """PCGrad (Yu et al., 2020): project each task's flat gradient off every other task's gradient it conflicts
    with (negative dot product), in a random order, and sum. Two gradients that do not conflict are summed as
    they are; two that do end up with a non-negative dot product with each other's original direction."""
    rng = random.Random(seed)
    out = []
    for i, gi in enumerate(grads):
        g = gi.clone()
        others = [j for j in range(len(grads)) if j != i]
        rng.shuffle(others)
        for j in others:
            dot = torch.dot(g, grads[j])
            if dot < 0:
                g = g - dot / grads[j].pow(2).sum().clamp(min=1e-12) * grads[j]
        out.append(g)
    return torch.stack(out).sum(0)


def _merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in override.items():
        out[k] = _merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), Mapping) else v
    return out


def _check_data_override(dcfg: Mapping[str, Any], heads: Sequence[str]) -> None:
    """A head's own ``data`` is checked against the data schema like ``data`` itself (a typo stops the run)."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from zoo.config import CHOICES, ConfigError, DataConf

    try:
        merged = OmegaConf.merge(OmegaConf.structured(DataConf), dcfg)
    except OmegaConfBaseException as err:
        raise ConfigError(f"model.heads.{heads[0]}.data: {str(err).splitlines()[0]} (key {getattr(err, 'full_key', '')}); "
                          "its keys are those of the data group") from None
    kind = str(merged.kind)
    if kind not in CHOICES["data.kind"]:
        raise ConfigError(f"model.heads.{heads[0]}.data.kind={kind!r} is not one of {', '.join(CHOICES['data.kind'])}")


class MultiTask(ZooTask):
    """Train, validate and export any set of heads sharing one backbone (see the module docs).

    Options read (``options``): ``heads`` (per head: ``weight``, ``lr_mult``, ``frozen_epochs``, loss options,
    ``num_train_identities``), ``balance``, ``sources`` (``[{"name", "heads", "data"}]``), ``postprocess``,
    ``gradient_clip_val`` (pcgrad), ``freeze_backbone_epochs``, plus the base task's.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        from zoo.metrics.evaluators import evaluator_for

        self.head_names = list(self.model.heads)
        self.head_options: dict[str, dict[str, Any]] = {n: dict((self.options.get("heads") or {}).get(n) or {})
                                                        for n in self.head_names}
        self.single = len(self.head_names) == 1
        sources = self.options.get("sources") or [{"name": "data", "heads": self.head_names}]
        self.sources: list[dict[str, Any]] = [dict(s) for s in sources]
        self.criteria = nn.ModuleDict()
        for n in self.head_names:
            c = self.model.heads[n].make_criterion(self.head_options[n])
            if c is not None:
                self.criteria[n] = c
        ann_files = dict((self.data_info or {}).get("val_ann_files") or {})
        legacy_ann = (self.data_info or {}).get("val_ann_file")
        single_head_file = "detections.json"
        self.evaluators = nn.ModuleDict()
        for n in self.head_names:
            opts = {"postprocess": self.options.get("postprocess") or {}, "ann_file": ann_files.get(n, legacy_ann),
                    "results_file": single_head_file if self.single else f"detections_{n}.json",
                    "plot_subdir": "" if self.single else n}
            self.evaluators[n] = evaluator_for(self.model.heads[n], opts)
        import numpy as np

        self._mix_rng = np.random.default_rng(torch.initial_seed() % 2 ** 32 + 7919)  # mixup's draws, from the run seed
        self.balance = str(self.options.get("balance") or "fixed")
        if self.balance not in BALANCE_METHODS:
            raise ValueError(f"model.balance={self.balance!r} unknown; use one of {BALANCE_METHODS}")
        self.log_vars = nn.Parameter(torch.zeros(len(self.head_names))) if self.balance == "uncertainty" else None
        if self.balance == "pcgrad":
            self.automatic_optimization = False
        if self.single:
            self.main_metric = "val/" + self.evaluators[self.head_names[0]].main_metric
        else:
            self.main_metric = "val/score"
        self.main_mode = "max"
        self.last_eval_report: dict[str, Any] = {}
        self._val_loss_sums: dict[str, torch.Tensor] = {}

    # ------------------------------------------------------------------ names
    def _key(self, head: str, metric: str, stage: str = "val") -> str:
        return f"{stage}/{metric}" if self.single else f"{stage}/{head}/{metric}"

    def progress_keys(self) -> list[str]:
        """The metrics of the one-line-per-epoch summary: the training loss, each head's validation loss and main
        metric, and ``val/score`` with several heads."""
        keys = ["train/loss"]
        for n in self.head_names:
            ev = self.evaluators[n]
            if ev.wants_loss:
                keys.append(self._key(n, "loss"))
            keys.append(self._key(n, ev.main_metric))
        return keys + ([] if self.single else ["val/score"])

    def _criterion(self, head: str) -> nn.Module | None:
        return self.criteria[head] if head in self.criteria else None

    def extra_parameters(self) -> list[nn.Parameter]:
        return [p for c in self.criteria.values() for p in c.parameters()] + (
            [self.log_vars] if self.log_vars is not None else [])

    def configure_optimizers(self):
        from zoo.tasks.base import build_optimizer

        mults = {n: float(o.get("lr_mult", 1.0)) for n, o in self.head_options.items()}
        extra = {n: list(c.parameters()) for n, c in self.criteria.items()}
        if self.log_vars is not None:
            extra["_balance"] = [self.log_vars]
        opt = build_optimizer(self.model, self.optimizer_config(), head_lr_mult=mults, extra_groups=extra)
        return self._with_schedule(opt)

    # ------------------------------------------------------------------ training
    def _source_batches(self, batch: Any) -> list[tuple[dict[str, Any], list[str]]]:
        """``[(batch, heads it feeds)]`` for a training batch (one source) or a combined one (``{source: batch}``)."""
        if isinstance(batch, Mapping) and "images" in batch:
            return [(batch, list(self.sources[0]["heads"]) if len(self.sources) == 1 else self.head_names)]
        out = []
        for src in self.sources:
            b = batch.get(src["name"]) if isinstance(batch, Mapping) else None
            if b is not None:
                out.append((b, list(src["heads"])))
        return out

    def head_losses(self, batch: Any, model: nn.Module | None = None) -> tuple[dict[str, dict[str, torch.Tensor]], int]:
        """Each head's loss terms on ``batch`` (heads without targets in it are absent), and the image count."""
        model = model if model is not None else self.train_model()
        losses: dict[str, dict[str, torch.Tensor]] = {}
        n_images = 0
        for b, heads in self._source_batches(batch):
            mixed = self._mix(b, heads) if self.training else None
            images = mixed[0] if mixed is not None else b["images"]
            raw = self.forward_train(model, self.prepare_images(images), heads=heads)
            n_images += len(b["images"])
            for n in heads:
                head = self.model.heads[n]
                terms = head.loss(raw[n], b, criterion=self._criterion(n))
                if terms and mixed is not None:
                    _, lam, b2 = mixed
                    other = head.loss(raw[n], b2, criterion=self._criterion(n))
                    terms = {k: lam * v + (1.0 - lam) * other[k] for k, v in terms.items()}
                if terms:
                    losses[n] = terms
        return losses, n_images

    def _mix(self, batch: Mapping[str, Any], heads: Sequence[str]) -> tuple[torch.Tensor, float, dict] | None:
        """Mixup / CutMix (``model.mixup``) of a batch that feeds only single-label classification heads:
        ``(mixed images, lam, the batch with its targets in the partner order)``, or None (not mixed)."""
        cfg = self.options.get("mixup") or {}
        a_mix, a_cut = float(cfg.get("mixup_alpha") or 0.0), float(cfg.get("cutmix_alpha") or 0.0)
        if a_mix <= 0 and a_cut <= 0:
            return None
        if any(self.model.heads[n].target_format != "classification" or getattr(self.model.heads[n], "multilabel", False)
               for n in heads):
            return None
        off = int(cfg.get("off_last_epochs") or 0)
        max_epochs = getattr(self._trainer, "max_epochs", None) if self._trainer is not None else None
        if off and max_epochs and max_epochs > 0 and self.current_epoch >= max_epochs - off:
            return None
        g = self._mix_rng
        if g.random() >= float(cfg.get("prob", 1.0)):
            return None
        x = batch["images"]
        perm = torch.arange(x.shape[0] - 1, -1, -1, device=x.device)  # partner: the batch reversed (timm's choice)
        cut = a_cut > 0 and (a_mix <= 0 or g.random() < float(cfg.get("switch_prob", 0.5)))
        lam = float(g.beta(a_cut, a_cut) if cut else g.beta(a_mix, a_mix))
        if cut:
            H, W = x.shape[-2:]
            rh, rw = int(H * (1 - lam) ** 0.5), int(W * (1 - lam) ** 0.5)
            cy, cx = int(g.integers(H)), int(g.integers(W))
            y0, y1 = max(cy - rh // 2, 0), min(cy + rh // 2, H)
            x0, x1 = max(cx - rw // 2, 0), min(cx + rw // 2, W)
            x = x.clone()
            x[..., y0:y1, x0:x1] = x[perm][..., y0:y1, x0:x1]
            lam = 1.0 - (y1 - y0) * (x1 - x0) / float(H * W)
        else:
            x = lam * x + (1.0 - lam) * x[perm]
        b2 = dict(batch)
        t = batch.get("targets")
        if isinstance(t, Mapping):
            b2["targets"] = {k: (v[perm] if isinstance(v, torch.Tensor) and k == "classification" else v)
                             for k, v in t.items()}
        elif isinstance(t, torch.Tensor):
            b2["targets"] = t[perm]
        else:
            return None
        return x, lam, b2

    def _combine(self, losses: dict[str, dict[str, torch.Tensor]], batch_size: int) -> torch.Tensor:
        total = None
        for i, n in enumerate(self.head_names):
            if n not in losses:
                continue
            lh = sum(losses[n].values())
            if self.log_vars is not None:
                s = self.log_vars[i]
                term = torch.exp(-s) * lh + s
                self.log(f"train/{n}/weight", torch.exp(-s.detach()), on_step=False, on_epoch=True,
                         batch_size=batch_size)
            else:
                term = float(self.head_options[n].get("weight", 1.0)) * lh
            total = term if total is None else total + term
        if total is None:
            raise RuntimeError("no head found its targets in this batch: check that every data source feeds a head "
                               f"(sources: {[(s['name'], s['heads']) for s in self.sources]})")
        return total

    def _log_train(self, losses: dict[str, dict[str, torch.Tensor]], total: torch.Tensor, batch_size: int) -> None:
        self.log("train/loss", total.detach(), prog_bar=True, on_step=True, on_epoch=True, batch_size=batch_size)
        for n, terms in losses.items():
            if not self.single:
                self.log(f"train/{n}/loss", sum(terms.values()).detach(), on_step=False, on_epoch=True,
                         batch_size=batch_size)
            if len(terms) > 1 or not self.single:
                for k, v in terms.items():
                    self.log(self._key(n, k, "train"), v.detach(), on_step=False, on_epoch=True, batch_size=batch_size)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor | None:
        losses, bs = self.head_losses(batch)
        total = self._combine(losses, bs)
        self._log_train(losses, total, bs)
        if self.balance == "pcgrad":
            self._pcgrad_step(losses, total)
            return None
        return total

    def _pcgrad_step(self, losses: dict[str, dict[str, torch.Tensor]], total: torch.Tensor) -> None:
        opt = self.optimizers()
        opt.zero_grad(set_to_none=True)
        shared = [p for p in list(self.model.backbone.parameters()) + list(self.model.necks.parameters())
                  if p.requires_grad]
        per_head = [sum(losses[n].values()) * float(self.head_options[n].get("weight", 1.0))
                    for n in self.head_names if n in losses]
        grads = []
        for lh in per_head:
            g = torch.autograd.grad(lh, shared, retain_graph=True, allow_unused=True)
            grads.append(torch.cat([(x if x is not None else torch.zeros_like(p)).reshape(-1)
                                    for x, p in zip(g, shared)]))
        self.manual_backward(total)  # head parameters (and the shared ones, overwritten below)
        if len(grads) > 1:
            flat = pcgrad_combine(grads, seed=int(self.global_step))
            offset = 0
            for p in shared:
                n = p.numel()
                p.grad = flat[offset:offset + n].view_as(p).to(p.dtype)
                offset += n
        clip = self.options.get("gradient_clip_val")
        if clip:
            self.clip_gradients(opt, gradient_clip_val=float(clip), gradient_clip_algorithm="norm")
        opt.step()
        sched = self.lr_schedulers()
        if sched is not None:
            sched.step()

    def on_train_epoch_start(self) -> None:
        """Phase freezing: the backbone (``model.freeze_backbone_epochs``) and heads (``frozen_epochs``) train only
        from the given epoch on."""
        epoch = int(self.current_epoch)
        self._set_batch_sampler_epoch(epoch)
        bb_epochs = int(self.options.get("freeze_backbone_epochs") or 0)
        if bb_epochs:
            frozen = epoch < bb_epochs
            for p in self.model.backbone.parameters():
                p.requires_grad_(not frozen and not getattr(p, "_zoo_frozen", False))
        for n in self.head_names:
            k = int(self.head_options[n].get("frozen_epochs") or 0)
            if k:
                for p in self.model.heads[n].parameters():
                    p.requires_grad_(epoch >= k)

    def _set_batch_sampler_epoch(self, epoch: int) -> None:
        """Lightning calls ``set_epoch`` on a loader's ``sampler`` and ``batch_sampler.sampler`` only; a batch
        sampler that draws its own batches (the class-balanced one) would repeat its first epoch forever."""
        trainer = self._trainer
        loaders = getattr(trainer, "train_dataloader", None) if trainer is not None else None
        if loaders is None:
            return
        flat = getattr(loaders, "flattened", None)
        if flat is None:
            flat = list(loaders.loaders.values()) if hasattr(loaders, "loaders") else [loaders]
        for dl in flat:
            bs = getattr(dl, "batch_sampler", None)
            while bs is not None:
                if callable(getattr(bs, "set_epoch", None)) and getattr(bs, "sampler", None) is None:
                    bs.set_epoch(epoch)
                bs = getattr(bs, "batches", None)  # zoo.checkpointing.SkipBatchSampler wraps the real one

    def on_fit_start(self) -> None:
        super().on_fit_start()
        # parameters the backbone froze by config (backbone.freeze) stay frozen through phase changes
        for p in self.model.backbone.parameters():
            if not p.requires_grad:
                p._zoo_frozen = True  # type: ignore[attr-defined]

    # ------------------------------------------------------------------ validation
    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        from zoo.distributed import use_unpadded_validation

        # several processes: the zoo's data modules already evaluate without repeats; a data module of the user's
        # gets its validation loaders rebuilt so (a no-op for loaders that shard themselves)
        use_unpadded_validation(dm)
        info = getattr(dm, "info", None) or {}
        files = dict(info.get("val_ann_files") or {})
        for n, ev in self.evaluators.items():
            f = files.get(n) or (info.get("val_ann_file") if len(self.sources) == 1 else None)
            if hasattr(ev, "ann_file") and f:
                ev.ann_file = f
            if hasattr(ev, "options"):
                ev.options["output_dir"] = self.options.get("output_dir") or ev.options.get("output_dir")

    def on_validation_epoch_start(self) -> None:
        for ev in self.evaluators.values():
            ev.reset()
            ev.options["output_dir"] = self.options.get("output_dir") or self.trainer.default_root_dir
        # per head: sum of (batch loss x images) and images, in float64; reduced over the ranks at the epoch end
        self._val_loss_sums: dict[str, torch.Tensor] = {}

    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> dict[str, Any]:
        heads = list(self.sources[dataloader_idx]["heads"]) if len(self.sources) > 1 else self.head_names
        model = self.eval_model
        raw = model(self.prepare_images(batch["images"]), heads=heads)
        bs = len(batch["images"])
        for n in heads:
            ev = self.evaluators[n]
            if ev.wants_loss:
                terms = model.heads[n].loss(raw[n], batch, criterion=self._criterion(n))
                if terms:
                    lh = sum(terms.values()).detach().double()
                    acc = self._val_loss_sums.setdefault(n, torch.zeros(2, dtype=torch.float64, device=lh.device))
                    acc += torch.stack([lh * bs, lh.new_tensor(float(bs))])
            ev.update(model.heads[n], raw[n], batch)
        return {"raw": raw, "heads": heads}

    def _log_val_losses(self) -> None:
        """Each head's validation loss: the image-weighted mean of its batch losses over every rank's batches.
        (Lightning's ``sync_dist`` mean divides the summed image counts by the world size in integers, which is off
        when ranks hold different numbers of images, as they do with the unpadded validation loaders.)"""
        from zoo.distributed import is_distributed

        sums = getattr(self, "_val_loss_sums", None) or {}
        names = [n for n in self.head_names if self.evaluators[n].wants_loss]
        if not names:
            return
        acc = torch.stack([sums[n] if n in sums else torch.zeros(2, dtype=torch.float64, device=self.device)
                           for n in names]).to(self.device)
        if is_distributed():  # every rank, in the same head order
            torch.distributed.all_reduce(acc)
        for n, (total, count) in zip(names, acc.tolist()):
            if count > 0:
                self.log(self._key(n, "loss"), total / count, sync_dist=False, add_dataloader_idx=False)

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            for ev in self.evaluators.values():
                ev.reset()
            return
        self._log_val_losses()
        report: dict[str, Any] = {}
        mains = []
        for n in self.head_names:
            metrics, rep = self.evaluators[n].compute(self)
            extra = self.evaluators[n].details(self)  # per-class analyses (+ plots at a final validation)
            if extra.get("table") and rep.get("table"):
                extra["table"] = f"{rep['table']}\n\n{extra['table']}"
            rep = {**rep, **extra}
            for k, v in metrics.items():
                key = self._key(n, k)
                self.log(key, float(v), prog_bar=key == self.main_metric, sync_dist=False)
            main = metrics.get(self.evaluators[n].main_metric)
            if main is not None:
                mains.append(float(main))
            if self.single:
                report.update(rep)
            else:
                report[n] = rep
            self.evaluators[n].reset()
        if not self.single and mains:
            self.log("val/score", sum(mains) / len(mains), prog_bar=True, sync_dist=False)
        if not self.single:
            report["table"] = "\n\n".join(f"[{n}]\n{r['table']}" for n, r in report.items()
                                          if isinstance(r, Mapping) and r.get("table"))
        self.last_eval_report = report

    # ------------------------------------------------------------------ construction from config
    @classmethod
    def build(cls, cfg: Any, *, stages: tuple[str, ...] = ("train", "val")):
        """``(datamodule, constructor kwargs)`` from a validated config: heads from ``model.heads``, their data
        sources, class names bound from the data, and every option the task needs."""
        from zoo.config import ConfigError, to_container

        model_cfg = to_container(cfg.model)
        data_cfg = to_container(cfg.data)
        heads: dict[str, dict[str, Any]] = {}
        train_opts: dict[str, dict[str, Any]] = {}
        necks = {str(k): dict(v or {}) for k, v in (model_cfg.get("necks") or {}).items()}
        for name, hc in head_configs(model_cfg).items():
            try:
                hcls = head_class(hc["type"])
            except ValueError as err:
                raise ConfigError(f"model.heads.{name}.type: {err}") from None
            hc = dict(hc)
            hcls.from_model_config(hc, model_cfg, data_cfg)
            keys = set(COMMON_TRAINING_KEYS[2:]) | set(hcls.training_keys)
            train_opts[name] = {k: hc.pop(k) for k in list(hc) if k in keys}
            src = hc.pop("input", None) or hcls.neck or hcls.default_input or "backbone"
            if src not in ("backbone", "images") and src not in necks:
                if src == "fpn":
                    necks["fpn"] = {"type": "fpn", "out_channels": 128}
                else:
                    raise ConfigError(f"model.heads.{name}.input={src!r}: no such neck; necks are {sorted(necks)}")
            typ = hc.pop("type")
            try:
                check_head_kwargs(hcls, hc, f"model.heads.{name}")
            except ValueError as err:
                raise ConfigError(str(err)) from None
            heads[name] = {"type": typ, "input": src, **hc}
        used = {h["input"] for h in heads.values()}
        necks = {n: {"type": n, **c} if "type" not in c else c for n, c in necks.items() if n in used}
        balance = str(model_cfg.get("balance") or "fixed")
        if balance not in BALANCE_METHODS:
            raise ConfigError(f"model.balance={balance!r}: use one of {', '.join(BALANCE_METHODS)}")

        spec = cls.base_spec(cfg, heads, necks=necks)
        # one data source per distinct data config (similarity heads read crops: a source of their own)
        groups: dict[str, dict[str, Any]] = {}
        for name, h in heads.items():
            hcls = head_class(h["type"])
            override = train_opts[name].get("data") or {}
            fmt = hcls.format_for(h)
            key = json.dumps(override, sort_keys=True, default=str) + ("|crops" if fmt == "similarity" else "")
            g = groups.setdefault(key, {"name": "", "heads": [], "formats": [], "data": override})
            g["heads"].append(name)
            g["formats"].append(fmt)
        sources = list(groups.values())
        for i, g in enumerate(sources):
            g["name"] = g["heads"][0] if len(sources) > 1 else "data"
        seed = int(cfg.seed)
        dms = []
        class_names: dict[str, list[str]] = {}
        category_ids: dict[str, Any] = {}
        extra: dict[str, Any] = {}
        val_files: dict[str, str] = {}
        for g in sources:
            dcfg = _merge(data_cfg, g["data"])
            if g["data"]:
                _check_data_override(dcfg, g["heads"])
            sampler = None
            for n in g["heads"]:
                # a head whose loss needs special batches (class-balanced crops) decides the source's sampler
                probe = head_class(heads[n]["type"])
                if probe.target_format == "similarity":
                    from zoo.heads.embedding import BalancedSamplerFactory

                    sampler = BalancedSamplerFactory(int(train_opts[n].get("m_per_class") or 4), seed)
            boxes = any(head_class(heads[n]["type"]).result_kind in ("detection", "instance") for n in g["heads"])
            from zoo.data.datamodule import datamodule_from_config

            dm = datamodule_from_config(dcfg, tuple(g["formats"]), cls.preprocessing(spec),
                                        size_divisor=spec["size_divisor"], stages=stages, boxes=boxes,
                                        train_batch_sampler=sampler if "train" in stages else None, seed=seed)
            for n in g["heads"]:
                hcls = head_class(heads[n]["type"])
                try:
                    names = hcls.bind_data(heads[n], dm.info)
                except ValueError as err:
                    raise ConfigError(f"model.heads.{n}: {err}") from None
                if names is not None:
                    class_names[n] = names
                if dm.info.get("category_ids") is not None and hcls.result_kind != "embedding":
                    category_ids[n] = list(dm.info["category_ids"])
                if hcls.target_format == "similarity":
                    train_opts[n]["num_train_identities"] = len(dm.info["class_names"])
                    extra.setdefault("identities", {})[n] = {"train": dm.info.get("train_identities"),
                                                             "test": dm.info.get("test_identities")}
                if dm.info.get("val_ann_file"):
                    val_files[n] = dm.info["val_ann_file"]
            dms.append(dm)
        spec["heads"] = heads
        spec["class_names"] = class_names
        if len(heads) == 1:
            # the one-head layout of the single-task presets (and of their shipped bundles)
            (n,) = heads
            spec["extra"] = {"category_ids": category_ids.get(n)}
            if n in extra.get("identities", {}):
                ids = extra["identities"][n]
                spec["extra"] = {"train_identities": ids["train"], "test_identities": ids["test"]}
        else:
            spec["extra"] = {"category_ids": category_ids, **extra}
        options = cls.task_options(cfg)
        options.update(heads=train_opts, balance=balance,
                       sources=[{"name": g["name"], "heads": g["heads"], "data": g["data"]} for g in sources],
                       freeze_backbone_epochs=int(model_cfg.get("freeze_backbone_epochs") or 0),
                       gradient_clip_val=cfg.trainer.gradient_clip_val)
        first = dms[0].info
        data_info = {"kind": first["kind"], "root": first.get("root"),
                     "format": sources[0]["formats"][0] if len(sources) == 1 and len(sources[0]["formats"]) == 1
                     else [list(g["formats"]) for g in sources],
                     "val_ann_file": first.get("val_ann_file"), "val_ann_files": val_files}
        if data_cfg.get("val_fraction") is not None:  # evaluate.py re-draws the same held-out split from it
            data_info.update(val_fraction=float(data_cfg["val_fraction"]), val_seed=int(data_cfg.get("val_seed") or 0))
        dm = dms[0] if len(dms) == 1 else MultiSourceDataModule(dms, [g["name"] for g in sources],
                                                                [g["heads"] for g in sources],
                                                                mix=str(model_cfg.get("mix") or "all"), seed=seed)
        return dm, {"spec": spec, "optimizer": to_container(cfg.optimizer), "scheduler": to_container(cfg.scheduler),
                    "options": options, "data_info": data_info}

    def eval_datamodule(self, data_cfg: Any):
        """Validation data for this model: each source's data config (the given ``data``, with the head's own
        ``data`` overrides of training merged over it), the model's preprocessing and target formats, and a check
        that the dataset's classes are the model's."""
        from zoo.config import to_container
        from zoo.data.datamodule import datamodule_from_config

        spec = self.hparams.spec
        base = to_container(data_cfg)
        dms = []
        for src in self.sources:
            heads = list(src["heads"])
            formats = tuple(self.model.heads[n].data_format for n in heads)
            dcfg = _merge(base, src.get("data") or {})
            known = [spec.get("class_names", {}).get(n) for n in heads if spec.get("class_names", {}).get(n)]
            if dcfg.get("kind") == "mask_folder" and not (dcfg.get("extra") or {}).get("class_names") and known:
                # the masks hold class indices; their names are the model's (no need to repeat data.extra.class_names)
                dcfg["extra"] = {**(dcfg.get("extra") or {}), "class_names": list(known[0])}
            _held_out_split_of_training(dcfg, self.data_info, single=len(self.sources) == 1)
            dm = datamodule_from_config(dcfg, formats, self.preprocessing(spec),
                                        size_divisor=spec["size_divisor"], stages=("val",))
            for n in heads:
                head = self.model.heads[n]
                names = type(head).bind_data({}, dm.info) if dm.info.get("class_names") is not None else None
                model_names = spec.get("class_names", {}).get(n)
                if names is not None and model_names is not None and list(names) != list(model_names):
                    raise ValueError(f"head {n!r}: the dataset's classes ({len(names)}: {list(names)[:5]}...) are not "
                                     f"the model's ({len(model_names)}: {list(model_names)[:5]}...): evaluate on data "
                                     "with the same categories")
                ev = self.evaluators[n]
                if hasattr(ev, "ann_file") and dm.info.get("val_ann_file"):
                    ev.ann_file = dm.info["val_ann_file"]
            dms.append(dm)
        return dms[0] if len(dms) == 1 else MultiSourceDataModule(dms, [s["name"] for s in self.sources],
                                                                  [s["heads"] for s in self.sources])


def _held_out_split_of_training(dcfg: dict[str, Any], data_info: Mapping[str, Any], *, single: bool) -> None:
    """Evaluating on the folder a model trained on with ``data.val_fraction`` (same root, no validation split
    folder, no val_fraction given): take the training run's fraction and seed, so the held-out images are the same."""
    from pathlib import Path

    frac = (data_info or {}).get("val_fraction")
    root, trained_root = dcfg.get("root"), (data_info or {}).get("root")
    if not single or frac is None or dcfg.get("val_fraction") is not None or not root or not trained_root:
        return
    root_p = Path(str(root)).expanduser()
    if dcfg.get("kind") == "coco":
        from zoo.data.datamodule import resolve_coco_split

        has_val = resolve_coco_split(root_p, dcfg["val_split"], ann_file=dcfg.get("val_ann"),
                                     images=dcfg.get("val_images"))[0].is_file()
    else:
        has_val = (root_p / dcfg["val_split"]).is_dir()
    if root_p.resolve() != Path(str(trained_root)).expanduser().resolve() or has_val:
        return
    dcfg["val_fraction"], dcfg["val_seed"] = float(frac), int(data_info.get("val_seed") or 0)
    log.info("data.val_fraction=%s, data.val_seed=%s from the checkpoint: validating on the images its training run "
             "held out of %s", dcfg["val_fraction"], dcfg["val_seed"], root)


def _lightning_datamodule():
    import lightning.pytorch as pl

    return pl.LightningDataModule


class MultiSourceDataModule(_lightning_datamodule()):
    """Several data modules, each feeding some heads. Training batches are ``{source: batch}``:

    ``all``          every step draws one batch from every source (Lightning's ``CombinedLoader``
                     ``max_size_cycle``: an epoch is the longest source, shorter ones cycle).
    ``round_robin``  every step draws from one source, in turn (an epoch is every batch of every source).
    ``proportional`` every step draws from one source chosen at random in proportion to its batches per epoch.

    Validation runs every source's loader in sequence (``dataloader_idx`` = source index).
    """

    MIXES = ("all", "round_robin", "proportional")

    def __init__(self, modules: Sequence[Any], names: Sequence[str], heads: Sequence[Sequence[str]], *,
                 mix: str = "all", seed: int = 0) -> None:
        super().__init__()
        if mix not in self.MIXES:
            raise ValueError(f"model.mix={mix!r} unknown; use one of {self.MIXES}")
        self.modules, self.names, self.mix, self.seed = list(modules), list(names), mix, int(seed)
        self.info: dict[str, Any] = dict(self.modules[0].info)
        self.info.pop("val_ann_file", None)
        self.info["val_ann_files"] = {h: m.info["val_ann_file"] for m, hs in zip(self.modules, heads) for h in hs
                                      if m.info.get("val_ann_file")}
        self.info["sources"] = {n: m.info for n, m in zip(self.names, self.modules)}

    def train_dataloader(self):
        loaders = {n: m.train_dataloader() for n, m in zip(self.names, self.modules)}
        if self.mix == "all":
            from lightning.pytorch.utilities import CombinedLoader

            return CombinedLoader(loaders, mode="max_size_cycle")
        return _AlternatingLoader(loaders, self.mix, self.seed)

    def val_dataloader(self):
        return [m.val_dataloader() for m in self.modules]


class _AlternatingLoader:
    """One source's batch per step (``round_robin`` or ``proportional``), yielded as ``{source: batch}``."""

    def __init__(self, loaders: Mapping[str, Any], mix: str, seed: int) -> None:
        self.loaders, self.mix, self.seed, self.epoch = dict(loaders), mix, seed, 0

    def __len__(self) -> int:
        return sum(len(dl) for dl in self.loaders.values())

    def __iter__(self):
        names = list(self.loaders)
        counts = {n: len(self.loaders[n]) for n in names}
        if self.mix == "round_robin":
            order, left = [], dict(counts)
            while any(left.values()):
                for n in names:
                    if left[n]:
                        order.append(n)
                        left[n] -= 1
        else:
            order = [n for n in names for _ in range(counts[n])]
            random.Random(self.seed + self.epoch).shuffle(order)
        self.epoch += 1
        iters = {n: iter(self.loaders[n]) for n in names}
        for n in order:
            try:
                yield {n: next(iters[n])}
            except StopIteration:
                continue
