"""Detection speed: zoo (TimmBackbone resnet50 + FPN + head) against torchvision's reference models, same run.

For every head this times a training step (forward + loss + backward + SGD step) and batch inference (forward +
post-processing) of both models on the same random images with a few random boxes, and prints images/s (from the
median step time; zoo and torchvision steps alternate so both see the same machine load) and the zoo/torchvision
ratio. On CUDA both run under bf16 autocast.

    python benchmarks/detection_speed.py --heads fcos,retinanet,faster_rcnn --batch 2 --size 320 --steps 3

Differences that remain by construction: torchvision's models normalise and resize inside (a no-op resize here,
since ``min_size = max_size = size``); torchvision's Faster R-CNN FPN reads strides 4-32 plus a max-pooled P6 while
the zoo's default FPN reads 8-32 plus P6/P7 convolutions; torchvision's one-stage heads take the top-k candidates per
level, the zoo across levels. Both sides use random initialisation (no downloads).
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

try:
    import zoo  # noqa: F401
except ImportError:  # run as a script from a checkout: make the package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from torchvision.models import detection as tvd  # noqa: E402

from zoo.models import create_model  # noqa: E402

TORCHVISION = {"fcos": tvd.fcos_resnet50_fpn, "retinanet": tvd.retinanet_resnet50_fpn,
               "faster_rcnn": tvd.fasterrcnn_resnet50_fpn, "mask_rcnn": tvd.maskrcnn_resnet50_fpn}
TWO_STAGE = ("faster_rcnn", "mask_rcnn")
POST = {"score_thresh": 0.05, "nms_thresh": 0.6, "max_detections": 100, "pre_nms_topk": 1000}


def build_torchvision(head: str, num_classes: int, size: int) -> torch.nn.Module:
    """torchvision's reference model with matching post-processing settings and no pretrained weights."""
    kw: dict[str, Any] = {"weights": None, "weights_backbone": None, "min_size": size, "max_size": size}
    if head in TWO_STAGE:
        kw.update(num_classes=num_classes + 1, box_score_thresh=POST["score_thresh"],
                  box_nms_thresh=POST["nms_thresh"], box_detections_per_img=POST["max_detections"])
    else:
        kw.update(num_classes=num_classes, score_thresh=POST["score_thresh"], nms_thresh=POST["nms_thresh"],
                  detections_per_img=POST["max_detections"], topk_candidates=POST["pre_nms_topk"])
    return TORCHVISION[head](**kw)


def build_zoo(head: str, num_classes: int, size: int) -> torch.nn.Module:
    spec = {"backbone": {"name": "resnet50"}, "necks": {"fpn": {"type": "fpn", "out_channels": 256}},
            "heads": {"det": {"type": head, "input": "fpn", "num_classes": num_classes, **POST}},
            "input_size": [size, size], "task": "detection"}
    return create_model(spec)


def random_batch(batch: int, size: int, num_classes: int, device: torch.device, seed: int = 0
                 ) -> tuple[torch.Tensor, list[dict[str, torch.Tensor]]]:
    """Images ``(B, 3, size, size)`` in 0..1 and 1-5 random boxes per image with labels ``0..K-1``."""
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(batch, 3, size, size, generator=g)
    targets = []
    for _ in range(batch):
        n = int(torch.randint(1, 6, (1,), generator=g))
        xy = torch.rand(n, 2, generator=g) * size * 0.7
        wh = (0.05 + torch.rand(n, 2, generator=g) * 0.4) * size
        boxes = torch.cat([xy, (xy + wh).clamp(max=size)], dim=1)
        targets.append({"boxes": boxes.to(device), "labels": torch.randint(0, num_classes, (n,), generator=g).to(device)})
    return images.to(device), targets


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo where there is one."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_pair(fn_a: Callable[[], Any], fn_b: Callable[[], Any], warmup: int, steps: int,
               device: torch.device) -> tuple[float, float]:
    """Median seconds per call of ``fn_a`` and ``fn_b``, called alternately (so both see the same machine load)
    after ``warmup`` untimed calls of each."""
    for _ in range(warmup):
        fn_a()
        fn_b()
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(steps):
        for fn, out in ((fn_a, times[0]), (fn_b, times[1])):
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            out.append(time.perf_counter() - start)
    return statistics.median(times[0]), statistics.median(times[1])


