"""Plots of a run: training curves from its CSV log, confusion matrices, and per-class precision-recall and
F1-vs-score curves of a COCO evaluation.

Every function writes one PNG and returns its path. matplotlib is imported lazily and only through its
object-oriented API on the Agg canvas (no pyplot state, no display needed), so importing this module costs nothing
and it works on headless machines and in threads. Training-side only (matplotlib is in the ``train`` extra);
:func:`available` says whether it is installed.

``<run>/plots/`` after training::

    training_curves.png      losses (train and validation) and the main metrics, per epoch
    confusion_matrix.png     classification / semantic heads (rows: ground truth, columns: prediction)
    pr_curve.png             detection / instance heads: per-class precision-recall at IoU 0.5
    f1_curve.png             detection / instance heads: per-class F1 against the score threshold
"""

from __future__ import annotations

import csv
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "available", "read_csv_log", "plot_training_curves", "plot_confusion_matrix", "plot_pr_curves",
    "plot_f1_curves", "f1_from_coco", "best_f1", "png_to_array",
]

#: How many classes get their own line in the PR / F1 plots (the others are only in the mean).
MAX_CLASS_LINES = 20
#: Recall points of the COCO precision array.
RECALL_POINTS = np.linspace(0.0, 1.0, 101)


def available() -> bool:
    """Whether matplotlib can be imported."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _figure(width: float, height: float):
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError("plots need matplotlib: pip install matplotlib (it is in zoo's 'train' extra)") from None
    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, path: str | Path) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(p, format="png")
    return p


def png_to_array(path: str | Path) -> np.ndarray:
    """A written plot as an ``(H, W, 3)`` uint8 array (for image loggers)."""
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB")).copy()


# ---------------------------------------------------------------------------------------------------- training curves
def read_csv_log(path: str | Path) -> dict[str, dict[int, float]]:
    """Per-epoch values of every logged column of a Lightning CSV log (``<run>/csv/metrics.csv``).

    Columns logged per step (``*_step``) are averaged over the epoch; every other column keeps its last value in
    the epoch. ``*_epoch`` columns are renamed without the suffix (``train/loss_epoch`` -> ``train/loss``), and
    ``*_step`` columns are dropped when the epoch column exists.

    Returns:
        ``{column: {epoch: value}}``.
    """
    rows = list(csv.DictReader(open(path, newline="", encoding="utf-8")))
    out: dict[str, dict[int, float]] = {}
    steps: dict[str, dict[int, list[float]]] = {}
    for row in rows:
        try:
            epoch = int(float(row.get("epoch") or ""))
        except ValueError:
            continue
        for key, val in row.items():
            if key in ("epoch", "step") or val in (None, ""):
                continue
            try:
                v = float(val)
            except ValueError:
                continue
            if not math.isfinite(v):
                continue
            if key.endswith("_step"):
                steps.setdefault(key[: -len("_step")], {}).setdefault(epoch, []).append(v)
            else:
                out.setdefault(key[: -len("_epoch")] if key.endswith("_epoch") else key, {})[epoch] = v
    for key, per_epoch in steps.items():
        if key not in out:
            out[key] = {e: float(np.mean(v)) for e, v in per_epoch.items()}
    return out


def _is_loss(key: str) -> bool:
    return key.rsplit("/", 1)[-1].startswith("loss")


def plot_training_curves(history: Mapping[str, Mapping[int, float]] | str | Path, path: str | Path, *,
                         metrics: Sequence[str] | None = None, title: str | None = None) -> Path:
    """Losses (left) and metrics (right) per epoch.

    Args:
        history: ``{key: {epoch: value}}`` (see :func:`read_csv_log`) or the path of a CSV log.
        path: the PNG to write.
        metrics: the validation metrics to show (default: every ``val/`` key that is not a loss, at most 8, the
            given order first); learning rates and per-step columns are never shown.
        title: figure title.
    """
    if not isinstance(history, Mapping):
        history = read_csv_log(history)
    keys = [k for k in history if history[k] and not k.startswith("lr")]
    losses = [k for k in keys if _is_loss(k) and (k.startswith("train/") or k.startswith("val/"))
              and k.count("/") <= 2]
    # the combined train/loss and val/loss first, then each head's total, then the loss terms of one head
    losses.sort(key=lambda k: (k.count("/"), not k.startswith("train"), k))
    losses = losses[:8]
    if metrics is None:
        metrics = [k for k in keys if k.startswith("val/") and not _is_loss(k)][:8]
    else:
        metrics = [k for k in metrics if k in history and history[k]]
    fig = _figure(12, 4.2)
    panels = [("loss", losses), ("metrics", list(metrics))]
    for i, (name, ks) in enumerate(panels):
        ax = fig.add_subplot(1, 2, i + 1)
        for k in ks:
            ep = sorted(history[k])
            ax.plot([e + 1 for e in ep], [history[k][e] for e in ep], marker="o", markersize=3,
                    linestyle="--" if k.startswith("val/") and name == "loss" else "-", label=k)
        ax.set_xlabel("epoch")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_ylabel(name)
        ax.grid(True, alpha=0.3)
        if ks:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, f"no {name} logged", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(f"{title + ': ' if title else ''}{name}", fontsize=10)
    return _save(fig, path)


# ---------------------------------------------------------------------------------------------------- confusion matrix
def plot_confusion_matrix(cm: Any, names: Sequence[str], path: str | Path, *, normalize: bool = True,
                          title: str = "confusion matrix") -> Path:
    """A ``(K, K)`` confusion matrix (rows: ground truth, columns: prediction) as a heat map.

    Args:
        cm: counts, tensor / array / nested list.
        names: the K class names.
        path: the PNG to write.
        normalize: colour (and annotate) each row as fractions of its ground truth (recall per class); counts
            are annotated when not normalised.
    """
    m = np.asarray(cm.cpu().numpy() if hasattr(cm, "cpu") else cm, dtype=np.float64)
    k = m.shape[0]
    names = [str(n) for n in names] if len(names) == k else [str(i) for i in range(k)]
    shown = m / np.maximum(m.sum(1, keepdims=True), 1) if normalize else m
    side = min(16.0, max(4.5, 0.45 * k + 2.5))
    fig = _figure(side + 1.2, side)
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(shown, cmap="Blues", vmin=0, vmax=1 if normalize else max(1.0, float(shown.max())))
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    if k <= 50:
        ax.set_xticks(range(k), labels=names, rotation=90 if k > 6 else 45, ha="right" if k <= 6 else "center",
                      fontsize=8 if k <= 20 else 6)
        ax.set_yticks(range(k), labels=names, fontsize=8 if k <= 20 else 6)
    if k <= 20:
        for i in range(k):
            for j in range(k):
                v = shown[i, j]
                if v > 0:
                    text = f"{v:.2f}" if normalize else f"{int(v)}"
                    ax.text(j, i, text, ha="center", va="center", fontsize=7,
                            color="white" if v > 0.5 * (1 if normalize else shown.max()) else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("ground truth")
    ax.set_title(title + (" (row-normalised)" if normalize else ""), fontsize=10)
    return _save(fig, path)


# ---------------------------------------------------------------------------------------------------- detection curves
def _class_curves(precision: np.ndarray, names: Sequence[str], iou_index: int) -> list[tuple[str, np.ndarray]]:
    """``(name, precision at the 101 recall points)`` of every class with ground truth (area all, max dets)."""
    out = []
    for k, name in enumerate(names):
        p = precision[iou_index, :, k, 0, -1]
        if (p > -1).any():
            out.append((str(name), np.where(p > -1, p, 0.0)))
    return out


def plot_pr_curves(precision: np.ndarray, names: Sequence[str], path: str | Path, *, iou_index: int = 0,
                   iou: float = 0.5, title: str = "precision-recall") -> Path:
    """Per-class precision-recall curves from a COCO ``precision`` array ``[T, R, K, A, M]``
    (:class:`~zoo.metrics.coco_eval.CocoEvalResult`), at IoU threshold index ``iou_index`` (0: IoU 0.5), area
    "all", the largest max-detections; the legend gives each class's AP at that IoU and the bold line is the mean."""
    curves = _class_curves(np.asarray(precision), names, iou_index)
    fig = _figure(7.5, 6)
    ax = fig.add_subplot(1, 1, 1)
    for name, p in sorted(curves, key=lambda c: -c[1].mean())[:MAX_CLASS_LINES]:
        ax.plot(RECALL_POINTS, p, linewidth=1, label=f"{name} {p.mean():.3f}")
    if curves:
        mean = np.mean([p for _, p in curves], axis=0)
        ax.plot(RECALL_POINTS, mean, linewidth=3, color="black", label=f"all classes {mean.mean():.3f} AP{int(iou * 100)}")
        ax.legend(fontsize=7, loc="lower left")
    else:
        ax.text(0.5, 0.5, "no ground truth", ha="center", va="center", transform=ax.transAxes)
    return _finish_unit_axes(fig, ax, "recall", "precision", f"{title} (IoU {iou:.2f})", path)


