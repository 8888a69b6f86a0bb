"""Several processes give the numbers of one: two CPU processes over gloo (torch.multiprocessing spawn, each running
Lightning's ``ddp`` strategy on the process group it finds, as under torchrun) against one process, with the same
data and weights.

One spawn checks everything that needs a process group:

* FCOS and RetinaNet losses normalised by the positives averaged over the ranks: the mean of the ranks' losses and
  of their gradients (what DDP applies) equal the one-process loss and gradient on the concatenated batch, with
  ranks holding different numbers of positives;
* metric-learning losses (multi-similarity with its miner, ArcFace with its class weights) gathered across ranks:
  the same loss value on every rank as one process on the union batch, and the same gradients after DDP's mean
  (class weights included), with batches that hold no positive pair on any single rank;
* validation metrics of the shipped shapes models (classification top-1/top-5, FCOS COCO mAP, semantic mIoU,
  retrieval R@k) on a validation split of 31 images (odd, so ``DistributedSampler`` would pad it, and with batches
  of 5 the ranks even run different numbers of batches), compared with one process.

The rest runs without processes: the unpadded sampler's split, the trainer options (sync_batchnorm, num_nodes,
accumulate_grad_batches, the FSDP strategy object, the SLURM environment), the run folder shared by the ranks of a
torchrun / SLURM launch and rank-zero-only writes.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch

from tests.conftest import FAST, compose

WORLD = 2
#: ``data.shapes.num_val``: odd on purpose (ranks hold 16 and 15 images; batches of 5: 4 and 3 batches).
VAL_IMAGES = 31
SHAPES = ["data.shapes.num_train=8", f"data.shapes.num_val={VAL_IMAGES}", "data.shapes.image_size=96",
          "data.batch_size=5", "data.eval_batch_size=5", *FAST]
#: name -> (overrides of the shipped recipe, registered weights, metric keys compared)
MODELS = {
    # one of the 31 images has no object to classify, and 30 is even: 29 of them
    "classification": (["experiment=shapes_cls", "data.limit_val_images=29"], "test_resnet.shapes_cls",
                       ["val/top1", "val/top5", "val/loss"]),
    "detection": (["experiment=shapes_det", "backbone=test_resnet"], "test_resnet.shapes_det",
                  ["val/mAP", "val/mAP50", "val/mAP75", "val/mAR100"]),
    "semantic": (["experiment=shapes_sem", "backbone=test_resnet"], "test_resnet.shapes_sem",
                 ["val/mIoU", "val/pixel_acc"]),
    "retrieval": (["experiment=shapes_sim", "backbone=test_resnet", "model.embedding_dim=64",
                   "model.input_size=[48,48]"], "test_resnet.shapes_sim", ["val/R@1", "val/R@5", "val/mAP@R"]),
}


# ---------------------------------------------------------------------------------------------------- loss cases
def _fcos_case():
    from zoo.heads.detection.fcos import FCOSHead

    torch.manual_seed(0)
    head = FCOSHead([8, 8], [8, 16], num_classes=3, num_convs=1)
    feats = [torch.randn(4, 8, 8, 8), torch.randn(4, 8, 4, 4)]
    big = {"boxes": torch.tensor([[4.0, 4.0, 60.0, 60.0]]), "labels": torch.tensor([0])}
    many = {"boxes": torch.tensor([[2.0, 2.0, 20.0, 22.0], [30.0, 30.0, 62.0, 60.0], [10.0, 36.0, 26.0, 58.0]]),
            "labels": torch.tensor([1, 2, 0])}
    return head, feats, [big, big, many, many]  # rank 0: 2 boxes, rank 1: 6 boxes


def _retina_case():
    from zoo.heads.detection.retinanet import RetinaNetHead

    head, feats, targets = _fcos_case()
    torch.manual_seed(1)
    return RetinaNetHead([8, 8], [8, 16], num_classes=3, num_convs=1), feats, targets


def _det_loss(case, sl: slice):
    head, feats, targets = case
    raw = head([f[sl] for f in feats])
    terms = head.compute_loss(raw, targets[sl])
    total = sum(terms.values())
    grads = torch.autograd.grad(total, [p for p in head.parameters() if p.requires_grad], allow_unused=True)
    pos = int((head.assign(raw, targets[sl])[1] >= 0).sum()) if hasattr(head, "assign") else -1
    return total.detach(), [torch.zeros(()) if g is None else g for g in grads], pos


def _metric_case(name: str):
    from zoo.losses.metric_learning import build_metric_loss

    torch.manual_seed(2)
    net = torch.nn.Linear(6, 8)
    x = torch.randn(8, 6)
    labels = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])  # rank 0 holds 0..3, rank 1 holds 0..3: no local positive pair
    loss = build_metric_loss(name, num_classes=4, embedding_dim=8)
    return net, loss, x, labels


def _metric_loss(case, sl: slice):
    net, loss, x, labels = case
    params = list(net.parameters()) + list(loss.parameters())
    value = loss(net(x[sl]), labels[sl])
    grads = torch.autograd.grad(value, params, allow_unused=True)
    return value.detach(), [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]


def _mean(t: torch.Tensor) -> torch.Tensor:
    t = t.clone()
    torch.distributed.all_reduce(t)
    return t / torch.distributed.get_world_size()


# ---------------------------------------------------------------------------------------------------- validation
def _validate(name: str, devices: int, out_dir: Path, *, padded: bool = False) -> dict[str, float]:
    """The validation metrics of a shipped model on the small odd-sized split, with ``devices`` processes (2: on the
    process group already initialised); ``padded``: without the zoo's unpadded validation sampler (the control)."""
    import lightning.pytorch as pl

    from zoo.config import TrainConfig, validate
    from zoo.tasks import task_class
    from zoo.training import quiet_lightning
    from zoo.transfer import init_task_from

    quiet_lightning()
    overrides, weights, _ = MODELS[name]
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = validate(compose("train", [*overrides, *SHAPES], output_dir=out_dir), TrainConfig)
    cls = task_class(cfg.model.task)
    dm, kwargs = cls.build(cfg, stages=("val",))
    module = cls(**kwargs, init_weights=False)
    init_task_from(module, weights)
    module.options["output_dir"] = str(out_dir)
    trainer = pl.Trainer(accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto",
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=str(out_dir), num_sanity_val_steps=0)
    if padded:  # the zoo's loaders built as in one process, so Lightning puts in its padding sampler
        import zoo.data.datamodule
        import zoo.distributed

        real = zoo.distributed.use_unpadded_validation, zoo.data.datamodule._distributed
        zoo.distributed.use_unpadded_validation = lambda dm: None
        zoo.data.datamodule._distributed = lambda: False
        try:
            res = trainer.validate(module, datamodule=dm, verbose=False)
        finally:
            zoo.distributed.use_unpadded_validation, zoo.data.datamodule._distributed = real
    else:
        res = trainer.validate(module, datamodule=dm, verbose=False)
    counts = {"val_samples": float(len(dm.val_set))} if getattr(dm, "val_set", None) is not None else {}
    return {**{k: float(v) for k, v in res[0].items()}, **counts}


