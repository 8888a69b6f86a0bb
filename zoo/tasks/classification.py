"""Image classification: single-label (cross-entropy, label smoothing; top-1/top-5) and multi-label (BCE over
the categories present; mAP and F1)."""

from __future__ import annotations

from typing import Any

import torch
import torchmetrics
from torchmetrics.classification import MultilabelAveragePrecision, MultilabelF1Score

from zoo.tasks.base import ZooTask

__all__ = ["ClassificationTask"]

HEAD = "cls"


class ClassificationTask(ZooTask):
    """Classification on the backbone's coarsest level. Metric keys: ``val/top1``, ``val/top5`` (single-label),
    ``val/mAP``, ``val/F1`` (multi-label), ``val/loss``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        head = self.model.heads[HEAD]
        self.multilabel = head.multilabel
        k = head.num_classes
        if self.multilabel:
            self.main_metric, self.main_mode = "val/mAP", "max"
            self.val_ap = MultilabelAveragePrecision(num_labels=k, average=None)
            self.val_f1 = MultilabelF1Score(num_labels=k, average="macro", threshold=0.5)
            self.register_buffer("_val_pos", torch.zeros(k), persistent=False)
        else:
            self.main_metric, self.main_mode = "val/top1", "max"
            self.val_top1 = torchmetrics.Accuracy(task="multiclass", num_classes=k, top_k=1)
            self.val_top5 = torchmetrics.Accuracy(task="multiclass", num_classes=k, top_k=min(5, k))

    @classmethod
    def build(cls, cfg: Any, *, stages: tuple[str, ...] = ("train", "val")):
        from zoo.config import to_container
        from zoo.data.datamodule import datamodule_from_config

        multilabel = cfg.model.multilabel if cfg.model.multilabel is not None else bool(cfg.data.multilabel)
        fmt = "multilabel" if multilabel else "classification"
        head_cfg = {"type": "classification", **to_container(cfg.model.heads).get(HEAD, {})}
        head_cfg.pop("num_classes", None)
        # Preprocessing does not depend on the classes: make a provisional spec to read the data first.
        spec = cls.base_spec(cfg, {HEAD: head_cfg})
        dm = datamodule_from_config(cfg.data, fmt, cls.preprocessing(spec), size_divisor=spec["size_divisor"],
                                    stages=stages, seed=int(cfg.seed))
        names = list(dm.info["class_names"])
        head_cfg.update(num_classes=len(names), multilabel=multilabel,
                        label_smoothing=0.0 if multilabel else float(cfg.model.label_smoothing))
        spec["heads"] = {HEAD: head_cfg}
        spec["class_names"] = {HEAD: names}
        spec["extra"] = {"category_ids": dm.info.get("category_ids")}
        return dm, {"spec": spec, "optimizer": to_container(cfg.optimizer), "scheduler": to_container(cfg.scheduler),
                    "options": cls.task_options(cfg), "data_info": {"kind": dm.info["kind"], "root": dm.info.get("root"),
                                                                    "format": fmt}}

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        logits = self.train_model()(self.prepare_images(batch["images"]))[HEAD]
        return self.log_losses(self.model.heads[HEAD].loss(logits, batch["targets"]), len(logits))

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        logits = self.eval_model(self.prepare_images(batch["images"]))[HEAD]
        targets = batch["targets"]
        loss = sum(self.model.heads[HEAD].loss(logits, targets).values())
        self.log("val/loss", loss, on_epoch=True, sync_dist=True, batch_size=len(logits))
        if self.multilabel:
            t = targets.long()
            self.val_ap.update(logits.float().sigmoid(), t)
            self.val_f1.update(logits.float().sigmoid(), t)
            self._val_pos += t.sum(0).float()
        else:
            self.val_top1.update(logits, targets)
            self.val_top5.update(logits, targets)
            self.log("val/top1", self.val_top1, on_epoch=True, prog_bar=True, batch_size=len(logits))
            self.log("val/top5", self.val_top5, on_epoch=True, batch_size=len(logits))

    def on_validation_epoch_end(self) -> None:
        if not self.multilabel:
            return
        ap = self.val_ap.compute()
        pos = self._val_pos
        if self.trainer.world_size > 1:
            pos = self.all_gather(pos).sum(0)
        has = pos > 0
        m_ap = ap[has].mean() if has.any() else ap.new_tensor(0.0)
        self.log("val/mAP", m_ap, prog_bar=True)
        self.log("val/F1", self.val_f1.compute())
        self.val_ap.reset()
        self.val_f1.reset()
        self._val_pos.zero_()
