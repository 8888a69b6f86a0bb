"""``trainer.check_val_every_n_epoch=auto`` (zoo.callbacks.ValidationSchedule): validation paced by its measured
cost, the last epoch always validated (the first without a sanity check's estimate), no epoch-end last.ckpt on skipped epochs, fixed integers kept."""

from __future__ import annotations

import time
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.demos.boring_classes import BoringModel

from zoo.callbacks import ValidationSchedule
from zoo.checkpointing import ZooCheckpoint


class _Timed(BoringModel):
    """BoringModel whose validation pass takes ``val_sleep`` seconds per batch and training ``train_sleep``."""

    def __init__(self, train_sleep: float, val_sleep: float) -> None:
        super().__init__()
        self.train_sleep, self.val_sleep = train_sleep, val_sleep
        self.val_epochs: list[int] = []

    def training_step(self, batch, batch_idx):
        time.sleep(self.train_sleep)
        return super().training_step(batch, batch_idx)

    def validation_step(self, batch, batch_idx):
        time.sleep(self.val_sleep)
        out = super().validation_step(batch, batch_idx)
        self.log("val_loss", out["x"])
        return out

    def on_validation_epoch_end(self) -> None:
        if not self.trainer.sanity_checking:
            self.val_epochs.append(int(self.trainer.current_epoch))


class _LastWrites(pl.Callback):
    """Records the epochs at whose end last.ckpt was (re)written, and those where best.ckpt was (looked at when the
    next epoch starts and when training ends: Lightning runs checkpoint callbacks after every other callback)."""

    def __init__(self, ckpt: ZooCheckpoint) -> None:
        self.ckpt, self.epochs, self.best_epochs, self._m, self._b = ckpt, [], [], None, None

    def _look(self, epoch: int) -> None:
        p = Path(self.ckpt.last_path)
        m = p.stat().st_mtime_ns if p.exists() else None
        if m != self._m:
            self.epochs.append(epoch)
        self._m = m
        b = self.ckpt.saved_steps.get(str(self.ckpt.best_model_path))
        if b is not None and b != self._b:
            self.best_epochs.append(epoch)
        self._b = b

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._look(int(trainer.current_epoch) - 1)

    def on_fit_end(self, trainer, pl_module) -> None:
        self._look(int(trainer.current_epoch) - 1)


def _fit(tmp_path: Path, *, train_sleep: float, val_sleep: float, epochs: int, budget: float = 0.05,
         max_minutes: float = 1.0, sanity: int = 0):
    model = _Timed(train_sleep, val_sleep)
    sched = ValidationSchedule(budget=budget, max_minutes=max_minutes)
    ckpt = ZooCheckpoint(dirpath=str(tmp_path), filename="best", monitor="val_loss", mode="min", save_last=True,
                         background_writes=False, handle_signals=False)
    ckpt.schedule = sched
    writes = _LastWrites(ckpt)  # after the checkpoint callback: sees this epoch's write
    trainer = pl.Trainer(max_epochs=epochs, limit_train_batches=4, limit_val_batches=2, check_val_every_n_epoch=1,
                         callbacks=[sched, ckpt, writes], logger=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=sanity, accelerator="cpu")
    trainer.fit(model)
    return model, sched, writes, ckpt


def test_costly_validation_is_spaced_out_first_and_last_epochs_kept(tmp_path: Path) -> None:
    # training 4 x 5 ms = 20 ms an epoch, validation 2 x 5 ms = 10 ms: at a 5% budget every 10th epoch
    model, sched, writes, ckpt = _fit(tmp_path, train_sleep=0.005, val_sleep=0.005, epochs=14)
    assert model.val_epochs[0] == 0 and model.val_epochs[-1] == 13
    assert len(model.val_epochs) <= 4, model.val_epochs
    assert sched.every >= 5
    assert model.val_epochs == sched.validated_epochs
    # last.ckpt is written at the epochs that validated (and at the end), not at the others
    assert set(writes.epochs) <= set(model.val_epochs), (writes.epochs, model.val_epochs)
    assert Path(ckpt.best_model_path).is_file() and Path(ckpt.last_path).is_file()


def test_the_sanity_check_estimates_a_pass_so_even_the_first_epoch_can_skip(tmp_path: Path) -> None:
    # 2 sanity batches time a pass (~10 ms) before training: already epoch 0 (20 ms) is too short to validate
    model, sched, _, _ = _fit(tmp_path, train_sleep=0.005, val_sleep=0.005, epochs=14, sanity=2)
    assert sched.pass_seconds is not None
    assert model.val_epochs[0] > 0 and model.val_epochs[-1] == 13 and len(model.val_epochs) <= 3, model.val_epochs


