"""Pieces shared by the detection heads: padded ground truth, point/anchor grids, batched matching, conv towers."""

from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import torch
from torch import nn
from torch.nn.utils.rnn import pad_sequence
from torchvision.models.detection.anchor_utils import AnchorGenerator

from zoo.heads.layers import norm_layer

__all__ = [
    "PaddedTargets", "pad_targets", "grid_points", "grid_anchors", "cached_anchors", "box_iou_iof", "match_anchors",
    "flatten_levels", "conv_tower", "check_levels", "prior_bias", "IGNORE", "BACKGROUND",
]

#: ``match_anchors`` codes for anchors without a ground-truth box.
BACKGROUND = -1
IGNORE = -2


class PaddedTargets(NamedTuple):
    """Ground truth of a batch padded to ``G = max(1, max boxes per image)`` boxes.

    Attributes:
        boxes: ``(B, G, 4)`` xyxy input pixels (zeros where padded).
        labels: ``(B, G)`` int64 contiguous labels (0 where padded).
        valid: ``(B, G)`` bool, a real box of positive width and height.
        crowd: ``(B, G)`` bool, a real crowd box (``iscrowd``): never a positive, regions it covers are ignored.
    """

    boxes: torch.Tensor
    labels: torch.Tensor
    valid: torch.Tensor
    crowd: torch.Tensor

    @property
    def positive(self) -> torch.Tensor:
        """``(B, G)`` bool: boxes that may become positives (valid and not crowd)."""
        return self.valid & ~self.crowd


def pad_targets(targets: Sequence[dict[str, torch.Tensor]], num_classes: int, device: torch.device,
                dtype: torch.dtype = torch.float32) -> PaddedTargets:
    """Stack per-image targets into padded tensors (see :class:`PaddedTargets`).

    Args:
        targets: one dict per image with ``boxes`` ``(N, 4)`` xyxy input pixels, ``labels`` ``(N,)`` int64 in
            ``0..num_classes-1`` and optionally ``iscrowd`` ``(N,)`` bool/int.
        num_classes: K, to check the labels.
        device, dtype: of the returned boxes.
    """
    if len(targets) == 0:
        raise ValueError("detection loss needs one target dict per image, got an empty list")
    boxes, labels, crowd = [], [], []
    for i, t in enumerate(targets):
        if "boxes" not in t or "labels" not in t:
            raise KeyError(f"target {i} has keys {sorted(t)}; detection targets need 'boxes' (N,4) and 'labels' (N,)")
        b = torch.as_tensor(t["boxes"], device=device, dtype=dtype).reshape(-1, 4)
        lab = torch.as_tensor(t["labels"], device=device).reshape(-1).long()
        if lab.numel() != b.shape[0]:
            raise ValueError(f"target {i}: {b.shape[0]} boxes but {lab.numel()} labels")
        c = t.get("iscrowd")
        c = torch.zeros_like(lab, dtype=torch.bool) if c is None else torch.as_tensor(c, device=device).reshape(-1).bool()
        if c.numel() != lab.numel():
            raise ValueError(f"target {i}: {lab.numel()} labels but {c.numel()} iscrowd flags")
        boxes.append(b)
        labels.append(lab)
        crowd.append(c)
    all_labels = torch.cat(labels)
    if all_labels.numel() and bool(((all_labels < 0) | (all_labels >= num_classes)).any()):
        raise ValueError(f"target labels must be contiguous 0..{num_classes - 1} (num_classes={num_classes}), got "
                         f"range [{int(all_labels.min())}, {int(all_labels.max())}]; map dataset category ids first")
    # a zero-length row keeps G >= 1 so every later (B, A, G) tensor has a real last dimension
    boxes.append(torch.zeros(1, 4, device=device, dtype=dtype))
    labels.append(torch.zeros(1, device=device, dtype=torch.long))
    crowd.append(torch.zeros(1, device=device, dtype=torch.bool))
    lengths = torch.tensor([x.shape[0] for x in labels[:-1]], device=device)
    pb = pad_sequence(boxes, batch_first=True)[:-1]
    pl = pad_sequence(labels, batch_first=True)[:-1]
    pc = pad_sequence(crowd, batch_first=True)[:-1]
    present = torch.arange(pb.shape[1], device=device)[None, :] < lengths[:, None]
    valid = present & (pb[..., 2] > pb[..., 0]) & (pb[..., 3] > pb[..., 1])
    return PaddedTargets(pb, pl, valid, pc & valid)


