"""Typed schemas for the Hydra configuration and their validation.

``validate(cfg)`` merges a composed config into the dataclass schemas below, so that a misspelled key or a value of
the wrong type stops the run at start with a :class:`ConfigError` naming the key (``optimizer.lrr``) and listing
the valid keys, before any data is read or model built.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any, Dict, List, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

__all__ = ["ConfigError", "TrainConfig", "EvalConfig", "PredictConfig", "validate", "to_container"]


class ConfigError(ValueError):
    """A configuration value or key that cannot be used; the message names it and says how to fix it."""


@dataclass
class ShapesConf:
    """The embedded dataset (zoo.data.shapes): generated once into $ZOO_CACHE per distinct setting."""

    num_train: int = 1600
    num_val: int = 400
    image_size: int = 128
    seed: int = 0
    #: mixed (the default dataset) | compositional (scenes like the text-to-image prompts: one object, two, a
    #: counted group of one kind and colour, a related pair; see zoo.data.shapes)
    layout: str = "mixed"
    num_workers: int = 0


@dataclass
class DataConf:
    """Where the images and targets come from (``conf/data/*.yaml``); one dataset may feed several heads."""

    #: shapes (embedded, generated) | coco (a COCO instances json) | image_folder (<root>/<split>/<class>/) |
    #: mask_folder (<root>/<split>/images + masks) | coco_crops | identity_folder (<root>/<split>/<identity>/) |
    #: shards (WebDataset shards of any of these: data.urls, data.val_urls; zoo.data.shards)
    kind: str = "shapes"
    #: the dataset folder (coco: holds annotations/instances_<split>.json and <split>/ images)
    root: Optional[str] = None
    train_split: str = "train"
    val_split: str = "val"
    #: coco: an annotation json other than <root>/annotations/instances_<split>.json (relative paths under root)
    train_ann: Optional[str] = None
    val_ann: Optional[str] = None
    #: coco: an image folder other than <root>/<split>
    train_images: Optional[str] = None
    val_images: Optional[str] = None
    #: images per training step (per device); eval_batch_size defaults to it
    batch_size: int = 64
    eval_batch_size: Optional[int] = None
    #: loader processes per data source (0: load in the training process; -1: one per CPU core this process may use,
    #: shared by the training processes of the machine, at most 8)
    num_workers: int = -1
    pin_memory: bool = True
    persistent_workers: bool = True
    #: raise: stop at the first bad annotation or image, naming it; skip: drop and count them
    on_bad_annotation: str = "raise"
    #: decode every image when the COCO index is built: corrupt files are then found before training (and, with
    #: on_bad_annotation=skip, skipped and counted like missing ones) instead of when a worker reaches them
    verify_images: bool = False
    #: boxes narrower or shorter than this (px, after clipping) are dropped and counted
    min_box_size: float = 1.0
    #: coco + classification: multi-hot targets over the categories present instead of the largest object's class
    multilabel: bool = False
    #: albumentations transforms, applied to the original image with its boxes and masks: [{type: Name, ...}]
    augment: List[Any] = field(default_factory=list)
    #: boxes keeping less than this fraction of their area after augmentation are dropped
    min_visibility: float = 0.3
    #: JPEGs much larger than the network input are decoded at 1/2, 1/4 or 1/8 scale by libjpeg (several times
    #: faster), never below what the resize needs (validation: both sides >= max(input_size); training: 2x that, or
    #: what the smallest RandomResizedCrop needs); boxes and masks follow. false: always decode at full size
    fast_decode: bool = True
    #: where images are decoded: "workers" (the loader processes, on the CPU) or "device" (the training device after
    #: the batch is moved there: nvJPEG on a GPU; crops, flips, resize and normalisation there too; the workers only
    #: read bytes and draw the augmentation, zoo.data.device_decode). Supports image_folder and coco data with
    #: RandomResizedCrop / HorizontalFlip augmentation
    decode_on: str = "workers"
    #: validation samples (deterministic: no augmentation) kept in memory after the first pass, up to this many MiB
    #: per loader process (0: off); later validations skip decoding and resizing
    val_cache_mb: int = 512
    #: use only the first N images (crops for similarity) of a split: quick trials
    limit_train_images: Optional[int] = None
    limit_val_images: Optional[int] = None
    #: image_folder / mask_folder: hold out this fraction of <root>/<train_split> (or of a flat <root>) for
    #: validation when there is no <root>/<val_split>; stratified by class for image_folder, seeded by val_seed.
    #: null: 0.2 when there is no validation folder (logged), none when there is one
    val_fraction: Optional[float] = None
    val_seed: int = 0
    #: shards (WebDataset tars written by ``python -m zoo.data.shards write``): the training shards (a folder
    #: holding manifest.json, paths or http(s)/pipe: urls, brace lists train-{000000..000009}.tar, '::'-separated)
    urls: Optional[Any] = None
    #: shards: the validation shards (null: validate on data.urls, with a warning)
    val_urls: Optional[Any] = None
    #: shards: the manifests (default: manifest.json beside the first shard; pipe: urls need them given)
    manifest: Optional[str] = None
    val_manifest: Optional[str] = None
    #: shards: samples each loader worker's shuffle buffer holds (training)
    shuffle_buffer: int = 1000
    #: the embedded dataset's size and seed
    shapes: ShapesConf = field(default_factory=ShapesConf)
    #: dataset-kind options, checked against zoo.data.datamodule.DATA_EXTRA_KEYS (multiscale, class_names, identity,
    #: context, min_size, test_identity_fraction, split_seed)
    extra: Dict[str, Any] = field(default_factory=dict)


@dataclass
class BackboneConf:
    """The shared backbone: any timm model name, wrapped with ``features_only`` (zoo.backbones.TimmBackbone)."""

    name: str = "resnet18"
    #: timm hub weights (needs the network or timm's cache; offline it fails at once saying how to give local ones)
    pretrained: bool = False
    #: a local file: a timm state dict or a zoo bundle's model.safetensors (refused when it does not hold the backbone)
    weights: Optional[str] = None
    #: which feature levels to expose (timm out_indices); null: all
    out_indices: Optional[List[int]] = None
    #: true/"all" freezes the whole backbone, an int N the first N levels (frozen BatchNorm stays in eval mode)
    freeze: Any = 0
    grad_checkpointing: bool = False
    drop_path_rate: float = 0.0
    #: ViTs: the input size the position embeddings are built for
    img_size: Optional[Any] = None
    #: plain ViTs: channels of the simple feature pyramid built on their single-stride output
    pyramid_channels: Optional[int] = None


@dataclass
class EMAConf:
    enabled: bool = False
    decay: float = 0.999
    warmup: bool = True


@dataclass
class MixupConf:
    """Mixup / CutMix of training batches that feed only single-label classification heads (other batches are left
    as they are): the loss is ``lam * loss(y) + (1 - lam) * loss(y[perm])``, with ``lam`` drawn from
    ``Beta(alpha, alpha)`` per batch (CutMix: ``lam`` is the kept area of the pasted box)."""

    #: Beta(a, a) for mixup (0: off)
    mixup_alpha: float = 0.0
    #: Beta(a, a) for CutMix (0: off); with both on, CutMix is chosen with probability switch_prob
    cutmix_alpha: float = 0.0
    #: probability that a batch is mixed at all
    prob: float = 1.0
    switch_prob: float = 0.5
    #: stop mixing for the last N epochs (a clean tail, as recipes do for strong augmentation)
    off_last_epochs: int = 0


@dataclass
class ModelConf:
    """The model: one backbone (``backbone`` group), optional necks and any set of heads, trained together.

    ``heads`` is ``{name: {type: <registered head>, **arguments, **training keys}}`` or a list of head types
    (``[fcos, semantic_fpn]``, named by each head's default name). Training keys: ``weight`` (loss weight),
    ``lr_mult``, ``data`` (this head's own data config, merged over ``data``), ``frozen_epochs``, and the head's own
    (``loss``, ``m_per_class``, ... for the embedding head). Head arguments are checked against the head class: a
    misspelled one stops the run naming it. ``head`` / ``decoder`` name the type of a single-head preset's head.
    """

    task: str = "classification"
    input_size: List[int] = field(default_factory=lambda: [128, 128])
    resize: str = "stretch"
    size_divisor: int = 32
    mean: Optional[List[float]] = None
    std: Optional[List[float]] = None
    heads: Any = None
    necks: Dict[str, Any] = field(default_factory=dict)
    #: how head losses combine: fixed (heads.<n>.weight), uncertainty (learned log-variances), pcgrad
    balance: str = "fixed"
    #: how batches of several data sources interleave: all (one of each per step), round_robin, proportional
    mix: str = "all"
    #: epochs the backbone stays frozen at the start (heads warm up first); 0 = never
    freeze_backbone_epochs: int = 0
    multilabel: Optional[bool] = None
    label_smoothing: float = 0.0
    head: Optional[str] = None
    decoder: Optional[str] = None
    loss: Optional[str] = None
    embedding_dim: int = 256
    postprocess: Dict[str, Any] = field(default_factory=dict)
    ema: EMAConf = field(default_factory=EMAConf)
    mixup: MixupConf = field(default_factory=MixupConf)
    extra: Dict[str, Any] = field(default_factory=dict)


@dataclass
class OptimizerConf:
    name: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.05
    momentum: float = 0.9
    nesterov: bool = False
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    no_weight_decay_norm_bias: bool = True
    backbone_lr_mult: float = 1.0
    #: the global batch ``lr`` is given for (null: ``lr`` as given). Set, ``lr`` is rescaled to the run's global batch
    #: (data.batch_size x processes x accumulate_grad_batches) by ``lr_scaling``
    lr_batch: Optional[int] = None
    #: linear (lr x batch / lr_batch), sqrt (lr x sqrt(batch / lr_batch)), auto: linear for sgd, sqrt for adam / adamw
    lr_scaling: str = "auto"


@dataclass
class SchedulerConf:
    name: str = "cosine"
    warmup_epochs: float = 1.0
    warmup_start_factor: float = 0.01
    min_lr_factor: float = 0.01
    step_epochs: List[int] = field(default_factory=list)
    gamma: float = 0.1


@dataclass
class FSDPConf:
    """``trainer.strategy=fsdp`` (``trainer=fsdp``): Lightning's FSDPStrategy, GPU only (torch's FSDP needs an
    accelerator). Checkpoints are always full (one file assembled on rank 0), so best.ckpt / last.ckpt, resume and
    bundle export work as with DDP."""

    #: classes that become FSDP units, as import paths (timm.models.vision_transformer.Block); null: the backbone's
    #: repeated block class (every timm module class named *Block in the architecture: ViT/DeiT/BEiT Block, EvaBlock,
    #: SwinTransformerBlock, ConvNeXtBlock, ...)
    wrap: Optional[List[str]] = None
    #: recompute the wrapped blocks' activations in the backward pass (less memory, ~30% more compute)
    activation_checkpointing: bool = False
    #: FULL_SHARD | SHARD_GRAD_OP | NO_SHARD | HYBRID_SHARD (shard within a node, replicate across nodes)
    sharding_strategy: str = "FULL_SHARD"
    #: keep parameters and gradients in host memory between uses (slow; for models that do not fit otherwise)
    cpu_offload: bool = False


@dataclass
class AutoValConf:
    """``trainer.check_val_every_n_epoch=auto`` (zoo.callbacks.ValidationSchedule)."""

    #: the share of training time validation may take (0.02: ~2%)
    budget: float = 0.02
    #: the most minutes of training between two validations (an epoch longer than this validates every time)
    max_minutes: float = 10.0
    #: an epoch that skips validation still writes last.ckpt when this many minutes passed since its last write
    checkpoint_minutes: float = 1.0


@dataclass
class AutoEpochsConf:
    """``trainer.max_epochs=null`` (zoo.callbacks.AutoEpochs): the run's length in optimizer steps, not epochs."""

    #: never fewer epochs than this (large data: this many epochs)
    min_epochs: int = 10
    #: never fewer optimizer steps than this (a few hundred images: this many steps, however many epochs it takes)
    min_steps: int = 2000
    #: never more epochs than this
    cap: int = 1000


@dataclass
class TrainerConf:
    accelerator: str = "cpu"
    devices: Any = 1
    strategy: Any = "auto"
    num_nodes: int = 1
    precision: str = "32-true"
    #: null: sized by auto_epochs (at least min_epochs epochs and min_steps optimizer steps); an integer: exactly that
    max_epochs: Optional[int] = None
    auto_epochs: AutoEpochsConf = field(default_factory=lambda: AutoEpochsConf())
    max_steps: int = -1
    min_epochs: Optional[int] = None
    #: as in Lightning: an integer is a number of batches (1 = one batch), a float a fraction (1.0 = all)
    limit_train_batches: Any = None
    limit_val_batches: Any = None
    val_check_interval: Any = None
    #: "auto": every epoch while a validation pass costs <= auto_val.budget of an epoch's training, else every n-th
    #: epoch (never more than auto_val.max_minutes of training apart; first and last epochs always); an integer: fixed
    check_val_every_n_epoch: Any = "auto"
    auto_val: AutoValConf = field(default_factory=lambda: AutoValConf())
    gradient_clip_val: Optional[float] = None
    accumulate_grad_batches: int = 1
    log_every_n_steps: int = 10
    deterministic: bool = False
    benchmark: Optional[bool] = None
    fast_dev_run: Any = False
    #: validation batches run before training (a broken validation fails at once; the auto schedule times them)
    num_sanity_val_steps: int = 2
    enable_progress_bar: bool = True
    sync_batchnorm: bool = False
    channels_last: bool = False
    compile: bool = False
    compile_mode: Optional[str] = None
    threads: Optional[int] = None
    #: strategy=fsdp options (conf/trainer/fsdp.yaml)
    fsdp: FSDPConf = field(default_factory=FSDPConf)


@dataclass
class CheckpointConf:
    monitor: Optional[str] = None
    mode: Optional[str] = None
    save_last: bool = True
    save_top_k: int = 1
    #: folder of best.ckpt / last.ckpt (default <run>/checkpoints); checked writable before training
    dirpath: Optional[str] = None
    #: last.ckpt is written at every epoch end, and also every this many optimizer steps (0: off) ...
    last_every_n_steps: int = 0
    #: ... and when this many minutes passed since it was last written (0: off)
    last_every_minutes: float = 30.0
    #: on SIGINT/SIGTERM: finish the step, save a resumable last.ckpt, print how to resume, exit 128+signal
    handle_signals: bool = True
    #: single-process runs write checkpoints from a copy of the state in a background thread (training goes on)
    background_writes: bool = True
    #: later | earlier: which state best.ckpt keeps when a validation ties its score (later: the one trained longer)
    on_tie: str = "later"


@dataclass
class EarlyStoppingConf:
    enabled: bool = False
    monitor: Optional[str] = None
    mode: Optional[str] = None
    patience: int = 10
    min_delta: float = 0.0


@dataclass
class CallbacksConf:
    checkpoint: CheckpointConf = field(default_factory=CheckpointConf)
    early_stopping: EarlyStoppingConf = field(default_factory=EarlyStoppingConf)
    lr_monitor: bool = True
    progress_bar: str = "tqdm"
    visualize: int = 0
    #: detections / instances scoring below this are not drawn in the visualisations
    visualize_score_thresh: float = 0.3
    #: module levels shown by the model summary at the start of training (0: no summary)
    model_summary_depth: int = 2
    #: a NaN/inf training loss or gradients: stop (error naming the step and image ids), skip (that optimizer step), off
    nonfinite: str = "stop"
    #: with nonfinite=skip, stop anyway after this many skipped steps (0: never)
    nonfinite_max_skips: int = 100


@dataclass
class WandbConf:
    #: W&B project (default: task_name); runs are written offline into <run>/wandb unless offline=false
    project: Optional[str] = None
    name: Optional[str] = None
    entity: Optional[str] = None
    offline: bool = True
    log_model: bool = False


@dataclass
class MLflowConf:
    #: MLflow experiment (default: task_name)
    experiment_name: Optional[str] = None
    run_name: Optional[str] = None
    #: default: a file: URI of <run>/mlruns (local, no server)
    tracking_uri: Optional[str] = None


@dataclass
class LoggerConf:
    #: any of csv, tensorboard, wandb, mlflow (wandb and mlflow need their pip packages)
    names: List[str] = field(default_factory=lambda: ["csv"])
    wandb: WandbConf = field(default_factory=WandbConf)
    mlflow: MLflowConf = field(default_factory=MLflowConf)


@dataclass
class PathsConf:
    output_dir: str = "outputs"
    cache_dir: Optional[str] = None


@dataclass
class TrainConfig:
    task_name: str = "train"
    seed: int = 42
    ckpt_path: Optional[str] = None
    #: start a new run from trained weights: a bundle folder (or its model.json / model.safetensors), a zoo .ckpt
    #: or a registered name (zoo.list_models()); backbone, necks and matching heads are loaded (zoo.transfer)
    init_from: Optional[str] = None
    run_eval: bool = True
    export_bundle: bool = True
    data: DataConf = field(default_factory=DataConf)
    model: ModelConf = field(default_factory=ModelConf)
    backbone: BackboneConf = field(default_factory=BackboneConf)
    optimizer: OptimizerConf = field(default_factory=OptimizerConf)
    scheduler: SchedulerConf = field(default_factory=SchedulerConf)
    trainer: TrainerConf = field(default_factory=TrainerConf)
    callbacks: CallbacksConf = field(default_factory=CallbacksConf)
    logger: LoggerConf = field(default_factory=LoggerConf)
    paths: PathsConf = field(default_factory=PathsConf)


@dataclass
class EvalConfig:
    task_name: str = "evaluate"
    seed: int = 42
    ckpt_path: Optional[str] = None
    results: Optional[str] = None
    iou_type: str = "bbox"
    data: DataConf = field(default_factory=DataConf)
    trainer: TrainerConf = field(default_factory=TrainerConf)
    paths: PathsConf = field(default_factory=PathsConf)
    postprocess: Dict[str, Any] = field(default_factory=dict)
    visualize: int = 0


@dataclass
class PredictConfig:
    """``predict.py`` / ``zoo-predict``: a model on images, a folder, a glob or a video (see :mod:`zoo.prediction`)."""

    task_name: str = "predict"
    #: a bundle folder, its model.json, a zoo run's .ckpt or a registered name (anything zoo.load takes)
    ckpt: Optional[str] = None
    #: an image, a folder of images / videos, a glob ('shots/*.jpg') or a video file
    source: Optional[str] = None
    #: cpu, cuda, cuda:1, ... or auto (cuda when available)
    device: str = "cpu"
    batch_size: int = 8
    #: only these heads (default: every head)
    heads: Optional[List[str]] = None
    #: post-processing; null keeps the model's defaults (what evaluation used)
    score_thresh: Optional[float] = None
    nms_thresh: Optional[float] = None
    max_detections: Optional[int] = None
    top_k: int = 5
    #: semantic heads: predict at the original resolution from windows of this size (int, [h, w] or "input")
    seg_window: Optional[Any] = None
    #: write annotated pictures (images/<name>.<image_format>)
    draw: bool = True
    #: detections / instances scoring below this are not drawn (they are still in the json)
    draw_score_thresh: float = 0.3
    image_format: str = "jpg"
    #: videos: keep every n-th frame, at most max_frames frames per video
    video_stride: int = 1
    max_frames: Optional[int] = None
    #: folders / '**' globs: descend into sub-folders
    recursive: bool = False
    progress: bool = True
    threads: Optional[int] = None
    paths: PathsConf = field(default_factory=PathsConf)


#: Allowed values of string options: dotted key -> choices.
CHOICES: dict[str, tuple[str, ...]] = {
    "data.kind": ("shapes", "coco", "image_folder", "mask_folder", "coco_crops", "identity_folder", "shards"),
    "data.on_bad_annotation": ("raise", "skip"),
    "data.decode_on": ("workers", "device"),
    "model.task": ("classification", "detection", "semantic", "instance", "similarity", "multitask"),
    "model.resize": ("stretch", "longest", "letterbox"),
    "model.balance": ("fixed", "uncertainty", "pcgrad"),
    "model.mix": ("all", "round_robin", "proportional"),
    "optimizer.name": ("adamw", "adam", "sgd"),
    "optimizer.lr_scaling": ("auto", "linear", "sqrt"),
    "scheduler.name": ("cosine", "constant", "step", "none"),
    "callbacks.progress_bar": ("tqdm", "rich", "none"),
    "callbacks.nonfinite": ("skip", "stop", "off"),
    "callbacks.checkpoint.on_tie": ("later", "earlier"),
    "trainer.accelerator": ("cpu", "gpu", "cuda", "mps", "auto", "tpu"),
    "trainer.fsdp.sharding_strategy": ("FULL_SHARD", "SHARD_GRAD_OP", "NO_SHARD", "HYBRID_SHARD"),
    "iou_type": ("bbox", "segm"),
    "image_format": ("jpg", "png"),
}


#: Keys that are a number of batches (int) or a fraction (float), as in Lightning.
BATCH_COUNT_KEYS = ("trainer.limit_train_batches", "trainer.limit_val_batches", "trainer.val_check_interval")


def _valid_keys(schema: Any, dotted: str) -> list[str]:
    node = schema
    for part in [p for p in dotted.split(".")[:-1] if p]:
        f = {x.name: x for x in fields(node)} if is_dataclass(node) else {}
        if part not in f:
            return []
        default = f[part].default_factory() if f[part].default_factory is not None else f[part].default  # type: ignore[misc]
        node = default
    return sorted(x.name for x in fields(node)) if is_dataclass(node) else []


def _strip(cfg: DictConfig, schema_cls: type) -> DictConfig:
    """Drop keys the schema does not describe at the top level only if they are Hydra's own."""
    c = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))
    if "hydra" in c:
        del c["hydra"]
    return c


def validate(cfg: DictConfig, schema_cls: type = TrainConfig) -> DictConfig:
    """Check ``cfg`` against ``schema_cls``; returns the merged (typed, resolved) config.

    Raises:
        ConfigError: naming the offending key and the valid keys or values.
    """
    base = OmegaConf.structured(schema_cls)
    try:
        merged = OmegaConf.merge(base, _strip(cfg, schema_cls))
        OmegaConf.resolve(merged)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or ""
        msg = str(err).splitlines()[0]
        hint = ""
        valid = _valid_keys(schema_cls(), key) if key else []
        if valid and "not in" in msg:
            hint = f" Valid keys there: {', '.join(valid)}."
        raise ConfigError(f"config error at '{key}': {msg}.{hint}") from None
    for dotted, choices in CHOICES.items():
        val = OmegaConf.select(merged, dotted, default=None)
        if val is not None and str(val) not in choices:
            raise ConfigError(f"config error at '{dotted}': {val!r} is not one of {', '.join(choices)}")
    for dotted in BATCH_COUNT_KEYS:
        val = OmegaConf.select(merged, dotted, default=None)
        if val is not None and (isinstance(val, bool) or not isinstance(val, (int, float)) or val < 0):
            raise ConfigError(f"config error at '{dotted}': {val!r} must be a number of batches (an integer, 1 = one "
                              "batch) or a fraction (a float, 1.0 = all)")
    frac = OmegaConf.select(merged, "data.val_fraction", default=None)
    if frac is not None and not 0.0 < float(frac) < 1.0:
        raise ConfigError(f"config error at 'data.val_fraction': {frac} must be between 0 and 1 (e.g. 0.2), or null")
    workers = OmegaConf.select(merged, "data.num_workers", default=0)
    if workers is not None and int(workers) < -1:
        raise ConfigError(f"config error at 'data.num_workers': {workers} - give 0 (load in the training process), a "
                          "number of loader processes, or -1 (one per CPU core, at most 8)")
    return merged


def to_container(cfg: Any) -> Any:
    """A plain (JSON-able, picklable without omegaconf) copy of a config node."""
    if isinstance(cfg, DictConfig) or OmegaConf.is_config(cfg):
        return OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    return cfg


def register_configs() -> None:
    """Register the schemas with Hydra's ConfigStore as ``train_schema`` / ``evaluate_schema`` / ``predict_schema``: the entry configs
    list them first in their defaults, so every group is merged over its typed schema at composition (unknown keys
    and wrong types fail there, and every schema key can be overridden without ``+``)."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig)
    cs.store(name="evaluate_schema", node=EvalConfig)
    cs.store(name="predict_schema", node=PredictConfig)


def launch_id() -> str | None:
    """A name every process of one multi-process launch computes alike, or ``None`` outside one: ``torchrun-<id>``
    (torchrun's rendezvous id: random per launch, ``--rdzv-id`` on several nodes) or ``slurm-<job id>`` (a job with
    several tasks; a requeued job keeps its id, so it finds its run folder again)."""
    import os
    import re

    def clean(v: str) -> str:
        return re.sub(r"[^A-Za-z0-9_.-]+", "-", v)[:40]

    rdzv = os.environ.get("TORCHELASTIC_RUN_ID")
    if rdzv and rdzv != "none":
        return f"torchrun-{clean(rdzv)}"
    job = os.environ.get("SLURM_JOB_ID")
    try:
        tasks = int(os.environ.get("SLURM_NTASKS", "1") or 1)
    except ValueError:
        tasks = 1
    if job and tasks > 1:
        array = os.environ.get("SLURM_ARRAY_JOB_ID")
        task = os.environ.get("SLURM_ARRAY_TASK_ID")
        return f"slurm-{clean(array)}_{clean(task)}" if array and task else f"slurm-{clean(job)}"
    return None


def process_rank() -> int:
    """This process's rank as the launcher's environment gives it (``RANK``, ``SLURM_PROCID``, else ``LOCAL_RANK``
    as Lightning's own launcher sets it; 0 without any)."""
    import os

    for var in ("RANK", "SLURM_PROCID", "LOCAL_RANK"):
        try:
            return int(os.environ[var])
        except (KeyError, ValueError):
            continue
    return 0


def _own_run_id(pattern: str) -> str:
    import os
    from datetime import datetime

    now = datetime.now()
    return f"{now.strftime(pattern)}_{now.microsecond:06d}-{os.getpid()}"


def _run_id_from_torchrun_store(pattern: str) -> str | None:
    """Under torchrun (its agent hosts the store the workers rendezvous through): rank 0's own run id, which it
    publishes in that store and the other workers read, on every node. ``None`` outside torchrun or on any failure."""
    import os

    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    try:
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return None
        from datetime import timedelta

        from torch.distributed import TCPStore

        store = TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                         timeout=timedelta(seconds=300))
        key = f"zoo/run_id/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
        if int(os.environ.get("RANK", "0")) == 0:
            value = _own_run_id(pattern)
            store.set(key, value)
            return value
        return store.get(key).decode()
    except Exception:  # noqa: BLE001 - no usable store: the launch id (or the per-process name) instead
        return None


def run_id(pattern: str = "%Y-%m-%d_%H-%M-%S") -> str:
    """A run folder name unique even for runs started in the same second: the time (``pattern``), microseconds and
    the process id, e.g. ``2025-01-31_12-00-00_123456-4242``. Under a multi-process launcher every process must land
    in the same folder: under torchrun every worker takes rank 0's name (shared through torchrun's store), under srun
    with several tasks the name is ``slurm-<job id>`` (:func:`launch_id`)."""
    return _run_id_from_torchrun_store(pattern) or launch_id() or _own_run_id(pattern)


def hydra_subdir(name: str = ".hydra") -> str | None:
    """``hydra.output_subdir``: ``.hydra`` on rank 0, none on the other processes of a launch (they share the run
    folder, and rank 0's copy of the config is the run's)."""
    return name if process_rank() == 0 else None


def rank_suffix() -> str:
    """``""`` on rank 0, ``_rank<N>`` elsewhere: the other processes of a launch log to ``train_rank<N>.log``."""
    r = process_rank()
    return "" if r == 0 else f"_rank{r}"


def config_groups(*groups: str) -> str:
    """``group: option, option, ...`` lines for the given groups of the repository's ``conf/`` folder (the
    ``--help`` of evaluate.py lists only the groups evaluation takes, ``${zoo.groups:data,trainer,paths}``)."""
    from pathlib import Path

    conf = Path(__file__).resolve().parents[1] / "conf"
    return "\n".join(f"{g}: {', '.join(sorted(p.stem for p in (conf / g).glob('*.yaml')))}" for g in groups)


def register_resolvers() -> None:
    """Register ``${zoo.run_id:<strftime pattern>}`` (see :func:`run_id`), used by ``conf/hydra/default.yaml``.
    Cached like Hydra's ``now``: one value per run, and the same for every job of a sweep. And
    ``${zoo.groups:<group>,...}`` (:func:`config_groups`)."""
    if not OmegaConf.has_resolver("zoo.run_id"):
        OmegaConf.register_new_resolver("zoo.run_id", run_id, use_cache=True)
    if not OmegaConf.has_resolver("zoo.hydra_subdir"):
        OmegaConf.register_new_resolver("zoo.hydra_subdir", hydra_subdir)
    if not OmegaConf.has_resolver("zoo.rank_suffix"):
        OmegaConf.register_new_resolver("zoo.rank_suffix", rank_suffix)
    if not OmegaConf.has_resolver("zoo.groups"):
        OmegaConf.register_new_resolver("zoo.groups", config_groups)


register_configs()
register_resolvers()
