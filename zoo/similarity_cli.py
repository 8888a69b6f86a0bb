"""Embed and search: the serving side of visual similarity, from Python and the command line.

    zoo-embed --model <name|bundle|ckpt> --images photos/ --out embeddings.npz
    zoo-embed --model <name|bundle|ckpt> --shards shards/train --out embeddings.npz
    torchrun --nproc_per_node 4 -m zoo.similarity_cli --model ... --shards ... --out embeddings.npz
    zoo-embed --merge embeddings.part-*-of-4.npz --out embeddings.npz
    zoo-search --model <name|bundle|ckpt> --index embeddings.npz --query q.jpg --k 10

Only the lean serving dependencies are imported (torch, timm, numpy, pillow, safetensors); ``--shards`` needs the
``shards`` extra (webdataset).

Shards (:func:`embed_shards`): under a launcher that sets ``RANK`` / ``WORLD_SIZE`` (torchrun) each process embeds
its own contiguous part of the shards' samples (in manifest order, cut at sample level) and writes
``<out stem>.part-<rank>-of-<world><suffix>``; ids are the source file names recorded in the shards. A process
writes its embeddings in chunks (``...part-<rank>-of-<world>.chunk-<n>.npz``) as it goes: run again after a kill,
it keeps the chunks, skips their samples and continues; a finished part is kept and skipped. With
``torch.distributed`` rendezvous variables (``MASTER_ADDR``, as torchrun sets) rank 0 waits for the others and
merges the parts into ``--out``, the same index one process writes (same ids in the same order, the same vectors
up to float rounding); otherwise merge them with ``zoo-embed --merge``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Iterable, Sequence

import torch

from zoo.similarity_index import EmbeddingIndex, weights_digest

__all__ = ["embed_images", "embed_shards", "merge_parts", "part_path", "search_images", "embed_main", "search_main",
           "collect_images"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def collect_images(sources: Sequence[str | Path]) -> list[Path]:
    """Image files from folders (recursively, sorted), list files (``.txt``: one path per line) and file paths."""
    out: list[Path] = []
    for s in sources:
        p = Path(s)
        if p.is_dir():
            out += sorted(q for q in p.rglob("*") if q.suffix.lower() in IMAGE_EXTENSIONS and q.is_file())
        elif p.suffix.lower() == ".txt" and p.is_file():
            out += [Path(line.strip()) for line in p.read_text().splitlines() if line.strip()]
        elif p.is_file():
            out.append(p)
        else:
            raise FileNotFoundError(f"{p} is neither an image file, a folder nor a .txt list of images")
    if not out:
        raise ValueError(f"no images found in {list(map(str, sources))}")
    return out


def _embedding_head(predictor) -> str:
    heads = [n for n, k in predictor.kinds.items() if k == "embedding"]
    if not heads:
        raise ValueError(f"the model has no embedding head (its heads: {predictor.kinds}); train model=similarity")
    return heads[0]


def _model_name(model, predictor) -> str:
    """What the index records as its model: the reference given (a registered name, or a path made absolute), or
    for a model object the bundle it was loaded from."""
    if isinstance(model, (str, os.PathLike)):
        ref = os.fspath(model)
        return str(Path(ref).expanduser().resolve()) if Path(ref).expanduser().exists() else ref
    path = getattr(predictor.model, "bundle_path", None)
    return str(path) if path else str(predictor.meta.get("name") or "")


def _vectors(predictor, head: str, images: Iterable, progress: bool = True) -> torch.Tensor:
    items = list(images)
    bs = predictor.batch_size
    rng = range(0, len(items), bs)
    if progress:
        try:
            from tqdm.auto import tqdm

            rng = tqdm(rng, total=len(rng), unit="batch", desc="embed")
        except ImportError:
            pass
    vecs = []
    for i in rng:
        res = predictor(items[i:i + bs])
        vecs += [(r[head] if isinstance(r, dict) else r).vector for r in res]
    return torch.stack([torch.as_tensor(v, dtype=torch.float32) for v in vecs])


def embed_images(model, images: Sequence[str | Path], *, batch_size: int = 32, device: str = "cpu",
                 progress: bool = True, relative_to: str | Path | None = None) -> EmbeddingIndex:
    """Embeddings of image files as an :class:`EmbeddingIndex` whose ids are the file paths (relative to
    ``relative_to`` when given)."""
    from zoo.predictor import Predictor

    pred = Predictor(model, device=device, batch_size=batch_size)
    head = _embedding_head(pred)
    paths = [Path(p) for p in images]
    emb = _vectors(pred, head, [str(p) for p in paths], progress)
    ids = [str(p.relative_to(relative_to)) if relative_to else str(p) for p in paths]
    meta = {"model": _model_name(model, pred), "weights_sha256": weights_digest(pred.model), "head": head,
            "dim": int(emb.shape[1])}
    return EmbeddingIndex(emb, ids, meta)


def part_path(out: str | Path, rank: int, world: int) -> Path:
    """``<out stem>.part-<rank>-of-<world><suffix>``: one process's part of a distributed embedding."""
    out = Path(out)
    return out.with_name(f"{out.stem}.part-{int(rank)}-of-{int(world)}{out.suffix}")


