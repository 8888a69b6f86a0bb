"""End-to-end classification: fast_dev_run of every experiment, a learning run on the embedded dataset, evaluate
reproducing train's metric from the checkpoint alone, resume from last.ckpt, and a 2-process CPU DDP run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.conftest import CONF, FAST, SHARED_DATA, SMALL_SHAPES, compose
from zoo.evaluation import evaluate
from zoo.training import train

#: The learning run: the default experiment, shortened (600 steps of 32 images at 64 px).
RUN = ["data.shapes.num_train=1600", "data.shapes.num_val=400", "trainer.max_epochs=12"]
#: Every experiment but the latent text-to-image one, which needs the autoencoder another experiment trains first:
#: tests/test_generation.py::test_shapes_vae_then_latent_t2i_experiments_train_and_load runs that pair.
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml") if p.stem != "shapes_t2i_latent")


def _needs_coco(name: str) -> bool:
    text = (CONF / "experiment" / f"{name}.yaml").read_text()
    return "override /data: coco" in text


def identity_folders(root: Path) -> Path:
    """A tiny ``<root>/<split>/<identity>/<images>`` tree (solid colours with noise)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, ids in (("train", "abcd"), ("val", "efg")):
        for ident in ids:
            colour = rng.integers(0, 255, 3)
            d = root / split / ident
            d.mkdir(parents=True, exist_ok=True)
            for k in range(4):
                Image.fromarray(np.clip(colour + rng.normal(0, 20, (32, 32, 3)), 0, 255).astype(np.uint8)).save(
                    d / f"{k}.png")
    return root


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_fast_dev_run_of_every_experiment(name: str, tmp_path: Path) -> None:
    ov = [f"experiment={name}", "trainer.fast_dev_run=true", "data.batch_size=4", *FAST,
          "backbone.name=resnet10t", "model.input_size=[64,64]"]
    if _needs_coco(name):
        if not (SHARED_DATA / "coco128").is_dir():
            pytest.skip("../shared/data/coco128 not present")
        ov += [f"data.root={SHARED_DATA / 'coco128'}", "data.limit_train_images=8", "data.limit_val_images=8"]
    else:
        ov += SMALL_SHAPES
    if "kind: identity_folder" in (CONF / "experiment" / f"{name}.yaml").read_text():
        ov += [f"model.heads.1.data.root={identity_folders(tmp_path / 'ids')}", "model.heads.1.data.batch_size=4"]
    result = train(compose("train", ov, output_dir=tmp_path))
    assert Path(result["output_dir"]) == tmp_path
    assert (tmp_path / "config.yaml").is_file()


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> dict:
    """A short real training run on the embedded dataset (shared by the tests below)."""
    out = tmp_path_factory.mktemp("cls_run")
    cfg = compose("train", ["experiment=shapes_cls", *FAST, *RUN], output_dir=out)
    return train(cfg)


def test_learns_well_above_chance(trained_run: dict) -> None:
    top1 = trained_run["metrics"]["val/top1"]
    chance = 1 / 6
    assert top1 > 3 * chance, f"top-1 {top1:.3f} is not well above chance {chance:.3f}"


def test_run_folder_holds_config_checkpoints_metrics(trained_run: dict) -> None:
    out = Path(trained_run["output_dir"])
    assert (out / "config.yaml").is_file()
    assert (out / "checkpoints" / "best.ckpt").is_file() and (out / "checkpoints" / "last.ckpt").is_file()
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["metrics"]["val/top1"] == pytest.approx(trained_run["metrics"]["val/top1"])


def test_checkpoint_loads_with_weights_only(trained_run: dict) -> None:
    ckpt = torch.load(trained_run["best_ckpt"], map_location="cpu", weights_only=True)
    assert ckpt["hyper_parameters"]["spec"]["backbone"]["name"] == "test_resnet"


