"""Checkpoint bundles: a folder holding ``model.safetensors`` (weights) and ``model.json`` (metadata).

A bundle is what a service downloads, so loading one never unpickles anything: metadata comes from JSON and
weights from safetensors. ``model.json`` records the sha256 and size of the weights file, checked on every read.

Layout::

    <bundle>/
      model.safetensors   tensors only
      model.json          {"format_version": 1, "weights": {"file": ..., "sha256": ..., "bytes": ...}, ...meta}

Only torch, safetensors and the standard library are imported here (serving path).
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

__all__ = [
    "FORMAT_VERSION",
    "META_FILE",
    "WEIGHTS_FILE",
    "BundleError",
    "BundleIntegrityError",
    "BundleVersionError",
    "CheckpointLoadError",
    "bundle_paths",
    "read_bundle",
    "read_bundle_meta",
    "read_lightning_checkpoint",
    "save_bundle",
    "sha256_file",
    "verify_file",
]

#: Version of the bundle layout written by :func:`save_bundle`. Readers refuse bundles with a larger number.
FORMAT_VERSION = 1
#: File names inside a bundle folder.
WEIGHTS_FILE = "model.safetensors"
META_FILE = "model.json"

_CHUNK = 1 << 20


class BundleError(RuntimeError):
    """Base class for problems with a checkpoint bundle."""


class BundleVersionError(BundleError):
    """The bundle was written by a newer zoo with a format this one does not understand."""


class BundleIntegrityError(BundleError):
    """A file's sha256 or size differs from the recorded one (corrupted, truncated or tampered download)."""


class CheckpointLoadError(BundleError):
    """A Lightning checkpoint holds pickled objects that a safe (weights-only) load refuses."""


def sha256_file(path: str | os.PathLike[str], chunk_size: int = _CHUNK) -> str:
    """Hex sha256 digest of a file, read in chunks so large weights never sit in memory twice.

    Args:
        path: the file.
        chunk_size: bytes read at a time.

    Returns:
        64 lowercase hex characters.
    """
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            h.update(chunk)
    return h.hexdigest()


def verify_file(path: str | os.PathLike[str], sha256: str, size: int | None = None, *, what: str = "") -> None:
    """Check a file's size (when given) and sha256, raising :class:`BundleIntegrityError` on a mismatch.

    Args:
        path: the file to check.
        sha256: expected hex digest.
        size: expected size in bytes, or None to skip the (cheap) size check.
        what: where the expectation came from, for the message (e.g. ``"model.json"``, ``"registry entry x.y"``).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist (expected the file recorded in {what or 'the bundle'})")
    hint = (
        "The file is corrupted, truncated or was modified after the bundle was written: delete it and "
        "download the model again (zoo's cache lives in $ZOO_HOME, default ~/.cache/zoo/hub), or re-export the bundle."
    )
    src = f" recorded in {what}" if what else ""
    if size is not None:
        actual_size = path.stat().st_size
        if actual_size != int(size):
            raise BundleIntegrityError(
                f"{path}: size {actual_size} bytes differs from the {int(size)} bytes{src} "
                f"(expected sha256 {sha256}, actual {sha256_file(path)}). {hint}"
            )
    actual = sha256_file(path)
    if actual != sha256.lower():
        raise BundleIntegrityError(f"{path}: sha256 mismatch, expected {sha256.lower()}{src}, actual {actual}. {hint}")


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and ``os.replace``."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _find_unserializable(obj: Any, where: str = "meta") -> str | None:
    """Path (``meta['a'][0]``) of the first value ``json.dumps`` cannot encode, or None."""
    if obj is None or isinstance(obj, (str, bool, int, float)):
        return None
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            if not isinstance(k, str):
                return f"{where} key {k!r} (keys must be str)"
            bad = _find_unserializable(v, f"{where}[{k!r}]")
            if bad:
                return bad
        return None
    if isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            bad = _find_unserializable(v, f"{where}[{i}]")
            if bad:
                return bad
        return None
    return f"{where} = {type(obj).__name__} {obj!r:.80}"


def _prepare_tensors(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detach, make contiguous and un-share tensors so ``safetensors.torch.save_file`` accepts them.

    safetensors refuses two names pointing into the same storage (tied weights, views); every tensor after the
    first one seen on a storage is cloned, so the file holds independent copies.
    """
    out: dict[str, torch.Tensor] = {}
    seen: set[tuple[str, int]] = set()
    for name, t in state_dict.items():
        if not isinstance(name, str):
            raise TypeError(f"state_dict key {name!r} is a {type(name).__name__}; bundle tensor names must be str")
        if not isinstance(t, torch.Tensor):
            raise TypeError(
                f"state_dict[{name!r}] is a {type(t).__name__}, not a torch.Tensor: a bundle stores tensors only; "
                "put other values in meta"
            )
        t = t.detach()
        if t.is_sparse or t.layout != torch.strided:
            raise TypeError(f"state_dict[{name!r}] has layout {t.layout}; convert it with .to_dense() first")
        t = t.contiguous()
        key = (str(t.device), t.untyped_storage().data_ptr())
        if t.numel() > 0 and key in seen:
            t = t.clone()
        elif t.numel() > 0:
            seen.add(key)
        out[name] = t
    return out


