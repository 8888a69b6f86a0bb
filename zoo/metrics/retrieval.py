"""Nearest-neighbour search and retrieval metrics (Recall@k, mAP@R) for embeddings.

:func:`knn` ranks a gallery by cosine similarity with batched matrix products (CPU or GPU tensors), or with FAISS
when it is installed (``backend="faiss"``, or ``"auto"`` on CPU tensors). Only torch and numpy are imported at module
level: :mod:`zoo.similarity_index` uses this module on the serving path.
"""

from __future__ import annotations

import importlib.util
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["knn", "retrieval_metrics", "faiss_available", "BACKENDS"]

#: Valid ``backend`` values of :func:`knn` and :func:`retrieval_metrics`.
BACKENDS = ("auto", "torch", "faiss")


def faiss_available() -> bool:
    """Whether the ``faiss`` package can be imported."""
    return importlib.util.find_spec("faiss") is not None


def _check_pair(query: torch.Tensor, gallery: torch.Tensor) -> None:
    if query.dim() != 2 or gallery.dim() != 2:
        raise ValueError(f"query and gallery must be 2-D (N, D), got {tuple(query.shape)} and {tuple(gallery.shape)}")
    if query.shape[1] != gallery.shape[1]:
        raise ValueError(f"query dim {query.shape[1]} != gallery dim {gallery.shape[1]}; "
                         "embed both with the same model")
    if gallery.shape[0] == 0:
        raise ValueError("the gallery is empty")


def _resolve_backend(backend: str, device: torch.device) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not one of {list(BACKENDS)}")
    if backend == "faiss" and not faiss_available():
        raise ImportError("backend='faiss' needs the faiss package (`pip install faiss-cpu`); or use backend='torch'")
    if backend == "auto":
        return "faiss" if device.type == "cpu" and faiss_available() else "torch"
    return backend


