"""Checkpoint bundles (safetensors + JSON), named-checkpoint registry and downloads with sha256 checks.

Serving path: imports only torch, safetensors and the standard library (huggingface_hub on demand).

    from zoo.hub import save_bundle, read_bundle, resolve, list_models
    folder = resolve("test_resnet.shapes_cls")      # name, bundle path, URL or hf-hub:org/name
    state_dict, meta = read_bundle(folder)
"""

from __future__ import annotations

from .bundle import (
    FORMAT_VERSION,
    META_FILE,
    WEIGHTS_FILE,
    BundleError,
    BundleIntegrityError,
    BundleVersionError,
    CheckpointLoadError,
    read_bundle,
    read_bundle_meta,
    read_lightning_checkpoint,
    save_bundle,
    sha256_file,
)
from .download import DownloadError, OfflineError, cache_dir, download_file, offline
from .registry import (
    RegistryEntry,
    UnknownModelError,
    entry_from_bundle,
    get_entry,
    list_models,
    register,
    resolve,
    unregister,
)

__all__ = [
    "FORMAT_VERSION",
    "META_FILE",
    "WEIGHTS_FILE",
    "BundleError",
    "BundleIntegrityError",
    "BundleVersionError",
    "CheckpointLoadError",
    "DownloadError",
    "OfflineError",
    "RegistryEntry",
    "UnknownModelError",
    "cache_dir",
    "download_file",
    "entry_from_bundle",
    "get_entry",
    "list_models",
    "offline",
    "read_bundle",
    "read_bundle_meta",
    "read_lightning_checkpoint",
    "register",
    "resolve",
    "save_bundle",
    "sha256_file",
    "unregister",
]