def _finish_unit_axes(fig: Any, ax: Any, xlabel: str, ylabel: str, title: str, path: str | Path) -> Path:
    """Axes over [0, 1] x [0, 1] with labels, a light grid and a title; the figure saved to ``path``."""
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    ax.set_title(title, fontsize=10)
    return _save(fig, path)


def f1_from_coco(precision: np.ndarray, scores: np.ndarray, names: Sequence[str], *, iou_index: int = 0
                 ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per-class F1 against the score threshold from COCO's ``precision`` and ``scores`` arrays: at each of the
    101 recall points ``r`` the (interpolated) precision ``p`` is reached at detection score ``s``, so a threshold
    of ``s`` gives F1 ``2 p r / (p + r)``. Returns ``{name: (scores ascending, F1)}`` for classes with ground truth
    and at least one matched detection."""
    precision, scores = np.asarray(precision), np.asarray(scores)
    out = {}
    for k, name in enumerate(names):
        p = precision[iou_index, :, k, 0, -1]
        s = scores[iou_index, :, k, 0, -1]
        ok = (p > 0) & (s > 0)
        if not ok.any():
            continue
        r = RECALL_POINTS[ok]
        f1 = 2 * p[ok] * r / np.maximum(p[ok] + r, 1e-12)
        order = np.argsort(s[ok], kind="stable")
        out[str(name)] = (s[ok][order], f1[order])
    return out


def best_f1(precision: np.ndarray, scores: np.ndarray, names: Sequence[str], *, iou_index: int = 0
            ) -> dict[str, dict[str, float]]:
    """Each class's best F1 and the score threshold that reaches it (at IoU index ``iou_index``)."""
    out = {}
    for name, (s, f1) in f1_from_coco(precision, scores, names, iou_index=iou_index).items():
        i = int(np.argmax(f1))
        out[name] = {"f1": round(float(f1[i]), 4), "score": round(float(s[i]), 4)}
    return out


def plot_f1_curves(precision: np.ndarray, scores: np.ndarray, names: Sequence[str], path: str | Path, *,
                   iou_index: int = 0, iou: float = 0.5, title: str = "F1 against score threshold") -> Path:
    """Per-class F1-vs-score curves (:func:`f1_from_coco`); the bold line is the mean over classes on a common
    score grid, and the legend gives each class's best F1 and its threshold."""
    curves = f1_from_coco(precision, scores, names, iou_index=iou_index)
    fig = _figure(7.5, 6)
    ax = fig.add_subplot(1, 1, 1)
    ranked = sorted(curves.items(), key=lambda c: -float(c[1][1].max()))
    for name, (s, f1) in ranked[:MAX_CLASS_LINES]:
        i = int(np.argmax(f1))
        ax.plot(s, f1, linewidth=1, label=f"{name} {f1[i]:.2f} @ {s[i]:.2f}")
    if curves:
        grid = np.linspace(0, 1, 201)
        # above a class's highest matched score nothing is detected (F1 0); below its lowest, F1 stays there
        mean = np.mean([np.interp(grid, s, f1, left=f1[0], right=0.0) for s, f1 in curves.values()], axis=0)
        i = int(np.argmax(mean))
        ax.plot(grid, mean, linewidth=3, color="black", label=f"all classes {mean[i]:.2f} @ {grid[i]:.2f}")
        ax.legend(fontsize=7, loc="lower left")
    else:
        ax.text(0.5, 0.5, "no matched detections", ha="center", va="center", transform=ax.transAxes)
    return _finish_unit_axes(fig, ax, "score threshold", "F1", f"{title} (IoU {iou:.2f})", path)
