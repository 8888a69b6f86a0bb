"""The README's benchmark commands run at a tiny size (so they cannot go stale); their figures are not checked."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

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
@pytest.mark.parametrize("task,constant", [("cls", "0.500"), ("shapes", "0.2")])
def test_recipes_benchmark_compares_against_the_plain_loop(tmp_path: Path, task: str, constant: str) -> None:
    """Balanced real crops (constant 0.5) and the embedded dataset as an image folder (six shapes, the largest
    class about a fifth of the validation images)."""
    if task == "cls" and not (SHARED_DATA / "coco128" / "annotations").is_dir():
        pytest.skip("../shared/data not present")
    rows = _module("recipes").main(["--task", task, "--seeds", "0", "--epochs", "1", "--size", "32", "--work", str(tmp_path / "w"),
                                    "--out", str(tmp_path / "recipes"), "--variant", "none=recipe=none"])
    assert set(rows) == {"plain", "zoo default", "none"}
    assert all(0.0 <= r["metric"] <= 1.0 for rs in rows.values() for r in rs)
    text = (tmp_path / "recipes.md").read_text()
    assert "| plain |" in text and f"A constant prediction (the most frequent class everywhere) scores {constant}" in text


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
