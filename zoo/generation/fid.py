"""FID and KID between generated and real images in the feature space of a zoo backbone (torchmetrics'
``FrechetInceptionDistance`` / ``KernelInceptionDistance`` with a custom feature extractor), since Inception
weights cannot be downloaded here. Numbers are comparable between runs that use the same feature model and image
size, not with published Inception FIDs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["BackboneFeatures", "fid_kid"]


class BackboneFeatures(nn.Module):
    """uint8 ``(N, 3, H, W)`` images -> ``(N, D)``: resized to ``input_size``, normalised with the spec's mean / std,
    the backbone's last two levels global-average-pooled and concatenated (a zoo model's backbone, frozen)."""

    def __init__(self, model: Any, input_size: Sequence[int] | None = None) -> None:
        super().__init__()
        self.backbone = model.backbone.eval()
        for p in self.backbone.parameters():
            p.requires_grad_(False)
        spec = model.spec
        self.size = tuple(int(s) for s in (input_size or spec.input_size))
        self.register_buffer("mean", torch.tensor(spec.mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(spec.std, dtype=torch.float32).view(1, 3, 1, 1))
        self.num_features = int(sum(list(self.backbone.channels)[-2:]))

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
        x = F.interpolate(x, size=self.size, mode="bilinear", align_corners=False)
        feats = self.backbone((x - self.mean) / self.std)
        return torch.cat([f.mean((2, 3)) for f in feats[-2:]], 1).double()


def _to_tensor(images: Sequence[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack([np.asarray(i) for i in images])).permute(0, 3, 1, 2).contiguous()


def fid_kid(generated: Sequence[np.ndarray], real: Sequence[np.ndarray], feature_model: Any, *,
            kid_subset: int = 50, batch_size: int = 64) -> dict[str, float]:
    """``{"fid", "kid_mean", "kid_std", "n_generated", "n_real"}`` between two sets of ``(H, W, 3)`` uint8 images,
    in the features of ``feature_model`` (a ZooModel or a name / bundle for :func:`zoo.load`)."""
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    import zoo

    model = zoo.load(feature_model) if isinstance(feature_model, str) else feature_model
    feat = BackboneFeatures(model)
    fid = FrechetInceptionDistance(feature=feat, normalize=False)
    sub = max(2, min(int(kid_subset), len(generated), len(real)))
    kid = KernelInceptionDistance(feature=feat, normalize=False, subset_size=sub)
    for real_flag, images in ((True, real), (False, generated)):
        for s in range(0, len(images), batch_size):
            x = _to_tensor(images[s:s + batch_size])
            fid.update(x, real=real_flag)
            kid.update(x, real=real_flag)
    km, ks = kid.compute()
    return {"fid": float(fid.compute()), "kid_mean": float(km), "kid_std": float(ks),
            "n_generated": len(generated), "n_real": len(real)}
