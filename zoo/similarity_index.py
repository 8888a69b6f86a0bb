"""A small exact embedding index: ids + L2-normalised embeddings, saved without pickle, searched with :func:`knn`.

File formats (chosen by the suffix):

* ``.npz``: ``embeddings`` float32 ``(N, D)``, ``ids`` unicode ``(N,)``, ``meta`` a JSON string, ``format`` a
  version string. Read with ``allow_pickle=False``.
* ``.safetensors``: tensor ``embeddings`` float32 ``(N, D)``; the header metadata holds ``ids`` and ``meta`` as JSON.

Only torch and numpy are imported at module level (safetensors lazily): this module is on the serving path.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from zoo.metrics.retrieval import knn

__all__ = ["EmbeddingIndex", "weights_digest", "check_index_model"]

FORMAT = "zoo.embedding_index/1"


def weights_digest(model: torch.nn.Module) -> str:
    """Hex sha256 of a model's state dict (names, dtypes, shapes and values, in name order): the same for a
    checkpoint and the bundle exported from it, different for any other weights."""
    import hashlib

    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def check_index_model(meta: dict[str, Any], name: str, digest: str | None) -> None:
    """Refuse a query model other than the one that built an index (``meta["model"]``, ``meta["weights_sha256"]``):
    a :class:`ValueError` naming both. An index without a recorded digest, or a query without one, is not checked."""
    built = meta.get("weights_sha256")
    if built and digest and built != digest:
        built_name = meta.get("model") or "another model"
        raise ValueError(f"this index was built with {built_name!r} (weights sha256 {built[:12]}...) but the query "
                         f"model {name!r} has other weights ({digest[:12]}...): their embeddings are not "
                         f"comparable. Search with --model {built_name}, or rebuild the index with "
                         f"zoo-embed --model {name}")


def query_matrix(query: Any, dim: int, k: int) -> torch.Tensor:
    """``(Q, dim)`` queries from ``(Q, dim)`` or ``(dim,)`` embeddings; a clear error for another shape or ``k < 1``."""
    q = torch.as_tensor(query)
    if q.dim() == 1:
        q = q[None]
    if q.dim() != 2 or q.shape[1] != dim:
        raise ValueError(f"query must be (Q, {dim}) or ({dim},) for this index, got {tuple(q.shape)}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    return q


class EmbeddingIndex:
    """Embeddings with string ids and free-form metadata (model name, embedding dim, preprocessing, ...).

    Embeddings are stored L2-normalised as float32, so search scores are cosine similarities.

    Args:
        embeddings: ``(N, D)`` embeddings (``N`` may be 0 with a known ``D``).
        ids: ``N`` string ids, one per row.
        meta: JSON-able metadata.
        device: where the embeddings live for search (default: CPU).
    """

    def __init__(self, embeddings: torch.Tensor, ids: Sequence[str], meta: dict[str, Any] | None = None, *,
                 device: str | torch.device = "cpu") -> None:
        emb = torch.as_tensor(embeddings)
        ids = [str(i) for i in ids]
        if emb.dim() != 2:
            raise ValueError(f"embeddings must be (N, D), got shape {tuple(emb.shape)}")
        if emb.shape[0] != len(ids):
            raise ValueError(f"{emb.shape[0]} embeddings but {len(ids)} ids; give exactly one id per row")
        if not emb.dtype.is_floating_point:
            raise TypeError(f"embeddings must be floating point, got {emb.dtype}")
        if emb.numel() and not bool(torch.isfinite(emb).all()):
            raise ValueError("embeddings hold NaN or inf values")
        meta = dict(meta or {})
        try:
            json.dumps(meta)
        except (TypeError, ValueError) as err:
            raise TypeError(f"meta must be JSON-serialisable: {err}") from err
        self.embeddings = F.normalize(emb.detach().float(), dim=1).to(device)
        self.ids: list[str] = ids
        self.meta: dict[str, Any] = meta

    @property
    def dim(self) -> int:
        """Embedding dimension ``D``."""
        return int(self.embeddings.shape[1])

    def __len__(self) -> int:
        return int(self.embeddings.shape[0])

    def __repr__(self) -> str:
        return f"EmbeddingIndex(n={len(self)}, dim={self.dim}, device={self.embeddings.device})"

    def to(self, device: str | torch.device) -> "EmbeddingIndex":
        """Move the embeddings (in place) and return ``self``."""
        self.embeddings = self.embeddings.to(device)
        return self

    def add(self, embeddings: torch.Tensor, ids: Sequence[str]) -> None:
        """Append rows. Args: embeddings ``(M, D)``; ids, ``M`` string ids."""
        other = EmbeddingIndex(embeddings, ids, device=self.embeddings.device)
        if other.dim != self.dim:
            raise ValueError(f"cannot add {other.dim}-d embeddings to a {self.dim}-d index")
        self.embeddings = torch.cat([self.embeddings, other.embeddings])
        self.ids.extend(other.ids)

    def check_model(self, name: str, digest: str | None) -> None:
        """Refuse to search with a model other than the one that built the index (``meta["model"]`` and
        ``meta["weights_sha256"]``, written by ``zoo-embed``): another model's embeddings live in another space,
        and the nearest neighbours would be meaningless. An index without a recorded digest is not checked."""
        check_index_model(self.meta, name, digest)

    def to_faiss(self, kind: str = "ivf", **options: Any):
        """An approximate FAISS index over these embeddings (:class:`zoo.faiss_index.FaissIndex`: ``flat``, ``ivf``,
        ``ivfpq``, ``hnsw``; options ``nlist``, ``m``, ``nbits``, ``nprobe``, ``hnsw_m``, ``ef_construction``,
        ``ef_search``, ``train_size``, ``seed``, ``threads``). Needs the faiss package."""
        from zoo.faiss_index import FaissIndex

        return FaissIndex.build(self, kind, **options)

    def search(self, query: torch.Tensor, k: int = 10, *, batch_size: int = 1024,
               backend: str = "torch") -> list[list[tuple[str, float]]]:
        """The ``k`` most similar items of each query.

        Args:
            query: ``(Q, D)`` or ``(D,)`` embeddings (normalised here).
            k: results per query; clipped to the index size.
            batch_size: queries per matrix product.
            backend: see :func:`zoo.metrics.retrieval.knn`.
        Returns: per query, ``k`` ``(id, cosine similarity)`` pairs by decreasing similarity.
        """
        q = query_matrix(query, self.dim, k)
        if len(self) == 0:
            return [[] for _ in range(q.shape[0])]
        # the stored embeddings are unit vectors already: normalise the queries only (no gallery pass per search)
        q = F.normalize(q.to(self.embeddings.device).float(), dim=1)
        scores, indices = knn(q, self.embeddings, min(int(k), len(self)), batch_size=batch_size, backend=backend,
                              normalize=False)
        return [[(self.ids[j], float(s)) for s, j in zip(srow, irow)]
                for srow, irow in zip(scores.cpu().tolist(), indices.cpu().tolist())]

    # ------------------------------------------------------------------ files
    def save(self, path: str | os.PathLike) -> Path:
        """Write to ``.npz`` or ``.safetensors`` (by suffix). Returns: the path written."""
        path = Path(path)
        emb = self.embeddings.detach().float().cpu().contiguous()
        meta_json = json.dumps(self.meta)
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix == ".npz":
            ids = np.array(self.ids, dtype=np.str_) if self.ids else np.zeros((0,), dtype="<U1")
            with open(path, "wb") as fh:
                np.savez(fh, embeddings=emb.numpy(), ids=ids, meta=np.array(meta_json), format=np.array(FORMAT))
        elif path.suffix == ".safetensors":
            from safetensors.torch import save_file

            save_file({"embeddings": emb}, str(path),
                      metadata={"format": FORMAT, "ids": json.dumps(self.ids), "meta": meta_json})
        else:
            raise ValueError(f"unsupported index file {path.name!r}: use a .npz or .safetensors suffix")
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, *, expected_dim: int | None = None,
             device: str | torch.device = "cpu") -> "EmbeddingIndex":
        """Read a file written by :meth:`save`; nothing is unpickled.

        Args:
            path: a ``.npz`` or ``.safetensors`` file.
            expected_dim: refuse the file unless its embeddings have this dimension (e.g. the model's
                ``embedding_dim``).
            device: where to put the embeddings.
        Returns: the index.
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no index file at {path}")
        if path.suffix == ".npz":
            try:
                with np.load(path, allow_pickle=False) as data:
                    missing = {"embeddings", "ids", "meta"} - set(data.files)
                    if missing:
                        raise ValueError(f"{path} is not an embedding index: missing arrays {sorted(missing)} "
                                         f"(found {sorted(data.files)})")
                    emb_np, ids_np, meta_json = data["embeddings"], data["ids"], str(data["meta"])
            except ValueError as err:
                if "pickle" in str(err).lower():
                    raise ValueError(f"{path} holds pickled object arrays; refusing to load it") from err
                raise
            if ids_np.ndim != 1:
                raise ValueError(f"{path}: ids must be 1-D, got shape {ids_np.shape}")
            ids = [str(i) for i in ids_np.tolist()]
            emb = torch.from_numpy(np.asarray(emb_np))
        elif path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as fh:
                header = fh.metadata() or {}
                if "embeddings" not in fh.keys() or "ids" not in header:
                    raise ValueError(f"{path} is not an embedding index: needs tensor 'embeddings' and metadata "
                                     f"'ids' (found tensors {list(fh.keys())}, metadata {sorted(header)})")
                emb = fh.get_tensor("embeddings")
            ids = json.loads(header["ids"])
            meta_json = header.get("meta", "{}")
        else:
            raise ValueError(f"unsupported index file {path.name!r}: use a .npz or .safetensors suffix")
        if emb.dim() != 2:
            raise ValueError(f"{path}: embeddings must be (N, D), got shape {tuple(emb.shape)}")
        if not isinstance(ids, list) or len(ids) != emb.shape[0]:
            n_ids = len(ids) if isinstance(ids, list) else type(ids).__name__
            raise ValueError(f"{path}: {emb.shape[0]} embedding rows but {n_ids} ids; the file is corrupt or was "
                             f"not written by EmbeddingIndex.save")
        if expected_dim is not None and emb.shape[1] != expected_dim:
            raise ValueError(f"{path}: embeddings are {emb.shape[1]}-d but {expected_dim}-d were expected; "
                             f"rebuild the index with the current model")
        meta = json.loads(meta_json)
        if not isinstance(meta, dict):
            raise ValueError(f"{path}: meta must be a JSON object, got {type(meta).__name__}")
        return cls(emb.float(), ids, meta, device=device)
