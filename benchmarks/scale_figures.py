"""CPU figures the scale plan (README, Scale) extrapolates from, measured on this machine with one thread:

* embedding throughput of timm resnet50 and vit_small_patch16_224 at 224 px (float32, batches of 8, inference mode);
* an IVF build at 1M vectors split into its two costs: k-means training of 4,096 lists on a 163,840-vector sample
  (40 a list, zoo.faiss_index's default) and adding 1M vectors (each compared with every list centre).

    python benchmarks/scale_figures.py          # writes benchmarks/results/scale_cpu.json
"""

from __future__ import annotations

import datetime
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.faiss_search import cpu_name, mixture  # noqa: E402


def main() -> None:
    import faiss
    import timm

    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    out: dict = {"command": "python benchmarks/scale_figures.py", "date": datetime.date.today().isoformat(),
                 "hardware": {"cpu": cpu_name(), "cpus": os.cpu_count(), "threads": 1},
                 "versions": {"torch": torch.__version__, "timm": timm.__version__, "faiss": faiss.__version__},
                 "embedding_img_per_s": {}, "ivf_build_s": {}}
    for name in ("resnet50", "vit_small_patch16_224"):
        model = timm.create_model(name, pretrained=False).eval()
        x = torch.randn(8, 3, 224, 224)
        with torch.inference_mode():
            model(x)
            t, n = time.perf_counter(), 0
            while time.perf_counter() - t < 15:
                model(x)
                n += len(x)
            out["embedding_img_per_s"][f"{name} 224px fp32"] = round(n / (time.perf_counter() - t), 2)
        print(name, out["embedding_img_per_s"], flush=True)
    x = mixture(1_000_000, 128, 10_000, seed=0)
    index = faiss.IndexIVFFlat(faiss.IndexFlatIP(128), 128, 4096, faiss.METRIC_INNER_PRODUCT)
    sample = x[np.sort(np.random.default_rng(0).choice(len(x), 4096 * 40, replace=False))]
    t = time.perf_counter()
    index.train(sample)
    out["ivf_build_s"]["train 4096 lists on 163,840 x 128-d"] = round(time.perf_counter() - t, 1)
    t = time.perf_counter()
    index.add(x)
    out["ivf_build_s"]["add 1,000,000 x 128-d to 4096 lists"] = round(time.perf_counter() - t, 1)
    print(json.dumps(out, indent=2))
    path = ROOT / "benchmarks" / "results" / "scale_cpu.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
