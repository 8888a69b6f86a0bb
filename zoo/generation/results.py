"""``GeneratedImages``: the typed result of a generation head (one generated picture and how it was made), and
``Reconstruction``, that of the autoencoder head (a picture encoded and decoded).

Only numpy, torch and PIL are imported (serving path)."""

from __future__ import annotations

import base64
import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["GeneratedImages", "Reconstruction"]


class _Picture:
    """What both results share: one ``(H, W, 3)`` uint8 picture in ``self.image``, its size, PNG bytes, the
    JSON fields of its pixels, and saving as JSON or as the picture."""

    image: np.ndarray

    @property
    def size(self) -> tuple[int, int]:
        return int(self.image.shape[0]), int(self.image.shape[1])

    def png(self) -> bytes:
        from PIL import Image

        buf = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(self.image)).save(buf, format="PNG")
        return buf.getvalue()

    def _pixel_fields(self) -> dict[str, Any]:
        return {"sha256": hashlib.sha256(np.ascontiguousarray(self.image).tobytes()).hexdigest(),
                "png_base64": base64.b64encode(self.png()).decode("ascii")}

    def to_dict(self) -> dict[str, Any]:  # pragma: no cover - each result defines its own
        raise NotImplementedError

    def save(self, path: str | Path, image: Any = None) -> Path:
        """``.json``: :meth:`to_dict`; a picture suffix: the picture. Returns the path."""
        p = Path(path).expanduser()
        p.parent.mkdir(parents=True, exist_ok=True)
        if p.suffix.lower() == ".json":
            p.write_text(json.dumps(self.to_dict()), encoding="utf-8")
        else:
            from PIL import Image

            Image.fromarray(self.image).save(p)
        return p


@dataclass(eq=False)
class GeneratedImages(_Picture):
    """One generated image.

    Attributes:
        image: ``(H, W, 3)`` uint8 RGB array.
        prompt: the text it was conditioned on (``""``: unconditional).
        seed: the seed of its initial noise (image ``i`` of a call with ``seed=s`` uses ``s + i``).
        steps, guidance, sampler: how it was sampled (``sampler``: ``ddim`` or ``dpm``).
    """

    image: np.ndarray
    prompt: str
    seed: int
    steps: int
    guidance: float
    sampler: str

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form: ``prompt``, ``seed``, ``steps``, ``guidance``, ``sampler``, ``size`` ``[H, W]``,
        ``sha256`` of the pixels and ``png_base64`` (the picture as a base64 PNG)."""
        return {"type": "generation", "prompt": self.prompt, "seed": int(self.seed), "steps": int(self.steps),
                "guidance": float(self.guidance), "sampler": self.sampler, "size": list(self.size),
                **self._pixel_fields()}

    def plot(self, image: Any = None, *, pil: bool = False) -> Any:
        """The generated picture (``image`` is ignored: there is no input picture to draw on)."""
        if pil:
            from PIL import Image

            return Image.fromarray(self.image)
        return self.image


@dataclass(eq=False)
class Reconstruction(_Picture):
    """One autoencoder reconstruction (the ``vae`` head, :mod:`zoo.heads.autoencoder`).

    Attributes:
        image: ``(H, W, 3)`` uint8 RGB array, the input picture encoded and decoded, in original pixels.
        latent_shape: ``(C, h, w)`` of the latent the picture was encoded to (before any resizing back).
    """

    image: np.ndarray
    latent_shape: tuple[int, int, int]

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form: ``size`` ``[H, W]``, ``latent_shape``, ``sha256`` of the pixels and ``png_base64``."""
        return {"type": "reconstruction", "size": list(self.size), "latent_shape": [int(v) for v in self.latent_shape],
                **self._pixel_fields()}

    def plot(self, image: Any = None, *, pil: bool = False) -> Any:
        """The reconstruction beside ``image`` (the input, ``(H, W, 3)`` uint8) when given, else alone."""
        out = self.image
        if image is not None:
            ref = np.asarray(image)
            if ref.shape == out.shape:
                out = np.concatenate([ref, out], axis=1)
        if pil:
            from PIL import Image

            return Image.fromarray(out)
        return out

