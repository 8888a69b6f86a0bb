"""zoo.hub: bundle format round trip and integrity, safe checkpoint loading, downloads with cache and offline mode,
the named-checkpoint registry and resolve()."""

from __future__ import annotations

import functools
import http.server
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from zoo.hub import registry as registry_mod
from zoo.hub.bundle import (
    FORMAT_VERSION,
    BundleError,
    BundleIntegrityError,
    BundleVersionError,
    CheckpointLoadError,
    read_bundle,
    read_lightning_checkpoint,
    save_bundle,
    sha256_file,
)
from zoo.hub.download import DownloadError, OfflineError, cache_dir, download_file, offline
from zoo.hub.registry import RegistryEntry, UnknownModelError, entry_from_bundle, get_entry, list_models, register, resolve

ROOT = Path(__file__).resolve().parents[1]

# Checksum over names, dtypes, shapes and raw bytes; run in this process and in a fresh interpreter.
CHECKSUM_SRC = """
import hashlib
def state_checksum(sd):
    h = hashlib.sha256()
    for k in sorted(sd):
        t = sd[k].detach().cpu().contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()
"""
_ns: dict = {"torch": torch}
exec(CHECKSUM_SRC, _ns)
state_checksum = _ns["state_checksum"]


class NotPlain:
    """A custom class: pickled into a checkpoint, weights_only loading must refuse it."""

    def __init__(self) -> None:
        self.x = 1


@pytest.fixture(autouse=True)
def _env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ZOO_HOME", str(tmp_path / "zoo_home"))
    monkeypatch.delenv("ZOO_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)


@pytest.fixture
def empty_registry(monkeypatch: pytest.MonkeyPatch) -> dict:
    entries: dict = {}
    monkeypatch.setattr(registry_mod, "_ENTRIES", entries)
    return entries


def make_state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(4, 6, generator=g)
    return {
        "backbone.conv.weight": torch.randn(3, 2, 3, 3, generator=g),
        "head.fc.weight": w.t(),  # non-contiguous
        "head.fc.bias": torch.randn(6, generator=g).half(),
        "head.scale": torch.tensor([1.5, -2.0]).to(torch.bfloat16),
        "bn.num_batches_tracked": torch.tensor(7, dtype=torch.int64),
        "mask": torch.tensor([True, False, True]),
        "empty": torch.zeros(0, 3),
    }


META = {
    "spec": {"backbone": "resnet10t", "heads": {"cls": {"num_classes": 3}}, "input_size": [64, 64]},
    "classes": ["circle", "square", "triangle"],
    "metrics": {"val/top1": 0.75},
    "note": "ünïcode ok",
}


def write_bundle(folder: Path) -> tuple[dict[str, torch.Tensor], Path]:
    sd = make_state()
    return sd, save_bundle(folder, sd, META)


# ----------------------------------------------------------------------------------------------------- bundle


def test_round_trip_tensors_and_meta(tmp_path: Path) -> None:
    sd, folder = write_bundle(tmp_path / "b")
    assert folder == tmp_path / "b"
    assert sorted(p.name for p in folder.iterdir()) == ["model.json", "model.safetensors"]  # no temp files left
    for src in (folder, folder / "model.json", folder / "model.safetensors"):
        loaded, meta = read_bundle(src, map_location=torch.device("cpu"))
        assert set(loaded) == set(sd)
        for k, t in sd.items():
            assert loaded[k].dtype == t.dtype and loaded[k].shape == t.shape, k
            assert torch.equal(loaded[k], t), k
        assert {k: meta[k] for k in META} == META
        assert meta["format_version"] == FORMAT_VERSION
        w = meta["weights"]
        assert w["file"] == "model.safetensors"
        assert w["sha256"] == sha256_file(folder / "model.safetensors")
        assert w["bytes"] == (folder / "model.safetensors").stat().st_size
    assert state_checksum(loaded) == state_checksum(sd)
    text = (folder / "model.json").read_text(encoding="utf-8")
    assert text == json.dumps(json.loads(text), sort_keys=True, indent=2) + "\n"


def test_rewrite_replaces_bundle(tmp_path: Path) -> None:
    save_bundle(tmp_path, {"a": torch.ones(2)}, {"v": 1})
    save_bundle(tmp_path, {"b": torch.zeros(3)}, {"v": 2})
    sd, meta = read_bundle(tmp_path)
    assert list(sd) == ["b"] and meta["v"] == 2


def test_subprocess_reads_bundle_with_same_checksum(tmp_path: Path) -> None:
    sd, folder = write_bundle(tmp_path / "b")
    code = (
        "import sys, torch\n"
        + CHECKSUM_SRC
        + "from zoo.hub import read_bundle\n"
        "sd, meta = read_bundle(sys.argv[1])\n"
        "print(state_checksum(sd), meta['classes'][2])\n"
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run(
        [sys.executable, "-c", code, str(folder)], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [state_checksum(sd), "triangle"]


def test_flipped_byte_is_integrity_error(tmp_path: Path) -> None:
    _, folder = write_bundle(tmp_path)
    weights = folder / "model.safetensors"
    expected = sha256_file(weights)
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))
    with pytest.raises(BundleIntegrityError) as err:
        read_bundle(folder)
    msg = str(err.value)
    assert str(weights) in msg and expected in msg and sha256_file(weights) in msg and "download" in msg


def test_truncated_weights_is_error(tmp_path: Path) -> None:
    _, folder = write_bundle(tmp_path)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-40])
    with pytest.raises(BundleIntegrityError, match="size"):
        read_bundle(folder)
    with pytest.raises(BundleIntegrityError, match="not a readable safetensors"):
        read_bundle(folder, verify=False)


