"""Train the small checkpoints the zoo ships for each task on the embedded dataset, copy their bundles into
``zoo/hub/weights/<name>/`` and record them (URL ``pkg:``, sha256s, metrics, the reproducing command) in
``zoo/hub/registry.json``.

    python scripts/ship_checkpoints.py                 # all
    python scripts/ship_checkpoints.py test_resnet.shapes_cls
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import zoo.config  # noqa: E402,F401

#: name -> (task, description, train.py overrides). Tiny backbones so that the files stay small (< 1 MB).
RECIPES: dict[str, tuple[str, str, list[str]]] = {
    "test_resnet.shapes_cls": ("classification", "largest-shape classifier on the embedded dataset (6 classes, 64 px)",
                               ["experiment=shapes_cls"]),
    "test_resnet.shapes_det": ("detection", "FCOS shape detector on the embedded dataset (128 px)",
                               ["experiment=shapes_det", "backbone=test_resnet", "trainer.max_epochs=6"]),
    "test_resnet.shapes_sem": ("semantic", "Semantic-FPN shape segmenter on the embedded dataset (128 px)",
                               ["experiment=shapes_sem", "backbone=test_resnet", "trainer.max_epochs=5"]),
    "test_resnet.shapes_sim": ("similarity", "colour x shape crop embeddings (64-d) on the embedded dataset",
                               ["experiment=shapes_sim", "backbone=test_resnet", "model.embedding_dim=64",
                                "model.input_size=[48,48]", "trainer.max_epochs=4"]),
}
COMMON = ["trainer.enable_progress_bar=false", "logger.names=[csv]"]


def ship(name: str) -> dict:
    from hydra import compose, initialize_config_dir

    from zoo.hub.registry import entry_from_bundle
    from zoo.training import train

    task, description, overrides = RECIPES[name]
    with tempfile.TemporaryDirectory() as tmp:
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
            cfg = compose("train", [*overrides, *COMMON, f"paths.output_dir={tmp}"])
        result = train(cfg)
        dest = ROOT / "zoo" / "hub" / "weights" / name
        if dest.exists():
            shutil.rmtree(dest)
        dest.mkdir(parents=True)
        for f in ("model.json", "model.safetensors"):
            shutil.copy2(Path(result["bundle"]) / f, dest / f)
    recipe = "python train.py " + " ".join(overrides) + "   # then: python scripts/ship_checkpoints.py " + name
    entry = entry_from_bundle(name, task, f"pkg:hub/weights/{name}", dest, description=description,
                              metrics=result["metrics"], recipe=recipe)
    return entry.to_dict()


def main(names: list[str]) -> None:
    reg_file = ROOT / "zoo" / "hub" / "registry.json"
    registry = json.loads(reg_file.read_text())
    entries = {e["name"]: e for e in registry.get("models", [])}
    for name in names or list(RECIPES):
        entries[name] = ship(name)
        registry["models"] = [entries[k] for k in sorted(entries)]
        reg_file.write_text(json.dumps(registry, indent=2, sort_keys=True) + "\n")
        print(f"shipped {name}: {entries[name]['metrics']}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
