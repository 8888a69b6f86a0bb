"""FAISS indexes over zoo embeddings (zoo.faiss_index): recall against exact search for every index type, the save /
load round trip, the model check, building from several embedding part files, and faiss staying optional."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

faiss = pytest.importorskip("faiss")

from zoo.faiss_index import INDEX_TYPES, FaissIndex, default_params, load_index  # noqa: E402
from zoo.similarity_index import EmbeddingIndex  # noqa: E402

N, DIM, CLUSTERS, QUERIES = 4000, 32, 40, 200
#: recall@10 against exact search that each type must reach on the clustered set below, with default parameters
#: (IVF-PQ stores 8 bytes a vector here, 16x less than the float32 vectors, and ranks by approximate scores)
RECALL_FLOOR = {"flat": 0.999, "ivf": 0.9, "hnsw": 0.9, "ivfpq": 0.5}
MODEL = {"model": "test_resnet.shapes_sim", "weights_sha256": "a" * 64, "head": "emb"}


def clustered(n: int, dim: int, clusters: int, seed: int) -> torch.Tensor:
    """Points around random centres (a Gaussian mixture; noise as large as the centres), L2-normalised."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(clusters, dim, generator=g)
    labels = torch.randint(0, clusters, (n,), generator=g)
    return torch.nn.functional.normalize(centres[labels] + torch.randn(n, dim, generator=g), dim=1)


@pytest.fixture(scope="module")
def data() -> dict:
    x = clustered(N + QUERIES, DIM, CLUSTERS, seed=0)
    exact = EmbeddingIndex(x[:N], [f"img{i:05d}" for i in range(N)], dict(MODEL))
    return {"exact": exact, "queries": x[N:]}


def recall_at_10(approx: list, exact: list) -> float:
    return float(np.mean([len({i for i, _ in a} & {i for i, _ in e}) / 10 for a, e in zip(approx, exact)]))


@pytest.fixture(scope="module")
def built(data: dict) -> dict:
    return {kind: data["exact"].to_faiss(kind, threads=1) for kind in INDEX_TYPES}


@pytest.mark.parametrize("kind", INDEX_TYPES)
def test_recall_at_10_against_exact_search(data: dict, built: dict, kind: str) -> None:
    exact = data["exact"].search(data["queries"], k=10)
    approx = built[kind].search(data["queries"], k=10)
    r = recall_at_10(approx, exact)
    assert r >= RECALL_FLOOR[kind], f"{kind}: recall@10 {r:.3f} < {RECALL_FLOOR[kind]} ({built[kind]!r})"
    # the same answer format as the exact index: (id, cosine similarity) by decreasing similarity
    assert all(isinstance(i, str) and isinstance(s, float) for row in approx for i, s in row)
    assert all(len(row) == 10 and [s for _, s in row] == sorted((s for _, s in row), reverse=True) for row in approx)
    if kind != "ivfpq":  # full vectors: the scores are the exact cosine similarities of the ids found
        ex = dict(exact[0])
        for i, s in approx[0]:
            if i in ex:
                assert s == pytest.approx(ex[i], abs=1e-5)


def test_search_parameters_trade_recall(data: dict, built: dict) -> None:
    exact = data["exact"].search(data["queries"], k=10)
    ivf, hnsw = built["ivf"], built["hnsw"]
    low = recall_at_10(ivf.search(data["queries"], 10, nprobe=1), exact)
    high = recall_at_10(ivf.search(data["queries"], 10, nprobe=ivf.params["nlist"]), exact)
    assert low < high and high >= 0.999  # every list scanned: exact
    assert recall_at_10(hnsw.search(data["queries"], 10, ef_search=256), exact) >= \
        recall_at_10(hnsw.search(data["queries"], 10, ef_search=10), exact)
    assert ivf.search(data["queries"][0], k=3)[0] == ivf.search(data["queries"][:1], k=3)[0]  # (D,) query


@pytest.mark.parametrize("kind", INDEX_TYPES)
def test_save_load_round_trip_gives_identical_results(data: dict, built: dict, kind: str, tmp_path: Path) -> None:
    index = built[kind]
    path = index.save(tmp_path / f"gallery_{kind}")
    assert path.name == f"gallery_{kind}.faiss" and path.with_name(path.name + ".json").is_file()
    side = json.loads(path.with_name(path.name + ".json").read_text())
    assert side["format"] == "zoo.faiss_index/1" and side["index_type"] == kind and side["dim"] == DIM
    assert side["metric"] == "inner_product" and side["ids"] == data["exact"].ids
    assert side["model"] == MODEL["model"] and side["weights_sha256"] == MODEL["weights_sha256"]
    assert side["params"] == index.params
    again = load_index(path)
    assert isinstance(again, FaissIndex) and again.kind == kind and again.params == index.params
    assert again.search(data["queries"], k=10) == index.search(data["queries"], k=10)
    assert load_index(path.with_name(path.name + ".json")).ids == index.ids  # the sidecar's path works too


def test_load_index_opens_the_exact_index_too(data: dict, tmp_path: Path) -> None:
    p = data["exact"].save(tmp_path / "exact.npz")
    again = load_index(p)
    assert isinstance(again, EmbeddingIndex) and again.ids == data["exact"].ids


def test_a_mismatched_model_is_refused_naming_both(built: dict, tmp_path: Path) -> None:
    path = built["ivf"].save(tmp_path / "g")
    with pytest.raises(ValueError, match=r"test_resnet\.shapes_sim.*other_model"):
        FaissIndex.load(path, model="other_model", digest="b" * 64)
    FaissIndex.load(path, model=MODEL["model"], digest=MODEL["weights_sha256"])  # the same model: fine
    with pytest.raises(ValueError, match="other_model"):
        built["hnsw"].check_model("other_model", "c" * 64)


