"""Recipe parts: mixup / CutMix in the task, torchvision's augmentation policies as pipeline ops, and the recipe
presets each task gets by default."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.conftest import compose


def _task(mixup: dict, heads: dict | None = None):
    from zoo.tasks.multitask import MultiTask

    spec = {"backbone": {"name": "test_resnet"}, "input_size": [32, 32], "task": "classification",
            "heads": heads or {"cls": {"type": "classification", "num_classes": 3}}}
    if heads:
        spec["necks"] = {"fpn": {"type": "fpn", "out_channels": 32}}
    return MultiTask(spec=spec, options={"mixup": mixup}, optimizer={"name": "adamw", "lr": 1e-3},
                     scheduler={"name": "constant"})


def _batch(n: int = 4) -> dict:
    g = torch.Generator().manual_seed(0)
    return {"images": torch.randn(n, 3, 32, 32, generator=g), "targets": torch.tensor([0, 1, 2, 1][:n]),
            "target_format": "classification"}


@pytest.mark.parametrize("kind", ["mixup", "cutmix"])
def test_mixup_loss_is_the_lam_weighted_loss_of_both_label_sets(kind: str) -> None:
    task = _task({"mixup_alpha": 0.4 if kind == "mixup" else 0.0, "cutmix_alpha": 1.0 if kind == "cutmix" else 0.0})
    task.train()
    b = _batch()
    state = task._mix_rng.bit_generator.state
    x, lam, b2 = task._mix(b, ["cls"])
    assert 0.0 <= lam <= 1.0 and torch.equal(b2["targets"], b["targets"].flip(0))
    if kind == "mixup":
        torch.testing.assert_close(x, lam * b["images"] + (1 - lam) * b["images"].flip(0))
    else:  # a box of the partner image pasted, lam = the kept area
        changed = (x != b["images"]).any(1)[0]
        assert abs(1.0 - float(changed.float().mean()) - lam) < 0.05
    task._mix_rng.bit_generator.state = state  # the same draw inside head_losses
    losses, _ = task.head_losses(b)
    head = task.model.heads["cls"]
    raw = task.model(x, heads=["cls"])["cls"]
    want = lam * head.compute_loss(raw, b["targets"])["loss_cls"] + (1 - lam) * head.compute_loss(
        raw, b["targets"].flip(0))["loss_cls"]
    torch.testing.assert_close(losses["cls"]["loss_cls"], want)


def test_mixup_leaves_batches_for_other_heads_and_validation_alone() -> None:
    task = _task({"mixup_alpha": 0.4}, heads={"det": {"type": "fcos", "input": "fpn", "num_classes": 3}})
    task.train()
    assert task._mix({"images": torch.zeros(2, 3, 32, 32), "targets": [{}, {}], "target_format": "detection"},
                     ["det"]) is None
    off = _task({"mixup_alpha": 0.0, "cutmix_alpha": 0.0})
    assert off._mix(_batch(), ["cls"]) is None


@pytest.mark.parametrize("op", [{"type": "TrivialAugmentWide"}, {"type": "RandAugment", "num_ops": 2, "magnitude": 9},
                                {"type": "AutoAugment", "policy": "imagenet"}, {"type": "AugMix", "severity": 2}])
def test_torchvision_policies_are_pipeline_ops(op: dict) -> None:
    from zoo.data.transforms import build_augment

    aug = build_augment([op, {"type": "HorizontalFlip", "p": 0.5}])
    img = np.random.default_rng(0).integers(0, 255, (40, 56, 3), dtype=np.uint8)
    torch.manual_seed(0)
    outs = [aug(image=img)["image"] for _ in range(6)]
    assert all(o.shape == img.shape and o.dtype == np.uint8 for o in outs)
    assert any(not np.array_equal(o, img) for o in outs)
    with pytest.raises(ValueError, match="RandAugment: bad arguments"):
        build_augment([{"type": "RandAugment", "num_opz": 2}])


def test_recipe_group_follows_the_model_group_and_recipe_none_turns_it_off() -> None:
    """``conf/train.yaml`` applies ``conf/recipe/<model>.yaml`` when it exists; ``recipe=none`` composes everywhere."""
    from pathlib import Path

    from tests.conftest import CONF

    cfg = compose("train", ["model=detection"])
    assert cfg.model.task == "detection"
    for model in ("classification", "detection", "semantic", "similarity"):
        plain = compose("train", [f"model={model}", "recipe=none"])
        default = compose("train", [f"model={model}"])
        if not (Path(CONF) / "recipe" / f"{model}.yaml").is_file():
            assert plain == default  # no measured recipe yet: the model group's own defaults


def test_own_masks_get_the_measured_semantic_recipe_and_recipe_none_drops_its_loss_term() -> None:
    """``model=semantic data=mask_folder`` with no other option trains with scale jitter and the dice term measured
    in ``benchmarks/results/recipes_sem.md``; ``recipe=none`` keeps the data group's jitter but not the dice term."""
    base = ["model=semantic", "data=mask_folder", "data.root=/nowhere"]
    cfg = compose("train", base)
    assert [op["type"] for op in cfg.data.augment] == ["RandomResizedCrop", "HorizontalFlip"]
    assert list(cfg.data.augment[0]["scale"]) == [0.5, 1.0]
    assert cfg.model.heads.seg.dice_weight == 1.0 and cfg.model.heads.seg.channels == 128
    plain = compose("train", [*base, "recipe=none"])
    assert "dice_weight" not in plain.model.heads.seg
    assert [op["type"] for op in plain.data.augment] == ["RandomResizedCrop", "HorizontalFlip"]
    # an explicit command-line choice still wins over the recipe
    assert compose("train", [*base, "model.heads.seg.dice_weight=0.0"]).model.heads.seg.dice_weight == 0.0


