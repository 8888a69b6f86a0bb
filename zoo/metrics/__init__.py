"""Evaluation metrics. ``zoo.metrics.coco_eval``: COCO box/mask AP with faster-coco-eval or pycocotools (both
imported lazily, only when an evaluation runs)."""

from zoo.metrics.coco_eval import (
    STAT_NAMES,
    CocoEvalResult,
    evaluate_coco,
    json_safe_results,
    load_coco_gt,
    results_to_json,
)

__all__ = [
    "STAT_NAMES",
    "CocoEvalResult",
    "evaluate_coco",
    "json_safe_results",
    "load_coco_gt",
    "results_to_json",
]