def test_newer_format_is_version_error(tmp_path: Path) -> None:
    _, folder = write_bundle(tmp_path)
    meta = json.loads((folder / "model.json").read_text())
    meta["format_version"] = FORMAT_VERSION + 1
    (folder / "model.json").write_text(json.dumps(meta))
    with pytest.raises(BundleVersionError, match=rf"bundle format {FORMAT_VERSION + 1} is newer than this zoo supports \({FORMAT_VERSION}\): upgrade zoo"):
        read_bundle(folder)


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda m: m.pop("format_version"), "format_version"),
        (lambda m: m["weights"].update(file="../../etc/passwd"), "plain file name"),
        (lambda m: m.pop("weights"), "'weights'"),
    ],
)
def test_malformed_meta_is_bundle_error(tmp_path: Path, edit, match: str) -> None:
    _, folder = write_bundle(tmp_path)
    meta = json.loads((folder / "model.json").read_text())
    edit(meta)
    (folder / "model.json").write_text(json.dumps(meta))
    with pytest.raises(BundleError, match=match):
        read_bundle(folder)


def test_shared_storage_tensors_are_saved(tmp_path: Path) -> None:
    emb = torch.randn(5, 4)
    big = torch.arange(12.0).reshape(3, 4)
    sd = {"embed.weight": emb, "lm_head.weight": emb, "rows.0": big[0], "rows.1": big[1], "all": big}
    save_bundle(tmp_path, sd, {})
    loaded, _ = read_bundle(tmp_path)
    for k, t in sd.items():
        assert torch.equal(loaded[k], t), k
    loaded["embed.weight"].zero_()  # independent copies after loading
    assert torch.equal(loaded["lm_head.weight"], emb)
    assert emb.abs().sum() > 0  # the caller's tensors were not modified


