"""Train a zoo model: ``python train.py [group=option ...] [key=value ...]`` (Hydra; ``-m`` for sweeps).

Examples::

    python train.py experiment=shapes_cls
    python train.py model=classification data=coco data.root=../shared/data/coco128
    python train.py -m backbone.name=resnet18,efficientnet_b0 optimizer.lr=1e-3,3e-4
"""

import os

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import hydra  # noqa: E402

import zoo.config  # noqa: E402,F401  (registers the typed config schemas with Hydra)
from omegaconf import DictConfig  # noqa: E402


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    from zoo.training import train

    result = train(cfg)
    metrics = result.get("metrics") or {}
    # The returned value lets Hydra sweepers optimise the main metric.
    return next(iter(v for k, v in metrics.items() if k != "val/loss"), metrics.get("val/loss"))


if __name__ == "__main__":
    main()