def save_bundle(directory: str | os.PathLike[str], state_dict: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> Path:
    """Write a bundle folder: ``model.safetensors`` with the tensors and ``model.json`` with ``meta``.

    ``model.json`` is ``meta`` plus ``format_version`` and ``weights`` (file name, sha256, size in bytes), with
    sorted keys and indent 2. Both files are written atomically (temporary file + ``os.replace``), weights first,
    so a reader never sees a ``model.json`` describing weights that are not fully there.

    Args:
        directory: the bundle folder; created if missing, existing bundle files in it are replaced.
        state_dict: name -> tensor (any device/dtype; shared-storage and non-contiguous tensors are copied).
        meta: JSON-serialisable metadata (model spec, classes, preprocessing, metrics, provenance). The keys
            ``format_version`` and ``weights`` are set by this function.

    Returns:
        The bundle folder as a Path.
    """
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise NotADirectoryError(f"{directory} exists and is not a folder; save_bundle needs a folder path")
    if not isinstance(meta, Mapping):
        raise TypeError(f"meta must be a dict, got {type(meta).__name__}")
    bad = _find_unserializable(meta)
    if bad:
        raise TypeError(f"bundle metadata must be JSON-serialisable (str/int/float/bool/None/list/dict): {bad}")
    tensors = _prepare_tensors(state_dict)
    directory.mkdir(parents=True, exist_ok=True)

    weights_path = directory / WEIGHTS_FILE
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{WEIGHTS_FILE}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={"format": "pt"})
        os.replace(tmp, weights_path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise

    full = dict(meta)
    full["format_version"] = FORMAT_VERSION
    full["weights"] = {
        "file": WEIGHTS_FILE,
        "sha256": sha256_file(weights_path),
        "bytes": weights_path.stat().st_size,
    }
    text = json.dumps(full, sort_keys=True, indent=2) + "\n"
    _atomic_write_bytes(directory / META_FILE, text.encode("utf-8"))
    return directory


def bundle_paths(path: str | os.PathLike[str]) -> tuple[Path, Path]:
    """Folder and ``model.json`` of a bundle given as its folder, its ``model.json`` or its ``model.safetensors``.

    Args:
        path: any of the three.

    Returns:
        ``(folder, json_path)``; raises FileNotFoundError naming the missing path.
    """
    p = Path(path).expanduser()
    if p.is_dir():
        folder, meta_path = p, p / META_FILE
    elif p.suffix == ".json":
        folder, meta_path = p.parent, p
    elif p.suffix == ".safetensors":
        folder, meta_path = p.parent, p.parent / META_FILE
        if not p.exists():
            raise FileNotFoundError(f"bundle weights {p} do not exist")
    elif not p.exists():
        raise FileNotFoundError(f"bundle {p} does not exist (give a bundle folder, its {META_FILE} or {WEIGHTS_FILE})")
    else:
        raise ValueError(f"{p} is not a bundle: give its folder, its {META_FILE} or its {WEIGHTS_FILE}")
    if not meta_path.is_file():
        raise FileNotFoundError(f"bundle metadata {meta_path} does not exist (a bundle folder holds {META_FILE} and {WEIGHTS_FILE})")
    return folder, meta_path


def read_bundle_meta(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and check a bundle's ``model.json`` (format version, weights record) without touching the weights.

    Args:
        path: bundle folder, its ``model.json`` or its ``model.safetensors``.

    Returns:
        The metadata dict, including ``format_version`` and ``weights``.
    """
    _, meta_path = bundle_paths(path)
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BundleIntegrityError(f"{meta_path} is not valid JSON ({e}); delete the bundle and download it again") from e
    if not isinstance(meta, dict):
        raise BundleError(f"{meta_path} holds a JSON {type(meta).__name__}, expected an object")
    version = meta.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int):
        raise BundleError(f"{meta_path} has no integer 'format_version' (got {version!r}); it is not a zoo bundle")
    if version > FORMAT_VERSION:
        raise BundleVersionError(
            f"{meta_path}: bundle format {version} is newer than this zoo supports ({FORMAT_VERSION}): upgrade zoo"
        )
    if version < 1:
        raise BundleError(f"{meta_path}: invalid bundle format_version {version}")
    weights = meta.get("weights")
    if not isinstance(weights, dict) or not isinstance(weights.get("file"), str) or not isinstance(weights.get("sha256"), str):
        raise BundleError(f"{meta_path}: 'weights' must be an object with 'file', 'sha256' and 'bytes'; got {weights!r}")
    name = weights["file"]
    if Path(name).name != name or name in {"", ".", ".."}:
        raise BundleError(f"{meta_path}: weights file {name!r} must be a plain file name inside the bundle folder")
    return meta


def read_bundle(
    path: str | os.PathLike[str], *, map_location: str | torch.device = "cpu", verify: bool = True
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a bundle's weights and metadata, verifying the weights' size and sha256 first. Never unpickles.

    Args:
        path: bundle folder, its ``model.json`` or its ``model.safetensors``.
        map_location: device the tensors are loaded to (``"cpu"``, ``"cuda:0"``, a torch.device).
        verify: check the weights file's size and sha256 against ``model.json`` (skip only for files you trust,
            e.g. one you just wrote).

    Returns:
        ``(state_dict, meta)``: name -> tensor with the saved shapes and dtypes, and the full ``model.json``
        content (``meta`` as saved plus ``format_version`` and ``weights``).
    """
    folder, meta_path = bundle_paths(path)
    meta = read_bundle_meta(meta_path)
    weights = meta["weights"]
    weights_path = folder / weights["file"]
    if not weights_path.is_file():
        raise FileNotFoundError(f"bundle weights {weights_path} do not exist (named in {meta_path})")
    if verify:
        size = weights.get("bytes")
        verify_file(weights_path, weights["sha256"], size if isinstance(size, int) else None, what=str(meta_path))
    device: str | int = str(map_location) if isinstance(map_location, torch.device) else map_location
    try:
        state_dict = load_file(weights_path, device=device)
    except SafetensorError as e:
        raise BundleIntegrityError(
            f"{weights_path} is not a readable safetensors file ({e}); delete it and download the model again"
        ) from e
    return state_dict, meta


def read_lightning_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Load a Lightning/PyTorch ``.ckpt`` with ``torch.load(weights_only=True)`` (no arbitrary code runs).

    Lightning checkpoints are the resume format for training; use this to pull a ``state_dict`` out of one before
    writing a bundle. Only tensors and plain containers/primitives are accepted.

    Args:
        path: the checkpoint file.

    Returns:
        The checkpoint dict (typically ``state_dict``, ``epoch``, ``global_step``, ``hyper_parameters``, ...).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        detail = f"it references {found.group(1)}" if found else (str(e).strip().splitlines() or ["unpickling failed"])[0]
        raise CheckpointLoadError(
            f"{path} holds pickled Python objects that a safe torch.load(weights_only=True) refuses ({detail}). "
            "This happens when the checkpoint was saved with non-primitive values, e.g. Lightning's "
            "save_hyperparameters() given an OmegaConf/dataclass object, or callbacks/loggers storing custom "
            "classes. Re-save the hyper-parameters as plain dicts (OmegaConf.to_container(cfg, resolve=True)), or, "
            "only if you trust where the file came from, allow the classes with "
            "torch.serialization.add_safe_globals([...]) and retry."
        ) from e
    if not isinstance(ckpt, dict):
        raise CheckpointLoadError(f"{path} holds a {type(ckpt).__name__}, expected a checkpoint dict")
    return ckpt