def test_missing_files_name_the_path(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nowhere"):
        read_bundle(tmp_path / "nowhere")
    _, folder = write_bundle(tmp_path / "b")
    (folder / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        read_bundle(folder)
    (folder / "model.json").unlink()
    with pytest.raises(FileNotFoundError, match="model.json"):
        read_bundle(folder)


def test_bad_inputs_to_save(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match=r"meta\['spec'\]\['fn'\]"):
        save_bundle(tmp_path, {"a": torch.ones(1)}, {"spec": {"fn": print}})
    with pytest.raises(TypeError, match="not a torch.Tensor"):
        save_bundle(tmp_path, {"a": [1, 2]}, {})  # type: ignore[dict-item]
    assert not (tmp_path / "model.json").exists()


def test_lightning_checkpoint_safe_load(tmp_path: Path) -> None:
    plain = tmp_path / "plain.ckpt"
    torch.save({"state_dict": {"w": torch.ones(2)}, "epoch": 3, "hyper_parameters": {"lr": 0.1}}, plain)
    ckpt = read_lightning_checkpoint(plain)
    assert ckpt["epoch"] == 3 and torch.equal(ckpt["state_dict"]["w"], torch.ones(2))

    unsafe = tmp_path / "unsafe.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"obj": NotPlain()}}, unsafe)
    with pytest.raises(CheckpointLoadError, match="NotPlain") as err:
        read_lightning_checkpoint(unsafe)
    assert "save_hyperparameters" in str(err.value) and str(unsafe) in str(err.value)
    with pytest.raises(FileNotFoundError, match="missing.ckpt"):
        read_lightning_checkpoint(tmp_path / "missing.ckpt")


# ------------------------------------------------------------------------------------------------- download


class _CountingHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args) -> None:  # keep test output quiet
        pass

    def do_GET(self) -> None:
        self.server.hits.append(self.path)  # type: ignore[attr-defined]
        super().do_GET()


@pytest.fixture
def http_root(tmp_path: Path) -> Iterator[tuple[str, Path, list[str]]]:
    """A local HTTP server on 127.0.0.1 (ephemeral port) serving a temporary folder; yields (base URL, folder, hits)."""
    root = tmp_path / "served"
    root.mkdir()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_CountingHandler, directory=str(root)))
    server.hits = []  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/", root, server.hits  # type: ignore[attr-defined]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_cache_dir_and_offline_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert cache_dir() == tmp_path / "zoo_home"
    monkeypatch.delenv("ZOO_HOME")
    assert cache_dir() == Path.home() / ".cache" / "zoo" / "hub"
    assert not offline()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert offline()
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("ZOO_OFFLINE", "0")
    assert not offline()
    monkeypatch.setenv("ZOO_OFFLINE", "1")
    assert offline()


def test_download_file_url_verifies_and_caches(tmp_path: Path) -> None:
    src = tmp_path / "src" / "w.bin"
    src.parent.mkdir()
    src.write_bytes(os.urandom(3000))
    digest = sha256_file(src)
    dest_dir = cache_dir() / "files"
    got = download_file(src.as_uri(), digest, dest_dir, progress=False)
    assert got == dest_dir / "w.bin" and got.read_bytes() == src.read_bytes()
    src.unlink()  # cached copy is reused without reading the source again
    assert download_file(src.as_uri(), digest, dest_dir, progress=False) == got

    other = tmp_path / "src" / "x.bin"
    other.write_bytes(b"abc")
    with pytest.raises(BundleIntegrityError, match="sha256 mismatch"):
        download_file(other.as_uri(), "0" * 64, dest_dir, progress=False)
    assert sorted(p.name for p in dest_dir.iterdir()) == ["w.bin"]  # no partial or wrong file kept
    with pytest.raises(FileNotFoundError, match="nope.bin"):
        download_file((tmp_path / "nope.bin").as_uri(), digest, dest_dir, progress=False)


def test_download_http_and_cached_reuse(http_root, capsys: pytest.CaptureFixture[str]) -> None:
    base, root, hits = http_root
    payload = os.urandom(5000)
    (root / "model.safetensors").write_bytes(payload)
    digest = sha256_file(root / "model.safetensors")
    dest_dir = cache_dir() / "dl"
    got = download_file(base + "model.safetensors", digest, dest_dir, filename="w.safetensors", progress=True)
    assert got == dest_dir / "w.safetensors" and got.read_bytes() == payload
    assert hits == ["/model.safetensors"]
    assert "Downloading" in capsys.readouterr().err
    assert download_file(base + "model.safetensors", digest, dest_dir, filename="w.safetensors", progress=False) == got
    assert hits == ["/model.safetensors"]  # no second fetch

    with pytest.raises(DownloadError, match="HTTP 404"):
        download_file(base + "missing.bin", digest, dest_dir, progress=False)


