"""Embed and search: the serving side of visual similarity, from Python and the command line.

    zoo-embed --model <name|bundle|ckpt> --images photos/ --out embeddings.npz
    zoo-search --model <name|bundle|ckpt> --index embeddings.npz --query q.jpg --k 10

Only the lean serving dependencies are imported (torch, timm, numpy, pillow, safetensors).
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

__all__ = ["embed_images", "search_images", "embed_main", "search_main", "collect_images"]

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
    ap.add_argument("--model", "--ckpt", dest="model", required=True,
                    help="registered name, bundle folder, model.json, URL or Lightning .ckpt")
    ap.add_argument("--images", nargs="+", required=True, help="folders, image files or .txt lists")
    ap.add_argument("--out", required=True, help="output file: .npz or .safetensors")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--no-progress", action="store_true")
    a = ap.parse_args(argv)
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