def _chunk_path(part: Path, n: int) -> Path:
    return part.with_name(f"{part.stem}.chunk-{n:06d}.npz")


def _save_atomic(index: EmbeddingIndex, path: Path) -> Path:
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")
    index.save(tmp)
    os.replace(tmp, path)
    return path


def _same_job(meta: dict, want: dict, what: Path) -> None:
    for key in ("weights_sha256", "shards", "part"):
        if meta.get(key) != want.get(key):
            raise ValueError(f"{what} was written by another job ({key} {str(meta.get(key))[:60]!r} differs from this "
                             f"run's {str(want.get(key))[:60]!r}): delete it (and its chunks), or write to another --out")


def embed_shards(model, urls, out: str | Path, *, manifest: str | None = None, rank: int | None = None,
                 world_size: int | None = None, batch_size: int = 32, device: str = "cpu", chunk_size: int = 512,
                 progress: bool = True) -> Path:
    """Embed this process's part of the samples of shards (written by ``python -m zoo.data.shards write``).

    Args:
        model: a registered name, bundle, ``model.json`` or checkpoint (anything :class:`zoo.Predictor` takes).
        urls: the shards: a folder holding ``manifest.json``, urls / brace lists (see :func:`zoo.data.shards.open_shards`).
        out: the index file (``.npz`` / ``.safetensors``); with several processes each writes :func:`part_path`.
        manifest: the manifest, when it is not beside the shards.
        rank, world_size: this process's part (default: ``RANK`` / ``WORLD_SIZE``, else one process).
        chunk_size: embeddings per chunk file written while the part is in progress (what a rerun keeps).

    Returns:
        The file written: ``out`` with one process, else this process's part.
    """
    try:
        from zoo.data.shards import RawDecoder, ShardStream, open_shards
    except ImportError as err:  # pragma: no cover - the shards extra
        raise ImportError(f"--shards needs webdataset ({err}): pip install 'zoo[shards]'") from err
    from zoo.predictor import Predictor

    rank = int(os.environ.get("RANK", 0)) if rank is None else int(rank)
    world = int(os.environ.get("WORLD_SIZE", 1)) if world_size is None else int(world_size)
    out = Path(out)
    target = out if world == 1 else part_path(out, rank, world)
    shards = open_shards(urls, manifest, what="--shards")
    stream = ShardStream(shards, RawDecoder(), shuffle=False, rank=rank, world_size=world)
    pred = Predictor(model, device=device, batch_size=batch_size)
    head = _embedding_head(pred)
    job = {"model": _model_name(model, pred), "weights_sha256": weights_digest(pred.model), "head": head,
           "shards": {"manifest": shards.manifest_url, "urls": shards.urls, "num_samples": stream.num_samples}}
    if world > 1:
        job["part"] = [rank, world]
    if target.is_file():
        done = EmbeddingIndex.load(target)
        _same_job(done.meta, job, target)
        if len(done) == len(stream):
            print(f"{target}: part already done ({len(done)} embeddings), skipped", flush=True)
            return target
        raise ValueError(f"{target} holds {len(done)} embeddings but this part has {len(stream)} samples: delete it")
    chunks: list[Path] = []
    while _chunk_path(target, len(chunks)).is_file():
        chunks.append(_chunk_path(target, len(chunks)))
    have = 0
    for c in chunks:
        ix = EmbeddingIndex.load(c)
        _same_job(ix.meta, job, c)
        have += len(ix)
    if have:
        print(f"{target}: continuing after {have} embeddings in {len(chunks)} chunk(s)", flush=True)
        stream.load_state_dict({"epoch": 0, "consumed": have})
    total = len(stream)
    ids: list[str] = []
    blobs: list[bytes] = []
    bar = None
    if progress:
        try:
            from tqdm.auto import tqdm

            bar = tqdm(total=total, initial=have, unit="img", desc=f"embed part {rank}/{world}")
        except ImportError:
            bar = None

    def flush() -> None:
        if not blobs:
            return
        emb = _vectors(pred, head, blobs, progress=False)
        _save_atomic(EmbeddingIndex(emb, ids, {**job, "dim": int(emb.shape[1])}), _chunk_path(target, len(chunks)))
        chunks.append(_chunk_path(target, len(chunks)))
        if bar is not None:
            bar.update(len(blobs))
        ids.clear()
        blobs.clear()

    for sample in stream:
        ids.append(sample["id"])
        blobs.append(sample["image"])
        if len(blobs) >= int(chunk_size):
            flush()
    flush()
    if bar is not None:
        bar.close()
    parts = [EmbeddingIndex.load(c) for c in chunks]
    if parts:
        emb = torch.cat([p.embeddings for p in parts])
        all_ids = [i for p in parts for i in p.ids]
        dim = parts[0].dim
    else:  # an empty part (more processes than samples)
        dim = int(_vectors(pred, head, [_first_image(shards)], progress=False).shape[1])
        emb, all_ids = torch.zeros((0, dim)), []
    if len(all_ids) != total:
        raise RuntimeError(f"{target}: {len(all_ids)} embeddings for {total} samples; delete its chunks and run again")
    meta = {**job, "dim": int(dim)}
    _save_atomic(EmbeddingIndex(emb, all_ids, meta), target)
    for c in chunks:
        c.unlink()
    return target


