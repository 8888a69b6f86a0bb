"""Semantic segmentation heads, losses and sliding-window inference (fast: tiny images, narrow decoders, CPU)."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from zoo.heads.segmentation import (DeepLabV3PlusHead, SemanticFPNHead, UPerNetHead, select_levels,
                                    sliding_window_logits, whole_image_logits)
from zoo.losses.segmentation import dice_loss, masked_cross_entropy
from zoo.models import create_model

DECODERS = ["semantic_fpn", "upernet", "deeplabv3plus"]
BACKBONES = ["resnet10t", "convnext_atto", "test_vit", "efficientnet_b0"]
K = 5


def seg_model(backbone: str = "resnet10t", decoder: str = "upernet", **head_kw):
    head = {"type": decoder, "num_classes": K, "channels": 16, **head_kw}
    if decoder == "semantic_fpn":
        head.setdefault("fpn_channels", 16)
    return create_model({"backbone": {"name": backbone}, "heads": {"seg": head}, "task": "semantic"})


@pytest.mark.parametrize("backbone", BACKBONES)
@pytest.mark.parametrize("decoder", DECODERS)
def test_shapes_loss_and_gradients(backbone: str, decoder: str) -> None:
    torch.manual_seed(0)
    model = seg_model(backbone, decoder, aux_head=True).train()
    head = model.heads["seg"]
    images = torch.randn(2, 3, 64, 96)
    raw = model(images)["seg"]
    assert raw["logits"].shape == (2, K, 16, 24)
    assert raw["aux"].shape == (2, K, 4, 6)  # stride-16 level
    assert head.output_stride == 4
    targets = torch.randint(0, K, (2, 64, 96))
    losses = head.compute_loss(raw, targets)
    assert set(losses) == {"loss_seg", "loss_aux"}
    assert all(torch.isfinite(v) for v in losses.values())
    # random init with std-0.01 classifier: cross-entropy close to log(K)
    assert abs(losses["loss_seg"].item() - math.log(K)) < 0.5
    sum(losses.values()).backward()
    no_grad = [n for n, p in head.named_parameters() if p.requires_grad and p.grad is None]
    assert not no_grad, f"head parameters unused in training: {no_grad}"


@pytest.mark.parametrize("decoder", DECODERS)
def test_odd_input_size_and_eval_output(decoder: str) -> None:
    model = seg_model("resnet10t", decoder, aux_head=True).eval()
    with torch.no_grad():
        raw = model(torch.randn(1, 3, 70, 50))["seg"]
    assert set(raw) == {"logits"}  # aux head is train-time only
    assert raw["logits"].shape == (1, K, 18, 13)  # ceil(70/4), ceil(50/4): the stride-4 map of resnet10t
    out = model.heads["seg"].predict(raw, [(70, 50)])
    assert out[0]["mask"].shape == (70, 50) and out[0]["mask"].dtype == torch.int64


def test_aux_head_only_in_training() -> None:
    model = seg_model(aux_head=True, aux_weight=0.5)
    head = model.heads["seg"]
    x, t = torch.randn(2, 3, 64, 64), torch.randint(0, K, (2, 64, 64))
    model.train()
    raw = model(x)["seg"]
    assert "aux" in raw
    losses = head.compute_loss(raw, t)
    expected = 0.5 * F.cross_entropy(F.interpolate(raw["aux"], size=(64, 64), mode="bilinear"), t)
    torch.testing.assert_close(losses["loss_aux"], expected)
    model.eval()
    with torch.no_grad():
        raw = model(x)["seg"]
        assert "aux" not in raw and set(head.compute_loss(raw, t)) == {"loss_seg"}
    plain = seg_model(aux_head=False).train()
    assert "aux" not in plain(x)["seg"] and plain.heads["seg"].aux is None


def test_loss_ignores_255_pixels() -> None:
    head = UPerNetHead([8, 8], [4, 8], num_classes=3, channels=8)
    logits = torch.randn(2, 3, 6, 6, requires_grad=True)
    target = torch.randint(0, 3, (2, 6, 6))
    target[0, :3] = 255
    target[1, :, 4:] = 255
    loss = head.compute_loss({"logits": logits}, target)["loss_seg"]
    torch.testing.assert_close(loss, F.cross_entropy(logits, target, ignore_index=255))
    loss.backward()
    ignored = (target == 255).unsqueeze(1).expand_as(logits)
    assert logits.grad[ignored].abs().max() == 0
    assert logits.grad[~ignored].abs().max() > 0
    # changing logits on ignored pixels does not change the loss
    changed = logits.detach().clone()
    changed[ignored] = 50.0
    torch.testing.assert_close(head.compute_loss({"logits": changed}, target)["loss_seg"], loss.detach())


@pytest.mark.parametrize("dice_weight", [0.0, 1.0])
def test_all_ignore_target_gives_zero_loss_and_zero_grad(dice_weight: float) -> None:
    head = SemanticFPNHead([8, 8], [4, 8], num_classes=3, channels=8, fpn_channels=8, dice_weight=dice_weight,
                           class_weights=[1.0, 2.0, 0.5])
    logits = torch.randn(2, 3, 4, 4, requires_grad=True)
    losses = head.compute_loss({"logits": logits}, torch.full((2, 16, 16), 255, dtype=torch.long))
    total = sum(losses.values())
    assert torch.isfinite(total) and total.item() == 0.0
    total.backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().max() == 0


def test_dice_loss_hand_checked_2x2() -> None:
    # Two classes, 2x2 image; bottom-right pixel ignored.
    logits = torch.tensor([[[[2.0, 0.0], [0.0, 5.0]],
                            [[0.0, 1.0], [0.0, -5.0]]]])
    target = torch.tensor([[[0, 1], [1, 255]]])
    # softmax per pixel: p1 = 1 / (1 + exp(l0 - l1))
    p1 = [1 / (1 + math.exp(2.0)), 1 / (1 + math.exp(-1.0)), 0.5]  # valid pixels (0,0), (0,1), (1,0)
    p0 = [1 - p for p in p1]
    t0, t1 = [1, 0, 0], [0, 1, 1]
    dice0 = 2 * sum(a * b for a, b in zip(p0, t0)) / (sum(p0) + sum(t0))
    dice1 = 2 * sum(a * b for a, b in zip(p1, t1)) / (sum(p1) + sum(t1))
    expected = 1 - (dice0 + dice1) / 2
    got = dice_loss(logits, target, ignore_index=255, smooth=0.0)
    assert got.item() == pytest.approx(expected, abs=1e-6)
    # numbers worked out by hand: p1 = (0.1192, 0.7311, 0.5)
    assert expected == pytest.approx(1 - (2 * 0.8808 / 2.6497 + 2 * 1.2311 / 3.3503) / 2, abs=1e-3)
    # smoothing and classes absent from the valid target: class 2 (absent) is not averaged in
    logits3 = torch.cat([logits, torch.full((1, 1, 2, 2), -30.0)], dim=1)
    assert dice_loss(logits3, target, smooth=0.0).item() == pytest.approx(expected, abs=1e-6)
    # a perfect prediction has zero loss
    perfect = F.one_hot(target.clamp(max=1), 2).permute(0, 3, 1, 2).float() * 40
    assert dice_loss(perfect, target).item() == pytest.approx(0.0, abs=1e-6)


def _dice_by_one_hot(logits: torch.Tensor, target: torch.Tensor, ignore: int, smooth: float) -> torch.Tensor:
    """The dice loss written out with a one-hot target (the definition, for comparison)."""
    k = logits.shape[1]
    p = logits.float().softmax(1)
    valid = (target != ignore).unsqueeze(1).float()
    t = torch.nn.functional.one_hot(target.clamp(0, k - 1), k).permute(0, 3, 1, 2).float() * valid
    p = p * valid
    inter, card = (p * t).sum((0, 2, 3)), p.sum((0, 2, 3)) + t.sum((0, 2, 3))
    present = t.sum((0, 2, 3)) > 0
    if not present.any():
        return logits.sum() * 0.0
    return 1 - ((2 * inter + smooth) / (card + smooth))[present].mean()


@pytest.mark.parametrize("k", [2, 5, 81])
def test_dice_loss_and_its_gradient_equal_the_one_hot_definition(k: int) -> None:
    """The dice term is computed without a one-hot target (gather + per-class sums: it stays cheap with 81 COCO
    classes) and without a host-device sync; its value and gradient are those of the one-hot definition, with
    ignored pixels and classes absent from the target."""
    g = torch.Generator().manual_seed(k)
    logits = torch.randn(3, k, 12, 10, generator=g, requires_grad=True)
    target = torch.randint(0, max(2, k // 3), (3, 12, 10), generator=g)  # the upper classes never appear
    target[:, :2] = 255
    for smooth in (0.0, 1.0):
        ref = _dice_by_one_hot(logits, target, 255, smooth)
        (g_ref,) = torch.autograd.grad(ref, logits)
        got = dice_loss(logits, target, ignore_index=255, smooth=smooth)
        (g_got,) = torch.autograd.grad(got, logits)
        assert got.item() == pytest.approx(ref.item(), abs=1e-6)
        torch.testing.assert_close(g_got, g_ref, rtol=1e-4, atol=1e-7)
    empty = torch.full_like(target, 255)
    loss = dice_loss(logits, empty, ignore_index=255)
    assert loss.item() == 0.0 and loss.requires_grad


def test_dice_term_in_head_loss_and_class_weights() -> None:
    w = [0.2, 1.0, 3.0]
    head = DeepLabV3PlusHead([8, 8], [4, 16], num_classes=3, channels=8, dice_weight=0.5, class_weights=w)
    logits = torch.randn(1, 3, 8, 8)
    target = torch.randint(0, 3, (1, 8, 8))
    target[0, 0] = 255
    losses = head.compute_loss({"logits": logits}, target)
    torch.testing.assert_close(losses["loss_seg"],
                               F.cross_entropy(logits, target, weight=torch.tensor(w), ignore_index=255))
    torch.testing.assert_close(losses["loss_dice"], 0.5 * dice_loss(logits, target))
    torch.testing.assert_close(masked_cross_entropy(logits, target), F.cross_entropy(logits, target, ignore_index=255))


def test_loss_upsamples_and_respects_image_sizes() -> None:
    head = UPerNetHead([8, 8], [4, 8], num_classes=3, channels=8)
    logits = torch.randn(1, 3, 4, 4)
    target = torch.randint(0, 3, (1, 16, 16))
    full = F.interpolate(logits, size=(16, 16), mode="bilinear", align_corners=False)
    torch.testing.assert_close(head.compute_loss({"logits": logits}, target)["loss_seg"], F.cross_entropy(full, target))
    cropped = target.clone()
    cropped[:, 12:] = 255
    cropped[:, :, 10:] = 255
    torch.testing.assert_close(head.compute_loss({"logits": logits}, target, image_sizes=[(12, 10)])["loss_seg"],
                               F.cross_entropy(full, cropped, ignore_index=255))
    # a list of differently sized masks is padded with the ignore label
    parts = [target[0, :16, :12], target[0, :10, :16]]
    pad = torch.full((2, 16, 16), 255)
    pad[0, :, :12], pad[1, :10] = parts
    logits2 = logits.repeat(2, 1, 1, 1)
    torch.testing.assert_close(head.compute_loss({"logits": logits2}, parts)["loss_seg"],
                               F.cross_entropy(full.repeat(2, 1, 1, 1), pad, ignore_index=255))


def test_bad_targets_and_options_raise_clear_errors() -> None:
    head = UPerNetHead([8, 8], [4, 8], num_classes=3, channels=8)
    with pytest.raises(ValueError, match="num_classes=3"):
        head.compute_loss({"logits": torch.randn(1, 3, 4, 4)}, torch.full((1, 16, 16), 7))
    with pytest.raises(TypeError, match="int64"):
        head.compute_loss({"logits": torch.randn(1, 3, 4, 4)}, torch.zeros(1, 16, 16))
    with pytest.raises(TypeError, match="int64"):
        head.compute_loss({"logits": torch.randn(1, 3, 4, 4)}, [torch.zeros(16, 16)])
    with pytest.raises(ValueError, match="aspp_stride"):
        DeepLabV3PlusHead([8, 8], [4, 16], num_classes=3, aspp_stride=32)
    with pytest.raises(ValueError, match="class_weights"):
        UPerNetHead([8, 8], [4, 8], num_classes=3, class_weights=[1.0, 2.0])
    with pytest.raises(ValueError, match="norm"):
        UPerNetHead([8, 8], [4, 8], num_classes=3, norm="ln")
    with pytest.raises(ValueError, match="in_levels"):
        UPerNetHead([8, 8], [4, 8], num_classes=3, in_levels=[0, 5])


def test_level_selection() -> None:
    assert select_levels([2, 4, 8, 16, 32], None) == [1, 2, 3, 4]
    assert select_levels([8, 16, 32, 64, 128], None) == [0, 1, 2]  # FPN neck with P6/P7
    assert select_levels([2, 4, 8, 16, 32], [-1, 1]) == [1, 4]
    assert select_levels([16], None) == [0]
    head = DeepLabV3PlusHead([64, 64, 128, 256, 512], [2, 4, 8, 16, 32], num_classes=2, aspp_stride=16)
    assert head.level_strides == [4, 8, 16, 32] and head.atrous_rates == [6, 12, 18]
    assert DeepLabV3PlusHead([64, 64, 128, 256, 512], [2, 4, 8, 16, 32], num_classes=2).atrous_rates == [3, 6, 9]


def test_bn_norm_trains_with_batch_two() -> None:
    model = seg_model("resnet10t", "upernet", norm="bn").train()
    raw = model(torch.randn(2, 3, 64, 64))["seg"]
    assert raw["logits"].shape == (2, K, 16, 16)


@pytest.mark.parametrize("decoder", DECODERS)
def test_loss_decreases_on_fixed_batch(decoder: str) -> None:
    torch.manual_seed(0)
    model = seg_model("test_resnet", decoder, dice_weight=0.5).train()
    head = model.heads["seg"]
    g = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, 4, (2, 4, 4), generator=g)  # 8x8-pixel blocks of labels 0..3, coloured by label
    targets = F.interpolate(blocks[:, None].float(), size=(32, 32), mode="nearest")[:, 0].long()
    palette = torch.tensor([[1.0, -1.0, -1.0], [-1.0, 1.0, -1.0], [-1.0, -1.0, 1.0], [1.0, 1.0, -1.0]])
    images = palette[targets].permute(0, 3, 1, 2) + 0.1 * torch.randn(2, 3, 32, 32, generator=g)
    targets[:, :4] = 255
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    history = []
    for _ in range(20):
        loss = sum(head.compute_loss(model(images)["seg"], targets).values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append(loss.item())
    assert all(math.isfinite(v) for v in history)
    assert history[-1] < 0.75 * history[0], history


def test_postprocess_crops_padding_and_resizes() -> None:
    head = UPerNetHead([8, 8], [4, 8], num_classes=3, channels=8)
    logits = torch.zeros(2, 3, 8, 8)  # stride 4: padded input 32x32
    logits[0, 1, :4, :6] = 10.0       # image 0 valid 16x24 is class 1, padding class 2
    logits[0, 2] = 1.0
    logits[0, 2, :4, :6] = 0.0
    logits[1, 0] = 3.0                # image 1 all class 0
    out = head.predict({"logits": logits}, [(16, 24), (32, 32)])
    assert out[0]["mask"].shape == (16, 24) and bool((out[0]["mask"] == 1).all())
    assert out[1]["mask"].shape == (32, 32) and bool((out[1]["mask"] == 0).all())
    out = head.predict({"logits": logits}, [(16, 24), (32, 32)], output_sizes=[(40, 60), (7, 5)],
                           return_probs=True)
    assert out[0]["mask"].shape == (40, 60) and bool((out[0]["mask"] == 1).all())
    assert out[1]["mask"].shape == (7, 5) and out[1]["mask"].dtype == torch.int64
    assert out[0]["probs"].shape == (3, 40, 60)
    torch.testing.assert_close(out[0]["probs"].sum(0), torch.ones(40, 60))
    assert "probs" not in head.predict({"logits": logits}, [(32, 32)] * 2)[0]
    # full-resolution logits (a tensor, e.g. from sliding_window_logits) are cropped without upsampling
    full = torch.randn(1, 3, 20, 30)
    mask = head.predict(full, [(15, 30)])[0]["mask"]
    torch.testing.assert_close(mask, full[0, :, :15].argmax(0))
    with pytest.raises(ValueError, match="image sizes"):
        head.predict({"logits": logits}, [(16, 24)])


def test_postprocess_on_model_output_at_original_size() -> None:
    model = seg_model("convnext_atto", "semantic_fpn").eval()
    with torch.no_grad():
        raw = model(torch.randn(2, 3, 64, 64))["seg"]
    out = model.heads["seg"].predict(raw, [(64, 48), (40, 64)], output_sizes=[(480, 360), (100, 160)])
    assert [tuple(o["mask"].shape) for o in out] == [(480, 360), (100, 160)]
    assert all(int(o["mask"].min()) >= 0 and int(o["mask"].max()) < K for o in out)


def test_sliding_window_equals_whole_when_window_is_image() -> None:
    model = seg_model("resnet10t", "deeplabv3plus").eval()
    images = torch.randn(2, 3, 64, 96)

    def fn(x: torch.Tensor) -> dict:
        return model(x)["seg"]

    with torch.no_grad():
        whole = whole_image_logits(fn, images, num_classes=K)
        slid = sliding_window_logits(fn, images, window=(64, 96), stride=(32, 48), num_classes=K)
    assert whole.shape == slid.shape == (2, K, 64, 96)
    torch.testing.assert_close(slid, whole)


def test_sliding_window_averages_overlaps_and_pads_small_images() -> None:
    conv = torch.nn.Conv2d(3, 4, 1)  # per-pixel: sliding must equal whole-image logits everywhere
    images = torch.randn(1, 3, 50, 70)
    with torch.no_grad():
        whole = whole_image_logits(conv, images)
        for tiles in (1, 3):
            slid = sliding_window_logits(conv, images, window=(32, 32), stride=(20, 24), num_classes=4,
                                         tiles_per_batch=tiles)
            torch.testing.assert_close(slid, whole)
        small = sliding_window_logits(conv, images[..., :20, :30], window=(32, 48), stride=(16, 16))
        torch.testing.assert_close(small, whole[..., :20, :30])

    # tile-dependent output: each tile predicts its own mean, averaged where tiles overlap
    x = torch.arange(24, dtype=torch.float32).reshape(1, 1, 4, 6).repeat(1, 3, 1, 1)

    def tile_mean(t: torch.Tensor) -> torch.Tensor:
        return t[:, :1].mean(dim=(2, 3), keepdim=True).expand(-1, 1, t.shape[2], t.shape[3])

    out = sliding_window_logits(tile_mean, x, window=(4, 4), stride=(4, 2))  # tiles at columns 0-3 and 2-5
    m0, m1 = x[0, 0, :, :4].mean(), x[0, 0, :, 2:].mean()
    expected = torch.stack([m0, m0, (m0 + m1) / 2, (m0 + m1) / 2, m1, m1]).expand(4, 6)
    torch.testing.assert_close(out[0, 0], expected)
    with pytest.raises(ValueError, match="num_classes"):
        sliding_window_logits(conv, images, window=32, stride=32, num_classes=5)
    with pytest.raises(ValueError, match="stride"):
        sliding_window_logits(conv, images, window=16, stride=32)


def test_segmentation_modules_are_import_light() -> None:
    code = ("import sys, zoo.heads.segmentation, zoo.losses.segmentation; "
            "heavy = [m for m in sys.modules if m.split('.')[0] in "
            "('lightning', 'pytorch_lightning', 'hydra', 'omegaconf', 'albumentations', 'pycocotools', "
            "'torchmetrics')];"
            "print(heavy); assert not heavy")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr


@pytest.mark.parametrize("decoder", DECODERS)
def test_exported_decoder_follows_input_size(decoder: str) -> None:
    """``torch.export`` with dynamic feature sizes (the path of ONNX export) gives the eager logits at other sizes:
    no size is baked into the decoder's graph."""
    from torch.export import Dim

    model = seg_model("test_resnet", decoder).eval()
    head = model.heads["seg"]

    class Logits(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.head = head

        def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
            return self.head(feats)["logits"]

    with torch.no_grad():
        feats = model.backbone(torch.randn(1, 3, 64, 64))
        dims = [{2: Dim.AUTO, 3: Dim.AUTO} for _ in feats]
        program = torch.export.export(Logits(), (feats,), dynamic_shapes={"feats": dims})
        other = model.backbone(torch.randn(1, 3, 96, 70))
        torch.testing.assert_close(program.module()(other), head(other)["logits"])
