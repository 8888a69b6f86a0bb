"""Similarity end to end: open-set learning on the embedded dataset, evaluate.py from the checkpoint, and the
embed/search round trip through the serving bundle."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.conftest import FAST, compose
from zoo.evaluation import evaluate, load_task_from_checkpoint
from zoo.training import train

DATA = ["data.shapes.num_train=400", "data.shapes.num_val=200", "data.shapes.image_size=96"]


@pytest.fixture(scope="module")
def sim_run(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("sim_run")
    # validation every epoch, best of the 4 kept: with 200 held-out crops against 400 training ones the auto schedule
    # validates only the last epoch, whose R@1 was 0.60 against 0.44 untrained in one run
    cfg = compose("train", ["experiment=shapes_sim", *FAST, *DATA, "model.input_size=[48,48]", "trainer.max_epochs=4",
                            "trainer.check_val_every_n_epoch=1", "data.batch_size=48", "model.embedding_dim=64"],
                  output_dir=out)
    return train(cfg)


def _untrained_recall(run: dict, tmp_path: Path) -> float:
    """R@1 of the same architecture with fresh random weights, on the same held-out crops."""
    from zoo.tasks.multitask import MultiTask

    trained = load_task_from_checkpoint(run["best_ckpt"])
    fresh = MultiTask(**{k: trained.hparams[k] for k in ("spec", "optimizer", "scheduler", "options", "data_info")},
                     init_weights=False)
    ckpt = tmp_path / "untrained.ckpt"
    torch.save({"state_dict": fresh.state_dict(), "hyper_parameters": dict(fresh.hparams)}, ckpt)
    cfg = compose("evaluate", [f"ckpt_path={ckpt}", *DATA, "data.num_workers=0", "data.persistent_workers=false",
                               "trainer.enable_progress_bar=false", "+data.extra.identity=identity",
                               "+data.extra.context=0.15", "+data.extra.min_size=10"], output_dir=tmp_path / "ev0")
    return evaluate(cfg)["metrics"]["val/R@1"]


def test_recall_on_held_out_identities_far_above_untrained(sim_run: dict, tmp_path: Path) -> None:
    trained = sim_run["metrics"]["val/R@1"]
    untrained = _untrained_recall(sim_run, tmp_path)
    print(f"held-out R@1: untrained {untrained:.3f} -> trained {trained:.3f}")
    assert trained > untrained + 0.2, (untrained, trained)
    assert sim_run["metrics"]["val/mAP@R"] > 0


def test_train_and_test_identities_are_disjoint(sim_run: dict) -> None:
    spec = load_task_from_checkpoint(sim_run["best_ckpt"]).spec
    train_ids, test_ids = spec.extra["train_identities"], spec.extra["test_identities"]
    assert train_ids and test_ids and not set(train_ids) & set(test_ids)


def test_embed_and_search_round_trip(sim_run: dict, tmp_path: Path) -> None:
    from zoo.data.shapes import ensure_shapes_dataset
    from zoo.similarity_cli import embed_main, search_main
    from zoo.similarity_index import EmbeddingIndex

    bundle = sim_run["bundle"]
    if bundle is None:
        pytest.skip("bundle export not available")
    root = ensure_shapes_dataset(None, num_train=400, num_val=200, image_size=96)
    images = sorted((root / "val").glob("*.jpg"))[:12]
    folder = tmp_path / "photos"
    folder.mkdir()
    for p in images:
        (folder / p.name).write_bytes(p.read_bytes())
    out = tmp_path / "emb.npz"
    assert embed_main(["--model", str(bundle), "--images", str(folder), "--out", str(out), "--no-progress"]) == 0
    index = EmbeddingIndex.load(out)
    assert len(index) == 12 and index.dim == 64
    # A gallery image searched against the gallery finds itself first with similarity ~1.
    from zoo.similarity_cli import search_images

    hits = search_images(str(bundle), index, [str(folder / images[3].name)], k=3)
    assert hits[0][0][0].endswith(images[3].name) and hits[0][0][1] == pytest.approx(1.0, abs=1e-4)
    assert search_main(["--model", str(bundle), "--index", str(out), "--query", str(folder / images[0].name),
                        "--k", "2"]) == 0


def test_identity_folders_train_and_evaluate_open_set(tmp_path: Path) -> None:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    colours = {"a": (200, 40, 40), "b": (40, 200, 40), "c": (40, 40, 200), "d": (200, 200, 40), "e": (40, 200, 200)}
    for split, ids in (("train", ["a", "b", "c"]), ("val", ["d", "e"])):
        for ident in ids:
            d = tmp_path / "ids" / split / ident
            d.mkdir(parents=True)
            for i in range(4):
                img = np.clip(rng.normal(0, 25, (32, 32, 3)) + colours[ident], 0, 255).astype(np.uint8)
                Image.fromarray(img).save(d / f"{i}.png")
    cfg = compose("train", ["model=similarity", "data=identity_folder", f"data.root={tmp_path / 'ids'}", *FAST,
                            "backbone=test_resnet", "model.input_size=[32,32]", "data.batch_size=6",
                            "model.embedding_dim=16", "trainer.max_epochs=1", "++model.extra.m_per_class=2",
                            "export_bundle=false"], output_dir=tmp_path / "run")
    res = train(cfg)
    spec = load_task_from_checkpoint(res["best_ckpt"]).spec
    assert spec.extra["train_identities"] == ["a", "b", "c"] and spec.extra["test_identities"] == ["d", "e"]
    assert 0.0 <= res["metrics"]["val/R@1"] <= 1.0