def _worker(rank: int, port: int, workdir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(WORLD), RANK=str(rank),
                      LOCAL_RANK=str(rank), NODE_RANK="0")
    torch.set_num_threads(1)
    work = Path(workdir)
    # one-process references, before the process group exists
    det_cases = {"fcos": _fcos_case(), "retinanet": _retina_case()}
    metric_cases = {n: _metric_case(n) for n in ("multi_similarity", "arcface")}
    det_ref = {n: _det_loss(c, slice(0, 4)) for n, c in det_cases.items()}
    metric_ref = {n: _metric_loss(c, slice(0, 8)) for n, c in metric_cases.items()}
    metric_local_only = {}
    from zoo.losses.metric_learning import MetricLoss

    for n, (net, loss, x, labels) in metric_cases.items():
        alone = MetricLoss(n, loss.loss_fn, loss.miner, num_classes=4, gather_across_ranks=False)
        with torch.no_grad():
            metric_local_only[n] = float(alone(net(x[4 * rank:4 * rank + 4]), labels[4 * rank:4 * rank + 4]))

    torch.distributed.init_process_group("gloo", rank=rank, world_size=WORLD)
    report: dict = {"rank": rank, "losses": {}, "metrics": {}}
    sl = slice(2 * rank, 2 * rank + 2)
    for n, case in det_cases.items():
        loss, grads, pos = _det_loss(case, sl)
        ref_loss, ref_grads, _ = det_ref[n]
        ddp_loss, ddp_grads = _mean(loss), [_mean(g) for g in grads]
        counts = [torch.zeros(1, dtype=torch.long) for _ in range(WORLD)]
        torch.distributed.all_gather(counts, torch.tensor([pos]))
        report["losses"][n] = {
            "loss": float(ddp_loss), "ref": float(ref_loss), "positives": [int(c) for c in counts],
            "grad_max_err": max(float((a - b).abs().max()) for a, b in zip(ddp_grads, ref_grads)),
            "grad_scale": max(float(b.abs().max()) for b in ref_grads)}
    for n, case in metric_cases.items():
        loss, grads = _metric_loss(case, slice(4 * rank, 4 * rank + 4))
        ref_loss, ref_grads = metric_ref[n]
        ddp_grads = [_mean(g) for g in grads]
        report["losses"][n] = {
            "loss": float(loss), "ref": float(ref_loss), "local_only": metric_local_only[n],
            "grad_max_err": max(float((a - b).abs().max()) for a, b in zip(ddp_grads, ref_grads)),
            "grad_scale": max(float(b.abs().max()) for b in ref_grads)}
    for name in MODELS:
        report["metrics"][name] = _validate(name, WORLD, work / f"ddp_{name}")
    # the control: Lightning's padding DistributedSampler counts one image twice
    report["metrics"]["classification_padded"] = _validate("classification", WORLD, work / "ddp_padded", padded=True)
    (work / f"rank{rank}.json").write_text(json.dumps(report))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory) -> dict:
    """One process's validation metrics of every model, then the two-process spawn; both reports."""
    import torch.multiprocessing as mp

    work = tmp_path_factory.mktemp("ddp")
    single = {name: _validate(name, 1, work / f"single_{name}") for name in MODELS}  # also generates the data
    mp.spawn(_worker, args=(_free_port(), str(work)), nprocs=WORLD, join=True)
    ranks = [json.loads((work / f"rank{r}.json").read_text()) for r in range(WORLD)]
    return {"single": single, "ranks": ranks, "work": work}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(MODELS))
