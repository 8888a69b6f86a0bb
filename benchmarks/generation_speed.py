"""Text-to-image speed: training images/s of the diffusion head, and sampling latency per image of the zoo's
sampler (torch and the ONNX-exported denoiser under onnxruntime) against diffusers' own pipeline loop running the
same UNet, scheduler and steps, in one process.

    python benchmarks/generation_speed.py                          # CPU defaults: about 3 minutes on 2 cores
    python benchmarks/generation_speed.py --steps 50 --repeats 5 --batch 1,4,16

The model is the ``shapes_t2i`` experiment's (``conf/model/generation.yaml`` head settings,
``conf/experiment/shapes_t2i.yaml`` image size and training batch), randomly initialised: speed does not depend on
the weights (the UNet's output layer is scaled up, :data:`OUTPUT_SCALE`, so that the sampled images are not flat and
the image comparison below means something).

* Training: one optimiser step of the head as the experiment trains it (its ``loss`` on a batch of embedded-dataset
  pictures and captions at the experiment's size, backward, gradient clipping at 1.0, AdamW), timed over
  ``--train-steps`` steps after ``--warmup``; text only, and with ``image_condition`` (``prob`` 0.5: half the
  samples are embedded by the frozen similarity model ``test_resnet.shapes_sim``). Lightning, data loading and EMA
  are not included (``benchmarks/speed.py`` measures the trainer's own cost).
* Sampling, per sampler (``ddim``, ``dpm``) and batch size, with classifier-free guidance (each UNet call sees twice
  the batch): ``zoo`` (:class:`zoo.Generator`), ``zoo-onnx`` (``Generator(backend="onnx")``; the export is made
  once, before timing) and ``diffusers``: the stock ``DDPMPipeline`` loop (its noise from per-image generators,
  ``set_timesteps``, ``scheduler.step``) with the same scheduler configuration (``head.make_sampler``) and the same
  UNet, wrapped in a small guidance adapter (the uncond / cond batch and ``u + g (c - u)``, as the zoo does).
  diffusers' text-conditional pipelines (``StableDiffusionPipeline`` with ``prompt_embeds``) need ``transformers``,
  which is not a dependency of the project; no transformers-free stock pipeline takes a cross-attention UNet. Every
  side's images are compared with the zoo's (max absolute difference in 0..255 levels).

Repeats are interleaved (the order of the sides alternates), and medians are reported. Writes
``benchmarks/results/generation_speed.md`` and ``.json`` (hardware, versions, the command at the top).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
try:
    import zoo  # noqa: F401
except ImportError:  # run as a script from a checkout: make the package importable
    sys.path.insert(0, str(ROOT))

import zoo  # noqa: E402

SIM = "test_resnet.shapes_sim"
#: The random UNet's output layer is scaled by this so that samples are not flat grey. Not more: at 50, two thirds of
#: the DPM-Solver pixels saturate and the ~1e-6 relative rounding differences of onnxruntime flip clipping decisions
#: (up to 16 levels on 4 % of the pixels at 25 steps; 1 level at 10).
OUTPUT_SCALE = 10.0


# --------------------------------------------------------------------------- the model
def experiment_settings() -> dict[str, Any]:
    """The shapes_t2i head settings, image size, training batch and optimiser from the Hydra config files."""
    from omegaconf import OmegaConf

    model = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "model" / "generation.yaml"))
    exp = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "experiment" / "shapes_t2i.yaml"))
    head = dict(model["heads"]["gen"])
    head.pop("type", None)
    return {"head": head, "size": int(exp["data"]["shapes"]["image_size"]), "batch": int(exp["data"]["batch_size"]),
            "lr": float(exp["optimizer"]["lr"]), "clip": float(exp["trainer"].get("gradient_clip_val") or 0.0),
            "mean": list(model["mean"]), "std": list(model["std"])}


def build(settings: dict[str, Any], size: int, channels: list[int] | None, image_condition: bool) -> Any:
    from zoo.data.shapes import SHAPE_NAMES
    from zoo.generation.captions import shapes_vocabulary

    head = {"type": "diffusion", **settings["head"], "vocab": shapes_vocabulary(SHAPE_NAMES), "image_size": size}
    if channels:
        head["channels"] = channels
    if image_condition:
        head["image_condition"] = {"model": SIM, "tokens": 4, "prob": 0.5}
    spec = {"backbone": {"name": "test_resnet"}, "input_size": [size, size], "mean": settings["mean"],
            "std": settings["std"], "task": "multitask", "heads": {"gen": head}}
    torch.manual_seed(0)
    return zoo.create_model(spec)


def training_batch(n: int, size: int, settings: dict[str, Any]) -> dict[str, Any]:
    """``n`` embedded-dataset pictures of GenEval-style prompts with their texts, normalised as the data module
    normalises them."""
    from zoo.generation.prompts import prompt_set, render_prompt

    prompts = prompt_set(per_category=None)[:n]
    while len(prompts) < n:
        prompts = prompts + prompts[: n - len(prompts)]
    pics = [torch.from_numpy(render_prompt(p, image_size=size, seed=i).copy()).permute(2, 0, 1).float() / 255.0
            for i, p in enumerate(prompts)]
    mean = torch.tensor(settings["mean"]).view(3, 1, 1)
    std = torch.tensor(settings["std"]).view(3, 1, 1)
    images = torch.stack([(p - mean) / std for p in pics])
    return {"images": images, "targets": [p.text for p in prompts], "target_format": "captions"}


def time_training(model: Any, batch: dict[str, Any], steps: int, warmup: int, lr: float, clip: float) -> float:
    """Images/s of ``steps`` optimiser steps after ``warmup`` untimed ones."""
    head = model.heads["gen"]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    model.train()

    def step() -> None:
        loss = head.loss(model(batch["images"]), batch)["loss_diffusion"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()

    for _ in range(warmup):
        step()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    dt = time.perf_counter() - t
    model.eval()
    return batch["images"].shape[0] * steps / dt


# --------------------------------------------------------------------------- the diffusers side
class GuidedUNet(nn.Module):
    """The head's UNet as an unconditional model for diffusers' ``DDPMPipeline``: each call runs the empty caption's
    and the prompts' rows in one batch (unconditional first) and returns ``u + g (c - u)`` as ``.sample``."""

    def __init__(self, unet: nn.Module, ctx: torch.Tensor, mask: torch.Tensor, guidance: float) -> None:
        super().__init__()
        self.unet = unet
        self.ctx, self.mask, self.guidance = ctx, mask, float(guidance)

    @property
    def config(self):
        return self.unet.config

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    @property
    def device(self) -> torch.device:
        return self.unet.device

    def forward(self, sample: torch.Tensor, t: torch.Tensor) -> SimpleNamespace:
        if self.guidance == 1.0:
            out = self.unet(sample, t, encoder_hidden_states=self.ctx[sample.shape[0]:],
                            encoder_attention_mask=self.mask[sample.shape[0]:]).sample
            return SimpleNamespace(sample=out)
        inp = torch.cat([sample, sample])
        out = self.unet(inp, t.expand(inp.shape[0]), encoder_hidden_states=self.ctx,
                        encoder_attention_mask=self.mask).sample
        u, c = out.chunk(2)
        return SimpleNamespace(sample=u + self.guidance * (c - u))


