"""ONNX export of a diffusion head's networks, and the sampler loop running on them under onnxruntime.

    zoo.generation.export.export_denoiser(model, "runs/x/onnx_gen")  # denoiser.onnx, text_encoder.onnx, generation.json
    images = zoo.Generator(model, backend="onnx", onnx_dir="runs/x/onnx_gen")(["a red star"], steps=25)

The sampler loop (timesteps, scheduler steps, guidance) is Python around the UNet, so it is not in a graph: what is
exported is one denoising call, ``denoiser.onnx``: ``x_t (B, 3, S, S) float32, t (B,) int64, ctx (B, L, text_dim)
float32, mask (B, L) bool -> prediction (B, 3, S, S)`` (noise or v, the head's ``prediction_type``), and the text
encoder, ``text_encoder.onnx``: ``ids (B, max_tokens) int64, mask (B, max_tokens) bool -> ctx``. Batch and ``L`` are
dynamic. ``generation.json`` beside them records the files' sha256s, the vocabulary, the sampler settings and a
digest of the UNet and text-encoder weights they were exported from (:func:`weights_digest`), so that a folder
exported from other weights is refused instead of silently giving other images. Image-variation conditioning
(the projection of a similarity embedding) stays in torch: it runs once per call, not once per step. For a latent
diffusion head (``latent: {vae: ...}``) the denoiser works on the scaled VAE latents, ``x_t (B, latent_channels, s, s)``
(``sample_shape`` in ``generation.json``, which also records the autoencoder's reference and sha256); the VAE decode of
the final latents stays in torch (it runs once per call): only the denoiser and the text encoder are ONNX.

onnx and onnxruntime are imported on demand (``pip install -e ".[export]"``).
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["DENOISER_FILE", "TEXT_ENCODER_FILE", "META_FILE", "OnnxGeneration", "export_denoiser", "weights_digest"]

DENOISER_FILE = "denoiser.onnx"
TEXT_ENCODER_FILE = "text_encoder.onnx"
META_FILE = "generation.json"
FORMAT = "zoo.generation.onnx"


def _generation_head(model: Any, head: str | None = None):
    """The diffusion head of a ZooModel (or the head itself)."""
    from zoo.heads.generation import DiffusionHead

    if isinstance(model, DiffusionHead):
        return model
    heads = getattr(model, "heads", None)
    if heads is None:
        raise TypeError(f"export_denoiser takes a zoo model with a diffusion head (or the head), got "
                        f"{type(model).__name__}")
    gens = [n for n, h in heads.items() if isinstance(h, DiffusionHead)]
    if not gens:
        raise ValueError(f"export_denoiser: the model has no diffusion head; its heads are "
                         f"{ {n: h.result_kind for n, h in heads.items()} }")
    if head is not None and head not in gens:
        raise KeyError(f"head {head!r} is not a diffusion head of this model (those are {gens})")
    return heads[head or gens[0]]


def weights_digest(head: Any) -> str:
    """sha256 over the names, dtypes, shapes and bytes of the UNet's and text encoder's tensors (what the ONNX
    files hold), in ``state_dict`` order."""
    h = hashlib.sha256()
    for prefix, module in (("unet.", head.unet), ("text.", head.text)):
        for name, t in module.state_dict().items():
            t = t.detach().cpu().contiguous()
            h.update(f"{prefix}{name}|{t.dtype}|{tuple(t.shape)}|".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _sha256_file(path: Path) -> str:
    from zoo.hub.bundle import sha256_file

    return sha256_file(path)


class _Denoise(nn.Module):
    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, x: torch.Tensor, t: torch.Tensor, ctx: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.unet(x, t, encoder_hidden_states=ctx, encoder_attention_mask=mask, return_dict=False)[0]


class _Text(nn.Module):
    def __init__(self, text: nn.Module) -> None:
        super().__init__()
        self.text = text

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.text(ids, mask)


def export_denoiser(model: Any, path: str | os.PathLike[str], *, head: str | None = None, opset: int = 17,
                    text_encoder: bool = True) -> Path:
    """Export one denoising call (and the text encoder) of a diffusion head to ONNX (see the module docs).

    Args:
        model: a :class:`~zoo.models.ZooModel` with a diffusion head, or the :class:`DiffusionHead`.
        path: the output folder (created; not a bundle folder). Existing export files in it are replaced.
        head: which diffusion head (default: the first).
        opset: ONNX opset (>= 14: the attention is ``scaled_dot_product_attention``).
        text_encoder: also write ``text_encoder.onnx``.

    Returns:
        The folder, holding ``denoiser.onnx`` (+ ``text_encoder.onnx``) and ``generation.json``.
    """
    h = _generation_head(model, head)
    if int(opset) < 14:
        raise ValueError(f"export_denoiser: opset={opset}; use opset >= 14 (the UNet's attention needs it)")
    folder = Path(path).expanduser()
    if (folder / "model.safetensors").exists():
        raise ValueError(f"export_denoiser: {folder} is a bundle folder; write the ONNX export into its own folder "
                         "(e.g. <run>/onnx_gen)")
    folder.mkdir(parents=True, exist_ok=True)
    dev = next(h.unet.parameters()).device
    S, L = h.image_size, h.context_length
    C, s = int(h.sample_channels), int(h.sample_size)  # pixel space: 3, S; latent space: the latents' shape
    x = torch.randn(2, C, s, s, generator=torch.Generator().manual_seed(0)).to(dev)
    t = torch.tensor([999, 500], dtype=torch.long, device=dev)
    ids, tmask = h.vocab.encode(["a red star", ""])
    ids, tmask = ids.to(dev), tmask.to(dev)
    was_training = h.training
    h.eval()
    try:
        with torch.no_grad():
            ctx, mask = h.encode_text(["a red star", ""], dev)
        files = {"denoiser": folder / DENOISER_FILE}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with torch.no_grad():
                # The TorchScript-based exporter: it needs no extra package (the dynamo exporter needs onnxscript).
                torch.onnx.export(_Denoise(h.unet), (x, t, ctx, mask), str(files["denoiser"]), dynamo=False,
                                  input_names=["x_t", "t", "ctx", "mask"], output_names=["prediction"],
                                  dynamic_axes={"x_t": {0: "batch"}, "t": {0: "batch"},
                                                "ctx": {0: "batch", 1: "tokens"}, "mask": {0: "batch", 1: "tokens"},
                                                "prediction": {0: "batch"}},
                                  opset_version=int(opset), do_constant_folding=True)
                if text_encoder:
                    files["text_encoder"] = folder / TEXT_ENCODER_FILE
                    # eval-mode TransformerEncoderLayer takes a fused "fast path" (one aten op ONNX has no
                    # symbolic for); the plain path is the same maths
                    fast = torch.backends.mha.get_fastpath_enabled()
                    torch.backends.mha.set_fastpath_enabled(False)
                    try:
                        torch.onnx.export(_Text(h.text), (ids, tmask), str(files["text_encoder"]), dynamo=False,
                                          input_names=["ids", "mask"], output_names=["ctx"],
                                          dynamic_axes={"ids": {0: "batch"}, "mask": {0: "batch"},
                                                        "ctx": {0: "batch"}},
                                          opset_version=int(opset), do_constant_folding=True)
                    finally:
                        torch.backends.mha.set_fastpath_enabled(fast)
    finally:
        h.train(was_training)
    if not text_encoder and (folder / TEXT_ENCODER_FILE).exists():
        (folder / TEXT_ENCODER_FILE).unlink()  # a stale one from an earlier export must not be picked up
    try:
        import onnx
    except ImportError:  # pragma: no cover - depends on the environment
        pass
    else:
        for f in files.values():
            onnx.checker.check_model(str(f))
    sched = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dict(h.train_scheduler.config).items()
             if not k.startswith("_")}
    meta = {
        "format": FORMAT, "version": 1, "head": h.name or h.default_name, "opset": int(opset),
        "weights_sha256": weights_digest(h),
        "files": {k: {"file": f.name, "sha256": _sha256_file(f), "bytes": f.stat().st_size} for k, f in files.items()},
        "image_size": S, "sample_shape": [C, s, s], "latent": dict(h.latent) if h.latent is not None else None,
        "text_dim": int(ctx.shape[-1]), "context_length": L, "max_tokens": h.vocab.max_tokens,
        "prediction_type": h.prediction_type, "train_scheduler": sched, "defaults": dict(h.defaults),
        "vocab": list(h.vocab.words),
        "inputs": {"denoiser": [f"x_t (batch, {C}, {s}, {s}) float32, "
                                + ("scaled VAE latents (decode them with the VAE in torch)" if h.latent is not None
                                   else "in [-1, 1] scale"), "t (batch,) int64 timesteps",
                                f"ctx (batch, tokens, {int(ctx.shape[-1])}) float32 (the sampler pads to "
                                f"{L} tokens)", "mask (batch, tokens) bool, true for real tokens"],
                   "text_encoder": [f"ids (batch, {h.vocab.max_tokens}) int64 from the vocab (0 pad, 1 bos, 2 unk)",
                                    "mask (batch, max_tokens) bool = ids != 0"]},
        "outputs": {"denoiser": f"prediction (batch, {C}, {s}, {s}) float32: {h.prediction_type}",
                    "text_encoder": "ctx (batch, max_tokens, text_dim) float32"},
        "torch": torch.__version__,
    }
    (folder / META_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return folder


class OnnxGeneration:
    """The exported networks of one diffusion head under onnxruntime, as drop-in callables for
    :meth:`DiffusionHead.generate` / ``vary`` (``denoiser=gen.denoise, text_encoder=gen.encode``).

    Args:
        folder: what :func:`export_denoiser` wrote.
        head: the torch head it must belong to: its weights digest and image size are checked (a folder exported
            from other weights raises ValueError); ``None`` skips the check.
        providers: onnxruntime execution providers (default: CPU).
        threads: intra-op threads (default: torch's ``get_num_threads()``, so both backends use the same cores).
    """

    def __init__(self, folder: str | os.PathLike[str], *, head: Any = None, providers: list[str] | None = None,
                 threads: int | None = None) -> None:
        try:
            import onnxruntime as ort
        except ImportError as err:  # pragma: no cover - depends on the environment
            raise ImportError("backend='onnx' needs onnxruntime: pip install -e \".[export]\" (or pip install "
                              "onnxruntime)") from err
        self.folder = Path(folder).expanduser()
        meta_path = self.folder / META_FILE
        if not meta_path.is_file():
            raise FileNotFoundError(f"{meta_path} does not exist: export the denoiser first with "
                                    "zoo.generation.export.export_denoiser(model, folder)")
        self.meta = json.loads(meta_path.read_text(encoding="utf-8"))
        if self.meta.get("format") != FORMAT:
            raise ValueError(f"{meta_path} is not a diffusion export (format {self.meta.get('format')!r})")
        for key, rec in self.meta["files"].items():
            f = self.folder / rec["file"]
            if not f.is_file() or _sha256_file(f) != rec["sha256"]:
                raise ValueError(f"{f} is missing or does not match the sha256 in {meta_path}: re-export the folder "
                                 "with export_denoiser")
        if head is not None:
            digest = weights_digest(head)
            if digest != self.meta["weights_sha256"] or int(self.meta["image_size"]) != int(head.image_size):
                raise ValueError(f"onnx_dir={str(self.folder)!r} was exported from other weights (digest "
                                 f"{self.meta['weights_sha256'][:12]}..., this model's {digest[:12]}...): re-export "
                                 "it with export_denoiser(model, folder), or give an empty or new onnx_dir (the "
                                 "Generator exports into it)")
            lat = (self.meta.get("latent") or {}).get("sha256")
            want = (getattr(head, "latent", None) or {}).get("sha256")
            if lat != want:
                raise ValueError(f"onnx_dir={str(self.folder)!r} was exported for latents of the autoencoder {lat!r}, "
                                 f"this head decodes with {want!r}: re-export it with export_denoiser(model, folder)")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = int(threads or torch.get_num_threads())
        opts.inter_op_num_threads = 1
        prov = providers or ["CPUExecutionProvider"]
        self._denoiser = ort.InferenceSession(str(self.folder / self.meta["files"]["denoiser"]["file"]), opts,
                                              providers=prov)
        te = self.meta["files"].get("text_encoder")
        self._text = ort.InferenceSession(str(self.folder / te["file"]), opts, providers=prov) if te else None

    @property
    def has_text_encoder(self) -> bool:
        return self._text is not None

    def denoise(self, x: torch.Tensor, t: torch.Tensor, ctx: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """As :meth:`DiffusionHead.denoise`, on onnxruntime (the result on ``x``'s device and dtype)."""
        feeds = {"x_t": x.detach().float().cpu().numpy(), "t": t.detach().long().cpu().numpy(),
                 "ctx": ctx.detach().float().cpu().numpy(), "mask": mask.detach().bool().cpu().numpy()}
        (out,) = self._denoiser.run(None, feeds)
        return torch.from_numpy(out).to(x.device, x.dtype)

    def encode(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """As the head's text encoder, ``(ids, mask) -> ctx``, on onnxruntime."""
        if self._text is None:
            raise ValueError(f"{self.folder} holds no {TEXT_ENCODER_FILE}: export with text_encoder=True")
        (out,) = self._text.run(None, {"ids": ids.detach().long().cpu().numpy(),
                                       "mask": mask.detach().bool().cpu().numpy()})
        return torch.from_numpy(out).to(ids.device)
