"""``zoo.Generator``: prompts in, uint8 images out, from a model with a generation head.

    g = zoo.load("<run>/bundle")
    images = zoo.Generator(g)(["two red stars and a blue circle"], steps=25, guidance=4.0, seed=0, sampler="ddim")

    variations = zoo.Generator(g).vary("reference.png", n=4)   # a head trained with image_condition
    images = zoo.Generator(g, backend="onnx", onnx_dir="runs/x/onnx_gen")(["a red star"])  # the ONNX denoiser

Image ``i`` of a call starts from noise seeded ``seed + i`` (drawn on the CPU), so a seed gives the same images
whatever the batch size or device order; DDIM (eta 0) and DPM-Solver are deterministic after that.

:meth:`Generator.vary` conditions on the embedding of a reference picture by the frozen zoo similarity model the
head was trained with (``image_condition``; :mod:`zoo.generation.conditioning`). The reference is first brought to
the generation model's training resolution exactly as its training images were (the spec's ``resize`` to
``input_size``, then the head's ``image_size``), then embedded with the similarity model's own preprocessing: the
head's projection only ever saw embeddings of ``image_size`` pictures, and a 512 px reference embedded at full
resolution would give it embeddings it never saw.

A latent diffusion head (``latent: {vae: ...}``) samples latents and decodes them with its frozen VAE: the calls are the
same, and so are the seeds (the start noise has the latents' shape).

``backend="onnx"`` runs the same sampler loop with the UNet call and the text encoder exported to ONNX
(:mod:`zoo.generation.export`) under onnxruntime: ``onnx_dir`` holds the export (written there when the folder has
none; a folder exported from other weights is refused); without ``onnx_dir`` the export goes to a temporary folder.
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
        backend: ``"torch"`` or ``"onnx"`` (the denoiser and text encoder under onnxruntime, CPU).
        onnx_dir: the ONNX export folder for ``backend="onnx"`` (see the module docs).
    """

    def __init__(self, model: Any, *, head: str | None = None, device: str | torch.device | None = None,
                 batch_size: int = 16, backend: str = "torch", onnx_dir: str | os.PathLike[str] | None = None
                 ) -> None:
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
        if backend not in ("torch", "onnx"):
            raise ValueError(f"Generator: backend={backend!r}; use 'torch' or 'onnx' (the exported denoiser under "
                             "onnxruntime)")
        if onnx_dir is not None and backend != "onnx":
            raise ValueError("Generator: onnx_dir is given but backend='torch'; pass backend='onnx' to use it")
        self.backend = backend
        self.onnx = None
        self._tmp = None
        if backend == "onnx":
            self.onnx = self._load_onnx(onnx_dir)

    def _load_onnx(self, onnx_dir: str | os.PathLike[str] | None):
        import tempfile
        from pathlib import Path

        from zoo.generation.export import META_FILE, OnnxGeneration, export_denoiser

        if onnx_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="zoo_onnx_gen_")  # removed with the Generator
            onnx_dir = self._tmp.name
        folder = Path(onnx_dir).expanduser()
        if not (folder / META_FILE).is_file():
            export_denoiser(self.head, folder)
        return OnnxGeneration(folder, head=self.head)

    def _backend_kwargs(self) -> dict[str, Any]:
        if self.onnx is None:
            return {}
        return {"denoiser": self.onnx.denoise, "text_encoder": self.onnx.encode if self.onnx.has_text_encoder else None}

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
                                      seeds=[int(seed) + start + i for i in range(len(chunk))],
                                      **self._backend_kwargs())
            out.extend(im.numpy() for im in imgs)
        return out

    def reference_pixels(self, images: Any) -> torch.Tensor:
        """Reference pictures (one or a list: paths, PIL images, ``(H, W, 3)`` uint8 arrays, ``(3, H, W)`` uint8
        tensors) -> ``(R, 3, S, S)`` RGB in ``[0, 1]`` at the head's ``image_size``, as its training images were
        (the spec's ``resize`` to ``input_size`` and normalisation, then :meth:`DiffusionHead.to_pixels`; no
        ``size_divisor`` padding, which would only squeeze a border into the picture)."""
        from zoo.generation.conditioning import as_reference_list
        from zoo.predictor import to_rgb_array
        from zoo.preprocess import compute_resize, normalize, resize_image

        s = self.model.spec
        dev = next(self.head.unet.parameters()).device
        rows = []
        for image in as_reference_list(images):
            arr = to_rgb_array(image)
            t = normalize(resize_image(arr, compute_resize(arr.shape[:2], s.input_size, s.resize)), s.mean, s.std)
            x = self.head.to_pixels(t[None].to(dev))
            rows.append((x + 1.0) * 0.5)
        if not rows:
            return torch.zeros(0, 3, self.image_size, self.image_size, device=dev)
        return torch.cat(rows)

    def embed(self, images: Any) -> torch.Tensor:
        """``(R, D)`` similarity embeddings of reference pictures, as :meth:`vary` conditions on them."""
        self.head._require_image_condition("Generator.embed")
        return self.head.embed_pixels(self.reference_pixels(images))

    @torch.no_grad()
    def vary(self, images: Any, *, n: int = 4, steps: int | None = None, guidance: float | None = None,
             seed: int = 0, sampler: str | None = None) -> list[np.ndarray]:
        """``n`` variations of each reference picture: ``(S, S, 3)`` uint8 images, reference-major, image ``i``
        from noise seed ``seed + i`` (as :meth:`__call__`).

        Args:
            images: one reference (a path, a PIL image, an ``(H, W, 3)`` uint8 array, a ``(3, H, W)`` uint8 tensor)
                or a list of them (a 4-D array / tensor is a batch).
            n: variations per reference. steps, guidance, seed, sampler: as :meth:`__call__` (guidance is against
                the empty caption, the unconditional input the head trained with).
        """
        self.head._require_image_condition("Generator.vary")
        if int(n) < 1:
            raise ValueError(f"vary: n={n}; give at least 1 variation per reference")
        emb = self.embed(images)
        rows = emb.repeat_interleave(int(n), dim=0)
        out: list[np.ndarray] = []
        for start in range(0, rows.shape[0], self.batch_size):
            chunk = rows[start:start + self.batch_size]
            imgs = self.head.vary(chunk, steps=steps, guidance=guidance, sampler=sampler,
                                  seeds=[int(seed) + start + i for i in range(chunk.shape[0])],
                                  **self._backend_kwargs())
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
