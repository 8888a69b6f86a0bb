"""Semantic segmentation: a decoder (Semantic-FPN, UPerNet, DeepLabV3+) on the backbone's levels; cross-entropy
with ignore index (+ optional dice, auxiliary head). Metrics from a confusion matrix accumulated over the
validation set: ``val/mIoU`` (mean over classes that occur in the targets or predictions), ``val/pixel_acc`` and
per-class IoU (``val/IoU/<class>``)."""

from __future__ import annotations

from typing import Any

import torch
from torchmetrics.classification import MulticlassConfusionMatrix

from zoo.tasks.base import ZooTask

__all__ = ["SemanticTask", "iou_from_confusion"]

HEAD = "seg"
IGNORE_INDEX = 255


def iou_from_confusion(cm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-class IoU, a mask of classes present (in targets or predictions) and pixel accuracy from a ``(K, K)``
    confusion matrix (rows = target, columns = prediction)."""
    cm = cm.double()
    tp = cm.diag()
    union = cm.sum(0) + cm.sum(1) - tp
    present = union > 0
    iou = torch.where(present, tp / union.clamp(min=1), torch.zeros_like(tp))
    acc = tp.sum() / cm.sum().clamp(min=1)
    return iou.float(), present, acc.float()


class SemanticTask(ZooTask):
    """Per-pixel classification. With COCO-style data class 0 is ``background``."""

    main_metric = "val/mIoU"
    main_mode = "max"
    data_format = "semantic"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        k = self.model.heads[HEAD].num_classes
        self.val_cm = MulticlassConfusionMatrix(num_classes=k, ignore_index=IGNORE_INDEX)
        self.last_eval_report: dict[str, Any] = {}
        self._vis: list[tuple] = []

    @classmethod
    def build(cls, cfg: Any, *, stages: tuple[str, ...] = ("train", "val")):
        from zoo.config import to_container
        from zoo.data.datamodule import datamodule_from_config

        head = {"type": cfg.model.decoder or "semantic_fpn", **(to_container(cfg.model.heads).get(HEAD) or {})}
        spec = cls.base_spec(cfg, {HEAD: head})
        dm = datamodule_from_config(cfg.data, cls.data_format, cls.preprocessing(spec), size_divisor=spec["size_divisor"],
                                    stages=stages, seed=int(cfg.seed))
        names = list(dm.info["class_names"])
        if dm.info.get("has_background", True):
            names = ["background", *names]
        head["num_classes"] = len(names)
        spec["heads"] = {HEAD: head}
        spec["class_names"] = {HEAD: names}
        spec["extra"] = {"category_ids": dm.info.get("category_ids"), "background": dm.info.get("has_background", True)}
        return dm, {"spec": spec, "optimizer": to_container(cfg.optimizer), "scheduler": to_container(cfg.scheduler),
                    "options": cls.task_options(cfg), "data_info": {"kind": dm.info["kind"], "root": dm.info.get("root"),
                                                                    "format": cls.data_format}}

    def eval_datamodule(self, data_cfg: Any):
        dm = super().eval_datamodule(data_cfg) if not self.spec.extra.get("background", True) else self._eval_dm_bg(data_cfg)
        return dm

    def _eval_dm_bg(self, data_cfg: Any):
        from zoo.data.datamodule import datamodule_from_config

        spec = self.hparams.spec
        dm = datamodule_from_config(data_cfg, self.data_format, self.preprocessing(spec),
                                    size_divisor=spec["size_divisor"], stages=("val",))
        names = ["background", *dm.info["class_names"]]
        if names != list(spec["class_names"][HEAD]):
            raise ValueError(f"the dataset's classes ({names[:6]}...) are not the model's "
                             f"({spec['class_names'][HEAD][:6]}...): evaluate on data with the same categories")
        return dm

    @property
    def head(self):
        return self.model.heads[HEAD]

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        raw = self.train_model()(self.prepare_images(batch["images"]))[HEAD]
        return self.log_losses(self.head.loss(raw, batch["targets"], batch["image_sizes"]), len(batch["images"]))

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        model = self.eval_model
        raw = model(self.prepare_images(batch["images"]))[HEAD]
        preds = model.heads[HEAD].postprocess(raw, batch["image_sizes"])
        targets = batch["targets"]
        for i, p in enumerate(preds):
            h, w = batch["image_sizes"][i]
            self.val_cm.update(p["mask"].reshape(-1), targets[i, :h, :w].reshape(-1))
        n_vis = int(self.options.get("visualize") or 0)
        if len(self._vis) < n_vis and self.trainer.is_global_zero:
            for i in range(min(len(preds), n_vis - len(self._vis))):
                self._vis.append((batch["images"][i].cpu(), batch["image_sizes"][i], preds[i]["mask"].cpu(),
                                  batch["image_ids"][i]))

    def on_validation_epoch_start(self) -> None:
        self._vis = []

    def on_validation_epoch_end(self) -> None:
        cm = self.val_cm.compute()
        self.val_cm.reset()
        iou, present, acc = iou_from_confusion(cm)
        miou = iou[present].mean() if present.any() else iou.new_tensor(0.0)
        self.log("val/mIoU", miou, prog_bar=True)
        self.log("val/pixel_acc", acc)
        names = self.spec.class_names.get(HEAD, [])
        per_class = {names[i] if i < len(names) else str(i): (float(iou[i]) if present[i] else None)
                     for i in range(len(iou))}
        self.last_eval_report = {"per_class_iou": per_class}
        if self._vis and self.trainer.is_global_zero:
            self._save_visuals()

    def _save_visuals(self) -> None:
        """Validation images with the predicted classes overlaid (draw_segmentation_masks) into the run folder."""
        from pathlib import Path

        from torchvision.io import write_png
        from torchvision.utils import draw_segmentation_masks

        folder = Path(self.options.get("output_dir") or self.trainer.default_root_dir) / "visualizations"
        folder.mkdir(parents=True, exist_ok=True)
        mean = torch.tensor(self.spec.mean).view(3, 1, 1)
        std = torch.tensor(self.spec.std).view(3, 1, 1)
        k = self.head.num_classes
        start = 1 if self.spec.extra.get("background", True) else 0
        for img, (h, w), mask, img_id in self._vis:
            im = ((img[:, :h, :w] * std + mean).clamp(0, 1) * 255).to(torch.uint8)
            masks = torch.stack([mask == c for c in range(start, k)]) if k > start else None
            if masks is not None and masks.any():
                im = draw_segmentation_masks(im, masks, alpha=0.5)
            write_png(im, str(folder / f"{img_id}.png"))
