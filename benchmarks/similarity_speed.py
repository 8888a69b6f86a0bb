"""Similarity serving speed: embedding throughput (images/s) of a zoo embedding model, and exact k-NN search
latency against a gallery of random unit vectors (default 100k), by zoo's batched matrix products, against a
plain reference (one full matrix product + torch.topk) and FAISS IndexFlatIP when installed — in the same run.

    python benchmarks/similarity_speed.py                       # CPU
    python benchmarks/similarity_speed.py --device cuda --backbone resnet50 --size 224 --batch 256
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch

from zoo.metrics.retrieval import faiss_available, knn
from zoo.models import create_model
from zoo.similarity_index import EmbeddingIndex


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timeit(fn, device, repeat: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", default="resnet18")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--gallery", type=int, default=100_000)
    ap.add_argument("--queries", type=int, default=100)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = ap.parse_args()
    device = torch.device(a.device)
    print(f"host: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}, device {device}"
          + (f" ({torch.cuda.get_device_name()})" if device.type == "cuda" else ""))

    model = create_model({"backbone": {"name": a.backbone}, "heads": {"emb": {"type": "embedding",
                                                                              "embedding_dim": a.dim}}}).to(device).eval()
    x = torch.randn(a.batch, 3, a.size, a.size, device=device)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)

    def embed():
        with torch.inference_mode(), amp:
            model(x)

    t = timeit(embed, device, a.repeat)
    print(f"embedding: {a.backbone} {a.size}px batch {a.batch}: {a.batch / t:,.1f} images/s")

    g = torch.nn.functional.normalize(torch.randn(a.gallery, a.dim, device=device), dim=1)
    q = torch.nn.functional.normalize(torch.randn(a.queries, a.dim, device=device), dim=1)

    index = EmbeddingIndex(g, [str(i) for i in range(a.gallery)], device=device)

    def zoo_search():  # what a service runs: the index holds unit vectors, queries are normalised per call
        index.search(q, a.k, backend="torch")

    def reference():
        torch.topk(q @ g.T, a.k, dim=1)

    tz = timeit(zoo_search, device, a.repeat)
    tr = timeit(reference, device, a.repeat)
    print(f"search {a.queries} queries x {a.gallery:,} vectors (d={a.dim}, k={a.k}):")
    print(f"  zoo EmbeddingIndex.search {tz * 1e3:9.2f} ms  ({tz / a.queries * 1e6:8.1f} us/query)")
    print(f"  reference matmul + topk   {tr * 1e3:9.2f} ms  ratio zoo/reference time {tz / tr:.2f}")
    if faiss_available() and device.type == "cpu":
        import faiss

        index = faiss.IndexFlatIP(a.dim)
        index.add(g.numpy())
        tf = timeit(lambda: index.search(q.numpy(), a.k), device, a.repeat)
        print(f"  faiss IndexFlatIP         {tf * 1e3:9.2f} ms  ratio zoo/faiss time {tz / tf:.2f}")
    s1, i1 = knn(q, g, a.k, backend="torch")
    s2, i2 = torch.topk(q @ g.T, a.k, dim=1)
    print(f"  same neighbours as the reference: {bool((i1 == i2).all())}")


if __name__ == "__main__":
    main()
