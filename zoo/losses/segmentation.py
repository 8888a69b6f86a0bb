"""Per-pixel losses for semantic segmentation: cross-entropy and multi-class soft dice, both with an ignore label.

Only torch is imported: the segmentation heads (on the serving path) use these functions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from zoo.preprocess import IGNORE_INDEX

__all__ = ["dice_loss", "masked_cross_entropy", "check_mask_targets"]


def check_mask_targets(logits: torch.Tensor, target: torch.Tensor, ignore_index: int) -> None:
    """Raise a clear error when ``target`` does not fit ``logits``.

    Args:
        logits: ``(B, K, H, W)``.
        target: ``(B, H, W)`` integer class map, ``ignore_index`` where no label applies.
        ignore_index: the label that is ignored.
    """
    if logits.dim() != 4:
        raise ValueError(f"segmentation logits must be (B, K, H, W), got shape {tuple(logits.shape)}")
    if target.dim() != 3 or target.shape[0] != logits.shape[0] or target.shape[-2:] != logits.shape[-2:]:
        raise ValueError(f"segmentation target must be (B, H, W) = ({logits.shape[0]}, {logits.shape[2]}, "
                         f"{logits.shape[3]}) to match the logits, got {tuple(target.shape)}")
    if target.dtype.is_floating_point or target.dtype == torch.bool:
        raise TypeError(f"segmentation target must hold integer class indices (int64), got {target.dtype}")
    k = logits.shape[1]
    bad = (target != ignore_index) & ((target < 0) | (target >= k))
    if bool(bad.any()):
        values = torch.unique(target[bad])[:10].tolist()
        raise ValueError(f"segmentation target holds labels {values} outside 0..{k - 1} (num_classes={k}) that are "
                         f"not the ignore label {ignore_index}; map dataset ids to contiguous labels or set "
                         f"ignore_index to the label used for 'ignore'")


def masked_cross_entropy(logits: torch.Tensor, target: torch.Tensor, *, ignore_index: int = IGNORE_INDEX,
                         weight: torch.Tensor | None = None) -> torch.Tensor:
    """Pixel-averaged cross-entropy that skips ``ignore_index`` pixels.

    Unlike ``F.cross_entropy(reduction="mean")`` it returns ``0`` (still attached to the graph, so backward works
    and gives zero gradients) instead of NaN when every pixel is ignored.

    Args:
        logits: ``(B, K, H, W)`` raw scores (computed in float32).
        target: ``(B, H, W)`` int64 labels in ``0..K-1`` or ``ignore_index``.
        ignore_index: label whose pixels carry no loss and no gradient.
        weight: optional ``(K,)`` per-class weights; the mean is then weighted, as in ``F.cross_entropy``.
    Returns:
        scalar loss.
    """
    logits = logits.float()
    total = F.cross_entropy(logits, target, weight=weight, ignore_index=ignore_index, reduction="sum")
    valid = target != ignore_index
    if weight is None:
        denom = valid.sum().to(total.dtype)
    else:
        denom = weight.to(total)[target.clamp(0, logits.shape[1] - 1)][valid].sum()
    return total / denom.clamp(min=1e-6)


def dice_loss(logits: torch.Tensor, target: torch.Tensor, ignore_index: int = IGNORE_INDEX, *, smooth: float = 1.0,
              eps: float = 1e-6) -> torch.Tensor:
    """Multi-class soft dice loss over the batch, ignoring ``ignore_index`` pixels.

    With ``p = softmax(logits)`` and one-hot ``t`` restricted to valid pixels, for each class ``c``::

        dice_c = (2 * sum(p_c * t_c) + smooth) / (sum(p_c) + sum(t_c) + smooth)

    (sums over batch and pixels). The loss is ``1 - mean(dice_c)`` over the classes present in the valid target,
    so it lies in ``[0, 1]`` whatever the number of classes. With no valid pixel it is ``0`` (attached to the graph).

    Args:
        logits: ``(B, K, H, W)`` raw scores.
        target: ``(B, H, W)`` int64 labels in ``0..K-1`` or ``ignore_index``.
        ignore_index: label of pixels that count neither in predictions nor in targets.
        smooth: additive smoothing in numerator and denominator.
        eps: floor of the denominator.
    Returns:
        scalar loss.
    """
    check_mask_targets(logits, target, ignore_index)
    b, k = logits.shape[:2]
    probs = logits.float().softmax(dim=1)                                          # (B, K, H, W)
    valid = target != ignore_index                                                 # (B, H, W)
    t = target.clamp(0, k - 1) * valid                                             # ignored pixels -> class 0, weight 0
    w = valid.to(probs.dtype)
    # no one-hot target (B x K x H x W, 81 COCO classes: the cost of the whole step): each valid pixel adds its
    # probability of its own class to that class's intersection and one to its target count; the prediction sums
    # are probabilities summed over valid pixels (a batched matrix-vector product)
    p_own = probs.gather(1, t.unsqueeze(1)).squeeze(1) * w                         # (B, H, W)
    flat_t = t.reshape(-1)
    inter = probs.new_zeros(k).scatter_add_(0, flat_t, p_own.reshape(-1))
    count = probs.new_zeros(k).scatter_add_(0, flat_t, w.reshape(-1))
    psum = torch.bmm(probs.reshape(b, k, -1), w.reshape(b, -1, 1)).sum((0, 2))      # (K,)
    dice = (2.0 * inter + smooth) / (psum + count + smooth).clamp(min=eps)
    present = (count > 0).to(dice.dtype)
    # mean over the classes present; 0 (attached to the graph) when no pixel is valid; no host-device sync
    return ((1.0 - dice) * present).sum() / present.sum().clamp(min=1.0)
