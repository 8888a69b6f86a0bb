"""One evaluator per result kind, used by validation and by ``evaluate.py`` alike (both run the training task's
validation loop): classification (top-1/top-5, or mAP/F1 multi-label), COCO box / mask AP, semantic segmentation
(confusion matrix: mIoU, pixel accuracy, per-class IoU) and retrieval (Recall@k, mAP@R).

Each evaluator is fed per batch with the head, its raw output and the collated batch (:meth:`Evaluator.update`),
and gives metric values without prefix plus a report for ``metrics.json`` (:meth:`Evaluator.compute`); the task
logs them under ``val/`` (one head) or ``val/<head>/`` (several). :meth:`Evaluator.details` adds per-class analyses
to the report (confusion matrix as a nested list, per-class accuracy / IoU, per-class best F1 and its score
threshold, a printable ``table``) and, at a final validation (``trainer.validate``: the best checkpoint after
training, ``evaluate.py``), writes plots (:mod:`zoo.plots`) into ``<output_dir>/plots/`` (``plots/<head>/`` with
several heads). Training-side only: torchmetrics and the COCO evaluator are imported here.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, ClassVar, Mapping

import torch
from torch import nn

from zoo.preprocess import IGNORE_INDEX
from zoo.preprocess import ResizeInfo

log = logging.getLogger(__name__)

__all__ = [
    "Evaluator", "ClassificationEvaluator", "CocoEvaluator", "SemanticEvaluator", "RetrievalEvaluator",
    "evaluator_for", "iou_from_confusion", "batch_infos", "is_final_validation",
]


def batch_infos(batch: Mapping[str, Any]) -> list[ResizeInfo]:
    """The resize record of every image of a collated batch (what the Predictor computes for a service)."""
    return [ResizeInfo(tuple(o), tuple(s), sc[0], sc[1])
            for o, s, sc in zip(batch["orig_sizes"], batch["image_sizes"], batch["scales"])]


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


class Evaluator(nn.Module):
    """Accumulates one head's validation predictions and turns them into metrics.

    Attributes:
        main_metric: the key (without prefix) checkpoint selection uses for this head; higher is better.
        wants_loss: whether the task should log this head's validation loss (not for open-set retrieval, whose
            held-out identities a proxy-based loss does not know).
    """

    main_metric: ClassVar[str] = ""
    wants_loss: ClassVar[bool] = True

    def __init__(self, head: nn.Module, options: Mapping[str, Any] | None = None) -> None:
        super().__init__()
        self.options = dict(options or {})

    def reset(self) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def update(self, head: nn.Module, raw: Any, batch: Mapping[str, Any]) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def compute(self, module: Any) -> tuple[dict[str, float], dict[str, Any]]:  # pragma: no cover - abstract
        """``(metrics, report)``; ``module`` is the LightningModule (for gathering across ranks)."""
        raise NotImplementedError

    def details(self, module: Any) -> dict[str, Any]:
        """Per-class analyses merged into the report after :meth:`compute` (before :meth:`reset`), and plots at a
        final validation (:meth:`plot_dir`). Default: nothing."""
        return {}

    def plot_dir(self, module: Any) -> Path | None:
        """Where this evaluator writes its plots now, or ``None``: plots are written at a final validation only
        (``trainer.validate``, not the validation epochs of fitting), on rank zero, when matplotlib is installed
        and the ``plots`` option is not off."""
        trainer = getattr(module, "_trainer", None)
        if trainer is None or not self.options.get("plots", True) or not trainer.is_global_zero:
            return None
        if not is_final_validation(module):
            return None
        from zoo import plots

        if not plots.available():
            log.warning("matplotlib is not installed: no plots written (pip install matplotlib)")
            return None
        out = Path(self.options.get("output_dir") or trainer.default_root_dir) / "plots"
        return out / str(self.options.get("plot_subdir") or "")

    @property
    def class_names(self) -> list[str]:
        return list(getattr(self, "_names", []) or [])


def is_final_validation(module: Any) -> bool:
    """Whether the validation running now is a final one, which writes plots and sample grids: a
    ``trainer.validate`` (the end of ``train.py``, ``evaluate.py``), or the last epoch's validation of a fit whose
    validation schedule (:class:`zoo.callbacks.ValidationSchedule`) marked it so that ``train()`` can reuse it
    instead of validating the same weights again."""
    trainer = getattr(module, "_trainer", None)
    if trainer is None or trainer.sanity_checking:
        return False
    if getattr(trainer.state.fn, "value", trainer.state.fn) == "validate":
        return True
    return bool(getattr(module, "final_fit_validation", False))


def confusion_details(cm: torch.Tensor, names: list[str], what: str, iou: bool = False) -> dict[str, Any]:
    """Report entries of a ``(K, K)`` confusion matrix (rows: target, columns: prediction): the matrix as a nested
    list, per-class accuracy (recall: the fraction of a class's ``what`` predicted as it; ``None`` without any),
    per-class IoU when ``iou``, and a table of them with each class's support."""
    cm = cm.detach().cpu().long()
    k = cm.shape[0]
    names = [names[i] if i < len(names) else str(i) for i in range(k)]
    support = cm.sum(1)
    tp = cm.diag()
    acc = {n: (float(tp[i]) / float(support[i]) if support[i] > 0 else None) for i, n in enumerate(names)}
    out: dict[str, Any] = {"confusion_matrix": cm.tolist(), "per_class_accuracy": acc}
    union = cm.sum(0) + support - tp
    ious = {n: (float(tp[i]) / float(union[i]) if union[i] > 0 else None) for i, n in enumerate(names)}
    w = max([8, *(len(n) for n in names)])
    cols = f"{'class':<{w}}  {'accuracy':>8}" + (f"  {'IoU':>6}" if iou else "") + f"  {what:>10}"
    lines = [f"per-class {'accuracy and IoU' if iou else 'accuracy'}", cols, "-" * len(cols)]
    fmt = (lambda v, d: f"{v:>{d}.3f}" if v is not None else f"{'-':>{d}}")
    for i, n in enumerate(names):
        lines.append(f"{n:<{w}}  {fmt(acc[n], 8)}" + (f"  {fmt(ious[n], 6)}" if iou else "") + f"  {int(support[i]):>10}")
    out["table"] = "\n".join(lines)
    return out


class ClassificationEvaluator(Evaluator):
    """Single-label: ``top1``, and ``top5`` when there are more than 5 classes (with 5 or fewer it is always 1)
    (images without a label, ``-100``, are left out). Multi-label: ``mAP``
    (mean over classes with at least one positive) and macro ``F1`` at 0.5."""

    def __init__(self, head: nn.Module, options: Mapping[str, Any] | None = None) -> None:
        super().__init__(head, options)
        import torchmetrics
        from torchmetrics.classification import MultilabelAveragePrecision, MultilabelF1Score

        k = int(head.num_classes)
        self.multilabel = bool(head.multilabel)
        from torchmetrics.classification import MulticlassConfusionMatrix

        # single-label: rows ground truth, columns the top-1 prediction (details(): metrics.json and the plot)
        self.cm = None if self.multilabel else MulticlassConfusionMatrix(num_classes=k)
        if self.multilabel:
            self.main = "mAP"
            self.ap = MultilabelAveragePrecision(num_labels=k, average=None)
            self.f1 = MultilabelF1Score(num_labels=k, average="macro", threshold=0.5)
            self.register_buffer("positives", torch.zeros(k), persistent=False)
        else:
            self.main = "top1"
            self.top1 = torchmetrics.Accuracy(task="multiclass", num_classes=k, top_k=1)
            self.top5 = torchmetrics.Accuracy(task="multiclass", num_classes=k, top_k=5) if k > 5 else None

    @property
    def main_metric(self) -> str:  # type: ignore[override]
        return self.main

    def details(self, module: Any) -> dict[str, Any]:
        """Single-label: the confusion matrix, per-class accuracy and its table; the confusion-matrix plot."""
        if self.cm is None or (self.cm.update_count == 0 and module.trainer.world_size == 1):
            return {}
        cm = self.cm.compute()
        out = confusion_details(cm, self.class_names, "images")
        folder = self.plot_dir(module)
        if folder is not None:
            from zoo.plots import plot_confusion_matrix

            names = [n for n in out["per_class_accuracy"]]
            out["plots"] = [str(plot_confusion_matrix(cm, names, folder / "confusion_matrix.png"))]
        return out

    def reset(self) -> None:
        if self.cm is not None:
            self.cm.reset()
        if self.multilabel:
            self.ap.reset()
            self.f1.reset()
            self.positives.zero_()
        else:
            self.top1.reset()
            if self.top5 is not None:
                self.top5.reset()

    def update(self, head: nn.Module, raw: Any, batch: Mapping[str, Any]) -> None:
        targets = head.batch_targets(batch)
        if targets is None:
            return
        logits = raw.float()
        if self.cm is not None:
            labelled = targets >= 0
            if labelled.any():
                self.cm.update(logits[labelled].argmax(-1), targets[labelled])
        if self.multilabel:
            t = targets.long()
            self.ap.update(logits.sigmoid(), t)
            self.f1.update(logits.sigmoid(), t)
            self.positives += t.sum(0).float()
        else:
            keep = targets >= 0
            if keep.any():
                self.top1.update(logits[keep], targets[keep])
                if self.top5 is not None:
                    self.top5.update(logits[keep], targets[keep])

    def compute(self, module: Any) -> tuple[dict[str, float], dict[str, Any]]:
        if self.multilabel:
            ap = self.ap.compute()
            pos = self.positives
            if module.trainer.world_size > 1:
                pos = module.all_gather(pos).sum(0)
            has = pos > 0
            m_ap = float(ap[has].mean()) if has.any() else 0.0
            return {"mAP": m_ap, "F1": float(self.f1.compute())}, {}
        top5 = {"top5": 0.0} if self.top5 is not None else {}
        if self.top1.update_count == 0 and module.trainer.world_size == 1:
            return {"top1": 0.0, **top5}, {"num_images": 0}
        if self.top5 is not None:
            top5["top5"] = float(self.top5.compute())
        return {"top1": float(self.top1.compute()), **top5}, {}


class CocoEvaluator(Evaluator):
    """COCO AP through :func:`zoo.metrics.coco_eval.evaluate_coco` (faster-coco-eval, identical to pycocotools)
    on the head's typed results (:meth:`~zoo.results.Detections.to_coco`: original pixels, original category ids),
    written to ``detections[_<head>].json`` in the run folder. Keys: ``mAP``, ``mAP50``, ``mAP75``, ``mAP_s|m|l``,
    ``mAR1|10|100``, ...; instance heads add the same with a ``segm_`` prefix and select on ``segm_mAP``."""

    def __init__(self, head: nn.Module, options: Mapping[str, Any] | None = None) -> None:
        super().__init__(head, options)
        self.iou_types = ("bbox", "segm") if head.result_kind == "instance" else ("bbox",)
        self.main = "segm_mAP" if head.result_kind == "instance" else "mAP"
        self.ann_file: str | None = self.options.get("ann_file")
        self.results: list[dict] = []
        self.image_ids: list[int] = []
        self._evals: dict[str, Any] = {}

    @property
    def main_metric(self) -> str:  # type: ignore[override]
        return self.main

    def reset(self) -> None:
        self.results, self.image_ids = [], []
        self._evals = {}

    def details(self, module: Any) -> dict[str, Any]:
        """Per class (IoU 0.5): the best F1 and the score threshold reaching it (``<iou_type>_best_f1``), and the
        precision-recall and F1-vs-score plots (``pr_curve.png``, ``f1_curve.png``; ``segm_`` ones too for
        instance heads)."""
        from zoo.plots import best_f1

        out: dict[str, Any] = {}
        folder = self.plot_dir(module)
        paths = []
        for iou_type, res in self._evals.items():
            if res.precision is None:
                continue
            names = list(res.per_class_ap)
            if res.scores is not None:
                out[f"{iou_type}_best_f1"] = best_f1(res.precision, res.scores, names)
            if folder is not None:
                from zoo.plots import plot_f1_curves, plot_pr_curves

                prefix = "" if iou_type == "bbox" else f"{iou_type}_"
                paths.append(str(plot_pr_curves(res.precision, names, folder / f"{prefix}pr_curve.png",
                                                title=f"precision-recall ({iou_type})")))
                if res.scores is not None:
                    paths.append(str(plot_f1_curves(res.precision, res.scores, names, folder / f"{prefix}f1_curve.png",
                                                    title=f"F1 against score threshold ({iou_type})")))
        if paths:
            out["plots"] = paths
        return out

    def update(self, head: nn.Module, raw: Any, batch: Mapping[str, Any]) -> None:
        opts = {k: v for k, v in dict(self.options.get("postprocess") or {}).items() if k in head.options}
        for res, img_id in zip(head.postprocess(raw, batch_infos(batch), **opts), batch["image_ids"]):
            self.image_ids.append(int(img_id))
            for r in res.to_coco(int(img_id)):
                r["bbox"] = [round(float(v), 2) for v in r["bbox"]]
                r["score"] = round(float(r["score"]), 5)
                if "segmentation" in r:  # the results-file convention: compressed RLE with str counts
                    from pycocotools import mask as mask_util

                    seg = r["segmentation"]
                    rle = mask_util.frPyObjects(seg, *seg["size"])
                    r["segmentation"] = {"size": rle["size"], "counts": rle["counts"].decode("ascii")}
                self.results.append(r)

    def compute(self, module: Any) -> tuple[dict[str, float], dict[str, Any]]:
        from zoo.metrics.coco_eval import evaluate_coco, results_to_json

        results, ids = self.results, self.image_ids
        trainer = module.trainer
        if trainer.world_size > 1:
            from zoo.distributed import gather_objects

            # every rank's images and their results; an image seen by two ranks (a sampler that pads the last
            # round with repeats) counts once, with the results of the first rank that saw it
            owner: dict[int, int] = {}
            parts = gather_objects((results, ids))
            for r, (_, part_ids) in enumerate(parts):
                for i in part_ids:
                    owner.setdefault(int(i), r)
            results = [res for r, (part_res, _) in enumerate(parts) for res in part_res
                       if owner.get(int(res["image_id"])) == r]
            ids = sorted(owner)
        metrics: dict[str, float] = {}
        report: dict[str, Any] = {}
        if trainer.is_global_zero:
            if not self.ann_file:
                raise RuntimeError("no validation annotation file known: COCO evaluation needs the data module's "
                                   "val_ann_file")
            out = Path(self.options.get("output_dir") or trainer.default_root_dir)
            path = out / str(self.options.get("results_file") or "detections.json")
            results_to_json(results, path)
            report = {"results_file": str(path), "num_images": len(ids)}
            tables = []
            for iou_type in self.iou_types:
                res = evaluate_coco(self.ann_file, results, iou_type, image_ids=ids)
                self._evals[iou_type] = res
                metrics.update(res.to_metrics(prefix="" if iou_type == "bbox" else "segm_"))
                tables.append(f"COCO {iou_type} ({len(ids)} images)\n{res.table()}")
                report[f"{iou_type}_per_class_ap"] = {k: (None if v != v else v) for k, v in res.per_class_ap.items()}
            report["table"] = "\n\n".join(tables)
        if trainer.world_size > 1:
            metrics = trainer.strategy.broadcast(metrics, src=0)
        return metrics, report


class SemanticEvaluator(Evaluator):
    """A confusion matrix over the validation pixels at the model's input resolution (padding excluded): ``mIoU``
    (mean over classes present in the targets or predictions), ``pixel_acc``; per-class IoU in the report."""

    main_metric = "mIoU"

    def __init__(self, head: nn.Module, options: Mapping[str, Any] | None = None) -> None:
        super().__init__(head, options)
        from torchmetrics.classification import MulticlassConfusionMatrix

        self.cm = MulticlassConfusionMatrix(num_classes=int(head.num_classes), ignore_index=IGNORE_INDEX)

    def reset(self) -> None:
        self.cm.reset()

    def update(self, head: nn.Module, raw: Any, batch: Mapping[str, Any]) -> None:
        targets = head.batch_targets(batch)
        if targets is None:
            return
        for i, p in enumerate(head.predict(raw, batch["image_sizes"])):
            h, w = batch["image_sizes"][i]
            self.cm.update(p["mask"].reshape(-1), targets[i, :h, :w].reshape(-1).to(p["mask"].device))

    def compute(self, module: Any) -> tuple[dict[str, float], dict[str, Any]]:
        iou, present, acc = iou_from_confusion(self.cm.compute())
        miou = float(iou[present].mean()) if present.any() else 0.0
        names = list(getattr(self, "_names", []) or [])
        per_class = {names[i] if i < len(names) else str(i): (float(iou[i]) if present[i] else None)
                     for i in range(len(iou))}
        return {"mIoU": miou, "pixel_acc": float(acc)}, {"per_class_iou": per_class}

    def details(self, module: Any) -> dict[str, Any]:
        """The confusion matrix over pixels, per-class accuracy, a table with per-class IoU, and the plot."""
        if self.cm.update_count == 0 and module.trainer.world_size == 1:
            return {}
        cm = self.cm.compute()
        out = confusion_details(cm, self.class_names, "pixels", iou=True)
        folder = self.plot_dir(module)
        if folder is not None:
            from zoo.plots import plot_confusion_matrix

            out["plots"] = [str(plot_confusion_matrix(cm, list(out["per_class_accuracy"]),
                                                      folder / "confusion_matrix.png",
                                                      title="confusion matrix (pixels)"))]
        return out


class RetrievalEvaluator(Evaluator):
    """Open-set retrieval over the validation crops (leave-one-out: each query among all other crops):
    ``R@1``, ``R@5``, ``R@10``, ``mAP@R``."""

    main_metric = "R@1"
    wants_loss = False

    def __init__(self, head: nn.Module, options: Mapping[str, Any] | None = None) -> None:
        super().__init__(head, options)
        self.emb: list[torch.Tensor] = []
        self.lab: list[torch.Tensor] = []
        self.dim = int(getattr(head, "embedding_dim", 0) or 0)

    def reset(self) -> None:
        self.emb, self.lab = [], []

    def update(self, head: nn.Module, raw: Any, batch: Mapping[str, Any]) -> None:
        targets = head.batch_targets(batch)
        if targets is None:
            return
        self.emb.append(head.predict(raw))
        self.lab.append(targets)

    def compute(self, module: Any) -> tuple[dict[str, float], dict[str, Any]]:
        from zoo.metrics.retrieval import retrieval_metrics

        if module.trainer.world_size > 1:
            from zoo.distributed import gather_in_dataset_order

            # every rank takes part (a rank without validation crops too); the rows go back into dataset order, so
            # the metrics are those of one process on the same crops (validation loaders do not pad under DDP:
            # zoo.distributed.use_unpadded_validation)
            device = module.device
            emb = torch.cat(self.emb) if self.emb else torch.zeros((0, self.dim), device=device)
            lab = torch.cat(self.lab).long() if self.lab else torch.zeros((0,), dtype=torch.long, device=device)
            emb = gather_in_dataset_order(emb.float())
            lab = gather_in_dataset_order(lab.to(emb.device))
        elif self.emb:
            emb, lab = torch.cat(self.emb), torch.cat(self.lab)
        else:
            return {}, {}
        if len(lab) == 0:
            return {}, {}
        metrics = {k: float(v) for k, v in retrieval_metrics(emb, lab).items()}
        return metrics, {"num_queries": int(len(lab)), "num_identities": int(lab.unique().numel())}


_BY_KIND = {
    "classification": ClassificationEvaluator,
    "detection": CocoEvaluator,
    "instance": CocoEvaluator,
    "semantic": SemanticEvaluator,
    "embedding": RetrievalEvaluator,
}


def _generation_evaluator(head: nn.Module, options: Mapping[str, Any] | None = None) -> Evaluator:
    from zoo.generation.evaluator import GenerationEvaluator  # the generation package's own evaluator

    return GenerationEvaluator(head, options)


_BY_KIND["generation"] = _generation_evaluator


def _reconstruction_evaluator(head: nn.Module, options: Mapping[str, Any] | None = None) -> Evaluator:
    from zoo.generation.evaluator import ReconstructionEvaluator

    return ReconstructionEvaluator(head, options)


_BY_KIND["reconstruction"] = _reconstruction_evaluator


def evaluator_for(head: nn.Module, options: Mapping[str, Any] | None = None) -> Evaluator:
    """The evaluator of ``head``'s result kind."""
    kind = head.result_kind
    if kind not in _BY_KIND:
        raise ValueError(f"no evaluator for result kind {kind!r} (head {type(head).__name__})")
    ev = _BY_KIND[kind](head, options)
    ev._names = list(getattr(head, "class_names", []) or [])
    return ev


def finite(v: float) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(float(v))
