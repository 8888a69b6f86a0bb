"""Lightning callbacks of the zoo's own: drawing validation predictions.

:class:`Visualize` draws the first ``n`` validation images of every epoch with each head's predictions beside the
ground truth (where the head has one) into ``<run>/visualizations/`` (``<run>/visualizations/<head>/`` when the
model has several heads): left panel ground truth, right panel prediction, both at the image's original resolution
(boxes with ``"<class> <score>"`` labels, line width scaled to the image). It reads what the task's
``validation_step`` returns (``{"raw", "heads"}``), so it costs no extra forward pass, and asks each head for its
typed results (``Head.postprocess``, drawn by their ``plot()``), so a new head is drawn by kind without editing this
file. ``draw_prediction`` is the older one-panel drawing at input resolution.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

from zoo.checkpointing import rank_zero_decides
from zoo.progress import emit, progress_logger  # noqa: F401  (re-exported)

__all__ = ["Visualize", "draw_prediction", "EpochSummary", "AutoEpochs", "ZooModelSummary", "emit", "progress_logger"]

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
        score_thresh: detections / instances scoring below this are not drawn (``callbacks.visualize_score_thresh``).
    """

    def __init__(self, n: int, folder: str | Path | None = None, score_thresh: float = DRAW_SCORE) -> None:
        self.n = int(n)
        self.folder = Path(folder) if folder else None
        self.score_thresh = float(score_thresh)
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
        from PIL import Image

        from zoo.metrics.evaluators import batch_infos

        model = pl_module.eval_model
        spec = model.spec
        several = len(model.heads) > 1
        take = min(len(batch["images"]), self.n - done)
        infos = batch_infos(batch)
        post = dict((getattr(pl_module, "options", {}) or {}).get("postprocess") or {})
        with torch.no_grad():
            images = [_original_image(batch["images"][i], infos[i], spec.mean, spec.std) for i in range(take)]
            for name in outputs["heads"]:
                head = model.heads[name]
                if head.result_kind == "embedding":
                    continue
                try:
                    opts = {k: v for k, v in post.items() if k in head.options}
                    results = head.postprocess(outputs["raw"][name], infos, **opts)
                except NotImplementedError:
                    continue
                targets = head.batch_targets(batch)
                names = list(head.class_names or []) or [str(i) for i in range(int(getattr(head, "num_classes", 0)))]
                folder = self._root(trainer, pl_module) / (name if several else "")
                for i in range(take):
                    if not callable(getattr(results[i], "plot", None)):
                        break  # a result kind without a drawing
                    pred = _plot(results[i], images[i], self.score_thresh)
                    truth = None
                    if targets is not None:
                        truth = _plot_truth(head.result_kind, targets[i], infos[i], images[i], names,
                                            bool(getattr(head, "multilabel", False)))
                    if truth is not None:
                        from zoo.drawing import side_by_side

                        drawn = side_by_side([truth, pred], ["ground truth", "prediction"])
                    else:
                        drawn = pred
                    folder.mkdir(parents=True, exist_ok=True)
                    Image.fromarray(drawn).save(folder / f"{batch['image_ids'][i]}.png")
        self._done[dataloader_idx] = done + take


def _original_image(img: torch.Tensor, info: Any, mean: list[float], std: list[float]):
    """The validation image back at its original size, ``(H, W, 3)`` uint8 (the resized input, scaled up)."""
    import torch.nn.functional as F

    x = _image_uint8(img, tuple(info.size), mean, std)
    if tuple(x.shape[-2:]) != tuple(info.orig_size):
        x = F.interpolate(x[None].float(), size=tuple(info.orig_size), mode="bilinear", align_corners=False,
                          antialias=True)[0].round().clamp(0, 255).to(torch.uint8)
    return x.permute(1, 2, 0).contiguous().numpy()


def _plot(result: Any, image: Any, score_thresh: float):
    """A typed result drawn on its image (detections below ``score_thresh`` left out)."""
    from zoo.results import Detections

    if isinstance(result, Detections):
        return result.plot(image, score_thresh=score_thresh)
    return result.plot(image)