def test_cheap_validation_runs_every_epoch(tmp_path: Path) -> None:
    # validation next to nothing (no sleep) against 4 x 50 ms of training: every epoch; last.ckpt at every epoch
    # whose validation improved best.ckpt (a link to it) and at the end
    model, sched, writes, _ = _fit(tmp_path, train_sleep=0.05, val_sleep=0.0, epochs=5, budget=1.0)
    assert model.val_epochs == [0, 1, 2, 3, 4] and sched.every == 1
    assert writes.best_epochs[0] == 0 and writes.epochs == sorted({*writes.best_epochs, 4}), writes.__dict__


def test_the_longest_gap_between_validations_is_bounded(tmp_path: Path) -> None:
    # validation costs 5x an epoch, but at most ~0.1 s (0.002 min) of training may pass between validations
    model, sched, _, _ = _fit(tmp_path, train_sleep=0.01, val_sleep=0.1, epochs=8, max_minutes=0.002)
    gaps = [b - a for a, b in zip(model.val_epochs, model.val_epochs[1:])]
    assert max(gaps) <= 3, model.val_epochs


def test_bad_settings_are_refused_by_name() -> None:
    with pytest.raises(ValueError, match="budget"):
        ValidationSchedule(budget=0)


@pytest.mark.parametrize("value, ok", [("auto", True), (3, True), (0, False), ("often", False)])
def test_train_config_accepts_auto_or_a_whole_number(tmp_path: Path, value, ok: bool) -> None:
    from zoo.config import ConfigError, TrainConfig, validate
    from zoo.training import build_trainer

    from tests.conftest import compose

    cfg = validate(compose("train", [f"trainer.check_val_every_n_epoch={value}", "trainer.max_epochs=1"],
                           output_dir=tmp_path), TrainConfig)
    if not ok:
        with pytest.raises(ConfigError, match="check_val_every_n_epoch"):
            build_trainer(cfg, tmp_path, monitor="val/loss", mode="min")
        return
    trainer, ckpt = build_trainer(cfg, tmp_path, monitor="val/loss", mode="min")
    has = [c for c in trainer.callbacks if isinstance(c, ValidationSchedule)]
    assert bool(has) == (value == "auto") and (ckpt.schedule is not None) == (value == "auto")
    assert trainer.check_val_every_n_epoch == (1 if value == "auto" else value)


def test_skipped_epochs_still_write_last_ckpt_when_its_minutes_passed(tmp_path: Path) -> None:
    # checkpoint_minutes=0: every epoch end writes last.ckpt, validated or not
    model = _Timed(0.005, 0.005)
    sched = ValidationSchedule(budget=0.05, max_minutes=1.0, checkpoint_minutes=0.0)
    ckpt = ZooCheckpoint(dirpath=str(tmp_path), filename="best", monitor="val_loss", mode="min", save_last=True,
                         background_writes=False, handle_signals=False)
    ckpt.schedule = sched
    writes = _LastWrites(ckpt)
    trainer = pl.Trainer(max_epochs=6, limit_train_batches=4, limit_val_batches=2, callbacks=[sched, ckpt, writes],
                         logger=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         accelerator="cpu")
    trainer.fit(model)
    assert len(model.val_epochs) < 6 and writes.epochs == [0, 1, 2, 3, 4, 5], (model.val_epochs, writes.epochs)


TINY = ["backbone=test_resnet", "model.input_size=[32,32]", "data.batch_size=16", "data.augment=[]",
        "export_bundle=false", "trainer.enable_progress_bar=false", "data.num_workers=0",
        "data.persistent_workers=false", "logger.names=[csv]", "callbacks.lr_monitor=false",
        "data.shapes.num_train=96", "data.shapes.num_val=32", "data.shapes.image_size=96"]


