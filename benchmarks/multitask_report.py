"""Multi-task report: each head of a jointly trained model against a single-task model with the same backbone,
the same settings and the same number of optimisation steps; for each balancing method; the inference time of one
multi-task pass against the single-task passes it replaces; and the parameters saved. Plus one real-data row:
detection + semantic segmentation jointly on coco128 against the two single-task runs.

Every run is a real ``python train.py`` in a fresh process (the path users run); metrics come from each run's
``metrics.json`` (the best checkpoint's validation metrics), inference times from the runs' bundles in this process
(interleaved repeats, medians).

    python benchmarks/multitask_report.py                       # the full report (CPU: about an hour on 2 cores)
    python benchmarks/multitask_report.py --quick               # a smoke-sized run of the same code (minutes)
    python benchmarks/multitask_report.py --skip-coco --balance fixed

Writes ``benchmarks/results/multitask.md`` and ``.json`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"

#: The embedded-dataset heads of experiment=shapes_multi: name -> (head entry, main metric key in a one-head run).
SHAPES_HEADS = {
    "cls": ("{name: cls, type: classification, dropout: 0.1, label_smoothing: 0.1}", "top1"),
    "det": ("{name: det, type: fcos, num_convs: 2}", "mAP"),
    "seg": ("{name: seg, type: semantic_fpn, channels: 64, fpn_channels: 64}", "mIoU"),
    "emb": ("{name: emb, type: embedding, embedding_dim: 64, loss: multi_similarity, m_per_class: 4, "
            "data: {batch_size: 16, limit_train_images: 800, extra: {identity: identity, context: 0.15, min_size: 10, "
            "test_identity_fraction: 0.3}}}", "R@1"),
}
COCO_HEADS = {"det": ("{name: det, type: fcos, num_convs: 2}", "mAP"),
              "seg": ("{name: seg, type: semantic_fpn, channels: 64, fpn_channels: 64}", "mIoU")}


REUSE = False


def run_train(out: Path, overrides: list[str], log: Path) -> dict:
    """``python train.py <overrides>`` into ``out``; returns its metrics.json plus wall time and steps. With
    ``--reuse`` a finished run folder (metrics.json, bundle and a ``wall_s`` record) is read instead of retrained."""
    done = out / "report_run.json"
    if REUSE and done.is_file() and (out / "metrics.json").is_file():
        print(f"  reusing {out}", flush=True)
        return json.loads(done.read_text())
    if out.exists():
        import shutil

        shutil.rmtree(out)
    cmd = [sys.executable, str(ROOT / "train.py"), *overrides, f"hydra.run.dir={out}"]
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run(cmd, cwd=str(ROOT), stdout=f, stderr=subprocess.STDOUT,
                              env={**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"})
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"training failed ({' '.join(overrides)}); see {log}")
    metrics = json.loads((out / "metrics.json").read_text())["metrics"]
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    res = {"metrics": metrics, "wall_s": wall, "steps": int(ckpt["global_step"]), "bundle": str(out / "bundle"),
           "overrides": overrides}
    done.write_text(json.dumps(res, indent=2))
    return res


def heads_override(entries: list[str]) -> str:
    return "model.heads=[" + ", ".join(entries) + "]"


def time_models(bundles: dict[str, str], size: int, batch: int, repeat: int) -> dict[str, dict]:
    """Median forward time (bare model, batch of ``batch`` at ``size`` px) and Predictor time for one image, per
    bundle, repeats interleaved across the bundles; parameter counts."""
    import numpy as np

    import zoo

    models = {k: zoo.load(v) for k, v in bundles.items()}
    preds = {k: zoo.Predictor(m) for k, m in models.items()}
    x = torch.randn(batch, 3, size, size)
    img = (np.random.default_rng(0).random((size, size, 3)) * 255).astype(np.uint8)
    times: dict[str, list[float]] = {k: [] for k in models}
    ptimes: dict[str, list[float]] = {k: [] for k in models}
    with torch.inference_mode():
        for k in models:  # warm-up
            models[k](x)
            preds[k](img)
        for _ in range(repeat):
            for k, m in models.items():
                t = time.perf_counter()
                m(x)
                times[k].append(time.perf_counter() - t)
                t = time.perf_counter()
                preds[k](img)
                ptimes[k].append(time.perf_counter() - t)
    return {k: {"forward_ms": 1000 * statistics.median(times[k]), "predictor_ms": 1000 * statistics.median(ptimes[k]),
                "params": sum(p.numel() for p in models[k].parameters())} for k in models}


def shapes_block(args, work: Path) -> dict:
    common = ["experiment=shapes_multi", "trainer.enable_progress_bar=false", "callbacks.lr_monitor=false"]
    if args.quick:
        common += ["data.shapes.num_train=96", "data.shapes.num_val=32", "data.shapes.image_size=96",
                   "backbone=test_resnet", "model.input_size=[64,64]", "trainer.max_epochs=1", "data.num_workers=0",
                   "data.persistent_workers=false"]
    out: dict = {"joint": {}, "single": {}}
    for bal in args.balance:
        name = f"joint_{bal}"
        print(f"[shapes] joint, balance={bal} ...", flush=True)
        out["joint"][bal] = run_train(work / name, [*common, f"model.balance={bal}"], work / f"{name}.log")
        print(f"  {out['joint'][bal]['wall_s']:.0f} s, {out['joint'][bal]['steps']} steps", flush=True)
    steps = out["joint"][args.balance[0]]["steps"]
    for head, (entry, _) in SHAPES_HEADS.items():
        print(f"[shapes] single {head}, {steps} steps ...", flush=True)
        ov = [*common, heads_override([entry]), f"trainer.max_steps={steps}", "trainer.max_epochs=1000"]
        out["single"][head] = run_train(work / f"single_{head}", ov, work / f"single_{head}.log")
        print(f"  {out['single'][head]['wall_s']:.0f} s, {out['single'][head]['steps']} steps", flush=True)
    size = 64 if args.quick else 96
    bundles = {"joint": out["joint"][args.balance[0]]["bundle"],
               **{h: r["bundle"] for h, r in out["single"].items()}}
    out["timing"] = time_models(bundles, size, args.batch, args.repeat)
    out["timing_size"] = size
    return out


def coco_block(args, work: Path) -> dict:
    root = SHARED / "coco128"
    if not (root / "annotations").is_dir():
        return {"skipped": f"{root} not present"}
    # The fit protocol of the coco128 overfit tests, enlarged: train and validate on the same first 16 real images
    # (how well each model fits them), no augmentation, validation once at the end.
    epochs = 4 if args.quick else args.coco_epochs
    common = ["model=multitask", "data=coco", f"data.root={root}", "backbone=resnet10t",
              "trainer.enable_progress_bar=false", "callbacks.lr_monitor=false", "model.input_size=[256,256]",
              "model.necks.fpn.out_channels=64", "data.batch_size=8", "trainer.gradient_clip_val=10",
              "optimizer.lr=1e-3", "optimizer.weight_decay=0", "data.num_workers=0", "data.persistent_workers=false",
              "data.augment=[]", "scheduler.warmup_epochs=5", f"trainer.max_epochs={epochs}",
              f"trainer.check_val_every_n_epoch={epochs}",
              f"data.limit_train_images={8 if args.quick else 16}", f"data.limit_val_images={8 if args.quick else 16}"]
    out: dict = {}
    print("[coco128] joint det + seg ...", flush=True)
    out["joint"] = run_train(work / "coco_joint", [*common, heads_override([e for e, _ in COCO_HEADS.values()])],
                             work / "coco_joint.log")
    for head, (entry, _) in COCO_HEADS.items():
        print(f"[coco128] single {head} ...", flush=True)
        out[head] = run_train(work / f"coco_{head}", [*common, heads_override([entry])], work / f"coco_{head}.log")
    return out


def report(res: dict, args) -> str:
    lines = ["# Multi-task report", "",
             f"Command: `python benchmarks/multitask_report.py {' '.join(sys.argv[1:])}`".rstrip(), "",
             f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
             f"{time.strftime('%Y-%m-%d')}", ""]
    sh = res.get("shapes")
    if sh:
        bals = list(sh["joint"])
        lines += ["## Embedded dataset (`experiment=shapes_multi`: one backbone, four heads)", "",
                  "Each single-task run: the same backbone, input size, data, head and schedule, and the same number of "
                  f"optimisation steps as the joint run ({sh['joint'][bals[0]]['steps']}).", "",
                  "| head (metric) | single-task | " + " | ".join(f"joint, {b}" for b in bals) + " |",
                  "|---|---|" + "---|" * len(bals)]
        for head, (_, metric) in SHAPES_HEADS.items():
            single = sh["single"][head]["metrics"].get(f"val/{metric}")
            cells = [f"{sh['joint'][b]['metrics'].get(f'val/{head}/{metric}', float('nan')):.3f}" for b in bals]
            lines.append(f"| {head} ({metric}) | {single:.3f} | " + " | ".join(cells) + " |")
        lines.append("| wall time (s) | " + f"{sum(r['wall_s'] for r in sh['single'].values()):.0f} (four runs) | "
                     + " | ".join(f"{sh['joint'][b]['wall_s']:.0f}" for b in bals) + " |")
        t = sh["timing"]
        singles = [h for h in SHAPES_HEADS]
        fw = sum(t[h]["forward_ms"] for h in singles)
        pr = sum(t[h]["predictor_ms"] for h in singles)
        params = sum(t[h]["params"] for h in singles)
        lines += ["", f"Inference (CPU, bare forward of a batch of {args.batch} at {sh['timing_size']} px; Predictor: one "
                  "image end to end; medians of interleaved repeats):", "",
                  "| | joint (one pass) | four single-task models | ratio |", "|---|---|---|---|",
                  f"| forward ms | {t['joint']['forward_ms']:.1f} | {fw:.1f} | {fw / t['joint']['forward_ms']:.2f}x |",
                  f"| Predictor ms | {t['joint']['predictor_ms']:.1f} | {pr:.1f} | {pr / t['joint']['predictor_ms']:.2f}x |",
                  f"| parameters | {t['joint']['params'] / 1e6:.2f} M | {params / 1e6:.2f} M | "
                  f"{params / t['joint']['params']:.2f}x |"]
    co = res.get("coco")
    if co and "skipped" not in co:
        lines += ["", "## Real data: coco128, detection + semantic jointly", "",
                  "Fit protocol: the first 16 coco128 images, trained and scored on themselves (how well each model "
                  f"fits them), 256 px, resnet10t, {co['joint']['steps']} steps, same settings for the three runs.", "",
                  "| head (metric) | single-task | joint |", "|---|---|---|",
                  f"| det (mAP) | {co['det']['metrics']['val/mAP']:.3f} | {co['joint']['metrics']['val/det/mAP']:.3f} |",
                  f"| det (mAP50) | {co['det']['metrics']['val/mAP50']:.3f} | "
                  f"{co['joint']['metrics']['val/det/mAP50']:.3f} |",
                  f"| seg (mIoU) | {co['seg']['metrics']['val/mIoU']:.3f} | {co['joint']['metrics']['val/seg/mIoU']:.3f} |",
                  f"| wall time (s) | {co['det']['wall_s'] + co['seg']['wall_s']:.0f} (two runs) | "
                  f"{co['joint']['wall_s']:.0f} |"]
    elif co:
        lines += ["", f"coco128 row skipped: {co['skipped']}"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke-sized runs (tiny data and backbone, one epoch)")
    ap.add_argument("--balance", nargs="+", default=["fixed", "uncertainty", "pcgrad"])
    ap.add_argument("--skip-coco", action="store_true")
    ap.add_argument("--skip-shapes", action="store_true")
    ap.add_argument("--coco-epochs", type=int, default=60, help="coco128 fit: epochs over the 16 images (2 steps each)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=15)
    ap.add_argument("--work", type=Path, default=None, help="run folders (default: outputs/multitask_report)")
    ap.add_argument("--reuse", action="store_true", help="read finished run folders of an earlier report run")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "multitask.md")
    args = ap.parse_args(argv)
    global REUSE
    REUSE = bool(args.reuse)
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    work = (args.work or ROOT / "outputs" / "multitask_report").resolve()
    work.mkdir(parents=True, exist_ok=True)
    res: dict = {}
    if not args.skip_shapes:
        res["shapes"] = shapes_block(args, work)
    if not args.skip_coco:
        res["coco"] = coco_block(args, work)
    text = report(res, args)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    args.out.with_suffix(".json").write_text(json.dumps(res, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
