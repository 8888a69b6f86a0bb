"""Lightning callbacks of the zoo's own: drawing validation predictions.

:class:`Visualize` draws the first ``n`` validation images of every epoch with each head's predictions (and the
ground truth where the head has one) into ``<run>/visualizations/`` (``<run>/visualizations/<head>/`` when the model
has several heads). It reads what the task's ``validation_step`` returns (``{"raw", "heads"}``), so it costs no
extra forward pass, and asks each head for its predictions in input pixels (``Head.predict``), so a new head is
drawn by kind without editing this file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

__all__ = ["Visualize", "draw_prediction"]

#: Predictions below this score are not drawn (detection / instance).
DRAW_SCORE = 0.3


def _image_uint8(img: torch.Tensor, size: tuple[int, int], mean: list[float], std: list[float]) -> torch.Tensor:
    h, w = size
    m = torch.tensor(mean).view(3, 1, 1)
    s = torch.tensor(std).view(3, 1, 1)
    return ((img[:, :h, :w].float().cpu() * s + m).clamp(0, 1) * 255).to(torch.uint8)


def draw_prediction(kind: str, image: torch.Tensor, pred: Any, target: Any, class_names: list[str]) -> torch.Tensor | None:
    """One drawing: ``image`` ``(3, h, w)`` uint8 with ``pred`` (a ``Head.predict`` entry) over it; ``None`` for
    kinds without a picture (embeddings)."""
    from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

    h, w = image.shape[-2:]
    name = (lambda i: class_names[i] if i < len(class_names) else str(i))
    if kind == "classification":
        top = int(pred["labels"][0])
        label = f"{name(top)} {float(pred['top_scores'][0]):.2f}"
        if target is not None and int(target) >= 0 and int(target) != top:
            label += f" (gt {name(int(target))})"
        return draw_bounding_boxes(image, torch.tensor([[0.0, 0.0, w - 1.0, h - 1.0]]), labels=[label],
                                   colors="red" if target is not None and int(target) != top else "lime", width=1)
    if kind in ("detection", "instance"):
        im = image
        if isinstance(target, dict) and len(target.get("boxes", [])):
            im = draw_bounding_boxes(im, target["boxes"].float().cpu(), colors="lime", width=1)
        keep = pred["scores"].float().cpu() >= DRAW_SCORE
        if keep.any():
            if kind == "instance":
                masks = pred["masks"][keep][:, 0, :h, :w].float().cpu() >= 0.5
                im = draw_segmentation_masks(im, masks, alpha=0.5)
            labels = [f"{name(int(c))} {float(s):.2f}" for c, s in zip(pred["labels"][keep], pred["scores"][keep])]
            im = draw_bounding_boxes(im, pred["boxes"][keep].float().cpu(), labels=labels, colors="red", width=2)
        return im
    if kind == "semantic":
        mask = pred["mask"].cpu()
        start = 1 if class_names[:1] == ["background"] else 0
        k = max(len(class_names), int(mask.max()) + 1 if mask.numel() else 0)
        masks = torch.stack([mask == c for c in range(start, k)]) if k > start else None
        if masks is not None and masks.any():
            return draw_segmentation_masks(image, masks, alpha=0.5)
        return image
    return None


class Visualize(pl.Callback):
    """Draw the first ``n`` validation images of each epoch with every head's predictions (see module docs).

    Args:
        n: images per epoch (0 disables).
        folder: where to write (default ``<output_dir or trainer.default_root_dir>/visualizations``).
    """

    def __init__(self, n: int, folder: str | Path | None = None) -> None:
        self.n = int(n)
        self.folder = Path(folder) if folder else None
        self._done: dict[int, int] = {}

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._done = {}  # per validation loader (each data source feeds its own heads)

    def _root(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Path:
        if self.folder is not None:
            return self.folder
        out = (getattr(pl_module, "options", {}) or {}).get("output_dir") or trainer.default_root_dir
        return Path(out) / "visualizations"

    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        done = self._done.get(dataloader_idx, 0)
        if self.n <= 0 or done >= self.n or trainer.sanity_checking or not trainer.is_global_zero:
            return
        if not isinstance(outputs, dict) or "raw" not in outputs:
            return
        from torchvision.io import write_png

        model = pl_module.eval_model
        spec = model.spec
        several = len(model.heads) > 1
        take = min(len(batch["images"]), self.n - done)
        with torch.no_grad():
            for name in outputs["heads"]:
                head = model.heads[name]
                try:
                    preds = head.predict(outputs["raw"][name], batch["image_sizes"])
                except NotImplementedError:
                    continue
                targets = head.batch_targets(batch)
                folder = self._root(trainer, pl_module) / (name if several else "")
                for i in range(take):
                    img = _image_uint8(batch["images"][i], batch["image_sizes"][i], spec.mean, spec.std)
                    tgt = None
                    if targets is not None and head.result_kind != "embedding":
                        tgt = targets[i]
                    pred = preds[i] if not isinstance(preds, torch.Tensor) else None
                    drawn = draw_prediction(head.result_kind, img, pred, tgt, list(head.class_names or []))
                    if drawn is None:
                        continue
                    folder.mkdir(parents=True, exist_ok=True)
                    write_png(drawn, str(folder / f"{batch['image_ids'][i]}.png"))
        self._done[dataloader_idx] = done + take
