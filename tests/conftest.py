"""Shared fixtures: small CPU settings, an isolated cache, Hydra composition helpers, and the real COCO subsets
from ../shared/data (tests using them skip when the folder is absent)."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402

import zoo.config  # noqa: E402,F401  (registers the config schemas)

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
SHARED_DATA = ROOT.parent / "shared" / "data"

torch.set_num_threads(min(2, os.cpu_count() or 1))
THREADS = torch.get_num_threads()


@pytest.fixture(autouse=True)
def _torch_threads():
    """Every test starts with the suite's torch threads: a test that changes the process's thread count (a CLI's
    threads= option, an OpenMP setting) must not make every later test run on fewer cores."""
    yield
    if torch.get_num_threads() != THREADS:
        torch.set_num_threads(THREADS)


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Caches (embedded dataset, hub downloads) go to a per-session folder unless ZOO_TEST_CACHE is set."""
    cache = Path(os.environ.get("ZOO_TEST_CACHE") or tmp_path_factory.mktemp("zoo_cache"))
    os.environ["ZOO_CACHE"] = str(cache)
    os.environ["ZOO_HOME"] = str(cache / "hub")
    return cache


def shared_data(name: str) -> Path:
    """Path of a real COCO subset, skipping the test when ../shared/data is absent."""
    p = SHARED_DATA / name
    if not (p / "annotations").is_dir():
        pytest.skip(f"{p} not present (real COCO subsets live in ../shared/data beside the repository)")
    return p


@pytest.fixture
def coco128() -> Path:
    return shared_data("coco128")


@pytest.fixture
def tiny_coco() -> Path:
    return shared_data("tiny_coco")


#: Small embedded-dataset settings shared by the fast tests (generated once per session into the cache).
SMALL_SHAPES = ["data.shapes.num_train=96", "data.shapes.num_val=32", "data.shapes.image_size=96"]
FAST = ["trainer.enable_progress_bar=false", "data.num_workers=0", "data.persistent_workers=false",
        "logger.names=[csv]", "callbacks.lr_monitor=false"]


def overfit(root: Path, epochs: int, warmup: int) -> list[str]:
    """Overrides shared by the overfit checks: train and validate on the same first 4 images of a real COCO subset,
    one batch per step, no augmentation or weight decay, validation once at the end, no bundle."""
    return ["data=coco", f"data.root={root}", "data.val_split=train2017", *FAST, "data.limit_train_images=4",
            "data.limit_val_images=4", "data.batch_size=4", "data.augment=[]", f"trainer.max_epochs={epochs}",
            f"trainer.check_val_every_n_epoch={epochs}", "optimizer.weight_decay=0", f"scheduler.warmup_epochs={warmup}",
            "export_bundle=false"]


def compose(config_name: str = "train", overrides: list[str] | None = None, output_dir: Path | None = None):
    """Compose ``conf/<config_name>.yaml`` with overrides, as the command line would."""
    from hydra import compose as hcompose
    from hydra import initialize_config_dir

    ov = list(overrides or [])
    if output_dir is not None:
        ov.append(f"paths.output_dir={output_dir}")
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return hcompose(config_name=config_name, overrides=ov)
