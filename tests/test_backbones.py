"""TimmBackbone over several timm families: channels/strides, NCHW output, ViT pyramid, weights, freezing."""

from __future__ import annotations

import pytest
import timm
import torch

from zoo.backbones import TimmBackbone

FAMILIES = ["resnet10t", "convnext_atto", "efficientnet_b0", "test_vit", "test_convnext"]


@pytest.mark.parametrize("name", FAMILIES)
def test_levels_match_declared_channels_and_strides(name: str) -> None:
    bb = TimmBackbone(name).eval()
    x = torch.randn(2, 3, 96, 64)
    with torch.no_grad():
        feats = bb(x)
    assert len(feats) == len(bb.channels) == len(bb.strides)
    for f, c, s in zip(feats, bb.channels, bb.strides):
        assert f.shape[0] == 2 and f.shape[1] == c  # NCHW: channels in dim 1
        assert f.shape[2] == -(-96 // s) or f.shape[2] == 96 // s
        assert f.shape[3] == -(-64 // s) or f.shape[3] == 64 // s


def test_vit_gets_a_multiscale_pyramid() -> None:
    bb = TimmBackbone("test_vit")
    assert bb.strides == [4, 8, 16, 32]
    assert len(set(f.shape[-1] for f in bb(torch.randn(1, 3, 128, 128)))) == 4


def test_nhwc_models_come_out_nchw() -> None:
    bb = TimmBackbone("swin_tiny_patch4_window7_224").eval()
    with torch.no_grad():
        feats = bb(torch.randn(1, 3, 224, 224))
    assert [f.shape[1] for f in feats] == bb.channels


def test_out_indices_select_levels() -> None:
    bb = TimmBackbone("resnet10t", out_indices=[2, 3, 4])
    assert bb.strides == [8, 16, 32]
    assert [f.shape[1] for f in bb(torch.randn(1, 3, 64, 64))] == bb.channels


def test_local_weights_file_is_loaded(tmp_path) -> None:
    full = timm.create_model("resnet10t", pretrained=False)
    with torch.no_grad():
        for p in full.parameters():
            p.uniform_(-0.5, 0.5)
    path = tmp_path / "w.pth"
    torch.save(full.state_dict(), path)
    bb = TimmBackbone("resnet10t", weights=path)
    assert torch.equal(bb.body.layer1[0].conv1.weight, full.layer1[0].conv1.weight)
    random_bb = TimmBackbone("resnet10t")
    assert not torch.equal(random_bb.body.layer1[0].conv1.weight, full.layer1[0].conv1.weight)


def test_missing_weights_file_names_it(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        TimmBackbone("resnet10t", weights=tmp_path / "nope.pth")


def test_unknown_model_name_is_clear() -> None:
    with pytest.raises(ValueError, match="not a timm model"):
        TimmBackbone("resnet_does_not_exist")


def test_freeze_all_and_first_stages() -> None:
    bb = TimmBackbone("resnet10t", freeze="all")
    assert not any(p.requires_grad for p in bb.parameters())
    bb.train()
    assert all(not m.training for m in bb._frozen_norms) and bb._frozen_norms
    bb2 = TimmBackbone("resnet10t", freeze=2)
    frozen = {n for n, p in bb2.body.named_parameters() if not p.requires_grad}
    assert any(n.startswith("conv1") for n in frozen) and any(n.startswith("layer1") for n in frozen)
    assert not any(n.startswith("layer2") for n in frozen)
    with pytest.raises(ValueError, match="feature levels"):
        TimmBackbone("resnet10t", freeze=9)


def test_frozen_batchnorm_statistics_do_not_move() -> None:
    bb = TimmBackbone("resnet10t", freeze="all").train()
    before = bb.body.bn1.running_mean.clone()
    bb(torch.randn(2, 3, 64, 64) * 5)
    assert torch.equal(before, bb.body.bn1.running_mean)


@pytest.mark.parametrize("name", ["resnet10t", "test_vit"])
def test_gradient_checkpointing_trains(name: str) -> None:
    bb = TimmBackbone(name, grad_checkpointing=True).train()
    loss = sum(f.mean() for f in bb(torch.randn(2, 3, 64, 64)))
    loss.backward()
    assert any(p.grad is not None for p in bb.parameters())
