"""Semantic segmentation speed: zoo decoders on a resnet50 TimmBackbone against torchvision's DeepLabV3-ResNet50.

In one run, for every zoo decoder and for torchvision's ``deeplabv3_resnet50`` (random init, no downloads), on the
same random images and masks, this times

* a training step: forward, loss (cross-entropy at full resolution, 255 ignored), backward, SGD step;
* inference: forward and a full-resolution ``(H, W)`` class map per image (zoo: ``head.predict``;
  torchvision: argmax of its ``out``, which it already upsamples to the input size);

and prints images/s (from the median step time) and the zoo/torchvision ratio. On CUDA everything runs under bf16 autocast (losses in float32).

    python benchmarks/segmentation_speed.py --decoders semantic_fpn,upernet,deeplabv3plus --batch 2 --size 256

Differences by construction: torchvision's DeepLabV3 dilates the last two ResNet stages (output stride 8, so its
backbone costs several times more) and has no low-level decoder; the zoo keeps timm's undilated ResNet (stride 32)
and decodes from stride 4. The zoo decoders use their defaults (GroupNorm, width 256; 128 for the Semantic FPN
branches).
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
import torch.nn.functional as F

try:
    import zoo  # noqa: F401
except ImportError:  # run as a script from a checkout: make the package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from torchvision.models.segmentation import deeplabv3_resnet50  # noqa: E402

from zoo.models import create_model  # noqa: E402

DECODERS = ("semantic_fpn", "upernet", "deeplabv3plus")


def build_zoo(decoder: str, num_classes: int, size: int) -> torch.nn.Module:
    """resnet50 TimmBackbone + one zoo segmentation decoder (random init)."""
    spec = {"backbone": {"name": "resnet50"}, "heads": {"seg": {"type": decoder, "num_classes": num_classes}},
            "input_size": [size, size], "task": "semantic"}
    return create_model(spec)


def build_torchvision(num_classes: int) -> torch.nn.Module:
    """torchvision's reference DeepLabV3-ResNet50 (random init, no auxiliary classifier)."""
    return deeplabv3_resnet50(weights=None, weights_backbone=None, num_classes=num_classes, aux_loss=False)


def _freeze_pooling_norms(model: torch.nn.Module) -> None:
    """Put the BatchNorm layers of torchvision's ASPP pooling branch in eval mode, now and after every
    ``model.train()`` (a forward pre-hook on each of them)."""
    from torchvision.models.segmentation.deeplabv3 import ASPPPooling

    def keep_eval(module: torch.nn.Module, _inputs: Any) -> None:
        module.eval()

    for m in model.modules():
        if isinstance(m, ASPPPooling):
            for bn in m.modules():
                if isinstance(bn, torch.nn.modules.batchnorm._BatchNorm):
                    bn.register_forward_pre_hook(keep_eval)


