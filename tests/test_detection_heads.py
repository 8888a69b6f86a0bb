"""Detection side: FPN neck, FCOS / RetinaNet / Faster R-CNN heads, Mask R-CNN head, shared post-processing."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.models.detection._utils import Matcher
from torchvision.ops import box_iou

from zoo.backbones import TimmBackbone
from zoo.heads.necks import FPN
from zoo.heads.detection import FCOSHead, FasterRCNNHead, RetinaNetHead, postprocess_detections
from zoo.heads.detection.common import BACKGROUND, IGNORE, match_anchors, pad_targets
from zoo.heads.instance import MaskRCNNHead
from zoo.heads import head_class, list_heads
from zoo.models import create_model

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

NUM_CLASSES = 3
BACKBONES = {"resnet": "resnet10t", "convnext": "convnext_atto", "vit": "test_vit"}
#: Every registered detection / instance head (a new one is picked up here by itself); small second stages keep
#: the two-stage heads fast on CPU.
TWO_STAGE_LIGHT = {"representation_size": 64, "box_batch_size": 64, "rpn_pre_nms_topk": (300, 200),
                   "rpn_post_nms_topk": (100, 50)}
HEAD_KWARGS = {h: ({**TWO_STAGE_LIGHT, **({"mask_layers": [32], "mask_dim": 32} if h == "mask_rcnn" else {})}
                   if not head_class(h).exportable else {})
               for h in list_heads() if head_class(h).result_kind in ("detection", "instance")}


def make_model(head: str, backbone: str = "resnet10t", **kwargs):
    spec = {"backbone": {"name": backbone}, "necks": {"fpn": {"type": "fpn", "out_channels": 64}},
            "heads": {"det": {"type": head, "input": "fpn", "num_classes": NUM_CLASSES, **HEAD_KWARGS[head], **kwargs}}}
    return create_model(spec)


def make_targets(h: int, w: int, crowd: bool = True) -> list[dict[str, torch.Tensor]]:
    """Image 0: two boxes (+ a crowd box); image 1: no boxes. Masks fill each box."""
    boxes = torch.tensor([[4.0, 6.0, 40.0, 50.0], [30.0, 20.0, 90.0, 60.0], [50.0, 2.0, 92.0, 30.0]])
    labels = torch.tensor([0, 2, 1])
    iscrowd = torch.tensor([False, False, crowd])
    masks = torch.zeros(3, h, w, dtype=torch.uint8)
    for m, b in zip(masks, boxes.long()):
        m[b[1]:b[3], b[0]:b[2]] = 1
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long),
             "iscrowd": torch.zeros(0, dtype=torch.bool), "masks": torch.zeros(0, h, w, dtype=torch.uint8)}
    return [{"boxes": boxes, "labels": labels, "iscrowd": iscrowd, "masks": masks}, empty]


# ---------------------------------------------------------------------------------------------------- FPN
@pytest.mark.parametrize("family", list(BACKBONES))
def test_fpn_levels_and_shapes(family):
    bb = TimmBackbone(BACKBONES[family])
    fpn = FPN(bb.channels, bb.strides, out_channels=32)
    assert fpn.strides == [8, 16, 32, 64, 128] and fpn.channels == [32] * 5
    outs = fpn(bb(torch.randn(2, 3, 64, 96)))
    assert [tuple(o.shape) for o in outs] == [(2, 32, 8, 12), (2, 32, 4, 6), (2, 32, 2, 3), (2, 32, 1, 2), (2, 32, 1, 1)]


def test_fpn_options_and_errors():
    chans, strides = [16, 24, 48, 96], [4, 8, 16, 32]
    feats = [torch.randn(1, c, 64 // s, 64 // s) for c, s in zip(chans, strides)]
    fpn = FPN(chans, strides, out_channels=16, in_levels=(0, 1, 2, 3), extra_levels=1, norm="gn")
    assert fpn.strides == [4, 8, 16, 32, 64]
    assert [o.shape[-1] for o in fpn(feats)] == [16, 8, 4, 2, 1]
    assert FPN([8, 16], [16, 32], out_channels=8).strides == [16, 32, 64, 128]  # coarsest levels when no 8/16/32
    assert FPN(chans, strides, extra_levels=0).strides == [8, 16, 32]
    with pytest.raises(ValueError, match="in_levels"):
        FPN(chans, strides, in_levels=(1, 7))
    with pytest.raises(ValueError, match="norm"):
        FPN(chans, strides, norm="weird")


# ---------------------------------------------------------------------------------------------------- shapes
@pytest.mark.parametrize("family", list(BACKBONES))
@pytest.mark.parametrize("head", list(HEAD_KWARGS))
def test_output_shapes(head, family):
    torch.manual_seed(0)
    model = make_model(head, BACKBONES[family]).eval()
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        raw = model(x)["det"]
        out = model.heads["det"].predict(raw, [(64, 96), (50, 70)], score_thresh=0.0, max_detections=7)
    grid = 8 * 12 + 4 * 6 + 2 * 3 + 1 * 2 + 1 * 1
    if head == "fcos":
        assert raw["cls_logits"].shape == (2, grid, NUM_CLASSES)
        assert raw["ltrb"].shape == (2, grid, 4) and raw["centerness"].shape == (2, grid)
    elif head == "retinanet":
        assert raw["cls_logits"].shape == (2, grid * 9, NUM_CLASSES) and raw["deltas"].shape == (2, grid * 9, 4)
        assert raw["anchors"].shape == (grid * 9, 4)
    else:
        assert [tuple(o.shape) for o in raw["objectness"]][:2] == [(2, 3, 8, 12), (2, 3, 4, 6)]
    assert len(out) == 2
    for r, (h, w) in zip(out, [(64, 96), (50, 70)]):
        m = r["boxes"].shape[0]
        assert 0 < m <= 7 and r["scores"].shape == (m,) and r["labels"].dtype == torch.int64
        assert r["labels"].min() >= 0 and r["labels"].max() < NUM_CLASSES
        assert (r["boxes"][:, 0::2] >= 0).all() and (r["boxes"][:, 0::2] <= w).all()
        assert (r["boxes"][:, 1::2] >= 0).all() and (r["boxes"][:, 1::2] <= h).all()
        if head == "mask_rcnn":
            assert r["masks"].shape == (m, 1, h, w) and r["masks"].dtype == torch.float32
            assert r["masks"].min() >= 0 and r["masks"].max() <= 1


# ---------------------------------------------------------------------------------------------------- losses
@pytest.mark.parametrize("head", list(HEAD_KWARGS))
def test_losses_finite_with_empty_image_and_crowd(head):
    torch.manual_seed(0)
    model = make_model(head).train()
    raw = model(torch.randn(2, 3, 64, 96))["det"]
    losses = model.heads["det"].compute_loss(raw, make_targets(64, 96), [(64, 96), (64, 96)])
    expected = {"fcos": {"loss_cls", "loss_box", "loss_centerness"}, "retinanet": {"loss_cls", "loss_box"},
                "faster_rcnn": {"loss_objectness", "loss_rpn_box", "loss_cls", "loss_box"}}
    expected["mask_rcnn"] = expected["faster_rcnn"] | {"loss_mask"}
    assert set(losses) == expected[head]
    assert all(torch.isfinite(v) and v.dim() == 0 for v in losses.values())
    sum(losses.values()).backward()
    grads = [p.grad for p in model.heads["det"].parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("head", list(HEAD_KWARGS))
def test_all_empty_batch_gives_finite_losses(head):
    model = make_model(head)
    raw = model(torch.randn(2, 3, 64, 64))["det"]
    targets = [make_targets(64, 64)[1]] * 2
    losses = model.heads["det"].compute_loss(raw, targets, [(64, 64)] * 2)
    assert all(torch.isfinite(v) for v in losses.values())
    box_keys = [k for k in losses if k in ("loss_box", "loss_rpn_box", "loss_centerness")]
    assert all(float(losses[k].detach()) == 0.0 for k in box_keys)


def crowd_only_targets() -> list[dict[str, torch.Tensor]]:
    return [{"boxes": torch.tensor([[8.0, 8.0, 60.0, 56.0]]), "labels": torch.tensor([1]),
             "iscrowd": torch.tensor([True]), "masks": torch.ones(1, 64, 64, dtype=torch.uint8)}]


def test_crowd_box_alone_gives_no_positives_fcos():
    head = FCOSHead([16] * 3, [8, 16, 32], num_classes=NUM_CLASSES, num_convs=1)
    raw = head([torch.randn(1, 16, 8, 8), torch.randn(1, 16, 4, 4), torch.randn(1, 16, 2, 2)])
    gt, matched, ignore, _ = head.assign(raw, crowd_only_targets())
    assert (matched == -1).all()
    inside = ((raw["points"] > 8) & (raw["points"] < torch.tensor([60.0, 56.0]))).all(1)
    assert torch.equal(ignore[0], inside) and inside.any()
    # the same box without the crowd flag has positives
    plain = [dict(crowd_only_targets()[0], iscrowd=torch.tensor([False]))]
    assert (head.assign(raw, plain)[1] >= 0).any()
    losses = head.compute_loss(raw, crowd_only_targets())
    assert float(losses["loss_box"].detach()) == 0.0 and float(losses["loss_centerness"].detach()) == 0.0


def test_crowd_box_alone_gives_no_positives_anchor_heads():
    anchors = torch.tensor([[8.0, 8.0, 60.0, 56.0], [10.0, 10.0, 30.0, 30.0], [0.0, 0.0, 6.0, 6.0], [70, 70, 90, 90]])
    gt = pad_targets(crowd_only_targets(), NUM_CLASSES, torch.device("cpu"))
    matched = match_anchors(anchors, gt, fg_iou=0.5, bg_iou=0.4, crowd_iof=0.7)
    # exact overlap and inside the crowd region -> ignored; outside -> background; never positive
    assert matched.tolist() == [[IGNORE, IGNORE, BACKGROUND, BACKGROUND]]
    torch.manual_seed(0)
    for name in ("retinanet", "faster_rcnn"):
        model = make_model(name)
        raw = model(torch.randn(1, 3, 64, 64))["det"]
        losses = model.heads["det"].compute_loss(raw, crowd_only_targets(), [(64, 64)])
        assert float(losses["loss_box"].detach()) == 0.0, name
        if name == "faster_rcnn":
            assert float(losses["loss_rpn_box"].detach()) == 0.0
            head = model.heads["det"]
            props, _, _, _ = head._proposals(raw, [(64, 64)], "training")
            _, _, labels, _ = head._sample_rois(props, gt)
            assert (labels[0] == 0).any() and not (labels[0] > 0).any()


def test_match_anchors_equals_torchvision_matcher():
    torch.manual_seed(1)
    xy = torch.rand(200, 2) * 80
    anchors = torch.cat([xy, xy + 8 + torch.rand(200, 2) * 40], dim=1)
    gts = [torch.tensor([[5.0, 5.0, 40.0, 45.0], [30.0, 30.0, 90.0, 70.0], [60.0, 0.0, 70.0, 12.0]]),
           torch.tensor([[0.0, 10.0, 50.0, 30.0]])]
    targets = [{"boxes": g, "labels": torch.zeros(len(g), dtype=torch.long)} for g in gts]
    got = match_anchors(anchors, pad_targets(targets, 1, torch.device("cpu")), fg_iou=0.5, bg_iou=0.4)
    matcher = Matcher(0.5, 0.4, allow_low_quality_matches=True)
    for i, g in enumerate(gts):
        ref = matcher(box_iou(g, anchors))
        ref = torch.where(ref == Matcher.BETWEEN_THRESHOLDS, torch.full_like(ref, IGNORE), ref)
        assert torch.equal(got[i], ref)


def fcos_reference(points, strides, ranges, boxes, crowd, radius=1.5):
    """Per-image FCOS assignment written point by point, box by box."""
    matched, ignore = [], []
    for (px, py), s, (lo, hi) in zip(points.tolist(), strides.tolist(), ranges.tolist()):
        best, best_area, in_crowd = -1, math.inf, False
        for j, ((x1, y1, x2, y2), c) in enumerate(zip(boxes.tolist(), crowd.tolist())):
            l, t, r, b = px - x1, py - y1, x2 - px, y2 - py
            if min(l, t, r, b) <= 0:
                continue
            if c:
                in_crowd = True
                continue
            cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
            if not (max(cx - radius * s, x1) < px < min(cx + radius * s, x2)
                    and max(cy - radius * s, y1) < py < min(cy + radius * s, y2)):
                continue
            if not lo <= max(l, t, r, b) <= hi:
                continue
            area = (x2 - x1) * (y2 - y1)
            if area < best_area:
                best, best_area = j, area
        matched.append(best)
        ignore.append(best < 0 and in_crowd)
    return torch.tensor(matched), torch.tensor(ignore)


def test_fcos_batched_assignment_equals_per_image_reference():
    torch.manual_seed(3)
    head = FCOSHead([8] * 5, [8, 16, 32, 64, 128], num_classes=NUM_CLASSES, num_convs=1)
    raw = head([torch.randn(3, 8, 128 // s, 128 // s) for s in head.strides])
    targets = []
    for n in (7, 0, 3):
        xy = torch.rand(n, 2) * 100
        boxes = torch.cat([xy, xy + 4 + torch.rand(n, 2) * 120], 1).clamp(max=128)
        targets.append({"boxes": boxes, "labels": torch.randint(0, NUM_CLASSES, (n,)),
                        "iscrowd": torch.arange(n) == 1})
    _, matched, ignore, ltrb = head.assign(raw, targets)
    strides = torch.tensor(head.strides, dtype=torch.float32)[raw["levels"]]
    ranges = head.size_ranges[raw["levels"]]
    assert (matched >= 0).sum() > 10 and ignore.any()
    for i, t in enumerate(targets):
        ref_m, ref_ign = fcos_reference(raw["points"], strides, ranges, t["boxes"], t["iscrowd"])
        assert torch.equal(matched[i], ref_m), i
        assert torch.equal(ignore[i], ref_ign), i
        pos = ref_m >= 0
        b = t["boxes"][ref_m[pos]]
        p = raw["points"][pos]
        ref_ltrb = torch.cat([p - b[:, :2], b[:, 2:] - p], 1)
        assert torch.allclose(ltrb[i][pos], ref_ltrb)


@pytest.mark.parametrize("head", list(HEAD_KWARGS))
def test_loss_decreases_on_fixed_batch(head):
    torch.manual_seed(0)
    model = make_model(head, "resnet10t").train()
    x = torch.randn(2, 3, 64, 96)
    targets, sizes = make_targets(64, 96), [(64, 96), (64, 96)]
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    history = []
    for _ in range(20):
        losses = model.heads["det"].compute_loss(model(x)["det"], targets, sizes)
        total = sum(losses.values())
        opt.zero_grad()
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
        opt.step()
        history.append(float(total))
    assert all(math.isfinite(v) for v in history)
    assert sum(history[-3:]) / 3 < 0.7 * sum(history[:3]) / 3, history


def test_faster_rcnn_loss_in_eval_mode_uses_training_proposals():
    torch.manual_seed(0)
    model = make_model("faster_rcnn").eval()
    raw = model(torch.randn(2, 3, 64, 96))["det"]
    losses = model.heads["det"].compute_loss(raw, make_targets(64, 96), [(64, 96)] * 2)
    assert all(torch.isfinite(v) for v in losses.values())
    assert model.heads["det"].rpn.post_nms_top_n() == 100  # the loss switched to the training counts


# ---------------------------------------------------------------------------------------------------- post-processing
def test_postprocess_detections_thresholds_topk_and_nms():
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [1.0, 1.0, 10.0, 10.0], [20.0, 20.0, 150.0, 90.0], [5, 5, 6, 5]])
    scores = torch.tensor([[0.9, 0.0], [0.8, 0.7], [0.3, 0.04], [0.99, 0.99]])
    (out,) = postprocess_detections(boxes[None], scores[None], [(50, 100)], score_thresh=0.05, nms_thresh=0.5)
    # box 1 is suppressed in class 0 by box 0 but kept in class 1; box 3 has no area; box 2 is clipped
    assert out["labels"].tolist() == [0, 1, 0]
    assert torch.allclose(out["scores"], torch.tensor([0.9, 0.7, 0.3]))
    assert out["boxes"][2].tolist() == [20.0, 20.0, 100.0, 50.0]
    (top,) = postprocess_detections([boxes], [scores], [(50, 100)], score_thresh=0.5, max_detections=1)
    assert top["scores"].tolist() == [pytest.approx(0.9)]
    (pre,) = postprocess_detections([boxes], [scores], [(50, 100)], pre_nms_topk=3, nms_thresh=1.0)
    assert pre["scores"].tolist() == [pytest.approx(0.9)]  # top-3 candidates: box 3 twice (no area), then box 0
    class_specific = torch.stack([boxes, boxes + 100], dim=1)  # (N, K, 4)
    (cs,) = postprocess_detections([class_specific], [scores], [(500, 500)], score_thresh=0.6)
    assert cs["boxes"].tolist() == [[0.0, 0.0, 10.0, 10.0], [101.0, 101.0, 110.0, 110.0]]


@pytest.mark.parametrize("head", ["fcos", "retinanet", "faster_rcnn"])
def test_head_postprocess_respects_limits(head):
    torch.manual_seed(0)
    model = make_model(head, score_thresh=0.0).eval()
    with torch.no_grad():
        raw = model(torch.randn(1, 3, 64, 64))["det"]
        full = model.heads["det"].predict(raw, [(60, 40)])[0]
        few = model.heads["det"].predict(raw, [(60, 40)], max_detections=3)[0]
        high = model.heads["det"].predict(raw, [(60, 40)], score_thresh=float(full["scores"].median()))[0]
    assert len(full["scores"]) > 3 and len(few["scores"]) == 3
    assert torch.allclose(few["scores"], full["scores"][:3])
    assert 0 < len(high["scores"]) < len(full["scores"]) and (high["scores"] > full["scores"].median()).all()
    assert (full["boxes"][:, 2] <= 40).all() and (full["boxes"][:, 3] <= 60).all() and (full["boxes"] >= 0).all()
    with pytest.raises(TypeError):
        model.heads["det"].predict(raw, [(60, 40)], iou=0.5)


# ---------------------------------------------------------------------------------------------------- real COCO
def coco_targets_with_crowd(size: int = 128) -> tuple[torch.Tensor, list[dict[str, torch.Tensor]]]:
    """The first coco128 image that has a crowd annotation, resized to ``size`` x ``size`` with its targets."""
    ann_file = SHARED_DATA / "coco128" / "annotations" / "instances_train2017.json"
    if not ann_file.is_file():
        pytest.skip(f"{ann_file} not present (real COCO subsets live in ../shared/data beside the repository)")
    pycocotools_coco = pytest.importorskip("pycocotools.coco")
    from PIL import Image

    coco = pycocotools_coco.COCO(str(ann_file))
    img_id = min(a["image_id"] for a in coco.dataset["annotations"] if a["iscrowd"])
    info = coco.imgs[img_id]
    anns = coco.loadAnns(coco.getAnnIds(imgIds=[img_id]))
    cat_index = {c: i for i, c in enumerate(sorted(coco.cats))}
    sx, sy = size / info["width"], size / info["height"]
    boxes = torch.tensor([[a["bbox"][0] * sx, a["bbox"][1] * sy, (a["bbox"][0] + a["bbox"][2]) * sx,
                           (a["bbox"][1] + a["bbox"][3]) * sy] for a in anns])
    masks = torch.stack([torch.from_numpy(coco.annToMask(a)) for a in anns])[:, None].float()
    masks = torch.nn.functional.interpolate(masks, size=(size, size), mode="nearest")[:, 0].to(torch.uint8)
    image = Image.open(SHARED_DATA / "coco128" / "train2017" / info["file_name"]).convert("RGB").resize((size, size))
    x = torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].float() / 255
    target = {"boxes": boxes, "labels": torch.tensor([cat_index[a["category_id"]] for a in anns]),
              "iscrowd": torch.tensor([bool(a["iscrowd"]) for a in anns]), "masks": masks}
    return (x - 0.45) / 0.225, [target]


def test_real_coco_image_with_crowd_fcos_and_mask_rcnn():
    x, targets = coco_targets_with_crowd()
    assert targets[0]["iscrowd"].any() and (~targets[0]["iscrowd"]).any()
    torch.manual_seed(0)
    fcos = make_model("fcos", num_classes=80)
    raw = fcos(x)["det"]
    gt, matched, ignore, _ = fcos.heads["det"].assign(raw, targets)
    pos = matched[0][matched[0] >= 0]
    assert pos.numel() > 0 and not gt.crowd[0][pos].any() and ignore.any()
    assert all(torch.isfinite(v) for v in fcos.heads["det"].compute_loss(raw, targets, [(128, 128)]).values())
    mask_rcnn = make_model("mask_rcnn", num_classes=80)
    losses = mask_rcnn.heads["det"].compute_loss(mask_rcnn(x)["det"], targets, [(128, 128)])
    assert all(torch.isfinite(v) for v in losses.values()) and float(losses["loss_mask"].detach()) > 0


# ---------------------------------------------------------------------------------------------------- errors / imports
def test_clear_errors():
    with pytest.raises(ValueError, match="same channels"):
        FCOSHead([64, 128], [8, 16], num_classes=2)
    head = RetinaNetHead([8] * 2, [8, 16], num_classes=2, num_convs=1)
    raw = head([torch.randn(1, 8, 8, 8), torch.randn(1, 8, 4, 4)])
    with pytest.raises(ValueError, match="contiguous"):
        head.compute_loss(raw, [{"boxes": torch.tensor([[0.0, 0, 5, 5]]), "labels": torch.tensor([2])}])
    with pytest.raises(KeyError, match="boxes"):
        head.compute_loss(raw, [{"labels": torch.tensor([0])}])
    mask_head = MaskRCNNHead([8] * 3, [8, 16, 32], num_classes=2, representation_size=16, mask_layers=[8], mask_dim=8)
    raw = mask_head([torch.randn(1, 8, 8, 8), torch.randn(1, 8, 4, 4), torch.randn(1, 8, 2, 2)])
    with pytest.raises(KeyError, match="masks"):
        mask_head.compute_loss(raw, [{"boxes": torch.tensor([[0.0, 0, 30, 30]]), "labels": torch.tensor([1])}], [(64, 64)])
    assert isinstance(mask_head, FasterRCNNHead)


def test_serving_modules_import_light():
    code = ("import sys, zoo.heads.necks, zoo.heads.detection, zoo.heads.instance; "
            "bad = [m for m in ('lightning', 'hydra', 'omegaconf', 'albumentations', 'pycocotools', 'torchmetrics') "
            "if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
