"""Every config group composes and validates; wrong keys, types and values fail with a message naming them."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import CONF, compose
from zoo.config import ConfigError, EvalConfig, TrainConfig, validate

GROUPS = ["data", "model", "backbone", "optimizer", "scheduler", "trainer", "callbacks", "logger", "experiment"]
NEEDS_ROOT = {"coco", "image_folder", "mask_folder", "coco_crops", "identity_folder"}


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in _options(g)])
def test_every_group_option_composes_and_validates(group: str, option: str, tmp_path: Path) -> None:
    overrides = [f"{group}={option}"]
    if option in NEEDS_ROOT or group == "experiment":
        overrides.append("data.root=/some/where")
    cfg = compose("train", overrides, output_dir=tmp_path)
    validated = validate(cfg, TrainConfig)
    assert validated.paths.output_dir == str(tmp_path)


def test_every_experiment_exists_for_each_task() -> None:
    assert "shapes_cls" in _options("experiment")


def test_evaluate_config_validates(tmp_path: Path) -> None:
    validate(compose("evaluate", ["ckpt_path=x.ckpt"], output_dir=tmp_path), EvalConfig)


@pytest.mark.parametrize("override,needle", [
    ("optimizer.lrr=0.1", "lrr"),
    ("trainer.max_epoch=3", "max_epoch"),
    ("trainer.max_epochs=three", "max_epochs"),
    ("data.batch_size=1.5", "batch_size"),
    ("backbone.pretrained=maybe", "pretrained"),
])
def test_wrong_key_or_type_fails_at_composition(override: str, needle: str, tmp_path: Path) -> None:
    """The schemas are part of the defaults list: Hydra itself refuses the override, naming the key."""
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException) as info:
        compose("train", [override], output_dir=tmp_path)
    assert needle in str(info.value) + str(info.value.__cause__)


@pytest.mark.parametrize("override,needle", [
    ("optimizer.name=adamx", "optimizer.name"),
    ("model.resize=squash", "model.resize"),
    ("data.on_bad_annotation=ignore", "data.on_bad_annotation"),
])
def test_wrong_config_fails_naming_the_key(override: str, needle: str, tmp_path: Path) -> None:
    cfg = compose("train", [override], output_dir=tmp_path)
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        validate(cfg, TrainConfig)


def test_misspelled_key_in_a_plain_config_lists_valid_keys() -> None:
    """Configs built outside Hydra (e.g. from Python) are checked by validate() with the same schema."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.create({"optimizer": {"lrr": 0.1}})
    with pytest.raises(ConfigError, match="Valid keys there: .*lr"):
        validate(cfg, TrainConfig)


def test_wrong_type_in_a_plain_config_names_the_key() -> None:
    from omegaconf import OmegaConf

    with pytest.raises(ConfigError, match=r"trainer\.max_epochs"):
        validate(OmegaConf.create({"trainer": {"max_epochs": "three"}}), TrainConfig)