def test_train_reports_the_last_validation_when_best_is_the_final_state(tmp_path: Path, monkeypatch) -> None:
    """best.ckpt is the final state (the monitor improves every validation): train() takes the last epoch's (final)
    validation as its report, plots included, without validating the same weights again, and its metrics are what
    evaluating best.ckpt gives. When the best is an earlier state, best.ckpt is validated as before."""
    from zoo.evaluation import evaluate
    from zoo.training import train

    from tests.conftest import compose

    calls: list = []
    orig = pl.Trainer.validate

    def spy(self, *args, **kwargs):
        calls.append(kwargs.get("ckpt_path"))
        return orig(self, *args, **kwargs)

    monkeypatch.setattr(pl.Trainer, "validate", spy)
    ov = [*TINY, "trainer.max_epochs=2", "callbacks.checkpoint.monitor=epoch", "callbacks.checkpoint.mode=max"]
    res = train(compose("train", ov, output_dir=tmp_path / "up"))
    assert calls == [], calls
    assert res["metrics"]["val/top1"] >= 0 and "val/loss" in res["metrics"]
    assert res.get("plots") and all(Path(p).is_file() for p in res["plots"])
    assert any(Path(p).name == "confusion_matrix.png" for p in res["plots"])
    ev_ov = ["data.num_workers=0", "data.persistent_workers=false", "trainer.enable_progress_bar=false", *TINY[-3:]]
    ev = evaluate(compose("evaluate", [f"ckpt_path={res['best_ckpt']}", *ev_ov], output_dir=tmp_path / "ev"))
    for k in ("val/top1", "val/loss"):
        assert ev["metrics"][k] == pytest.approx(res["metrics"][k], abs=1e-5), k
    # the best stays at epoch 0 (no sanity check: without its estimate the first epoch validates): best.ckpt is
    # validated again, as without the schedule
    ov[-1] = "callbacks.checkpoint.mode=min"
    ov.append("trainer.num_sanity_val_steps=0")
    calls.clear()
    res = train(compose("train", ov, output_dir=tmp_path / "flat"))
    assert calls == [res["best_ckpt"]]


_DDP_SCRIPT = r'''
import json, sys, time
import lightning.pytorch as pl
from lightning.pytorch.demos.boring_classes import BoringModel
from zoo.callbacks import ValidationSchedule
from zoo.checkpointing import ZooCheckpoint

out = sys.argv[1]


class Model(BoringModel):
    """records the epochs it validated"""

    def __init__(self):
        super().__init__()
        self.val_epochs = []

    def training_step(self, batch, batch_idx):
        time.sleep(0.05)
        return super().training_step(batch, batch_idx)

    def validation_step(self, batch, batch_idx):
        out = super().validation_step(batch, batch_idx)
        self.log("val_loss", out["x"], sync_dist=True)  # a collective in every validation
        return out

    def on_validation_epoch_end(self):
        if not self.trainer.sanity_checking:
            self.val_epochs.append(int(self.trainer.current_epoch))

    def on_fit_end(self):
        with open(f"{out}/rank{self.global_rank}.json", "w") as f:
            json.dump(self.val_epochs, f)


class SlowOnRank0(pl.Callback):
    """rank 0's validation ends 0.3 s later than rank 1's, after the pass's last collective (so rank 1 does not wait
    for it): on their own clocks rank 0 sees a costly validation and rank 1 a cheap one"""

    def on_validation_end(self, trainer, pl_module):
        if trainer.global_rank == 0:
            time.sleep(0.3)


if __name__ == "__main__":
    sched = ValidationSchedule(budget=0.05, max_minutes=1.0, checkpoint_minutes=0.0005)
    ckpt = ZooCheckpoint(dirpath=out, filename="best", monitor="val_loss", mode="min", save_last=True,
                         background_writes=False, handle_signals=False)
    ckpt.schedule = sched
    trainer = pl.Trainer(max_epochs=8, limit_train_batches=4, limit_val_batches=2, check_val_every_n_epoch=1,
                         callbacks=[SlowOnRank0(), sched, ckpt], logger=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0, accelerator="cpu", devices=2, strategy="ddp_spawn")
    trainer.fit(Model())
'''


@pytest.mark.slow
def test_ranks_validate_the_same_epochs_whatever_their_clocks(tmp_path: Path) -> None:
    """Under DDP every rank must take the same decisions (validate this epoch, write last.ckpt at its end): the
    decisions are rank 0's, broadcast. Here rank 0's validation ends later than rank 1's; on their own clocks
    rank 0 would skip epochs that rank 1 validates, and the two would wait in different collectives (the CI run
    that found this crashed with 'Connection reset by peer')."""
    import json
    import os
    import subprocess
    import sys

    from tests.conftest import ROOT

    script = tmp_path / "ddp_schedule.py"
    script.write_text(_DDP_SCRIPT)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RANK", "LOCAL_RANK", "WORLD_SIZE",
                                                                     "MASTER_", "TORCHELASTIC"))}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    try:
        proc = subprocess.run([sys.executable, str(script), str(tmp_path)], cwd=str(tmp_path), env=env,
                              capture_output=True, text=True, timeout=150)
    except subprocess.TimeoutExpired as err:
        pytest.fail(f"the two ranks hung (they waited in different collectives):\n{str(err.stderr)[-2000:]}")
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    r0 = json.loads((tmp_path / "rank0.json").read_text())
    r1 = json.loads((tmp_path / "rank1.json").read_text())
    assert r0 == r1, (r0, r1)
    assert r0[-1] == 7 and len(r0) < 8, r0  # rank 0's costly validation is spaced out, the last epoch validated


