"""Similarity building blocks: embedding head, metric-learning losses (against hand-written formulas), the
class-balanced batch sampler, retrieval metrics (against brute-force references) and the embedding index."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from zoo.data.samplers import ClassBalancedBatchSampler
from zoo.heads.embedding import EmbeddingHead
from zoo.losses.metric_learning import METRIC_LOSSES, build_metric_loss
from zoo.metrics.retrieval import faiss_available, knn, retrieval_metrics
from zoo.similarity_index import EmbeddingIndex

needs_pml = pytest.mark.skipif(importlib.util.find_spec("pytorch_metric_learning") is None,
                               reason="pytorch-metric-learning not installed")


# ----------------------------------------------------------------------------------------------- embedding head
def _levels(b: int = 3) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(b, 8, 8, 8, generator=g), torch.randn(b, 16, 4, 4, generator=g)]


@pytest.mark.parametrize("pooling", ["gem", "avg", "attention"])
@pytest.mark.parametrize("hidden_dim,bnneck", [(None, False), (12, True)])
def test_embedding_head_shapes_and_norm(pooling: str, hidden_dim: int | None, bnneck: bool) -> None:
    head = EmbeddingHead([8, 16], [4, 8], embedding_dim=6, pooling=pooling, hidden_dim=hidden_dim, bnneck=bnneck)
    raw = head(_levels())
    assert raw["embedding"].shape == (3, 6) and raw["features"].shape == (3, 6)
    torch.testing.assert_close(raw["embedding"].norm(dim=1), torch.ones(3))
    assert not torch.allclose(raw["features"].norm(dim=1), torch.ones(3))  # features are not normalised
    if not bnneck:
        torch.testing.assert_close(raw["embedding"], F.normalize(raw["features"], dim=1))
    emb = head.predict(raw)
    torch.testing.assert_close(emb, raw["embedding"])
    raw["embedding"].sum().backward()
    assert all(p.grad is not None for p in head.parameters() if p.requires_grad)


def test_embedding_head_pooling_values() -> None:
    feats = _levels()
    x = feats[-1]
    # GeM with p=1 is average pooling of the (positive-clamped) activations; attention starts as average pooling.
    gem = EmbeddingHead([8, 16], embedding_dim=4, pooling="gem", gem_p=1.0)
    torch.testing.assert_close(gem.pool(x), x.clamp(min=1e-6).mean(dim=(2, 3)))
    gem3 = EmbeddingHead([8, 16], embedding_dim=4, pooling="gem", gem_p=3.0)
    torch.testing.assert_close(gem3.pool(x), x.clamp(min=1e-6).pow(3).mean(dim=(2, 3)).pow(1 / 3))
    assert gem3.pool.p.requires_grad
    att = EmbeddingHead([8, 16], embedding_dim=4, pooling="attention")
    torch.testing.assert_close(att.pool(x), x.mean(dim=(2, 3)))
    # feature_level selects the level; the single-Linear projection maps pooled -> features exactly.
    lvl0 = EmbeddingHead([8, 16], embedding_dim=4, pooling="avg", feature_level=0)
    raw = lvl0(feats)
    torch.testing.assert_close(raw["features"], lvl0.projection(feats[0].mean(dim=(2, 3))))


def test_embedding_head_bad_arguments() -> None:
    with pytest.raises(ValueError, match="pooling"):
        EmbeddingHead([8], pooling="max")
    with pytest.raises(ValueError, match="feature_level"):
        EmbeddingHead([8, 16], feature_level=2)
    head = EmbeddingHead([8, 16], embedding_dim=4)
    with pytest.raises(ValueError, match=r"\(B, 16, H, W\)"):
        head([torch.randn(2, 8, 4, 4), torch.randn(2, 8, 4, 4)])


def test_embedding_head_in_zoo_model() -> None:
    from zoo.models import create_model

    model = create_model({"backbone": {"name": "resnet10t"}, "heads": {"emb": {"type": "embedding",
                                                                              "embedding_dim": 8,
                                                                              "bnneck": True}},
                          "task": "similarity"})
    model.eval()
    out = model(torch.randn(2, 3, 64, 64))
    assert out["emb"]["embedding"].shape == (2, 8)


# -------------------------------------------------------------------------------------------------------- losses
LABELS = torch.tensor([0, 0, 1, 1, 2, 2])


def _emb(seed: int = 0, n: int = 6, d: int = 3) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).float()


def _margin_softmax_reference(e: torch.Tensor, y: torch.Tensor, w: torch.Tensor, *, scale: float,
                              arc_margin: float = 0.0, cos_margin: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """ArcFace / CosFace: CE(scale * logits) with the target logit cos(theta + m) (ArcFace, falling back to
    cos(theta) - m sin(m) past pi - m) or cos(theta) - m (CosFace). Returns (loss, target angles)."""
    cos = F.normalize(e, dim=1) @ F.normalize(w, dim=0)  # (B, C)
    rows = torch.arange(len(y))
    cos_y = cos[rows, y]
    theta = torch.acos(cos_y.clamp(-1, 1))
    if arc_margin:
        target = torch.where(theta <= math.pi - arc_margin, torch.cos(theta + arc_margin),
                             cos_y - arc_margin * math.sin(arc_margin))
    else:
        target = cos_y - cos_margin
    logits = cos.clone()
    logits[rows, y] = target
    return F.cross_entropy(scale * logits, y), theta


@needs_pml
def test_arcface_matches_formula() -> None:
    e, w = _emb(1), _emb(2, n=3).T.contiguous()  # W is (D, C)
    e[5] = -w[:, 2] * 2.0  # a sample pointing away from its class: exercises the theta > pi - m branch
    loss = build_metric_loss("arcface", num_classes=3, embedding_dim=3, margin=30.0, scale=4.0)
    assert loss.has_parameters
    with torch.no_grad():
        loss.loss_fn.W.copy_(w)
    expected, theta = _margin_softmax_reference(e, LABELS, w, scale=4.0, arc_margin=math.radians(30.0))
    assert bool((theta > math.pi - math.radians(30.0)).any()) and bool((theta < 1.0).any())
    torch.testing.assert_close(loss(e, LABELS), expected, rtol=1e-5, atol=1e-5)


@needs_pml
def test_cosface_matches_formula() -> None:
    e, w = _emb(3), _emb(4, n=3).T.contiguous()
    loss = build_metric_loss("cosface", num_classes=3, embedding_dim=3, margin=0.35, scale=8.0)
    with torch.no_grad():
        loss.loss_fn.W.copy_(w)
    expected, _ = _margin_softmax_reference(e, LABELS, w, scale=8.0, cos_margin=0.35)
    torch.testing.assert_close(loss(e, LABELS), expected, rtol=1e-5, atol=1e-5)


@needs_pml
def test_proxy_anchor_matches_formula() -> None:
    e, proxies = _emb(5), _emb(6, n=4)  # 4 proxies, class 3 has no sample in the batch
    alpha, delta = 8.0, 0.1
    loss = build_metric_loss("proxy_anchor", num_classes=4, embedding_dim=3, alpha=alpha, margin=delta)
    with torch.no_grad():
        loss.loss_fn.proxies.copy_(proxies)
    cos = F.normalize(e, dim=1) @ F.normalize(proxies, dim=1).T  # (B, C)
    pos_sum, neg_sum, classes_with_pos = 0.0, 0.0, 0
    for c in range(4):
        pos = LABELS == c
        if pos.any():
            classes_with_pos += 1
            pos_sum = pos_sum + torch.log1p(torch.exp(-alpha * (cos[pos, c] - delta)).sum())
        neg_sum = neg_sum + torch.log1p(torch.exp(alpha * (cos[~pos, c] + delta)).sum())
    expected = pos_sum / classes_with_pos + neg_sum / 4
    torch.testing.assert_close(loss(e, LABELS), expected, rtol=1e-5, atol=1e-5)


@needs_pml
def test_triplet_batch_hard_matches_formula() -> None:
    e, margin = _emb(7), 0.3
    loss = build_metric_loss("triplet", num_classes=3, embedding_dim=3, margin=margin)
    assert not loss.has_parameters
    n = F.normalize(e, dim=1)
    dist = torch.cdist(n, n)
    per_anchor = []
    for i in range(len(LABELS)):
        same = (LABELS == LABELS[i]) & (torch.arange(len(LABELS)) != i)
        diff = LABELS != LABELS[i]
        hardest_pos = dist[i][same].max()  # farthest positive
        hardest_neg = dist[i][diff].min()  # nearest negative
        per_anchor.append(torch.relu(hardest_pos - hardest_neg + margin))
    per_anchor_t = torch.stack(per_anchor)
    nonzero = per_anchor_t[per_anchor_t > 0]
    assert 0 < len(nonzero) < len(LABELS), "test input should mix satisfied and violated triplets"
    torch.testing.assert_close(loss(e, LABELS), nonzero.mean(), rtol=1e-5, atol=1e-5)


@needs_pml
def test_multi_similarity_with_miner_matches_formula() -> None:
    e = _emb(14)
    alpha, beta, base, eps = 2.0, 10.0, 0.5, 0.1
    loss = build_metric_loss("multi_similarity", num_classes=3, embedding_dim=3, alpha=alpha, beta=beta,
                             base=base, miner_kwargs={"epsilon": eps})
    sim = F.normalize(e, dim=1) @ F.normalize(e, dim=1).T
    idx = torch.arange(len(LABELS))

    def mine(i: int, margin: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Keep positives less similar than the most similar negative + margin, and negatives more similar than
        the least similar positive - margin."""
        pos = (LABELS == LABELS[i]) & (idx != i)
        neg = LABELS != LABELS[i]
        return pos, neg, pos & (sim[i] - margin < sim[i][neg].max()), neg & (sim[i] + margin > sim[i][pos].min())

    total, pruned, eps_changes_pos, eps_changes_neg = 0.0, 0, 0, 0
    for i in range(len(LABELS)):
        pos, neg, hard_pos, hard_neg = mine(i, eps)
        _, _, hard_pos0, hard_neg0 = mine(i, 0.0)
        pruned += int(neg.sum() - hard_neg.sum())
        eps_changes_pos += int((hard_pos != hard_pos0).sum())
        eps_changes_neg += int((hard_neg != hard_neg0).sum())
        pos_term = torch.log1p(torch.exp(-alpha * (sim[i][hard_pos] - base)).sum()) / alpha
        neg_term = torch.log1p(torch.exp(beta * (sim[i][hard_neg] - base)).sum()) / beta
        total = total + pos_term + neg_term
    # The input is chosen so the miner matters: it drops negatives, and epsilon changes both selections.
    assert pruned > 0 and eps_changes_pos > 0 and eps_changes_neg > 0
    torch.testing.assert_close(loss(e, LABELS), total / len(LABELS), rtol=1e-5, atol=1e-5)