class _Searcher:
    """Top-k by inner product over a fixed gallery; ``self_offset`` marks query row ``i`` as gallery item
    ``self_offset + i`` and excludes it from the results."""

    def __init__(self, gallery: torch.Tensor, backend: str, batch_size: int) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.gallery = gallery
        self.backend = backend
        self.batch_size = int(batch_size)
        self.index: Any = None
        if backend == "faiss":
            import faiss  # optional dependency, imported only when asked for

            g = np.ascontiguousarray(gallery.detach().float().cpu().numpy())
            self.index = faiss.IndexFlatIP(g.shape[1])
            self.index.add(g)

    def search(self, query: torch.Tensor, k: int, self_offset: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        if self.backend == "faiss":
            return self._search_faiss(query, k, self_offset)
        scores, indices = [], []
        g = self.gallery.to(query.device)
        for start in range(0, query.shape[0], self.batch_size):
            q = query[start:start + self.batch_size]
            sim = q @ g.T  # (b, G)
            if self_offset is not None:
                rows = torch.arange(q.shape[0], device=sim.device)
                sim[rows, rows + self_offset + start] = float("-inf")
            s, i = sim.topk(k, dim=1)
            scores.append(s)
            indices.append(i)
        return torch.cat(scores), torch.cat(indices)

    def _search_faiss(self, query: torch.Tensor, k: int, self_offset: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        q = np.ascontiguousarray(query.detach().float().cpu().numpy())
        extra = 1 if self_offset is not None else 0
        s, i = self.index.search(q, k + extra)
        if self_offset is not None:
            own = (np.arange(q.shape[0]) + self_offset)[:, None]
            keep = i != own
            keep[keep.sum(1) > k, -1] = False  # self not found among the k+1: drop the last one instead
            s = s[keep].reshape(q.shape[0], k)
            i = i[keep].reshape(q.shape[0], k)
        return (torch.from_numpy(s).to(query.device),
                torch.from_numpy(i.astype(np.int64)).to(query.device))


def knn(query: torch.Tensor, gallery: torch.Tensor, k: int, *, batch_size: int = 1024, exclude_self: bool = False,
        backend: str = "auto", normalize: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` most similar gallery items of every query by cosine similarity.

    Args:
        query: ``(Q, D)`` embeddings.
        gallery: ``(G, D)`` embeddings (same dtype family; moved to the query's device).
        k: neighbours per query, ``1 <= k <= G`` (``G - 1`` with ``exclude_self``).
        batch_size: queries per matrix product (memory ``batch_size x G``).
        exclude_self: the query set *is* the gallery (``Q == G``): never return item ``i`` for query ``i``.
        backend: ``"torch"`` (batched matmul, any device), ``"faiss"`` (exact ``IndexFlatIP`` on CPU) or ``"auto"``
            (FAISS for CPU tensors when installed, else torch).
        normalize: L2-normalise both sides first, so scores are cosine similarities; with ``False`` the scores are
            plain inner products.
    Returns: ``(scores, indices)``, both ``(Q, k)``, sorted by decreasing score; ``scores`` float32, ``indices``
        int64 gallery rows; on the query's device.
    """
    _check_pair(query, gallery)
    n_avail = gallery.shape[0] - (1 if exclude_self else 0)
    if exclude_self and query.shape[0] != gallery.shape[0]:
        raise ValueError(f"exclude_self=True means the queries are the gallery, but Q={query.shape[0]} != "
                         f"G={gallery.shape[0]}")
    if not 1 <= k <= n_avail:
        raise ValueError(f"k={k} must be in 1..{n_avail} (gallery size {gallery.shape[0]}"
                         f"{', minus the query itself' if exclude_self else ''})")
    q, g = query.float(), gallery.float().to(query.device)
    if normalize:
        q, g = F.normalize(q, dim=1), F.normalize(g, dim=1)
    searcher = _Searcher(g, _resolve_backend(backend, q.device), batch_size)
    with torch.no_grad():
        return searcher.search(q, int(k), 0 if exclude_self else None)


def retrieval_metrics(query: torch.Tensor, query_labels: torch.Tensor, gallery: torch.Tensor | None = None,
                      gallery_labels: torch.Tensor | None = None, *, ks: Sequence[int] = (1, 5, 10),
                      batch_size: int = 1024, backend: str = "auto") -> dict[str, float]:
    """Recall@k and mAP@R of a query set against a gallery, by cosine similarity.

    * ``R@k``: fraction of queries with at least one same-label item among their ``k`` nearest gallery items
      (``k`` larger than the gallery is clipped to its size).
    * ``mAP@R`` (Musgrave et al. 2020, "A Metric Learning Reality Check"): with ``R`` the number of same-label
      gallery items of a query, ``AP@R = (1/R) * sum_{i<=R} P(i) * rel(i)`` over the top ``R`` results, averaged.

    Queries whose label has no item in the gallery can never be answered and are left out of every metric.

    Args:
        query: ``(Q, D)`` embeddings.
        query_labels: ``(Q,)`` integer labels.
        gallery: ``(G, D)`` embeddings; ``None`` for leave-one-out on the query set (each query is searched in
            the other queries, itself excluded).
        gallery_labels: ``(G,)`` integer labels (required with ``gallery``).
        ks: the ``k`` of the recalls.
        batch_size: queries per matrix product.
        backend: see :func:`knn`.
    Returns: ``{"R@k": float for k in ks, "mAP@R": float}``.
    """
    if (gallery is None) != (gallery_labels is None):
        raise ValueError("give both gallery and gallery_labels, or neither (leave-one-out on the queries)")
    loo = gallery is None
    if loo:
        gallery, gallery_labels = query, query_labels
    assert gallery is not None and gallery_labels is not None
    _check_pair(query, gallery)
    if query_labels.shape != (query.shape[0],) or gallery_labels.shape != (gallery.shape[0],):
        raise ValueError(f"labels must be (N,) per embedding set: query {tuple(query.shape)} with labels "
                         f"{tuple(query_labels.shape)}, gallery {tuple(gallery.shape)} with labels "
                         f"{tuple(gallery_labels.shape)}")
    ks = sorted({int(k) for k in ks})
    if not ks or ks[0] < 1:
        raise ValueError(f"ks must hold positive integers, got {ks}")
    device = query.device
    q = F.normalize(query.float(), dim=1)
    g = F.normalize(gallery.float().to(device), dim=1)
    ql = query_labels.to(device).long()
    gl = gallery_labels.to(device).long()
    n_avail = g.shape[0] - (1 if loo else 0)
    if n_avail < 1:
        raise ValueError("leave-one-out retrieval needs at least 2 embeddings")

    # R per query: same-label gallery items (minus the query itself for leave-one-out).
    uniq, counts = torch.unique(gl, return_counts=True)
    pos = torch.searchsorted(uniq, ql).clamp(max=uniq.numel() - 1)
    r = torch.where(uniq[pos] == ql, counts[pos], torch.zeros_like(pos)) - (1 if loo else 0)
    valid = r > 0
    if not bool(valid.any()):
        raise ValueError("no query has a same-label item in the gallery; retrieval metrics are undefined")

    searcher = _Searcher(g, _resolve_backend(backend, device), batch_size)
    hits = {k: torch.zeros((), dtype=torch.float64, device=device) for k in ks}
    ap_sum = torch.zeros((), dtype=torch.float64, device=device)
    kmax = min(ks[-1], n_avail)
    # Chunks of queries bound the (chunk x K) neighbour lists; K grows with the largest R in the chunk.
    chunk = max(1, min(batch_size, 4096))
    with torch.no_grad():
        for start in range(0, q.shape[0], chunk):
            sl = slice(start, start + chunk)
            v = valid[sl]
            if not bool(v.any()):
                continue
            r_c = r[sl]
            k_c = int(min(max(kmax, int(r_c.max())), n_avail))
            _, idx = searcher.search(q[sl], k_c, start if loo else None)
            rel = (gl[idx] == ql[sl, None])[v]  # (n, k_c) relevance of the ranked results
            r_v = r_c[v]
            for k in ks:
                hits[k] += rel[:, :min(k, k_c)].any(dim=1).sum()
            ranks = torch.arange(1, k_c + 1, device=device)
            prec = rel.cumsum(dim=1).double() / ranks
            in_r = ranks[None, :] <= r_v[:, None]
            ap_sum += ((prec * rel * in_r).sum(dim=1) / r_v.double()).sum()
    n = float(valid.sum())
    out = {f"R@{k}": float(hits[k]) / n for k in ks}
    out["mAP@R"] = float(ap_sum) / n
    return out
