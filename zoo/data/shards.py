"""Sharded streaming data: WebDataset tar shards written from any of the zoo's data kinds, and read back as a
streaming dataset that gives the same sample dicts as the map-style readers.

Writing (``python -m zoo.data.shards write``, or :func:`write_shards`)::

    python -m zoo.data.shards write --kind coco --root ../shared/data/coco128 --split train2017 --out shards/train
    python -m zoo.data.shards write --kind shapes --out shards/train        # the embedded dataset (COCO layout)
    python -m zoo.data.shards check shards/train                           # sha256 and counts against the manifest

A shard ``<prefix>-000000.tar`` holds consecutive samples; one sample is the original encoded image file (its bytes
as they are on disk, under its own extension: ``.jpg``, ``.png``, ...) and a ``.json`` with the annotations in the
zoo's own terms (see :data:`SAMPLE_FIELDS`); ``mask_folder`` samples also carry their mask file as ``.mask.png``.
``manifest.json`` beside the shards records the format version, the kind, the classes, the number of samples of
every shard and their total, the sha256 of every shard, the source folder and the zoo version; COCO shards also keep
a copy of the source annotation json (``annotations.json``) for COCO evaluation.

Reading (:class:`ShardStream`, ``data=shards data.urls=... data.val_urls=...``): local paths, ``file:``,
``http(s)://`` and ``pipe:`` urls (opened by ``webdataset.gopen``), brace lists ``train-{000000..000009}.tar``, or
a folder holding a manifest. One epoch is planned from the manifest alone:

1. the shards are put in an order drawn from ``(seed, epoch)`` (training) or kept in manifest order (evaluation);
2. their samples, in shard order, make one sequence of ``N`` samples (images a format cannot use, e.g. images
   without a non-crowd object for single-label classification, are left out of it: the manifest lists them);
3. the sequence is cut at sample level into ``world_size`` contiguous parts whose sizes differ by at most one, and
   each rank's part into batches; every rank yields the same number of batches, ``ceil(ceil(N / world) /
   batch_size)``, of nearly equal size (at most ``batch_size``; e.g. 100 images at ``batch_size=32`` make 4
   batches of 25), so DDP ranks step together and no sample is dropped or repeated;
4. each rank's batches are cut into contiguous blocks, one per DataLoader worker; a worker reads only the shards
   of its block (the first and last one partly) and shuffles its samples with a buffer of ``shuffle_buffer``
   samples seeded by ``(seed, epoch, rank, worker)``.

Over one epoch every sample is thus seen exactly once across all ranks x workers, and the order depends only on
``(seed, epoch, world size, number of workers)``. :meth:`ShardStream.state_dict` / :meth:`~ShardStream.load_state_dict`
hold the epoch and the number of items (batches, or samples without batching) consumed on this rank: a stream
loaded with it skips exactly those (replaying the reading and the shuffle buffer without decoding) and yields the
rest of the epoch. A DataLoader's workers return their batches in turn (its default ``in_order=True``); the skip
follows that order. :class:`zoo.checkpointing.ResumableTrainData` does this for ``train.py`` (a killed run resumes
at the batch its last checkpoint was taken at). Loaders over a stream do not keep their workers between epochs
(``persistent_workers`` is off): the workers must be started with the stream's current epoch.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import math
import os
import shutil
import sys
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence
from urllib.parse import urlparse

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from zoo.data.coco import CocoIndex

log = logging.getLogger(__name__)

__all__ = ["ShardError", "ShardSet", "ShardStream", "write_shards", "check_shards", "open_shards", "shard_sets",
           "FORMAT", "MANIFEST", "SHARD_KINDS", "main"]

#: The manifest's format version; a reader refuses other major versions.
FORMAT = "zoo.shards/1"
MANIFEST = "manifest.json"
ANNOTATIONS = "annotations.json"
#: What ``write --kind`` accepts (``shapes`` writes the embedded dataset as ``coco`` shards).
SHARD_KINDS = ("coco", "image_folder", "mask_folder", "identity_folder", "shapes")
#: The target formats each kind of shards serves (as the map-style data kinds do).
SERVES = {"coco": ("classification", "multilabel", "detection", "semantic", "instance", "captions"),
          "image_folder": ("classification",), "mask_folder": ("semantic",), "identity_folder": ("similarity",)}
IMAGE_EXTS = ("jpg", "jpeg", "png", "bmp", "webp", "tif", "tiff")

#: The ``.json`` of one sample, per kind.
SAMPLE_FIELDS = {
    "coco": "image_id, file_name, height, width, annotations [{id, box (xyxy, original pixels, clipped), label "
            "(contiguous), category_id, iscrowd, area, mask (COCO RLE, counts as a string), extra}], caption",
    "image_folder": "image_id (index in the folder's sorted order), file_name, label, class_name",
    "identity_folder": "image_id, file_name, label, identity",
    "mask_folder": "image_id, file_name, mask_file (the mask is the sample's .mask.png)",
}


class ShardError(ValueError):
    """Shards or their manifest that cannot be used; the message names the file and says what to do."""


# ====================================================================================================== writing
def _sha256(path: Path) -> str:
    from zoo.hub.bundle import sha256_file

    return sha256_file(path)


def _zoo_version() -> str:
    from zoo import __version__

    return __version__


def _ext(path: Path) -> str:
    ext = path.suffix.lower().lstrip(".")
    if ext not in IMAGE_EXTS:
        raise ShardError(f"{path}: image extension {ext!r} is not one of {IMAGE_EXTS}")
    return ext


@dataclass
class _Item:
    """One sample to write: the image file, its json, extra files, and whether single-label classification uses it."""

    image: Path
    meta: dict[str, Any]
    files: dict[str, Path]
    no_primary: bool = False


def _coco_items(root: Path, split: str, *, on_bad: str, ann_file: str | None = None,
                images: str | None = None) -> tuple[list[_Item], dict[str, Any], Path]:
    from pycocotools import mask as mask_util

    from zoo.data.coco import CocoIndex
    from zoo.data.datamodule import resolve_coco_split
    from zoo.generation.captions import record_caption

    ann, img_dir = resolve_coco_split(root, split, ann_file=ann_file, images=images)
    index = CocoIndex(ann, img_dir, on_bad=on_bad)
    items = []
    for rec in index.records:
        anns = []
        for j, ann_id in enumerate(rec.ann_ids):
            m = index.ann_mask(int(ann_id))
            rle = mask_util.encode(np.asfortranarray(m.astype(np.uint8)))
            anns.append({"id": int(ann_id), "box": [float(v) for v in rec.boxes[j]], "label": int(rec.labels[j]),
                         "category_id": int(index.label_to_cat_id[int(rec.labels[j])]),
                         "iscrowd": bool(rec.iscrowd[j]), "area": float(rec.areas[j]),
                         "mask": {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")},
                         "extra": rec.extra[j] if rec.extra else {}})
        try:
            caption = record_caption(index, rec)
        except Exception as err:  # noqa: BLE001 - a caption is optional: the text-to-image head alone reads it
            log.debug("no caption for image %s: %s", rec.image_id, err)
            caption = None
        meta = {"image_id": int(rec.image_id), "file_name": str(rec.file.relative_to(img_dir)),
                "height": int(rec.height), "width": int(rec.width), "annotations": anns, "caption": caption}
        items.append(_Item(rec.file, meta, {}, no_primary=index.primary_label(rec) is None))
    info = {"class_names": list(index.class_names), "category_ids": list(index.cat_ids),
            "source": str(img_dir.resolve()), "annotation_source": str(ann.resolve())}
    return items, info, ann


def _folder_items(root: Path, split: str, kind: str) -> tuple[list[_Item], dict[str, Any]]:
    from zoo.data.folders import ImageFolderDataset

    split_dir = root / split
    ds = ImageFolderDataset(split_dir, input_size=(1, 1), mean=[0.0] * 3, std=[1.0] * 3)
    key = "class_name" if kind == "image_folder" else "identity"
    items = [_Item(p, {"image_id": i, "file_name": str(p.relative_to(split_dir)), "label": int(lab),
                       key: ds.class_names[lab]}, {})
             for i, (p, lab) in enumerate(ds.samples)]
    return items, {"class_names": list(ds.class_names), "source": str(split_dir.resolve())}


def _mask_items(root: Path, split: str, class_names: Sequence[str] | None) -> tuple[list[_Item], dict[str, Any]]:
    from zoo.data.mask_folder import MaskFolderDataset

    split_dir = root / split
    ds = MaskFolderDataset(split_dir, input_size=(1, 1), mean=[0.0] * 3, std=[1.0] * 3, class_names=class_names)
    items = [_Item(p, {"image_id": i, "file_name": str(p.relative_to(split_dir / "images")),
                       "mask_file": str(mp.relative_to(split_dir / "masks"))}, {"mask.png": mp})
             for i, (p, mp) in enumerate(ds.pairs)]
    return items, {"class_names": list(ds.class_names), "source": str(split_dir.resolve())}


def _write_tar(path: Path, samples: Sequence[tuple[str, dict[str, bytes]]]) -> None:
    """One shard, written to a temporary file and moved into place; fixed owner and times, so the same samples
    give the same bytes (and sha256)."""
    from webdataset import TarWriter

    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            writer = TarWriter(fh, encoder=False, mtime=0.0, user="zoo", group="zoo", mode=0o444)
            for key, files in samples:
                writer.write({"__key__": key, **files})
            writer.close()
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_shards(kind: str, root: str | Path | None, out: str | Path, *, split: str = "train",
                 shard_size: int = 1000, prefix: str | None = None, on_bad: str = "raise",
                 class_names: Sequence[str] | None = None, overwrite: bool = False,
                 shapes: Mapping[str, Any] | None = None, ann_file: str | None = None,
                 images: str | None = None) -> dict[str, Any]:
    """Write one split of a dataset as WebDataset shards ``<out>/<prefix>-000000.tar``... and ``<out>/manifest.json``.

    Args:
        kind: ``coco`` (``<root>/annotations/instances_<split>.json`` + ``<root>/<split>/``), ``image_folder``
            (``<root>/<split>/<class>/``), ``identity_folder`` (``<root>/<split>/<identity>/``), ``mask_folder``
            (``<root>/<split>/images`` + ``masks``) or ``shapes`` (the embedded dataset, generated into ``root``
            or the cache when ``root`` is ``None``, written as ``coco``).
        root: the dataset folder.
        out: the folder for the shards (created; one split per folder).
        split: the split to write.
        shard_size: samples per shard (the last shard holds the rest).
        prefix: shard file name prefix (default: the split name).
        on_bad: ``coco``: ``raise`` stops at a bad annotation, ``skip`` drops and counts them (as ``data.on_bad_annotation``).
        class_names: ``mask_folder``: the class of each mask index (default: counted from the masks).
        overwrite: replace shards and manifest already in ``out`` (otherwise refused).
        shapes: ``shapes``: the embedded dataset's parameters (``num_train``, ``num_val``, ``image_size``, ``seed``).
        ann_file, images: ``coco``: an annotation json / image folder other than the standard layout.

    Returns:
        The manifest (also written to ``<out>/manifest.json``).
    """
    if kind not in SHARD_KINDS:
        raise ShardError(f"--kind {kind!r} unknown; use one of {', '.join(SHARD_KINDS)}")
    if int(shard_size) < 1:
        raise ShardError(f"--shard-size must be >= 1, got {shard_size}")
    source_kind = kind
    if kind == "shapes":
        from zoo.data.shapes import ensure_shapes_dataset

        root = ensure_shapes_dataset(root, **dict(shapes or {}))
        kind = "coco"
    if root is None:
        raise ShardError(f"--root is required for --kind {kind}")
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"--root {root} does not exist")
    out = Path(out).expanduser()
    prefix = prefix or Path(split).name or "shards"
    if any(c in prefix for c in "./{}") or not prefix:
        raise ShardError(f"--prefix {prefix!r} must be a plain name (no '.', '/', braces)")
    out.mkdir(parents=True, exist_ok=True)
    old = out / MANIFEST
    if old.exists() or any(out.glob(f"{prefix}-*.tar")):
        if not overwrite:
            raise ShardError(f"{out} already holds shards ({MANIFEST} or {prefix}-*.tar): write into an empty folder "
                             "(one split per folder, e.g. shards/train and shards/val), or pass --overwrite")
        for p in [*out.glob(f"{prefix}-*.tar"), old, out / ANNOTATIONS]:
            if p.exists():
                p.unlink()
    t0 = time.perf_counter()
    ann_src = None
    if kind == "coco":
        items, info, ann_src = _coco_items(root, split, on_bad=on_bad, ann_file=ann_file, images=images)
    elif kind == "mask_folder":
        items, info = _mask_items(root, split, class_names)
    else:
        items, info = _folder_items(root, split, kind)
    if not items:
        raise ShardError(f"no samples to write from {root} (split {split!r})")
    n_shards = math.ceil(len(items) / int(shard_size))
    width = max(6, len(str(n_shards - 1)))
    shards = []
    for s in range(n_shards):
        chunk = items[s * int(shard_size):(s + 1) * int(shard_size)]
        samples = []
        for j, it in enumerate(chunk):
            g = s * int(shard_size) + j
            files = {_ext(it.image): it.image.read_bytes(),
                     "json": json.dumps({**it.meta, "image_ext": _ext(it.image)}, separators=(",", ":")).encode()}
            for ext, p in it.files.items():
                files[ext] = p.read_bytes()
            samples.append((f"{g:09d}", files))
        name = f"{prefix}-{s:0{width}d}.tar"
        path = out / name
        _write_tar(path, samples)
        entry = {"name": name, "num_samples": len(chunk), "sha256": _sha256(path), "bytes": path.stat().st_size}
        if kind == "coco":
            entry["no_primary"] = [j for j, it in enumerate(chunk) if it.no_primary]
        shards.append(entry)
    manifest: dict[str, Any] = {
        "format": FORMAT, "kind": kind, "source_kind": source_kind, "split": split, "prefix": prefix,
        "num_samples": len(items), "num_shards": n_shards, "shard_size": int(shard_size),
        "class_names": info["class_names"], "source": info["source"], "zoo_version": _zoo_version(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "sample_fields": SAMPLE_FIELDS[kind], "shards": shards,
    }
    if kind == "coco":
        shutil.copyfile(ann_src, out / ANNOTATIONS)
        manifest.update(category_ids=info["category_ids"], annotations=ANNOTATIONS,
                        annotations_sha256=_sha256(out / ANNOTATIONS), annotation_source=info["annotation_source"])
    if kind == "mask_folder":
        manifest["has_background"] = False
    tmp = out / f".{MANIFEST}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, old)
    log.info("wrote %d samples in %d shards to %s (%.1f s)", len(items), n_shards, out, time.perf_counter() - t0)
    return manifest


# ====================================================================================================== checking
def _tar_members(stream: Any, what: str) -> Iterator[tuple[str, str, bytes]]:
    """``(key, extension, data)`` of every file of a tar stream, in order; a clear error for a broken tar."""
    from webdataset.tariterators import base_plus_ext

    try:
        tf = tarfile.open(fileobj=stream, mode="r|*")
        for info in tf:
            if not info.isreg():
                continue
            key, ext = base_plus_ext(info.name)
            if key is None:
                continue
            data = tf.extractfile(info).read()
            yield key, ext, data
            tf.members = []
    except (tarfile.TarError, OSError, EOFError) as err:
        raise ShardError(f"{what} is not a readable tar file ({type(err).__name__}: {err}): it is truncated or "
                         "corrupt; check the shards with `python -m zoo.data.shards check <folder>` and write them "
                         "again") from err


def _samples_of(stream: Any, what: str) -> Iterator[dict[str, Any]]:
    """The samples of a shard: consecutive files sharing a key, as ``{"__key__": key, ext: bytes, ...}``."""
    cur: dict[str, Any] | None = None
    for key, ext, data in _tar_members(stream, what):
        if cur is not None and cur["__key__"] != key:
            yield cur
            cur = None
        if cur is None:
            cur = {"__key__": key}
        if ext in cur:
            raise ShardError(f"{what}: sample {key} holds two {ext!r} files")
        cur[ext] = data
    if cur is not None:
        yield cur


def check_shards(folder: str | Path, *, manifest: str | Path | None = None, decode: bool = False) -> dict[str, Any]:
    """Verify every shard of a manifest: it exists, its sha256 and its number of samples are the manifest's, and
    every sample has its ``.json`` and image (decoded too with ``decode``).

    Returns:
        ``{"shards", "samples", "bytes"}``.

    Raises:
        ShardError: listing every shard that fails, and what to do.
    """
    folder = Path(folder).expanduser()
    mpath = Path(manifest).expanduser() if manifest else folder / MANIFEST
    man = _read_manifest_file(mpath)
    base = mpath.parent
    problems, total, size = [], 0, 0
    for e in man["shards"]:
        p = base / e["name"]
        if not p.is_file():
            problems.append(f"{p}: missing")
            continue
        size += p.stat().st_size
        digest = _sha256(p)
        if digest != e["sha256"]:
            problems.append(f"{p}: sha256 {digest[:16]}... is not the manifest's {e['sha256'][:16]}... (the file "
                            "changed or is corrupt)")
        n = 0
        try:
            with open(p, "rb") as fh:
                for s in _samples_of(fh, str(p)):
                    n += 1
                    if "json" not in s or not any(x in s for x in IMAGE_EXTS):
                        problems.append(f"{p}: sample {s['__key__']} lacks its .json or image")
                    elif decode:
                        from zoo.preprocess import decode_rgb

                        ext = json.loads(s["json"]).get("image_ext")
                        decode_rgb(io.BytesIO(s[ext]), f"{p}:{s['__key__']}.{ext}")
        except (ShardError, ValueError) as err:
            problems.append(str(err))
            continue
        if n != e["num_samples"]:
            problems.append(f"{p}: {n} samples, the manifest says {e['num_samples']}")
        total += n
    if total != man["num_samples"] and not problems:
        problems.append(f"{mpath}: the shards hold {total} samples but num_samples is {man['num_samples']}")
    if problems:
        raise ShardError(f"{len(problems)} problem(s) in the shards of {mpath}:\n  " + "\n  ".join(problems)
                         + "\nWrite the shards again (python -m zoo.data.shards write ... --overwrite), or restore "
                         "the damaged files")
    if man.get("annotations"):
        ann = base / man["annotations"]
        if not ann.is_file() or _sha256(ann) != man.get("annotations_sha256"):
            raise ShardError(f"{ann}: missing or changed (sha256 differs from the manifest's): COCO evaluation reads "
                             "it; write the shards again")
    return {"shards": len(man["shards"]), "samples": total, "bytes": size}


# ====================================================================================================== manifests
def _read_manifest_file(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ShardError(f"no shard manifest at {path}: write shards with `python -m zoo.data.shards write ... --out "
                         f"{path.parent}`, or name the manifest with data.manifest=<path>")
    return _parse_manifest(path.read_bytes(), str(path))


def _parse_manifest(data: bytes, what: str) -> dict[str, Any]:
    try:
        man = json.loads(data)
    except ValueError as err:
        raise ShardError(f"{what} is not a JSON shard manifest ({err})") from err
    if not isinstance(man, dict) or not str(man.get("format", "")).startswith("zoo.shards/"):
        raise ShardError(f"{what} is not a zoo shard manifest (no \"format\": \"{FORMAT}\"); it is written by "
                         "`python -m zoo.data.shards write`")
    if man["format"].split("/")[1] != FORMAT.split("/")[1]:
        raise ShardError(f"{what} has format {man['format']!r}; this zoo reads {FORMAT!r}: write the shards again")
    for key in ("kind", "shards", "num_samples", "class_names"):
        if key not in man:
            raise ShardError(f"{what}: the manifest has no {key!r}")
    return man


def _is_local(url: str) -> bool:
    return urlparse(url).scheme in ("", "file")


def _local_path(url: str) -> Path:
    pr = urlparse(url)
    if pr.scheme == "file":
        from urllib.request import url2pathname

        return Path(url2pathname(pr.path))
    return Path(url).expanduser()


def _read_url(url: str) -> bytes:
    from webdataset.gopen import gopen

    with gopen(url, "rb") as fh:
        return fh.read()


def _parent_url(url: str) -> str | None:
    if url.startswith("pipe:"):
        return None
    if _is_local(url):
        return str(_local_path(url).parent)
    return url.rsplit("/", 1)[0]


def _join(base: str, name: str) -> str:
    return str(Path(base) / name) if _is_local(base) else f"{base.rstrip('/')}/{name}"


def _shard_name(url: str) -> str:
    if url.startswith("pipe:"):
        for tok in reversed(url.split()):
            if tok.endswith(".tar") or ".tar" in tok:
                return tok.rsplit("/", 1)[-1]
        return url
    return (str(_local_path(url).name) if _is_local(url) else url.rsplit("/", 1)[-1].split("?")[0])


def expand_urls(urls: str | os.PathLike | Sequence[str]) -> list[str]:
    """A list of shard urls from a string or path (``::``-separated, brace lists expanded) or a list of them."""
    import braceexpand

    parts = [os.fspath(urls)] if isinstance(urls, (str, os.PathLike)) else [os.fspath(u) for u in urls]
    out: list[str] = []
    for p in parts:
        for u in str(p).split("::"):
            u = u.strip()
            if u:
                out += list(braceexpand.braceexpand(u))
    return out


@dataclass
class ShardSet:
    """Shards to read: their urls, manifest entries (``num_samples``, ``sha256``, ``no_primary``) and the manifest."""

    urls: list[str]
    entries: list[dict[str, Any]]
    manifest: dict[str, Any]
    manifest_url: str

    @property
    def kind(self) -> str:
        return str(self.manifest["kind"])

    @property
    def num_samples(self) -> int:
        return sum(int(e["num_samples"]) for e in self.entries)

    def annotations_file(self) -> str | None:
        """A local path of the manifest's COCO annotation json (fetched into the cache for remote shards)."""
        name = self.manifest.get("annotations")
        if not name:
            return None
        base = _parent_url(self.manifest_url)
        url = _join(base, name)
        if _is_local(url):
            p = _local_path(url)
            if not p.is_file():
                raise ShardError(f"{p} (the COCO annotations named in {self.manifest_url}) does not exist: copy it "
                                 "beside the manifest, or write the shards again")
            return str(p)
        from zoo.data.shapes import default_cache_dir

        digest = str(self.manifest.get("annotations_sha256") or hashlib.sha256(url.encode()).hexdigest())
        dest = default_cache_dir() / "shards" / f"{digest[:16]}-{name}"
        if not dest.is_file():
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
            tmp.write_bytes(_read_url(url))
            os.replace(tmp, dest)
        return str(dest)


