"""Batches for every task: collation with padding, and a LightningDataModule built from the ``data`` config."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from zoo.preprocess import IGNORE_INDEX, pad_batch

log = logging.getLogger(__name__)

__all__ = ["collate", "auto_workers", "ZooDataModule", "build_datasets", "resolve_coco_split", "DATASET_KINDS"]



def _stack_targets(values: Sequence[Any], padded_hw: tuple[int, int]) -> Any:
    """Collate the targets of one format: semantic maps ``(h, w)`` into ``(B, H, W)`` padded with 255, other
    tensors stacked (class indices ``(B,)``, multi-hot ``(B, K)``), dicts (detection / instance) kept as a list."""
    t0 = values[0]
    if isinstance(t0, torch.Tensor) and t0.dim() == 2:  # semantic maps
        H, W = padded_hw
        tgt = torch.full((len(values), H, W), IGNORE_INDEX, dtype=torch.long)
        for i, m in enumerate(values):
            tgt[i, : m.shape[0], : m.shape[1]] = m
        return tgt
    if isinstance(t0, torch.Tensor):
        return torch.stack(list(values))
    return list(values)


def collate(samples: Sequence[dict[str, Any]], *, size_divisor: int = 32,
            target_format: str | Sequence[str] | None = None) -> dict[str, Any]:
    """Batch samples.

    Returns: ``images`` ``(B, 3, H, W)`` padded bottom/right to a multiple of ``size_divisor``; ``targets``: for
    samples with one ``target``, a stacked tensor (class indices ``(B,)``, multi-hot ``(B, K)``, semantic maps
    ``(B, H, W)`` padded with 255) or a list of per-image dicts (detection/instance); for samples with ``targets``
    ``{format: target}`` (a dataset feeding several heads), ``{format: collated}``. ``target_format``: the format
    name(s) of the targets (each head picks its own, :meth:`zoo.heads.base.Head.batch_targets`); ``image_sizes``
    ``[(h, w)]`` valid size of each image inside the padding; ``orig_sizes`` ``[(H, W)]``; ``scales``
    ``[(sy, sx)]``; ``image_ids``.
    """
    batch: dict[str, Any] = {
        "image_sizes": [tuple(s["size"]) for s in samples],
        "orig_sizes": [tuple(s["orig_size"]) for s in samples],
        "scales": [tuple(s["scale"]) for s in samples],
        "image_ids": [s["image_id"] for s in samples],
    }
    if "encoded" in samples[0]:
        # data.decode_on=device: the bytes travel to the main process; zoo.data.device_decode.decode_batch makes the
        # images there. The padded size (of the targets, and of the images to come) is known from the sizes already.
        from zoo.data.device_decode import EncodedImages

        d = max(1, int(size_divisor))
        hw = tuple((max(int(s["size"][k]) for s in samples) + d - 1) // d * d for k in (0, 1))
        batch.update(encoded=EncodedImages([s["encoded"] for s in samples]), windows=[s["window"] for s in samples],
                     flips=[bool(s["flip"]) for s in samples], padded_hw=hw)
    else:
        images = pad_batch([s["image"] for s in samples], size_divisor=size_divisor)
        batch["images"] = images
        hw = tuple(images.shape[-2:])
    if "targets" in samples[0]:
        formats = tuple(samples[0]["targets"])
        batch["targets"] = {f: _stack_targets([s["targets"][f] for s in samples], hw) for f in formats}
        batch["target_format"] = formats
    elif "target" in samples[0]:
        batch["targets"] = _stack_targets([s["target"] for s in samples], hw)
        if target_format is not None:
            batch["target_format"] = target_format
    for key in samples[0]:
        if key not in batch and key not in ("image", "target", "targets", "size", "orig_size", "scale", "image_id",
                                            "encoded", "window", "flip"):
            vals = [s[key] for s in samples]
            batch[key] = torch.stack(vals) if isinstance(vals[0], torch.Tensor) else vals
    return batch


class _Collate:
    """Picklable collate with a size divisor (workers need picklable callables)."""

    def __init__(self, size_divisor: int, target_format: str | Sequence[str] | None = None) -> None:
        self.size_divisor = size_divisor
        self.target_format = target_format

    def __call__(self, samples):
        return collate(samples, size_divisor=self.size_divisor, target_format=self.target_format)


def _base(ds: Any) -> Any:
    """The dataset under ``Subset`` wrappers (``data.limit_*_images``)."""
    while isinstance(ds, Subset):
        ds = ds.dataset
    return ds


def _padded_sizes(ds: Dataset, size_divisor: int) -> list[tuple[int, int]] | None:
    """Evaluation input sizes of a dataset's items when it can tell them without decoding (COCO-style data)."""
    base = ds.dataset if isinstance(ds, Subset) else ds
    if not hasattr(base, "padded_sizes"):
        return None
    sizes = base.padded_sizes(size_divisor)
    return [sizes[i] for i in ds.indices] if isinstance(ds, Subset) else sizes