def random_batch(batch: int, size: int, num_classes: int, device: torch.device, seed: int = 0
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised-looking images ``(B, 3, S, S)`` and masks ``(B, S, S)`` int64 (labels ``0..K-1``, 5% 255)."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, size, size, generator=g)
    masks = torch.randint(0, num_classes, (batch, size, size), generator=g)
    masks[torch.rand(batch, size, size, generator=g) < 0.05] = 255
    return images.to(device), masks.to(device)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], warmup: int, steps: int, device: torch.device) -> float:
    """Median seconds per call of ``fn`` over ``steps`` calls after ``warmup`` untimed ones (the median resists
    the spikes of a shared machine)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _autocast(device: torch.device) -> contextlib.AbstractContextManager:
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()


def measure(model: torch.nn.Module, loss_fn: Callable[[], torch.Tensor], infer_fn: Callable[[], Any],
            args: argparse.Namespace, device: torch.device) -> dict[str, float]:
    """Training and inference images/s of one model, and its parameter count (millions)."""
    opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)

    def train_step() -> None:
        with _autocast(device):
            loss = loss_fn()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def infer() -> None:
        with torch.inference_mode(), _autocast(device):
            infer_fn()

    model.train()
    train = args.batch / timed(train_step, args.warmup, args.steps, device)
    model.eval()
    inference = args.batch / timed(infer, args.warmup, args.steps, device)
    return {"params_M": sum(p.numel() for p in model.parameters()) / 1e6, "train": train, "infer": inference}


def bench_zoo(decoder: str, images: torch.Tensor, masks: torch.Tensor, args: argparse.Namespace,
              device: torch.device) -> dict[str, float]:
    torch.manual_seed(0)
    model = build_zoo(decoder, args.num_classes, args.size).to(device)
    head = model.heads["seg"]
    sizes = [tuple(images.shape[-2:])] * images.shape[0]

    def loss_fn() -> torch.Tensor:
        return sum(head.compute_loss(model(images)["seg"], masks).values())

    def infer_fn() -> list[dict[str, torch.Tensor]]:
        return head.predict(model(images)["seg"], sizes)

    out = measure(model, loss_fn, infer_fn, args, device)
    del model
    return out


def bench_torchvision(images: torch.Tensor, masks: torch.Tensor, args: argparse.Namespace,
                      device: torch.device) -> dict[str, float]:
    torch.manual_seed(0)
    model = build_torchvision(args.num_classes).to(device)
    if images.shape[0] == 1:
        # ASPP's image-pooling branch batch-normalises a (B, 256, 1, 1) map: with one image there is one value per
        # channel and train-mode BatchNorm refuses it. Keep that branch's BatchNorm in eval mode (running
        # statistics), as DeepLab recipes do with small batches; the rest of the model trains as usual.
        _freeze_pooling_norms(model)

    def loss_fn() -> torch.Tensor:
        return F.cross_entropy(model(images)["out"].float(), masks, ignore_index=255)

    def infer_fn() -> torch.Tensor:
        return model(images)["out"].argmax(1)

    out = measure(model, loss_fn, infer_fn, args, device)
    del model
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--decoders", default=",".join(DECODERS), help=f"comma-separated among {','.join(DECODERS)}")
    p.add_argument("--batch", type=int, default=2, help="images per batch")
    p.add_argument("--size", type=int, default=256, help="square image side in pixels")
    p.add_argument("--steps", type=int, default=3, help="timed iterations (after --warmup untimed ones)")
    p.add_argument("--warmup", type=int, default=1, help="untimed iterations before timing")
    p.add_argument("--num-classes", type=int, default=21, help="classes per pixel (21: Pascal VOC)")
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda or cuda:N")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: torch's default)")
    args = p.parse_args(argv)
    decoders = [d.strip() for d in args.decoders.split(",") if d.strip()]
    unknown = [d for d in decoders if d not in DECODERS]
    if unknown or not decoders:
        p.error(f"--decoders {args.decoders!r}: unknown {unknown}; choose among {','.join(DECODERS)}")
    if args.batch < 1 or args.size < 32 or args.steps < 1 or args.warmup < 0:
        p.error("need --batch >= 1, --size >= 32, --steps >= 1 and --warmup >= 0")
    if args.batch == 1 and args.size < 64:
        p.error("--batch 1 needs --size >= 64: a ResNet's stride-32 map is then at least 2x2 (train-mode BatchNorm "
                "refuses one value per channel)")
    args.decoders = decoders
    return args


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        hw = f"{torch.cuda.get_device_name(device)} (bf16 autocast)"
    else:
        hw = f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads (fp32)"
    print(f"# segmentation speed | {hw} | torch {torch.__version__} | batch {args.batch} | size {args.size} | "
          f"steps {args.steps} after {args.warmup} warm-up | {args.num_classes} classes")
    images, masks = random_batch(args.batch, args.size, args.num_classes, device)
    results = {"torchvision_deeplabv3": bench_torchvision(images, masks, args, device)}
    tv = results["torchvision_deeplabv3"]
    print(f"{'model':<24} {'params M':>9} {'train img/s':>12} {'x tv':>6} {'infer img/s':>12} {'x tv':>6}")
    print(f"{'tv deeplabv3_resnet50':<24} {tv['params_M']:>9.1f} {tv['train']:>12.2f} {1:>6.2f} "
          f"{tv['infer']:>12.2f} {1:>6.2f}", flush=True)
    for decoder in args.decoders:
        r = bench_zoo(decoder, images, masks, args, device)
        results[decoder] = r
        print(f"{'zoo r50 + ' + decoder:<24} {r['params_M']:>9.1f} {r['train']:>12.2f} "
              f"{r['train'] / tv['train']:>6.2f} {r['infer']:>12.2f} {r['infer'] / tv['infer']:>6.2f}", flush=True)
    return results


if __name__ == "__main__":
    main()
