"""Text-to-image generation in the zoo: captions for COCO-style data, a pixel-space diffusion head
(:mod:`zoo.heads.generation`, diffusers' UNet and schedulers), the :class:`Generator` that samples from it, and a
GenEval-style evaluation graded by the zoo's own detectors (:mod:`zoo.generation.grading`), with FID / KID in the
feature space of a zoo backbone (:mod:`zoo.generation.fid`). Image variations condition the head on the embedding of
a frozen zoo similarity model (:mod:`zoo.generation.conditioning`, :meth:`Generator.vary`); the denoiser and text
encoder export to ONNX and drive the same sampler under onnxruntime (:mod:`zoo.generation.export`,
``Generator(model, backend="onnx")``). Latent diffusion: a diffusion head with ``latent: {vae: <bundle>}`` denoises
the latents of a frozen zoo autoencoder (the ``vae`` head, :mod:`zoo.heads.autoencoder`; :mod:`zoo.generation.latent`).

Importing this package is lean (torch, numpy, PIL); diffusers (``pip install -e ".[gen]"``) is imported when a
diffusion head is built.
"""

from __future__ import annotations

from zoo._lazy import lazy_getattr

_LAZY = {
    "Generator": ("zoo.generation.sampler", "Generator"),
    "GeneratedImages": ("zoo.generation.results", "GeneratedImages"),
    "Reconstruction": ("zoo.generation.results", "Reconstruction"),
    "LatentCodec": ("zoo.generation.latent", "LatentCodec"),
    "Vocabulary": ("zoo.generation.captions", "Vocabulary"),
    "caption_for_objects": ("zoo.generation.captions", "caption_for_objects"),
    "read_coco_captions": ("zoo.generation.captions", "read_coco_captions"),
    "prompt_set": ("zoo.generation.prompts", "prompt_set"),
    "Grader": ("zoo.generation.grading", "Grader"),
    "ImageEmbedder": ("zoo.generation.conditioning", "ImageEmbedder"),
    "OnnxGeneration": ("zoo.generation.export", "OnnxGeneration"),
    "export_denoiser": ("zoo.generation.export", "export_denoiser"),
}

__all__ = sorted(_LAZY)


__getattr__ = lazy_getattr("zoo.generation", _LAZY, globals())