def test_own_identities_get_the_measured_similarity_recipe_and_recipe_none_the_group_default() -> None:
    """``model=similarity data=identity_folder`` with no other option trains with ArcFace (measured in
    ``benchmarks/results/recipes_sim.md`` and ``recipes_sim_shapes.md``); ``recipe=none`` gives the model group's
    multi-similarity loss; an explicit ``model.loss`` wins over the recipe."""
    base = ["model=similarity", "data=identity_folder", "data.root=/nowhere"]
    assert compose("train", base).model.loss == "arcface"
    assert compose("train", [*base, "recipe=none"]).model.loss == "multi_similarity"
    assert compose("train", [*base, "model.loss=supcon"]).model.loss == "supcon"


# ---------------------------------------------------------------------------------------------------- small data
def test_auto_epochs_sizes_small_data_in_steps_and_large_data_in_epochs() -> None:
    from zoo.callbacks import AutoEpochs

    a = AutoEpochs(min_epochs=10, min_steps=2000, cap=1000)
    assert a.choose(4) == 500 and a.steps_per_epoch == 4  # 300 photos at batch 64 (4 full batches): 2000 steps
    assert a.choose(1848) == 10  # COCO train2017 at batch 64: 10 epochs, ~18,000 steps
    assert a.choose(300) == 10 and a.choose(199) == 11  # the step floor starts to count below 200 batches an epoch
    assert a.choose(8, accumulate=4) == 1000  # 2 optimizer steps an epoch: 1000 epochs (also the cap)
    assert a.choose(1, accumulate=1) == 1000  # capped
    assert a.choose(float("inf")) == 10 and a.steps_per_epoch is None  # a stream of unknown length
    with pytest.raises(ValueError, match="auto_epochs"):
        AutoEpochs(min_epochs=10, min_steps=100, cap=5)


def test_the_default_run_length_is_auto_and_an_explicit_one_is_kept(tmp_path) -> None:
    from zoo.config import TrainConfig, validate

    assert validate(compose("train", [], tmp_path), TrainConfig).trainer.max_epochs is None
    assert validate(compose("train", ["trainer.max_epochs=3"], tmp_path), TrainConfig).trainer.max_epochs == 3