class SampleCache(Dataset):
    """A deterministic dataset (no augmentation: validation) whose samples are kept after their first load, up to
    ``budget_mb`` MiB per process (each loader worker keeps the items it loaded; with persistent workers and the
    fixed validation order every worker gets the same items each epoch). Cached samples are returned as copies, so
    a consumer changing a tensor in place cannot change the cache."""

    def __init__(self, dataset: Dataset, budget_mb: int) -> None:
        self.dataset = dataset
        self.budget = int(budget_mb) * 2 ** 20
        self.used = 0
        self.cache: dict[int, Any] = {}
        self.full = False

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getattr__(self, name: str) -> Any:  # records, class_names, ... of the wrapped dataset
        if name in ("dataset", "cache", "budget", "used", "full"):
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __getitem__(self, i: int) -> Any:
        hit = self.cache.get(int(i))
        if hit is not None:
            return _copy_tensors(hit)
        sample = self.dataset[i]
        if not self.full:
            n = _nbytes(sample)
            if self.used + n <= self.budget:
                self.cache[int(i)] = sample
                self.used += n
                sample = _copy_tensors(sample)
            else:
                self.full = True
        return sample


def _nbytes(x: Any) -> int:
    if isinstance(x, torch.Tensor):
        return x.numel() * x.element_size()
    if isinstance(x, Mapping):
        return sum(_nbytes(v) for v in x.values()) + 64
    if isinstance(x, (list, tuple)):
        return sum(_nbytes(v) for v in x) + 16
    return 16


