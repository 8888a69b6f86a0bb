"""``zoo.Generator``: prompts in, uint8 images out, from a model with a generation head.

    g = zoo.load("<run>/bundle")
    images = zoo.Generator(g)(["two red stars and a blue circle"], steps=25, guidance=4.0, seed=0, sampler="ddim")

Image ``i`` of a call starts from noise seeded ``seed + i`` (drawn on the CPU), so a seed gives the same images
whatever the batch size or device order; DDIM (eta 0) and DPM-Solver are deterministic after that.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

__all__ = ["Generator"]


class Generator:
    """Sample images from a zoo model's generation head.

    Args:
        model: a :class:`~zoo.models.ZooModel` with a generation head, or anything :func:`zoo.load` takes.
        head: which generation head (default: the first).
        device: where it runs (default: where the model is).
        batch_size: prompts per UNet batch (classifier-free guidance doubles it).
    """

    def __init__(self, model: Any, *, head: str | None = None, device: str | torch.device | None = None,
                 batch_size: int = 16) -> None:
        import zoo

        if not isinstance(model, torch.nn.Module):
            model = zoo.load(model if not isinstance(model, os.PathLike) else str(model), device=device or "cpu")
        gens = [n for n, h in model.heads.items() if h.result_kind == "generation"]
        if not gens:
            raise ValueError(f"Generator needs a model with a generation head; its heads are "
                             f"{ {n: h.result_kind for n, h in model.heads.items()} }")
        if head is not None and head not in gens:
            raise KeyError(f"head {head!r} is not a generation head of this model (those are {gens})")
        self.model = model.to(device).eval() if device is not None else model.eval()
        self.head_name = head or gens[0]
        self.head = self.model.heads[self.head_name]
        self.batch_size = max(1, int(batch_size))

    @property
    def image_size(self) -> int:
        return int(self.head.image_size)

    def __call__(self, prompts: str | Sequence[str], *, steps: int | None = None, guidance: float | None = None,
                 seed: int = 0, sampler: str | None = None, n: int = 1) -> list[np.ndarray]:
        """``(S, S, 3)`` uint8 images: ``n`` per prompt (prompt-major), image ``i`` from noise seed ``seed + i``.

        Args:
            prompts: one prompt or a list; ``""`` samples unconditionally.
            steps: sampler steps (default: the head's, 25). guidance: classifier-free guidance scale (1: none).
            seed: the first image's noise seed. sampler: ``"ddim"`` or ``"dpm"`` (DPM-Solver++ multistep).
            n: images per prompt.
        """
        plist = [prompts] if isinstance(prompts, str) else [str(p) for p in prompts]
        plist = [p for p in plist for _ in range(int(n))]
        out: list[np.ndarray] = []
        for start in range(0, len(plist), self.batch_size):
            chunk = plist[start:start + self.batch_size]
            imgs = self.head.generate(chunk, steps=steps, guidance=guidance, sampler=sampler,
                                      seeds=[int(seed) + start + i for i in range(len(chunk))])
            out.extend(im.numpy() for im in imgs)
        return out

    def results(self, prompts: str | Sequence[str], **kwargs: Any) -> list[Any]:
        """As :meth:`__call__`, as :class:`~zoo.generation.results.GeneratedImages` (with prompt, seed, settings)."""
        from zoo.generation.results import GeneratedImages

        plist = [prompts] if isinstance(prompts, str) else list(prompts)
        n = int(kwargs.get("n", 1))
        imgs = self(plist, **kwargs)
        d = self.head.defaults
        seed = int(kwargs.get("seed", 0))
        return [GeneratedImages(image=im, prompt=plist[i // n], seed=seed + i,
                                steps=int(kwargs.get("steps") or d["steps"]),
                                guidance=float(kwargs.get("guidance") if kwargs.get("guidance") is not None
                                               else d["guidance"]),
                                sampler=str(kwargs.get("sampler") or d["sampler"])) for i, im in enumerate(imgs)]