def test_offline_refuses_uncached_url(http_root, monkeypatch: pytest.MonkeyPatch) -> None:
    base, root, hits = http_root
    (root / "f.bin").write_bytes(b"hello")
    digest = sha256_file(root / "f.bin")
    dest_dir = cache_dir() / "dl"
    for var in ("ZOO_OFFLINE", "HF_HUB_OFFLINE"):
        monkeypatch.setenv(var, "1")
        with pytest.raises(OfflineError) as err:
            download_file(base + "f.bin", digest, dest_dir, progress=False)
        msg = str(err.value)
        assert var in msg and str(dest_dir / "f.bin") in msg and "network" in msg
        monkeypatch.delenv(var)
    assert hits == []
    download_file(base + "f.bin", digest, dest_dir, progress=False)
    monkeypatch.setenv("ZOO_OFFLINE", "1")
    assert download_file(base + "f.bin", digest, dest_dir, progress=False).read_bytes() == b"hello"
    assert hits == ["/f.bin"]


def test_hf_hub_without_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch, empty_registry) -> None:
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    with pytest.raises(ImportError, match="pip install huggingface_hub"):
        resolve("hf-hub:someorg/somemodel")


def test_hf_hub_offline_uses_cache_only(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("huggingface_hub")
    monkeypatch.setenv("ZOO_OFFLINE", "1")
    with pytest.raises(OfflineError, match="huggingface"):
        resolve("hf-hub:someorg/not-cached@main")
    with pytest.raises(ValueError, match="org/name"):
        resolve("hf-hub:no-slash")


# ------------------------------------------------------------------------------------------------- registry


def _entry(name: str, task: str, url: str = "pkg:hub/weights/x") -> RegistryEntry:
    return RegistryEntry(name=name, task=task, url=url, sha256="a" * 64, json_sha256="b" * 64, recipe="python train.py")


def test_list_models_wildcard_and_task(empty_registry) -> None:
    for name, task in [
        ("resnet10t.shapes_cls", "classification"),
        ("resnet10t.shapes_det", "detection"),
        ("vit_tiny.coco_det", "detection"),
        ("resnet18.coco_seg", "segmentation"),
    ]:
        register(_entry(name, task))
    assert list_models() == ["resnet10t.shapes_cls", "resnet10t.shapes_det", "resnet18.coco_seg", "vit_tiny.coco_det"]
    assert list_models("resnet*") == ["resnet10t.shapes_cls", "resnet10t.shapes_det", "resnet18.coco_seg"]
    assert list_models("*_DET") == ["resnet10t.shapes_det", "vit_tiny.coco_det"]
    assert list_models(task="detection") == ["resnet10t.shapes_det", "vit_tiny.coco_det"]
    assert list_models("resnet*", task="detection") == ["resnet10t.shapes_det"]
    assert list_models(task="similarity") == []
    with pytest.raises(ValueError, match="already registered"):
        register(_entry("resnet18.coco_seg", "detection"))
    register(_entry("resnet18.coco_seg", "detection"), overwrite=True)
    assert get_entry("resnet18.coco_seg").task == "detection"


def test_unknown_name_lists_suggestions(empty_registry) -> None:
    register(_entry("resnet10t.shapes_cls", "classification"))
    register(_entry("resnet10t.shapes_det", "detection"))
    with pytest.raises(KeyError) as err:
        get_entry("resnet10t.shape_cls")
    assert isinstance(err.value, UnknownModelError)
    assert "resnet10t.shapes_cls" in str(err.value) and "list_models" in str(err.value)
    with pytest.raises(UnknownModelError, match="resnet10t.shapes_det"):
        resolve("resnet10t.shapes_dett")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"name": "noarchtag"}, "arch.tag"),
        ({"sha256": "xyz"}, "sha256"),
        ({"url": "ftp://host/x"}, "url"),
    ],
)
def test_bad_registry_entries(kwargs: dict, match: str) -> None:
    base = dict(name="a.b", task="classification", url="pkg:x", sha256="a" * 64, json_sha256="b" * 64)
    with pytest.raises(ValueError, match=match):
        RegistryEntry(**{**base, **kwargs})
    with pytest.raises(ValueError, match="unknown keys"):
        RegistryEntry.from_dict({**base, "extra": 1})


