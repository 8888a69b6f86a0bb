"""Validation of a generation head: the diffusion loss at fixed noise and timesteps (comparable across epochs) and,
at a final validation (``trainer.validate``: the end of ``train.py``, or ``evaluate.py``), a grid of samples per
GenEval prompt category written to ``<output_dir>/samples/``.

Metrics: ``denoise_mse`` (lower is better) and ``denoise_r2`` = 1 - mse (the main metric, higher is better; the
target, noise or v, has unit variance); always the unweighted error, whatever the training loss's ``snr_gamma``,
so runs with different weightings compare. The GenEval-style grading needs a detector and sampling time: it is
:mod:`zoo.generation.evaluate`, not a per-epoch metric.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from zoo.metrics.evaluators import Evaluator, is_final_validation

log = logging.getLogger(__name__)

__all__ = ["GenerationEvaluator", "ReconstructionEvaluator", "write_sample_grids"]


class GenerationEvaluator(Evaluator):
    """Fixed-noise diffusion loss on the validation captions; sample grids at a final validation.

    Options: ``grid_per_category`` (prompts per category in the grids, default 4; 0 writes none),
    ``grid_steps`` (default 15) and ``grid_sampler`` (default ``dpm``), ``output_dir``.
    """

    main_metric = "denoise_r2"
    wants_loss = True

    def __init__(self, head: nn.Module, options: Mapping[str, Any] | None = None) -> None:
        super().__init__(head, options)
        self.reset()

    def reset(self) -> None:
        self._sum, self._n, self._batches = 0.0, 0, 0

    @torch.no_grad()
    def update(self, head: nn.Module, raw: Any, batch: Mapping[str, Any]) -> None:
        captions = head.batch_targets(batch)
        if captions is None:
            return
        g = torch.Generator().manual_seed(1000 + self._batches)
        self._batches += 1
        n = len(captions)
        mse = head.diffusion_loss(batch["images"], captions, generator=g, drop=False, weighted=False)
        self._sum += float(mse) * n
        self._n += n
        self._head = head

    def compute(self, module: Any) -> tuple[dict[str, float], dict[str, Any]]:
        if not self._n:
            return {}, {}
        mse = self._sum / self._n
        return {"denoise_mse": mse, "denoise_r2": 1.0 - mse}, {
            "table": f"fixed-noise diffusion loss on {self._n} validation images: mse {mse:.4f}"}

    def details(self, module: Any) -> dict[str, Any]:
        trainer = getattr(module, "_trainer", None)
        head = getattr(self, "_head", None)
        k = int(self.options.get("grid_per_category", 4))
        if trainer is None or head is None or k <= 0 or not trainer.is_global_zero or not is_final_validation(module):
            return {}
        out = Path(self.options.get("output_dir") or trainer.default_root_dir) / "samples"
        files = write_sample_grids(head, out, per_category=k, steps=int(self.options.get("grid_steps", 15)),
                                   sampler=str(self.options.get("grid_sampler", "dpm")))
        return {"samples": [str(f) for f in files]}


def write_sample_grids(head: nn.Module, out: Path, *, per_category: int = 4, steps: int = 15, sampler: str = "dpm",
                       guidance: float | None = None, seed: int = 0) -> list[Path]:
    """One PNG per GenEval prompt category (``grid_<category>.png``: a row of ``per_category`` prompts) plus a
    ``prompts.txt`` naming them; returns the files."""
    import numpy as np
    from PIL import Image

    from zoo.generation.prompts import prompt_set

    names = list(getattr(head, "class_names", None) or []) or None
    prompts = prompt_set(names, per_category=per_category)
    out.mkdir(parents=True, exist_ok=True)
    files: list[Path] = []
    lines = []
    cats = list(dict.fromkeys(p.category for p in prompts))
    was_training = head.training
    head.eval()
    try:
        for cat in cats:
            ps = [p for p in prompts if p.category == cat][:per_category]
            imgs = head.generate([p.text for p in ps], steps=steps, sampler=sampler, guidance=guidance, seed=seed)
            row = np.concatenate([np.pad(im.numpy(), ((2, 2), (2, 2), (0, 0)), constant_values=255) for im in imgs], 1)
            big = Image.fromarray(row).resize((row.shape[1] * 3, row.shape[0] * 3), Image.NEAREST)
            f = out / f"grid_{cat}.png"
            big.save(f)
            files.append(f)
            lines.append(f"{f.name}: " + " | ".join(p.text for p in ps))
    finally:
        head.train(was_training)
    (out / "prompts.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    files.append(out / "prompts.txt")
    log.info("sample grids written to %s", out)
    return files


class ReconstructionEvaluator(Evaluator):
    """Validation of an autoencoder head (``vae``): the reconstruction error of the posterior mean on ``[-1, 1]``
    pixels. Metrics: ``recon_mse``, ``recon_l1`` and ``psnr`` (dB for a peak-to-peak range of 2; the main metric,
    higher is better), plus ``latent_std`` (of the scaled latents: about 1 once the scaling factor is measured)."""

    main_metric = "psnr"
    wants_loss = True

    def __init__(self, head: nn.Module, options: Mapping[str, Any] | None = None) -> None:
        super().__init__(head, options)
        self.reset()

    def reset(self) -> None:
        self._se, self._ae, self._n, self._z, self._z2, self._nz = 0.0, 0.0, 0, 0.0, 0.0, 0

    @torch.no_grad()
    def update(self, head: nn.Module, raw: Any, batch: Mapping[str, Any]) -> None:
        if head.batch_targets(batch) is None:
            return
        target = head.to_pixels(batch["images"]).float()
        recon = raw["recon"].float().clamp(-1, 1)
        self._se += float(((recon - target) ** 2).sum())
        self._ae += float((recon - target).abs().sum())
        self._n += target.numel()
        z = raw["mean"].float() * head.scaling_factor
        self._z += float(z.sum())
        self._z2 += float((z ** 2).sum())
        self._nz += z.numel()

    def compute(self, module: Any) -> tuple[dict[str, float], dict[str, Any]]:
        import math

        if not self._n:
            return {}, {}
        mse, l1 = self._se / self._n, self._ae / self._n
        psnr = 10.0 * math.log10(4.0 / max(mse, 1e-12))
        mz = self._z / self._nz
        zstd = math.sqrt(max(self._z2 / self._nz - mz * mz, 0.0))
        return {"recon_mse": mse, "recon_l1": l1, "psnr": psnr, "latent_std": zstd}, {
            "table": f"reconstruction of {self._n // 3} pixels x 3: mse {mse:.4f}, l1 {l1:.4f}, psnr {psnr:.2f} dB, "
                     f"scaled latent std {zstd:.3f}"}