def _copy_tensors(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.clone()
    if isinstance(x, dict):
        return {k: _copy_tensors(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_copy_tensors(v) for v in x]
    if isinstance(x, tuple):
        return tuple(_copy_tensors(v) for v in x)
    return x


def auto_workers(cap: int = 8) -> int:
    """Loader processes for ``data.num_workers=-1``: the CPU cores this process may run on, shared by the training
    processes of this machine (``LOCAL_WORLD_SIZE``, set by torchrun), at most ``cap`` (beyond that, decoding a
    batch is rarely what a step waits for), at least 1."""
    import os

    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    return max(1, min(int(cap), cores // local))


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _is_stream(ds: Any) -> bool:
    """A streaming dataset that batches and shards itself (:class:`zoo.data.shards.ShardStream`)."""
    return callable(getattr(ds, "plan", None)) and callable(getattr(ds, "set_distributed", None))


def _lightning_base():
    import lightning.pytorch as pl

    return pl.LightningDataModule


class ZooDataModule(_lightning_base()):
    """Train/val loaders with workers, pinned memory and persistent workers.

    Args:
        train_set, val_set: datasets returning sample dicts (see :func:`collate`).
        batch_size: training batch size per device; ``eval_batch_size`` defaults to it.
        num_workers: loader processes (0 loads in the main process; -1: :func:`auto_workers`).
        pin_memory: pin host memory (only used when a GPU is present).
        persistent_workers: keep workers alive between epochs (only with ``num_workers > 0``).
        size_divisor: padding multiple for batched images.
        train_batch_sampler: factory ``(dataset, batch_size) -> batch sampler`` (e.g. class-balanced); replaces shuffle.
        info: free metadata (class names, category ids, ...) the task reads.
        target_format: the format name of the datasets' targets, put on every batch (``target_format``).
        device_decode: ``{"mean", "std"}`` when the datasets send encoded images (``data.decode_on=device``): the
            batches are decoded, cropped, resized and normalised on the training device once there
            (:func:`zoo.data.device_decode.decode_batch`).
    """

    def __init__(self, train_set: Dataset | None, val_set: Dataset | None, *, batch_size: int = 32,
                 eval_batch_size: int | None = None, num_workers: int = 2, pin_memory: bool = True,
                 persistent_workers: bool = True, size_divisor: int = 32,
                 train_batch_sampler: Callable | None = None, drop_last: bool = True,
                 info: Mapping[str, Any] | None = None, target_format: str | Sequence[str] | None = None,
                 val_cache_mb: int = 0, device_decode: Mapping[str, Any] | None = None) -> None:
        super().__init__()
        #: ``data.decode_on=device``: {"mean", "std"} to finish the batches on the device (see on_after_batch_transfer)
        self.device_decode = dict(device_decode) if device_decode else None
        self.val_cache_mb = int(val_cache_mb)
        self.train_set, self.val_set = train_set, val_set
        self.batch_size = int(batch_size)
        self.eval_batch_size = int(eval_batch_size or batch_size)
        self.num_workers = auto_workers() if int(num_workers) < 0 else int(num_workers)
        self.pin_memory = bool(pin_memory) and torch.cuda.is_available()
        self.persistent_workers = bool(persistent_workers) and self.num_workers > 0
        self.collate = _Collate(size_divisor, target_format if isinstance(target_format, str) or target_format is None
                                else tuple(target_format))
        self.train_batch_sampler = train_batch_sampler
        self.drop_last = drop_last
        self.info = dict(info or {})

    def _loader(self, ds: Dataset, *, train: bool) -> DataLoader:
        if _is_stream(ds):
            return self._stream_loader(ds, train=train)
        common = dict(num_workers=self.num_workers, pin_memory=self.pin_memory, collate_fn=self.collate,
                      persistent_workers=self.persistent_workers)
        if train and self.train_batch_sampler is not None:
            return DataLoader(ds, batch_sampler=self.train_batch_sampler(ds, self.batch_size), **common)
        bs = self.batch_size if train else self.eval_batch_size
        sizes = _padded_sizes(ds, self.collate.size_divisor) if not train else None
        if not train and self.val_cache_mb > 0 and getattr(_base(ds), "augment", None) is None:
            ds = SampleCache(ds, self.val_cache_mb)
        if not train and _distributed():
            from zoo.distributed import UnpaddedDistributedSampler

            # several processes: each evaluates its own samples, none repeated (Lightning's sampler would pad the
            # last round with repeats), so the gathered metrics are those of one process
            return DataLoader(ds, batch_size=bs, sampler=UnpaddedDistributedSampler(ds), **common)
        if sizes is not None and len(set(sizes)) > 1 and not _distributed():
            from zoo.data.samplers import SizeGroupedBatchSampler

            return DataLoader(ds, batch_sampler=SizeGroupedBatchSampler(sizes, bs), **common)
        drop = train and self.drop_last and len(ds) > bs
        return DataLoader(ds, batch_size=bs, shuffle=train, drop_last=drop, **common)

    def _stream_loader(self, ds: Any, *, train: bool) -> DataLoader:
        """A loader over a :class:`zoo.data.shards.ShardStream`: the stream batches (the same number of batches on
        every rank, nothing dropped or repeated) and splits itself over ranks and workers. Workers are not kept
        between epochs: each epoch's workers start from the stream's current epoch (and resume position)."""
        from zoo.data.shards import _identity

        if train and self.train_batch_sampler is not None:
            log.warning("data=shards: the heads' class-balanced batches (e.g. m_per_class for metric losses) cannot "
                        "be drawn from a stream; batches are the shuffled stream's")
        if _distributed():
            ds.set_distributed(torch.distributed.get_rank(), torch.distributed.get_world_size())
        else:  # Lightning initialises torch.distributed whenever it runs several processes
            ds.set_distributed(0, 1)
        ds.batch_size = self.batch_size if train else self.eval_batch_size
        ds.collate_fn = self.collate
        ds.num_workers = self.num_workers
        import warnings

        warnings.filterwarnings("ignore", message=".*IterableDataset.*has `__len__` defined.*")
        return DataLoader(ds, batch_size=None, collate_fn=_identity, num_workers=self.num_workers,
                          pin_memory=self.pin_memory, persistent_workers=False)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Encoded batches (``data.decode_on=device``) become image batches here, on the training device."""
        if self.device_decode is None:
            return batch
        from zoo.data.device_decode import decode_batch

        trainer = getattr(self, "trainer", None)
        device = trainer.strategy.root_device if trainer is not None else torch.device("cpu")

        def finish(b: Any) -> Any:
            if isinstance(b, dict) and "encoded" in b:
                return decode_batch(b, mean=self.device_decode["mean"], std=self.device_decode["std"],
                                    size_divisor=self.collate.size_divisor, device=device)
            if isinstance(b, dict):
                return {k: finish(v) for k, v in b.items()}
            if isinstance(b, (list, tuple)) and b and all(isinstance(v, dict) for v in b):
                return type(b)(finish(v) for v in b)
            return b

        return finish(batch)

    def train_dataloader(self) -> DataLoader:
        if self.train_set is None:
            raise RuntimeError("this data module has no training split")
        return self._loader(self.train_set, train=True)

    def val_dataloader(self) -> DataLoader:
        if self.val_set is None:
            raise RuntimeError("this data module has no validation split")
        return self._loader(self.val_set, train=False)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()


# ---------------------------------------------------------------------------------------------------- builders
def resolve_coco_split(root: Path, split: str, *, ann_file: str | None = None,
                       images: str | None = None) -> tuple[Path, Path]:
    """Annotation json and image folder of a COCO split: ``<root>/annotations/instances_<split>.json`` and
    ``<root>/<split>/`` unless given explicitly (relative paths are taken under ``root``)."""
    ann = Path(ann_file) if ann_file else root / "annotations" / f"instances_{split}.json"
    img = Path(images) if images else root / split
    if not ann.is_absolute() and ann_file:
        ann = root / ann
    if not img.is_absolute() and images:
        img = root / img
    return ann, img


def _limit(ds: Dataset, n: int | None) -> Dataset:
    if n is None or n <= 0 or n >= len(ds):
        return ds
    sub = Subset(ds, range(int(n)))
    for attr in ("class_names", "index"):
        if hasattr(ds, attr):
            setattr(sub, attr, getattr(ds, attr))
    return sub


def _coco_sets(cfg: Mapping[str, Any], fmt: str, pre: Mapping[str, Any], augment, stages: Sequence[str]):
    from zoo.data.coco import CocoDataset, CocoIndex

    if cfg["kind"] == "shapes":
        from zoo.data.shapes import ensure_shapes_dataset

        root = ensure_shapes_dataset(cfg.get("root"), **dict(cfg.get("shapes") or {}))
    else:
        if not cfg.get("root"):
            raise ValueError("data.root is required for data=coco: the folder holding annotations/instances_<split>.json "
                             "and the <split>/ image folders (e.g. data.root=../shared/data/coco128)")
        root = Path(cfg["root"]).expanduser()
        if not root.is_dir():
            raise FileNotFoundError(f"data.root={str(root)!r} does not exist")
    out: dict[str, Any] = {"root": str(root)}
    kw = dict(on_bad=cfg.get("on_bad_annotation", "raise"), min_box_size=cfg.get("min_box_size", 1.0),
              verify_images=bool(cfg.get("verify_images", False)))
    indices = {}
    held = _coco_holdout(cfg, root, stages)
    if held is not None:  # data.val_fraction (or no validation json): both splits from the training json's images
        tann, timg = held
        index = CocoIndex(tann, timg, **kw)
        ids = [r.image_id for r in index.records]
        train_idx, val_idx = _holdout(cfg, tann, len(ids), None)
        sizes = (cfg.get("extra") or {}).get("multiscale")
        for stage in stages:
            ds = CocoDataset(index, fmt, augment=augment if stage == "train" else None,
                             image_ids=[ids[i] for i in (train_idx if stage == "train" else val_idx)],
                             train_sizes=sizes if stage == "train" else None, **pre)
            out[stage] = _limit(ds, cfg.get(f"limit_{stage}_images"))
            out[f"{stage}_ann_file"] = str(tann)  # COCO evaluation reads the held-out images' ids only
        out["class_names"], out["category_ids"] = index.class_names, index.cat_ids
        return out
    for stage in stages:
        split = cfg[f"{stage}_split"]
        ann, img = resolve_coco_split(root, split, ann_file=cfg.get(f"{stage}_ann"), images=cfg.get(f"{stage}_images"))
        key = (str(ann), str(img))
        if key not in indices:
            indices[key] = CocoIndex(ann, img, **kw)
        index = indices[key]
        sizes = (cfg.get("extra") or {}).get("multiscale") if stage == "train" else None
        ds = CocoDataset(index, fmt, augment=augment if stage == "train" else None, train_sizes=sizes, **pre)
        out[stage] = _limit(ds, cfg.get(f"limit_{stage}_images"))
        out.setdefault("class_names", index.class_names)
        out.setdefault("category_ids", index.cat_ids)
        out[f"{stage}_ann_file"] = str(ann)
    return out


def _coco_holdout(cfg: Mapping[str, Any], root: Path, stages: Sequence[str]) -> tuple[Path, Path] | None:
    """The training json and image folder that ``data.val_fraction`` splits for ``data=coco``, or ``None`` when the
    validation split has a json of its own. Without a validation json and without ``val_fraction``, 20 % of the
    training images are held out (as ``data.val_fraction=0.2``; a warning says so), never validated on the images
    the model trains on."""
    from zoo.config import ConfigError

    if cfg["kind"] != "coco" or "val" not in stages:
        return None
    frac = cfg.get("val_fraction")
    vann, _ = resolve_coco_split(root, cfg["val_split"], ann_file=cfg.get("val_ann"), images=cfg.get("val_images"))
    tann, timg = resolve_coco_split(root, cfg["train_split"], ann_file=cfg.get("train_ann"),
                                    images=cfg.get("train_images"))
    if frac is not None and vann.is_file() and vann.resolve() != tann.resolve():
        raise ConfigError(f"data.val_fraction={frac} holds validation images out of the training json {tann}, but "
                          f"the validation json {vann} exists too: remove data.val_fraction to validate on it, or "
                          "point data.val_split / data.val_ann at one that does not exist")
    if frac is None and (vann.is_file() or not tann.is_file()):
        return None  # a validation json (or no training json either: CocoIndex names the missing file)
    if frac is None:
        frac = cfg["val_fraction"] = AUTO_VAL_FRACTION  # recorded in the checkpoint: evaluate.py redraws the split
        log.warning("data=coco: no validation json %s: holding out %d%% of the images of %s for validation "
                    "(data.val_fraction=%s, seed data.val_seed=%s); give data.val_ann or data.val_fraction to choose",
                    vann, round(100 * frac), tann, frac, cfg.get("val_seed", 0))
    return tann, timg


def holdout_split(n: int, fraction: float, seed: int = 0, labels: Sequence[int] | None = None
                  ) -> tuple[list[int], list[int]]:
    """``(train indices, validation indices)``, both sorted: ``round(fraction * n)`` items held out, drawn with
    ``numpy.random.default_rng(seed)``.

    With ``labels`` the split is stratified: each class gives ``fraction`` of its items (rounded so that the total is
    ``round(fraction * n)``, the remainders going to the classes with the largest fractional parts), and every class
    keeps at least one item for training.
    """
    import math

    import numpy as np

    if not 0.0 < float(fraction) < 1.0:
        raise ValueError(f"fraction={fraction} must be between 0 and 1")
    rng = np.random.default_rng(int(seed))
    n_val = int(round(float(fraction) * n))
    if labels is None:
        val = sorted(int(i) for i in rng.permutation(n)[:n_val])
    else:
        labels = [int(x) for x in labels]
        if len(labels) != n:
            raise ValueError(f"{len(labels)} labels for {n} items")
        by: dict[int, list[int]] = {}
        for i, lab in enumerate(labels):
            by.setdefault(lab, []).append(i)
        classes = sorted(by)
        exact = {c: float(fraction) * len(by[c]) for c in classes}
        cap = {c: max(len(by[c]) - 1, 0) for c in classes}
        quota = {c: min(math.floor(exact[c]), cap[c]) for c in classes}
        tie = {c: float(t) for c, t in zip(classes, rng.random(len(classes)))}
        order = sorted(classes, key=lambda c: (-(exact[c] - math.floor(exact[c])), tie[c]))
        left = n_val - sum(quota.values())
        while left > 0:
            room = [c for c in order if quota[c] < cap[c]]
            if not room:
                break
            for c in room[:left]:
                quota[c] += 1
            left = n_val - sum(quota.values())
        val = sorted(int(i) for c in classes for i in rng.permutation(by[c])[:quota[c]])
    held = set(val)
    return [i for i in range(n) if i not in held], val


#: the share of training images held out for validation when a folder dataset has no validation folder
AUTO_VAL_FRACTION = 0.2


def _holdout_source(cfg: Mapping[str, Any], root: Path, kind: str, layout: str, stages: Sequence[str]) -> Path | None:
    """The folder ``data.val_fraction`` splits (``<root>/<train_split>``, or ``root`` itself when that does not
    exist), or ``None`` without ``val_fraction``; errors name what to change."""
    from zoo.config import ConfigError

    frac = cfg.get("val_fraction")
    train_dir, val_dir = root / cfg["train_split"], root / cfg["val_split"]
    if frac is None and root.is_dir() and not val_dir.is_dir():
        # no validation folder: hold out 20 % of the training images (stratified, seeded by data.val_seed), as
        # data.val_fraction=0.2 would; evaluate.py on this run's checkpoint draws the same split
        frac = cfg["val_fraction"] = AUTO_VAL_FRACTION
        log.warning("data=%s: no validation folder %s: holding out %d%% of %s for validation (data.val_fraction=%s, "
                    "seed data.val_seed=%s); give a %s folder or data.val_fraction to choose", kind, val_dir,
                    round(100 * frac), train_dir if train_dir.is_dir() else root, frac, cfg.get("val_seed", 0),
                    val_dir.name)
    if frac is None:
        need = [(s, root / cfg[f"{s}_split"]) for s in stages]
        for stage, d in need:
            if not d.is_dir() and root.is_dir():
                hint = (f"hold out validation images from {train_dir if train_dir.is_dir() else root} with "
                        "data.val_fraction=0.2" if stage == "val" else
                        f"for one folder {root}/{layout} set data.val_fraction=0.2 (a validation split is held out "
                        f"of it), or name the split folder with data.{stage}_split")
                raise FileNotFoundError(f"data={kind}: the {stage} split folder {d} does not exist ({kind} reads "
                                        f"<data.root>/<split>/{layout}); {hint}")
        return None
    if not root.is_dir():
        raise FileNotFoundError(f"data.root={str(root)!r} does not exist")
    if val_dir.is_dir():
        raise ConfigError(f"data.val_fraction={frac} holds validation images out of the training folder, but the "
                          f"validation split folder {val_dir} exists too: remove data.val_fraction to validate on "
                          f"{val_dir}, or point data.val_split at a folder that does not exist")
    return train_dir if train_dir.is_dir() else root


def _holdout(cfg: Mapping[str, Any], src: Path, n: int, labels: Sequence[int] | None) -> tuple[list[int], list[int]]:
    """``data.val_fraction``'s split of the ``n`` items of ``src`` (stratified when ``labels`` are given)."""
    from zoo.config import ConfigError

    frac, seed = float(cfg["val_fraction"]), int(cfg.get("val_seed") or 0)
    stratify = labels is not None
    train_idx, val_idx = holdout_split(n, frac, seed, labels)
    total = len(train_idx) + len(val_idx)
    if not val_idx or not train_idx:
        empty = "validation" if not val_idx else "training"
        raise ConfigError(f"data.val_fraction={frac} of the {total} images in {src} leaves the {empty} split empty"
                          + (" (every class keeps at least one training image)" if stratify and not val_idx else "")
                          + f": use a fraction between {1 / total:.3g} and {1 - 1 / total:.3g}, or more images")
    log.info("data.val_fraction=%s: %d of the %d images in %s held out for validation (%s, data.val_seed=%d)",
             frac, len(val_idx), total, src, "stratified by class" if stratify else "random", seed)
    return train_idx, val_idx


def _image_folder_sets(cfg, fmt, pre, augment, stages):
    from zoo.data.folders import ImageFolderDataset

    if fmt != "classification":
        raise ValueError(f"data=image_folder serves single-label classification only, not {fmt!r}")
    if not cfg.get("root"):
        raise ValueError("data.root is required for data=image_folder: <root>/<split>/<class>/<images>")
    root = Path(cfg["root"]).expanduser()
    out: dict[str, Any] = {"root": str(root)}
    src = _holdout_source(cfg, root, "image_folder", "<class>/<images>", stages)
    if src is not None:  # data.val_fraction: both splits from one folder, stratified by class
        full = ImageFolderDataset(src, **pre)
        train_idx, val_idx = _holdout(cfg, src, len(full), full.labels())
        for stage in stages:
            ds = full.take(train_idx, augment=augment) if stage == "train" else full.take(val_idx)
            out[stage] = _limit(ds, cfg.get(f"limit_{stage}_images"))
        out["class_names"] = full.class_names
        return out
    names = None
    for stage in stages:
        split_dir = root / cfg[f"{stage}_split"]
        ds = ImageFolderDataset(split_dir, class_names=names, augment=augment if stage == "train" else None, **pre)
        names = ds.class_names
        out[stage] = _limit(ds, cfg.get(f"limit_{stage}_images"))
        out.setdefault("class_names", ds.class_names)
    return out


def _mask_folder_sets(cfg, fmt, pre, augment, stages):
    from zoo.data.mask_folder import MaskFolderDataset

    if fmt != "semantic":
        raise ValueError(f"data=mask_folder serves semantic segmentation only, not {fmt!r}")
    if not cfg.get("root"):
        raise ValueError("data.root is required for data=mask_folder: <root>/<split>/images and <root>/<split>/masks")
    root = Path(cfg["root"]).expanduser()
    names = (cfg.get("extra") or {}).get("class_names")
    out: dict[str, Any] = {"root": str(root)}
    src = _holdout_source(cfg, root, "mask_folder", "images/ and masks/", stages)
    if src is not None:  # data.val_fraction: both splits from one folder (a plain seeded split)
        full = MaskFolderDataset(src, class_names=names, **pre)
        train_idx, val_idx = _holdout(cfg, src, len(full), None)
        for stage in stages:
            ds = full.take(train_idx, augment=augment) if stage == "train" else full.take(val_idx)
            out[stage] = _limit(ds, cfg.get(f"limit_{stage}_images"))
        out["class_names"] = full.class_names
        out["has_background"] = False
        return out
    for stage in stages:
        ds = MaskFolderDataset(root / cfg[f"{stage}_split"], class_names=names,
                               augment=augment if stage == "train" else None, **pre)
        names = ds.class_names
        out[stage] = _limit(ds, cfg.get(f"limit_{stage}_images"))
        out.setdefault("class_names", ds.class_names)
    out["has_background"] = False
    return out


def _crops_sets(cfg, fmt, pre, augment, stages):
    """Object crops with identities (similarity). Training identities and held-out identities are disjoint: the
    training split keeps the training identities, validation keeps the held-out ones (open-set retrieval)."""
    from zoo.data.coco import CocoIndex
    from zoo.data.crops import CocoCropsDataset, split_identities

    if fmt != "similarity":
        raise ValueError(f"data={cfg['kind']} serves similarity only, not {fmt!r}")
    extra = dict(cfg.get("extra") or {})
    if cfg["kind"] == "shapes":
        from zoo.data.shapes import ensure_shapes_dataset

        root = ensure_shapes_dataset(cfg.get("root"), **dict(cfg.get("shapes") or {}))
        extra.setdefault("identity", "identity")
    else:
        if not cfg.get("root"):
            raise ValueError("data.root is required for data=coco_crops")
        root = Path(cfg["root"]).expanduser()
    identity = extra.get("identity", "category")
    crop_kw = dict(identity=identity, context=float(extra.get("context", 0.1)),
                   min_size=float(extra.get("min_size", 8.0)))
    kw = dict(on_bad=cfg.get("on_bad_annotation", "raise"), min_box_size=cfg.get("min_box_size", 1.0),
              verify_images=bool(cfg.get("verify_images", False)))
    indices: dict[str, Any] = {}
    for stage in ("train", "val"):
        ann, img = resolve_coco_split(root, cfg[f"{stage}_split"], ann_file=cfg.get(f"{stage}_ann"),
                                      images=cfg.get(f"{stage}_images"))
        if stage == "val" and not ann.is_file():
            ann, img = resolve_coco_split(root, cfg["train_split"], ann_file=cfg.get("train_ann"),
                                          images=cfg.get("train_images"))
        indices[stage] = CocoIndex(ann, img, **kw)
    probe = CocoCropsDataset(indices["train"], **crop_kw, **pre)
    all_ids = sorted(set(probe.all_identities()) | set(CocoCropsDataset(indices["val"], **crop_kw, **pre).all_identities()))
    train_ids, test_ids = split_identities(all_ids, float(extra.get("test_identity_fraction", 0.3)),
                                           int(extra.get("split_seed", 0)))
    out: dict[str, Any] = {"root": str(root), "train_identities": train_ids, "test_identities": test_ids}
    for stage in stages:
        ids = train_ids if stage == "train" else test_ids
        ds = CocoCropsDataset(indices[stage], identities=ids, augment=augment if stage == "train" else None,
                              **crop_kw, **pre)
        out[stage] = _limit(ds, cfg.get(f"limit_{stage}_images"))
    out["class_names"] = train_ids
    return out


def _identity_folder_sets(cfg, fmt, pre, augment, stages):
    """Similarity from ``<root>/<split>/<identity>/<images>``: the training split's identities train, the validation
    split's (different) identities are the open-set retrieval set."""
    from zoo.data.folders import ImageFolderDataset

    if fmt != "similarity":
        raise ValueError(f"data=identity_folder serves similarity only, not {fmt!r}")
    if not cfg.get("root"):
        raise ValueError("data.root is required for data=identity_folder: <root>/<split>/<identity>/<images>")
    root = Path(cfg["root"]).expanduser()
    out: dict[str, Any] = {"root": str(root)}
    src = _holdout_source(cfg, root, "identity_folder", "<identity>/<images>", stages)
    if src is not None:  # data.val_fraction: a fraction of the *identities* held out (open set), not of the images
        from zoo.config import ConfigError
        from zoo.data.crops import split_identities

        full = ImageFolderDataset(src, **pre)
        frac, seed = float(cfg["val_fraction"]), int(cfg.get("val_seed") or 0)
        try:
            train_ids, val_ids = split_identities(full.class_names, frac, seed)
        except ValueError as err:
            raise ConfigError(f"data=identity_folder, data.val_fraction={frac} of the identities in {src}: {err}; "
                              f"give more identities or a <root>/{cfg['val_split']} folder of other ones") from None
        log.info("data.val_fraction=%s: %d of the %d identities in %s held out for open-set validation "
                 "(data.val_seed=%d)", frac, len(val_ids), len(full.class_names), src, seed)
        out["train_identities"], out["test_identities"] = train_ids, val_ids
        for stage in stages:
            ds = (full.with_classes(train_ids, augment=augment) if stage == "train" else full.with_classes(val_ids))
            out[stage] = _limit(ds, cfg.get(f"limit_{stage}_images"))
        out["class_names"] = train_ids
        return out
    for stage in ("train", "val"):
        if stage not in stages and stage != "train":
            continue
        ds = ImageFolderDataset(root / cfg[f"{stage}_split"], augment=augment if stage == "train" else None, **pre)
        out[f"{stage}_identities" if stage == "train" else "test_identities"] = ds.class_names
        if stage in stages:
            out[stage] = _limit(ds, cfg.get(f"limit_{stage}_images"))
    shared = set(out["train_identities"]) & set(out.get("test_identities", []))
    if shared:
        log.warning("identity_folder: %d identities appear in both splits (%s...): retrieval is then not open-set",
                    len(shared), sorted(shared)[:3])
    out["class_names"] = out["train_identities"]
    return out


def _shard_sets(cfg, fmt, pre, augment, stages):
    """WebDataset shards written by ``python -m zoo.data.shards write`` (:func:`zoo.data.shards.shard_sets`)."""
    from zoo.data.shards import shard_sets

    return shard_sets(cfg, fmt, pre, augment, stages)


#: data.kind -> builder(cfg, target_format, preprocessing kwargs, augment, stages) -> {"train", "val", "class_names", ...}
DATASET_KINDS: dict[str, Callable] = {
    "coco": _coco_sets,
    "shapes": _coco_sets,
    "image_folder": _image_folder_sets,
    "mask_folder": _mask_folder_sets,
    "coco_crops": _crops_sets,
    "identity_folder": _identity_folder_sets,
    "shards": _shard_sets,
}


#: Keys ``data.extra`` may hold, and what reads them (a key outside this list is a typo and stops the run).
DATA_EXTRA_KEYS = {
    "multiscale": "coco/shapes: training sizes drawn per image",
    "class_names": "mask_folder (and mask_folder shards): the class of each mask index",
    "identity": "crops: 'category' or the annotation field holding the identity",
    "context": "crops: box grown by this fraction on each side",
    "min_size": "crops: smallest object side kept (px)",
    "test_identity_fraction": "crops: identities held out for open-set retrieval",
    "split_seed": "crops: seed of the identity split",
}


def check_data_extra(cfg: Mapping[str, Any]) -> None:
    """Refuse unknown ``data.extra`` keys, naming them and the known ones."""
    unknown = sorted(set(cfg.get("extra") or {}) - set(DATA_EXTRA_KEYS))
    if unknown:
        from zoo.config import ConfigError

        known = ", ".join(f"{k} ({v})" for k, v in DATA_EXTRA_KEYS.items())
        raise ConfigError(f"data.extra has unknown key(s) {unknown}; known keys: {known}")


def build_datasets(cfg: Mapping[str, Any], fmt: str, pre: Mapping[str, Any], *, augment=None,
                   stages: Sequence[str] = ("train", "val")) -> dict[str, Any]:
    """Datasets for ``stages`` from a ``data`` config, for target format ``fmt`` with preprocessing ``pre``
    (``input_size``, ``resize``, ``mean``, ``std``)."""
    check_data_extra(cfg)
    kind = cfg["kind"]
    if not isinstance(fmt, str) and kind not in ("shapes", "coco", "shards"):
        if len(fmt) != 1:
            raise ValueError(f"data.kind={kind!r} serves one kind of target, but the heads it feeds need {list(fmt)}: "
                             "use a COCO-style dataset (data=coco or shapes), or give some heads their own data "
                             "(model.heads.<name>.data)")
        fmt = fmt[0]
    if fmt == "similarity" and kind in ("shapes", "coco"):
        kind = "coco_crops"
    if kind not in DATASET_KINDS:
        raise ValueError(f"data.kind={kind!r} unknown; use one of {sorted(DATASET_KINDS)}")
    return DATASET_KINDS[kind](cfg, fmt, pre, augment, stages)


def datamodule_from_config(data_cfg: Any, fmt: str, pre: Mapping[str, Any], *, size_divisor: int = 32,
                           stages: Sequence[str] = ("train", "val"), boxes: bool = False,
                           train_batch_sampler: Callable | None = None, seed: int | None = None) -> ZooDataModule:
    """Datasets + augmentation + loaders from a validated ``data`` config.

    Args:
        data_cfg: the ``data`` node (omegaconf or dict).
        fmt: target format (see ``zoo.data.coco.TARGET_FORMATS``), or several for a COCO-style dataset that feeds
            several heads (each sample then carries ``targets`` ``{format: target}``).
        pre: the model's preprocessing (``input_size``, ``resize``, ``mean``, ``std``).
        boxes: the pipeline must move boxes (detection / instance).
    """
    from zoo.config import to_container
    from zoo.data.transforms import build_augment

    cfg = to_container(data_cfg)
    if not isinstance(fmt, str):
        fmt = tuple(dict.fromkeys(fmt))
        if len(fmt) == 1 or cfg["kind"] not in ("shapes", "coco", "shards"):
            fmt = fmt[0] if len(fmt) == 1 else fmt
    augment = None
    if "train" in stages:
        augment = build_augment(cfg.get("augment"), boxes=boxes, min_visibility=float(cfg.get("min_visibility", 0.3)),
                                seed=seed, input_size=pre.get("input_size"))
    sets = build_datasets(cfg, fmt, pre, augment=augment, stages=stages)
    if seed is not None and _is_stream(sets.get("train")):
        sets["train"].seed = int(seed)  # the run's seed draws the shard order and the shuffle of every epoch
    device_decode = None
    if cfg.get("decode_on", "workers") == "device":
        device_decode = _device_decode(cfg, sets, pre, stages)
    elif cfg.get("fast_decode", True):
        for stage, ds in sets.items():
            # map-style readers, or the dataset a shard stream's decoder fills its samples with
            target = getattr(getattr(ds, "decoder", None), "dataset", None) if _is_stream(ds) else _base(ds)
            if stage in ("train", "val") and hasattr(target, "decode_min_side"):
                target.decode_min_side = decode_min_side(pre, cfg, train=stage == "train")
    info = {k: v for k, v in sets.items() if k not in ("train", "val")}
    info["kind"] = cfg["kind"]
    return ZooDataModule(sets.get("train"), sets.get("val"), batch_size=cfg["batch_size"],
                         eval_batch_size=cfg.get("eval_batch_size"), num_workers=cfg["num_workers"],
                         pin_memory=cfg["pin_memory"], persistent_workers=cfg["persistent_workers"],
                         size_divisor=size_divisor, train_batch_sampler=train_batch_sampler, info=info,
                         target_format=fmt, val_cache_mb=int(cfg.get("val_cache_mb", 0) or 0),
                         device_decode=device_decode)


def _device_decode(cfg: Mapping[str, Any], sets: Mapping[str, Any], pre: Mapping[str, Any],
                   stages: Sequence[str]) -> dict[str, Any]:
    """Switch the datasets to encoded samples (``data.decode_on=device``): the training set draws the plan of
    ``data.augment``, the validation set the identity; returns the data module's ``device_decode``."""
    from zoo.config import ConfigError
    from zoo.data.device_decode import GeometryPlan, geometry_plan

    plan = geometry_plan(cfg.get("augment"), min_visibility=float(cfg.get("min_visibility", 0.3)))
    for stage, ds in sets.items():
        if stage not in ("train", "val") or ds is None:
            continue
        base = _base(ds)
        if not hasattr(type(base), "device_plan"):
            raise ConfigError(f"data.decode_on=device reads image files of data.kind=image_folder or coco; "
                              f"data.kind={cfg['kind']} ({type(base).__name__}) decodes in the loader workers only: "
                              "set data.decode_on=workers")
        base.device_plan = plan if stage == "train" else GeometryPlan()
    return {"mean": list(pre["mean"]), "std": list(pre["std"])}


def decode_min_side(pre: Mapping[str, Any], cfg: Mapping[str, Any], *, train: bool) -> int | None:
    """The smallest side a decoded image may have (``data.fast_decode``): the network input's largest side (the
    largest multi-scale size in training), times a margin in training for augmentations that enlarge part of the
    image: ``1 / sqrt(0.75 * min_scale)`` for ``RandomResizedCrop`` (its narrowest crop at the default aspect
    range), 2 for other geometric transforms, 1 for pixel-only ones (colour, blur, noise), flips and torchvision's
    policies (their shears and shifts do not zoom)."""
    size = pre.get("input_size")
    if not size:
        return None
    side = max(int(v) for v in size)
    if not train:
        return side
    for t in (cfg.get("extra") or {}).get("multiscale") or []:
        side = max(side, *(int(v) for v in (t if isinstance(t, (list, tuple)) else [t])))
    margin = 1.0
    import albumentations as A

    for op in cfg.get("augment") or []:
        name = str(op.get("type", ""))
        cls = getattr(A, name, None)
        if name in ("HorizontalFlip", "VerticalFlip", "RandomRotate90", "Transpose", "D4",
                    "TrivialAugmentWide", "RandAugment", "AutoAugment", "AugMix") or (
                isinstance(cls, type) and issubclass(cls, A.ImageOnlyTransform)):
            continue
        if name == "RandomResizedCrop":
            lo = float((op.get("scale") or (0.08, 1.0))[0])
            margin = max(margin, 1.0 / max(0.75 * lo, 1e-6) ** 0.5)
        else:
            margin = max(margin, 2.0)
    return int(math.ceil(side * margin))