def test_two_processes_report_the_validation_metrics_of_one(two_process_run: dict, name: str) -> None:
    single = two_process_run["single"][name]
    assert int(single["val_samples"]) % 2 == 1, "an odd validation set: the one a padding sampler would change"
    for rep in two_process_run["ranks"]:
        multi = rep["metrics"][name]
        for key in MODELS[name][2]:
            assert key in single and key in multi, (key, sorted(single))
            assert multi[key] == single[key], f"{name} {key}: 2 processes {multi[key]!r} != 1 process {single[key]!r}"
    assert any(single[k] > 0.05 for k in MODELS[name][2]), f"{name}: trivial metrics {single} test nothing"


@pytest.mark.slow
@pytest.mark.parametrize("name", ["fcos", "retinanet"])
def test_positive_count_is_averaged_over_ranks(two_process_run: dict, name: str) -> None:
    for rep in two_process_run["ranks"]:
        res = rep["losses"][name]
        if name == "fcos":
            assert res["positives"][0] != res["positives"][1], "ranks must hold different numbers of positives"
        assert res["loss"] == pytest.approx(res["ref"], rel=1e-5)
        assert res["grad_max_err"] <= 1e-5 * max(1.0, res["grad_scale"])


@pytest.mark.slow
@pytest.mark.parametrize("name", ["multi_similarity", "arcface"])
def test_metric_loss_sees_every_rank(two_process_run: dict, name: str) -> None:
    for rep in two_process_run["ranks"]:
        res = rep["losses"][name]
        assert res["loss"] == pytest.approx(res["ref"], rel=1e-5)  # the union loss on every rank
        assert res["grad_max_err"] <= 1e-5 * max(1.0, res["grad_scale"])
    if name == "multi_similarity":  # alone, a rank has no positive pair: the gathered batch is what gives a loss
        assert all(rep["losses"][name]["local_only"] == 0.0 for rep in two_process_run["ranks"])
        assert two_process_run["ranks"][0]["losses"][name]["ref"] > 0


@pytest.mark.slow
def test_the_padding_sampler_would_have_changed_top1(two_process_run: dict) -> None:
    """The control: with Lightning's own DistributedSampler (one image repeated to even the ranks) top-1 is not the
    one-process value, so the equality above is due to the unpadded validation loaders."""
    single = two_process_run["single"]["classification"]["val/top1"]
    padded = two_process_run["ranks"][0]["metrics"]["classification_padded"]["val/top1"]
    assert padded != single


