"""Retrieval metrics: zoo's :func:`zoo.metrics.retrieval.retrieval_metrics` against pytorch-metric-learning's
``AccuracyCalculator`` (the reference implementation of mAP@R, Musgrave et al. 2020) on the same random embeddings,
leave-one-out: both metrics (R@1 = pml's precision_at_1, mAP@R) and the seconds each takes, in one run.

    python benchmarks/retrieval_metrics.py                       # 2000 and 8000 embeddings, 64-d
    python benchmarks/retrieval_metrics.py --sizes 20000 --classes 500 --dim 128

Why zoo keeps its own: the values are the same (tests/test_own_data.py checks them to 1e-9), but
``AccuracyCalculator`` is 20-45x slower; zoo's streams chunks of queries through a batched top-k (CPU, GPU or
FAISS) and never holds more than a chunk's neighbour lists. One run (x86_64, 1 thread, torch 2.14.1)::

          n    zoo s    pml s  pml/zoo      R@1      mAP@R  max |diff|
       2000    0.066    1.856     28.2   0.0080   0.001787    2.17e-19
       8000    1.032   23.502     22.8   0.0090   0.000702    0.00e+00
 torchmetrics' retrieval metrics need every
(query, gallery) score as a flat tensor (Q x G memory), so they are not an option for a validation set either.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch

try:
    import zoo  # noqa: F401
except ImportError:  # run as a script from a checkout: make the package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from zoo.metrics.retrieval import retrieval_metrics  # noqa: E402


def pml_metrics(x: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """pytorch-metric-learning's R@1 and mAP@R, leave-one-out, by cosine similarity."""
    from pytorch_metric_learning.distances import CosineSimilarity
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator
    from pytorch_metric_learning.utils.inference import CustomKNN

    calc = AccuracyCalculator(include=("precision_at_1", "mean_average_precision_at_r"),
                              knn_func=CustomKNN(CosineSimilarity()))
    acc = calc.get_accuracy(x, labels)
    return {"R@1": float(acc["precision_at_1"]), "mAP@R": float(acc["mean_average_precision_at_r"])}


def run(n: int, dim: int, classes: int, seed: int = 0) -> dict[str, float]:
    """Both implementations on ``n`` random ``dim``-d embeddings of ``classes`` labels; seconds and metrics."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    t = time.perf_counter()
    ours = retrieval_metrics(x, y, ks=(1,), backend="torch")
    t_ours = time.perf_counter() - t
    t = time.perf_counter()
    ref = pml_metrics(x, y)
    t_pml = time.perf_counter() - t
    return {"n": n, "zoo_s": t_ours, "pml_s": t_pml, "zoo_R@1": ours["R@1"], "pml_R@1": ref["R@1"],
            "zoo_mAP@R": ours["mAP@R"], "pml_mAP@R": ref["mAP@R"],
            "max_abs_diff": max(abs(ours["R@1"] - ref["R@1"]), abs(ours["mAP@R"] - ref["mAP@R"]))}


def main(argv: list[str] | None = None) -> list[dict[str, float]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="2000,8000", help="comma-separated numbers of embeddings")
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    print(f"# retrieval metrics, leave-one-out | {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads | torch {torch.__version__} | {a.dim}-d, {a.classes} classes")
    print(f"{'n':>7} {'zoo s':>8} {'pml s':>8} {'pml/zoo':>8} {'R@1':>8} {'mAP@R':>10} {'max |diff|':>11}")
    rows = []
    for n in [int(s) for s in a.sizes.split(",") if s.strip()]:
        r = run(n, a.dim, a.classes)
        rows.append(r)
        print(f"{n:>7} {r['zoo_s']:>8.3f} {r['pml_s']:>8.3f} {r['pml_s'] / max(r['zoo_s'], 1e-9):>8.1f} "
              f"{r['zoo_R@1']:>8.4f} {r['zoo_mAP@R']:>10.6f} {r['max_abs_diff']:>11.2e}", flush=True)
    return rows


if __name__ == "__main__":
    main()
