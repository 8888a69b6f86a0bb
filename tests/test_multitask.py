"""Several heads on one backbone: joint training from one dataset and from several, balancing, the combined score,
one bundle answering every head from one backbone pass (also in a process without the training stack), and a
multi-head ONNX export checked with onnxruntime."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import zoo
from tests.conftest import FAST, ROOT, compose
from zoo.config import ConfigError
from zoo.tasks.multitask import pcgrad_combine
from zoo.training import train

SMALL = ["data.shapes.num_train=96", "data.shapes.num_val=32", "data.shapes.image_size=96", "backbone=test_resnet",
         "model.input_size=[64,64]", "trainer.max_epochs=1", *FAST]
FORBIDDEN = ("lightning", "hydra", "omegaconf", "albumentations", "pycocotools", "torchmetrics", "faster_coco_eval",
             "pytorch_metric_learning")


@pytest.fixture(scope="module")
def multi_run(tmp_path_factory) -> dict:
    """The README's ``python train.py experiment=shapes_multi`` at a tiny size: four heads, two data sources."""
    out = tmp_path_factory.mktemp("multi")
    cfg = compose("train", ["experiment=shapes_multi", *SMALL, "callbacks.visualize=2"], output_dir=out)
    return train(cfg)


def test_four_heads_train_jointly_with_per_head_metrics(multi_run: dict) -> None:
    m = multi_run["metrics"]
    for key in ("val/cls/top1", "val/det/mAP", "val/seg/mIoU", "val/emb/R@1", "val/score",
                "val/cls/loss", "val/det/loss", "val/seg/loss"):
        assert key in m, sorted(m)
    mains = [m["val/cls/top1"], m["val/det/mAP"], m["val/seg/mIoU"], m["val/emb/R@1"]]
    assert m["val/score"] == pytest.approx(sum(mains) / 4, abs=1e-6)
    out = Path(multi_run["output_dir"])
    assert (out / "detections_det.json").is_file()
    for head in ("cls", "det", "seg"):
        assert len(list((out / "visualizations" / head).glob("*.png"))) == 2
    spec = json.loads((out / "bundle" / "model.json").read_text())["spec"]
    assert set(spec["heads"]) == {"cls", "det", "seg", "emb"}
    assert spec["class_names"]["seg"][0] == "background" and "emb" not in spec["class_names"]


def test_bundle_answers_every_head_from_one_backbone_pass_in_a_lean_process(multi_run: dict) -> None:
    code = f"""
import json, sys
import numpy as np
import zoo
model = zoo.load({multi_run['bundle']!r})
calls = []
model.backbone.register_forward_hook(lambda *a: calls.append(1))
r = zoo.Predictor(model)(np.full((80, 60, 3), 120, dtype=np.uint8))[0]
print(json.dumps({{"kinds": {{k: v.to_dict()["type"] for k, v in r.items()}}, "passes": len(calls),
                   "modules": sorted(m for m in sys.modules if m.split(".")[0] in {FORBIDDEN!r})}}))
"""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=str(ROOT), env=env,
                          timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["kinds"] == {"cls": "classification", "det": "detection", "seg": "semantic", "emb": "embedding"}
    assert got["passes"] == 1 and got["modules"] == []