@needs_pml
def test_supcon_matches_formula() -> None:
    e, tau = _emb(9), 0.5
    labels = torch.tensor([0, 0, 0, 1, 1, 2])  # class 2 has no positive: its anchor is left out of the mean
    loss = build_metric_loss("supcon", num_classes=3, embedding_dim=3, temperature=tau)
    sim = F.normalize(e, dim=1) @ F.normalize(e, dim=1).T / tau
    idx = torch.arange(len(labels))
    per_anchor = []
    for i in range(len(labels)):
        others = idx != i
        pos = (labels == labels[i]) & others
        if not pos.any():
            continue
        log_denominator = torch.logsumexp(sim[i][others], dim=0)
        per_anchor.append(-(sim[i][pos] - log_denominator).mean())
    torch.testing.assert_close(loss(e, labels), torch.stack(per_anchor).mean(), rtol=1e-5, atol=1e-5)


@needs_pml
def test_infonce_matches_formula() -> None:
    e, tau = _emb(10), 0.2
    loss = build_metric_loss("infonce", num_classes=3, embedding_dim=3, temperature=tau)
    sim = F.normalize(e, dim=1) @ F.normalize(e, dim=1).T / tau
    terms = []
    for i in range(len(LABELS)):
        for p in range(len(LABELS)):
            if p == i or LABELS[p] != LABELS[i]:
                continue
            neg = LABELS != LABELS[i]
            terms.append(-(sim[i, p] - torch.logsumexp(torch.cat([sim[i, p:p + 1], sim[i][neg]]), dim=0)))
    torch.testing.assert_close(loss(e, LABELS), torch.stack(terms).mean(), rtol=1e-5, atol=1e-5)


