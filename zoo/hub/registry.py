"""Registry of named checkpoints (``arch.tag``, as in timm: ``resnet10t.shapes_cls``) and resolution of any model
reference to a local, verified bundle folder.

Entries come from ``zoo/hub/registry.json`` (shipped with the package) plus :func:`register` at run time. An
entry's ``url`` is one of

- ``pkg:<path inside the zoo package>``: a bundle folder shipped in the package (``pkg:hub/weights/x.y``);
- ``http(s)://...`` or ``file://...``: a folder URL holding ``model.json`` and ``model.safetensors``; both files
  are downloaded into ``cache_dir()/models/<name>/`` and checked against the entry's sha256s;
- ``hf-hub:org/name[@revision]``: a Hugging Face Hub repository holding the two files.

Only the standard library and zoo.hub's own modules are imported here (serving path).
"""

from __future__ import annotations

import difflib
import fnmatch
import hashlib
import json
import os
import urllib.parse
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .bundle import (
    FORMAT_VERSION,
    META_FILE,
    WEIGHTS_FILE,
    BundleError,
    BundleIntegrityError,
    bundle_paths,
    read_bundle_meta,
    sha256_file,
    verify_file,
)
from .download import HF_PREFIX, cache_dir, download_file, is_url, snapshot_hf_hub

__all__ = [
    "REGISTRY_FILE",
    "RegistryEntry",
    "UnknownModelError",
    "entry_from_bundle",
    "get_entry",
    "list_models",
    "register",
    "resolve",
    "unregister",
]

#: The registry shipped with the package.
REGISTRY_FILE = Path(__file__).resolve().with_name("registry.json")
_PACKAGE_ROOT = Path(__file__).resolve().parents[1]  # the installed ``zoo`` folder
PKG_PREFIX = "pkg:"

_ENTRIES: dict[str, RegistryEntry] | None = None


def _is_sha256(s: object) -> bool:
    return isinstance(s, str) and len(s) == 64 and all(c in "0123456789abcdef" for c in s)


