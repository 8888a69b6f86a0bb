"""Every ``python train.py`` / ``python evaluate.py`` command in the README runs, at a tiny size, so the README
cannot go stale: each command's own overrides are kept, placeholders (``<run>``, ``/data/coco``, ...) point at
small local data, and tiny-size overrides are appended (one fast_dev_run step for training commands). Commands that
need a GPU (``trainer=gpu``) are composed and validated only, when no GPU is present."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import FAST, ROOT, SHARED_DATA, SMALL_SHAPES, compose
from zoo.config import TrainConfig, validate

TINY_TRAIN = ["trainer.fast_dev_run=true", "data.batch_size=4", *FAST, "backbone.name=test_resnet",
              "model.input_size=[64,64]", "data.limit_train_images=8", "data.limit_val_images=8", *SMALL_SHAPES]


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    cmds = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.splitlines():
            line = line.split("  #")[0].strip()
            if line.startswith(("python train.py", "python evaluate.py", "python predict.py", "python -m zoo.data.check",
                                "zoo-export", *SHARD_COMMANDS)):
                cmds.append(line)
    return cmds


#: Sharded-data commands (zoo.data.shards, zoo-embed --shards / --merge, torchrun of zoo-embed): run by
#: :func:`_run_shard_command`, ``<shards>`` standing for a folder of tiny embedded-dataset shards (``train/``, ``val/``).
SHARD_COMMANDS = ("python -m zoo.data.shards", "zoo-embed", "torchrun")

COMMANDS = readme_commands()


def test_the_readme_shows_commands() -> None:
    assert len(COMMANDS) >= 15 and any("experiment=shapes_multi" in c for c in COMMANDS)


#: The run the README's ``<run>`` and ``...`` stand for: a tiny multi-label classifier on coco128's categories.
RUN = ["model=classification", "data=coco", f"data.root={SHARED_DATA / 'coco128'}", "backbone=test_resnet",
       "model.input_size=[64,64]", "data.limit_train_images=8", "data.limit_val_images=8", "data.batch_size=4", *FAST]


@pytest.fixture(scope="module")
def places(tmp_path_factory) -> dict[str, str]:
    """``<run>`` (a tiny coco128 run with checkpoints), a ``detections.json`` for tiny_coco (its ground truth as
    results) and identity folders for the placeholders."""
    import json

    from tests.test_train_classification import identity_folders
    from zoo.training import train

    if not (SHARED_DATA / "coco128").is_dir():
        pytest.skip("../shared/data not present")
    out = tmp_path_factory.mktemp("readme_run")
    train(compose("train", [*RUN, "trainer.max_epochs=1"], output_dir=out))
    gt = json.loads((SHARED_DATA / "tiny_coco" / "annotations" / "instances_train2017.json").read_text())
    results = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
               for a in gt["annotations"] if not a.get("iscrowd")]
    res_file = out / "detections.json"
    res_file.write_text(json.dumps(results))
    ids = identity_folders(tmp_path_factory.mktemp("readme_ids"))
    det = tmp_path_factory.mktemp("readme_det")
    train(compose("train", ["experiment=shapes_det", "backbone=test_resnet", *FAST, *SMALL_SHAPES,
                            "model.input_size=[64,64]", "trainer.max_epochs=1", "data.batch_size=8"], output_dir=det))
    images = tmp_path_factory.mktemp("readme_images")
    from zoo.data.shapes import ensure_shapes_dataset

    shapes_root = ensure_shapes_dataset(None, num_train=96, num_val=32, image_size=96)
    for f in sorted((shapes_root / "val").glob("*.jpg"))[:3]:
        (images / f.name).write_bytes(f.read_bytes())
    folder = tmp_path_factory.mktemp("readme_folder")  # <folder>/<class>/<images>, one split
    rng = np.random.default_rng(1)
    for c, colour in enumerate(([200, 40, 40], [40, 200, 40], [40, 40, 200])):
        (folder / f"class{c}").mkdir()
        for k in range(6):
            im = np.clip(np.array(colour) + rng.normal(0, 25, (32, 32, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(im).save(folder / f"class{c}" / f"{k}.png")
    pairs = tmp_path_factory.mktemp("readme_pairs")  # <pairs>/images + <pairs>/masks, one split
    (pairs / "images").mkdir()
    (pairs / "masks").mkdir()
    for k in range(4):
        mask = np.zeros((32, 32), dtype=np.uint8)
        mask[4 + k:20 + k, 6:22] = 1
        Image.fromarray(np.where(mask[..., None] > 0, [220, 60, 60], [30, 30, 30]).astype(np.uint8)).save(
            pairs / "images" / f"{k}.png")
        Image.fromarray(mask, mode="L").save(pairs / "masks" / f"{k}.png")
    return {"run": str(out), "results": str(res_file), "ids": str(ids), "det_run": str(det), "images": str(images),
            "folder": str(folder), "pairs": str(pairs), "shards": str(_tiny_shards(tmp_path_factory.mktemp("readme_shards")))}


def _tiny_shards(out: Path) -> Path:
    """``<shards>``: the small embedded dataset (SMALL_SHAPES' sizes) as COCO shards, ``train/`` and ``val/``."""
    from zoo.data.shapes import ensure_shapes_dataset
    from zoo.data.shards import write_shards

    root = ensure_shapes_dataset(None, num_train=96, num_val=32, image_size=96)
    for split in ("train", "val"):
        write_shards("coco", root, out / split, split=split, shard_size=25)
    return out


def _run_shard_command(cmd: str, places: dict[str, str], tmp_path: Path) -> None:
    """A sharded-data command as a user runs it, in ``tmp_path``: ``write`` into ``tmp_path`` (the embedded dataset
    at SMALL_SHAPES' size), everything else on the tiny shards; ``--merge`` after writing the parts it names."""
    import os
    import subprocess
    import sys

    from zoo.similarity_cli import embed_shards

    coco = str(SHARED_DATA / "coco128")
    words = shlex.split(cmd.replace("../shared/data/coco128", coco).replace("<folder>", places["folder"]))
    if words[:4] == ["python", "-m", "zoo.data.shards", "write"]:
        words = [w.replace("<shards>", str(tmp_path)) for w in words]
        if "shapes" in words:
            words += ["--num-train", "96", "--num-val", "32", "--image-size", "96"]
    else:
        words = [w.replace("<shards>", places["shards"]) for w in words]
    if words[0] == "python":
        argv = [sys.executable, *words[1:]]
    elif words[0] == "torchrun":
        argv = [sys.executable, "-m", "torch.distributed.run", *words[1:], "--no-progress"]
    else:  # zoo-embed: the console script's module
        if "--merge" in words:
            model, shards = "test_resnet.shapes_sim", str(Path(places["shards"]) / "val")
            parts = [w for w in words if ".part-" in w]
            world = int(parts[0].split("-of-")[1].split(".")[0])
            for r in range(world):
                embed_shards(model, shards, tmp_path / words[words.index("--out") + 1], rank=r, world_size=world,
                             progress=False)
        argv = [sys.executable, "-m", "zoo.similarity_cli", *words[1:]]
        if "--merge" not in words:
            argv.append("--no-progress")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(argv, capture_output=True, text=True, cwd=str(tmp_path), env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]


def _arguments(cmd: str, places: dict[str, str]) -> tuple[str, list[str]]:
    coco = str(SHARED_DATA / "coco128")
    tiny = str(SHARED_DATA / "tiny_coco")
    if cmd.startswith(("python predict.py", "zoo-export")):  # serving commands: a detector's run and a few images
        cmd = cmd.replace("<run>", places["det_run"]).replace("<images>", places["images"])
    cmd = (cmd.replace("<folder>", places["folder"]).replace("<pairs>", places["pairs"]).replace("<shards>", places["shards"])
           .replace("<coco>", coco).replace("<identities>", places["ids"]))
    cmd = (cmd.replace("<run>", places["run"]).replace("../shared/data/coco128", coco)
           .replace("../shared/data/tiny_coco", tiny).replace("results=detections.json", f"results={places['results']}"))
    cmd = re.sub(r"=/data/coco(?=\s|$)", "=" + coco, cmd)
    cmd = re.sub(r"=/data/identities(?=\s|$)", "=" + places["ids"], cmd)
    words = shlex.split(cmd)
    if words[0] == "zoo-export":
        return "zoo-export", words[1:]
    args = [a for w in words[2:] for a in (RUN if w == "..." else [w])]
    return words[1], args


@pytest.mark.parametrize("cmd", COMMANDS, ids=[re.sub(r"[^A-Za-z0-9=._-]+", "_", c)[:90] for c in COMMANDS])
def test_readme_command_runs(cmd: str, places: dict[str, str], tmp_path: Path) -> None:
    from zoo.evaluation import evaluate
    from zoo.training import train

    if ("coco128" in cmd or "/data/coco" in cmd or "tiny_coco" in cmd) and not (SHARED_DATA / "coco128").is_dir():
        pytest.skip("../shared/data not present")
    if cmd.startswith(SHARD_COMMANDS):
        _run_shard_command(cmd, places, tmp_path)
        return
    entry, args = _arguments(cmd, places)
    if entry == "-m":  # a module command: run it as a user would
        import subprocess
        import sys

        proc = subprocess.run([sys.executable, *shlex.split(cmd)[1:]], capture_output=True, text=True, cwd=str(ROOT),
                              timeout=300)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        return
    if "-m" in args:  # a sweep: every combination composes; the multirun itself is tested through a real process
        args = [a for a in args if a != "-m"]
        args = [a.split(",")[0] if "=" in a and "," in a and "[" not in a else a for a in args]
    if entry == "zoo-export":  # the console script's entry point, in this process
        from zoo.hub.export import main

        args = [a.replace(places["det_run"] + "/export", str(tmp_path / "export")) for a in args]
        assert main(args) == 0
        assert (tmp_path / "export" / "model.json").is_file()
        return
    if entry == "predict.py":
        import subprocess
        import sys

        proc = subprocess.run([sys.executable, str(ROOT / "predict.py"), *args, f"hydra.run.dir={tmp_path}",
                               f"paths.output_dir={tmp_path}", "progress=false"], capture_output=True, text=True,
                              cwd=str(tmp_path), timeout=300)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        assert list(tmp_path.rglob("*.json"))
        return
    if entry == "evaluate.py":
        extra = ["data.num_workers=0", "data.persistent_workers=false", "trainer.enable_progress_bar=false",
                 "data.limit_val_images=8"]
        if not any(a.startswith("data=") for a in args) and not any(a.startswith("results=") for a in args):
            extra += SMALL_SHAPES
        res = evaluate(compose("evaluate", [*args, *extra], output_dir=tmp_path))
        assert res["metrics"]
        return
    if any(a.startswith("ckpt_path=") for a in args):  # resume: one more epoch of the same run
        cfg = compose("train", [*args, "trainer.max_epochs=2"], output_dir=tmp_path)
        assert train(cfg)["best_ckpt"]
        return
    extra = list(TINY_TRAIN)
    if "experiment=mixed_det_sim" in args:  # its identity source at a tiny size (4 identities x 4 images)
        extra += ["model.heads.1.data.batch_size=8", "+model.heads.1.data.limit_train_images=16",
                  "+model.heads.1.data.limit_val_images=12"]
    cfg = compose("train", [*args, *extra], output_dir=tmp_path)
    if "trainer=gpu" in args and not torch.cuda.is_available():
        validate(cfg, TrainConfig)  # composes and validates; the run itself needs a GPU
        return
    res = train(cfg)
    assert Path(res["output_dir"]) == tmp_path