@needs_pml
@pytest.mark.parametrize("name", METRIC_LOSSES)
def test_every_loss_is_finite_with_gradients(name: str) -> None:
    emb = torch.randn(8, 5, requires_grad=True)
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    loss = build_metric_loss(name, num_classes=4, embedding_dim=5)
    value = loss(emb, labels)
    assert value.dim() == 0 and torch.isfinite(value)
    value.backward()
    assert emb.grad is not None and torch.isfinite(emb.grad).all() and emb.grad.abs().sum() > 0
    assert loss.has_parameters == (name in ("arcface", "cosface", "proxy_anchor"))
    for p in loss.parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all()


@needs_pml
def test_loss_under_autocast_keeps_float32_parameters() -> None:
    loss = build_metric_loss("arcface", num_classes=4, embedding_dim=5)
    emb = torch.randn(8, 5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = loss(emb.bfloat16(), torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]))
    assert value.dtype == torch.float32 and torch.isfinite(value)
    assert loss.loss_fn.W.dtype == torch.float32


@needs_pml
def test_loss_factory_errors() -> None:
    with pytest.raises(ValueError, match="valid names.*arcface.*infonce"):
        build_metric_loss("circle", num_classes=3, embedding_dim=4)
    with pytest.raises(TypeError, match="triplet"):
        build_metric_loss("triplet", num_classes=3, embedding_dim=4, no_such_option=1)
    loss = build_metric_loss("cosface", num_classes=3, embedding_dim=4)
    with pytest.raises(ValueError, match="num_classes=3"):
        loss(torch.randn(2, 4), torch.tensor([0, 3]))
    with pytest.raises(ValueError, match=r"labels \(B,\)"):
        loss(torch.randn(2, 4), torch.tensor([0, 1, 2]))