def _first_image(shards) -> bytes:
    """The encoded first image of a shard set (to learn the embedding dimension of an empty part)."""
    from zoo.data.shards import RawDecoder, ShardStream

    return next(iter(ShardStream(shards, RawDecoder(), limit=1, rank=0, world_size=1)))["image"]


def merge_parts(parts: Sequence[str | Path], out: str | Path) -> Path:
    """One index from the parts of a distributed :func:`embed_shards` (all of them, any order): rows in rank order,
    which is the order one process gives. Parts of different models or shards, missing or repeated parts, and
    repeated ids are refused."""
    loaded = [(Path(p), EmbeddingIndex.load(p)) for p in parts]
    if not loaded:
        raise ValueError("--merge needs the part files (<out stem>.part-<rank>-of-<world>.npz)")
    worlds = {tuple(ix.meta.get("part") or ())[1:] for _, ix in loaded}
    if any(not w for w in worlds) or len(worlds) != 1:
        raise ValueError(f"{[str(p) for p, _ in loaded]}: not parts of one zoo-embed --shards run (each part records "
                         "[rank, world] in its meta)")
    (world,) = next(iter(worlds))
    ranks = sorted(ix.meta["part"][0] for _, ix in loaded)
    if ranks != list(range(world)):
        missing = sorted(set(range(world)) - set(ranks))
        raise ValueError(f"merge needs the {world} parts 0..{world - 1} exactly once, got ranks {ranks}"
                         + (f" (missing: {', '.join(str(part_path(out, r, world)) for r in missing)})" if missing else ""))
    loaded.sort(key=lambda t: t[1].meta["part"][0])
    ref = loaded[0][1].meta
    for p, ix in loaded[1:]:
        for key in ("weights_sha256", "shards", "dim"):
            if ix.meta.get(key) != ref.get(key):
                raise ValueError(f"{p} was embedded with another {key} than {loaded[0][0]}: merge parts of one run")
    ids = [i for _, ix in loaded for i in ix.ids]
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})[:5]
        raise ValueError(f"the parts repeat ids {dup}: they overlap (not parts of one run?)")
    meta = {k: v for k, v in ref.items() if k != "part"}
    index = EmbeddingIndex(torch.cat([ix.embeddings for _, ix in loaded]), ids, meta)
    return _save_atomic(index, Path(out))


def _sync_and_merge(out: Path, rank: int, world: int) -> Path | None:
    """After every process wrote its part: rank 0 merges them into ``out`` (a gloo barrier when the rendezvous
    variables are set, else only when every part is already there)."""
    parts = [part_path(out, r, world) for r in range(world)]
    if os.environ.get("MASTER_ADDR") and os.environ.get("MASTER_PORT"):
        import torch.distributed as dist

        own = not dist.is_initialized()
        if own:
            dist.init_process_group("gloo", rank=rank, world_size=world)
        try:
            dist.barrier()
        finally:
            if own:
                dist.destroy_process_group()
    if rank != 0:
        return None
    if not all(p.is_file() for p in parts):
        print(f"part {part_path(out, rank, world)} written; when every part is done merge them with: zoo-embed "
              f"--merge {' '.join(map(str, parts))} --out {out}", flush=True)
        return None
    return merge_parts(parts, out)


