"""Every checkpoint the zoo ships loads by name in a fresh process that imports only the serving dependencies,
and predicts sensible typed results on a real image."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, SHARED_DATA
from zoo.hub.registry import get_entry, list_models

SHIPPED = list_models()

SCRIPT = r"""
import json, sys
import zoo
name, image = sys.argv[1], sys.argv[2]
model = zoo.load(name)
result = zoo.Predictor(model)([image])[0]
heavy = sorted(m for m in ("lightning", "hydra", "omegaconf", "albumentations", "pycocotools", "torchmetrics")
               if m in sys.modules)
print(json.dumps({"type": type(result).__name__, "result": result.to_dict(), "heavy": heavy,
                  "task": model.spec.task}))
"""


def test_registry_lists_a_checkpoint_per_task() -> None:
    tasks = {get_entry(n).task for n in SHIPPED}
    assert {"classification", "detection", "semantic", "similarity"} <= tasks, SHIPPED


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_checkpoint_predicts_in_a_lean_process(name: str, tmp_path: Path) -> None:
    images = sorted((SHARED_DATA / "coco128" / "train2017").glob("*.jpg"))
    if not images:
        pytest.skip("../shared/data/coco128 not present")
    proc = subprocess.run([sys.executable, "-c", SCRIPT, name, str(images[0])], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path, env={"PATH": "", "ZOO_OFFLINE": "1", "HOME": str(tmp_path),
                                                          "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["heavy"] == []
    entry = get_entry(name)
    expected = {"classification": "Classification", "detection": "Detections", "semantic": "SemanticSegmentation",
                "similarity": "Embedding", "instance": "InstanceSegmentation"}[entry.task]
    assert out["type"] == expected
    r = out["result"]
    from PIL import Image

    w, h = Image.open(images[0]).size
    if entry.task == "classification":
        assert abs(sum(r["probs"]) - 1.0) < 1e-3 and len(r["probs"]) == 6 and isinstance(r["labels"][0], str)
    elif entry.task == "similarity":
        assert abs(sum(v * v for v in r["vector"]) - 1.0) < 1e-3
    elif entry.task == "semantic":
        assert r["size"] == [h, w]  # the mask is at the original resolution
    elif entry.task in ("detection", "instance"):
        assert all(0 <= b[0] <= b[2] <= w + 1e-3 and 0 <= b[1] <= b[3] <= h + 1e-3 for b in r["boxes"])
        assert set(r["category_ids"] or []) <= {1, 3, 4, 7, 9, 12}