def open_shards(urls: str | Sequence[str] | None, manifest: str | None = None, *, what: str = "data.urls") -> ShardSet:
    """Resolve shard urls against their manifest.

    Args:
        urls: a folder holding ``manifest.json`` (all its shards), shard urls (brace lists, ``::``-separated), or
            a list of them.
        manifest: the manifest's path or url; default: ``manifest.json`` beside the first shard (``pipe:`` urls
            need it given).
        what: the config key named in errors.

    Raises:
        ShardError / FileNotFoundError: naming the url or manifest and the fix.
    """
    if not urls:
        raise ShardError(f"{what} is required for data=shards: the shard files (e.g. {what}='shards/train/"
                         "train-{000000..000009}.tar') or their folder; write them with `python -m zoo.data.shards "
                         "write`")
    listed = expand_urls(urls)
    if not listed:
        raise ShardError(f"{what}={urls!r} names no shard")
    folder = None
    if len(listed) == 1 and _is_local(listed[0]) and _local_path(listed[0]).is_dir():
        folder = _local_path(listed[0])
    if manifest:
        murl = str(manifest)
    elif folder is not None:
        murl = str(folder / MANIFEST)
    else:
        base = _parent_url(listed[0])
        if base is None:
            raise ShardError(f"{what}: {listed[0]!r} is a pipe: url, whose manifest cannot be found beside it; give "
                             "its path or url with data.manifest= (data.val_manifest= for data.val_urls)")
        murl = _join(base, MANIFEST)
    if _is_local(murl):
        mp = _local_path(murl)
        if not mp.is_file():
            raise ShardError(f"no shard manifest at {mp} (looked for {MANIFEST} beside {what}={listed[0]!r}): shards "
                             "are read with the manifest written beside them by `python -m zoo.data.shards write`; "
                             "copy it there, or give its path with data.manifest=")
        man = _read_manifest_file(mp)
    else:
        try:
            man = _parse_manifest(_read_url(murl), murl)
        except ShardError:
            raise
        except Exception as err:  # noqa: BLE001 - any transport error: say which url
            raise ShardError(f"could not read the shard manifest {murl} ({err}); give it with data.manifest=") from err
    by_name = {e["name"]: e for e in man["shards"]}
    if folder is not None:
        entries = list(man["shards"])
        shard_urls = [str(folder / e["name"]) for e in entries]
    else:
        entries, shard_urls = [], []
        for u in listed:
            name = _shard_name(u)
            if _is_local(u) and not _local_path(u).is_file():
                raise ShardError(f"{what}: {u!r} matches no file (the manifest {murl} lists {len(by_name)} shards "
                                 f"{man['shards'][0]['name']} ... {man['shards'][-1]['name']}); check the path and "
                                 "the brace range")
            if name not in by_name:
                raise ShardError(f"{what}: shard {u!r} is not listed in the manifest {murl} (it lists "
                                 f"{man['shards'][0]['name']} ... {man['shards'][-1]['name']}); check the url, or give "
                                 "the manifest written with these shards (data.manifest=)")
            entries.append(by_name[name])
            shard_urls.append(u)
        if len(set(shard_urls)) != len(shard_urls):
            raise ShardError(f"{what}: a shard is listed twice in {urls!r}: its samples would be seen twice per epoch")
    return ShardSet(shard_urls, entries, man, murl)


