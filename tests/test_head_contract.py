"""The head contract, checked for every registered head (``zoo.heads.list_heads()``), as timm's tests run over
``list_models``: a new head file is tested here without editing this file.

For each head: build a model from a JSON spec alone, train one step on a batch of its target format (the loss is
finite and moves the weights), post-process into typed results in original pixels, bundle, reload through
``zoo.load`` and get the same results from ``zoo.Predictor``, and export to ONNX (checked with onnxruntime) when the
head declares itself exportable, or get a clear refusal when it does not.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import zoo
from zoo.heads import Head, head_class, list_heads, register_head
from zoo.heads.base import RESULT_KINDS, TARGET_FORMATS, _HEADS
from zoo.hub.api import model_meta
from zoo.hub.bundle import save_bundle
from zoo.models import create_model
from zoo.preprocess import ResizeInfo
from zoo.generation.results import GeneratedImages, Reconstruction
from zoo.results import Classification, Detections, Embedding, InstanceSegmentation, SemanticSegmentation

CLASSES = ["circle", "square", "star"]
SIZE = 64
#: Small settings per head type where its defaults are sized for real images (keeps the test fast on CPU).
LIGHT = {
    "faster_rcnn": {"representation_size": 64, "rpn_batch_size": 32, "box_batch_size": 32},
    "mask_rcnn": {"representation_size": 64, "rpn_batch_size": 32, "box_batch_size": 32, "mask_layers": [16],
                  "mask_dim": 16},
    "fcos": {"num_convs": 1}, "retinanet": {"num_convs": 1},
    "semantic_fpn": {"channels": 16}, "upernet": {"channels": 16}, "deeplabv3plus": {"channels": 16},
    "embedding": {"embedding_dim": 16},
    "diffusion": {"channels": [16, 32], "text_dim": 32, "text_layers": 1, "max_tokens": 8, "steps": 2},
    "vae": {"channels": [16, 32], "norm_groups": 8},
}
#: Input side the export traces at, where 64 px does not suit the head (UPerNet's pyramid pooling to 1, 2, 3, 6
#: cells exports only when the stride-32 map divides by them: 192 px).
EXPORT_SIDE = {"upernet": 192}
RESULT_TYPES = {"classification": Classification, "detection": Detections, "instance": InstanceSegmentation,
                "semantic": SemanticSegmentation, "embedding": Embedding, "generation": GeneratedImages,
                "reconstruction": Reconstruction}


def spec_for(head_type: str) -> dict:
    cls = head_class(head_type)
    kwargs = dict(LIGHT.get(head_type, {}))
    names = cls.bind_data(kwargs, {"class_names": CLASSES, "has_background": True})
    side = EXPORT_SIDE.get(head_type, SIZE)
    spec = {"backbone": {"name": "test_resnet"}, "input_size": [side, side], "resize": "stretch", "task": "multitask",
            "heads": {"h": {"type": head_type, "input": "fpn" if cls.neck else (cls.default_input or "backbone"),
                              **kwargs}},
            # 64 FPN channels: GroupNorm(32) then sees 2 values per group even on the 1x1 P7 of a 64 px image
            "necks": {"fpn": {"type": "fpn", "out_channels": 64}} if cls.neck else {},
            "class_names": {"h": names} if names else {}, "extra": {"category_ids": {"h": [3, 7, 9]}}}
    return json.loads(json.dumps(spec))  # from JSON alone


def batch_for(fmt: str, n: int = 4) -> dict:
    """A hand-made collated batch of target format ``fmt`` (objects at fixed places, so losses are meaningful)."""
    g = torch.Generator().manual_seed(0)
    images = torch.randn(n, 3, SIZE, SIZE, generator=g)
    boxes = [torch.tensor([[8.0, 8.0, 30.0, 34.0], [36.0, 30.0, 60.0, 58.0]]) for _ in range(n)]
    labels = [torch.tensor([i % 3, (i + 1) % 3]) for i in range(n)]
    if fmt == "classification":
        targets = torch.tensor([i % 3 for i in range(n)])
    elif fmt == "multilabel":
        targets = torch.zeros(n, 3)
        targets[:, 0] = 1
    elif fmt in ("detection", "instance"):
        targets = []
        for b, lab in zip(boxes, labels):
            t = {"boxes": b, "labels": lab, "iscrowd": torch.zeros(2, dtype=torch.bool)}
            if fmt == "instance":
                m = torch.zeros(2, SIZE, SIZE, dtype=torch.uint8)
                for j, (x1, y1, x2, y2) in enumerate(b.long().tolist()):
                    m[j, y1:y2, x1:x2] = 1
                t["masks"] = m
            targets.append(t)
    elif fmt == "semantic":
        targets = torch.zeros(n, SIZE, SIZE, dtype=torch.long)
        for i, (b, lab) in enumerate(zip(boxes, labels)):
            for (x1, y1, x2, y2), c in zip(b.long().tolist(), lab.tolist()):
                targets[i, y1:y2, x1:x2] = c + 1
    elif fmt == "similarity":
        targets = torch.tensor([i // 2 for i in range(n)])
    elif fmt == "captions":
        targets = [f"a {CLASSES[i % 3]} left of a {CLASSES[(i + 1) % 3]}" for i in range(n)]
    else:
        raise AssertionError(f"the contract test has no batch for target format {fmt!r}: add one")
    return {"images": images, "targets": targets, "target_format": fmt, "image_sizes": [(SIZE, SIZE)] * n,
            "orig_sizes": [(2 * SIZE, 3 * SIZE)] * n, "scales": [(0.5, 1 / 3)] * n, "image_ids": list(range(n))}


@pytest.mark.parametrize("head_type", list_heads())
def test_head_declares_the_contract(head_type: str) -> None:
    cls = head_class(head_type)
    assert issubclass(cls, Head) and cls.type_name == head_type
    assert cls.result_kind in RESULT_KINDS and cls.target_format in TARGET_FORMATS
    assert isinstance(cls.exportable, bool) and cls.default_name and (cls.neck in (None, "fpn"))
    assert cls.feature_levels and cls.describe()["type"] == head_type
    for call in ("forward", "compute_loss", "postprocess", "predict"):
        assert getattr(cls, call) is not getattr(Head, call) or call == "compute_loss" and cls.loss is not Head.loss, \
            f"{cls.__name__} does not implement {call}"
    assert cls.__doc__, f"{cls.__name__} needs a docstring (arguments, shapes)"


@pytest.mark.parametrize("head_type", list_heads())
def test_head_trains_postprocesses_bundles_reloads_and_exports(head_type: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    spec = spec_for(head_type)
    model = create_model(spec)
    head = model.heads["h"]
    assert head.name == "h" and head.class_names == list(spec["class_names"].get("h", []))
    batch = batch_for(head.data_format)

    # one training step
    criterion = head.make_criterion({"num_train_identities": 2})
    params = list(model.parameters()) + (list(criterion.parameters()) if criterion is not None else [])
    opt = torch.optim.SGD(params, lr=0.01)
    model.train()
    losses = head.loss(model(batch["images"])["h"], batch, criterion=criterion)
    assert losses and all(k.startswith("loss") for k in losses)
    total = sum(losses.values())
    assert torch.isfinite(total), losses
    before = [p.detach().clone() for p in head.parameters()]
    total.backward()
    opt.step()
    assert any(not torch.equal(b, p) for b, p in zip(before, head.parameters())), "the step did not move the head"
    # a batch without this head's targets trains nothing
    other = "semantic" if head.data_format != "semantic" else "classification"
    assert head.loss(model(batch["images"])["h"], {**batch, "target_format": other}, criterion=criterion) == {}

    # typed results in original pixels
    model.eval()
    infos = [ResizeInfo((2 * SIZE, 3 * SIZE), (SIZE, SIZE), 0.5, 1 / 3)] * 2
    with torch.no_grad():
        results = head.postprocess(model(batch["images"][:2])["h"], infos)
    assert len(results) == 2 and all(isinstance(r, RESULT_TYPES[head.result_kind]) for r in results)
    json.dumps([r.to_dict() for r in results])
    if head.result_kind == "semantic":
        assert tuple(results[0].mask.shape) == (2 * SIZE, 3 * SIZE)
    if head.result_kind in ("detection", "instance") and len(results[0]):
        assert float(results[0].boxes[:, 0::2].max()) <= 3 * SIZE and set(results[0].category_ids) <= {3, 7, 9}

    # bundle -> zoo.load -> Predictor gives the same results as the model in memory
    folder = save_bundle(tmp_path / "bundle", model.state_dict(), model_meta(spec))
    loaded = zoo.load(folder)
    side = spec["input_size"][0]
    image = (np.random.default_rng(0).random((2 * side, 3 * side, 3)) * 255).astype(np.uint8)
    got = zoo.Predictor(loaded)(image)[0]
    want = zoo.Predictor(model)(image)[0]
    assert type(got) is type(want)
    assert json.dumps(got.to_dict(), sort_keys=True) == json.dumps(want.to_dict(), sort_keys=True)

    # export
    from zoo.hub.export import ExportError, export_onnx

    if not head.exportable:
        with pytest.raises(ExportError, match="not exportable"):
            export_onnx(loaded, tmp_path / "onnx")
        return
    ort = pytest.importorskip("onnxruntime")
    path = export_onnx(loaded, tmp_path / "onnx")
    meta = json.loads((path.parent / "model.json").read_text())
    x = torch.randn(2, 3, side, side)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    outs = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {"images": x.numpy()})))
    with torch.no_grad():
        ref = loaded.heads["h"].export_outputs(loaded(x)["h"])
    ref = {"h": ref} if isinstance(ref, torch.Tensor) else {f"h.{k}": v for k, v in ref.items()}
    assert set(outs) == set(ref) == {o["name"] for o in meta["onnx"]["outputs"]}
    for k, v in ref.items():
        np.testing.assert_allclose(outs[k], v.numpy(), rtol=1e-3, atol=1e-3)


def test_a_new_head_is_one_class_and_is_picked_up_by_the_registry() -> None:
    """Registering a class is all it takes to build it from a spec; a spec cannot name anything unregistered."""

    @register_head("test_mean_color")
    class MeanColorHead(Head):
        """Predicts the image's class from the mean of the last level (a toy head for this test)."""

        result_kind = "classification"
        target_format = "classification"
        default_name = "cls"

        def __init__(self, in_channels, strides, *, num_classes: int) -> None:
            super().__init__()
            self.num_classes, self.multilabel = num_classes, False
            self.fc = torch.nn.Linear(in_channels[-1], num_classes)

        def forward(self, features):
            return self.fc(features[-1].mean((2, 3)))

        def compute_loss(self, raw, targets, image_sizes=None):
            return {"loss_cls": torch.nn.functional.cross_entropy(raw, targets)}

        def predict(self, raw, image_sizes=None, **options):
            return [{"scores": p} for p in raw.softmax(-1)]

        def postprocess(self, raw, infos, **options):
            return [Classification(labels=[self.class_names[int(p.argmax())]], scores=[float(p.max())],
                                   label_ids=[int(p.argmax())], probs=p, class_names=self.class_names)
                    for p in raw.softmax(-1)]

    try:
        assert "test_mean_color" in list_heads()
        m = create_model({"backbone": {"name": "test_resnet"}, "class_names": {"c": CLASSES},
                          "heads": {"c": {"type": "test_mean_color", "num_classes": 3}}})
        assert isinstance(m.heads["c"], MeanColorHead)
        with pytest.raises(ValueError, match="has no argument"):
            create_model({"backbone": {"name": "test_resnet"}, "heads": {"c": {"type": "test_mean_color",
                                                                               "num_classes": 3, "num_clases": 3}}})
    finally:
        _HEADS.pop("test_mean_color", None)
    # only registered classes: a spec naming another callable inside the package is refused
    for bad in ("zoo.hub.export:_jsonable", "zoo.heads.detection.common.conv_tower", "os:system"):
        with pytest.raises(ValueError, match="unknown head type"):
            create_model({"backbone": {"name": "test_resnet"}, "heads": {"x": {"type": bad}}})


def test_old_specs_naming_classes_by_path_still_build() -> None:
    m = create_model({"backbone": {"name": "test_resnet"},
                      "heads": {"cls": {"type": "zoo.heads.classification:ClassificationHead", "num_classes": 2}}})
    assert type(m.heads["cls"]).__name__ == "ClassificationHead"