# ------------------------------------------------------------------------------------------------------- sampler
def _check_batches(batches: list[list[int]], labels: list[int], m: int, p: int) -> None:
    for batch in batches:
        assert len(batch) == m * p
        blocks = [batch[i:i + m] for i in range(0, len(batch), m)]
        block_classes = [labels[blk[0]] for blk in blocks]
        assert len(set(block_classes)) == p, f"classes repeat within a batch: {batch}"
        for blk, c in zip(blocks, block_classes):
            assert all(labels[i] == c for i in blk)
            if labels.count(c) >= m:
                assert len(set(blk)) == m, f"class {c} has enough items but was sampled with repeats: {blk}"


def test_sampler_batches_cover_the_data_evenly() -> None:
    labels = [c for c in range(4) for _ in range(6)]  # 4 classes x 6 items
    sampler = ClassBalancedBatchSampler(labels, m_per_class=2, batch_size=4, seed=3)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 6
    _check_batches(batches, labels, m=2, p=2)
    # 6 batches x 2 classes = every class 3 times; 3 x 2 items = each class's 6 items, each exactly once.
    assert sorted(i for b in batches for i in b) == list(range(24))


def test_sampler_small_classes_ignored_labels_and_determinism() -> None:
    labels = [0, 0, 0, 1, 2, 2, 2, 2, -1, 3, 3]
    sampler = ClassBalancedBatchSampler(labels, m_per_class=3, batch_size=6, seed=1, length=60)
    first = list(sampler)
    assert first == list(sampler), "same epoch must give the same batches"
    _check_batches(first, labels, m=3, p=2)
    assert all(8 not in b for b in first), "items labelled -1 must never be sampled"
    assert any(b.count(3) == 3 for b in first), "the 1-item class 1 is sampled with replacement"
    sampler.set_epoch(1)
    assert list(sampler) != first
    sampler.set_epoch(0)
    assert list(sampler) == first
    counts = Counter(labels[b[i]] for b in first for i in range(0, 6, 3))
    assert max(counts.values()) - min(counts.values()) <= 1, f"classes unevenly visited: {counts}"