# ====================================================================================================== decoding
def _image_of(raw: Mapping[str, Any], meta: Mapping[str, Any], what: str, min_side: int | None = None
              ) -> tuple[np.ndarray, str, int, tuple[int, int]]:
    """``(image, name, reduction, full (H, W))``: decoded as the folder readers decode files (``data.fast_decode``:
    a large JPEG at 1/2..1/8 scale, both sides >= ``min_side``)."""
    from zoo.preprocess import decode_rgb_reduced

    ext = meta.get("image_ext") or next((e for e in IMAGE_EXTS if e in raw), None)
    if ext not in raw:
        raise ShardError(f"{what}: the sample has no image file (.{ext})")
    name = f"{what}.{ext}"
    img, r, full = decode_rgb_reduced(io.BytesIO(raw[ext]), name, min_side)
    return img, name, r, full


def _meta_of(raw: Mapping[str, Any], what: str) -> dict[str, Any]:
    if "json" not in raw:
        raise ShardError(f"{what}: the sample has no .json: these are not zoo shards (write them with "
                         "`python -m zoo.data.shards write`)")
    return json.loads(raw["json"])


class ShardCocoIndex(CocoIndex):
    """A :class:`~zoo.data.coco.CocoIndex` whose records come from shards: the classes of the manifest, masks decoded
    from each sample's RLEs (:meth:`bind`). Semantic maps, primary labels and captions are CocoIndex's own code."""

    def __init__(self, class_names: Sequence[str], cat_ids: Sequence[int], name: str) -> None:  # noqa: D107
        self.ann_file = Path(name)
        self.images_dir = Path(name).parent
        self.class_names = list(class_names)
        self.cat_ids = [int(c) for c in cat_ids]
        self.cat_id_to_label = {c: i for i, c in enumerate(self.cat_ids)}
        self.label_to_cat_id = dict(enumerate(self.cat_ids))
        self.records = []
        self.skipped, self.examples = {}, {}
        self._rles: dict[int, Any] = {}
        self._zoo_captions: dict[int, str] = {}
        self._zoo_caption_file = None

    def bind(self, rles: dict[int, Any], image_id: int, caption: str | None) -> None:
        """The masks (``{annotation id: RLE}``) and caption of the sample being decoded."""
        self._rles = rles
        self._zoo_captions = {} if caption is None else {int(image_id): caption}

    def ann_mask(self, ann_id: int) -> np.ndarray:
        from pycocotools import mask as mask_util

        rle = dict(self._rles[int(ann_id)])
        rle["counts"] = rle["counts"].encode("ascii") if isinstance(rle["counts"], str) else rle["counts"]
        return mask_util.decode(rle)