def test_built_from_part_files(data: dict, tmp_path: Path) -> None:
    exact = data["exact"]
    cut = 1500
    parts = [EmbeddingIndex(exact.embeddings[:cut], exact.ids[:cut], dict(MODEL)).save(tmp_path / "part-0000.npz"),
             EmbeddingIndex(exact.embeddings[cut:], exact.ids[cut:], dict(MODEL)).save(
                 tmp_path / "part-0001.safetensors")]
    merged = FaissIndex.build(parts, "flat")
    assert merged.ids == exact.ids and merged.meta["model"] == MODEL["model"]
    got, want = merged.search(data["queries"], k=5), exact.to_faiss("flat").search(data["queries"], k=5)
    assert [[i for i, _ in row] for row in got] == [[i for i, _ in row] for row in want]
    np.testing.assert_allclose([[s for _, s in row] for row in got], [[s for _, s in row] for row in want], atol=1e-6)
    ivf = FaissIndex.build(parts, "ivf", nlist=16, nprobe=16, threads=1)  # trained on a sample of both parts
    assert recall_at_10(ivf.search(data["queries"], 10), exact.search(data["queries"], 10)) >= 0.999

    other = EmbeddingIndex(exact.embeddings[:10], [f"x{i}" for i in range(10)],
                           {"model": "another", "weights_sha256": "d" * 64}).save(tmp_path / "other.npz")
    with pytest.raises(ValueError, match="another"):
        FaissIndex.build([parts[0], other], "flat")
    with pytest.raises(ValueError, match="img00000"):
        FaissIndex.build([parts[0], parts[0]], "flat")  # the same rows twice
    small = EmbeddingIndex(torch.randn(4, 8), list("abcd"), dict(MODEL)).save(tmp_path / "small.npz")
    with pytest.raises(ValueError, match="8-d"):
        FaissIndex.build([parts[0], small], "flat")


def test_default_parameters_scale_with_the_collection() -> None:
    assert default_params("ivf", 100_000, 128) == {"nlist": 1024, "nprobe": 16}
    assert default_params("ivf", 1_000_000, 128)["nlist"] == 4096
    assert default_params("ivf", 1_000_000_000, 128) == {"nlist": 131072, "nprobe": 256}
    assert default_params("ivfpq", 1_000_000, 128) == {"nlist": 4096, "nprobe": 64, "m": 32, "nbits": 8}
    assert default_params("ivfpq", 2000, 96)["nbits"] == 5  # 51 training points a centroid: 32 centroids
    assert default_params("hnsw", 10, 4) == {"hnsw_m": 32, "ef_construction": 40, "ef_search": 64}
    assert default_params("ivf", 100, 8)["nlist"] == 2  # never fewer than 39 training points a list
    with pytest.raises(ValueError, match="annoy"):
        default_params("annoy", 10, 4)
    with pytest.raises(ValueError, match="nprobe"):
        FaissIndex.build(EmbeddingIndex(torch.randn(50, 8), [str(i) for i in range(50)]), "hnsw", nprobe=4)


def test_faiss_is_not_imported_by_the_exact_index() -> None:
    code = ("import sys, zoo.similarity_index, zoo.faiss_index, zoo.metrics.retrieval; "
            "print('faiss' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "False"


def test_command_line_builds_searches_and_refuses_another_model(data: dict, tmp_path: Path, capsys) -> None:
    from zoo.faiss_index import main

    exact = data["exact"]
    parts = tmp_path / "parts"
    EmbeddingIndex(exact.embeddings[:2000], exact.ids[:2000], dict(MODEL)).save(parts / "part-0000.npz")
    EmbeddingIndex(exact.embeddings[2000:], exact.ids[2000:], dict(MODEL)).save(parts / "part-0001.npz")
    queries = EmbeddingIndex(data["queries"][:3], ["q0", "q1", "q2"], dict(MODEL)).save(tmp_path / "q.npz")
    assert main(["build", str(parts), "--type", "hnsw", "--out", str(tmp_path / "g.faiss"), "--threads", "1"]) == 0
    capsys.readouterr()
    assert main(["search", str(tmp_path / "g.faiss"), str(queries), "-k", "4"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [x["query"] for x in lines] == ["q0", "q1", "q2"] and all(len(x["results"]) == 4 for x in lines)
    assert [i for i, _ in lines[0]["results"]] == [i for i, _ in exact.search(data["queries"][0], 4)[0]]
    other = EmbeddingIndex(data["queries"][:1], ["q"], {"model": "other", "weights_sha256": "e" * 64}).save(
        tmp_path / "other.npz")
    assert main(["search", str(tmp_path / "g.faiss"), str(other)]) == 2
    assert "other" in capsys.readouterr().err
    assert main(["info", str(tmp_path / "g.faiss")]) == 0
    assert json.loads(capsys.readouterr().out)["index_type"] == "hnsw"


def test_builds_and_searches_with_threads_leave_torch_threads_alone(data: dict, tmp_path: Path) -> None:
    """FAISS's OpenMP thread count is the whole process's and torch's intra-op threads read it: an index built or
    searched with threads=1 must put it back (left at 1, every later torch op in the process ran on one core)."""
    prev = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        idx = data["exact"].to_faiss("ivf", threads=1)
        assert torch.get_num_threads() == 2
        idx.save(tmp_path / "ix")
        loaded = FaissIndex.load(tmp_path / "ix", threads=1)
        assert loaded.search(data["queries"][:3], k=5) == idx.search(data["queries"][:3], k=5)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(prev)