def test_predictor_subset_and_multi_head_onnx(multi_run: dict, tmp_path: Path) -> None:
    model = zoo.load(multi_run["bundle"])
    img = np.random.default_rng(0).integers(0, 255, (70, 90, 3), dtype=np.uint8)
    sub = zoo.Predictor(model, heads=["det", "emb"])(img)[0]
    full = zoo.Predictor(model)(img)[0]
    assert set(sub) == {"det", "emb"}
    torch.testing.assert_close(sub["emb"].vector, full["emb"].vector)
    with pytest.raises(KeyError, match="head_options"):
        zoo.Predictor(model, head_options={"cls": {"score_thresh": 0.1}})

    ort = pytest.importorskip("onnxruntime")
    from zoo.hub.export import export_onnx

    path = export_onnx(model, tmp_path / "onnx")
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    assert {"cls", "emb", "seg.logits", "det.cls_logits"} <= set(names)
    x = torch.randn(2, 3, 64, 64)
    outs = dict(zip(names, sess.run(None, {"images": x.numpy()})))
    with torch.no_grad():
        raw = model(x)
    np.testing.assert_allclose(outs["cls"], raw["cls"].numpy(), rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(outs["seg.logits"], raw["seg"]["logits"].numpy(), rtol=1e-3, atol=1e-3)


def test_evaluate_reproduces_the_joint_metrics(multi_run: dict, tmp_path: Path) -> None:
    from zoo.evaluation import evaluate

    cfg = compose("evaluate", [f"ckpt_path={multi_run['best_ckpt']}", "data.shapes.num_train=96",
                               "data.shapes.num_val=32", "data.shapes.image_size=96", "data.num_workers=0",
                               "data.persistent_workers=false", "trainer.enable_progress_bar=false"],
                  output_dir=tmp_path)
    res = evaluate(cfg)
    for key in ("val/cls/top1", "val/det/mAP", "val/seg/mIoU", "val/emb/R@1"):
        assert res["metrics"][key] == pytest.approx(multi_run["metrics"][key], abs=1e-5), key


@pytest.mark.parametrize("balance", ["uncertainty", "pcgrad"])
def test_balancing_methods_train(balance: str, tmp_path: Path) -> None:
    cfg = compose("train", ["model=multitask", "model.heads=[classification,semantic_fpn]", f"model.balance={balance}",
                            *SMALL, "model.resize=stretch", "data.batch_size=16", "trainer.gradient_clip_val=5",
                            "trainer.log_every_n_steps=1", "export_bundle=false", "run_eval=false"], output_dir=tmp_path)
    res = train(cfg)
    import csv

    rows = list(csv.DictReader(open(Path(res["output_dir"]) / "csv" / "metrics.csv")))
    losses = [float(r["train/loss_step"]) for r in rows if r.get("train/loss_step")]
    assert losses and all(np.isfinite(losses))
    assert any(r.get("val/score") for r in rows)
    if balance == "uncertainty":
        assert any(r.get("train/cls/weight") for r in rows)


def test_pcgrad_removes_conflicts() -> None:
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 1.0])
    out = pcgrad_combine([a, b])
    # a projected off b and b off a: [0.5, 0.5] + [0, 1]
    torch.testing.assert_close(out, torch.tensor([0.5, 1.5]))
    c = torch.tensor([0.0, 2.0])
    torch.testing.assert_close(pcgrad_combine([a, c]), a + c)  # no conflict: plain sum


def test_head_list_from_the_command_line_on_real_coco(tmp_path: Path, coco128: Path) -> None:
    """``python train.py model=multitask model.heads='[fcos,semantic_fpn]' data=coco data.root=...`` (tiny)."""
    cmd = [sys.executable, str(ROOT / "train.py"), "model=multitask", "model.heads=[fcos,semantic_fpn]", "data=coco",
           f"data.root={coco128}", "backbone=test_resnet", "model.input_size=[128,128]", "data.limit_train_images=8",
           "data.limit_val_images=4", "data.batch_size=4", "trainer.max_epochs=1", *FAST, "export_bundle=false",
           f"hydra.run.dir={tmp_path / 'run'}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=str(tmp_path), timeout=400,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-3000:])
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())["metrics"]
    assert {"val/det/mAP", "val/seg/mIoU", "val/score"} <= set(metrics)


def test_mixed_sources_detection_and_identity_folders(tmp_path: Path) -> None:
    """Detection from a COCO json and similarity from identity folders, one backbone, alternating batches."""
    from tests.test_train_classification import identity_folders

    identity_folders(tmp_path / "ids")
    cfg = compose("train", ["model=multitask", *SMALL, "model.mix=round_robin", "export_bundle=false",
                            "model.heads=[{name: det, type: fcos}, {name: emb, type: embedding, embedding_dim: 16, "
                            "m_per_class: 2, data: {kind: identity_folder, root: " + str(tmp_path / "ids") +
                            ", batch_size: 8, augment: []}}]", "model.resize=stretch", "data.batch_size=8"],
                  output_dir=tmp_path / "run")
    res = train(cfg)
    assert {"val/det/mAP", "val/emb/R@1", "val/score"} <= set(res["metrics"])


def test_typos_in_head_arguments_stop_the_run(tmp_path: Path) -> None:
    cfg = compose("train", ["experiment=shapes_det", *SMALL, "++model.heads.det.num_conv=2"], output_dir=tmp_path)
    with pytest.raises(ConfigError, match=r"model.heads.det.*num_conv"):
        train(cfg)
    cfg = compose("train", ["model=multitask", "model.heads=[{type: classification, dropuot: 0.1}]", *SMALL],
                  output_dir=tmp_path)
    with pytest.raises(ConfigError, match="dropuot"):
        train(cfg)
    cfg = compose("train", ["model=multitask", "model.heads=[classification, unknown_head]", *SMALL],
                  output_dir=tmp_path)
    with pytest.raises(ConfigError, match="unknown head type"):
        train(cfg)


def test_num_classes_and_data_extra_typos_are_not_silently_ignored(tmp_path: Path) -> None:
    cfg = compose("train", ["experiment=shapes_cls", *SMALL, "++model.heads.cls.num_classes=3"], output_dir=tmp_path)
    with pytest.raises(ConfigError, match=r"model.heads.cls.*num_classes=3.*6 classes"):
        train(cfg)
    cfg = compose("train", ["experiment=shapes_sim", *SMALL, "++data.extra.identiy=identity"], output_dir=tmp_path)
    with pytest.raises(ConfigError, match="identiy"):
        train(cfg)


