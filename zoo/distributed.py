"""What training and validation need to give the same numbers on several processes as on one.

Training (losses):

* :func:`mean_over_ranks` / :func:`positive_count`: a loss normalised by a count that depends on the batch (FCOS and
  RetinaNet divide by the number of positive locations) divides by the *mean* count over the ranks. DDP averages
  the ranks' gradients, so the result is the gradient of ``sum of every rank's numerator / total count``: the loss of
  one process on the union of the ranks' batches.
* :func:`gather_for_loss`: embeddings and labels of every rank, concatenated in rank order, so a metric-learning
  loss sees cross-rank negatives. Only this rank's rows carry gradient, scaled by the world size, so that after DDP's
  gradient mean the model gets the gradient of the loss on the union batch (and the loss value itself is that loss,
  not a multiple of it; parameters of the loss, such as proxies, see every row and are not over-counted).

Both are collectives and run only while gradients are recorded (training steps); under ``torch.no_grad`` (validation)
they act on the local batch alone, because ranks may hold different numbers of validation batches.

Validation (metrics):

* :func:`unpadded_eval_loader` replaces a validation loader's sampler by one that gives rank ``r`` the samples
  ``r, r + W, r + 2W, ...`` and repeats none (``DistributedSampler`` pads the last round with copies of the first
  samples, which would be counted twice). :func:`use_unpadded_validation` installs it on a data module.
* :func:`gather_varlen` / :func:`gather_in_dataset_order`: per-sample tensors of every rank (ranks may hold one
  sample more or less), put back into dataset order, so a metric computed on them equals the one-process metric.

Nothing here does anything in a single process.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import torch

log = logging.getLogger(__name__)

__all__ = ["is_distributed", "world_size", "rank", "mean_over_ranks", "positive_count", "gather_for_loss",
           "gather_varlen", "gather_in_dataset_order", "gather_objects", "UnpaddedDistributedSampler",
           "unpadded_eval_loader", "use_unpadded_validation"]


def is_distributed() -> bool:
    """A torch.distributed process group with more than one process is initialised."""
    return torch.distributed.is_available() and torch.distributed.is_initialized() and \
        torch.distributed.get_world_size() > 1


def world_size() -> int:
    return torch.distributed.get_world_size() if is_distributed() else 1


def rank() -> int:
    return torch.distributed.get_rank() if is_distributed() else 0


def _collective_now() -> bool:
    """Collectives are only issued in training steps (gradients recorded), where every rank runs the same steps."""
    return is_distributed() and torch.is_grad_enabled()


def mean_over_ranks(x: torch.Tensor) -> torch.Tensor:
    """The mean of ``x`` over the ranks (``x`` itself in one process or without gradients recorded); no gradient."""
    x = x.detach().float()
    if not _collective_now():
        return x
    x = x.clone()
    torch.distributed.all_reduce(x, op=torch.distributed.ReduceOp.SUM)
    return x / torch.distributed.get_world_size()


def positive_count(mask_or_count: torch.Tensor) -> torch.Tensor:
    """The divisor of a loss normalised by its number of positives: the count (``mask.sum()`` of a boolean mask, or a
    count tensor) averaged over the ranks in a distributed training step, clamped to at least 1."""
    count = mask_or_count.sum() if mask_or_count.dtype == torch.bool else mask_or_count
    return mean_over_ranks(count.float()).clamp(min=1.0)


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; the backward multiplies the gradient by ``factor``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, factor: float) -> torch.Tensor:  # type: ignore[override]
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        return grad * ctx.factor, None


def _all_gather_padded(x: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's ``x`` (same trailing shape, first dimensions may differ), in rank order, without gradient."""
    w = torch.distributed.get_world_size()
    n = torch.tensor([x.shape[0]], device=x.device, dtype=torch.long)
    sizes = [torch.zeros_like(n) for _ in range(w)]
    torch.distributed.all_gather(sizes, n)
    counts = [int(s.item()) for s in sizes]
    top = max(counts)
    buf = x.detach().contiguous()
    if buf.shape[0] < top:
        buf = torch.cat([buf, buf.new_zeros((top - buf.shape[0], *buf.shape[1:]))])
    parts = [torch.empty_like(buf) for _ in range(w)]
    torch.distributed.all_gather(parts, buf)
    return [p[:c] for p, c in zip(parts, counts)]


