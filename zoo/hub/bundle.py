"""Checkpoint bundles: a folder holding ``model.safetensors`` (weights) and ``model.json`` (metadata).

A bundle is what a service downloads, so loading one never unpickles anything: metadata comes from JSON and
weights from safetensors. ``model.json`` records the sha256 and size of the weights file, checked on every read;
the weights file's safetensors metadata records the sha256 of ``model.json``'s content (:func:`meta_digest`), so
editing ``model.json`` is detected too. Sizes a spec asks for are bounded at load time (:func:`check_spec_bounds`)
and non-finite weights are refused (:func:`check_finite_weights`).

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
import struct
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

__all__ = [
    "FORMAT_VERSION",
    "META_FILE",
    "WEIGHTS_FILE",
    "BundleError",
    "BundleIntegrityError",
    "BundleVersionError",
    "CheckpointLoadError",
    "DEFAULT_SPEC_LIMITS",
    "META_DIGEST_KEY",
    "SPEC_LIMIT_ENV",
    "SpecBoundsError",
    "bundle_paths",
    "check_finite_weights",
    "checkpoint_load_error",
    "check_spec_bounds",
    "meta_digest",
    "read_bundle",
    "read_bundle_meta",
    "read_lightning_checkpoint",
    "save_bundle",
    "sha256_file",
    "spec_limits",
    "verify_file",
]

#: Version of the bundle layout written by :func:`save_bundle`. Readers refuse bundles with a larger number.
FORMAT_VERSION = 1
#: File names inside a bundle folder.
WEIGHTS_FILE = "model.safetensors"
META_FILE = "model.json"
#: Key in the weights file's safetensors metadata holding :func:`meta_digest` of ``model.json`` (absent in bundles
#: written before it existed; those still load).
META_DIGEST_KEY = "zoo.meta_sha256"

#: Default bounds on sizes read from a model spec at load time (a spec may come from an untrusted download).
DEFAULT_SPEC_LIMITS: dict[str, int] = {
    "max_input_side": 8192,  # each side of input_size: the predictor resizes every image to it
    "max_size_divisor": 1024,  # padding multiple
    "max_heads": 64,  # number of heads, and of necks
    "max_head_dim": 1_000_000,  # num_classes, *_dim, *channels, representation_size in head / neck configs
}
#: Environment variable that overrides each limit.
SPEC_LIMIT_ENV: dict[str, str] = {
    "max_input_side": "ZOO_MAX_INPUT_SIDE",
    "max_size_divisor": "ZOO_MAX_SIZE_DIVISOR",
    "max_heads": "ZOO_MAX_HEADS",
    "max_head_dim": "ZOO_MAX_HEAD_DIM",
}

_CHUNK = 1 << 20


class BundleError(RuntimeError):
    """Base class for problems with a checkpoint bundle."""


class BundleVersionError(BundleError):
    """The bundle was written by a newer zoo with a format this one does not understand."""


class BundleIntegrityError(BundleError):
    """A file's sha256 or size differs from the recorded one (corrupted, truncated or tampered download)."""


class CheckpointLoadError(BundleError):
    """A Lightning checkpoint holds pickled objects that a safe (weights-only) load refuses, or is unreadable."""


class SpecBoundsError(BundleError):
    """A model spec asks for a size beyond the load-time limits (:data:`DEFAULT_SPEC_LIMITS`)."""


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