def search_images(model, index: EmbeddingIndex | str | Path, queries: Sequence, *, k: int = 10,
                  device: str = "cpu") -> list[list[tuple[str, float]]]:
    """Top-``k`` neighbours ``(id, cosine similarity)`` in ``index`` of each query image; an index built by another
    model (its recorded weights digest differs) is refused (:meth:`EmbeddingIndex.check_model`)."""
    from zoo.predictor import Predictor

    pred = Predictor(model, device=device)
    head = _embedding_head(pred)
    if not isinstance(index, EmbeddingIndex):
        index = EmbeddingIndex.load(index)
    index.check_model(_model_name(model, pred), weights_digest(pred.model))
    q = _vectors(pred, head, list(queries), progress=False)
    if q.shape[1] != index.dim:
        raise ValueError(f"the model embeds in {q.shape[1]} dimensions but the index holds {index.dim}: "
                         "search with the model that built the index")
    return index.search(q, k=k)


def embed_main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="zoo-embed", description="Embed images into an embeddings file (.npz or .safetensors)")
    ap.add_argument("--model", "--ckpt", dest="model",
                    help="registered name, bundle folder, model.json, URL or Lightning .ckpt (not with --merge)")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--images", nargs="+", help="folders, image files or .txt lists")
    src.add_argument("--shards", nargs="+", help="WebDataset shards written by python -m zoo.data.shards write: their "
                     "folder, or urls / brace lists (train-{000000..000009}.tar); under torchrun each process embeds "
                     "its part")
    src.add_argument("--merge", nargs="+", metavar="PART", help="merge the parts of a distributed --shards run")
    ap.add_argument("--manifest", help="--shards: the manifest, when it is not beside the shards")
    ap.add_argument("--chunk-size", type=int, default=512, help="--shards: embeddings per resumable chunk file")
    ap.add_argument("--out", required=True, help="output file: .npz or .safetensors")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--no-progress", action="store_true")
    a = ap.parse_args(argv)
    if a.merge:
        out = merge_parts(a.merge, a.out)
        index = EmbeddingIndex.load(out)
        print(f"merged {len(a.merge)} parts: {len(index)} embeddings of dimension {index.dim} in {out}")
        return 0
    if a.model is None:
        ap.error("--model is required with --images / --shards")
    if a.shards:
        rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
        written = embed_shards(a.model, a.shards, a.out, manifest=a.manifest, rank=rank, world_size=world,
                               batch_size=a.batch_size, device=a.device, chunk_size=a.chunk_size,
                               progress=not a.no_progress)
        if world > 1:
            merged = _sync_and_merge(Path(a.out), rank, world)
            if merged is not None:
                index = EmbeddingIndex.load(merged)
                print(f"merged {world} parts: {len(index)} embeddings of dimension {index.dim} in {merged}")
        else:
            index = EmbeddingIndex.load(written)
            print(f"wrote {len(index)} embeddings of dimension {index.dim} to {written}")
        return 0
    paths = collect_images(a.images)
    index = embed_images(a.model, paths, batch_size=a.batch_size, device=a.device, progress=not a.no_progress)
    out = index.save(a.out)
    print(f"wrote {len(index)} embeddings of dimension {index.dim} to {out}")
    return 0


def search_main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="zoo-search", description="Nearest neighbours of query images in an embeddings file")
    ap.add_argument("--model", "--ckpt", dest="model", required=True)
    ap.add_argument("--index", required=True, help="embeddings file written by zoo-embed")
    ap.add_argument("--query", nargs="+", required=True, help="query images, folders or .txt lists")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", action="store_true", help="print JSON instead of a table")
    a = ap.parse_args(argv)
    queries = collect_images(a.query)
    hits = search_images(a.model, a.index, [str(q) for q in queries], k=a.k, device=a.device)
    if a.json:
        print(json.dumps({str(q): [{"id": i, "score": s} for i, s in h] for q, h in zip(queries, hits)}, indent=2))
    else:
        for q, h in zip(queries, hits):
            print(q)
            for rank, (i, s) in enumerate(h, 1):
                print(f"  {rank:>3}  {s:.4f}  {i}")
    return 0


if __name__ == "__main__":
    sys.exit(embed_main())