def test_sampler_shards_over_ranks() -> None:
    labels = [c for c in range(5) for _ in range(7)]
    kw = dict(m_per_class=2, batch_size=4, seed=5, length=80)
    single = list(ClassBalancedBatchSampler(labels, num_replicas=1, **kw))
    shards = [ClassBalancedBatchSampler(labels, num_replicas=2, rank=r, **kw) for r in range(2)]
    for s in shards:
        s.set_epoch(0)
    rank0, rank1 = list(shards[0]), list(shards[1])
    assert len(rank0) == len(rank1) == len(shards[0]) == 10
    interleaved = [b for pair in zip(rank0, rank1) for b in pair]
    assert interleaved == single, "ranks must split one global batch sequence between them"
    assert rank0 != rank1


def test_sampler_with_dataloader_and_errors() -> None:
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    ds = torch.utils.data.TensorDataset(torch.arange(6), labels)
    loader = torch.utils.data.DataLoader(ds, batch_sampler=ClassBalancedBatchSampler(labels, m_per_class=2,
                                                                                       batch_size=4))
    for idx, lab in loader:
        assert idx.shape == (4,) and len(set(lab.tolist())) == 2
    with pytest.raises(ValueError, match="multiple of m_per_class"):
        ClassBalancedBatchSampler(labels, m_per_class=4, batch_size=6)
    with pytest.raises(ValueError, match="only 3"):
        ClassBalancedBatchSampler(labels, m_per_class=1, batch_size=4)
    with pytest.raises(ValueError, match="rank"):
        ClassBalancedBatchSampler(labels, m_per_class=2, batch_size=4, num_replicas=2, rank=2)


# ----------------------------------------------------------------------------------------------------- retrieval
def _brute_knn(q: np.ndarray, g: np.ndarray, k: int, exclude_self: bool = False) -> tuple[np.ndarray, np.ndarray]:
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    gn = g / np.linalg.norm(g, axis=1, keepdims=True)
    sim = qn @ gn.T
    if exclude_self:
        np.fill_diagonal(sim, -np.inf)
    order = np.argsort(-sim, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(sim, order, axis=1), order


def _brute_metrics(q: np.ndarray, ql: np.ndarray, g: np.ndarray, gl: np.ndarray, ks: tuple[int, ...],
                   loo: bool) -> dict[str, float]:
    """Plain-python Recall@k and mAP@R (queries without any same-label gallery item are skipped)."""
    _, order = _brute_knn(q, g, g.shape[0] - (1 if loo else 0), exclude_self=loo)
    recalls = {k: [] for k in ks}
    aps = []
    for i in range(q.shape[0]):
        ranked = [j for j in order[i]]
        r = sum(1 for j in range(g.shape[0]) if gl[j] == ql[i] and not (loo and j == i))
        if r == 0:
            continue
        rel = [gl[j] == ql[i] for j in ranked]
        for k in ks:
            recalls[k].append(float(any(rel[:k])))
        hits, ap = 0, 0.0
        for pos in range(r):
            if rel[pos]:
                hits += 1
                ap += hits / (pos + 1)
        aps.append(ap / r)
    out = {f"R@{k}": float(np.mean(v)) for k, v in recalls.items()}
    out["mAP@R"] = float(np.mean(aps))
    return out


def test_knn_matches_brute_force() -> None:
    rng = np.random.default_rng(0)
    q, g = rng.normal(size=(7, 5)), rng.normal(size=(23, 5))
    scores, idx = knn(torch.from_numpy(q), torch.from_numpy(g), 4, batch_size=3, backend="torch")
    ref_s, ref_i = _brute_knn(q, g, 4)
    assert idx.dtype == torch.int64 and scores.shape == (7, 4)
    np.testing.assert_array_equal(idx.numpy(), ref_i)
    np.testing.assert_allclose(scores.numpy(), ref_s, rtol=1e-5, atol=1e-6)


def test_knn_exclude_self() -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(11, 4))
    plain = knn(torch.from_numpy(x), torch.from_numpy(x), 1, backend="torch")[1][:, 0]
    assert torch.equal(plain, torch.arange(11)), "without exclusion every item finds itself first"
    _, idx = knn(torch.from_numpy(x), torch.from_numpy(x), 10, exclude_self=True, batch_size=4, backend="torch")
    assert not (idx == torch.arange(11)[:, None]).any()
    np.testing.assert_array_equal(idx.numpy(), _brute_knn(x, x, 10, exclude_self=True)[1])
    with pytest.raises(ValueError, match="k=11"):
        knn(torch.from_numpy(x), torch.from_numpy(x), 11, exclude_self=True)
    with pytest.raises(ValueError, match="Q=3"):
        knn(torch.from_numpy(x[:3]), torch.from_numpy(x), 2, exclude_self=True)
    with pytest.raises(ValueError, match="backend"):
        knn(torch.from_numpy(x), torch.from_numpy(x), 2, backend="annoy")