# ---------------------------------------------------------------------------------------------------- SLURM script
FAKE_SRUN = r"""#!/bin/bash
# stand-in for srun on one machine: SLURM_NTASKS tasks of "$@", each with the variables srun gives a task; SIGTERM
# is forwarded to them, as srun does
shift  # --kill-on-bad-exit=1
pids=()
for ((i = 0; i < ${SLURM_NTASKS:-1}; i++)); do
  SLURM_PROCID=$i SLURM_LOCALID=$i SLURM_NODEID=0 "$@" &
  pids+=($!)
done
trap 'kill -TERM "${pids[@]}" 2>/dev/null' TERM
status=0
for p in "${pids[@]}"; do
  while true; do
    wait "$p"; rc=$?
    kill -0 "$p" 2>/dev/null || break
  done
  (( rc != 0 )) && status=$rc
done
exit $status
"""


def _slurm_env(tmp_path: Path, run_dir: Path) -> dict[str, str]:
    import sys

    from tests.conftest import ROOT

    srun = tmp_path / "srun"
    srun.write_text(FAKE_SRUN)
    srun.chmod(0o755)
    scontrol = tmp_path / "scontrol"
    scontrol.write_text(f"#!/bin/bash\necho \"$@\" >> {tmp_path / 'scontrol.log'}\n")
    scontrol.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RANK", "LOCAL_RANK", "WORLD_SIZE",
                                                                     "MASTER_", "TORCHELASTIC", "NODE_RANK"))}
    env.update(SLURM_JOB_ID="4242", SLURM_JOB_NAME="zoo-test", SLURM_NTASKS="2", SLURM_NTASKS_PER_NODE="2",
               SLURM_NNODES="1", SLURM_NODELIST="localhost", SLURM_SUBMIT_DIR=str(ROOT), MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(_free_port()), ZOO_RUN_DIR=str(run_dir), ZOO_TRAINER="ddp_cpu",
               ZOO_PYTHON=sys.executable, SRUN=str(srun), SCONTROL=str(scontrol), OMP_NUM_THREADS="1")
    return env


@pytest.mark.slow
def test_slurm_script_saves_requeues_and_resumes(tmp_path: Path) -> None:
    """scripts/slurm/train.sbatch with stand-ins for srun and scontrol (two tasks on this machine, Lightning's
    SLURMEnvironment): SIGUSR1 before the time limit stops training with a resumable last.ckpt and requeues the job;
    the requeued job (same job id) resumes from it in the same run folder."""
    import signal
    import subprocess
    import time

    from tests.conftest import ROOT, SMALL_SHAPES

    run_dir = tmp_path / "run"
    env = _slurm_env(tmp_path, run_dir)
    script = str(ROOT / "scripts" / "slurm" / "train.sbatch")
    args = ["experiment=shapes_cls", *FAST, *SMALL_SHAPES, "model.input_size=[32,32]", "data.batch_size=8",
            "trainer.limit_train_batches=3", "trainer.limit_val_batches=1", "run_eval=false", "export_bundle=false",
            "callbacks.checkpoint.last_every_minutes=0"]
    proc = subprocess.Popen(["bash", script, *args, "trainer.max_epochs=1000"], env=env, cwd=str(tmp_path),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    last = run_dir / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 150
    while not last.is_file() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.5)
    if proc.poll() is not None or not last.is_file():
        proc.kill()
        pytest.fail("training under the SLURM script did not reach its first checkpoint:\n" +
                    (proc.communicate()[0] or "")[-3000:])
    first_step = torch.load(last, map_location="cpu", weights_only=True)["global_step"]
    time.sleep(2.0)
    proc.send_signal(signal.SIGUSR1)  # what --signal=B:USR1@300 sends before the time limit
    out, _ = proc.communicate(timeout=150)
    assert proc.returncode == 0, out[-3000:]
    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", "4242"], out[-3000:]
    assert "saved a resumable checkpoint" in out, out[-3000:]
    saved = torch.load(last, map_location="cpu", weights_only=True)
    assert saved["global_step"] >= first_step > 0
    assert sorted(p.name for p in run_dir.iterdir() if p.name.endswith(".log")) == ["train.log", "train_rank1.log"]

    # the requeued job: same job id, same run folder; it resumes and runs one more epoch
    (tmp_path / "scontrol.log").unlink()
    env["MASTER_PORT"] = str(_free_port())
    again = subprocess.run(["bash", script, *args, f"trainer.max_epochs={saved['epoch'] + 2}"], env=env,
                           cwd=str(tmp_path), capture_output=True, text=True, timeout=200)
    assert again.returncode == 0, (again.stdout + again.stderr)[-3000:]
    assert f"resuming from {last}" in again.stdout
    assert not (tmp_path / "scontrol.log").exists()
    resumed = torch.load(last, map_location="cpu", weights_only=True)
    assert resumed["global_step"] > saved["global_step"]