@pytest.mark.parametrize("length", ["auto", "explicit", "max_steps", "limited"])
def test_train_runs_as_many_steps_as_the_schedule_says(length: str, tmp_path) -> None:
    """94 training images in batches of 16: 5 steps an epoch. auto with min_steps=12 -> 3 epochs (15 steps), and
    the cosine schedule spans those 15 steps (the last lr is the floor, not a value mid-decay); an explicit
    max_epochs=2 -> 10 steps; max_steps=7 with max_epochs=null -> 7 steps. ``limited``: limit_train_batches=2 (a
    quick look at part of the data) gets min_epochs=2 epochs (4 steps), not the 6 epochs that would make up the
    12 steps from the very batches the limit removed."""
    import csv

    from tests.conftest import FAST, SMALL_SHAPES
    from zoo.training import train

    ov = {"auto": ["trainer.auto_epochs.min_epochs=1", "trainer.auto_epochs.min_steps=12"],
          "explicit": ["trainer.max_epochs=2", "trainer.auto_epochs.min_steps=12"],
          "max_steps": ["trainer.max_steps=7"],
          "limited": ["trainer.auto_epochs.min_epochs=2", "trainer.auto_epochs.min_steps=12",
                      "trainer.limit_train_batches=2"]}[length]
    cfg = compose("train", ["backbone=test_resnet", "model.input_size=[32,32]", *FAST, *SMALL_SHAPES,
                            "data.batch_size=16", "data.augment=[]", "export_bundle=false", "run_eval=false",
                            "scheduler.warmup_epochs=0", "callbacks.lr_monitor=true", "trainer.log_every_n_steps=1", *ov], tmp_path / "run")
    train(cfg)
    last = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    steps, epochs = last["global_step"], last["epoch"] + 1
    assert (steps, epochs) == {"auto": (15, 3), "explicit": (10, 2), "max_steps": (7, 2), "limited": (4, 2)}[length], \
        (steps, epochs)
    if length == "auto":
        rows = list(csv.DictReader(open(tmp_path / "run" / "csv" / "metrics.csv")))
        lrs = [float(r[k]) for r in rows for k in r if k.startswith("lr-") and r[k]]
        assert lrs and lrs[-1] < 0.05 * lrs[0], lrs  # decayed over the 15 steps (min_lr_factor 0.01)


def test_auto_epochs_count_the_batches_of_one_process_under_ddp(tmp_path, capfd) -> None:
    """2 CPU processes (ddp_spawn): 94 training images split 47 / 47, batches of 16 -> 2 steps an epoch on each
    process (one process alone has 5). min_steps=6 -> 3 epochs and 6 optimizer steps; both ranks agree (a rank
    that chose another count would hang the other at the next collective, or finish early)."""
    from tests.conftest import FAST, SMALL_SHAPES
    from zoo.training import train

    cfg = compose("train", ["backbone=test_resnet", "model.input_size=[32,32]", "trainer=ddp_cpu", *FAST,
                            *SMALL_SHAPES, "data.batch_size=16", "data.augment=[]", "export_bundle=false",
                            "run_eval=false", "trainer.auto_epochs.min_epochs=1", "trainer.auto_epochs.min_steps=6"],
                  tmp_path / "run")
    train(cfg)
    last = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert (last["global_step"], last["epoch"] + 1) == (6, 3), (last["global_step"], last["epoch"])
    out, err = capfd.readouterr()
    assert out.count("training for 3 epochs (2 optimizer steps per epoch") == 1  # by rank 0
    # the spawned processes keep the zoo's warning filters: no advice to sync metrics that are already reduced
    assert "self.log('val/" not in err and "LeafSpec" not in err, err[-2000:]


def test_scaled_lr_rules() -> None:
    from zoo.tasks.base import scaled_lr

    assert scaled_lr(0.1, 512, 256, "auto", "sgd") == pytest.approx(0.2)  # linear for SGD
    assert scaled_lr(1e-3, 1024, 256, "auto", "adamw") == pytest.approx(2e-3)  # sqrt for the Adam family
    assert scaled_lr(1e-3, 64, 256, "linear", "adamw") == pytest.approx(2.5e-4)
    assert scaled_lr(1e-3, 256, 256) == pytest.approx(1e-3)
    with pytest.raises(ValueError, match="lr_scaling"):
        scaled_lr(1e-3, 64, 256, "cubic")


@pytest.mark.parametrize("accumulate,expected", [(1, 2e-3 * 2 ** 0.5), (2, 4e-3)])
def test_lr_follows_the_global_batch_when_lr_batch_is_given(accumulate: int, expected: float, tmp_path) -> None:
    """lr 2e-3 given for a batch of 8 (AdamW: square-root rule); the run's batch is 16 x 1 process x accumulate."""
    import csv

    from tests.conftest import FAST, SMALL_SHAPES
    from zoo.training import train

    cfg = compose("train", ["backbone=test_resnet", "model.input_size=[32,32]", *FAST, *SMALL_SHAPES,
                            "data.batch_size=16", "data.augment=[]", "export_bundle=false", "run_eval=false",
                            "scheduler=constant", "callbacks.lr_monitor=true", "trainer.log_every_n_steps=1",
                            "trainer.max_steps=2", "optimizer.lr=2e-3", "optimizer.lr_batch=8",
                            f"trainer.accumulate_grad_batches={accumulate}"], tmp_path / "run")
    train(cfg)
    rows = list(csv.DictReader(open(tmp_path / "run" / "csv" / "metrics.csv")))
    lrs = {float(r[k]) for r in rows for k in r if k.startswith("lr-") and r[k]}
    assert lrs and all(v == pytest.approx(expected) for v in lrs), lrs