def diffusers_sample(head: Any, prompts: list[str], seeds: list[int], steps: int, guidance: float,
                     sampler: str) -> np.ndarray:
    """``(N, S, S, 3)`` uint8 from ``DDPMPipeline`` (see the module docs)."""
    from diffusers import DDPMPipeline

    dev = torch.device("cpu")
    with torch.no_grad():
        c, cm = head.encode_text(prompts, dev)
        u, um = head.encode_text([""] * len(prompts), dev)
    pipe = DDPMPipeline(unet=GuidedUNet(head.unet, torch.cat([u, c]), torch.cat([um, cm]), guidance),
                        scheduler=head.make_sampler(sampler))
    pipe.set_progress_bar_config(disable=True)
    out = pipe(batch_size=len(prompts), generator=[torch.Generator().manual_seed(s) for s in seeds],
               num_inference_steps=steps, output_type="pt", return_dict=False)[0]
    return (out * 255.0).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


# --------------------------------------------------------------------------- report
def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment() -> dict[str, Any]:
    import diffusers

    versions = {"python": platform.python_version(), "torch": torch.__version__, "diffusers": diffusers.__version__,
                "numpy": np.__version__}
    for name in ("onnx", "onnxruntime"):
        try:
            versions[name] = __import__(name).__version__
        except ImportError:
            versions[name] = None
    return {"hardware": {"cpu": cpu_name(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                         "platform": platform.platform()}, "versions": versions}


def report(res: dict[str, Any]) -> str:
    hw, v = res["hardware"], res["versions"]
    load = res["load_average"]
    lines = [
        "# Text-to-image speed (zoo diffusion head, CPU)", "",
        f"Command: `{res['command']}` ({res['wall_s']:.0f} s)", "",
        f"Machine: {hw['cpu']}, {hw['cores']} CPUs, {hw['torch_threads']} torch / onnxruntime threads "
        f"({hw['platform']}); {res['date']}; load average {load['start']:.1f} at the start, {load['end']:.1f} at the "
        "end" + (" (the machine was shared with other jobs: timings are indicative)"
                 if max(load.values()) > 0.5 + float(hw["cores"] or 1) else ""), "",
        "Versions: " + ", ".join(f"{k} {val}" for k, val in v.items()), "",
        f"Model: the shapes_t2i experiment's head ({res['model']['unet_params_M']:.2f} M UNet + "
        f"{res['model']['text_params_M']:.2f} M text-encoder parameters, channels {res['model']['channels']}, "
        f"{res['size']} px), random weights (output layer x{res['model']['output_scale']:g}: images are not flat). "
        f"Medians of {res['repeats']} interleaved repeats.", "",
        f"Training (batch {res['train_batch']}, {res['train_steps']} timed steps after {res['warmup']}; loss, "
        "backward, clipping, AdamW):", "",
        "| conditioning | img/s |", "|---|---|"]
    for name, r in res["training"].items():
        lines.append(f"| {name} | {r['img_s']:.1f} |")
    lines += ["", f"Sampling ({res['steps']} steps, guidance {res['guidance']}): latency per image (ms) = the call's "
              "wall time / batch; max diff = largest absolute difference from the zoo torch images (0..255 "
              "levels).", "",
              "| sampler | batch | side | ms / image | img/s | vs zoo | max diff |", "|---|---|---|---|---|---|---|"]
    for r in res["sampling"]:
        lines.append(f"| {r['sampler']} | {r['batch']} | {r['side']} | {r['ms_per_image']:.1f} | "
                     f"{1000.0 / r['ms_per_image']:.1f} | {r['speedup_vs_zoo']:.2f}x | {r['max_diff']} |")
    lines += ["", "vs zoo: the zoo torch side's time / this side's (> 1: faster). zoo-onnx: the same sampler loop with "
              "the UNet call and the text encoder under onnxruntime (zoo.generation.export). diffusers: "
              "DDPMPipeline's loop with the same scheduler and UNet (a guidance adapter; see the script's docs for "
              "why not StableDiffusionPipeline)."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=25, help="sampler steps (default 25)")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved repeats (medians reported)")
    ap.add_argument("--batch", default="1,8", help="sampling batch sizes, comma separated (default 1,8)")
    ap.add_argument("--samplers", default="ddim,dpm")
    ap.add_argument("--sides", default="zoo,zoo-onnx,diffusers")
    ap.add_argument("--guidance", type=float, default=4.0)
    ap.add_argument("--train-steps", type=int, default=30, help="timed training steps per repeat")
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps / calls before timing")
    ap.add_argument("--train-batch", type=int, default=None, help="default: the experiment's (16)")
    ap.add_argument("--size", type=int, default=None, help="image size (default: the experiment's, 32)")
    ap.add_argument("--channels", default=None, help="UNet channels, comma separated (default: the experiment's)")
    ap.add_argument("--threads", type=int, default=None, help="torch / onnxruntime threads (default: torch's)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "generation_speed"))
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    t_start = time.perf_counter()
    load0 = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    settings = experiment_settings()
    size = a.size or settings["size"]
    train_batch = a.train_batch or settings["batch"]
    channels = [int(c) for c in a.channels.split(",")] if a.channels else None
    batches = [int(b) for b in a.batch.split(",")]
    samplers = a.samplers.split(",")
    sides = a.sides.split(",")
    unknown = sorted(set(sides) - {"zoo", "zoo-onnx", "diffusers"})
    if unknown:
        raise SystemExit(f"--sides: unknown {unknown}; use zoo, zoo-onnx, diffusers")

    # ---- training
    models = {"text": build(settings, size, channels, False), "text + image (prob 0.5)": build(settings, size,
                                                                                              channels, True)}
    batch = training_batch(train_batch, size, settings)
    train: dict[str, list[float]] = {k: [] for k in models}
    for rep in range(a.repeats):
        for name in (list(models) if rep % 2 == 0 else list(reversed(models))):
            train[name].append(time_training(models[name], batch, a.train_steps, a.warmup if rep == 0 else 1,
                                             settings["lr"], settings["clip"]))
            print(f"[train #{rep}] {name}: {train[name][-1]:.1f} img/s", flush=True)

    # ---- sampling
    model = build(settings, size, channels, False).eval()
    head = model.heads["gen"]
    with torch.no_grad():  # a random UNet's output is ~0: make the images (and their comparison) mean something
        for p in head.unet.conv_out.parameters():
            p.mul_(OUTPUT_SCALE)
    gens: dict[str, Any] = {"zoo": zoo.Generator(model, batch_size=max(batches))}
    tmp = tempfile.TemporaryDirectory(prefix="zoo_gen_speed_")
    if "zoo-onnx" in sides:
        t = time.perf_counter()
        gens["zoo-onnx"] = zoo.Generator(model, batch_size=max(batches), backend="onnx", onnx_dir=tmp.name)
        print(f"onnx export: {time.perf_counter() - t:.1f} s", flush=True)
    from zoo.generation.prompts import prompt_set

    texts = [p.text for p in prompt_set(per_category=None)]

    def run(side: str, sampler: str, b: int) -> np.ndarray:
        prompts = texts[:b]
        if side == "diffusers":
            return diffusers_sample(head, prompts, list(range(b)), a.steps, a.guidance, sampler)
        return np.stack(gens[side](prompts, steps=a.steps, guidance=a.guidance, seed=0, sampler=sampler))

    cases = [(s, b, side) for s in samplers for b in batches for side in sides]
    times: dict[tuple, list[float]] = {c: [] for c in cases}
    images: dict[tuple, np.ndarray] = {}
    for side in sides:  # warm-up: one-time allocations, onnxruntime's first runs
        for s in samplers:
            run(side, s, batches[0])
    for rep in range(a.repeats):
        for c in (cases if rep % 2 == 0 else list(reversed(cases))):
            t = time.perf_counter()
            images[c] = run(c[2], c[0], c[1])
            times[c].append(time.perf_counter() - t)
        print(f"[sample #{rep}] " + ", ".join(f"{s}/b{b}/{side} {times[(s, b, side)][-1]:.2f}s"
                                              for s, b, side in cases), flush=True)
    rows = []
    for s, b, side in cases:
        med = statistics.median(times[(s, b, side)])
        ref = statistics.median(times[(s, b, "zoo")]) if (s, b, "zoo") in times else med
        diff = int(np.abs(images[(s, b, side)].astype(int) - images[(s, b, "zoo")].astype(int)).max()) \
            if (s, b, "zoo") in images else None
        rows.append({"sampler": s, "batch": b, "side": side, "ms_per_image": 1000.0 * med / b,
                     "speedup_vs_zoo": ref / med, "max_diff": diff, "times_s": times[(s, b, side)]})
    tmp.cleanup()
    res: dict[str, Any] = {
        "command": ("python benchmarks/generation_speed.py "
                    + shlex.join(argv if argv is not None else sys.argv[1:])).strip(),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), **environment(),
        "size": size, "steps": a.steps, "guidance": a.guidance, "repeats": a.repeats, "train_batch": train_batch,
        "train_steps": a.train_steps, "warmup": a.warmup,
        "model": {"channels": list(head.unet.config.block_out_channels), "output_scale": OUTPUT_SCALE,
                  "unet_params_M": sum(p.numel() for p in head.unet.parameters()) / 1e6,
                  "text_params_M": sum(p.numel() for p in head.text.parameters()) / 1e6},
        "training": {k: {"img_s": statistics.median(v), "runs": v} for k, v in train.items()},
        "sampling": rows,
        "load_average": {"start": load0, "end": os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0},
        "wall_s": time.perf_counter() - t_start,
    }
    text = report(res)
    print(text)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(res, indent=2) + "\n")
    out.with_suffix(".md").write_text(text)
    return res


if __name__ == "__main__":
    main()