def bench_head(head: str, args: argparse.Namespace, device: torch.device) -> dict[str, float]:
    """Images/s of a training step and of inference for the zoo model and the torchvision model."""
    def amp() -> contextlib.AbstractContextManager:
        return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()

    images, targets = random_batch(args.batch, args.size, args.num_classes, device)
    mean = torch.tensor([0.485, 0.456, 0.406], device=device)[:, None, None]
    std = torch.tensor([0.229, 0.224, 0.225], device=device)[:, None, None]
    normed = (images - mean) / std
    sizes = [(args.size, args.size)] * args.batch
    if head == "mask_rcnn":  # instance masks: the boxes filled
        for t in targets:
            m = torch.zeros(len(t["boxes"]), args.size, args.size, dtype=torch.uint8, device=device)
            for j, (x1, y1, x2, y2) in enumerate(t["boxes"].round().int().tolist()):
                m[j, y1:y2, x1:x2] = 1
            t["masks"] = m
    tv_targets = [dict(t, labels=t["labels"] + 1) if head in TWO_STAGE else t for t in targets]
    image_list = list(images)

    torch.manual_seed(0)
    zoo_model = build_zoo(head, args.num_classes, args.size).to(device)
    tv_model = build_torchvision(head, args.num_classes, args.size).to(device)
    zoo_head = zoo_model.heads["det"]

    def make_steps(model: torch.nn.Module, loss_fn: Callable[[], dict[str, torch.Tensor]]):
        opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)

        def step() -> None:
            with amp():
                losses = loss_fn()
            total = sum(losses.values())
            opt.zero_grad(set_to_none=True)
            total.backward()
            opt.step()
        return step

    def zoo_infer() -> None:
        with torch.no_grad(), amp():
            zoo_head.predict(zoo_model(normed)["det"], sizes)

    def tv_infer() -> None:
        with torch.no_grad(), amp():
            tv_model(image_list)

    out: dict[str, float] = {
        "zoo_params_M": sum(p.numel() for p in zoo_model.parameters()) / 1e6,
        "tv_params_M": sum(p.numel() for p in tv_model.parameters()) / 1e6,
    }
    zoo_model.train()
    tv_model.train()
    zoo_step = make_steps(zoo_model, lambda: zoo_head.loss(zoo_model(normed)["det"], targets, sizes))
    tv_step = make_steps(tv_model, lambda: tv_model(image_list, tv_targets))
    zoo_s, tv_s = timed_pair(zoo_step, tv_step, args.warmup, args.steps, device)
    out["zoo_train"], out["tv_train"] = args.batch / zoo_s, args.batch / tv_s
    zoo_model.eval()
    tv_model.eval()
    zoo_s, tv_s = timed_pair(zoo_infer, tv_infer, args.warmup, args.steps, device)
    out["zoo_infer"], out["tv_infer"] = args.batch / zoo_s, args.batch / tv_s
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--heads", default="fcos,retinanet,faster_rcnn,mask_rcnn",
                   help=f"comma-separated heads among {','.join(TORCHVISION)}")
    p.add_argument("--batch", type=int, default=2, help="images per batch")
    p.add_argument("--size", type=int, default=320, help="square image side in pixels")
    p.add_argument("--steps", type=int, default=3,
                   help="timed iterations of each model (after --warmup untimed ones)")
    p.add_argument("--warmup", type=int, default=1, help="untimed iterations before timing")
    p.add_argument("--num-classes", type=int, default=80, help="foreground classes")
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda or cuda:N")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: torch's default)")
    args = p.parse_args(argv)
    heads = [h.strip() for h in args.heads.split(",") if h.strip()]
    unknown = [h for h in heads if h not in TORCHVISION]
    if unknown or not heads:
        p.error(f"--heads {args.heads!r}: unknown {unknown}; choose among {','.join(TORCHVISION)}")
    args.heads = heads
    return args


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        hw = f"{torch.cuda.get_device_name(device)} (bf16 autocast)"
    else:
        hw = f"CPU {cpu_name()}, {torch.get_num_threads()} threads (fp32)"
    print(f"# detection speed | {hw} | torch {torch.__version__} | batch {args.batch} | size {args.size} | "
          f"steps {args.steps} after {args.warmup} warm-up | {args.num_classes} classes")
    print(f"{'head':<12} {'params M zoo/tv':>16} {'train img/s zoo':>16} {'tv':>8} {'ratio':>6} "
          f"{'infer img/s zoo':>16} {'tv':>8} {'ratio':>6}")
    results = {}
    for head in args.heads:
        r = bench_head(head, args, device)
        results[head] = r
        print(f"{head:<12} {r['zoo_params_M']:>7.1f}/{r['tv_params_M']:<8.1f} {r['zoo_train']:>16.2f} "
              f"{r['tv_train']:>8.2f} {r['zoo_train'] / r['tv_train']:>6.2f} {r['zoo_infer']:>16.2f} "
              f"{r['tv_infer']:>8.2f} {r['zoo_infer'] / r['tv_infer']:>6.2f}", flush=True)
    return results


if __name__ == "__main__":
    main()