def meta_digest(meta: Mapping[str, Any]) -> str:
    """Hex sha256 of a bundle's ``model.json`` content, ignoring its layout and its ``weights`` record.

    The ``weights`` record is left out because it holds the weights file's own sha256, which depends on this digest
    (stored in the weights' safetensors metadata); the weights file is covered by that sha256 instead. The content
    is serialised canonically (sorted keys, no whitespace), so re-indenting ``model.json`` keeps the digest.

    Args:
        meta: the parsed ``model.json`` (with or without ``weights``).

    Returns:
        64 lowercase hex characters.
    """
    content = {k: v for k, v in meta.items() if k != "weights"}
    text = json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _verify_meta_digest(weights_path: Path, meta_path: Path, meta: Mapping[str, Any]) -> None:
    """Compare ``model.json``'s content with the digest in the weights' metadata (when there is one)."""
    try:
        with safe_open(str(weights_path), framework="pt") as f:
            recorded = (f.metadata() or {}).get(META_DIGEST_KEY)
    except SafetensorError as e:
        raise BundleIntegrityError(
            f"{weights_path} is not a readable safetensors file ({e}); delete it and download the model again"
        ) from e
    if recorded is None:  # bundle written before the digest existed
        return
    actual = meta_digest(meta)
    if actual != str(recorded).lower():
        raise BundleIntegrityError(
            f"{meta_path} was modified after the bundle was written: the sha256 of its content is {actual}, but "
            f"{weights_path.name} records {recorded} ({META_DIGEST_KEY!r} in its safetensors metadata). Download the "
            "bundle again; if the edit was intended, re-export the bundle (zoo.hub.export_checkpoint, or save_bundle "
            "with the new metadata) instead of editing model.json by hand."
        )


def _env_limit(key: str) -> int | None:
    env = SPEC_LIMIT_ENV[key]
    raw = os.environ.get(env, "").strip()
    if not raw:
        return None
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise ValueError(
            f"${env}={raw!r} must be a positive integer (the limit {key}; default {DEFAULT_SPEC_LIMITS[key]})"
        )
    return value


def spec_limits(overrides: Mapping[str, int | None] | None = None) -> dict[str, int]:
    """The load-time size limits: :data:`DEFAULT_SPEC_LIMITS`, then the :data:`SPEC_LIMIT_ENV` environment
    variables, then ``overrides`` (None values are ignored).

    Args:
        overrides: any subset of ``{"max_input_side", "max_size_divisor", "max_heads", "max_head_dim"}`` -> int.

    Returns:
        All four limits.
    """
    limits = dict(DEFAULT_SPEC_LIMITS)
    for key in limits:
        env = _env_limit(key)
        if env is not None:
            limits[key] = env
    for key, value in (overrides or {}).items():
        if key not in DEFAULT_SPEC_LIMITS:
            raise TypeError(f"unknown spec limit {key!r}; known: {sorted(DEFAULT_SPEC_LIMITS)}")
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"spec limit {key} must be a positive int, got {value!r}")
        limits[key] = value
    return limits


def _how_to_raise(key: str) -> str:
    env = SPEC_LIMIT_ENV[key]
    kw = f"{key}=N" if key == "max_input_side" else f"limits={{{key!r}: N}}"
    return (f"If the model really needs it (and you trust where it came from), raise the limit: set {env}=N or "
            f"pass zoo.load(..., {kw}).")


def _check_int(source: str, where: str, value: Any, key: str, limits: Mapping[str, int], lowest: int) -> None:
    limit = limits[key]
    if isinstance(value, bool) or not isinstance(value, int):
        raise SpecBoundsError(f"{source}: {where} = {value!r} must be an integer ({lowest}..{limit})")
    if value < lowest or value > limit:
        raise SpecBoundsError(
            f"{source}: {where} = {value} is outside the allowed range {lowest}..{limit} ({key}; a spec from an "
            f"untrusted file must not be able to make zoo allocate arbitrarily much memory). {_how_to_raise(key)}"
        )


_DIM_KEY = re.compile(r"(^num_classes$|dim$|dims$|channels$|^representation_size$)")