def test_evaluate_reproduces_train_metric(trained_run: dict, tmp_path: Path) -> None:
    # A different backbone in the current config must not matter: the model rebuilds from the checkpoint.
    cfg = compose("evaluate", [f"ckpt_path={trained_run['best_ckpt']}", *RUN[:2], "data.num_workers=0",
                               "data.persistent_workers=false", "trainer.enable_progress_bar=false"],
                  output_dir=tmp_path)
    res = evaluate(cfg)
    assert res["metrics"]["val/top1"] == pytest.approx(trained_run["metrics"]["val/top1"], abs=1e-6)
    assert json.loads((tmp_path / "metrics.json").read_text())["metrics"]["val/top1"] == pytest.approx(
        res["metrics"]["val/top1"])


def test_resume_from_last_checkpoint(trained_run: dict, tmp_path: Path) -> None:
    last = torch.load(trained_run["last_ckpt"], map_location="cpu", weights_only=True)
    cfg = compose("train", ["experiment=shapes_cls", *FAST, *RUN[:2], "trainer.max_epochs=13",
                            f"ckpt_path={trained_run['last_ckpt']}", "run_eval=false",
                            "export_bundle=false"], output_dir=tmp_path)
    res = train(cfg)
    resumed = torch.load(res["last_ckpt"], map_location="cpu", weights_only=True)
    assert resumed["epoch"] == last["epoch"] + 1
    assert resumed["global_step"] > last["global_step"]


def test_missing_resume_checkpoint_is_clear(tmp_path: Path) -> None:
    cfg = compose("train", ["experiment=shapes_cls", *FAST, *SMALL_SHAPES, f"ckpt_path={tmp_path}/nope.ckpt"],
                  output_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="nope.ckpt"):
        train(cfg)


def test_two_process_ddp_on_cpu(tmp_path: Path) -> None:
    cfg = compose("train", ["experiment=shapes_cls", "trainer=ddp_cpu", *FAST, *SMALL_SHAPES,
                            "model.input_size=[64,64]", "trainer.max_epochs=1", "data.batch_size=8",
                            "trainer.limit_train_batches=3", "trainer.limit_val_batches=2", "export_bundle=false"],
                  output_dir=tmp_path)
    res = train(cfg)
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
    assert "val/top1" in res["metrics"]


def test_image_folder_classification_with_ema(tmp_path: Path) -> None:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c, colour in (("red", (220, 30, 30)), ("blue", (30, 30, 220))):
            d = tmp_path / "folders" / split / c
            d.mkdir(parents=True)
            for i in range(6):
                img = np.clip(rng.normal(0, 20, (40, 40, 3)) + colour, 0, 255).astype(np.uint8)
                Image.fromarray(img).save(d / f"{i}.png")
    cfg = compose("train", ["data=image_folder", f"data.root={tmp_path / 'folders'}", *FAST, "backbone=test_resnet",
                            "model.input_size=[32,32]", "data.batch_size=4", "data.augment=[]", "trainer.max_epochs=2",
                            "model.ema.enabled=true", "model.ema.decay=0.5", "export_bundle=false"],
                  output_dir=tmp_path / "run")
    res = train(cfg)
    ckpt = torch.load(res["best_ckpt"], map_location="cpu", weights_only=True)
    assert any(k.startswith("ema.") for k in ckpt["state_dict"])
    assert ckpt["hyper_parameters"]["spec"]["class_names"]["cls"] == ["blue", "red"]
    assert 0.0 <= res["metrics"]["val/top1"] <= 1.0


def test_multirun_sweep_from_the_command_line(tmp_path: Path) -> None:
    import subprocess
    import sys

    from tests.conftest import ROOT

    cmd = [sys.executable, str(ROOT / "train.py"), "-m", "experiment=shapes_cls", "backbone.name=test_resnet,resnet10t",
           "optimizer.lr=1e-3", "trainer.fast_dev_run=true", "data.batch_size=4", *SMALL_SHAPES, *FAST,
           f"hydra.sweep.dir={tmp_path}"]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = sorted(p for p in tmp_path.iterdir() if p.is_dir() and p.name.isdigit())
    assert len(runs) == 2 and all((r / "config.yaml").is_file() for r in runs)
    assert "resnet10t" in (runs[1] / "config.yaml").read_text()


def test_wrong_key_on_the_command_line_names_it(tmp_path: Path) -> None:
    import subprocess
    import sys

    from tests.conftest import ROOT

    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), "optimizer.lrr=0.1", f"hydra.run.dir={tmp_path}"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "lrr" in proc.stderr
