"""Sharded streaming data (zoo.data.shards): the converter's round trip for every data kind (the same sample dicts as
the map-style readers), manifest counts and checksums, ``check`` finding a damaged shard; the stream's plan (every
sample exactly once over ranks x workers with uneven shards, a deterministic order per seed and epoch, resuming
after k items with exactly the rest); training from shards (classification, detection, mid-epoch resume, 2-process
DDP validating like 1 process); distributed ``zoo-embed --shards`` equal to one process after the merge; and clear
errors for bad input."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from tests.conftest import FAST, ROOT, compose
from zoo.data.shards import (MANIFEST, CocoShardDecoder, FolderShardDecoder, MaskShardDecoder, RawDecoder,
                             ShardError, ShardStream, _identity, _sha256, check_shards, open_shards, write_shards)

PRE = {"input_size": (48, 48), "resize": "stretch", "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}
#: The shapes settings of the shard tests: 96 training images (2 without a non-crowd object) and 32 validation images
#: (1 without), written 10 per shard: 10 training shards (the last one 6) and 4 validation shards (the last one 2).
SHAPES = {"num_train": 96, "num_val": 32, "image_size": 96}
TINY = ["backbone=test_resnet", "model.input_size=[48,48]", *FAST, "data.augment=[]", "export_bundle=false"]


# ------------------------------------------------------------------------------------------------------ fixtures
def _equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    return a == b


@pytest.fixture(scope="module")
def shapes_root() -> Path:
    from zoo.data.shapes import ensure_shapes_dataset

    return ensure_shapes_dataset(None, **SHAPES)


@pytest.fixture(scope="module")
def shards(shapes_root: Path, tmp_path_factory) -> Path:
    """``<dir>/train`` and ``<dir>/val``: the small embedded dataset as COCO shards of 10 samples."""
    out = tmp_path_factory.mktemp("shapes_shards")
    write_shards("coco", shapes_root, out / "train", split="train", shard_size=10)
    write_shards("coco", shapes_root, out / "val", split="val", shard_size=10)
    return out


def colour_folders(root: Path, split_ids: dict[str, str], n: int = 5) -> Path:
    """``<root>/<split>/<class>/<i>.png`` (and a jpg per class, so both encodings go through)."""
    rng = np.random.default_rng(0)
    for split, classes in split_ids.items():
        for c in classes:
            colour = rng.integers(30, 225, 3)
            d = root / split / c
            d.mkdir(parents=True, exist_ok=True)
            for k in range(n):
                img = np.clip(colour + rng.normal(0, 20, (24 + k, 30, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(d / (f"{k}.jpg" if k == 0 else f"{k}.png"))
    return root


def mask_pairs(root: Path, n: int = 7) -> Path:
    rng = np.random.default_rng(1)
    for split in ("train",):
        (root / split / "images").mkdir(parents=True)
        (root / split / "masks").mkdir(parents=True)
        for i in range(n):
            mask = np.zeros((28, 32), np.uint8)
            x, y = rng.integers(0, 12, 2)
            mask[y:y + 12, x:x + 14] = 1 + i % 2
            mask[0, :] = 255
            img = np.stack([mask * 90, 255 - mask * 60, np.full_like(mask, 40)], -1).astype(np.uint8)
            Image.fromarray(img).save(root / split / "images" / f"{i}.png")
            Image.fromarray(mask, mode="L").save(root / split / "masks" / f"{i}.png")
    return root


def _stream(ss, decoder=None, **kw) -> ShardStream:
    return ShardStream(ss, decoder or RawDecoder(), **kw)


def _ids(item) -> list[str]:
    return [s["id"] for s in item] if isinstance(item, list) else [item["id"]]


def _pass(ss, *, rank=0, world=1, workers=0, epoch=0, state=None, **kw) -> list[list[str]]:
    """One pass of a stream of raw samples for one rank, through a DataLoader with ``workers`` workers."""
    st = _stream(ss, rank=rank, world_size=world, **kw)
    st.set_epoch(epoch)
    if state is not None:
        st.load_state_dict(state)
    items = [_ids(b) for b in DataLoader(st, batch_size=None, num_workers=workers, collate_fn=_identity)]
    if state is None:
        assert len(items) == len(st)
    return items


# ---------------------------------------------------------------------------------------------- 1. round trips
def test_coco_shards_give_the_coco_readers_samples_and_a_true_manifest(shapes_root: Path, shards: Path) -> None:
    from zoo.data.coco import CocoDataset, CocoIndex

    man = json.loads((shards / "train" / MANIFEST).read_text())
    assert man["format"] == "zoo.shards/1" and man["kind"] == "coco" and man["zoo_version"]
    assert man["num_samples"] == 96 and [e["num_samples"] for e in man["shards"]] == [10] * 9 + [6]
    assert man["class_names"] == ["circle", "square", "triangle", "star", "hexagon", "cross"]
    assert man["category_ids"] == [1, 3, 4, 7, 9, 12] and man["source"] == str((shapes_root / "train").resolve())
    for e in man["shards"]:
        assert e["sha256"] == _sha256(shards / "train" / e["name"])
    assert check_shards(shards / "train") == {"shards": 10, "samples": 96, "bytes": sum(e["bytes"] for e in man["shards"])}
    index = CocoIndex(shapes_root / "annotations" / "instances_train.json", shapes_root / "train")
    assert sum(len(e["no_primary"]) for e in man["shards"]) == sum(index.primary_label(r) is None for r in index.records)
    ss = open_shards(shards / "train")
    for fmt in ("classification", "detection", "instance", "semantic", ("detection", "semantic", "classification"),
                "captions"):
        ds = CocoDataset(index, fmt, **PRE)
        stream = _stream(ss, CocoShardDecoder(ss.manifest, fmt, PRE), skip_no_primary=fmt == "classification")
        got = list(stream)
        assert len(got) == len(ds) == len(stream), fmt
        for i, sample in enumerate(got):
            assert _equal(sample, ds[i]), (fmt, i)


def test_folder_kinds_round_trip(tmp_path: Path) -> None:
    from zoo.data.folders import ImageFolderDataset
    from zoo.data.mask_folder import MaskFolderDataset

    folders = colour_folders(tmp_path / "folders", {"train": "ab", "val": "cde"})
    pairs = mask_pairs(tmp_path / "pairs")
    cases = [("image_folder", folders, "train", lambda m: FolderShardDecoder(m, PRE),
              ImageFolderDataset(folders / "train", **PRE)),
             ("identity_folder", folders, "val", lambda m: FolderShardDecoder(m, PRE),
              ImageFolderDataset(folders / "val", **PRE)),
             ("mask_folder", pairs, "train", lambda m: MaskShardDecoder(m, PRE),
              MaskFolderDataset(pairs / "train", **PRE))]
    for kind, root, split, decoder, ds in cases:
        man = write_shards(kind, root, tmp_path / kind, split=split, shard_size=4)
        assert man["kind"] == kind and man["num_samples"] == len(ds) and man["class_names"] == ds.class_names
        assert check_shards(tmp_path / kind)["samples"] == len(ds)
        ss = open_shards(str(tmp_path / kind))
        got = list(_stream(ss, decoder(ss.manifest)))
        assert len(got) == len(ds)
        for i, sample in enumerate(got):
            assert _equal(sample, ds[i]), (kind, i)
        ids = [s["id"] for s in _stream(ss)]
        files = [q for q, _ in (ds.pairs if kind == "mask_folder" else ds.samples)]
        assert ids == [str(q.relative_to(root / split / ("images" if kind == "mask_folder" else ""))) for q in files]


def test_check_finds_a_damaged_shard_and_reading_it_fails_clearly(shards: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(shards / "train", bad)
    data = bytearray((bad / "train-000003.tar").read_bytes())
    data[2000] ^= 0xFF  # inside a sample's data: the tar still reads, only the checksum tells
    (bad / "train-000003.tar").write_bytes(bytes(data))
    with pytest.raises(ShardError, match=r"train-000003.tar: sha256 .* is not the manifest's"):
        check_shards(bad)
    (bad / "train-000005.tar").write_bytes((shards / "train" / "train-000005.tar").read_bytes()[:3000])
    with pytest.raises(ShardError) as err:
        check_shards(bad)
    assert "train-000003.tar" in str(err.value) and "train-000005.tar" in str(err.value)
    assert "2 problem(s)" in str(err.value) or "3 problem(s)" in str(err.value)
    proc = subprocess.run([sys.executable, "-m", "zoo.data.shards", "check", str(bad)], capture_output=True, text=True,
                          cwd=str(ROOT), timeout=120)
    assert proc.returncode == 1 and "train-000005.tar" in proc.stderr
    ss = open_shards(bad)  # reading the truncated shard: an error naming it, never a silently short epoch
    with pytest.raises(ShardError, match="train-000005.tar"):
        list(_stream(ss))


# --------------------------------------------------------------------------------------------------- 2. the plan
@pytest.mark.parametrize("batch_size", [7, None])
def test_every_sample_exactly_once_over_2_ranks_x_2_workers(shards: Path, batch_size) -> None:
    ss = open_shards(shards / "train")  # 96 samples in shards of 10 (the last one 6): no even split by shard
    for skip_no_primary, total in ((False, 96), (True, 94)):
        per_rank = [_pass(ss, rank=r, world=2, workers=2, shuffle=True, seed=5, shuffle_buffer=8,
                          batch_size=batch_size, skip_no_primary=skip_no_primary) for r in range(2)]
        seen = [i for items in per_rank for b in items for i in b]
        assert len(seen) == total and len(set(seen)) == total
        if batch_size:  # the same number of batches on every rank (DDP steps together), none over batch_size
            assert len(per_rank[0]) == len(per_rank[1]) == 7
            assert all(0 < len(b) <= batch_size for items in per_rank for b in items)
    all_ids = {s["id"] for s in _stream(ss)}
    assert set(seen) <= all_ids and len(all_ids) == 96


def test_order_is_set_by_seed_and_epoch(shards: Path) -> None:
    ss = open_shards(shards / "train")
    kw = dict(shuffle=True, shuffle_buffer=16, batch_size=8, workers=2)
    a0, b0 = _pass(ss, seed=1, epoch=0, **kw), _pass(ss, seed=1, epoch=0, **kw)
    a1, c0 = _pass(ss, seed=1, epoch=1, **kw), _pass(ss, seed=2, epoch=0, **kw)
    assert a0 == b0
    assert a0 != a1 and a0 != c0
    flat = lambda items: sorted(i for b in items for i in b)  # noqa: E731
    assert flat(a0) == flat(a1) == flat(c0)
    plain = _pass(ss, batch_size=8)
    assert [i for b in plain for i in b] == [s["id"] for s in _stream(ss)]  # evaluation: manifest order


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_after_k_items_gives_exactly_the_rest(shards: Path, workers: int) -> None:
    ss = open_shards(shards / "train")
    kw = dict(rank=1, world=2, workers=workers, epoch=3, shuffle=True, seed=7, shuffle_buffer=12)
    for batch_size in (5, None):
        full = _pass(ss, batch_size=batch_size, **kw)
        for k in (0, 1, 3, len(full) - 1, len(full)):
            rest = _pass(ss, batch_size=batch_size, state={"epoch": 3, "consumed": k}, **kw)
            assert rest == full[k:], (batch_size, k)
    st = _stream(ss, shuffle=True, seed=7, batch_size=5)  # counted when iterated in this process
    st.set_epoch(2)
    it = iter(st)
    first = [_ids(next(it)) for _ in range(4)]
    state = st.state_dict()
    assert state["epoch"] == 2 and state["consumed"] == 4 and state["unit"] == "batches"
    again = _stream(ss, shuffle=True, seed=7, batch_size=5)
    again.load_state_dict(state)
    assert first + [_ids(b) for b in again] == [_ids(b) for b in _stream_epoch(ss, 2)]


def _stream_epoch(ss, epoch):
    st = _stream(ss, shuffle=True, seed=7, batch_size=5)
    st.set_epoch(epoch)
    return list(st)


def test_training_resume_callback_positions_the_stream(shards: Path, caplog) -> None:
    """zoo.checkpointing.ResumableTrainData keeps the stream's loader, saves (epoch, batches done) and makes the
    resumed loader yield the rest of that epoch."""
    from types import SimpleNamespace

    from zoo.checkpointing import ResumableTrainData

    ss = open_shards(shards / "train")
    cb = ResumableTrainData(seed=0)
    st = _stream(ss, shuffle=True, seed=3, batch_size=8)
    dl = DataLoader(st, batch_size=None, num_workers=2, collate_fn=_identity)
    assert cb.wrap(dl, SimpleNamespace(world_size=2)) is dl and cb.stream is st
    cb.on_train_epoch_start(SimpleNamespace(current_epoch=1), None)
    full = [_ids(b) for b in dl]
    progress = SimpleNamespace(ready=5, started=5, processed=5, completed=5)
    cb._trainer = SimpleNamespace(fit_loop=SimpleNamespace(epoch_loop=SimpleNamespace(
        batch_progress=SimpleNamespace(current=progress))), num_training_batches=len(dl))
    st.num_workers = 2  # what the data module sets
    state = cb.state_dict()
    assert state == {"epoch": 1, "batches_done": 5, "epoch_finished": False,
                     "stream": {"world_size": 1, "num_workers": 2, "seed": 3}}
    cb2 = ResumableTrainData(seed=0)
    cb2.load_state_dict(state)
    st2 = _stream(ss, shuffle=True, seed=3, batch_size=8)
    dl2 = cb2.wrap(DataLoader(st2, batch_size=None, num_workers=2, collate_fn=_identity), None)
    assert [_ids(b) for b in dl2] == full[5:]
    cb2.on_train_epoch_start(SimpleNamespace(current_epoch=2), None)  # the next epoch starts from its beginning
    assert st2.skip == 0 and len([b for b in dl2]) == len(dl2)
    st3 = _stream(ss, shuffle=True, seed=3, batch_size=8)
    st3.num_workers = 1
    with caplog.at_level("WARNING", logger="zoo.data.shards"):
        cb2._apply_stream(st3, 1, 5)
    assert "num_workers=1 but its position was saved with 2" in caplog.text


# ---------------------------------------------------------------------------------------------------- 3. training
def _shard_overrides(shards: Path) -> list[str]:
    return ["data=shards", f"data.urls={shards / 'train'}", f"data.val_urls={shards / 'val'}"]


def test_train_classification_from_shards_validates_like_the_folder_reader(shards: Path, tmp_path: Path) -> None:
    from zoo.evaluation import evaluate
    from zoo.training import train

    res = train(compose("train", ["experiment=shapes_cls", *_shard_overrides(shards), *TINY, "trainer.max_epochs=1",
                                  "data.batch_size=16", "data.num_workers=2"], output_dir=tmp_path / "run"))
    # the same checkpoint on the embedded dataset's own (map-style) validation split: the same numbers
    ev = evaluate(compose("evaluate", [f"ckpt_path={res['best_ckpt']}", "data=shapes", *[f"data.shapes.{k}={v}" for k, v in
                                       SHAPES.items()], "data.num_workers=0", "data.persistent_workers=false",
                                       "trainer.enable_progress_bar=false"], output_dir=tmp_path / "eval"))
    for key in ("val/top1", "val/top5"):
        assert res["metrics"][key] == pytest.approx(ev["metrics"][key], abs=1e-6), key
    # val/loss is a mean of batch means: batches of 15 + 16 images here, 16 + 15 there
    assert res["metrics"]["val/loss"] == pytest.approx(ev["metrics"]["val/loss"], rel=5e-3)


def test_train_detection_from_a_brace_list_of_shards(shards: Path, tmp_path: Path) -> None:
    from zoo.training import train

    urls = f"data.urls='{shards / 'train'}/train-{{000000..000004}}.tar'"  # half of the training shards (quoted:
    # braces are Hydra grammar)
    res = train(compose("train", ["experiment=shapes_det", "data=shards", urls, f"data.val_urls={shards / 'val'}",
                                  *TINY, "model.input_size=[64,64]", "trainer.max_epochs=1", "data.batch_size=10",
                                  "data.limit_val_images=12"], output_dir=tmp_path))
    assert "val/mAP" in res["metrics"] and (tmp_path / "detections.json").is_file()
    assert json.loads((tmp_path / "metrics.json").read_text())["num_images"] == 12


class Crash(RuntimeError):
    pass


def test_similarity_and_semantic_heads_train_from_folder_shards(tmp_path: Path) -> None:
    from zoo.training import train

    ids = colour_folders(tmp_path / "ids", {"train": "abcd", "val": "efg"}, n=4)
    for split in ("train", "val"):
        write_shards("identity_folder", ids, tmp_path / f"ids_{split}", split=split, shard_size=5)
    res = train(compose("train", ["model=similarity", "data=shards", f"data.urls={tmp_path / 'ids_train'}",
                                  f"data.val_urls={tmp_path / 'ids_val'}", *TINY, "model.input_size=[32,32]",
                                  "data.batch_size=8", "trainer.max_epochs=1"], output_dir=tmp_path / "sim"))
    assert "val/R@1" in res["metrics"]
    write_shards("mask_folder", mask_pairs(tmp_path / "pairs"), tmp_path / "masks", split="train", shard_size=3)
    res = train(compose("train", ["model=semantic", "data=shards", f"data.urls={tmp_path / 'masks'}", *TINY,
                                  "model.input_size=[32,32]", "data.batch_size=4", "trainer.max_epochs=1"],
                        output_dir=tmp_path / "sem"))
    assert "val/mIoU" in res["metrics"]


def trace_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
    """Patched over ResumableTrainData.on_train_batch_start: record (global step, image ids); crash at the step
    $ZOO_TEST_CRASH_AT."""
    if trainer.global_step == int(os.environ.get("ZOO_TEST_CRASH_AT", -1)):
        raise Crash(f"crash at step {trainer.global_step}")
    with open(os.environ["ZOO_TEST_TRACE"], "a") as f:
        f.write(json.dumps([trainer.global_step, list(batch["image_ids"])]) + "\n")


@pytest.mark.slow
def test_interrupted_training_from_shards_resumes_with_the_same_batches(shards: Path, tmp_path: Path,
                                                                       monkeypatch) -> None:
    """A run crashing mid-epoch and resumed from its last.ckpt (written every 4 steps): the batches of the two runs
    are, step for step, those of an uninterrupted run (2 epochs of 6 batches of 16, 2 loader workers)."""
    import zoo.checkpointing as zc
    from zoo.training import train

    monkeypatch.setattr(zc.ResumableTrainData, "on_train_batch_start", trace_batch_start, raising=False)
    ov = ["experiment=shapes_cls", *_shard_overrides(shards), *TINY, "data.batch_size=16", "data.num_workers=2",
          "run_eval=false", "trainer.max_epochs=2", "data.limit_val_images=8"]

    def steps(path: Path) -> dict[int, list]:
        out = {}
        for line in path.read_text().splitlines():
            step, ids = json.loads(line)
            out[step] = ids
        return out

    monkeypatch.setenv("ZOO_TEST_TRACE", str(tmp_path / "reference.jsonl"))
    train(compose("train", ov, output_dir=tmp_path / "reference"))
    reference = steps(tmp_path / "reference.jsonl")
    assert sorted(reference) == list(range(12))
    monkeypatch.setenv("ZOO_TEST_TRACE", str(tmp_path / "run.jsonl"))
    monkeypatch.setenv("ZOO_TEST_CRASH_AT", "9")
    crashing = [*ov, "callbacks.checkpoint.last_every_n_steps=4"]
    with pytest.raises(Crash):
        train(compose("train", crashing, output_dir=tmp_path / "run"))
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    ck = torch.load(last, map_location="cpu", weights_only=True)
    assert ck["global_step"] == 8 and ck["epoch"] == 1  # 2 of epoch 1's 6 batches done
    monkeypatch.delenv("ZOO_TEST_CRASH_AT")
    train(compose("train", [*crashing, f"ckpt_path={last}"], output_dir=tmp_path / "run"))
    assert steps(tmp_path / "run.jsonl") == reference


@pytest.mark.slow
def test_two_process_ddp_from_shards_validates_like_one_process(shards: Path, tmp_path: Path) -> None:
    """2 CPU processes (ddp_spawn) train from shards and validate the 31 usable validation images, split 15 / 16 over
    the ranks: the metrics are those of one process evaluating the same checkpoint (no sample padded or dropped)."""
    from zoo.evaluation import evaluate
    from zoo.training import train

    ddp = train(compose("train", ["experiment=shapes_cls", "trainer=ddp_cpu", *_shard_overrides(shards), *TINY,
                                  "model.input_size=[32,32]", "trainer.max_epochs=1", "data.batch_size=8",
                                  "trainer.limit_train_batches=1"], output_dir=tmp_path / "run"))["metrics"]
    one = evaluate(compose("evaluate", [f"ckpt_path={tmp_path / 'run' / 'checkpoints' / 'best.ckpt'}",
                                        *_shard_overrides(shards), "data.num_workers=0", "trainer.enable_progress_bar=false"],
                           output_dir=tmp_path / "eval"))
    hits = ddp["val/top1"] * 31  # a count of hits among 31 images (a DistributedSampler would pad to 32)
    assert abs(hits - round(hits)) < 1e-4, ddp
    for key in ("val/top1", "val/top5"):  # (val/loss is rank 0's own in DDP: it is not synced across processes)
        assert ddp[key] == pytest.approx(one["metrics"][key], abs=1e-6), key


# ----------------------------------------------------------------------------------------- 4. distributed embedding
def test_distributed_embed_equals_one_process_and_resumes(shards: Path, tmp_path: Path, monkeypatch) -> None:
    import zoo.similarity_cli as cli
    from zoo.similarity_index import EmbeddingIndex

    model, urls = "test_resnet.shapes_sim", str(shards / "val")
    assert cli.embed_main(["--model", model, "--shards", urls, "--out", str(tmp_path / "one.npz"), "--no-progress"]) == 0
    one = EmbeddingIndex.load(tmp_path / "one.npz")
    assert len(one) == 32 and len(set(one.ids)) == 32

    # rank 1 of 2 is killed after its first chunk of 5: a rerun keeps that chunk and embeds only the rest
    calls: list[int] = []
    real = cli._vectors

    def failing(pred, head, images, progress=True):
        calls.append(len(images))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(pred, head, images, progress)

    monkeypatch.setattr(cli, "_vectors", failing)
    out = tmp_path / "two.npz"
    with pytest.raises(KeyboardInterrupt):
        cli.embed_shards(model, urls, out, rank=1, world_size=2, chunk_size=5, progress=False)
    assert (tmp_path / "two.part-1-of-2.chunk-000000.npz").is_file()
    monkeypatch.setattr(cli, "_vectors", real)
    for rank in (0, 1):
        assert cli.embed_shards(model, urls, out, rank=rank, world_size=2, chunk_size=5, progress=False) == \
            cli.part_path(out, rank, 2)
    assert not list(tmp_path.glob("*.chunk-*"))
    monkeypatch.setattr(cli, "_vectors", failing)  # a finished part is skipped: nothing is embedded again
    calls.clear()
    cli.embed_shards(model, urls, out, rank=1, world_size=2, progress=False)
    assert calls == []
    parts = [str(cli.part_path(out, r, 2)) for r in (1, 0)]
    assert cli.embed_main(["--merge", *parts, "--out", str(out)]) == 0
    two = EmbeddingIndex.load(out)
    assert two.ids == one.ids  # the order of one process, not only the same set
    torch.testing.assert_close(two.embeddings, one.embeddings, atol=1e-5, rtol=0)
    assert two.meta == one.meta
    with pytest.raises(ValueError, match="missing"):
        cli.merge_parts(parts[:1], out)


@pytest.mark.slow
def test_torchrun_two_processes_embed_and_merge(shards: Path, tmp_path: Path) -> None:
    from zoo.similarity_index import EmbeddingIndex

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
           "zoo.similarity_cli", "--model", "test_resnet.shapes_sim", "--shards",
           f"{shards / 'val'}/val-{{000000..000003}}.tar", "--out", str(tmp_path / "emb.npz"), "--no-progress"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(tmp_path), timeout=180)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    merged = EmbeddingIndex.load(tmp_path / "emb.npz")
    one = EmbeddingIndex.load(_one_process_index(shards, tmp_path))
    assert merged.ids == one.ids
    torch.testing.assert_close(merged.embeddings, one.embeddings, atol=1e-5, rtol=0)


def _one_process_index(shards: Path, tmp_path: Path) -> Path:
    from zoo.similarity_cli import embed_shards

    return embed_shards("test_resnet.shapes_sim", str(shards / "val"), tmp_path / "single.npz", rank=0, world_size=1,
                        progress=False)


@pytest.mark.skipif(shutil.which("curl") is None, reason="webdataset reads http(s) urls with curl")
def test_http_shards_stream_with_their_manifest_and_annotations(shards: Path) -> None:
    import functools
    import http.server
    import threading

    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(shards))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        ss = open_shards(f"{base}/val/val-{{000000..000003}}.tar")
        assert ss.manifest_url == f"{base}/val/{MANIFEST}" and ss.num_samples == 32
        local = [s["id"] for s in _stream(open_shards(shards / "val"))]
        assert [s["id"] for s in _stream(ss, rank=1, world_size=2)] == local[16:]
        ann = ss.annotations_file()  # fetched into the cache for COCO evaluation
        assert Path(ann).read_bytes() == (shards / "val" / "annotations.json").read_bytes()
        with pytest.raises(ShardError, match=r"could not read the shard manifest .*/nowhere/manifest.json"):
            open_shards(f"{base}/nowhere/val-000000.tar")
    finally:
        server.shutdown()


# ------------------------------------------------------------------------------------------------- 5. bad input
def test_bad_input_says_what_and_how(shards: Path, tmp_path: Path) -> None:
    from zoo.data.datamodule import datamodule_from_config

    lone = tmp_path / "lone"
    lone.mkdir()
    shutil.copy(shards / "train" / "train-000000.tar", lone)
    with pytest.raises(ShardError, match=rf"no shard manifest at {lone}/manifest.json.*data.manifest="):
        open_shards(str(lone / "train-000000.tar"))
    with pytest.raises(ShardError, match=r"matches no file.*brace range"):
        open_shards(f"{shards / 'train'}/train-{{000008..000012}}.tar")
    with pytest.raises(ShardError, match=r"not listed in the manifest"):
        open_shards(str(lone / "train-000000.tar"), manifest=str(shards / "val" / MANIFEST))
    with pytest.raises(ShardError, match=r"pipe: url.*data.manifest="):
        open_shards(f"pipe:cat {shards / 'train' / 'train-000000.tar'}")
    piped = open_shards(f"pipe:cat {shards / 'train' / 'train-000000.tar'}", manifest=str(shards / "train" / MANIFEST))
    assert len(list(_stream(piped))) == 10  # pipe: urls read through webdataset's gopen
    with pytest.raises(ShardError, match="already holds shards.*--overwrite"):
        write_shards("shapes", None, shards / "train", shapes=SHAPES)
    folders = colour_folders(tmp_path / "folders", {"train": "ab"}, n=2)
    write_shards("image_folder", folders, tmp_path / "cls", split="train")
    cfg = {"kind": "shards", "urls": str(tmp_path / "cls"), "val_urls": str(tmp_path / "cls"), "batch_size": 2,
           "num_workers": 0, "pin_memory": False, "persistent_workers": False, "augment": []}
    with pytest.raises(ShardError, match=r"image_folder shards, which serve classification, but the heads need "
                                         r"'detection'.*--kind coco"):
        datamodule_from_config(cfg, "detection", PRE)
    with pytest.raises(ShardError, match=r"coco shards.*'similarity'.*identity_folder"):
        datamodule_from_config({**cfg, "urls": str(shards / "train"), "val_urls": str(shards / "val")}, "similarity", PRE)
    dm = datamodule_from_config(cfg, "classification", PRE)
    assert dm.info["class_names"] == ["a", "b"] and len(dm.train_dataloader()) == 2
