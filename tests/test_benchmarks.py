"""The README's benchmark commands run at a tiny size (so they cannot go stale); their figures are not checked."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT, SHARED_DATA


def _module(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    return mod


@pytest.mark.slow
def test_speed_benchmark_runs_the_zoo_path_and_the_plain_loop(tmp_path: Path) -> None:
    res = _module("speed").main(["--task", "cls", "--epochs", "1", "--size", "32", "--batch", "16", "--repeats", "1",
                                 "--sides", "zoo,plain,plain_fused,memory,zoo_device_decode", "--latency-repeats", "3",
                                 "--work", str(tmp_path / "w"),
                                 "--out", str(tmp_path / "speed")])
    cls = res["tasks"]["cls"]
    zoo, plain = cls["zoo"][0], cls["plain"][0]
    assert zoo["images"] == plain["images"] == cls["memory"][0]["images"] > 0  # the same training images everywhere
    assert cls["zoo_device_decode"][0]["images"] == cls["plain_fused"][0]["images"] == zoo["images"]
    assert set(zoo["split"]) == {"setup", "steps", "data", "val", "epoch_end", "finish"}
    assert abs(sum(zoo["split"].values()) - zoo["wall_s"]) < 0.05 * zoo["wall_s"] + 1.0
    assert cls["serving"]["predictor_b1"]["p50_ms"] > 0 and "p99_ms" in cls["serving"]["onnx_b1"]
    text = (tmp_path / "speed.md").read_text()
    assert "| cls | zoo |" in text and "| cls | memory |" in text and json.loads((tmp_path / "speed.json").read_text())["device"] == "cpu"
    peak = res["matmul_peak"]["tflops"]
    assert peak > 0 and "Model FLOPs utilisation" in text and "| cls |" in text.split("Model FLOPs utilisation")[1]
    # MFU is the steps' FLOP rate over the measured peak: below 1 and consistent with the figures it comes from
    m = _module("speed").mfu(zoo["step_img_s"], cls["serving"]["gflops"], peak)
    assert 0 < m < 1 and m == pytest.approx(zoo["step_img_s"] * 6e9 * cls["serving"]["gflops"] / (peak * 1e12))


@pytest.mark.slow
@pytest.mark.parametrize("task,size,floor", [
    ("cls", 32, "A constant prediction (the most frequent class everywhere) scores 0.500"),
    ("shapes", 32, "A constant prediction (the most frequent class everywhere) scores 0.2"),
    ("sim_shapes", 32, "A random ranking scores 0.0"), ("det", 64, "Predicting no boxes scores 0.000")])
def test_recipes_benchmark_compares_against_the_plain_loop(tmp_path: Path, task: str, size: int, floor: str) -> None:
    """Balanced real crops (constant 0.5), the embedded dataset as an image folder (six shapes, the largest class
    about a fifth of the validation images), retrieval of unseen colour-shape pairs, and boxes of the embedded
    dataset (with the plain loop's warm-up side too)."""
    if task == "cls" and not (SHARED_DATA / "coco128" / "annotations").is_dir():
        pytest.skip("../shared/data not present")
    warmup = ["--plain-warmup"] if task == "det" else []
    rows = _module("recipes").main(["--task", task, "--seeds", "0", "--epochs", "1", "--size", str(size),
                                    "--work", str(tmp_path / "w"), "--out", str(tmp_path / "recipes"),
                                    "--variant", "none=recipe=none", *warmup])
    assert set(rows) == {"plain", "zoo default", "none", *(["plain + warm-up"] if warmup else [])}
    assert all(0.0 <= r["metric"] <= 1.0 for rs in rows.values() for r in rs)
    text = (tmp_path / "recipes.md").read_text()
    assert "| plain |" in text and floor in text
    assert ("before training (random weights) scores" in text) == task.startswith("sim")
    assert ("| plain + warm-up |" in text) == bool(warmup)


def test_recipes_plain_warmup_ramps_then_follows_the_cosine() -> None:
    mod = _module("recipes")
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    f = mod._cosine(opt, 100, 10).lr_lambdas[0]
    assert f(0) == pytest.approx(0.01) and f(5) < f(9) < f(10)
    assert f(10) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.1))) and f(100) == pytest.approx(0.0)
    assert mod._cosine(opt, 100).lr_lambdas[0](0) == pytest.approx(1.0)  # no warm-up: the plain loop's own