# ---------------------------------------------------------------------------------------------------- torchrun
@pytest.mark.slow
def test_torchrun_launch_shares_one_run_folder(tmp_path: Path) -> None:
    """``torchrun --nproc_per_node 2 train.py trainer=ddp_cpu trainer.devices=2``: Lightning takes the ranks from
    torchrun's environment (ddp_spawn becomes ddp), every rank lands in rank 0's run folder, and
    only rank 0 writes the config, metrics, plots and bundle (rank 1 logs to train_rank1.log)."""
    import shutil
    import subprocess
    import sys

    from tests.conftest import ROOT, SMALL_SHAPES

    torchrun = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RANK", "LOCAL_RANK", "WORLD_SIZE",
                                                                     "MASTER_", "TORCHELASTIC"))}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [torchrun, "--nproc_per_node", "2", "--master_port", str(_free_port()), str(ROOT / "train.py"),
           "experiment=shapes_cls", "trainer=ddp_cpu", "trainer.devices=2", *FAST, *SMALL_SHAPES,
           "model.input_size=[32,32]", "data.batch_size=8", "trainer.max_epochs=1", "trainer.limit_train_batches=2",
           "trainer.limit_val_batches=2"]
    proc = subprocess.run(cmd, cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    runs = sorted((tmp_path / "outputs" / "shapes_cls").iterdir())
    assert len(runs) == 1, runs  # rank 0's name, shared through torchrun's store
    run = runs[0]
    assert (run / "metrics.json").is_file() and (run / "bundle" / "model.safetensors").is_file()
    assert (run / "checkpoints" / "best.ckpt").is_file() and (run / ".hydra" / "config.yaml").is_file()
    assert sorted(p.name for p in run.glob("*.log")) == ["train.log", "train_rank1.log"]
    assert "using ddp" in (run / "train.log").read_text()


# ---------------------------------------------------------------------------------------------------- no processes
def test_unpadded_sampler_splits_without_repeats() -> None:
    from zoo.distributed import UnpaddedDistributedSampler

    data = list(range(7))
    parts = [list(UnpaddedDistributedSampler(data, num_replicas=3, rank=r)) for r in range(3)]
    assert parts == [[0, 3, 6], [1, 4], [2, 5]]
    assert [len(UnpaddedDistributedSampler(data, num_replicas=3, rank=r)) for r in range(3)] == [3, 2, 2]


def test_single_process_helpers_change_nothing() -> None:
    from torch.utils.data import DataLoader

    from zoo.distributed import gather_for_loss, gather_in_dataset_order, positive_count, unpadded_eval_loader

    x, y = torch.randn(3, 4, requires_grad=True), torch.tensor([0, 1, 0])
    ex, ey = gather_for_loss(x, y)
    assert ex is x and ey is y
    assert gather_in_dataset_order(x) is x
    assert float(positive_count(torch.zeros(5, dtype=torch.bool))) == 1.0
    assert float(positive_count(torch.tensor([True, True, False]))) == 2.0
    dl = DataLoader(list(range(5)), batch_size=2)
    assert unpadded_eval_loader(dl) is dl


def _trainer_cfg(tmp_path: Path, overrides: list[str]):
    from zoo.config import TrainConfig, validate

    return validate(compose("train", ["experiment=shapes_cls", *FAST, *overrides], output_dir=tmp_path), TrainConfig)


def test_trainer_options_reach_lightning(tmp_path: Path) -> None:
    from zoo.training import build_trainer

    cfg = _trainer_cfg(tmp_path, ["trainer=ddp_cpu", "trainer.sync_batchnorm=true", "trainer.num_nodes=2",
                                  "trainer.accumulate_grad_batches=3"])
    trainer, _ = build_trainer(cfg, tmp_path, monitor="val/top1", mode="max")
    assert trainer.num_nodes == 2 and trainer.world_size == 4
    assert trainer.accumulate_grad_batches == 3
    assert trainer.strategy._layer_sync is not None  # SyncBatchNorm conversion at setup


def test_accumulate_grad_batches_steps_once_per_group(tmp_path: Path) -> None:
    from tests.conftest import SMALL_SHAPES
    from zoo.training import train

    cfg = compose("train", ["experiment=shapes_cls", *FAST, *SMALL_SHAPES, "model.input_size=[32,32]",
                            "data.batch_size=8", "trainer.max_epochs=1", "trainer.limit_train_batches=6",
                            "trainer.limit_val_batches=1", "trainer.accumulate_grad_batches=3", "run_eval=false",
                            "export_bundle=false"], output_dir=tmp_path)
    res = train(cfg)
    assert torch.load(res["last_ckpt"], map_location="cpu", weights_only=True)["global_step"] == 2  # 6 batches / 3


def test_fsdp_strategy_wraps_the_transformer_blocks(tmp_path: Path) -> None:
    from lightning.pytorch.strategies import FSDPStrategy
    from timm.models.vision_transformer import Block
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    from zoo.config import ConfigError
    from zoo.training import build_strategy

    cfg = _trainer_cfg(tmp_path, ["trainer=fsdp", "backbone=vit_small_patch16_224", "model.ema.enabled=false",
                                  "trainer.fsdp.activation_checkpointing=true"])
    assert cfg.trainer.precision == "bf16-mixed" and cfg.trainer.accelerator == "gpu"
    strategy = build_strategy(cfg)
    assert isinstance(strategy, FSDPStrategy)
    policy = strategy.kwargs["auto_wrap_policy"]
    assert isinstance(policy, ModuleWrapPolicy) and set(policy._module_classes) == {Block}
    assert set(strategy._activation_checkpointing_kwargs["auto_wrap_policy"]._module_classes) == {Block}
    assert str(strategy.sharding_strategy).endswith("FULL_SHARD") and strategy._state_dict_type == "full"
    explicit = _trainer_cfg(tmp_path, ["trainer=fsdp", "backbone=vit_small_patch16_224", "model.ema.enabled=false",
                                       "trainer.fsdp.wrap=[torch.nn.TransformerEncoderLayer]"])
    wrapped = build_strategy(explicit).kwargs["auto_wrap_policy"]._module_classes
    assert set(wrapped) == {torch.nn.TransformerEncoderLayer}
    with pytest.raises(ConfigError, match="EMA"):
        build_strategy(_trainer_cfg(tmp_path, ["trainer=fsdp", "backbone=vit_small_patch16_224",
                                               "model.ema.enabled=true"]))
    # torch's FSDP needs an accelerator: on CPU Lightning refuses it up front (the preset is GPU only)
    import lightning.pytorch as pl

    with pytest.raises(ValueError, match="GPU"):
        pl.Trainer(accelerator="cpu", devices=1, strategy="fsdp")


def test_launchers_share_one_run_folder_name(monkeypatch: pytest.MonkeyPatch) -> None:
    from zoo.config import hydra_subdir, launch_id, rank_suffix, run_id

    for var in ("TORCHELASTIC_RUN_ID", "TORCHELASTIC_USE_AGENT_STORE", "SLURM_JOB_ID", "SLURM_NTASKS",
                "SLURM_ARRAY_JOB_ID", "RANK", "SLURM_PROCID"):
        monkeypatch.delenv(var, raising=False)
    assert launch_id() is None and run_id() != run_id()  # one process: time + microseconds + pid
    assert hydra_subdir() == ".hydra" and rank_suffix() == ""
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "3f2a-11")
    assert run_id() == run_id() == "torchrun-3f2a-11"
    monkeypatch.delenv("TORCHELASTIC_RUN_ID")
    monkeypatch.setenv("SLURM_JOB_ID", "777")
    assert launch_id() is None  # a one-task job keeps the usual name
    monkeypatch.setenv("SLURM_NTASKS", "16")
    assert run_id() == "slurm-777"
    monkeypatch.setenv("SLURM_PROCID", "5")
    assert hydra_subdir() is None and rank_suffix() == "_rank5"


def test_slurm_environment_without_lightning_requeue(monkeypatch: pytest.MonkeyPatch) -> None:
    from lightning.fabric.plugins.environments import SLURMEnvironment

    from zoo.training import cluster_plugins

    monkeypatch.delenv("SLURM_NTASKS", raising=False)
    assert cluster_plugins() == []
    for k, v in dict(SLURM_NTASKS="2", SLURM_NTASKS_PER_NODE="2", SLURM_JOB_ID="9", SLURM_JOB_NAME="zoo",
                     SLURM_PROCID="0", SLURM_LOCALID="0", SLURM_NODEID="0", SLURM_NNODES="1").items():
        monkeypatch.setenv(k, v)
    (env,) = cluster_plugins()
    assert isinstance(env, SLURMEnvironment) and env.auto_requeue is False
