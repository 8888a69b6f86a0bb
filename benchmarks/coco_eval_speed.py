"""Speed of COCO evaluation: pycocotools vs faster-coco-eval, bbox and segm, on real COCO ground truth.

Builds deterministic fake detections from the ground truth (jittered GT boxes/masks, dropped objects, wrong classes,
and false positives up to ``--per-image`` detections per image), optionally tiles the dataset to more images, then
times ``zoo.metrics.evaluate_coco`` with each backend. "eval" is evaluate + accumulate + summarize; "total" adds
building the GT index and loading/validating the results. Also checks that the 12 numbers match.

    python benchmarks/coco_eval_speed.py --data ../shared/data/coco128 --repeat 3
    python benchmarks/coco_eval_speed.py --tile 4 --per-image 100 --iou-types segm --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # for zoo and tests.coco_fakes (the fake detections live with the tests)

from tests.coco_fakes import fake_results  # noqa: E402
from zoo.metrics.coco_eval import STAT_NAMES, evaluate_coco  # noqa: E402

DEFAULT_DATA = ROOT.parent / "shared" / "data" / "coco128"


def hardware() -> dict[str, Any]:
    """CPU model, counts and library versions, printed with every result."""
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    versions = {}
    for mod in ("pycocotools", "faster_coco_eval", "numpy"):
        try:
            m = __import__(mod)
            versions[mod] = getattr(m, "__version__", None) or _dist_version(mod)
        except ImportError:
            versions[mod] = None
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return {"cpu": model, "cpu_count": os.cpu_count(), "usable_cpus": usable, "load_avg_1min": load,
            "python": platform.python_version(), "platform": platform.platform(), **versions}


def _dist_version(mod: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(mod.replace("_", "-"))
    except PackageNotFoundError:
        return None


def find_annotations(data: Path, ann: str | None) -> Path:
    """``--ann`` if given, else the single ``annotations/instances_*.json`` under ``data``."""
    if ann:
        return Path(ann)
    found = sorted((data / "annotations").glob("instances_*.json"))
    if not found:
        raise SystemExit(f"no annotations/instances_*.json under {data}; pass --data <COCO folder> or --ann <json>")
    return found[0]


def tile_dataset(gt: dict, times: int) -> dict:
    """Repeat every image (and its annotations) ``times`` times under new ids, to benchmark more images."""
    if times <= 1:
        return gt
    img_step = max(i["id"] for i in gt["images"]) + 1
    ann_step = max(a["id"] for a in gt["annotations"]) + 1
    images, anns = [], []
    for k in range(times):
        images += [{**i, "id": i["id"] + k * img_step} for i in gt["images"]]
        anns += [{**a, "id": a["id"] + k * ann_step, "image_id": a["image_id"] + k * img_step}
                 for a in gt["annotations"]]
    return {**gt, "images": images, "annotations": anns}


def run(args: argparse.Namespace) -> dict[str, Any]:
    ann_path = find_annotations(Path(args.data), args.ann)
    gt = tile_dataset(json.loads(ann_path.read_text()), args.tile)
    n_img = len(gt["images"])
    hw = hardware()
    print(f"hardware: {hw['cpu']} | cpu_count={hw['cpu_count']} usable={hw['usable_cpus']} "
          f"load(1m)={hw['load_avg_1min']} | python {hw['python']} | pycocotools {hw['pycocotools']} | "
          f"faster-coco-eval {hw['faster_coco_eval']} | numpy {hw['numpy']}")
    print(f"data: {ann_path} x{args.tile} -> {n_img} images, {len(gt['annotations'])} GT annotations; "
          f"repeat={args.repeat} (median reported)")
    report: dict[str, Any] = {"hardware": hw, "annotations": str(ann_path), "tile": args.tile, "images": n_img,
                              "per_image": args.per_image, "repeat": args.repeat, "results": {}}
    for iou_type in args.iou_types:
        t0 = time.perf_counter()
        dets = fake_results(gt, iou_type, seed=args.seed, per_image=args.per_image)
        print(f"\n[{iou_type}] {len(dets)} fake detections ({len(dets) / n_img:.1f}/image), "
              f"built in {time.perf_counter() - t0:.1f}s")
        per_backend: dict[str, Any] = {}
        for backend in args.backends:
            evals, totals, res = [], [], None
            for _ in range(args.repeat):
                res = evaluate_coco(gt, dets, iou_type, backend=backend)
                t = res.timings
                evals.append(t.get("evaluate", 0.0) + t.get("accumulate", 0.0) + t.get("summarize", 0.0))
                totals.append(sum(t.values()))
            assert res is not None
            ev, tot = statistics.median(evals), statistics.median(totals)
            per_backend[backend] = {"eval_s": ev, "total_s": tot, "eval_images_per_s": n_img / ev,
                                    "total_images_per_s": n_img / tot, "stats": res.stats,
                                    "timings_last": res.timings}
            print(f"  {backend:<12} eval {ev:8.3f}s ({n_img / ev:8.1f} img/s)   total {tot:8.3f}s "
                  f"({n_img / tot:8.1f} img/s)   AP={res.stats['AP']:.4f} AP50={res.stats['AP50']:.4f}")
        if {"pycocotools", "faster"} <= set(per_backend):
            a, b = per_backend["pycocotools"], per_backend["faster"]
            diff = max(abs(a["stats"][k] - b["stats"][k]) for k in STAT_NAMES)
            ratio_eval, ratio_total = a["eval_s"] / b["eval_s"], a["total_s"] / b["total_s"]
            match = diff <= args.tol
            print(f"  speed-up faster/pycocotools: eval x{ratio_eval:.2f}, total x{ratio_total:.2f}; "
                  f"12 numbers match: {match} (max |diff| = {diff:.2e}, tol {args.tol:g})")
            per_backend["comparison"] = {"eval_speedup": ratio_eval, "total_speedup": ratio_total,
                                         "max_abs_diff": diff, "match": match}
        report["results"][iou_type] = per_backend
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=str(DEFAULT_DATA), help="COCO folder with annotations/instances_*.json")
    p.add_argument("--ann", default=None, help="explicit annotation json (overrides --data)")
    p.add_argument("--repeat", type=int, default=3, help="timed runs per backend (median reported)")
    p.add_argument("--per-image", type=int, default=100, help="detections per image (false positives fill up)")
    p.add_argument("--tile", type=int, default=1, help="repeat the dataset this many times under new image ids")
    p.add_argument("--iou-types", nargs="+", default=["bbox", "segm"], choices=["bbox", "segm"])
    p.add_argument("--backends", nargs="+", default=["pycocotools", "faster"], choices=["pycocotools", "faster"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tol", type=float, default=1e-4, help="max |difference| for the 12 numbers to 'match'")
    p.add_argument("--json", default=None, help="also write the report (with hardware) to this json file")
    args = p.parse_args(argv)
    if args.repeat < 1 or args.tile < 1:
        p.error("--repeat and --tile must be >= 1")
    report = run(args)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
        print(f"\nreport written to {args.json}")
    ok = all(r.get("comparison", {}).get("match", True) for r in report["results"].values())
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