def test_recipes_detection_results_map_back_to_the_images_and_categories(tmp_path: Path) -> None:
    """The plain detection loop's results: ground-truth boxes at the input size (128 px renderings stretched to
    64), put through ``coco_results``, score AP 1 against the original annotations: boxes are stretched back to
    each image's size and contiguous labels go back to the dataset's category ids (the shapes' ids have gaps)."""
    mod = _module("recipes")
    root = mod.shapes_coco(tmp_path, 6, 6)
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from speed import _Ds

    ds = _Ds(root, "val", root / "annotations" / "instances_val.json", 64, "det", False)
    dets = [{"boxes": t["boxes"], "scores": torch.ones(len(t["labels"])), "labels": t["labels"]}
            for t in (ds[i][1] for i in range(len(ds)))]
    assert sum(len(d["labels"]) for d in dets) > 0
    from zoo.metrics.coco_eval import evaluate_coco

    results = mod.coco_results(ds, dets, 64)
    res = evaluate_coco(str(root / "annotations" / "instances_val.json"), results, "bbox")
    assert res.to_metrics(prefix="")["mAP"] == pytest.approx(1.0)
    # the same boxes left at the input size, or with labels unmapped, are wrong: the check can fail
    wrong = [{**r, "bbox": [v / 2 for v in r["bbox"]]} for r in results]
    assert evaluate_coco(str(root / "annotations" / "instances_val.json"), wrong, "bbox").to_metrics(prefix="")["mAP"] < 0.5


def test_recipes_random_ranking_floor_counts_only_answerable_queries(tmp_path: Path) -> None:
    """Three categories of 3, 2 and 1 crops: the lone crop cannot be answered; a query of the first finds its
    category first with probability 2/5, of the second 1/5, so (3 x 2/5 + 2 x 1/5) / 5 = 0.32."""
    for name, n in (("a", 3), ("b", 2), ("c", 1)):
        (tmp_path / "val" / name).mkdir(parents=True)
        for i in range(n):
            (tmp_path / "val" / name / f"{i}.jpg").write_bytes(b"")
    assert _module("recipes").trivial_metric("sim", tmp_path) == pytest.approx(0.32)


@pytest.mark.slow
def test_generation_speed_benchmark_compares_zoo_onnx_and_diffusers(tmp_path: Path) -> None:
    pytest.importorskip("diffusers")
    pytest.importorskip("onnxruntime")
    res = _module("generation_speed").main(["--size", "16", "--channels", "16,32", "--steps", "2", "--repeats", "1",
                                            "--batch", "1,2", "--train-steps", "1", "--warmup", "1",
                                            "--train-batch", "2", "--out", str(tmp_path / "gen")])
    assert set(res["training"]) == {"text", "text + image (prob 0.5)"}
    assert all(r["img_s"] > 0 for r in res["training"].values())
    rows = {(r["sampler"], r["batch"], r["side"]): r for r in res["sampling"]}
    sides = ("zoo", "zoo-onnx", "diffusers")
    assert set(rows) == {(s, b, side) for s in ("ddim", "dpm") for b in (1, 2) for side in sides}
    assert all(r["ms_per_image"] > 0 for r in rows.values())
    assert all(rows[(s, b, "diffusers")]["max_diff"] <= 1 and rows[(s, b, "zoo-onnx")]["max_diff"] <= 2
               for s in ("ddim", "dpm") for b in (1, 2))
    text = (tmp_path / "gen.md").read_text()
    assert "| ddim | 1 | zoo-onnx |" in text and "Command: `python benchmarks/generation_speed.py" in text
    assert json.loads((tmp_path / "gen.json").read_text())["versions"]["diffusers"]


def test_recipes_category_crops_hold_out_whole_categories_and_cap_each(tmp_path: Path) -> None:
    """Open-set retrieval: no category has crops on both sides, none has more than the cap (people would be most
    of a split otherwise), and the crops of the two subsets do not overwrite each other."""
    if not (SHARED_DATA / "coco128" / "annotations").is_dir():
        pytest.skip("../shared/data not present")
    root = _module("recipes").category_crops(tmp_path, cap=40)
    cats = {s: {d.name: len(list(d.glob("*.jpg"))) for d in (root / s).iterdir()} for s in ("train", "val")}
    assert cats["train"] and cats["val"] and not set(cats["train"]) & set(cats["val"])
    assert max(n for c in cats.values() for n in c.values()) == 40
    assert sum(cats["train"].values()) + sum(cats["val"].values()) == 663
    assert {p.name.split("_")[0] for p in root.rglob("*.jpg")} == {"coco128", "tiny"}