def _task(**options):
    from zoo.tasks.multitask import MultiTask

    spec = {"backbone": {"name": "test_resnet"}, "input_size": [64, 64], "task": "multitask",
            "heads": {"cls": {"type": "classification", "num_classes": 3},
                      "seg": {"type": "semantic_fpn", "num_classes": 4, "channels": 16}},
            "class_names": {"cls": ["a", "b", "c"], "seg": ["background", "a", "b", "c"]}}
    return MultiTask(spec=spec, optimizer={"name": "adamw", "lr": 1e-3, "weight_decay": 0.01},
                     scheduler={"name": "none"}, options=options, init_weights=False)


def test_per_head_learning_rates_and_phase_freezing(monkeypatch: pytest.MonkeyPatch) -> None:
    task = _task(heads={"cls": {"lr_mult": 10.0}, "seg": {"frozen_epochs": 2}}, freeze_backbone_epochs=1)
    opt = task.configure_optimizers()
    lr_of = {}
    for g in opt.param_groups:
        for p in g["params"]:
            lr_of[id(p)] = g["lr"]
    assert all(lr_of[id(p)] == pytest.approx(1e-2) for p in task.model.heads["cls"].parameters())
    assert all(lr_of[id(p)] == pytest.approx(1e-3) for p in task.model.heads["seg"].parameters())
    for epoch, bb, seg in ((0, False, False), (1, True, False), (2, True, True)):
        monkeypatch.setattr(type(task), "current_epoch", property(lambda self, e=epoch: e))
        task.on_train_epoch_start()
        assert all(p.requires_grad == bb for p in task.model.backbone.parameters()), epoch
        assert all(p.requires_grad == seg for p in task.model.heads["seg"].parameters()), epoch
        assert all(p.requires_grad for p in task.model.heads["cls"].parameters())


def test_uncertainty_weights_are_learned_parameters() -> None:
    task = _task(balance="uncertainty")
    assert task.log_vars is not None and task.log_vars.shape == (2,)
    opt = task.configure_optimizers()
    assert any(p is task.log_vars for g in opt.param_groups for p in g["params"])


def test_class_balanced_batches_change_from_epoch_to_epoch(tmp_path: Path) -> None:
    """The class-balanced sampler of an embedding head draws new batches every epoch (set_epoch is called)."""
    import lightning.pytorch as pl

    from zoo.tasks.multitask import MultiTask

    cfg = compose("train", ["experiment=shapes_sim", *SMALL, "data.batch_size=16"], output_dir=tmp_path)
    from zoo.config import TrainConfig, validate

    dm, kwargs = MultiTask.build(validate(cfg, TrainConfig))
    seen: dict[int, list] = {}

    class Record(pl.Callback):
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            seen.setdefault(trainer.current_epoch, []).append(tuple(batch["image_ids"]))

    trainer = pl.Trainer(max_epochs=2, limit_train_batches=2, limit_val_batches=0, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[Record()], default_root_dir=str(tmp_path))
    trainer.fit(MultiTask(**kwargs, init_weights=False), datamodule=dm)
    assert len(seen[0]) == len(seen[1]) == 2 and seen[0] != seen[1]


def test_warmup_epochs_count_real_epochs_when_max_steps_stops_training(tmp_path: Path) -> None:
    """``trainer.max_steps`` with a large ``max_epochs``: warm-up still lasts ``warmup_epochs`` real epochs (it
    lasted one step: steps per epoch were taken as total steps / max_epochs)."""
    import lightning.pytorch as pl

    task = _task()
    task.hparams.scheduler = {"name": "cosine", "warmup_epochs": 1.0, "warmup_start_factor": 0.01}
    images = torch.randn(40, 3, 64, 64)
    loader = torch.utils.data.DataLoader(
        [{"images": images[i]} for i in range(40)], batch_size=8,
        collate_fn=lambda s: {"images": torch.stack([x["images"] for x in s]), "targets": torch.zeros(len(s)).long(),
                              "target_format": "classification", "image_sizes": [(64, 64)] * len(s)})
    trainer = pl.Trainer(max_steps=20, max_epochs=1000, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                         default_root_dir=str(tmp_path))
    trainer.fit(task, train_dataloaders=loader)
    fn = trainer.lr_scheduler_configs[0].scheduler.lr_lambdas[0]
    assert fn(0) == pytest.approx(0.01) and fn(2) < 0.5 and fn(5) == pytest.approx(1.0, abs=0.1)
