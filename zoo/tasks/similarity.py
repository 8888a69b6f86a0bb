"""Visual similarity: an embedding head trained with a metric-learning loss on identity-labelled crops; open-set
retrieval evaluation on held-out identities (leave-one-out over the validation crops: each query is searched among
all other crops, itself excluded). Metric keys: ``val/R@1``, ``val/R@5``, ``val/R@10``, ``val/mAP@R``."""

from __future__ import annotations

from typing import Any

import torch

from zoo.tasks.base import ZooTask

__all__ = ["SimilarityTask"]

HEAD = "emb"


class SimilarityTask(ZooTask):
    """Embeddings (L2-normalised) compared by cosine similarity."""

    main_metric = "val/R@1"
    main_mode = "max"
    data_format = "similarity"
    checks_class_names = False  # held-out identities are different by design

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        from zoo.losses import build_metric_loss

        opts = self.options
        head = self.model.heads[HEAD]
        self.criterion = build_metric_loss(opts.get("loss", "multi_similarity"),
                                           num_classes=int(opts.get("num_train_identities", 1)),
                                           embedding_dim=head.embedding_dim, **dict(opts.get("loss_kwargs") or {}))
        self._emb: list[torch.Tensor] = []
        self._lab: list[torch.Tensor] = []
        self.last_eval_report: dict[str, Any] = {}

    def extra_parameters(self) -> list[torch.nn.Parameter]:
        return list(self.criterion.parameters()) if self.criterion.has_parameters else []

    @classmethod
    def build(cls, cfg: Any, *, stages: tuple[str, ...] = ("train", "val")):
        from zoo.config import to_container
        from zoo.data.datamodule import datamodule_from_config
        from zoo.data.samplers import ClassBalancedBatchSampler

        head = {"type": "embedding", "embedding_dim": int(cfg.model.embedding_dim),
                **(to_container(cfg.model.heads).get(HEAD) or {})}
        spec = cls.base_spec(cfg, {HEAD: head})
        extra = to_container(cfg.model.extra) or {}
        m = int(extra.get("m_per_class", 4))
        seed = int(cfg.seed)

        def sampler(ds, batch_size):
            import torch.distributed as dist

            world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
            rank = dist.get_rank() if world > 1 else 0
            labels = ds.labels() if hasattr(ds, "labels") else ds.dataset.labels()[: len(ds)]
            return ClassBalancedBatchSampler(labels, m_per_class=m, batch_size=batch_size, seed=seed,
                                             num_replicas=world, rank=rank)

        dm = datamodule_from_config(cfg.data, cls.data_format, cls.preprocessing(spec), size_divisor=spec["size_divisor"],
                                    stages=stages, train_batch_sampler=sampler if "train" in stages else None, seed=seed)
        spec["class_names"] = {}
        spec["extra"] = {"train_identities": dm.info.get("train_identities"),
                         "test_identities": dm.info.get("test_identities")}
        options = cls.task_options(cfg)
        options.update(loss=cfg.model.loss or "multi_similarity", num_train_identities=len(dm.info["class_names"]))
        return dm, {"spec": spec, "optimizer": to_container(cfg.optimizer), "scheduler": to_container(cfg.scheduler),
                    "options": options, "data_info": {"kind": dm.info["kind"], "root": dm.info.get("root"),
                                                      "format": cls.data_format}}

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        raw = self.train_model()(self.prepare_images(batch["images"]))[HEAD]
        return self.log_losses({"loss_metric": self.criterion(raw["embedding"], batch["targets"])}, len(batch["targets"]))

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        raw = self.eval_model(self.prepare_images(batch["images"]))[HEAD]
        self._emb.append(raw["embedding"].float())
        self._lab.append(batch["targets"])

    def on_validation_epoch_start(self) -> None:
        self._emb, self._lab = [], []

    def on_validation_epoch_end(self) -> None:
        from zoo.metrics.retrieval import retrieval_metrics

        if not self._emb:
            return
        emb, lab = torch.cat(self._emb), torch.cat(self._lab)
        if self.trainer.world_size > 1:
            emb = self.all_gather(emb).flatten(0, 1)
            lab = self.all_gather(lab).flatten(0, 1)
        metrics = retrieval_metrics(emb, lab)
        for k, v in metrics.items():
            self.log(f"val/{k}", float(v), prog_bar=k == "R@1")
        self.last_eval_report = {"num_queries": int(len(lab)), "num_identities": int(lab.unique().numel())}
        self._emb, self._lab = [], []