def gather_for_loss(embeddings: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(embeddings, labels)`` of every rank, concatenated in rank order, for a loss over the union batch.

    This rank's rows are the given tensor (its graph kept, gradient scaled by the world size); the others are
    detached copies. Ranks may hold different batch sizes. In one process, or without gradients recorded, the
    inputs are returned as they are.
    """
    if not _collective_now():
        return embeddings, labels
    w, r = torch.distributed.get_world_size(), torch.distributed.get_rank()
    emb_parts = _all_gather_padded(embeddings)
    lab_parts = _all_gather_padded(labels.to(embeddings.device))
    emb_parts[r] = _ScaleGrad.apply(embeddings, float(w))
    lab_parts[r] = labels.to(embeddings.device)
    return torch.cat(emb_parts), torch.cat(lab_parts)


def gather_varlen(x: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's ``x`` in rank order (first dimensions may differ; ``[x]`` in one process). A collective:
    every rank must call it."""
    if not is_distributed():
        return [x]
    return _all_gather_padded(x)


def gather_in_dataset_order(x: torch.Tensor) -> torch.Tensor:
    """Per-sample rows of every rank, back in dataset order for rows produced under
    :class:`UnpaddedDistributedSampler` (rank ``r`` holds samples ``r, r + W, ...`` in that order). Ranks whose row
    counts cannot come from that split (a stream that shards itself) are concatenated in rank order instead."""
    parts = gather_varlen(x)
    if len(parts) == 1:
        return parts[0]
    w = len(parts)
    total = sum(p.shape[0] for p in parts)
    if any(p.shape[0] != len(range(r, total, w)) for r, p in enumerate(parts)):
        return torch.cat(parts)
    out = parts[0].new_empty((total, *parts[0].shape[1:]))
    for r, p in enumerate(parts):
        out[r::w] = p
    return out


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's picklable ``obj`` in rank order (``[obj]`` in one process)."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


# ---------------------------------------------------------------------------------------------------- validation data
def _sampler_base():
    from torch.utils.data import DistributedSampler

    return DistributedSampler


class UnpaddedDistributedSampler(_sampler_base()):
    """Rank ``r`` of ``W`` gets samples ``r, r + W, r + 2W, ...`` of the dataset, in order, and no sample twice:
    ranks hold ``ceil`` or ``floor`` of ``N / W`` samples, so some may run one batch less. Meant for evaluation only
    (no shuffling; DDP's gradient synchronisation would wait for the missing batch in training). Lightning leaves a
    loader alone whose sampler is already a ``DistributedSampler``, as this one is."""

    def __init__(self, dataset: Any, num_replicas: int | None = None, rank: int | None = None) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False, drop_last=False)
        self.total_size = len(dataset)
        self.num_samples = len(range(self.rank, self.total_size, self.num_replicas))

    def __iter__(self):
        return iter(range(self.rank, self.total_size, self.num_replicas))

    def __len__(self) -> int:
        return self.num_samples


def unpadded_eval_loader(loader: Any) -> Any:
    """``loader`` rebuilt with an :class:`UnpaddedDistributedSampler` when several processes run (the same loader
    otherwise, or when it already shards itself, or when its batches come from a custom batch sampler, which is
    left alone with a warning)."""
    from torch.utils.data import BatchSampler, DataLoader, DistributedSampler, IterableDataset, SequentialSampler

    if not is_distributed() or not isinstance(loader, DataLoader) or isinstance(loader.dataset, IterableDataset):
        return loader
    if isinstance(loader.sampler, DistributedSampler):
        return loader
    bs = loader.batch_sampler
    if not (type(bs) is BatchSampler and isinstance(loader.sampler, SequentialSampler)):
        log.warning("validation loader with its own batch sampler (%s): left as it is, so the distributed sampler "
                    "Lightning puts in may pad it and the metrics may count some samples twice", type(bs).__name__)
        return loader
    kwargs = dict(batch_size=loader.batch_size, drop_last=False, num_workers=loader.num_workers,
                  collate_fn=loader.collate_fn, pin_memory=loader.pin_memory, timeout=loader.timeout,
                  worker_init_fn=loader.worker_init_fn, persistent_workers=loader.persistent_workers)
    if loader.num_workers > 0:
        kwargs.update(prefetch_factor=loader.prefetch_factor, multiprocessing_context=loader.multiprocessing_context)
    return DataLoader(loader.dataset, sampler=UnpaddedDistributedSampler(loader.dataset), **kwargs)


def _unpadded(fn, *args: Any, **kwargs: Any) -> Any:
    out = fn(*args, **kwargs)
    if isinstance(out, (list, tuple)):
        return type(out)(unpadded_eval_loader(dl) for dl in out)
    if isinstance(out, dict):
        return {k: unpadded_eval_loader(dl) for k, dl in out.items()}
    return unpadded_eval_loader(out)


def use_unpadded_validation(datamodule: Any) -> None:
    """Make ``datamodule.val_dataloader`` / ``test_dataloader`` return loaders without padded duplicates when several
    processes run (:func:`unpadded_eval_loader`). Idempotent; a no-op in one process."""
    if datamodule is None or not is_distributed():
        return
    for name in ("val_dataloader", "test_dataloader"):
        fn = getattr(datamodule, name, None)
        if fn is None or getattr(fn, "_zoo_unpadded", False):
            continue
        wrapped = functools.partial(_unpadded, fn)
        wrapped._zoo_unpadded = True  # type: ignore[attr-defined]
        setattr(datamodule, name, wrapped)
