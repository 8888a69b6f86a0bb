"""Batch samplers for metric learning.

:class:`ClassBalancedBatchSampler` builds "P classes x M samples" batches (the PK sampling of Hermans et al. 2017),
which pair/triplet losses need: every batch holds positives for every anchor. It shards batches over DDP ranks
itself, so with Lightning pass it as ``DataLoader(batch_sampler=...)`` and set
``Trainer(use_distributed_sampler=False)``; Lightning calls :meth:`ClassBalancedBatchSampler.set_epoch` at each epoch.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Sampler

__all__ = ["ClassBalancedBatchSampler", "SizeGroupedBatchSampler"]


class ClassBalancedBatchSampler(Sampler[list[int]]):
    """Yield batches of ``batch_size // m_per_class`` distinct classes x ``m_per_class`` samples each.

    Classes are visited in a shuffled order that is reshuffled each time every class has been used once, so all
    classes appear equally often; the items of a class are drawn from a shuffled queue, so every item is seen
    before any repeats. A class with fewer than ``m_per_class`` items is sampled with replacement. Items with a
    negative label (e.g. ``-1`` for "unlabelled") are never sampled.

    The batch sequence depends only on ``(seed, epoch)``: every rank builds the same global sequence and keeps
    every ``num_replicas``-th batch starting at ``rank``, so ranks get disjoint batches (an item may still recur
    in several batches when classes are small or the epoch is long) and all ranks yield the same number of batches.

    Args:
        labels: class label of every dataset item (length ``N``).
        m_per_class: samples per class in a batch (``M``).
        batch_size: batch size per rank; must be a multiple of ``m_per_class``.
        seed: base random seed.
        num_replicas: number of DDP processes.
        rank: this process's rank in ``0..num_replicas-1``.
        length: number of samples one epoch covers over all ranks (default: the number of labelled items); each
            rank yields ``max(1, length // (batch_size * num_replicas))`` batches.
    """

    def __init__(self, labels: Sequence[int], *, m_per_class: int, batch_size: int, seed: int = 0,
                 num_replicas: int = 1, rank: int = 0, length: int | None = None) -> None:
        labels_np = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels)
        if labels_np.ndim != 1:
            raise ValueError(f"labels must be a 1-D sequence of class ids, got shape {labels_np.shape}")
        if labels_np.size and not np.issubdtype(labels_np.dtype, np.integer):
            raise TypeError(f"labels must be integer class ids, got dtype {labels_np.dtype}")
        if m_per_class < 1:
            raise ValueError(f"m_per_class must be >= 1, got {m_per_class}")
        if batch_size < 1 or batch_size % m_per_class != 0:
            raise ValueError(f"batch_size={batch_size} must be a positive multiple of m_per_class={m_per_class} "
                             f"(e.g. batch_size={max(1, batch_size // m_per_class) * m_per_class})")
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"rank={rank} must be in 0..num_replicas-1 with num_replicas={num_replicas} >= 1")
        labels_np = labels_np.astype(np.int64)
        self.m_per_class = int(m_per_class)
        self.batch_size = int(batch_size)
        self.classes_per_batch = self.batch_size // self.m_per_class
        self.seed = int(seed)
        self.num_replicas = int(num_replicas)
        self.rank = int(rank)
        self.epoch = 0
        valid = np.flatnonzero(labels_np >= 0)
        self.classes = np.unique(labels_np[valid])
        self.class_indices: list[np.ndarray] = [np.flatnonzero(labels_np == c) for c in self.classes]
        if len(self.classes) < self.classes_per_batch:
            raise ValueError(f"batch_size={batch_size} with m_per_class={m_per_class} needs "
                             f"{self.classes_per_batch} distinct classes per batch but the labels hold only "
                             f"{len(self.classes)}; lower batch_size or raise m_per_class")
        total = int(length) if length is not None else int(valid.size)
        if total < 1:
            raise ValueError(f"length must be >= 1, got {length}")
        self.num_batches = max(1, total // (self.batch_size * self.num_replicas))

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch; the batches are a deterministic function of ``(seed, epoch)``."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        """Number of batches this rank yields per epoch."""
        return self.num_batches

    def __iter__(self) -> Iterator[list[int]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        n_classes = len(self.classes)
        class_order = rng.permutation(n_classes)
        class_pos = 0
        queues: list[np.ndarray] = [rng.permutation(idx) for idx in self.class_indices]
        queue_pos = [0] * n_classes
        for b in range(self.num_batches * self.num_replicas):
            # P distinct classes from the shuffled class stream; a reshuffle puts the classes already taken last.
            chosen: list[int] = []
            while len(chosen) < self.classes_per_batch:
                if class_pos >= n_classes:
                    order = rng.permutation(n_classes)
                    taken = np.isin(order, chosen)
                    class_order = np.concatenate([order[~taken], order[taken]])
                    class_pos = 0
                chosen.append(int(class_order[class_pos]))
                class_pos += 1
            batch: list[int] = []
            for c in chosen:
                batch.extend(self._take(c, queues, queue_pos, rng))
            if b % self.num_replicas == self.rank:
                yield batch

    def _take(self, c: int, queues: list[np.ndarray], queue_pos: list[int], rng: np.random.Generator) -> list[int]:
        """``m_per_class`` items of class ``c`` (distinct when the class has that many)."""
        items = self.class_indices[c]
        m = self.m_per_class
        if len(items) < m:
            return rng.choice(items, size=m, replace=True).tolist()
        q, pos = queues[c], queue_pos[c]
        out = q[pos:pos + m].tolist()
        if len(out) < m:  # refill: a fresh shuffle with the items just taken moved to the end
            fresh = rng.permutation(items)
            taken = np.isin(fresh, out)
            q = np.concatenate([fresh[~taken], fresh[taken]])
            need = m - len(out)
            out += q[:need].tolist()
            queues[c], pos = q, need
        else:
            pos += m
        queue_pos[c] = pos
        return out


class SizeGroupedBatchSampler(Sampler[list[int]]):
    """Evaluation batches of images that share one padded input size, in dataset order within each size.

    With ``resize="longest"`` (or letterbox) images of different aspect ratios get different sizes; batched
    together, the smaller ones are padded, and the padding enters every normalisation layer and border of the
    network, so an image's prediction would depend on its batch-mates. Grouping by size makes each image's result
    the same as when it is predicted alone (as the Predictor does) and evaluation independent of the batch size.

    Args:
        sizes: the padded ``(h, w)`` of every dataset item.
        batch_size: the largest batch.
    """

    def __init__(self, sizes: Sequence[tuple[int, int]], batch_size: int) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        groups: dict[tuple[int, int], list[int]] = {}
        for i, s in enumerate(sizes):
            groups.setdefault((int(s[0]), int(s[1])), []).append(i)
        self.batches = [idx[k:k + batch_size] for idx in groups.values() for k in range(0, len(idx), batch_size)]

    def __iter__(self) -> Iterator[list[int]]:
        return iter([list(b) for b in self.batches])

    def __len__(self) -> int:
        return len(self.batches)
