"""Predict with a zoo model: ``python predict.py ckpt=<model> source=<images> [key=value ...]`` (Hydra).

Examples::

    python predict.py ckpt=outputs/shapes_det/<date>/bundle source=photos/
    python predict.py ckpt=outputs/shapes_multi/<date>/checkpoints/best.ckpt source='shots/*.jpg' device=auto
    python predict.py ckpt=resnet10t.shapes_cls source=clip.mp4 video_stride=5

Writes annotated pictures and a json per head into the run folder (outputs/predict/<date>/); see zoo.prediction.
"""

import os

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import hydra  # noqa: E402

import zoo.config  # noqa: E402,F401  (registers the typed config schemas with Hydra)
from omegaconf import DictConfig  # noqa: E402


@hydra.main(version_base="1.3", config_path="conf", config_name="predict")
def main(cfg: DictConfig) -> None:
    from zoo.prediction import predict

    predict(cfg)


if __name__ == "__main__":
    main()