class CocoShardDecoder:
    """Raw COCO shard samples -> the sample dicts of :class:`zoo.data.coco.CocoDataset` (same code: its
    :meth:`~zoo.data.coco.CocoDataset.make_sample`)."""

    def __init__(self, manifest: Mapping[str, Any], fmt: Any, pre: Mapping[str, Any], *, augment=None,
                 train_sizes=None, name: str = "shards") -> None:
        from zoo.data.coco import CocoDataset

        index = ShardCocoIndex(manifest["class_names"], manifest.get("category_ids")
                               or range(1, len(manifest["class_names"]) + 1), name)
        self.dataset = CocoDataset(index, fmt, augment=augment, train_sizes=train_sizes, **pre)

    def __call__(self, raw: Mapping[str, Any], what: str) -> dict[str, Any]:
        from zoo.data.coco import ImageRecord

        meta = _meta_of(raw, what)
        img, name, r, _ = _image_of(raw, meta, what, self.dataset.decode_min_side)
        anns = meta.get("annotations") or []
        rec = ImageRecord(
            image_id=int(meta["image_id"]), file=Path(name), height=int(meta["height"]), width=int(meta["width"]),
            boxes=np.asarray([a["box"] for a in anns], dtype=np.float32).reshape(-1, 4),
            labels=np.asarray([a["label"] for a in anns], dtype=np.int64),
            iscrowd=np.asarray([a["iscrowd"] for a in anns], dtype=bool),
            areas=np.asarray([a["area"] for a in anns], dtype=np.float32),
            ann_ids=np.asarray([a["id"] for a in anns], dtype=np.int64), extra=[a.get("extra") or {} for a in anns])
        index = self.dataset.index
        index.bind({int(a["id"]): a["mask"] for a in anns}, rec.image_id, meta.get("caption"))
        if "captions" in self.dataset.formats and meta.get("caption") is None:
            raise ShardError(f"{what}: the sample has no caption; write the shards again from a dataset with "
                             "captions (captions_<split>.json beside the instances json)")
        return self.dataset.make_sample(rec, img, reduction=r)


