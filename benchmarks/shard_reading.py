"""Reading speed from WebDataset shards (zoo.data.shards) against the folder / COCO reader on the same images, and
the speed-up of a 2-process ``zoo-embed --shards`` over 1 process.

For each dataset (the embedded shapes dataset, and ``../shared/data/coco128`` when present) the images are written
as shards into a temporary folder, then read by both readers through a DataLoader with 1 and 2 workers, in batches
of 32 detection samples (boxes and labels), one full pass each (after one warm-up pass, so both read from the page
cache): decoded, resized and normalised as at evaluation ("decode"), and with the embedded dataset's training
augmentation ("train transform": flip, affine, colour jitter). Figures are images per second of the pass, the best
of ``--repeat`` passes. Every process uses one torch thread. About 2 minutes on 2 CPU cores.

    python benchmarks/shard_reading.py                      # writes benchmarks/results/shards.md and .json
    python benchmarks/shard_reading.py --num-images 256 --repeat 1 --no-write
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PRE = {"input_size": (128, 128), "resize": "stretch", "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
TRAIN_AUGMENT = [{"type": "HorizontalFlip", "p": 0.5},
                 {"type": "Affine", "scale": [0.9, 1.1], "translate_percent": [-0.05, 0.05], "rotate": [-10, 10],
                  "p": 0.5},
                 {"type": "ColorJitter", "brightness": 0.2, "contrast": 0.2, "saturation": 0.2, "hue": 0.0, "p": 0.5}]


def _one_thread(_: int) -> None:
    torch.set_num_threads(1)


def _loaders(ann: Path, images: Path, shards: Path, workers: int, augment, batch: int):
    from torch.utils.data import DataLoader

    from zoo.data.coco import CocoDataset, CocoIndex
    from zoo.data.datamodule import _Collate
    from zoo.data.shards import CocoShardDecoder, ShardStream, _identity, open_shards

    collate = _Collate(32, "detection")
    ds = CocoDataset(CocoIndex(ann, images), "detection", augment=augment, **PRE)
    folder = DataLoader(ds, batch_size=batch, shuffle=True, num_workers=workers, collate_fn=collate,
                        worker_init_fn=_one_thread)
    ss = open_shards(shards)
    stream = ShardStream(ss, CocoShardDecoder(ss.manifest, "detection", PRE, augment=augment), shuffle=True,
                         shuffle_buffer=256, batch_size=batch, collate_fn=collate, rank=0, world_size=1)
    shard = DataLoader(stream, batch_size=None, num_workers=workers, collate_fn=_identity, worker_init_fn=_one_thread)
    return {"folder/COCO": (folder, len(ds)), "shards": (shard, stream.num_samples)}


def _pass(loader) -> tuple[float, int]:
    t = time.perf_counter()
    n = sum(len(b["image_ids"]) for b in loader)
    return time.perf_counter() - t, n


def bench_reading(name: str, ann: Path, images: Path, shards: Path, *, repeat: int, batch: int) -> list[dict]:
    from zoo.data.transforms import build_augment

    rows = []
    for loader, _ in _loaders(ann, images, shards, 2, None, batch).values():
        _pass(loader)  # warm-up of each reader: the page cache holds both the image files and the shards
    for transform in ("decode", "train transform"):
        augment = build_augment(TRAIN_AUGMENT, boxes=True, seed=0, input_size=PRE["input_size"]) \
            if transform != "decode" else None
        for workers in (1, 2):
            loaders = _loaders(ann, images, shards, workers, augment, batch)
            times: dict[str, list[float]] = {reader: [] for reader in loaders}
            for _ in range(repeat):  # the readers' passes interleaved: a busy spell of the machine hits both
                for reader, (loader, n_expected) in loaders.items():
                    dt, n = _pass(loader)
                    assert n == n_expected, (reader, n, n_expected)
                    times[reader].append(dt)
            for reader, (loader, n_expected) in loaders.items():
                best = min(times[reader])
                rows.append({"dataset": name, "transform": transform, "workers": workers, "reader": reader,
                             "images": n_expected, "seconds": round(best, 3), "images_per_s": round(n_expected / best, 1)})
                print(f"{name:<8} {transform:<16} workers={workers} {reader:<12} {n_expected / best:8.1f} images/s",
                      flush=True)
    return rows


# ------------------------------------------------------------------------------------------------ embedding
def _embed_worker(rank: int, world: int, urls: str, out: str, model: str, times) -> None:
    """One process of the embedding: imports and a first model load (start-up, timed apart), then embed_shards."""
    torch.set_num_threads(1)
    t = time.perf_counter()
    from zoo.predictor import Predictor
    from zoo.similarity_cli import embed_shards

    model = _embed_model(model)
    Predictor(model)
    t1 = time.perf_counter()
    embed_shards(model, urls, out, rank=rank, world_size=world, progress=False, batch_size=32)
    times[2 * rank], times[2 * rank + 1] = t1 - t, time.perf_counter() - t1


def _embed_model(name: str):
    """``random:<timm backbone>``: an embedding model with seeded random weights (the same in every process), heavy
    enough per image for the parallel part to show; otherwise a registered name, bundle or checkpoint."""
    if not name.startswith("random:"):
        return name
    from zoo.models import create_model

    torch.manual_seed(0)
    return create_model({"backbone": {"name": name.split(":", 1)[1]}, "input_size": [128, 128],
                         "heads": {"emb": {"type": "embedding", "embedding_dim": 128}}})


def bench_embed(urls: str, tmp: Path, model: str, repeat: int) -> dict:
    import torch.multiprocessing as mp

    from zoo.similarity_cli import merge_parts, part_path
    from zoo.similarity_index import EmbeddingIndex

    res: dict = {"model": model}
    one_t, two_t, one_in, two_in = [], [], [], []
    ctx = mp.get_context("spawn")
    for r in range(repeat):
        out1 = tmp / f"one-{r}.npz"
        inner = ctx.Array("d", 4)
        t = time.perf_counter()
        p = ctx.Process(target=_embed_worker, args=(0, 1, urls, str(out1), model, inner))
        p.start()
        p.join()
        one_t.append(time.perf_counter() - t)
        one_in.append(inner[1])
        startup = [inner[0]]
        out2 = tmp / f"two-{r}.npz"
        inner = ctx.Array("d", 4)
        t = time.perf_counter()
        procs = [ctx.Process(target=_embed_worker, args=(k, 2, urls, str(out2), model, inner)) for k in range(2)]
        for q in procs:
            q.start()
        for q in procs:
            q.join()
        merge_parts([part_path(out2, k, 2) for k in range(2)], out2)
        two_t.append(time.perf_counter() - t)
        two_in.append(max(inner[1], inner[3]))
        startup += [inner[0], inner[2]]
        res["startup_s"] = [round(x, 2) for x in startup]
        a, b = EmbeddingIndex.load(out1), EmbeddingIndex.load(out2)
        assert a.ids == b.ids and torch.allclose(a.embeddings, b.embeddings, atol=1e-5)
        res["images"] = len(a)
    res["one_process_s"] = round(min(one_t), 2)
    res["two_processes_s"] = round(min(two_t), 2)
    res["speedup"] = round(min(one_t) / min(two_t), 2)
    res["one_process_embed_s"] = round(min(one_in), 2)
    res["two_processes_embed_s"] = round(min(two_in), 2)
    res["embed_speedup"] = round(min(one_in) / min(two_in), 2)
    res["note"] = ("end to end: wall time of whole processes (spawn, imports, model load, shard reading, "
                   "embedding, writing; the 2-process time includes the merge); embed_shards: the embed_shards call "
                   "inside each process after its imports and a first model load (the slower rank for 2 processes); "
                   f"process start-up (imports + first model load) took {res['startup_s']} s (1-process run, then "
                   "the two ranks); 1 torch thread per process; the merged index equals the 1-process one (ids, order, "
                   "vectors to 1e-5)")
    print(f"zoo-embed --shards, {res['images']} images: end to end 1 process {res['one_process_s']} s, 2 processes "
          f"{res['two_processes_s']} s ({res['speedup']}x); embed_shards {res['one_process_embed_s']} s vs "
          f"{res['two_processes_embed_s']} s ({res['embed_speedup']}x)", flush=True)
    return res


# ------------------------------------------------------------------------------------------------ report
def _hardware() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cpus": os.cpu_count(), "platform": platform.platform()}


def _versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("zoo", "torch", "webdataset", "pillow", "numpy", "albumentations"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


def write_report(result: dict, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "shards.json").write_text(json.dumps(result, indent=1))
    hw, v = result["hardware"], result["versions"]
    lines = ["# Reading from shards", "", f"Command: `{result['command']}`", "",
             f"Machine: {hw['cpu']}, {hw['cpus']} CPUs ({hw['platform']}); {result['date']}; one torch thread per "
             "process; the machine was shared with other jobs, so figures are indicative.", "",
             "Versions: " + ", ".join(f"{k} {val}" for k, val in v.items()), "",
             "Images per second of one full pass (best of the timed passes, after a warm-up pass) through a DataLoader, "
             f"batches of {result['batch_size']} detection samples at {PRE['input_size'][0]} px: `folder/COCO` is "
             "zoo.data.coco.CocoDataset on the image files, `shards` is zoo.data.shards.ShardStream on shards written "
             f"from the same images ({result['shard_size']} per shard).", "",
             "| dataset | transform | workers | folder/COCO img/s | shards img/s | shards / folder |", "|---|---|---|---|---|---|"]
    rows = result["reading"]
    keys = sorted({(r["dataset"], r["transform"], r["workers"]) for r in rows}, key=lambda k: (
        [r["dataset"] for r in rows].index(k[0]), k[1] != "decode", k[2]))
    for d, t, w in keys:
        f = next(r for r in rows if (r["dataset"], r["transform"], r["workers"], r["reader"]) == (d, t, w, "folder/COCO"))
        s = next(r for r in rows if (r["dataset"], r["transform"], r["workers"], r["reader"]) == (d, t, w, "shards"))
        lines.append(f"| {d} ({f['images']} images) | {t} | {w} | {f['images_per_s']:.0f} | {s['images_per_s']:.0f} | "
                     f"{s['images_per_s'] / f['images_per_s']:.2f}x |")
    e = result.get("embed")
    if e:
        lines += ["", f"## zoo-embed --shards: 2 processes against 1 ({e['images']} images of the embedded dataset, "
                  f"model `{e['model']}`)", "", "| | 1 process (s) | 2 processes (s) | speed-up |", "|---|---|---|---|",
                  f"| end to end | {e['one_process_s']} | {e['two_processes_s']} | {e['speedup']}x |",
                  f"| embed_shards | {e['one_process_embed_s']} | {e['two_processes_embed_s']} | {e['embed_speedup']}x |",
                  "", e["note"] + "."]
    (folder / "shards.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-images", type=int, default=256, help="embedded dataset: training images")
    ap.add_argument("--image-size", type=int, default=128)
    ap.add_argument("--shard-size", type=int, default=100)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=2, help="timed passes per setting (the best is kept)")
    ap.add_argument("--coco", default=str(ROOT.parent / "shared" / "data" / "coco128"),
                    help="a COCO folder (annotations/instances_train2017.json, train2017/); skipped when absent")
    ap.add_argument("--embed-model", default="random:resnet18",
                    help="zoo-embed's model: random:<timm backbone> (seeded random weights) or a registered name")
    ap.add_argument("--no-write", action="store_true", help="print only")
    a = ap.parse_args()
    torch.set_num_threads(1)
    from zoo.data.shapes import ensure_shapes_dataset
    from zoo.data.shards import write_shards

    tmp = Path(tempfile.mkdtemp(prefix="zoo_shard_bench_"))
    try:
        shapes = ensure_shapes_dataset(tmp / "shapes", num_train=a.num_images, num_val=0, image_size=a.image_size)
        write_shards("coco", shapes, tmp / "shapes_shards", split="train", shard_size=a.shard_size)
        datasets = [("shapes", shapes / "annotations" / "instances_train.json", shapes / "train", tmp / "shapes_shards")]
        coco = Path(a.coco)
        if (coco / "annotations" / "instances_train2017.json").is_file():
            write_shards("coco", coco, tmp / "coco_shards", split="train2017", shard_size=a.shard_size)
            datasets.append(("coco128", coco / "annotations" / "instances_train2017.json", coco / "train2017",
                             tmp / "coco_shards"))
        else:
            print(f"{coco} not present: the embedded dataset only")
        rows = []
        for name, ann, images, shards in datasets:
            rows += bench_reading(name, ann, images, shards, repeat=a.repeat, batch=a.batch)
        embed = bench_embed(str(tmp / "shapes_shards"), tmp, a.embed_model, repeat=1)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    result = {"command": "python benchmarks/shard_reading.py" + "".join(f" {x}" for x in sys.argv[1:]),
              "date": time.strftime("%Y-%m-%d"), "hardware": _hardware(), "versions": _versions(),
              "batch_size": a.batch, "shard_size": a.shard_size, "reading": rows, "embed": embed}
    if not a.no_write:
        write_report(result, ROOT / "benchmarks" / "results")
        print(f"wrote {ROOT / 'benchmarks' / 'results' / 'shards.md'} and shards.json")


if __name__ == "__main__":
    main()
