"""Object detection (and, in :mod:`zoo.tasks.instance`, instance segmentation) with COCO evaluation.

Validation maps predictions back to original pixels and original COCO category ids, writes a COCO results json
into the run folder and scores it with :func:`zoo.metrics.coco_eval.evaluate_coco` (faster-coco-eval, identical to
pycocotools). Metric keys: ``val/mAP`` (AP@[.5:.95]), ``val/mAP50``, ``val/mAP75``, ``val/mAP_s|m|l``,
``val/mAR1|10|100``, ...
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from zoo.predictor import boxes_to_original
from zoo.preprocess import ResizeInfo
from zoo.tasks.base import ZooTask

log = logging.getLogger(__name__)

__all__ = ["DetectionTask", "resize_info"]

HEAD = "det"


def resize_info(batch: dict, i: int) -> ResizeInfo:
    """The resize record of image ``i`` of a collated batch (what the Predictor computes for a service)."""
    sy, sx = batch["scales"][i]
    return ResizeInfo(tuple(batch["orig_sizes"][i]), tuple(batch["image_sizes"][i]), sy, sx)


class DetectionTask(ZooTask):
    """A detector: backbone -> FPN -> FCOS / RetinaNet / Faster R-CNN head."""

    main_metric = "val/mAP"
    main_mode = "max"
    data_format = "detection"
    head_name = HEAD
    iou_types: tuple[str, ...] = ("bbox",)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._results: list[dict] = []
        self._image_ids: list[int] = []
        self._vis: list[tuple] = []
        self.last_eval_report: dict[str, Any] = {}
        self.val_ann_file: str | None = (self.hparams.data_info or {}).get("val_ann_file")

    # ------------------------------------------------------------------ construction
    @classmethod
    def head_config(cls, cfg: Any) -> tuple[dict, dict]:
        from zoo.config import to_container

        necks = to_container(cfg.model.necks) or {}
        fpn = {"type": "fpn", "out_channels": 128, **(necks.get("fpn") or {})}
        head = {"type": cfg.model.head or "fcos", "input": "fpn", **(to_container(cfg.model.heads).get(cls.head_name) or {})}
        head.update(to_container(cfg.model.postprocess) or {})
        return {"fpn": fpn}, {cls.head_name: head}

    @classmethod
    def build(cls, cfg: Any, *, stages: tuple[str, ...] = ("train", "val")):
        from zoo.config import to_container
        from zoo.data.datamodule import datamodule_from_config

        necks, heads = cls.head_config(cfg)
        spec = cls.base_spec(cfg, heads, necks=necks)
        dm = datamodule_from_config(cfg.data, cls.data_format, cls.preprocessing(spec), size_divisor=spec["size_divisor"],
                                    stages=stages, boxes=True, seed=int(cfg.seed))
        names = list(dm.info["class_names"])
        heads[cls.head_name]["num_classes"] = len(names)
        spec["heads"] = heads
        spec["class_names"] = {cls.head_name: names}
        spec["extra"] = {"category_ids": dm.info.get("category_ids")}
        info = {"kind": dm.info["kind"], "root": dm.info.get("root"), "format": cls.data_format,
                "val_ann_file": dm.info.get("val_ann_file")}
        return dm, {"spec": spec, "optimizer": to_container(cfg.optimizer), "scheduler": to_container(cfg.scheduler),
                    "options": cls.task_options(cfg), "data_info": info}

    def eval_datamodule(self, data_cfg: Any):
        dm = super().eval_datamodule(data_cfg)
        self.val_ann_file = dm.info.get("val_ann_file")
        return dm

    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None)
        if dm is not None and getattr(dm, "info", None) and dm.info.get("val_ann_file"):
            self.val_ann_file = dm.info["val_ann_file"]

    @property
    def head(self):
        return self.model.heads[self.head_name]

    @property
    def category_ids(self) -> list[int]:
        ids = self.spec.extra.get("category_ids")
        return list(ids) if ids else list(range(1, self.head.num_classes + 1))

    # ------------------------------------------------------------------ steps
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        raw = self.train_model()(self.prepare_images(batch["images"]))[self.head_name]
        return self.log_losses(self.head.loss(raw, batch["targets"], batch["image_sizes"]), len(batch["images"]))

    def postprocess_options(self) -> dict:
        pp = dict(self.options.get("postprocess") or {})
        return {k: pp[k] for k in ("score_thresh", "nms_thresh", "max_detections", "pre_nms_topk") if k in pp}

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        model = self.eval_model
        raw = model(self.prepare_images(batch["images"]))[self.head_name]
        dets = model.heads[self.head_name].postprocess(raw, batch["image_sizes"], **self.postprocess_options())
        for i, det in enumerate(dets):
            self._collect(det, batch, i)
        n_vis = int(self.options.get("visualize") or 0)
        if len(self._vis) < n_vis and self.trainer.is_global_zero:
            for i in range(min(len(dets), n_vis - len(self._vis))):
                self._vis.append((batch["images"][i].cpu(), batch["image_sizes"][i], dets[i],
                                  batch["targets"][i], batch["image_ids"][i]))

    def _collect(self, det: dict, batch: dict, i: int) -> None:
        img_id = int(batch["image_ids"][i])
        self._image_ids.append(img_id)
        boxes = boxes_to_original(det["boxes"].float().cpu(), resize_info(batch, i))
        cat_ids = self.category_ids
        for b, s, l in zip(boxes.tolist(), det["scores"].float().cpu().tolist(), det["labels"].cpu().tolist()):
            self._results.append({"image_id": img_id, "category_id": int(cat_ids[l]),
                                  "bbox": [round(b[0], 2), round(b[1], 2), round(b[2] - b[0], 2), round(b[3] - b[1], 2)],
                                  "score": round(float(s), 5)})

    def on_validation_epoch_start(self) -> None:
        self._results, self._image_ids, self._vis = [], [], []

    def _gather(self) -> tuple[list[dict], list[int]]:
        results, ids = self._results, self._image_ids
        if self.trainer.world_size > 1:
            import torch.distributed as dist

            buf: list[Any] = [None] * self.trainer.world_size
            dist.all_gather_object(buf, (results, ids))
            results = [r for part in buf for r in part[0]]
            ids = sorted({i for part in buf for i in part[1]})
        return results, ids

    def on_validation_epoch_end(self) -> None:
        from zoo.metrics.coco_eval import evaluate_coco, results_to_json

        results, ids = self._gather()
        metrics: dict[str, float] = {}
        if self.trainer.is_global_zero and not self.trainer.sanity_checking:
            if not self.val_ann_file:
                raise RuntimeError("no validation annotation file known: COCO evaluation needs the data module's "
                                   "val_ann_file")
            out_dir = Path(self.options.get("output_dir") or self.trainer.default_root_dir)
            results_path = out_dir / "detections.json"
            results_to_json(results, results_path)
            report: dict[str, Any] = {"results_file": str(results_path), "num_images": len(ids)}
            tables = []
            for iou_type in self.iou_types:
                res = evaluate_coco(self.val_ann_file, results, iou_type, image_ids=ids)
                prefix = "val/" if iou_type == "bbox" else "val/segm_"
                metrics.update(res.to_metrics(prefix=prefix))
                tables.append(f"COCO {iou_type} ({len(ids)} images)\n{res.table()}")
                report[f"{iou_type}_per_class_ap"] = {k: (None if v != v else v) for k, v in res.per_class_ap.items()}
            report["table"] = "\n\n".join(tables)
            self.last_eval_report = report
            if self._vis:
                self._save_visuals(out_dir / "visualizations")
        if self.trainer.world_size > 1:
            metrics = self.trainer.strategy.broadcast(metrics, src=0)
        for k, v in metrics.items():
            self.log(k, float(v), prog_bar=k == self.main_metric, sync_dist=False)
        self._results, self._image_ids = [], []

    def _save_visuals(self, folder: Path) -> None:
        """Validation images with predictions (red, score >= 0.3) and ground truth (green) drawn."""
        from torchvision.io import write_png
        from torchvision.utils import draw_bounding_boxes

        folder.mkdir(parents=True, exist_ok=True)
        mean = torch.tensor(self.spec.mean).view(3, 1, 1)
        std = torch.tensor(self.spec.std).view(3, 1, 1)
        names = self.spec.class_names.get(self.head_name, [])
        for img, (h, w), det, tgt, img_id in self._vis:
            im = ((img[:, :h, :w] * std + mean).clamp(0, 1) * 255).to(torch.uint8)
            gt = tgt["boxes"]
            if len(gt):
                im = draw_bounding_boxes(im, gt, colors="lime", width=1)
            keep = det["scores"] >= 0.3
            if keep.any():
                labels = [f"{names[int(l)] if names else int(l)} {float(s):.2f}"
                          for l, s in zip(det["labels"][keep], det["scores"][keep])]
                im = draw_bounding_boxes(im, det["boxes"][keep].float().cpu(), labels=labels, colors="red", width=2)
            write_png(im, str(folder / f"{img_id}.png"))