@pytest.mark.skipif(not faiss_available(), reason="faiss not installed")
def test_knn_faiss_backend_matches_torch() -> None:
    x = torch.randn(30, 6, generator=torch.Generator().manual_seed(2))
    for exclude in (False, True):
        s_t, i_t = knn(x, x, 5, exclude_self=exclude, backend="torch")
        s_f, i_f = knn(x, x, 5, exclude_self=exclude, backend="faiss")
        assert torch.equal(i_t, i_f)
        torch.testing.assert_close(s_t, s_f, rtol=1e-5, atol=1e-5)
    m_t = retrieval_metrics(x, torch.arange(30) % 4, backend="torch")
    m_f = retrieval_metrics(x, torch.arange(30) % 4, backend="faiss")
    assert m_t == pytest.approx(m_f)


def test_retrieval_metrics_hand_example() -> None:
    # 2-D unit vectors at these angles from the query (0 degrees); labels: same, other, same, same, other.
    angles = torch.tensor([10.0, 20.0, 30.0, 40.0, 50.0]).deg2rad()
    gallery = torch.stack([angles.cos(), angles.sin()], dim=1)
    query = torch.tensor([[1.0, 0.0]])
    m = retrieval_metrics(query, torch.tensor([7]), gallery, torch.tensor([7, 1, 7, 7, 1]), ks=(1, 2))
    # R = 3; top-3 relevance 1,0,1 -> AP@R = (1/1 + 2/3) / 3 = 5/9.
    assert m == pytest.approx({"R@1": 1.0, "R@2": 1.0, "mAP@R": 5 / 9})


@pytest.mark.parametrize("loo", [False, True])
def test_retrieval_metrics_match_brute_force(loo: bool) -> None:
    rng = np.random.default_rng(3)
    q, ql = rng.normal(size=(40, 4)), rng.integers(0, 3, size=40)
    if loo:
        g, gl = q, ql
    else:
        g, gl = rng.normal(size=(50, 4)), rng.integers(0, 3, size=50)
        ql[0] = 9  # a label absent from the gallery: that query is skipped
    ks = (1, 5, 10)
    got = retrieval_metrics(torch.from_numpy(q), torch.from_numpy(ql),
                            None if loo else torch.from_numpy(g), None if loo else torch.from_numpy(gl),
                            ks=ks, batch_size=7, backend="torch")
    expected = _brute_metrics(q, ql, g, gl, ks, loo)
    assert set(got) == {"R@1", "R@5", "R@10", "mAP@R"}
    assert got == pytest.approx(expected, abs=1e-9)
    assert 0.0 < got["mAP@R"] < 1.0


def test_retrieval_metrics_leave_one_out_excludes_self() -> None:
    x = torch.randn(8, 3, generator=torch.Generator().manual_seed(4))
    labels = torch.arange(8)  # every item its own class: with self excluded nothing can be found
    with pytest.raises(ValueError, match="no query"):
        retrieval_metrics(x, labels)
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    far = torch.cat([x[:1], -x[:1] * 5, x[2:]])  # move item 1 far from item 0 (its only positive)
    m = retrieval_metrics(far, labels, ks=(7,))
    assert m["R@7"] == 1.0  # with 7 others every query retrieves its positive, never itself
    with pytest.raises(ValueError, match="gallery_labels"):
        retrieval_metrics(x, labels, x)