@dataclass(frozen=True)
class RegistryEntry:
    """One named checkpoint.

    Attributes:
        name: ``arch.tag`` (e.g. ``resnet10t.shapes_cls``): the architecture, a dot, and what it was trained on.
        task: ``classification``, ``detection``, ``segmentation``, ``similarity``, ``multitask``, ...
        url: ``pkg:<path>``, an ``http(s)://`` / ``file://`` folder URL, or ``hf-hub:org/name[@revision]``.
        sha256: hex sha256 of ``model.safetensors``.
        json_sha256: hex sha256 of ``model.json``.
        description: one line for humans.
        metrics: headline metrics (``{"val/top1": 0.93}``), with the data split they were measured on.
        recipe: the command that reproduces the checkpoint.
    """

    name: str
    task: str
    url: str
    sha256: str
    json_sha256: str
    description: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)
    recipe: str = ""

    def __post_init__(self) -> None:
        arch, dot, tag = self.name.rpartition(".")
        if not dot or not arch or not tag or any(c.isspace() for c in self.name) or "/" in self.name:
            raise ValueError(f"registry name {self.name!r} must look like 'arch.tag' (e.g. 'resnet10t.shapes_cls')")
        if not self.task:
            raise ValueError(f"registry entry {self.name!r}: task must be non-empty")
        if not (self.url.startswith((PKG_PREFIX, HF_PREFIX)) or is_url(self.url)):
            raise ValueError(
                f"registry entry {self.name!r}: url {self.url!r} must start with pkg:, hf-hub:, http(s):// or file://"
            )
        for key in ("sha256", "json_sha256"):
            value = getattr(self, key)
            if isinstance(value, str) and _is_sha256(value.lower()):
                object.__setattr__(self, key, value.lower())
            else:
                raise ValueError(f"registry entry {self.name!r}: {key} {value!r} is not a 64-character hex digest")
        if not isinstance(self.metrics, Mapping):
            raise ValueError(f"registry entry {self.name!r}: metrics must be a dict, got {type(self.metrics).__name__}")
        object.__setattr__(self, "metrics", dict(self.metrics))

    def to_dict(self) -> dict[str, Any]:
        """The entry as the JSON object stored in ``registry.json``."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RegistryEntry:
        """Build an entry from a ``registry.json`` object; unknown keys are an error naming them."""
        known = {f for f in cls.__dataclass_fields__}
        extra = sorted(set(d) - known)
        if extra:
            raise ValueError(f"registry entry {d.get('name', '?')!r} has unknown keys {extra}; allowed: {sorted(known)}")
        return cls(**dict(d))


class UnknownModelError(KeyError):
    """A model name that is neither registered nor an existing path."""

    def __str__(self) -> str:  # KeyError would print the message repr-quoted
        return str(self.args[0]) if self.args else ""


def _load_file(path: Path) -> dict[str, RegistryEntry]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise FileNotFoundError(f"registry file {path} is missing; the zoo package is incomplete, reinstall it") from e
    if not isinstance(data, dict) or not isinstance(data.get("models"), list):
        raise BundleError(f"{path} must hold {{'format_version': 1, 'models': [...]}}")
    version = data.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise BundleError(f"{path}: registry format {version!r} is not supported by this zoo ({FORMAT_VERSION}): upgrade zoo")
    out: dict[str, RegistryEntry] = {}
    for i, raw in enumerate(data["models"]):
        if not isinstance(raw, dict):
            raise BundleError(f"{path}: models[{i}] must be an object")
        try:
            entry = RegistryEntry.from_dict(raw)
        except (TypeError, ValueError) as e:
            raise BundleError(f"{path}: models[{i}]: {e}") from e
        if entry.name in out:
            raise BundleError(f"{path}: model {entry.name!r} is listed twice")
        out[entry.name] = entry
    return out


def _entries() -> dict[str, RegistryEntry]:
    global _ENTRIES
    if _ENTRIES is None:
        _ENTRIES = _load_file(REGISTRY_FILE)
    return _ENTRIES


def register(entry: RegistryEntry | Mapping[str, Any], *, overwrite: bool = False) -> RegistryEntry:
    """Add a named checkpoint at run time.

    Args:
        entry: a :class:`RegistryEntry` or a dict with its fields.
        overwrite: replace an existing entry of the same name instead of raising ValueError.

    Returns:
        The registered entry.
    """
    if not isinstance(entry, RegistryEntry):
        entry = RegistryEntry.from_dict(entry)
    entries = _entries()
    if entry.name in entries and not overwrite and entries[entry.name] != entry:
        raise ValueError(f"model {entry.name!r} is already registered; pass overwrite=True to replace it")
    entries[entry.name] = entry
    return entry


def unregister(name: str) -> RegistryEntry:
    """Remove a registered name (run-time only; ``registry.json`` is not changed) and return its entry."""
    get_entry(name)
    return _entries().pop(name)


def list_models(pattern: str = "*", *, task: str | None = None) -> list[str]:
    """Names of registered checkpoints matching a shell-style wildcard, sorted.

    Args:
        pattern: ``fnmatch`` pattern, case-insensitive (``"resnet*"``, ``"*.shapes_*"``).
        task: keep only entries of this task (``"detection"``, ...).

    Returns:
        Sorted list of names.
    """
    pat = pattern.lower()
    return sorted(
        name
        for name, e in _entries().items()
        if fnmatch.fnmatchcase(name.lower(), pat) and (task is None or e.task == task)
    )


def get_entry(name: str) -> RegistryEntry:
    """The registry entry of ``name``; an unknown name raises :class:`UnknownModelError` (a KeyError) with the
    closest registered names.

    Args:
        name: ``arch.tag``.

    Returns:
        The entry.
    """
    entries = _entries()
    if name in entries:
        return entries[name]
    close = difflib.get_close_matches(name, list(entries), n=5, cutoff=0.5)
    hint = f"did you mean {', '.join(close)}?" if close else f"{len(entries)} models are registered."
    raise UnknownModelError(
        f"unknown model {name!r}: {hint} See zoo.list_models() for all names; a bundle folder path, a URL or "
        "hf-hub:org/name also work."
    )


def entry_from_bundle(
    name: str,
    task: str,
    url: str,
    bundle: str | os.PathLike[str],
    *,
    description: str = "",
    metrics: Mapping[str, Any] | None = None,
    recipe: str = "",
) -> RegistryEntry:
    """Make a registry entry for a local bundle, computing both sha256s (to add to ``registry.json``).

    Args:
        name: ``arch.tag``.
        task: the task name.
        url: where the bundle will be published (``pkg:hub/weights/<name>``, a folder URL, ``hf-hub:...``).
        bundle: the local bundle folder (or its model.json / model.safetensors).
        description: one line.
        metrics: headline metrics; default: ``meta["metrics"]`` of the bundle if it has one.
        recipe: the command that reproduces it.

    Returns:
        The entry (not registered; call :func:`register` or write ``entry.to_dict()`` into registry.json).
    """
    folder, meta_path = bundle_paths(bundle)
    meta = read_bundle_meta(meta_path)
    weights = folder / meta["weights"]["file"]
    verify_file(weights, meta["weights"]["sha256"], meta["weights"].get("bytes"), what=str(meta_path))
    if metrics is None:
        metrics = meta.get("metrics") if isinstance(meta.get("metrics"), dict) else {}
    return RegistryEntry(
        name=name,
        task=task,
        url=url,
        sha256=meta["weights"]["sha256"],
        json_sha256=sha256_file(meta_path),
        description=description,
        metrics=dict(metrics),
        recipe=recipe,
    )


def _package_path(url: str) -> Path:
    rel = url[len(PKG_PREFIX):].strip().strip("/")
    parts = Path(rel).parts
    if not rel or Path(rel).is_absolute() or ".." in parts:
        raise ValueError(f"{url!r}: a pkg: url needs a relative path inside the zoo package, e.g. pkg:hub/weights/x.y")
    return _PACKAGE_ROOT.joinpath(*parts)


def _folder_url(url: str) -> str:
    """Base folder URL (with trailing slash) of a bundle given as its folder, model.json or model.safetensors URL."""
    parts = urllib.parse.urlsplit(url)
    path = parts.path
    last = path.rstrip("/").rsplit("/", 1)[-1]
    if last in (META_FILE, WEIGHTS_FILE) and not path.endswith("/"):
        path = path[: len(path) - len(last)]
    if not path.endswith("/"):
        path += "/"
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, path, parts.query, parts.fragment))


def _check_json_matches(meta_path: Path, entry: RegistryEntry) -> None:
    recorded = read_bundle_meta(meta_path)["weights"]["sha256"].lower()
    if recorded != entry.sha256:
        raise BundleIntegrityError(
            f"{meta_path} records weights sha256 {recorded} but registry entry {entry.name!r} says {entry.sha256}; "
            "the registry and the bundle disagree: re-export the bundle or fix the registry entry."
        )


def _fetch_folder(base: str, dest: Path, json_sha256: str | None, weights_sha256: str | None, progress: bool) -> Path:
    """Download ``model.json`` and ``model.safetensors`` from folder URL ``base`` into ``dest``, verified."""
    meta_path = download_file(urllib.parse.urljoin(base, META_FILE), json_sha256, dest, filename=META_FILE, progress=progress)
    meta = read_bundle_meta(meta_path)
    recorded = meta["weights"]["sha256"].lower()
    if weights_sha256 is not None and recorded != weights_sha256:
        raise BundleIntegrityError(
            f"{meta_path} records weights sha256 {recorded} but {weights_sha256} was expected; the bundle at {base} "
            "does not match its registry entry."
        )
    wfile = meta["weights"]["file"]
    wpath = download_file(urllib.parse.urljoin(base, wfile), recorded, dest, filename=wfile, progress=progress)
    size = meta["weights"].get("bytes")
    if isinstance(size, int) and wpath.stat().st_size != size:
        raise BundleIntegrityError(f"{wpath}: size {wpath.stat().st_size} differs from {size} bytes in {meta_path}")
    return dest


def _resolve_entry(entry: RegistryEntry, progress: bool) -> Path:
    what = f"registry entry {entry.name!r}"
    if entry.url.startswith(PKG_PREFIX):
        folder = _package_path(entry.url)
        if not (folder / META_FILE).is_file():
            raise FileNotFoundError(
                f"{what}: {folder / META_FILE} is not in the installed package ({entry.url}); reinstall zoo with its "
                "package data"
            )
        verify_file(folder / META_FILE, entry.json_sha256, what=what)
        _check_json_matches(folder / META_FILE, entry)
        verify_file(folder / read_bundle_meta(folder / META_FILE)["weights"]["file"], entry.sha256, what=what)
        return folder
    if entry.url.startswith(HF_PREFIX):
        folder = snapshot_hf_hub(entry.url)
        verify_file(folder / META_FILE, entry.json_sha256, what=what)
        _check_json_matches(folder / META_FILE, entry)
        verify_file(folder / read_bundle_meta(folder / META_FILE)["weights"]["file"], entry.sha256, what=what)
        return folder
    return _fetch_folder(_folder_url(entry.url), cache_dir() / "models" / entry.name, entry.json_sha256, entry.sha256, progress)


def resolve(name_or_path: str | os.PathLike[str], *, progress: bool = True) -> Path:
    """Turn any model reference into a local bundle folder, downloading and verifying sha256s as needed.

    Resolution order: an existing local path (bundle folder, its ``model.json`` or ``model.safetensors``);
    ``hf-hub:org/name[@rev]``; an ``http(s)://`` / ``file://`` URL of a bundle folder (or of one of its files);
    a registered ``arch.tag`` name. Registered bundles are checked against the registry's sha256s; a bundle
    from a bare URL or hf-hub is checked against the weights digest in its own ``model.json``.

    Args:
        name_or_path: the reference.
        progress: print download progress to stderr.

    Returns:
        Path of a local folder holding ``model.json`` and ``model.safetensors``.
    """
    ref = os.fspath(name_or_path)
    local = Path(ref).expanduser()
    if local.exists():
        folder, _ = bundle_paths(local)
        return folder
    if ref.startswith(HF_PREFIX):
        folder = snapshot_hf_hub(ref)
        meta = read_bundle_meta(folder / META_FILE)
        w = meta["weights"]
        verify_file(folder / w["file"], w["sha256"], w.get("bytes"), what=str(folder / META_FILE))
        return folder
    if is_url(ref):
        base = _folder_url(ref)
        dest = cache_dir() / "urls" / hashlib.sha256(base.encode("utf-8")).hexdigest()[:16]
        return _fetch_folder(base, dest, None, None, progress)
    if not isinstance(name_or_path, str) or os.sep in ref or ref.endswith((".json", ".safetensors")):
        raise FileNotFoundError(f"bundle path {local} does not exist")
    return _resolve_entry(get_entry(ref), progress)
