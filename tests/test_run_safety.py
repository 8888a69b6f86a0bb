"""Run safety: an unwritable checkpoint folder fails before training; last.ckpt on its own (atomic) schedule;
SIGINT/SIGTERM save a resumable checkpoint and say how to resume; kill-and-resume sees the same batches and reaches
the same step; resuming in the same folder continues metrics.csv; run folders are locked and not mixed; run folder
names are unique; NaN/inf losses are caught at the step."""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import FAST, ROOT, SMALL_SHAPES, compose
from zoo.training import train

#: The 94 training images of SMALL_SHAPES in batches of 16 (last partial batch dropped): 5 steps per epoch.
STEPS_PER_EPOCH = 5
# a fixed schedule (validation and checkpoints every epoch): these tests are about the checkpoint mechanics; what the
# auto schedule does to them is in tests/test_validation_schedule.py
BASE = ["backbone=test_resnet", "model.input_size=[32,32]", *FAST, *SMALL_SHAPES, "data.batch_size=16",
        "data.augment=[]", "export_bundle=false", "run_eval=false", "trainer.check_val_every_n_epoch=1"]


def _ckpt(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["NO_ALBUMENTATIONS_UPDATE"] = "1"
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def _wait_for(pred, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    t0 = time.monotonic()
    while not pred():
        if proc.poll() is not None:
            out = proc.stdout.read() if proc.stdout else ""
            raise AssertionError(f"the run ended (rc={proc.returncode}) before the awaited point:\n{out[-4000:]}")
        if time.monotonic() - t0 > timeout:
            proc.kill()
            raise AssertionError("timed out waiting for the run")
        time.sleep(0.05)


# ---------------------------------------------------------------------------------------------------- 1. writable
@pytest.mark.parametrize("where", ["file_in_the_way", "unwritable_dirpath"])
def test_unwritable_checkpoint_folder_fails_before_training(where: str, tmp_path: Path) -> None:
    from zoo.checkpointing import RunFolderError

    run = tmp_path / "run"
    run.mkdir()
    ov = [*BASE, "trainer.max_epochs=2"]
    if where == "file_in_the_way":
        (run / "checkpoints").write_text("a file where the checkpoint folder should be")
        folder = run / "checkpoints"
    else:  # /proc refuses new folders even to root
        folder = Path("/proc/zoo-no-such-dir/checkpoints")
        ov.append(f"callbacks.checkpoint.dirpath={folder}")
    with pytest.raises(RunFolderError, match=re.escape(str(folder)) + ".*not writable"):
        train(compose("train", ov, output_dir=run))
    assert not (run / "csv" / "metrics.csv").exists(), "it trained before failing"


# ---------------------------------------------------------------------------------------------------- 2. last.ckpt
def test_last_ckpt_is_written_every_epoch_and_every_n_steps(tmp_path: Path, monkeypatch) -> None:
    """The monitor (epoch, mode=min) never improves after epoch 0: last.ckpt must still follow the run."""
    from zoo.checkpointing import ZooCheckpoint

    written: list[int] = []
    orig = ZooCheckpoint._save_last_checkpoint

    def spy(self, trainer, candidates):
        orig(self, trainer, candidates)
        written.append(trainer.global_step)

    monkeypatch.setattr(ZooCheckpoint, "_save_last_checkpoint", spy)
    ov = [*BASE, "trainer.max_epochs=3", "callbacks.checkpoint.monitor=epoch", "callbacks.checkpoint.mode=min",
          "callbacks.checkpoint.last_every_n_steps=4", "callbacks.checkpoint.last_every_minutes=0"]
    res = train(compose("train", ov, output_dir=tmp_path))
    final = 3 * STEPS_PER_EPOCH
    assert _ckpt(Path(res["last_ckpt"]))["global_step"] == final
    assert _ckpt(Path(res["best_ckpt"]))["epoch"] == 0  # the best never moved
    expected = set(range(4, final + 1, 4)) | set(range(STEPS_PER_EPOCH, final + 1, STEPS_PER_EPOCH))
    assert expected <= set(written), written  # every 4 steps and every epoch end
    assert not list((tmp_path / "checkpoints").glob("*.tmp")), "a temporary file was left behind"


def test_background_checkpoint_holds_the_state_of_its_step_while_training_goes_on(tmp_path: Path,
                                                                                 monkeypatch) -> None:
    """Checkpoint bytes are written by a thread (slowed down here) while the next epoch trains: best.ckpt of epoch 0
    still holds epoch 0's weights and step (a copy is taken at the step), and fit returns with every file complete."""
    import lightning.pytorch as pl
    from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

    orig_save = TorchCheckpointIO.save_checkpoint
    threads: list[str] = []

    def slow(self, checkpoint, path, storage_options=None):
        threads.append(__import__("threading").current_thread().name)
        time.sleep(0.5)
        return orig_save(self, checkpoint, path, storage_options)

    monkeypatch.setattr(TorchCheckpointIO, "save_checkpoint", slow)
    seen: dict[str, dict] = {}

    class Record(pl.Callback):
        def on_train_epoch_start(self, trainer, pl_module) -> None:
            if trainer.current_epoch == 1:
                seen["after_epoch_0"] = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}

    ov = [*BASE, "trainer.max_epochs=3", "callbacks.checkpoint.monitor=epoch", "callbacks.checkpoint.mode=min",
          "callbacks.checkpoint.last_every_minutes=0"]
    res = train(compose("train", ov, output_dir=tmp_path), callbacks=[Record()])
    assert threads and all(t.startswith("zoo-checkpoint") for t in threads), threads
    best, last = _ckpt(Path(res["best_ckpt"])), _ckpt(Path(res["last_ckpt"]))
    assert best["global_step"] == STEPS_PER_EPOCH and last["global_step"] == 3 * STEPS_PER_EPOCH
    for k, v in seen["after_epoch_0"].items():
        torch.testing.assert_close(best["state_dict"][k], v, rtol=0, atol=0, msg=k)
    assert not list(Path(res["best_ckpt"]).parent.glob(".*.tmp"))


def test_failed_background_checkpoint_write_is_raised_and_keeps_the_previous_file(tmp_path: Path,
                                                                                  monkeypatch) -> None:
    """A write that fails in the background thread (disk full) stops the run with an error naming the file, and the
    last.ckpt written before it stays intact and resumable."""
    from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

    orig_save = TorchCheckpointIO.save_checkpoint
    calls: list[str] = []

    def full_disk(self, checkpoint, path, storage_options=None):
        calls.append(Path(path).name)
        if len(calls) > 2:  # epoch 0's best and last are written, then the disk is full
            raise OSError(28, "No space left on device")
        return orig_save(self, checkpoint, path, storage_options)

    monkeypatch.setattr(TorchCheckpointIO, "save_checkpoint", full_disk)
    ov = [*BASE, "trainer.max_epochs=3", "callbacks.checkpoint.monitor=epoch", "callbacks.checkpoint.mode=min",
          "callbacks.checkpoint.last_every_minutes=0"]
    with pytest.raises(OSError, match=r"writing the checkpoint .*last\.ckpt failed: .*No space left"):
        train(compose("train", ov, output_dir=tmp_path))
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert _ckpt(last)["global_step"] == STEPS_PER_EPOCH


def test_the_final_last_ckpt_is_written_during_the_final_evaluation_and_complete_when_train_returns(
        tmp_path: Path, monkeypatch) -> None:
    """The end of fitting waits for best.ckpt (the final evaluation reads it) but not for the final last.ckpt,
    whose (slowed) write goes on while best.ckpt is validated; train() returns only once it is on disk, holding the
    finished step. A failure of that last write is raised by train()."""
    import lightning.pytorch as pl
    from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

    orig_save = TorchCheckpointIO.save_checkpoint
    events: list[tuple[str, float]] = []

    def slow_last(self, checkpoint, path, storage_options=None):
        if Path(path).name == ".last.ckpt.tmp" and checkpoint["global_step"] == 3 * STEPS_PER_EPOCH:
            time.sleep(1.0)
            events.append(("last written", time.monotonic()))
        return orig_save(self, checkpoint, path, storage_options)

    class FitEnd(pl.Callback):
        def on_fit_end(self, trainer, pl_module) -> None:
            events.append(("fit end", time.monotonic()))

    monkeypatch.setattr(TorchCheckpointIO, "save_checkpoint", slow_last)
    # mode=min on the epoch: best.ckpt stays epoch 0's, so the end writes last.ckpt in full and validates best.ckpt
    ov = [*BASE, "trainer.max_epochs=3", "callbacks.checkpoint.monitor=epoch", "callbacks.checkpoint.mode=min",
          "callbacks.checkpoint.last_every_minutes=0", "run_eval=true"]
    res = train(compose("train", ov, output_dir=tmp_path), callbacks=[FitEnd()])
    assert [e for e, _ in events] == ["fit end", "last written"], events
    assert _ckpt(Path(res["last_ckpt"]))["global_step"] == 3 * STEPS_PER_EPOCH
    assert _ckpt(Path(res["best_ckpt"]))["global_step"] == STEPS_PER_EPOCH and res["metrics"]
    assert not list(Path(res["last_ckpt"]).parent.glob(".*.tmp"))

    def full_disk(self, checkpoint, path, storage_options=None):
        if Path(path).name == ".last.ckpt.tmp" and checkpoint["global_step"] == 3 * STEPS_PER_EPOCH:
            raise OSError(28, "No space left on device")
        return orig_save(self, checkpoint, path, storage_options)

    monkeypatch.setattr(TorchCheckpointIO, "save_checkpoint", full_disk)
    with pytest.raises(OSError, match=r"writing the checkpoint .*last\.ckpt failed: .*No space left"):
        train(compose("train", ov, output_dir=tmp_path / "full"))
    assert _ckpt(tmp_path / "full" / "checkpoints" / "last.ckpt")["global_step"] == 2 * STEPS_PER_EPOCH


@pytest.mark.parametrize("background", [True, False])
def test_last_ckpt_written_right_after_best_is_the_same_file_not_a_second_serialisation(tmp_path: Path, monkeypatch,
                                                                                        background: bool) -> None:
    """The monitor (epoch, mode=max) improves every epoch: from the second epoch on, last.ckpt written right after
    best.ckpt in the same hook is a link to those bytes (one serialisation per epoch, not two), and its content is
    what a fresh serialisation gives; in an epoch where the best does not move, last.ckpt is serialised. The same
    with checkpoints written by the background thread and in the foreground."""
    from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

    saves: list[str] = []
    orig_save = TorchCheckpointIO.save_checkpoint

    def spy(self, checkpoint, path, storage_options=None):
        saves.append(Path(path).name.lstrip(".").removesuffix(".tmp"))  # .last.ckpt.tmp -> last.ckpt
        return orig_save(self, checkpoint, path, storage_options)

    monkeypatch.setattr(TorchCheckpointIO, "save_checkpoint", spy)
    ov = [*BASE, "trainer.max_epochs=3", "callbacks.checkpoint.monitor=epoch", "callbacks.checkpoint.mode=max",
          "callbacks.checkpoint.last_every_minutes=0", f"callbacks.checkpoint.background_writes={background}"]
    res = train(compose("train", ov, output_dir=tmp_path))
    best, last = Path(res["best_ckpt"]), Path(res["last_ckpt"])
    assert best.stat().st_ino == last.stat().st_ino or best.read_bytes() == last.read_bytes()
    # epoch 0 serialises both (last.ckpt's own path enters the state only then); epochs 1 and 2 link last.ckpt
    assert saves.count(last.name) == 1 and saves.count(best.name) == 3, saves
    a, b = _ckpt(best), _ckpt(last)
    assert a["global_step"] == b["global_step"] == 3 * STEPS_PER_EPOCH
    cb = next(k for k in b["callbacks"] if k.startswith("ModelCheckpoint"))
    assert b["callbacks"][cb]["last_model_path"] == str(last) and b["callbacks"][cb]["best_model_path"] == str(best)
    # a run whose best never moves after epoch 0 serialises last.ckpt itself every epoch
    saves.clear()
    ov[-4:-2] = ["callbacks.checkpoint.monitor=epoch", "callbacks.checkpoint.mode=min"]
    res = train(compose("train", ov, output_dir=tmp_path / "flat"))
    assert saves.count("last.ckpt") == 3 and saves.count(Path(res["best_ckpt"]).name) == 1, saves
    assert _ckpt(Path(res["last_ckpt"]))["global_step"] == 3 * STEPS_PER_EPOCH


def test_last_ckpt_every_few_minutes(tmp_path: Path, monkeypatch) -> None:
    from zoo.checkpointing import ZooCheckpoint

    written: list[int] = []
    orig = ZooCheckpoint._save_last_checkpoint

    def spy(self, trainer, candidates):
        orig(self, trainer, candidates)
        written.append(trainer.global_step)

    monkeypatch.setattr(ZooCheckpoint, "_save_last_checkpoint", spy)
    ov = [*BASE, "trainer.max_epochs=1", "callbacks.checkpoint.last_every_minutes=1e-6"]
    train(compose("train", ov, output_dir=tmp_path))
    assert set(range(1, STEPS_PER_EPOCH + 1)) <= set(written), written


# ---------------------------------------------------------------------------------------------------- 3. signals
def _signal_run(tmp_path: Path, sig: int) -> tuple[subprocess.CompletedProcess, Path]:
    """``python train.py`` without hydra.run.dir (the default, unique run folder under the cwd), interrupted once
    the first epoch's last.ckpt exists."""
    cmd = [sys.executable, str(ROOT / "train.py"), *BASE, "trainer.max_epochs=60", "task_name=sig"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _wait_for(lambda: list(tmp_path.glob("outputs/sig/*/checkpoints/last.ckpt")), proc)
        time.sleep(0.3)
        proc.send_signal(sig)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    (run,) = [p for p in (tmp_path / "outputs" / "sig").iterdir() if p.is_dir()]
    return subprocess.CompletedProcess(cmd, proc.returncode, out), run


def _check_interrupted(res: subprocess.CompletedProcess, run: Path, sig: int) -> dict:
    last = run / "checkpoints" / "last.ckpt"
    assert res.returncode == 128 + sig, res.stdout[-4000:]
    name = signal.Signals(sig).name
    assert f"Interrupted by {name}" in res.stdout, res.stdout[-4000:]
    assert f"ckpt_path={last}" in res.stdout and f"hydra.run.dir={run}" in res.stdout, res.stdout[-4000:]
    ck = _ckpt(last)
    assert ck["global_step"] >= STEPS_PER_EPOCH  # at least the first epoch, and the interrupted position
    assert not (run / ".run.lock").exists(), "the run folder lock was not released at exit"
    return ck


def test_sigint_saves_a_resumable_checkpoint_and_says_how_to_resume(tmp_path: Path) -> None:
    res, run = _signal_run(tmp_path, signal.SIGINT)
    ck = _check_interrupted(res, run, signal.SIGINT)
    # The run folder name comes from ${zoo.run_id:...}: time, microseconds, pid.
    assert re.fullmatch(r"\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d_\d{6}-\d+", run.name), run.name
    # It resumes, in its own folder, to exactly the step count of an uninterrupted run.
    epochs = ck["epoch"] + 2
    out = train(compose("train", [*BASE, f"trainer.max_epochs={epochs}", f"ckpt_path={run}/checkpoints/last.ckpt"],
                        output_dir=run))
    assert _ckpt(Path(out["last_ckpt"]))["global_step"] == epochs * STEPS_PER_EPOCH


def test_sigterm_saves_a_resumable_checkpoint(tmp_path: Path) -> None:
    res, run = _signal_run(tmp_path, signal.SIGTERM)
    _check_interrupted(res, run, signal.SIGTERM)


# ---------------------------------------------------------------------------------------------------- 4. SIGKILL
def trace_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
    """Patched over ResumableTrainData.on_train_batch_start: append (global step, image ids) to $ZOO_TEST_TRACE,
    synced (it must survive SIGKILL), then wait $ZOO_TEST_STEP_DELAY seconds (a per-step cost)."""
    with open(os.environ["ZOO_TEST_TRACE"], "a") as f:
        f.write(json.dumps([trainer.global_step, list(batch["image_ids"])]) + "\n")
        f.flush()
        os.fsync(f.fileno())
    time.sleep(float(os.environ.get("ZOO_TEST_STEP_DELAY", "0")))


#: ``python trace_train.py <overrides>``: train.py's main with the tracing above.
TRACE_SCRIPT = """
import runpy, sys
import zoo.checkpointing as zc
from tests.test_run_safety import trace_batch_start
zc.ResumableTrainData.on_train_batch_start = trace_batch_start
sys.argv = [{train_py!r}] + sys.argv[1:]
runpy.run_path({train_py!r}, run_name="__main__")
"""


def _trace(path: Path) -> dict[int, list]:
    steps: dict[int, list] = {}
    for line in path.read_text().splitlines():
        if line.strip():
            step, ids = json.loads(line)
            steps[step] = ids  # a resumed run redoes steps after the checkpoint: the later entry wins
    return steps


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_sees_the_same_batches(tmp_path: Path, monkeypatch) -> None:
    import zoo.checkpointing as zc

    epochs = 3
    ov = [*BASE, f"trainer.max_epochs={epochs}", "callbacks.checkpoint.last_every_n_steps=4"]
    # Reference: uninterrupted, in this process, with the same tracing.
    script = tmp_path / "trace_train.py"
    script.write_text(TRACE_SCRIPT.format(train_py=str(ROOT / "train.py")))
    monkeypatch.setattr(zc.ResumableTrainData, "on_train_batch_start", trace_batch_start, raising=False)
    monkeypatch.setenv("ZOO_TEST_TRACE", str(tmp_path / "reference.jsonl"))
    train(compose("train", ov, output_dir=tmp_path / "reference"))
    reference = _trace(tmp_path / "reference.jsonl")
    assert sorted(reference) == list(range(epochs * STEPS_PER_EPOCH))

    run = tmp_path / "run"
    env = {**_env(), "ZOO_TEST_TRACE": str(tmp_path / "run.jsonl"), "ZOO_TEST_STEP_DELAY": "0.15"}
    cmd = [sys.executable, str(script), *ov, f"hydra.run.dir={run}"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:  # step 9 starting means the step-8 last.ckpt (epoch 1, 3 of 5 batches done) is in place
        _wait_for(lambda: (tmp_path / "run.jsonl").exists() and max(_trace(tmp_path / "run.jsonl")) >= 9, proc)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    killed = _ckpt(run / "checkpoints" / "last.ckpt")
    assert killed["global_step"] == 8 and killed["epoch"] == 1, (killed["global_step"], killed["epoch"])
    assert (run / ".run.lock").exists()  # SIGKILL leaves the lock behind: the resumed run takes it over

    env["ZOO_TEST_STEP_DELAY"] = "0"
    res = subprocess.run([*cmd, f"ckpt_path={run}/checkpoints/last.ckpt"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
    assert _ckpt(run / "checkpoints" / "last.ckpt")["global_step"] == epochs * STEPS_PER_EPOCH
    assert _trace(tmp_path / "run.jsonl") == reference


# ---------------------------------------------------------------------------------------------------- 5. CSV log
def test_resume_in_the_same_run_folder_continues_metrics_csv(tmp_path: Path) -> None:
    ov = [*BASE, "trainer.log_every_n_steps=2"]
    train(compose("train", [*ov, "trainer.max_epochs=1"], output_dir=tmp_path))
    train(compose("train", [*ov, "trainer.max_epochs=2", f"ckpt_path={tmp_path}/checkpoints/last.ckpt"],
                  output_dir=tmp_path))
    with open(tmp_path / "csv" / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    header = set(rows[0])
    assert {"epoch", "step", "train/loss_step", "val/loss", "val/top1"} <= header
    epochs = {int(r["epoch"]) for r in rows if r["epoch"]}
    assert epochs == {0, 1}, epochs  # the first run's rows are kept, the resumed run's added
    assert any(r["val/loss"] and int(r["epoch"]) == 0 for r in rows)
    assert any(r["val/loss"] and int(r["epoch"]) == 1 for r in rows)


# ---------------------------------------------------------------------------------------------------- 6. run folder
def _plain_cfg(ckpt_path: str | None = None):
    from omegaconf import OmegaConf

    return OmegaConf.create({"ckpt_path": ckpt_path, "callbacks": {"checkpoint": {"dirpath": None}}})


def test_run_folder_lock_refuses_a_live_run_and_takes_over_a_stale_one(tmp_path: Path) -> None:
    import socket

    from zoo.checkpointing import LOCK_NAME, RunFolderError, prepare_run_folder, release_run_folder

    lock = tmp_path / LOCK_NAME
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock.write_text(json.dumps({"pid": other.pid, "host": socket.gethostname()}))
        with pytest.raises(RunFolderError, match=re.escape(str(tmp_path)) + ".*in use.*hydra.run.dir"):
            prepare_run_folder(_plain_cfg(), tmp_path)
    finally:
        other.kill()
        other.wait()
    assert prepare_run_folder(_plain_cfg(), tmp_path) == lock  # its process is gone: a stale lock is taken over
    assert json.loads(lock.read_text())["pid"] == os.getpid()
    release_run_folder(tmp_path)
    assert not lock.exists()


def test_folder_with_another_runs_checkpoints_is_refused_unless_resuming(tmp_path: Path) -> None:
    from zoo.checkpointing import RunFolderError, prepare_run_folder, release_run_folder

    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.ckpt").write_bytes(b"x")
    with pytest.raises(RunFolderError, match=re.escape(str(tmp_path)) + ".*another hydra.run.dir.*ckpt_path="):
        train(compose("train", [*BASE, "trainer.max_epochs=1"], output_dir=tmp_path))
    assert not (tmp_path / "config.yaml").exists()  # refused before writing anything
    prepare_run_folder(_plain_cfg(str(tmp_path / "checkpoints" / "last.ckpt")), tmp_path)  # resuming: fine
    release_run_folder(tmp_path)


def test_default_run_dir_is_unique_for_runs_started_in_the_same_second() -> None:
    from hydra import compose as hcompose
    from hydra import initialize_config_dir

    from tests.conftest import CONF

    dirs = []
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        for _ in range(3):
            cfg = hcompose(config_name="train", return_hydra_config=True)
            dirs.append(str(cfg.hydra.run.dir))
            assert str(cfg.hydra.run.dir) == dirs[-1]  # one value per run (cached)
    assert len(set(dirs)) == 3, dirs
    assert all(re.fullmatch(r"outputs/train/\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d_\d{6}-\d+", d) for d in dirs), dirs


# ---------------------------------------------------------------------------------------------------- 7. NaN / inf
def _tiny_fit(action: str, bad_batch: int = 2, deferred: bool | None = None, ckpt=None):
    import lightning.pytorch as pl
    from torch import nn

    from zoo.checkpointing import NonFiniteGuard

    class Tiny(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.layer = nn.Linear(2, 1)
            self.params_after: list[torch.Tensor] = []

        def training_step(self, batch, batch_idx):
            return self.layer(batch["x"]).pow(2).mean()

        def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
            self.params_after.append(torch.cat([p.detach().flatten() for p in self.parameters()]).clone())

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=0.1)

    xs = torch.randn(10, 2)
    if 0 <= bad_batch < 5:
        xs[2 * bad_batch] = float("nan")
    data = [{"x": xs[i], "image_id": 100 + i} for i in range(10)]
    loader = torch.utils.data.DataLoader(
        data, batch_size=2, collate_fn=lambda s: {"x": torch.stack([d["x"] for d in s]),
                                                  "image_ids": [d["image_id"] for d in s]})
    model, guard = Tiny(), NonFiniteGuard(action, deferred=deferred)
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=ckpt is not None,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[guard, *([ckpt] if ckpt else [])],
                         log_every_n_steps=4)
    trainer.fit(model, loader)
    return model, guard


def test_nonfinite_loss_skip_drops_that_step_and_logs_the_images(caplog) -> None:
    with caplog.at_level("WARNING", logger="zoo.checkpointing"):
        model, guard = _tiny_fit("skip", bad_batch=2)
    p = model.params_after
    assert torch.equal(p[2], p[1]), "the NaN step changed the weights"
    assert not torch.equal(p[3], p[2]) and all(torch.isfinite(x).all() for x in p)
    assert guard.skipped == 1 and guard.skipped_image_ids == [104, 105]
    assert "104" in caplog.text and "105" in caplog.text and "skipped" in caplog.text


def test_nonfinite_loss_stop_fails_naming_the_step_and_images() -> None:
    from zoo.checkpointing import NonFiniteLossError

    with pytest.raises(NonFiniteLossError, match=r"global step 2.*\[104, 105\].*nonfinite=skip"):
        _tiny_fit("stop", bad_batch=2)


def test_deferred_nonfinite_check_names_the_first_bad_step_and_no_checkpoint_holds_its_weights(tmp_path: Path) -> None:
    """On an accelerator (forced here on CPU) ``stop`` reads the steps' finite flags only every log_every_n_steps
    steps, at validation and epoch ends and before any checkpoint is written: no host-device sync per step. The
    error still names the first bad step and its images, and no checkpoint is written from the weights it spoiled."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from zoo.checkpointing import NonFiniteLossError

    ckpt = ModelCheckpoint(dirpath=str(tmp_path), every_n_train_steps=1, save_top_k=-1, filename="{step}")
    with pytest.raises(NonFiniteLossError, match=r"global step 2.*\[104, 105\] \(read 0 steps later"):
        _tiny_fit("stop", bad_batch=2, deferred=True, ckpt=ckpt)
    steps = sorted(_ckpt(p)["global_step"] for p in tmp_path.glob("*.ckpt"))
    assert steps == [1, 2], steps  # the state after the NaN step (global step 3) was never written
    for p in tmp_path.glob("*.ckpt"):
        assert all(torch.isfinite(v).all() for v in _ckpt(p)["state_dict"].values())
    # no NaN: a deferred check never raises
    _tiny_fit("stop", bad_batch=99, deferred=True)


def test_nonfinite_check_defers_only_for_stop_on_an_accelerator() -> None:
    from zoo.checkpointing import NonFiniteGuard

    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert NonFiniteGuard("stop").defers(cuda) and not NonFiniteGuard("stop").defers(cpu)
    assert not NonFiniteGuard("skip").defers(cuda)  # skipping must decide before the optimizer step
    assert not NonFiniteGuard("stop", deferred=False).defers(cuda)


def test_nonfinite_guard_is_configured_from_callbacks_nonfinite(tmp_path: Path) -> None:
    from zoo.checkpointing import NonFiniteGuard
    from zoo.config import TrainConfig, validate
    from zoo.training import build_trainer

    cfg = validate(compose("train", [*BASE, "callbacks.nonfinite=skip"], output_dir=tmp_path), TrainConfig)
    trainer, _ = build_trainer(cfg, tmp_path, monitor="val/loss", mode="min")
    (guard,) = [c for c in trainer.callbacks if isinstance(c, NonFiniteGuard)]
    assert guard.action == "skip"