def _reader_without_files(cls: type, pre: Mapping[str, Any], augment: Any, **attrs: Any) -> Any:
    """A folder reader (``ImageFolderDataset`` / ``MaskFolderDataset``) that lists no files, only there for its
    ``make_sample`` (the preprocessing the folder readers apply), so shard samples equal theirs."""
    ds = cls.__new__(cls)
    ds.root, ds.augment = Path("."), augment
    ds.input_size = tuple(int(v) for v in pre["input_size"])
    ds.resize, ds.mean, ds.std = pre.get("resize", "stretch"), list(pre["mean"]), list(pre["std"])
    for k, v in attrs.items():
        setattr(ds, k, v)
    return ds


class FolderShardDecoder:
    """Raw image_folder / identity_folder samples -> the sample dicts of :class:`zoo.data.folders.ImageFolderDataset`."""

    def __init__(self, manifest: Mapping[str, Any], pre: Mapping[str, Any], *, augment=None) -> None:
        from zoo.data.folders import ImageFolderDataset

        self.dataset = _reader_without_files(ImageFolderDataset, pre, augment, samples=[],
                                             class_names=list(manifest["class_names"]))

    def __call__(self, raw: Mapping[str, Any], what: str) -> dict[str, Any]:
        meta = _meta_of(raw, what)
        img, _, r, full = _image_of(raw, meta, what, self.dataset.decode_min_side)
        return self.dataset.make_sample(img, int(meta["label"]), int(meta["image_id"]), reduction=r, full_size=full)


class MaskShardDecoder:
    """Raw mask_folder samples -> the sample dicts of :class:`zoo.data.mask_folder.MaskFolderDataset`."""

    def __init__(self, manifest: Mapping[str, Any], pre: Mapping[str, Any], *, augment=None,
                 class_names: Sequence[str] | None = None) -> None:
        from zoo.data.mask_folder import MaskFolderDataset

        self.dataset = _reader_without_files(MaskFolderDataset, pre, augment, pairs=[],
                                             class_names=list(class_names or manifest["class_names"]))

    def __call__(self, raw: Mapping[str, Any], what: str) -> dict[str, Any]:
        from zoo.data.mask_folder import read_index_mask

        meta = _meta_of(raw, what)
        img, name, r, _ = _image_of(raw, meta, what, self.dataset.decode_min_side)
        if "mask.png" not in raw:
            raise ShardError(f"{what}: the sample has no .mask.png (mask_folder shards carry the mask beside the image)")
        mask_name = f"{what}.mask.png"
        mask = read_index_mask(io.BytesIO(raw["mask.png"]))
        return self.dataset.make_sample(img, mask, int(meta["image_id"]), img_path=name, mask_path=mask_name,
                                        reduction=r)