def check_levels(in_channels: Sequence[int], strides: Sequence[int], head: str) -> int:
    """Check that every level has the same channels (an FPN's output) and return that width."""
    in_channels, strides = list(in_channels), list(strides)
    if not in_channels or len(in_channels) != len(strides):
        raise ValueError(f"{head} needs one stride per level, got channels={in_channels} strides={strides}")
    if len(set(in_channels)) != 1:
        raise ValueError(f"{head} shares its weights across levels, so all levels need the same channels; got "
                         f"{in_channels}. Put an FPN neck in front (spec: necks.fpn.type=fpn, heads.<name>.input=fpn)")
    return in_channels[0]


def grid_points(shapes: Sequence[tuple[int, int]], strides: Sequence[int], device: torch.device,
                dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Centres of the feature-map cells of every level, in input pixels (``x * s + s // 2``), fine to coarse.

    Args:
        shapes: ``(H_l, W_l)`` of each level. strides: stride of each level.
    Returns:
        points ``(P, 2)`` (x, y) with ``P = sum H_l * W_l`` ordered level, row, column; and ``levels`` ``(P,)``
        int64 level index of each point.
    """
    pts, lvls = [], []
    for lvl, ((h, w), s) in enumerate(zip(shapes, strides)):
        ys = torch.arange(h, device=device, dtype=dtype) * s + s // 2
        xs = torch.arange(w, device=device, dtype=dtype) * s + s // 2
        yy, xx = torch.meshgrid(ys, xs, indexing="ij")
        pts.append(torch.stack([xx.reshape(-1), yy.reshape(-1)], dim=1))
        lvls.append(torch.full((h * w,), lvl, device=device, dtype=torch.long))
    return torch.cat(pts), torch.cat(lvls)


def grid_anchors(generator: AnchorGenerator, shapes: Sequence[tuple[int, int]], strides: Sequence[int],
                 device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Anchors of every level from a torchvision :class:`AnchorGenerator`, using the levels' exact strides (the
    generator's own ``forward`` infers them from the padded image size, which is wrong when it does not divide).

    Returns: ``(A, 4)`` xyxy input pixels, ordered level, row, column, cell anchor.
    """
    generator.set_cell_anchors(dtype, device)
    strides_t = [[torch.tensor(s, device=device), torch.tensor(s, device=device)] for s in strides]
    return torch.cat(generator.grid_anchors([list(s) for s in shapes], strides_t)).to(dtype)


def cached_anchors(cache: dict, generator: AnchorGenerator, shapes: Sequence[tuple[int, int]],
                   strides: Sequence[int], device: torch.device) -> torch.Tensor:
    """:func:`grid_anchors` memoised in ``cache`` (a plain dict owned by the head) per level shapes and device."""
    key = (tuple(tuple(int(v) for v in s) for s in shapes), str(device))
    if key not in cache:
        if len(cache) >= 16:
            cache.clear()
        cache[key] = grid_anchors(generator, shapes, strides, device)
    return cache[key]


def box_iou_iof(anchors: torch.Tensor, gt: torch.Tensor, eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """IoU and intersection-over-anchor-area between shared anchors and per-image ground truth.

    Args:
        anchors: ``(A, 4)`` xyxy. gt: ``(B, G, 4)`` xyxy.
    Returns: ``iou`` and ``iof`` ``(B, A, G)``.
    """
    area_a = (anchors[:, 2] - anchors[:, 0]).clamp(min=0) * (anchors[:, 3] - anchors[:, 1]).clamp(min=0)
    area_g = (gt[..., 2] - gt[..., 0]).clamp(min=0) * (gt[..., 3] - gt[..., 1]).clamp(min=0)
    lt = torch.maximum(anchors[None, :, None, :2], gt[:, None, :, :2])
    rb = torch.minimum(anchors[None, :, None, 2:], gt[:, None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    iou = inter / (area_a[None, :, None] + area_g[:, None, :] - inter).clamp(min=eps)
    iof = inter / area_a[None, :, None].clamp(min=eps)
    return iou, iof


def match_anchors(anchors: torch.Tensor, gt: PaddedTargets, *, fg_iou: float, bg_iou: float,
                  low_quality: bool = True, crowd_iof: float = 0.7) -> torch.Tensor:
    """Batched IoU matching of shared anchors to padded ground truth, crowd-aware.

    An anchor whose best IoU with a non-crowd box is ``>= fg_iou`` matches that box; ``< bg_iou`` makes it
    background, in between ignored. With ``low_quality``, each box's best anchors (ties included) match it too.
    Crowd boxes never match; a background anchor whose intersection with a crowd box covers more than
    ``crowd_iof`` of the anchor is ignored instead.

    Args:
        anchors: ``(A, 4)``. gt: padded targets with ``G`` boxes.
    Returns: ``(B, A)`` int64: the matched box index ``0..G-1``, :data:`BACKGROUND` or :data:`IGNORE`.
    """
    iou, iof = box_iou_iof(anchors, gt.boxes)
    can_match = gt.positive[:, None, :]
    iou = torch.where(can_match, iou, torch.full_like(iou, -1.0))
    best, idx = iou.max(dim=2)
    matched = torch.where(best >= fg_iou, idx, torch.full_like(idx, IGNORE))
    matched = torch.where(best < bg_iou, torch.full_like(idx, BACKGROUND), matched)
    if low_quality:
        best_per_gt = iou.max(dim=1, keepdim=True).values  # (B, 1, G)
        lq = ((iou == best_per_gt) & (best_per_gt > 0) & can_match).any(dim=2)
        matched = torch.where(lq, idx, matched)
    in_crowd = (torch.where(gt.crowd[:, None, :], iof, torch.zeros_like(iof)).max(dim=2).values > crowd_iof)
    return torch.where((matched == BACKGROUND) & in_crowd, torch.full_like(matched, IGNORE), matched)


def flatten_levels(maps: Sequence[torch.Tensor], channels: int) -> torch.Tensor:
    """Concatenate per-level prediction maps ``(B, A * C, H, W)`` into ``(B, sum H * W * A, C)``, ordered level,
    row, column, anchor (the order of :func:`grid_points` / :func:`grid_anchors`)."""
    out = []
    for m in maps:
        b, ac, h, w = m.shape
        a = ac // channels
        out.append(m.view(b, a, channels, h, w).permute(0, 3, 4, 1, 2).reshape(b, h * w * a, channels))
    return torch.cat(out, dim=1)


def conv_tower(channels: int, num_convs: int, norm: str | None = "gn") -> nn.Sequential:
    """``num_convs`` x (3x3 conv, norm, ReLU), weights N(0, 0.01) as in RetinaNet/FCOS.

    Args:
        channels: input = output channels. num_convs: depth. norm: ``"gn"`` (GroupNorm, up to 32 groups) or None.
    """
    key = None if norm is None else str(norm).lower()
    if key not in (None, "none", "gn"):
        raise ValueError(f"head norm={norm!r} is not supported; use 'gn' or None")
    layers: list[nn.Module] = []
    for _ in range(num_convs):
        conv = nn.Conv2d(channels, channels, 3, padding=1, bias=key in (None, "none"))
        nn.init.normal_(conv.weight, std=0.01)
        if conv.bias is not None:
            nn.init.zeros_(conv.bias)
        layers.append(conv)
        if key == "gn":
            # at least 2 channels per group: on a 1x1 level (P7 of a small image) at batch 1, one channel per group
            # would leave GroupNorm a single value to normalise (an error, and meaningless statistics)
            layers.append(norm_layer("gn", channels, min_per_group=2))
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


def prior_bias(prob: float) -> float:
    """Classification bias so that the initial sigmoid output is ``prob`` (focal-loss initialisation)."""
    return -math.log((1 - prob) / prob)