def test_resolve_registered_pkg_bundle(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, empty_registry) -> None:
    pkg_root = tmp_path / "fake_pkg"
    monkeypatch.setattr(registry_mod, "_PACKAGE_ROOT", pkg_root)
    sd, folder = write_bundle(pkg_root / "hub" / "weights" / "resnet10t.shapes_cls")
    entry = register(
        entry_from_bundle("resnet10t.shapes_cls", "classification", "pkg:hub/weights/resnet10t.shapes_cls", folder)
    )
    assert entry.metrics == META["metrics"] and entry.sha256 == sha256_file(folder / "model.safetensors")
    assert resolve("resnet10t.shapes_cls") == folder
    loaded, _ = read_bundle(resolve("resnet10t.shapes_cls"))
    assert state_checksum(loaded) == state_checksum(sd)

    register(RegistryEntry(**{**entry.to_dict(), "name": "resnet10t.stale", "sha256": "c" * 64}))
    with pytest.raises(BundleIntegrityError, match="registry"):
        resolve("resnet10t.stale")
    register(RegistryEntry(**{**entry.to_dict(), "name": "resnet10t.escape", "url": "pkg:../outside"}))
    with pytest.raises(ValueError, match="relative path inside the zoo package"):
        resolve("resnet10t.escape")


@pytest.mark.parametrize("scheme", ["file", "http"])
def test_resolve_registered_url_downloads_and_verifies(scheme: str, http_root, empty_registry) -> None:
    base, root, hits = http_root
    sd, folder = write_bundle(root / "resnet10t.shapes_det")
    url = base + "resnet10t.shapes_det" if scheme == "http" else folder.as_uri()
    register(entry_from_bundle("resnet10t.shapes_det", "detection", url, folder))
    local = resolve("resnet10t.shapes_det", progress=False)
    assert local == cache_dir() / "models" / "resnet10t.shapes_det"
    loaded, meta = read_bundle(local)
    assert state_checksum(loaded) == state_checksum(sd) and meta["classes"] == META["classes"]
    n = len(hits)
    assert resolve("resnet10t.shapes_det", progress=False) == local
    assert len(hits) == n  # cached: nothing fetched again
    if scheme == "http":
        assert sorted(hits) == ["/resnet10t.shapes_det/model.json", "/resnet10t.shapes_det/model.safetensors"]


def test_resolve_registered_url_with_tampered_source(http_root, empty_registry) -> None:
    base, root, _ = http_root
    _, folder = write_bundle(root / "m")
    entry = register(entry_from_bundle("resnet10t.m", "classification", base + "m/", folder))
    save_bundle(folder, {"other": torch.ones(1)}, META)  # published files no longer match the registry
    with pytest.raises(BundleIntegrityError, match=entry.json_sha256):
        resolve("resnet10t.m", progress=False)
    assert not (cache_dir() / "models" / "resnet10t.m" / "model.json").exists()


def test_resolve_offline_registered_uncached(http_root, monkeypatch: pytest.MonkeyPatch, empty_registry) -> None:
    base, root, hits = http_root
    _, folder = write_bundle(root / "m")
    register(entry_from_bundle("resnet10t.m", "classification", base + "m", folder))
    monkeypatch.setenv("ZOO_OFFLINE", "1")
    with pytest.raises(OfflineError, match=str(cache_dir() / "models" / "resnet10t.m")):
        resolve("resnet10t.m", progress=False)
    assert hits == []


def test_resolve_paths_and_bare_urls(tmp_path: Path, http_root) -> None:
    base, root, _ = http_root
    sd, folder = write_bundle(root / "bare")
    assert resolve(folder) == folder
    assert resolve(str(folder / "model.json")) == folder
    assert resolve(folder / "model.safetensors") == folder
    with pytest.raises(FileNotFoundError, match="missing_bundle"):
        resolve(tmp_path / "missing_bundle")
    for url in (base + "bare/model.json", base + "bare"):
        local = resolve(url, progress=False)
        assert local.parent == cache_dir() / "urls"
        loaded, _ = read_bundle(local)
        assert state_checksum(loaded) == state_checksum(sd)


def test_shipped_registry_is_valid() -> None:
    entries = registry_mod._load_file(registry_mod.REGISTRY_FILE)
    raw = json.loads(registry_mod.REGISTRY_FILE.read_text())
    assert raw["format_version"] == FORMAT_VERSION and len(entries) == len(raw["models"])
    for entry in entries.values():
        if entry.url.startswith("pkg:"):  # checkpoints shipped in the package must be present and match
            loaded, meta = read_bundle(registry_mod._resolve_entry(entry, progress=False))
            assert meta["weights"]["sha256"] == entry.sha256 and loaded
