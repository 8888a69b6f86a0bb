"""Approximate search at scale with zoo.faiss_index: for each collection size and each FAISS index type (flat, ivf,
ivfpq, hnsw, default parameters), the build time, recall@10 against exact search, queries per second (one batch of
1000 queries, and queries one at a time) and the index's size.

The vectors are a Gaussian mixture: n / ``--points-per-cluster`` random centres (standard normal coordinates), each
point a centre plus standard normal noise of the same scale (so clusters overlap, as real embeddings do),
L2-normalised; the queries are drawn from the same mixture and are not in the collection. Ground truth is exact
inner-product search (FAISS IndexFlatIP). Search goes through FaissIndex.search_arrays (query normalisation included),
with the index's default nprobe / efSearch, then narrower and wider.

A 1M run of every type takes longer than 5 minutes on one core: split it with --kinds and --append, as the results
file records.

    python benchmarks/faiss_search.py                                  # 100k and 1M vectors of 128-d, 1 thread
    python benchmarks/faiss_search.py --sizes 100000 --dims 128 256 --threads 1
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # idle OpenMP threads sleep (a shared machine)

import numpy as np  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from zoo.faiss_index import INDEX_TYPES, FaissIndex  # noqa: E402
from zoo.similarity_index import EmbeddingIndex  # noqa: E402


def mixture(n: int, dim: int, clusters: int, seed: int, chunk: int = 200_000) -> np.ndarray:
    """``n`` L2-normalised points of a Gaussian mixture (see the module docs), float32, made in chunks."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim), dtype=np.float32)
    out = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        x = centres[rng.integers(0, clusters, m)] + rng.standard_normal((m, dim), dtype=np.float32)
        out[start:start + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def recall_at(found: np.ndarray, truth: np.ndarray) -> float:
    k = truth.shape[1]
    return float(np.mean([len(set(f[f >= 0].tolist()) & set(t.tolist())) / k for f, t in zip(found, truth)]))


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def run_size(n: int, dim: int, a: argparse.Namespace) -> list[dict]:
    import faiss

    t0 = time.perf_counter()
    clusters = max(1, n // a.points_per_cluster)
    data = mixture(n + a.queries, dim, clusters, seed=a.seed)
    xb, xq = data[:n], np.ascontiguousarray(data[n:])
    gen_s = time.perf_counter() - t0
    exact = faiss.IndexFlatIP(dim)
    exact.add(xb)
    t0 = time.perf_counter()
    _, truth = exact.search(xq, a.k)
    truth_s = time.perf_counter() - t0
    del exact
    gallery = EmbeddingIndex(torch.from_numpy(xb), [str(i) for i in range(n)], {"model": "benchmark"})
    del data, xb
    print(f"\n{n:,} x {dim}-d ({clusters:,} centres): data {gen_s:.1f} s, exact ground truth {truth_s:.1f} s",
          flush=True)
    rows = []
    for kind in a.kinds:
        t0 = time.perf_counter()
        overrides = {k: v for k, v in (("hnsw_m", a.hnsw_m), ("ef_construction", a.ef_construction))
                     if v is not None} if kind == "hnsw" else {}
        index = FaissIndex.build(gallery, kind, seed=a.seed, **overrides)
        build_s = time.perf_counter() - t0
        index.search_arrays(xq[:10], a.k)  # warm-up
        t0 = time.perf_counter()
        _, found = index.search_arrays(xq, a.k)
        batch_s = time.perf_counter() - t0
        singles = min(a.single_queries, len(xq))
        t0 = time.perf_counter()
        for i in range(singles):
            index.search_arrays(xq[i], a.k)
        single_s = time.perf_counter() - t0
        row = {"n": n, "dim": dim, "index": kind, "params": index.params, "build_s": round(build_s, 2),
               "recall_at_10": round(recall_at(found, truth), 4), "qps_batch": round(len(xq) / batch_s, 1),
               "qps_single": round(singles / single_s, 1), "bytes": index.nbytes(),
               "bytes_per_vector": round(index.nbytes() / n, 1)}
        rows.append(row)
        print(f"  {kind:6s} build {build_s:7.1f} s  recall@10 {row['recall_at_10']:.3f}  "
              f"{row['qps_batch']:9.0f} q/s (batch {len(xq)})  {row['qps_single']:8.0f} q/s (batch 1)  "
              f"{row['bytes'] / 2**20:8.1f} MiB  {index.params}", flush=True)
        # the same index searched narrower and wider than its default: the recall / speed trade-off
        if kind in ("ivf", "ivfpq"):
            sweeps = [{"nprobe": max(1, index.params["nprobe"] // 8)},
                      {"nprobe": min(index.params["nlist"], index.params["nprobe"] * 4)}]
        elif kind == "hnsw":
            sweeps = [{"ef_search": 16}, {"ef_search": 256}]
        else:
            sweeps = []
        for low in sweeps:
            t0 = time.perf_counter()
            _, found = index.search_arrays(xq, a.k, **low)
            batch_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            for i in range(singles):
                index.search_arrays(xq[i], a.k, **low)
            single_s = time.perf_counter() - t0
            rows.append({**row, "params": {**index.params, **low}, "build_s": None,
                         "recall_at_10": round(recall_at(found, truth), 4), "qps_batch": round(len(xq) / batch_s, 1),
                         "qps_single": round(singles / single_s, 1), "search_override": low})
            print(f"  {kind:6s} {low}: recall@10 {rows[-1]['recall_at_10']:.3f}  {rows[-1]['qps_batch']:9.0f} q/s "
                  f"(batch)  {rows[-1]['qps_single']:8.0f} q/s (batch 1)", flush=True)
        del index
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--dims", type=int, nargs="+", default=[128])
    ap.add_argument("--kinds", nargs="+", default=list(INDEX_TYPES), choices=INDEX_TYPES)
    ap.add_argument("--points-per-cluster", type=int, default=100, help="mixture centres = n / this")
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--single-queries", type=int, default=200, help="queries timed one at a time")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1, help="FAISS (OpenMP) and torch threads")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--note", default=None, help="a sentence about this run for the results file")
    ap.add_argument("--hnsw-m", type=int, default=None, help="hnsw: links a node instead of the default")
    ap.add_argument("--ef-construction", type=int, default=None,
                    help="hnsw: build candidate list instead of the default")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "faiss"),
                    help="writes <out>.md and <out>.json")
    ap.add_argument("--append", action="store_true",
                    help="add these results to <out>.json (a long benchmark split into runs under 5 minutes)")
    a = ap.parse_args()
    import faiss

    faiss.omp_set_num_threads(a.threads)
    torch.set_num_threads(a.threads)
    hardware = {"cpu": cpu_name(), "cpus": os.cpu_count(), "threads": a.threads, "platform": platform.platform()}
    versions = {"python": platform.python_version(), "faiss": faiss.__version__, "numpy": np.__version__,
                "torch": torch.__version__}
    import shlex

    command = "python benchmarks/faiss_search.py " + shlex.join(sys.argv[1:])
    print(f"{hardware}\n{versions}")
    t_all = time.perf_counter()
    rows = []
    for dim in a.dims:
        for n in a.sizes:
            rows += run_size(n, dim, a)
    total_s = time.perf_counter() - t_all

    data_desc = (f"Gaussian mixture: n / {a.points_per_cluster} centres with standard normal coordinates, each point "
                 "a centre plus "
                 f"standard normal noise (overlapping clusters), L2-normalised; {a.queries} queries from the same "
                 f"mixture, not in the collection; k = {a.k}; seed {a.seed}")
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    runs = [{"command": command, "seconds": round(total_s, 1), **({"note": a.note} if a.note else {})}]
    if a.append and out.with_suffix(".json").is_file():
        old = json.loads(out.with_suffix(".json").read_text())
        keys = {(r["n"], r["dim"], r["index"], json.dumps(r["params"], sort_keys=True)) for r in rows}
        rows = [r for r in old["results"]
                if (r["n"], r["dim"], r["index"], json.dumps(r["params"], sort_keys=True)) not in keys] + rows
        rows.sort(key=lambda r: (r["dim"], r["n"], INDEX_TYPES.index(r["index"]), r["build_s"] is None,
                                 r["recall_at_10"]))
        runs = old.get("runs", []) + runs
    payload = {"commands": [r["command"] for r in runs], "runs": runs, "date": datetime.date.today().isoformat(),
               "hardware": hardware, "versions": versions, "data": data_desc, "results": rows}
    out.with_suffix(".json").write_text(json.dumps(payload, indent=2) + "\n")
    shown = "; ".join(f"`{r['command']}` ({r['seconds']:.0f} s)" for r in runs)
    lines = ["# Approximate search with FAISS (zoo.faiss_index)", "", f"Commands: {shown}", "",
             f"Machine: {hardware['cpu']}, {hardware['cpus']} CPUs ({hardware['platform']}); {payload['date']}; "
             f"{a.threads} FAISS/torch threads; the machine was shared with other jobs, so timings are indicative.",
             "", "Versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()), "",
             f"Data: {data_desc}.", "",
             "Build: FaissIndex.build with default parameters (zoo.faiss_index.default_params, scaled with n) unless "
             "the parameters column says otherwise, "
             "training sample included. Recall@10: share of the exact top-10 found. q/s: FaissIndex.search_arrays "
             f"on one batch of {a.queries} queries, and on {a.single_queries} queries one at a time (batch 1). "
             "Size: the serialised FAISS index (ids and sidecar not included). Rows marked (same index) search the "
             "index above them with a narrower or wider search parameter.", "",
             "| n | dim | index | parameters | build (s) | recall@10 | q/s batch | q/s batch 1 | size (MiB) | "
             "bytes/vector |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        params = ", ".join(f"{k}={v}" for k, v in r["params"].items()) or "-"
        build = f"{r['build_s']:.1f}" if r["build_s"] is not None else "(same index)"
        lines.append(f"| {r['n']:,} | {r['dim']} | {r['index']} | {params} | {build} | "
                     f"{r['recall_at_10']:.3f} | {r['qps_batch']:,.0f} | {r['qps_single']:,.0f} | "
                     f"{r['bytes'] / 2**20:,.1f} | {r['bytes_per_vector']:.0f} |")
    notes = [r["note"] for r in runs if r.get("note")]
    if notes:
        lines += ["", *(f"Note: {n}" for n in notes)]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n" + "\n".join(lines[lines.index("| n | dim | index | parameters | build (s) | recall@10 | q/s batch | "
                                             "q/s batch 1 | size (MiB) | bytes/vector |"):]))


if __name__ == "__main__":
    main()