# --------------------------------------------------------------------------------------------------------- index
@pytest.mark.parametrize("suffix", [".npz", ".safetensors"])
def test_index_roundtrip_and_search(tmp_path, suffix: str) -> None:
    rng = np.random.default_rng(5)
    emb = rng.normal(size=(12, 4)).astype(np.float32)
    ids = [f"img_{i:03d}" for i in range(12)]
    index = EmbeddingIndex(torch.from_numpy(emb), ids, {"model": "resnet10t.test", "embedding_dim": 4})
    path = index.save(tmp_path / f"gallery{suffix}")
    loaded = EmbeddingIndex.load(path, expected_dim=4)
    assert loaded.ids == ids and loaded.meta == {"model": "resnet10t.test", "embedding_dim": 4}
    torch.testing.assert_close(loaded.embeddings, index.embeddings)
    queries = rng.normal(size=(3, 4)).astype(np.float32)
    results = loaded.search(torch.from_numpy(queries), k=3)
    ref_s, ref_i = _brute_knn(queries.astype(np.float64), emb.astype(np.float64), 3)
    assert [[i for i, _ in row] for row in results] == [[ids[j] for j in row] for row in ref_i]
    np.testing.assert_allclose([[s for _, s in row] for row in results], ref_s, rtol=1e-5, atol=1e-6)
    single = loaded.search(torch.from_numpy(queries[0]), k=50)
    assert len(single) == 1 and len(single[0]) == 12  # k clipped to the index size
    with pytest.raises(ValueError, match="4-d but 5-d"):
        EmbeddingIndex.load(path, expected_dim=5)
    with pytest.raises(ValueError, match=r"\(Q, 4\)"):
        loaded.search(torch.randn(2, 5), k=1)


def test_index_refuses_bad_files(tmp_path) -> None:
    bad = tmp_path / "bad.npz"
    np.savez(bad, embeddings=np.zeros((3, 4), np.float32), ids=np.array(["a", "b"]), meta=np.array("{}"))
    with pytest.raises(ValueError, match="3 embedding rows but 2 ids"):
        EmbeddingIndex.load(bad)
    pickled = tmp_path / "pickled.npz"
    np.savez(pickled, embeddings=np.zeros((1, 4), np.float32), ids=np.array([{"x": 1}], dtype=object),
             meta=np.array(json.dumps({})))
    with pytest.raises(ValueError, match="pickle"):
        EmbeddingIndex.load(pickled)
    with pytest.raises(ValueError, match="missing arrays"):
        np.savez(tmp_path / "other.npz", x=np.zeros(2))
        EmbeddingIndex.load(tmp_path / "other.npz")
    with pytest.raises(ValueError, match="suffix"):
        EmbeddingIndex(torch.zeros(1, 2), ["a"]).save(tmp_path / "index.pt")
    with pytest.raises(ValueError, match="one id per row"):
        EmbeddingIndex(torch.zeros(2, 2), ["a"])


def test_index_add_and_empty() -> None:
    index = EmbeddingIndex(torch.zeros(0, 3), [], {})
    assert index.search(torch.randn(2, 3), k=2) == [[], []]
    index.add(torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]), ["x", "y"])
    (best,) = index.search(torch.tensor([0.1, 1.0, 0.0]), k=1)
    assert best[0][0] == "y" and best[0][1] == pytest.approx(1.0 / math.sqrt(1.01))
    with pytest.raises(ValueError, match="4-d embeddings to a 3-d index"):
        index.add(torch.randn(1, 4), ["z"])


# ---------------------------------------------------------------------------------------------------- serving path
def test_serving_modules_import_light() -> None:
    code = ("import sys, zoo.heads.embedding, zoo.metrics.retrieval, zoo.similarity_index, zoo.losses; "
            "bad = [m for m in ('pytorch_metric_learning', 'lightning', 'pytorch_lightning', 'hydra', 'omegaconf', "
            "'albumentations', 'pycocotools', 'torchmetrics', 'faiss') if m in sys.modules]; print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
