"""Evaluate a checkpoint or a COCO results file.

    python evaluate.py ckpt_path=<run>/checkpoints/best.ckpt data=coco data.root=../shared/data/tiny_coco
    python evaluate.py results=detections.json data=coco data.root=../shared/data/tiny_coco
"""

import os

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import hydra  # noqa: E402

import zoo.config  # noqa: E402,F401  (registers the typed config schemas with Hydra)
from omegaconf import DictConfig  # noqa: E402


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    from zoo.evaluation import evaluate

    evaluate(cfg)


if __name__ == "__main__":
    main()