def _plot_truth(kind: str, target: Any, info: Any, image: Any, names: list[str], multilabel: bool):
    """The ground truth of one validation image drawn at its original resolution, or ``None``."""
    from zoo.drawing import class_color, draw_banner
    from zoo.preprocess import boxes_to_original, masks_to_original
    from zoo.results import Detections, InstanceSegmentation, SemanticSegmentation

    name = (lambda i: names[i] if 0 <= i < len(names) else str(i))
    if kind == "classification":
        t = torch.as_tensor(target)
        ids = torch.nonzero(t > 0.5).flatten().tolist() if multilabel else ([int(t)] if int(t) >= 0 else [])
        if not ids:
            return draw_banner(image, ["(no label)"])
        return draw_banner(image, [name(i) for i in ids], [class_color(i) for i in ids])
    if kind in ("detection", "instance") and isinstance(target, dict):
        boxes = torch.as_tensor(target.get("boxes", torch.zeros(0, 4))).float().cpu().reshape(-1, 4)
        labels = torch.as_tensor(target.get("labels", torch.zeros(0))).long().cpu().reshape(-1)
        fields = dict(boxes=boxes_to_original(boxes, info), scores=torch.ones(len(labels)), labels=labels,
                      names=[name(int(i)) for i in labels.tolist()], category_ids=None,
                      image_size=tuple(info.orig_size))
        masks = target.get("masks")
        if kind == "instance" and masks is not None and len(masks) == len(labels):
            res = InstanceSegmentation(**fields, masks=masks_to_original(torch.as_tensor(masks).float().cpu(), info))
        else:
            res = Detections(**fields)
        return res.plot(image, show_scores=False)
    if kind == "semantic" and isinstance(target, torch.Tensor) and target.dim() == 2:
        import torch.nn.functional as F

        h, w = info.size
        m = target[:h, :w].long().cpu()
        m = F.interpolate(m[None, None].float(), size=tuple(info.orig_size), mode="nearest")[0, 0].long()
        return SemanticSegmentation(mask=m, class_names=names).plot(image)
    return None


# ---------------------------------------------------------------------------------------------------- progress lines
def _scalar(v: Any) -> float | None:
    try:
        f = float(v.item() if isinstance(v, torch.Tensor) else v)
    except (TypeError, ValueError, RuntimeError):
        return None
    return f if math.isfinite(f) else None


class EpochSummary(pl.Callback):
    """One line per epoch with the main metrics (the task's ``progress_keys()``: training loss, validation losses
    and each head's main metric), sent to :func:`emit` (the run's log file; the console too when ``console``, i.e.
    with the progress bar off). A ``trainer.validate`` (final evaluation, evaluate.py) gets one line as well. Every
    scalar logged at an epoch end is kept in :attr:`history` (``{key: {epoch: value}}``) for the training curves.
    """

    def __init__(self, console: bool = True) -> None:
        self.console = bool(console)
        #: after a trainer.validate, also log the evaluation report's table (train() shows it itself)
        self.log_report = True
        self.history: dict[str, dict[int, float]] = {}
        self._t0 = time.perf_counter()
        self._validated = -1  # the last epoch that ran validation (other epochs show no stale val/ numbers)

    @staticmethod
    def _keys(trainer: pl.Trainer, pl_module: pl.LightningModule) -> list[str]:
        keys = list(pl_module.progress_keys()) if hasattr(pl_module, "progress_keys") else []
        return keys or sorted(k for k in trainer.callback_metrics if k.startswith(("train/", "val/")))

    @staticmethod
    def _value(metrics: Any, key: str) -> float | None:
        for k in (f"{key}_epoch", key):
            if k in metrics:
                return _scalar(metrics[k])
        return None

    def _line(self, trainer: pl.Trainer, pl_module: pl.LightningModule, val: bool = True) -> str:
        m = trainer.callback_metrics
        parts = []
        for k in self._keys(trainer, pl_module):
            if k.startswith("val/") and not val:
                continue
            v = self._value(m, k)
            if v is not None:
                parts.append(f"{k} {v:.4f}")
        return ", ".join(parts)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._t0 = time.perf_counter()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        epoch = int(trainer.current_epoch)
        validated = self._validated == epoch
        for k, v in trainer.callback_metrics.items():
            f = _scalar(v)
            if f is not None and not k.endswith("_step") and (validated or not k.startswith("val/")):
                self.history.setdefault(k[:-6] if k.endswith("_epoch") else k, {})[epoch] = f
        if not trainer.is_global_zero:
            return
        total = trainer.max_epochs if trainer.max_epochs and trainer.max_epochs > 0 else "?"
        line = self._line(trainer, pl_module, val=validated)
        emit(f"epoch {epoch + 1}/{total}: {line} ({time.perf_counter() - self._t0:.1f} s)", console=self.console)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if getattr(trainer.state.fn, "value", trainer.state.fn) != "validate":
            if not trainer.sanity_checking:
                self._validated = int(trainer.current_epoch)
            return
        if not trainer.is_global_zero:
            return
        emit(f"validation: {self._line(trainer, pl_module)}", console=False)
        report = getattr(pl_module, "last_eval_report", None) or {}
        if self.log_report and isinstance(report, dict) and report.get("table"):
            emit(str(report["table"]), console=False)


