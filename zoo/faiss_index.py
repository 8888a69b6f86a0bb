"""Approximate nearest-neighbour search with FAISS over zoo embeddings: exact ``flat``, ``ivf`` (inverted lists of
full vectors), ``ivfpq`` (inverted lists of product-quantised codes: ``m`` bytes a vector at ``nbits=8``) and
``hnsw`` (a navigable small-world graph over full vectors). Every index ranks by inner product on L2-normalised
vectors, i.e. by cosine similarity, like :class:`zoo.similarity_index.EmbeddingIndex`.

Built from an :class:`~zoo.similarity_index.EmbeddingIndex` (``index.to_faiss("ivfpq")``) or from embedding part
files (``.npz`` / ``.safetensors`` written by ``EmbeddingIndex.save``, e.g. one per embedding job):
``FaissIndex.build(["part0.npz", "part1.npz"], "ivf")``. IVF and PQ are trained on a sample drawn from every part,
then the parts are added one at a time, so the embeddings never have to be in memory twice.

Saved as two files: ``<name>.faiss`` (``faiss.write_index``) and ``<name>.faiss.json``, the sidecar: format version,
index type, parameters, dimension, metric, ids (row order), the model name and weights digest of the embeddings and
their metadata. :func:`load_index` opens either kind of index from its path. As with the exact index, an index answers
only queries embedded by the model that built it (:meth:`FaissIndex.check_model`).

faiss is imported when an index is built or loaded, never at import: it stays an optional dependency (``pip install
faiss-cpu``; the ``dev`` extra has it) and off the serving path.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["FaissIndex", "INDEX_TYPES", "FORMAT", "default_params", "load_index", "index_files", "iter_part_files",
           "main"]

FORMAT = "zoo.faiss_index/1"
#: Values of ``kind``.
INDEX_TYPES = ("flat", "ivf", "ivfpq", "hnsw")
#: Parameters each kind takes (build: nlist, m, nbits, hnsw_m, ef_construction; search: nprobe, ef_search).
PARAMS = {"flat": (), "ivf": ("nlist", "nprobe"), "ivfpq": ("nlist", "m", "nbits", "nprobe"),
          "hnsw": ("hnsw_m", "ef_construction", "ef_search")}


def _faiss():
    try:
        import faiss
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("FAISS indexes need the faiss package: pip install faiss-cpu (or faiss-gpu); the exact "
                          "EmbeddingIndex needs nothing more") from err
    return faiss


@contextlib.contextmanager
def _omp_threads(faiss: Any, threads: int | None):
    """FAISS's OpenMP threads set to ``threads`` inside the block and put back after: the OpenMP setting is the
    process's, so leaving it changed would also change torch's intra-op threads (``torch.get_num_threads()``)."""
    if not threads:
        yield
        return
    prev = int(faiss.omp_get_max_threads())
    faiss.omp_set_num_threads(int(threads))
    try:
        yield
    finally:
        faiss.omp_set_num_threads(prev)


def _pow2_near(x: float) -> int:
    return 1 << max(0, int(round(math.log2(max(1.0, x)))))


def _pq_m(dim: int) -> int:
    """Sub-quantisers of the default PQ: ``dim / 4`` (4 dimensions, one byte each at 8 bits), or the largest divisor
    of ``dim`` not above it."""
    for m in range(max(1, dim // 4), 0, -1):
        if dim % m == 0:
            return m
    return 1


def default_params(kind: str, n: int, dim: int) -> dict[str, int]:
    """Parameters for ``n`` vectors of ``dim`` dimensions, scaled with ``n``:

    * ``ivf`` / ``ivfpq``: ``nlist`` the power of two nearest ``4 sqrt(n)`` (1,024 at 100k, 4,096 at 1M, 131,072 at
      1B), at most ``n / 39`` (FAISS's k-means wants 39 training points a centroid); ``nprobe`` = ``nlist / 64``
      between 8 and 256 (about 1.5% of the lists up to 16k lists; raise it for recall, lower it for speed).
    * ``ivfpq``: ``m = dim / 4`` sub-quantisers of ``nbits = 8`` (``m`` bytes a vector: 32 for 128-d), fewer bits
      when ``n`` is too small to train 256 centroids a sub-quantiser.
    * ``hnsw``: ``hnsw_m = 32`` links a node, ``ef_construction = 40``, ``ef_search = 64``.
    """
    if kind not in INDEX_TYPES:
        raise ValueError(f"FAISS index type {kind!r} unknown; use one of {', '.join(INDEX_TYPES)}")
    n = max(1, int(n))
    out: dict[str, int] = {}
    if kind in ("ivf", "ivfpq"):
        nlist = min(_pow2_near(4 * math.sqrt(n)), max(1, n // 39))
        out.update(nlist=nlist, nprobe=min(nlist, max(8, min(256, nlist // 64))))
    if kind == "ivfpq":
        out.update(m=_pq_m(dim), nbits=int(max(1, min(8, math.floor(math.log2(max(2, n // 39)))))))
    if kind == "hnsw":
        out.update(hnsw_m=32, ef_construction=40, ef_search=64)
    return out


def index_files(path: str | os.PathLike) -> tuple[Path, Path]:
    """``(<name>.faiss, <name>.faiss.json)`` for a path given with or without the ``.faiss`` suffix."""
    p = Path(path)
    if p.name.endswith(".faiss.json"):
        p = p.with_name(p.name[: -len(".json")])
    elif p.suffix != ".faiss":
        p = p.with_name(p.name + ".faiss")
    return p, p.with_name(p.name + ".json")


# ---------------------------------------------------------------------------------------------------- sources
def _as_parts(source: Any) -> list[Any]:
    """An EmbeddingIndex, a part file, or a sequence of either, as a list of parts."""
    if isinstance(source, (str, os.PathLike)):
        return [Path(source)]
    if isinstance(source, Sequence) and not isinstance(source, (str, bytes)):
        return [Path(s) if isinstance(s, (str, os.PathLike)) else s for s in source]
    return [source]


def _open(part: Any):
    from zoo.similarity_index import EmbeddingIndex

    if isinstance(part, EmbeddingIndex):
        return part
    if isinstance(part, Path):
        return EmbeddingIndex.load(part)
    raise TypeError(f"cannot build a FAISS index from {type(part).__name__}: give an EmbeddingIndex or the path of "
                    "an embedding part file (.npz / .safetensors written by EmbeddingIndex.save)")


def _label(part: Any) -> str:
    return str(part) if isinstance(part, Path) else repr(part)


def _vectors(index: Any) -> np.ndarray:
    """An EmbeddingIndex's (already L2-normalised) rows as a contiguous float32 array."""
    return np.ascontiguousarray(index.embeddings.detach().float().cpu().numpy())


class _Parts:
    """The parts of a build, opened one at a time (a file part is read when it is used), with their model checked
    alike: every part must come from the same model (name and weights digest) and have the same dimension."""

    def __init__(self, parts: list[Any]) -> None:
        if not parts:
            raise ValueError("no embeddings to index: give an EmbeddingIndex or at least one part file")
        self.parts = parts
        self.sizes: list[int] = []
        self.dim: int | None = None
        self.meta: dict[str, Any] = {}
        for p in parts:  # one pass for sizes, dimension and model (the files are read again when added)
            idx = _open(p)
            self._check(idx, p)
            self.sizes.append(len(idx))

    def _check(self, idx: Any, part: Any) -> None:
        if self.dim is None:
            self.dim, self.meta = idx.dim, dict(idx.meta)
            return
        if idx.dim != self.dim:
            raise ValueError(f"embedding part {_label(part)} is {idx.dim}-d but the first part is {self.dim}-d: parts "
                             "of one index must come from one model")
        a, b = self.meta.get("weights_sha256"), idx.meta.get("weights_sha256")
        if a and b and a != b:
            raise ValueError(f"embedding part {_label(part)} was made by {idx.meta.get('model') or 'another model'!r} "
                             f"(weights sha256 {b[:12]}...) but the first part by {self.meta.get('model')!r} "
                             f"({a[:12]}...): their embeddings are not comparable; embed every part with one model")

    def __iter__(self) -> Iterator[Any]:
        for p in self.parts:
            yield _open(p)

    @property
    def total(self) -> int:
        return int(sum(self.sizes))

    def sample(self, size: int, seed: int) -> np.ndarray:
        """About ``size`` rows drawn uniformly from all parts (each part in proportion to its rows)."""
        rng = np.random.default_rng(seed)
        total = self.total
        if size >= total:
            return np.concatenate([_vectors(idx) for idx in self])
        chosen = np.sort(rng.choice(total, size=size, replace=False))
        out, start = [], 0
        for idx, n in zip(self, self.sizes):
            rows = chosen[(chosen >= start) & (chosen < start + n)] - start
            if len(rows):
                out.append(_vectors(idx)[rows])
            start += n
        return np.ascontiguousarray(np.concatenate(out))


# ---------------------------------------------------------------------------------------------------- the index
class FaissIndex:
    """A FAISS index over L2-normalised embeddings with string ids and the metadata of the model that made them.

    Build with :meth:`build` (or ``EmbeddingIndex.to_faiss``), search with :meth:`search` (the same answer format as
    ``EmbeddingIndex.search``), write with :meth:`save`, read with :meth:`load` / :func:`load_index`.

    Attributes:
        index: the ``faiss.Index``.
        ids: one string id per row, in row order.
        kind: ``flat`` | ``ivf`` | ``ivfpq`` | ``hnsw``.
        params: the parameters it was built with (``nlist``, ``m``, ``nbits``, ``hnsw_m``, ``ef_construction``) and
            its default search parameters (``nprobe``, ``ef_search``).
        meta: the embeddings' metadata (``model``, ``weights_sha256``, ``head``, ...).
    """

    metric = "inner_product"

    def __init__(self, index: Any, ids: Sequence[str], *, kind: str, params: dict[str, Any],
                 meta: dict[str, Any] | None = None) -> None:
        if kind not in INDEX_TYPES:
            raise ValueError(f"FAISS index type {kind!r} unknown; use one of {', '.join(INDEX_TYPES)}")
        if int(index.ntotal) != len(ids):
            raise ValueError(f"the FAISS index holds {index.ntotal} vectors but {len(ids)} ids were given")
        self.index = index
        self.ids = [str(i) for i in ids]
        self.kind = kind
        self.params = dict(params)
        self.meta = dict(meta or {})

    # ------------------------------------------------------------------ facts
    @property
    def dim(self) -> int:
        return int(self.index.d)

    def __len__(self) -> int:
        return int(self.index.ntotal)

    def __repr__(self) -> str:
        shown = ", ".join(f"{k}={v}" for k, v in self.params.items())
        return f"FaissIndex({self.kind}, n={len(self)}, dim={self.dim}{', ' + shown if shown else ''})"

    def nbytes(self) -> int:
        """Size of the serialised FAISS index in bytes (what it takes in memory, give or take a little)."""
        faiss = _faiss()
        return int(faiss.serialize_index(self.index).nbytes)

    # ------------------------------------------------------------------ build
    @classmethod
    def build(cls, source: Any, kind: str = "ivf", *, nlist: int | None = None, m: int | None = None,
              nbits: int | None = None, nprobe: int | None = None, hnsw_m: int | None = None,
              ef_construction: int | None = None, ef_search: int | None = None, train_size: int | None = None,
              seed: int = 0, threads: int | None = None) -> "FaissIndex":
        """A FAISS index over the embeddings of ``source``.

        Args:
            source: an ``EmbeddingIndex``, the path of a part file written by ``EmbeddingIndex.save``, or a sequence
                of either (the parts' rows are concatenated in order; their ids must be unique).
            kind: ``flat`` (exact), ``ivf``, ``ivfpq`` or ``hnsw``.
            nlist: inverted lists (``ivf``, ``ivfpq``). m: PQ sub-quantisers, a divisor of the dimension; nbits:
                bits a sub-quantiser code (``ivfpq``). nprobe: lists scanned a query (default for :meth:`search`).
            hnsw_m: graph links a node; ef_construction: build-time candidate list; ef_search: search-time list.
            train_size: rows the IVF / PQ training sample draws from all parts (default: 40 a list and, for PQ,
                at least 64 a sub-quantiser centroid; at most every row).
            seed: of the training sample (and FAISS's k-means).
            threads: FAISS's OpenMP threads for the build (``None``: FAISS's default); the process's OpenMP
                setting, which torch's intra-op threads share, is put back afterwards.
            Parameters left ``None`` come from :func:`default_params` for the number of rows.
        """
        faiss = _faiss()
        if kind not in INDEX_TYPES:
            raise ValueError(f"FAISS index type {kind!r} unknown; use one of {', '.join(INDEX_TYPES)}")
        with _omp_threads(faiss, threads):
            parts = _Parts(_as_parts(source))
            n, dim = parts.total, int(parts.dim or 0)
            if n == 0:
                raise ValueError("no embeddings to index: every part is empty")
            given = {"nlist": nlist, "m": m, "nbits": nbits, "nprobe": nprobe, "hnsw_m": hnsw_m,
                     "ef_construction": ef_construction, "ef_search": ef_search}
            unused = [k for k, v in given.items() if v is not None and k not in PARAMS[kind]]
            if unused:
                raise ValueError(f"FAISS index type {kind!r} takes {', '.join(PARAMS[kind]) or 'no parameters'}, not "
                                 f"{', '.join(unused)}")
            params = default_params(kind, n, dim)
            params.update({k: int(v) for k, v in given.items() if v is not None and k in params})
            index = cls._new(faiss, kind, dim, params)
            if not index.is_trained:
                # 40 vectors a list (FAISS's k-means asks for 39) and, for PQ, 64 a sub-quantiser centroid
                need = params["nlist"] * 40
                if kind == "ivfpq":
                    need = max(need, (1 << params["nbits"]) * 64)
                size = min(n, int(train_size) if train_size else need)
                if size < params["nlist"]:
                    raise ValueError(f"nlist={params['nlist']} inverted lists need at least as many training vectors, "
                                     f"but {size} are available; lower nlist")
                sample = parts.sample(size, seed)
                index.train(sample)
                del sample
            ids: list[str] = []
            for idx in parts:
                if len(idx):
                    index.add(_vectors(idx))
                ids.extend(idx.ids)
            if len(set(ids)) != len(ids):
                seen: set[str] = set()
                dup = ""
                for i in ids:
                    if i in seen:
                        dup = i
                        break
                    seen.add(i)
                raise ValueError(f"id {dup!r} occurs in more than one row: the parts overlap (ids must be unique)")
            return cls(index, ids, kind=kind, params=params, meta=parts.meta)

    @staticmethod
    def _new(faiss: Any, kind: str, dim: int, p: dict[str, int]) -> Any:
        ip = faiss.METRIC_INNER_PRODUCT
        if kind == "flat":
            return faiss.IndexFlatIP(dim)
        if kind == "ivf":
            return faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, p["nlist"], ip)
        if kind == "ivfpq":
            if dim % p["m"]:
                raise ValueError(f"PQ m={p['m']} must divide the embedding dimension {dim}")
            index = faiss.IndexIVFPQ(faiss.IndexFlatIP(dim), dim, p["nlist"], p["m"], p["nbits"], ip)
            index.do_polysemous_training = False  # only for polysemous search, and ten times the training time
            index.pq.cp.max_points_per_centroid = 64
            return index
        index = faiss.IndexHNSWFlat(dim, p["hnsw_m"], ip)
        index.hnsw.efConstruction = p["ef_construction"]
        index.hnsw.efSearch = p["ef_search"]
        return index

    # ------------------------------------------------------------------ search
    def _search_params(self, nprobe: int | None, ef_search: int | None) -> Any:
        faiss = _faiss()
        if self.kind in ("ivf", "ivfpq"):
            return faiss.SearchParametersIVF(nprobe=int(nprobe or self.params["nprobe"]))
        if self.kind == "hnsw":
            return faiss.SearchParametersHNSW(efSearch=int(ef_search or self.params["ef_search"]))
        return None

    def search_arrays(self, query: Any, k: int = 10, *, nprobe: int | None = None,
                      ef_search: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``(scores, rows)``, both ``(Q, k)``: cosine similarities by decreasing score and row numbers (``-1``
        where fewer than ``k`` were found, as IVF can with a small ``nprobe``)."""
        from zoo.similarity_index import query_matrix

        q = query_matrix(query, self.dim, k)
        qn = np.ascontiguousarray(F.normalize(q.detach().float().cpu(), dim=1).numpy())
        k = min(int(k), len(self)) if len(self) else int(k)
        if len(self) == 0:
            return np.zeros((len(qn), 0), np.float32), np.zeros((len(qn), 0), np.int64)
        params = self._search_params(nprobe, ef_search)
        with _omp_threads(_faiss(), getattr(self, "threads", None)):
            scores, rows = self.index.search(qn, k, params=params) if params is not None else self.index.search(qn, k)
        return scores, rows

    def search(self, query: Any, k: int = 10, *, nprobe: int | None = None,
               ef_search: int | None = None) -> list[list[tuple[str, float]]]:
        """The ``k`` most similar items of each query, as ``EmbeddingIndex.search`` gives them.

        Args:
            query: ``(Q, D)`` or ``(D,)`` embeddings (normalised here).
            k: results per query; clipped to the index size (IVF may find fewer with a small ``nprobe``).
            nprobe: lists scanned (``ivf``, ``ivfpq``); ef_search: candidate list (``hnsw``). Default: the index's.
        Returns: per query, ``(id, cosine similarity)`` pairs by decreasing similarity.
        """
        scores, rows = self.search_arrays(query, k, nprobe=nprobe, ef_search=ef_search)
        return [[(self.ids[j], float(s)) for s, j in zip(srow, irow) if j >= 0]
                for srow, irow in zip(scores.tolist(), rows.tolist())]

    # ------------------------------------------------------------------ model check
    def check_model(self, name: str, digest: str | None) -> None:
        """Refuse queries from a model other than the one that made the indexed embeddings (see
        ``EmbeddingIndex.check_model``): a :class:`ValueError` naming both models."""
        from zoo.similarity_index import check_index_model

        check_index_model(self.meta, name, digest)

    # ------------------------------------------------------------------ files
    def sidecar(self) -> dict[str, Any]:
        return {"format": FORMAT, "index_type": self.kind, "params": self.params, "dim": self.dim,
                "count": len(self), "metric": self.metric, "normalized": True, "faiss_version": _faiss().__version__,
                "model": self.meta.get("model"), "weights_sha256": self.meta.get("weights_sha256"),
                "meta": self.meta, "ids": self.ids}

    def save(self, path: str | os.PathLike) -> Path:
        """Write ``<name>.faiss`` and its sidecar ``<name>.faiss.json`` (both through a temporary file).
        Returns: the ``.faiss`` path."""
        faiss = _faiss()
        index_path, side_path = index_files(path)
        index_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = index_path.with_name(f".{index_path.name}.tmp")
        faiss.write_index(self.index, str(tmp))
        os.replace(tmp, index_path)
        tmp_side = side_path.with_name(f".{side_path.name}.tmp")
        tmp_side.write_text(json.dumps(self.sidecar()))
        os.replace(tmp_side, side_path)
        return index_path

    @classmethod
    def load(cls, path: str | os.PathLike, *, model: str | None = None, digest: str | None = None,
             threads: int | None = None) -> "FaissIndex":
        """Read an index written by :meth:`save` (``path``: the ``.faiss`` file, its sidecar, or the name without
        suffix). With ``model`` and ``digest`` (the querying model's name and :func:`weights_digest`) a mismatch
        with the model that built the index raises at once. ``threads``: FAISS's OpenMP threads for this index's
        searches (set around each search and put back, so torch's threads are left as they were)."""
        faiss = _faiss()
        index_path, side_path = index_files(path)
        if not side_path.is_file():
            raise FileNotFoundError(f"no FAISS index sidecar at {side_path} (written beside {index_path.name} by "
                                    "FaissIndex.save)")
        side = json.loads(side_path.read_text())
        if not isinstance(side, dict) or side.get("format") != FORMAT:
            found = side.get("format") if isinstance(side, dict) else None
            raise ValueError(f"{side_path} is not a zoo FAISS index sidecar (format {found!r}, expected {FORMAT!r})")
        if not index_path.is_file():
            raise FileNotFoundError(f"{side_path} describes {index_path}, which does not exist")
        index = faiss.read_index(str(index_path))
        if int(index.d) != int(side["dim"]) or int(index.ntotal) != len(side["ids"]):
            raise ValueError(f"{index_path} holds {index.ntotal} vectors of {index.d} dimensions but its sidecar "
                             f"says {len(side['ids'])} of {side['dim']}: the two files do not belong together")
        out = cls(index, side["ids"], kind=side["index_type"], params=side.get("params") or {},
                  meta=side.get("meta") or {})
        out.threads = int(threads) if threads else None  # OpenMP threads of this index's searches
        if model is not None or digest is not None:
            out.check_model(model or "", digest)
        return out


def load_index(path: str | os.PathLike, *, device: str | torch.device = "cpu", **kwargs: Any) -> Any:
    """The index stored at ``path``: a :class:`FaissIndex` for ``.faiss`` files (or their ``.faiss.json`` sidecar),
    an exact ``EmbeddingIndex`` for ``.npz`` / ``.safetensors``. Keyword arguments go to ``FaissIndex.load``
    (``model``, ``digest``, ``threads``)."""
    p = Path(path)
    if p.suffix == ".faiss" or p.name.endswith(".faiss.json") or (p.suffix == "" and index_files(p)[1].is_file()):
        return FaissIndex.load(p, **kwargs)
    from zoo.similarity_index import EmbeddingIndex

    return EmbeddingIndex.load(p, device=device)


def iter_part_files(folder: str | os.PathLike, pattern: str = "*.npz") -> Iterable[Path]:
    """The embedding part files of a folder in name order (e.g. ``part-0000.npz``, ``part-0001.npz``, ...)."""
    return sorted(Path(folder).glob(pattern))


# ---------------------------------------------------------------------------------------------------- command line
def main(argv: Sequence[str] | None = None) -> int:
    """``python -m zoo.faiss_index build|search|info``: build an index from embedding part files (what zoo-embed
    writes), search it with query embeddings from such a file, or describe it."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m zoo.faiss_index", description=main.__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="a FAISS index from embedding part files (.npz / .safetensors)")
    b.add_argument("parts", nargs="+", help="part files (or folders of *.npz parts), added in the order given")
    b.add_argument("--type", default="ivf", choices=INDEX_TYPES, help="index type (default ivf)")
    b.add_argument("--out", required=True, help="the index file: <name>.faiss (+ <name>.faiss.json)")
    for opt in ("nlist", "m", "nbits", "nprobe", "hnsw-m", "ef-construction", "ef-search", "train-size", "threads"):
        b.add_argument(f"--{opt}", type=int, default=None)
    b.add_argument("--seed", type=int, default=0)
    q = sub.add_parser("search", help="the k nearest items of each query embedding, as JSON lines")
    q.add_argument("index", help="a .faiss index (or an exact .npz / .safetensors index)")
    q.add_argument("queries", help="query embeddings: a .npz / .safetensors file written by zoo-embed")
    q.add_argument("-k", type=int, default=10)
    q.add_argument("--nprobe", type=int, default=None)
    q.add_argument("--ef-search", type=int, default=None)
    q.add_argument("--limit", type=int, default=None, help="only the first N queries")
    i = sub.add_parser("info", help="the sidecar of an index (without its ids)")
    i.add_argument("index")
    a = ap.parse_args(argv)
    try:
        if a.cmd == "build":
            parts: list[Path] = []
            for p in map(Path, a.parts):
                parts.extend(iter_part_files(p) if p.is_dir() else [p])
            opts = {k: getattr(a, k) for k in ("nlist", "m", "nbits", "nprobe", "hnsw_m", "ef_construction",
                                               "ef_search", "train_size", "threads") if getattr(a, k) is not None}
            index = FaissIndex.build(parts, a.type, seed=a.seed, **opts)
            out = index.save(a.out)
            print(f"wrote {index!r} from {len(parts)} part file(s) to {out} ({index.nbytes() / 2**20:.1f} MiB)")
        elif a.cmd == "search":
            from zoo.similarity_index import EmbeddingIndex

            index = load_index(a.index)
            queries = EmbeddingIndex.load(a.queries)
            index.check_model(str(queries.meta.get("model") or a.queries), queries.meta.get("weights_sha256"))
            n = len(queries) if a.limit is None else min(a.limit, len(queries))
            extra = {} if not isinstance(index, FaissIndex) else {"nprobe": a.nprobe, "ef_search": a.ef_search}
            results = index.search(queries.embeddings[:n], k=a.k, **extra)
            for qid, row in zip(queries.ids[:n], results):
                print(json.dumps({"query": qid, "results": [[i, round(s, 6)] for i, s in row]}))
        else:
            side = json.loads(index_files(a.index)[1].read_text())
            side["ids"] = f"<{len(side.get('ids') or [])} ids>"
            print(json.dumps(side, indent=2))
    except (ValueError, FileNotFoundError, TypeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
