"""Instance segmentation: Mask R-CNN on the zoo backbone; COCO bbox and segm AP through the same evaluator as
detection, masks RLE-encoded in the results json. Metric keys: ``val/mAP`` (boxes), ``val/segm_mAP`` (masks), ..."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from zoo.predictor import boxes_to_original, masks_to_original
from zoo.tasks.detection import DetectionTask, resize_info

__all__ = ["InstanceTask"]


class InstanceTask(DetectionTask):
    """Mask R-CNN: boxes, labels and per-instance masks."""

    main_metric = "val/segm_mAP"
    data_format = "instance"
    iou_types = ("bbox", "segm")

    @classmethod
    def head_config(cls, cfg: Any) -> tuple[dict, dict]:
        necks, heads = super().head_config(cfg)
        if not cfg.model.head:
            heads[cls.head_name]["type"] = "mask_rcnn"
        return necks, heads

    def _collect(self, det: dict, batch: dict, i: int) -> None:
        from pycocotools import mask as mask_util

        img_id = int(batch["image_ids"][i])
        self._image_ids.append(img_id)
        info = resize_info(batch, i)
        boxes = boxes_to_original(det["boxes"].float().cpu(), info)
        masks = masks_to_original(det["masks"].cpu(), info)
        cat_ids = self.category_ids
        rles = mask_util.encode(np.asfortranarray(masks.numpy().transpose(1, 2, 0).astype(np.uint8))) if len(masks) else []
        for b, s, l, rle in zip(boxes.tolist(), det["scores"].float().cpu().tolist(), det["labels"].cpu().tolist(), rles):
            rle["counts"] = rle["counts"].decode("ascii")
            self._results.append({"image_id": img_id, "category_id": int(cat_ids[l]), "score": round(float(s), 5),
                                  "bbox": [round(b[0], 2), round(b[1], 2), round(b[2] - b[0], 2), round(b[3] - b[1], 2)],
                                  "segmentation": rle})

    def _save_visuals(self, folder: Path) -> None:
        """Validation images with predicted masks (score >= 0.3) overlaid, and boxes."""
        from torchvision.io import write_png
        from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

        folder.mkdir(parents=True, exist_ok=True)
        mean = torch.tensor(self.spec.mean).view(3, 1, 1)
        std = torch.tensor(self.spec.std).view(3, 1, 1)
        for img, (h, w), det, tgt, img_id in self._vis:
            im = ((img[:, :h, :w] * std + mean).clamp(0, 1) * 255).to(torch.uint8)
            keep = det["scores"] >= 0.3
            if keep.any():
                m = det["masks"][keep][:, 0, :h, :w].float().cpu() >= 0.5
                im = draw_segmentation_masks(im, m, alpha=0.5)
                im = draw_bounding_boxes(im, det["boxes"][keep].float().cpu(), colors="red", width=1)
            write_png(im, str(folder / f"{img_id}.png"))