class RawDecoder:
    """Raw samples as they are: ``{"__key__", "id"`` (the source file name), ``"image"`` (the encoded bytes),
    ``"meta"`` (the parsed json)``}``."""

    def __call__(self, raw: Mapping[str, Any], what: str) -> dict[str, Any]:
        meta = _meta_of(raw, what)
        ext = meta.get("image_ext") or next((e for e in IMAGE_EXTS if e in raw), None)
        return {"__key__": raw["__key__"], "id": str(meta.get("file_name") or raw["__key__"]),
                "image": raw[ext], "meta": meta}


# ====================================================================================================== streaming
def _split(n: int, parts: int, i: int) -> tuple[int, int]:
    """``[start, stop)`` of part ``i`` when ``n`` items are cut into ``parts`` contiguous parts differing by <= 1."""
    return (i * n) // parts, ((i + 1) * n) // parts


def _round_robin_taken(k: int, counts: Sequence[int]) -> tuple[list[int], int]:
    """How many items each worker has given when a DataLoader (``in_order``) has returned ``k`` items, workers
    taking turns (0, 1, ..., 0, 1, ...) and those that are done dropping out; and the worker whose turn is next."""
    W = len(counts)
    taken = [0] * W
    k = int(k)
    nxt = 0
    while k > 0:
        active = [w for w in range(W) if taken[w] < counts[w]]
        if not active:
            break
        full = min(min(counts[w] - taken[w] for w in active), k // len(active))
        if full > 0:  # whole turns of every active worker: the turn comes back to the first
            for w in active:
                taken[w] += full
            k -= full * len(active)
            continue
        for w in active[:k]:
            taken[w] += 1
        nxt = (active[k - 1] + 1) % W
        k = 0
    return taken, nxt


def _identity(x: Any) -> Any:
    return x


class ShardStream(IterableDataset):
    """Samples (or batches) streamed from WebDataset shards; see the module docs for how an epoch is planned.

    Args:
        shards: the :class:`ShardSet` to read (:func:`open_shards`).
        decoder: ``(raw sample, name) -> sample dict`` (:class:`CocoShardDecoder`, :class:`FolderShardDecoder`,
            :class:`MaskShardDecoder`, :class:`RawDecoder`).
        shuffle: shuffle shards (order drawn from ``(seed, epoch)``) and samples (a buffer); off: manifest order.
        seed: the base seed.
        shuffle_buffer: samples a worker's shuffle buffer holds (raw, undecoded bytes).
        batch_size: yield batches of (at most) this many samples, collated with ``collate_fn``, the same number of
            batches on every rank; ``None`` yields samples.
        collate_fn: turns a list of samples into a batch (default: the list).
        skip_no_primary: leave out the images the manifest marks as without a non-crowd object (single-label
            classification from COCO shards, as :class:`~zoo.data.coco.CocoDataset` does).
        limit: use only the first ``limit`` samples (in manifest order).
        rank, world_size: this process's part (default: ``torch.distributed`` when initialised, else the
            ``RANK`` / ``WORLD_SIZE`` environment variables, else 0 / 1).
    """

    def __init__(self, shards: ShardSet, decoder: Callable[[Mapping[str, Any], str], Any], *, shuffle: bool = False,
                 seed: int = 0, shuffle_buffer: int = 1000, batch_size: int | None = None,
                 collate_fn: Callable | None = None, skip_no_primary: bool = False, limit: int | None = None,
                 rank: int | None = None, world_size: int | None = None) -> None:
        super().__init__()
        self.shards = shards
        self.decoder = decoder
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.shuffle_buffer = max(1, int(shuffle_buffer))
        self.batch_size = int(batch_size) if batch_size else None
        self.collate_fn = collate_fn or _identity
        self.epoch = 0
        self.skip = 0
        self._consumed = 0
        self._rank, self._world = rank, world_size
        self.num_workers: int | None = None
        usable = []
        left = None if limit is None or int(limit) <= 0 else int(limit)
        for e in shards.entries:
            excluded = set(int(p) for p in (e.get("no_primary") or [])) if skip_no_primary else set()
            n = int(e["num_samples"]) - len(excluded)
            if left is not None:
                n = min(n, left)
                left -= n
            usable.append((n, frozenset(excluded)))
        self._usable = usable
        self.num_samples = sum(n for n, _ in usable)
        if self.num_samples == 0:
            raise ShardError(f"the shards of {shards.manifest_url} hold no usable sample")

    # ------------------------------------------------------------------ configuration
    def set_epoch(self, epoch: int) -> None:
        """The epoch whose order the next pass follows (a resume position of another epoch is dropped)."""
        if int(epoch) != self.epoch:
            self.skip = 0
        self.epoch = int(epoch)

    def set_distributed(self, rank: int, world_size: int) -> None:
        if not 0 <= int(rank) < int(world_size):
            raise ValueError(f"rank {rank} must be in 0..{int(world_size) - 1}")
        self._rank, self._world = int(rank), int(world_size)

    def dist_info(self) -> tuple[int, int]:
        """``(rank, world size)`` this stream reads for."""
        if self._rank is not None and self._world is not None:
            return self._rank, self._world
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank(), torch.distributed.get_world_size()
        return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))

    # ------------------------------------------------------------------ position
    def state_dict(self) -> dict[str, Any]:
        """The epoch and the items (``unit``) consumed from it on this rank, counted when the stream is iterated in
        this process (``num_workers=0``); with DataLoader workers count the items the loader returned yourself
        (:class:`zoo.checkpointing.ResumableTrainData` does for training)."""
        rank, world = self.dist_info()
        return {"epoch": self.epoch, "consumed": self._consumed, "unit": "batches" if self.batch_size else "samples",
                "world_size": world, "num_workers": self.num_workers, "seed": self.seed}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume: the next pass is epoch ``state["epoch"]`` without its first ``state["consumed"]`` items."""
        if not state:
            return
        _, world = self.dist_info()
        for key, now in (("world_size", world), ("seed", self.seed), ("num_workers", self.num_workers)):
            if state.get(key) is not None and now is not None and int(state[key]) != int(now):
                log.warning("shard stream resumed with %s=%s but its position was saved with %s: the rest of epoch %s "
                            "is not the exact complement of what was seen", key, now, state[key], state["epoch"])
        self.epoch = int(state["epoch"])
        self.skip = int(state.get("consumed", 0))
        self._consumed = self.skip

    def __len__(self) -> int:
        """Items per epoch on this rank: batches (the same on every rank) or samples."""
        rank, world = self.dist_info()
        if self.batch_size:
            return self._num_batches(world)
        a, b = _split(self.num_samples, world, rank)
        return b - a

    def _num_batches(self, world: int) -> int:
        per_rank = math.ceil(self.num_samples / world)
        nb = math.ceil(per_rank / self.batch_size)
        if self.num_samples // world < nb:
            raise ShardError(f"{self.num_samples} samples cannot give each of {world} processes {nb} batch(es) of at "
                             "least one sample: use fewer processes or more data")
        return nb

    # ------------------------------------------------------------------ plan
    def shard_order(self, epoch: int) -> list[int]:
        n = len(self.shards.entries)
        if not self.shuffle:
            return list(range(n))
        rng = np.random.default_rng([self.seed, int(epoch), 0x5A4D])
        return [int(i) for i in rng.permutation(n)]

    def plan(self, epoch: int, rank: int, world: int, worker: int, num_workers: int
             ) -> tuple[list[tuple[int, int, int]], list[int]]:
        """What one worker reads in one epoch: ``[(shard index, first, stop)]`` (usable-sample positions within each
        shard) and the sizes of its items (batch sizes, or ones for samples)."""
        order = self.shard_order(epoch)
        a, b = _split(self.num_samples, world, rank)
        n_r = b - a
        if self.batch_size:
            nb = self._num_batches(world)
            sizes_r = [(i + 1) * n_r // nb - i * n_r // nb for i in range(nb)]
            b0, b1 = _split(nb, num_workers, worker)
            start = a + sum(sizes_r[:b0])
            sizes = sizes_r[b0:b1]
        else:
            s0, s1 = _split(n_r, num_workers, worker)
            start, sizes = a + s0, [1] * (s1 - s0)
        stop = start + sum(sizes)
        reads, pos = [], 0
        for s in order:
            n = self._usable[s][0]
            lo, hi = max(start, pos), min(stop, pos + n)
            if lo < hi:
                reads.append((s, lo - pos, hi - pos))
            pos += n
            if pos >= stop:
                break
        return reads, sizes

    def worker_counts(self, epoch: int, rank: int, world: int, num_workers: int) -> list[int]:
        return [len(self.plan(epoch, rank, world, w, num_workers)[1]) for w in range(num_workers)]

    # ------------------------------------------------------------------ reading
    def _raw(self, reads: Sequence[tuple[int, int, int]]) -> Iterator[tuple[dict[str, Any], str]]:
        """The raw samples of ``reads``, in order, each with a name for messages (``<shard>:<key>``)."""
        from webdataset.gopen import gopen

        for s, first, stop in reads:
            url = self.shards.urls[s]
            n_all, excluded = int(self.shards.entries[s]["num_samples"]), self._usable[s][1]
            u, pos, done = 0, 0, False
            try:
                stream = gopen(url, "rb")
            except FileNotFoundError:
                raise ShardError(f"shard {url} does not exist (listed in {self.shards.manifest_url})") from None
            except Exception as err:  # noqa: BLE001 - transport errors: name the url
                raise ShardError(f"could not open shard {url}: {err}") from err
            try:
                for raw in _samples_of(stream, url):
                    p = pos
                    pos += 1
                    if p in excluded:
                        continue
                    if u >= first:
                        yield raw, f"{url}:{raw['__key__']}"
                    u += 1
                    if u >= stop:
                        done = True
                        break
            finally:
                try:
                    stream.close()
                except Exception:  # noqa: BLE001 - a pipe stopped early may report its status
                    pass
            if not done:
                raise ShardError(f"shard {url} ended after {pos} samples but the manifest {self.shards.manifest_url} "
                                 f"says it holds {n_all}: the shard is truncated or the manifest is stale; run "
                                 "`python -m zoo.data.shards check <folder>`")

    def _shuffled(self, raws: Iterator[Any], rng: np.random.Generator) -> Iterator[Any]:
        if not self.shuffle:
            yield from raws
            return
        buf: list[Any] = []
        for r in raws:
            if len(buf) < self.shuffle_buffer:
                buf.append(r)
                continue
            j = int(rng.integers(len(buf)))
            buf[j], r = r, buf[j]
            yield r
        while buf:
            j = int(rng.integers(len(buf)))
            buf[j], buf[-1] = buf[-1], buf[j]
            yield buf.pop()

    def __iter__(self) -> Iterator[Any]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        rank, world = self.dist_info()
        epoch, skip = self.epoch, self.skip
        taken = 0
        if skip:
            # A new loader asks its workers in turn from worker 0: loader worker j serves the part of the worker
            # whose turn was next (and so on), so that the rest comes in the order of an uninterrupted pass.
            per_worker, nxt = _round_robin_taken(skip, self.worker_counts(epoch, rank, world, num_workers))
            worker = (worker + nxt) % num_workers
            taken = per_worker[worker]
        reads, sizes = self.plan(epoch, rank, world, worker, num_workers)
        rng = np.random.default_rng([self.seed, epoch, rank, world, worker, num_workers])
        samples = self._shuffled(self._raw(reads), rng)
        main = info is None
        if main:
            self._consumed = skip
        for i, size in enumerate(sizes):
            raws = [r for _, r in zip(range(size), samples)]
            if len(raws) != size:  # the reads are planned from the manifest's counts; _raw refuses short shards
                raise ShardError(f"shards of {self.shards.manifest_url}: fewer samples than planned; run "
                                 "`python -m zoo.data.shards check <folder>`")
            if i < taken:
                continue
            decoded = [self.decoder(r, name) for r, name in raws]
            item = self.collate_fn(decoded) if self.batch_size else decoded[0]
            if main:
                self._consumed += 1
            yield item
        if main:
            self.skip = 0


# ====================================================================================================== data configs
def _open_split(cfg: Mapping[str, Any], stage: str) -> ShardSet:
    if stage == "train":
        return open_shards(cfg.get("urls"), cfg.get("manifest"), what="data.urls")
    if cfg.get("val_urls"):
        return open_shards(cfg.get("val_urls"), cfg.get("val_manifest"), what="data.val_urls")
    log.warning("data=shards without data.val_urls: validating on the training shards data.urls (how well the model "
                "fits, not how it generalises); set data.val_urls to the shards of a held-out split")
    return open_shards(cfg.get("urls"), cfg.get("manifest"), what="data.urls")


def _check_kind(kind: str, formats: Sequence[str], where: str) -> None:
    served = SERVES.get(kind)
    if served is None:
        raise ShardError(f"{where}: shards of kind {kind!r} cannot be read; this zoo reads {sorted(SERVES)}")
    wrong = [f for f in formats if f not in served]
    if not wrong:
        return
    need = wrong[0]
    best = {"similarity": "identity_folder", "semantic": "mask_folder or coco", "classification": "image_folder or coco"
            }.get(need, "coco")
    more = (" (similarity from COCO object crops is not read from shards: write identity_folder shards of the "
            "crops)" if need == "similarity" and kind == "coco" else "")
    raise ShardError(f"{where} holds {kind} shards, which serve {', '.join(served)}, but the heads need {need!r}{more}: "
                     f"write {best} shards for them (python -m zoo.data.shards write --kind {best.split()[0]} ...) or "
                     "train a head that reads these")


def shard_sets(cfg: Mapping[str, Any], fmt: Any, pre: Mapping[str, Any], augment, stages: Sequence[str]
               ) -> dict[str, Any]:
    """``data.kind=shards``: a :class:`ShardStream` per stage and the dataset info, as the other data kinds'
    builders of :data:`zoo.data.datamodule.DATASET_KINDS` give them."""
    formats = (fmt,) if isinstance(fmt, str) else tuple(fmt)
    out: dict[str, Any] = {}
    want = list(stages)
    similarity = formats == ("similarity",)
    if similarity and "train" not in want:
        want = ["train", *want]  # the training identities are the model's classes
    sets = {}
    for stage in want:
        sets[stage] = _open_split(cfg, stage)
        where = f"data.{'urls' if stage == 'train' or not cfg.get('val_urls') else 'val_urls'} ({sets[stage].manifest_url})"
        _check_kind(sets[stage].kind, formats, where)
        if len(formats) > 1 and sets[stage].kind != "coco":
            raise ShardError(f"{where}: {sets[stage].kind} shards serve one kind of target, but the heads they feed "
                             f"need {list(formats)}: use COCO shards, or give some heads their own data")
    first = sets.get("train") or sets[want[0]]
    kinds = {s.kind for s in sets.values()}
    if len(kinds) > 1:
        raise ShardError(f"data.urls and data.val_urls hold different kinds of shards ({sorted(kinds)}): write both "
                         "splits from the same dataset kind")
    kind = first.kind
    extra = dict(cfg.get("extra") or {})
    names = extra.get("class_names") or None
    fmt_arg = formats[0] if isinstance(fmt, str) or len(formats) == 1 else formats
    single_label = isinstance(fmt_arg, str) and fmt_arg == "classification" and kind == "coco"
    seed = 0  # datamodule_from_config sets the run's seed on the training stream
    for stage in want:
        ss = sets[stage]
        aug = augment if stage == "train" else None
        if kind == "coco":
            sizes = extra.get("multiscale") if stage == "train" else None
            dec: Any = CocoShardDecoder(ss.manifest, fmt_arg, pre, augment=aug, train_sizes=sizes, name=ss.manifest_url)
        elif kind == "mask_folder":
            dec = MaskShardDecoder(ss.manifest, pre, augment=aug, class_names=names)
        else:
            dec = FolderShardDecoder(ss.manifest, pre, augment=aug)
        if stage in stages:
            out[stage] = ShardStream(ss, dec, shuffle=stage == "train", seed=seed,
                                     shuffle_buffer=int(cfg.get("shuffle_buffer") or 1000),
                                     skip_no_primary=single_label, limit=cfg.get(f"limit_{stage}_images"))
    out["root"] = str(first.urls[0] if len(first.urls) == 1 else _parent_url(first.urls[0]) or first.urls[0])
    out["shards_manifest"] = first.manifest_url
    if kind == "coco":
        out["class_names"] = list(first.manifest["class_names"])
        out["category_ids"] = list(first.manifest.get("category_ids") or [])
        for stage in stages:
            ann = sets[stage].annotations_file()
            if ann:
                out[f"{stage}_ann_file"] = ann
    elif kind == "mask_folder":
        out["class_names"] = list(names or first.manifest["class_names"])
        out["has_background"] = False
    elif kind == "identity_folder":
        out["train_identities"] = list(sets["train"].manifest["class_names"])
        if "val" in sets:
            out["test_identities"] = list(sets["val"].manifest["class_names"])
        out["class_names"] = out["train_identities"]
    else:
        out["class_names"] = list(first.manifest["class_names"])
    if "train" in stages and "val" in sets:
        tv = [sets[s].manifest["class_names"] for s in ("train", "val")]
        if kind in ("coco", "image_folder") and tv[0] != tv[1]:
            raise ShardError(f"the training shards ({sets['train'].manifest_url}) and the validation shards "
                             f"({sets['val'].manifest_url}) have different classes ({tv[0][:5]}... vs {tv[1][:5]}...):"
                             " write both splits of one dataset")
    return out


# ====================================================================================================== CLI
def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m zoo.data.shards",
                                 description="Write datasets as WebDataset shards with a manifest, and check them")
    sub = ap.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("write", help="write one split of a dataset as shards")
    w.add_argument("--kind", required=True, choices=SHARD_KINDS)
    w.add_argument("--root", help="the dataset folder (shapes: where to generate it; default the cache)")
    w.add_argument("--split", default="train")
    w.add_argument("--out", required=True, help="folder for the shards and manifest.json (one split per folder)")
    w.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    w.add_argument("--prefix", help="shard file name prefix (default: the split name)")
    w.add_argument("--on-bad", default="raise", choices=("raise", "skip"), help="coco: bad annotations")
    w.add_argument("--class-names", nargs="+", help="mask_folder: the class of each mask index")
    w.add_argument("--ann-file", help="coco: annotation json (default <root>/annotations/instances_<split>.json)")
    w.add_argument("--images", help="coco: image folder (default <root>/<split>)")
    w.add_argument("--overwrite", action="store_true", help="replace shards already in --out")
    w.add_argument("--num-train", type=int, default=1600, help="shapes: training images")
    w.add_argument("--num-val", type=int, default=400, help="shapes: validation images")
    w.add_argument("--image-size", type=int, default=128, help="shapes: image side (px)")
    c = sub.add_parser("check", help="verify the sha256 and sample counts of shards against their manifest")
    c.add_argument("folder")
    c.add_argument("--manifest", help="the manifest (default <folder>/manifest.json)")
    c.add_argument("--decode", action="store_true", help="also decode every image")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if a.cmd == "write":
            shapes = ({"num_train": a.num_train, "num_val": a.num_val, "image_size": a.image_size}
                      if a.kind == "shapes" else None)
            man = write_shards(a.kind, a.root, a.out, split=a.split, shard_size=a.shard_size, prefix=a.prefix,
                               on_bad=a.on_bad, class_names=a.class_names, overwrite=a.overwrite, shapes=shapes,
                               ann_file=a.ann_file, images=a.images)
            print(f"wrote {man['num_samples']} samples ({man['kind']}) in {man['num_shards']} shards to {a.out}: "
                  f"{a.out}/{man['shards'][0]['name']} ... {man['shards'][-1]['name']}, {MANIFEST}")
        else:
            rep = check_shards(a.folder, manifest=a.manifest, decode=a.decode)
            print(f"ok: {rep['shards']} shards, {rep['samples']} samples, {rep['bytes']} bytes match the manifest")
    except (ShardError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