def check_spec_bounds(spec: Any, source: str | os.PathLike[str], limits: Mapping[str, int | None] | None = None,
                      *, where: str = "spec") -> None:
    """Refuse a model spec (or ``model.json``'s top level) whose sizes exceed the load-time limits.

    Checked: every side of ``input_size`` (1..``max_input_side``), ``size_divisor`` (1..``max_size_divisor``), the
    number of ``heads`` and of ``necks`` (``max_heads``), and in each head / neck config the integers under
    ``num_classes``, ``*dim``, ``*dims``, ``*channels`` and ``representation_size`` (``max_head_dim``). Raises
    :class:`SpecBoundsError` naming the key, the value, the limit and how to raise it.

    Args:
        spec: the spec dict (anything else is left to the model builder to reject).
        source: the file it came from, for the message.
        limits: overrides of :data:`DEFAULT_SPEC_LIMITS` (after the environment variables), see :func:`spec_limits`.
        where: name of ``spec`` in messages (``"spec"``, ``"model.json"``).
    """
    if not isinstance(spec, Mapping):
        return
    lim = spec_limits(limits)
    src = str(source)
    size = spec.get("input_size")
    if size is not None:
        sides = size if isinstance(size, (list, tuple)) else [size]
        if len(sides) > 2:
            raise SpecBoundsError(f"{src}: {where}.input_size = {size!r:.80} must be [height, width]")
        for i, v in enumerate(sides):
            _check_int(src, f"{where}.input_size[{i}]", v, "max_input_side", lim, 1)
    if spec.get("size_divisor") is not None:
        _check_int(src, f"{where}.size_divisor", spec["size_divisor"], "max_size_divisor", lim, 1)
    for group in ("heads", "necks"):
        items = spec.get(group)
        if not isinstance(items, Mapping):
            continue
        if len(items) > lim["max_heads"]:
            raise SpecBoundsError(
                f"{src}: {where}.{group} has {len(items)} entries, more than the limit {lim['max_heads']} "
                f"(max_heads). {_how_to_raise('max_heads')}"
            )
        for name, cfg in items.items():
            if not isinstance(cfg, Mapping):
                continue
            for k, v in cfg.items():
                if not isinstance(k, str) or not _DIM_KEY.search(k) or v is None:
                    continue
                values = v if isinstance(v, (list, tuple)) else [v]
                for j, x in enumerate(values):
                    label = f"{where}.{group}[{name!r}].{k}" + (f"[{j}]" if values is v else "")
                    if isinstance(x, bool) or not isinstance(x, int):
                        continue  # not a size; the head's own argument checks deal with it
                    _check_int(src, label, x, "max_head_dim", lim, 0)