def test_validations_that_do_not_improve_best_write_last_ckpt_only_when_its_minutes_passed(tmp_path: Path) -> None:
    """Under the schedule, last.ckpt after a validation that did not improve best.ckpt is a full write of the state
    (after an improving one it is a link to best.ckpt): it follows the checkpoint_minutes rule that skipped epochs
    follow, and the end of training still writes it."""
    model = _Timed(0.05, 0.0)  # validation cheap next to training: every epoch validates
    sched = ValidationSchedule(budget=1.0, max_minutes=1.0, checkpoint_minutes=1.0)
    # mode=max on a falling val_loss: only the first validation improves the monitored value
    ckpt = ZooCheckpoint(dirpath=str(tmp_path), filename="best", monitor="val_loss", mode="max", save_last=True,
                         background_writes=False, handle_signals=False)
    ckpt.schedule = sched
    writes = _LastWrites(ckpt)
    trainer = pl.Trainer(max_epochs=5, limit_train_batches=4, limit_val_batches=2, callbacks=[sched, ckpt, writes],
                         logger=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         accelerator="cpu")
    trainer.fit(model)
    assert model.val_epochs == [0, 1, 2, 3, 4]
    assert ckpt.saved_steps[ckpt.best_model_path] == 4  # best.ckpt: epoch 0's state
    assert writes.epochs == [0, 4], writes.epochs
    last = torch.load(ckpt.last_path, weights_only=False, map_location="cpu")
    assert last["global_step"] == 20  # the finished state (written at the end of training)
    # checkpoint_minutes=0: every validation writes last.ckpt again
    sched0 = ValidationSchedule(budget=1.0, max_minutes=1.0, checkpoint_minutes=0.0)
    ckpt0 = ZooCheckpoint(dirpath=str(tmp_path / "b"), filename="best", monitor="val_loss", mode="max",
                          save_last=True, background_writes=False, handle_signals=False)
    ckpt0.schedule = sched0
    writes0 = _LastWrites(ckpt0)
    pl.Trainer(max_epochs=5, limit_train_batches=4, limit_val_batches=2, callbacks=[sched0, ckpt0, writes0],
               logger=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
               accelerator="cpu").fit(_Timed(0.05, 0.0))
    assert writes0.epochs == [0, 1, 2, 3, 4], writes0.epochs


class _Flat(_Timed):
    """Logs the same ``val_score`` at every validation: each one ties the best so far."""

    def validation_step(self, batch, batch_idx):
        out = super().validation_step(batch, batch_idx)
        self.log("val_score", 0.5)
        return out


@pytest.mark.parametrize("on_tie, best_step", [("later", 12), ("earlier", 4)])
def test_a_validation_that_ties_the_best_moves_best_ckpt_to_the_later_state(tmp_path: Path, on_tie: str,
                                                                            best_step: int) -> None:
    """A tie with the best score goes to the later state by default (as good on the validation set, after more
    training), so a run whose last validation ties its best ends with best.ckpt = the final state and train()
    reports that validation instead of validating best.ckpt again; ``on_tie=earlier`` keeps the first one."""
    ckpt = ZooCheckpoint(dirpath=str(tmp_path), filename="best", monitor="val_score", mode="max", save_last=True,
                         background_writes=False, handle_signals=False, on_tie=on_tie)
    trainer = pl.Trainer(max_epochs=3, limit_train_batches=4, limit_val_batches=2, callbacks=[ckpt], logger=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         accelerator="cpu")
    trainer.fit(_Flat(0.0, 0.0))
    assert ckpt.saved_steps[ckpt.best_model_path] == best_step
    assert float(ckpt.best_model_score) == 0.5
    assert torch.load(ckpt.best_model_path, weights_only=False, map_location="cpu")["global_step"] == best_step


def test_on_tie_is_checked_by_name(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="on_tie"):
        ZooCheckpoint(dirpath=str(tmp_path), filename="best", monitor="val_score", mode="max", on_tie="first")