def _model_summary_base():
    from lightning.pytorch.callbacks import ModelSummary

    return ModelSummary


class ZooModelSummary(_model_summary_base()):
    """Lightning's ModelSummary (``max_depth`` levels of modules with their parameter counts) at the start of
    fitting, shown through :func:`emit`, so that it also lands in the run's log file."""

    def __init__(self, max_depth: int = 2) -> None:
        super().__init__(max_depth=max_depth)
        self.depth = int(max_depth)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.depth or not trainer.is_global_zero:
            return
        from lightning.pytorch.utilities.model_summary import summarize

        emit("model summary\n" + str(summarize(pl_module, max_depth=self.depth)), console=True)


class ValidationSchedule(pl.Callback):
    """``trainer.check_val_every_n_epoch=auto``: validate every epoch while a validation pass is cheap next to an
    epoch of training, and every ``n``-th epoch when it is not, so that short epochs (a few hundred images) do not
    spend a large share of the run validating.

    ``n`` is the smallest whole number of epochs whose training time is at least ``1 / budget`` times one
    validation pass (``budget`` 0.02: validation takes at most ~2% of the run), but never so many that more than
    ``max_minutes`` of training pass between validations; an epoch longer than that always validates (large data
    keeps one validation per epoch). The cost of a pass is first estimated from the sanity check before training
    (``trainer.num_sanity_val_steps`` batches, timed per batch and scaled to the whole validation set), then measured
    by every real pass; the training time is that of the epoch running (the decision for an epoch is made at its
    last batch, when Lightning asks whether to validate; streams without a length decide at the epoch start from
    the previous epoch). Without an estimate (no sanity check), the first epoch validates. The last epoch
    (``max_epochs``, or the one reaching ``max_steps``) always validates, so best.ckpt and the final metrics see the
    finished model, and that validation is a *final* one (it writes the evaluators' plots and sample grids,
    :func:`zoo.metrics.evaluators.is_final_validation`): when best.ckpt holds that same state, ``train()`` reports
    it instead of validating the same weights a second time.

    An epoch that does not validate, or whose validation did not improve best.ckpt, writes ``last.ckpt`` only when
    ``checkpoint_minutes`` passed since ``last.ckpt`` was last written (the checkpoint callback asks
    :meth:`writes_last`), so a crash loses at most about that much training and short runs skip the full writes of
    the state that no one reads; an improving validation's last.ckpt is a link to best.ckpt; the end of training
    always writes it; SIGINT / SIGTERM still save at once. Early stopping's ``patience`` counts
    validations, as always. Changes of ``n`` are logged.

    With several processes every decision is rank 0's, broadcast, so all ranks validate and checkpoint together.

    The schedule works by setting ``trainer.check_val_every_n_epoch`` (1 for an epoch that validates, ``epoch + 2``
    for one that does not), which is what Lightning's loop reads.
    """

    def __init__(self, budget: float = 0.02, max_minutes: float = 10.0, checkpoint_minutes: float = 1.0) -> None:
        if not 0 < float(budget) <= 1 or float(max_minutes) < 0 or float(checkpoint_minutes) < 0:
            raise ValueError(f"trainer.auto_val: budget must be in (0, 1], max_minutes and checkpoint_minutes >= 0, "
                             f"got budget={budget}, max_minutes={max_minutes}, checkpoint_minutes={checkpoint_minutes}")
        self.budget = float(budget)
        self.max_seconds = float(max_minutes) * 60.0
        self.checkpoint_seconds = float(checkpoint_minutes) * 60.0
        #: global step of the fit's final validation (the last epoch's), ``None`` before it ran
        self.final_step: int | None = None
        self.every = 1
        #: seconds of one validation pass: estimated from the sanity check, then measured; ``None`` before either
        self.pass_seconds: float | None = None
        self._since = 0  # epochs trained since the last validation
        self._epoch_t0 = 0.0
        self._train_s: float | None = None  # training time of the last finished epoch
        self._val_t0: float | None = None
        self._val_s = 0.0  # time of this epoch's validation
        self._validating_epoch: int | None = None
        self.validated_epochs: list[int] = []

    def _is_last_epoch(self, trainer: pl.Trainer) -> bool:
        e = int(trainer.current_epoch)
        if trainer.max_epochs is not None and trainer.max_epochs > 0 and e + 1 >= trainer.max_epochs:
            return True
        if trainer.max_steps is not None and trainer.max_steps > 0:
            per_epoch = trainer.num_training_batches
            acc = max(1, int(getattr(trainer, "accumulate_grad_batches", 1) or 1))
            if per_epoch != float("inf") and trainer.global_step + math.ceil(per_epoch / acc) >= trainer.max_steps:
                return True
        return False

    def _every(self, train_s: float | None) -> int:
        """``n`` for an epoch of ``train_s`` seconds of training (1 without both figures)."""
        if self.pass_seconds is None or not train_s or train_s <= 0:
            return 1
        n = max(1, math.ceil(self.pass_seconds / (self.budget * train_s)))
        return max(1, min(n, int(self.max_seconds // train_s))) if self.max_seconds > 0 else 1

    def _decide(self, trainer: pl.Trainer, pl_module: pl.LightningModule, train_s: float | None,
                final: bool = False) -> None:
        e = int(trainer.current_epoch)
        last = self._is_last_epoch(trainer)
        n = self._every(train_s)
        due = last or self.pass_seconds is None or self._since + 1 >= n
        if final:  # every rank validates the same epochs
            due, n = rank_zero_decides(trainer, (bool(due), int(n)))
        self._validating_epoch = e if due else None
        pl_module.final_fit_validation = bool(last)  # the evaluators write plots in that validation
        trainer.check_val_every_n_epoch = 1 if due else e + 2  # Lightning validates when (epoch + 1) % n == 0
        if final and n != self.every and trainer.is_global_zero:
            emit(f"validation: every {n} epoch{'s' if n > 1 else ''} from now on (a pass takes "
                 f"{self.pass_seconds:.2f} s, an epoch's training {train_s:.2f} s; trainer.check_val_every_n_epoch="
                 f"auto keeps validation near {self.budget:.0%} of the run, the last epoch validated; =1 validates "
                 "every epoch)", console=False)
        if final:
            self.every = n

    def validates(self, trainer: pl.Trainer) -> bool:
        """Whether the current epoch runs validation (as decided so far)."""
        return self._validating_epoch == int(trainer.current_epoch)

    def writes_last(self, trainer: pl.Trainer, seconds_since_write: float, *, best_written: bool = False) -> bool:
        """Whether ``last.ckpt`` is written now (at a validation end or an epoch end): best.ckpt was just written at
        this step (``best_written``: last.ckpt is then a link to that file), or ``checkpoint_minutes`` passed since
        the last write (on rank 0's clock, broadcast, so that every rank takes part in the same writes)."""
        late = seconds_since_write >= self.checkpoint_seconds
        return bool(rank_zero_decides(trainer, late)) or best_written

    # ------------------------------------------------------------------ hooks
    def on_sanity_check_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._sanity_t0 = time.perf_counter()

    def on_sanity_check_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        done = sum(int(b) for b in (trainer.num_sanity_val_batches or []))
        total = sum(float(b) for b in (trainer.num_val_batches or []))
        if done > 0 and 0 < total < float("inf"):
            self.pass_seconds = (time.perf_counter() - self._sanity_t0) / done * total

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # provisional (the last batch decides); final for streams without a length
        self._decide(trainer, pl_module, self._train_s, final=trainer.num_training_batches == float("inf"))
        self._epoch_t0 = time.perf_counter()
        self._val_s = 0.0

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        n = trainer.num_training_batches
        if n != float("inf") and batch_idx + 1 >= int(n):  # the last batch: decide with this epoch's own time
            self._decide(trainer, pl_module, time.perf_counter() - self._epoch_t0, final=True)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._val_t0 = time.perf_counter()

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or self._val_t0 is None:
            return
        self._val_s += time.perf_counter() - self._val_t0
        self._val_t0 = None
        self.pass_seconds = self._val_s
        if getattr(pl_module, "final_fit_validation", False):
            self.final_step = int(trainer.global_step)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        pl_module.final_fit_validation = False  # a later trainer.validate is final by itself

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._train_s = max(time.perf_counter() - self._epoch_t0 - self._val_s, 1e-6)
        if self._validating_epoch != int(trainer.current_epoch):
            self._since += 1
            return
        self._since = 0
        self.validated_epochs.append(int(trainer.current_epoch))


class ProcessWarnings(pl.Callback):
    """The zoo's logging and warning filters (:func:`zoo.training.quiet_lightning`) in every training process. A
    process that ``ddp_spawn`` starts is a fresh interpreter that inherits none of its parent's filters; this is the
    first callback, so its ``setup`` runs before the others load data (the first place those warnings come from)."""

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        from zoo.training import quiet_lightning

        quiet_lightning()


class AutoEpochs(pl.Callback):
    """``trainer.max_epochs=null`` (the default): a schedule sized in optimizer steps, not in epochs.

    A fixed number of epochs means very different training on different data: 10 epochs of COCO at batch 64 are
    ~18,000 optimizer steps, 10 epochs of 300 photos are 50, which leaves a randomly initialised network close to
    where it started. So the run lasts ``max(min_epochs, ceil(min_steps / steps_per_epoch))`` epochs, at most
    ``cap`` (large data: ``min_epochs``; a few hundred images: ``min_steps`` steps). The epoch count is fixed when
    fitting is set up, before the optimizer and its schedule are built (so warm-up and cosine decay span the chosen
    run), from the training batches of one process (the distributed sampler counted) and
    ``accumulate_grad_batches``; it is logged, and the same data gives the same count on resume. An epoch trimmed by
    ``limit_train_batches`` (or ``overfit_batches``) is a quick look at part of the data, so such a run gets
    ``min_epochs``: sizing it in steps would add epochs to make up for the very batches the limit removed (a smoke
    test with ``limit_train_batches=2`` would otherwise run ``cap`` epochs).
    """

    def __init__(self, *, min_epochs: int, min_steps: int, cap: int) -> None:
        if min_epochs < 1 or min_steps < 0 or cap < min_epochs:
            raise ValueError(f"trainer.auto_epochs: need min_epochs >= 1, min_steps >= 0 and cap >= min_epochs "
                             f"(got min_epochs={min_epochs}, min_steps={min_steps}, cap={cap})")
        self.min_epochs, self.min_steps, self.cap = int(min_epochs), int(min_steps), int(cap)
        #: the chosen number of epochs and the optimizer steps of one epoch (None until fitting is set up)
        self.epochs: int | None = None
        self.steps_per_epoch: int | None = None

    def choose(self, batches_per_epoch: float, accumulate: int = 1) -> int:
        """The number of epochs for ``batches_per_epoch`` training batches per epoch (``inf``: a stream of unknown
        length, which gets ``min_epochs``)."""
        if not math.isfinite(batches_per_epoch) or batches_per_epoch <= 0:
            self.steps_per_epoch = None
            return self.min_epochs
        self.steps_per_epoch = max(1, math.ceil(int(batches_per_epoch) / max(1, int(accumulate))))
        return min(self.cap, max(self.min_epochs, math.ceil(self.min_steps / self.steps_per_epoch)))

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit" or self.epochs is not None:
            return
        trainer.fit_loop.setup_data()  # what estimated_stepping_batches would load a moment later
        limit = trainer.limit_train_batches  # 1.0 unless limit_train_batches (or overfit_batches) trims an epoch
        limited = isinstance(limit, int) or float(limit) != 1.0
        if limited:  # a quick look at part of the data: more epochs would only make up for the batches left out
            self.epochs, self.steps_per_epoch = self.min_epochs, None
        else:
            self.epochs = self.choose(trainer.num_training_batches, trainer.accumulate_grad_batches)
        trainer.fit_loop.max_epochs = self.epochs
        if not trainer.is_global_zero:
            return
        per = (f"limit_train_batches={limit} trims each epoch, so the step floor does not apply" if limited else
               f"{self.steps_per_epoch} optimizer steps per epoch" if self.steps_per_epoch
               else "a stream of unknown length")
        emit(f"trainer.max_epochs=null: training for {self.epochs} epochs ({per}; trainer.auto_epochs: at least "
             f"{self.min_epochs} epochs and {self.min_steps} steps, at most {self.cap} epochs). Give "
             "trainer.max_epochs=N for a fixed number.")