def check_finite_weights(state_dict: Mapping[str, torch.Tensor], source: str | os.PathLike[str]) -> None:
    """Refuse weights holding NaN or inf in any floating-point tensor (one ``isfinite().all()`` per tensor).

    Args:
        state_dict: name -> tensor.
        source: the file they came from, for the message.
    """
    bad = []
    for name, t in state_dict.items():
        if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.numel() == 0:
            continue
        try:
            finite = bool(torch.isfinite(t).all())
        except (RuntimeError, NotImplementedError):  # dtypes without isfinite (float8 on some builds)
            finite = bool(torch.isfinite(t.float()).all())
        if not finite:
            bad.append(name)
    if bad:
        shown = ", ".join(repr(n) for n in bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise BundleError(
            f"{source}: {len(bad)} weight tensor(s) hold NaN or inf values: {shown}. The weights are unusable "
            "(training diverged, or the file was damaged or tampered with): export the bundle again from a good "
            "checkpoint, or pass zoo.load(..., allow_nonfinite=True) to load them anyway."
        )


def save_bundle(directory: str | os.PathLike[str], state_dict: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> Path:
    """Write a bundle folder: ``model.safetensors`` with the tensors and ``model.json`` with ``meta``.

    ``model.json`` is ``meta`` plus ``format_version`` and ``weights`` (file name, sha256, size in bytes), with
    sorted keys and indent 2; the weights file's safetensors metadata holds :func:`meta_digest` of it under
    :data:`META_DIGEST_KEY`, so :func:`read_bundle` detects an edited ``model.json``. Both files are written atomically (temporary file + ``os.replace``), weights first,
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

    full = dict(meta)
    full["format_version"] = FORMAT_VERSION
    full.pop("weights", None)
    # Through JSON once, so the digest is over exactly what a reader will parse (tuples -> lists, ...).
    full = json.loads(json.dumps(full))

    weights_path = directory / WEIGHTS_FILE
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{WEIGHTS_FILE}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={"format": "pt", META_DIGEST_KEY: meta_digest(full)})
        os.replace(tmp, weights_path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise

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
        verify: check the weights file's size and sha256 against ``model.json``, and ``model.json``'s content
            against the digest in the weights' metadata when it has one (skip only for files you trust, e.g. one
            you just wrote).

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
        _verify_meta_digest(weights_path, meta_path, meta)
    device: str | int = str(map_location) if isinstance(map_location, torch.device) else map_location
    try:
        state_dict = load_file(weights_path, device=device)
    except SafetensorError as e:
        raise BundleIntegrityError(
            f"{weights_path} is not a readable safetensors file ({e}); delete it and download the model again"
        ) from e
    return state_dict, meta


def _unpickling_detail(message: str) -> str:
    """The useful part of torch's weights-only refusal, without its advice to load with weights_only=False."""
    found = re.search(r"GLOBAL ([\w.]+)", message)
    if found:
        return f"it references {found.group(1)}"
    found = re.search(r"WeightsUnpickler error:\s*(.+)", message)
    detail = found.group(1).strip() if found else "its pickle uses constructs a weights-only load does not allow"
    return detail if "weights_only" not in detail else "its pickle uses constructs a weights-only load does not allow"


def checkpoint_load_error(path: str | os.PathLike[str], error: BaseException) -> CheckpointLoadError:
    """The error to raise when ``torch.load(path, weights_only=True)`` failed with ``error``.

    A refused pickle (objects other than tensors and plain containers) is explained as a safety refusal with the
    way out (re-save as a state dict or bundle in a trusted environment); anything else as an unreadable file.
    torch's own advice to retry with ``weights_only=False`` is never repeated: that would run the file's code.

    Args:
        path: the checkpoint file.
        error: what torch.load raised.

    Returns:
        The :class:`CheckpointLoadError` (raise it ``from None``).
    """
    message = str(error)
    if isinstance(error, pickle.UnpicklingError) or "weights_only" in message or "Unsupported global" in message:
        return CheckpointLoadError(
            f"{path} holds Python objects other than tensors and plain containers "
            f"({_unpickling_detail(message)}), so zoo refuses to load it for safety: unpickling such objects can run "
            "arbitrary code. If the file comes from a source you trust, load it in that trusted environment and "
            "re-save what is needed as plain data: a state dict (torch.save({'state_dict': model.state_dict(), ...}) "
            "with hyper-parameters as plain dicts, e.g. OmegaConf.to_container(cfg, resolve=True) instead of an "
            "OmegaConf/dataclass object given to Lightning's save_hyperparameters()), or a serving bundle "
            "(zoo.hub.export_checkpoint / zoo.hub.save_bundle)."
        )
    first = (message.strip().splitlines() or [type(error).__name__])[0][:200]
    return CheckpointLoadError(
        f"{path} is not a readable PyTorch/Lightning checkpoint ({type(error).__name__}: {first}); it may be "
        "truncated or not a checkpoint at all. Use a .ckpt written by zoo's training (checkpoints/last.ckpt), a "
        "state dict saved with torch.save, or a serving bundle (model.safetensors + model.json)."
    )


def read_lightning_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Load a Lightning/PyTorch ``.ckpt`` with ``torch.load(weights_only=True)`` (no arbitrary code runs).

    Lightning checkpoints are the resume format for training; use this to pull a ``state_dict`` out of one before
    writing a bundle. Only tensors and plain containers/primitives are accepted; a file holding anything else, or
    one torch cannot read, raises :class:`CheckpointLoadError` naming it (see :func:`checkpoint_load_error`).

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
    except (pickle.UnpicklingError, RuntimeError, EOFError, LookupError, ValueError, TypeError, AttributeError,
            ImportError, ArithmeticError, struct.error) as e:  # a refused or unreadable file: one clear error
        raise checkpoint_load_error(path, e) from None
    if not isinstance(ckpt, dict):
        raise CheckpointLoadError(f"{path} holds a {type(ckpt).__name__}, expected a checkpoint dict")
    return ckpt
