"""Downloads into zoo's cache with sha256 verification, an offline mode and ``hf-hub:`` references.

The transfer itself is ``torch.hub.download_url_to_file`` (it streams to a ``.partial`` file, checks the sha256
on the way and shows a progress bar) and, for ``hf-hub:org/name[@revision]``, ``huggingface_hub.snapshot_download``
(only when installed). What is added here:

- the cache folder: ``$ZOO_HOME`` or ``~/.cache/zoo/hub`` (:func:`cache_dir`), with a cached copy re-used only when
  its full sha256 matches;
- ``ZOO_OFFLINE=1`` (or ``HF_HUB_OFFLINE=1``) never touches the network: only cached files (and ``file://``
  URLs, which are local) are used; anything else is an :class:`OfflineError` naming the cache path to fill;
- full 64-hex-digit sha256 verification, and placement with ``os.replace`` only after it, so the cache never holds
  a partial or wrong file under its final name;
- checks and errors that name the file, URL or digest (:class:`DownloadError`, ``BundleIntegrityError``).

Only the standard library at module level; torch and ``huggingface_hub`` are imported on demand.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.parse
import urllib.request
import uuid
from http.client import HTTPException
from pathlib import Path

from .bundle import BundleIntegrityError, sha256_file

__all__ = [
    "DownloadError",
    "OfflineError",
    "cache_dir",
    "download_file",
    "is_url",
    "offline",
    "parse_hf_hub",
    "snapshot_hf_hub",
]

_TRUE = {"1", "true", "yes", "on"}
HF_PREFIX = "hf-hub:"


class DownloadError(OSError):
    """A URL could not be fetched (network error, HTTP error status, missing local file)."""


class OfflineError(DownloadError):
    """Offline mode is on and the requested file is not in the cache."""


def cache_dir() -> Path:
    """Folder of zoo's download cache: ``$ZOO_HOME`` if set, else ``~/.cache/zoo/hub`` (not created here).

    Returns:
        The cache folder path.
    """
    env = os.environ.get("ZOO_HOME", "").strip()
    return Path(env).expanduser() if env else Path.home() / ".cache" / "zoo" / "hub"


def offline() -> bool:
    """True when ``ZOO_OFFLINE`` or ``HF_HUB_OFFLINE`` is set to 1/true/yes/on: use only the cache.

    Returns:
        Whether network access is forbidden.
    """
    return any(os.environ.get(var, "").strip().lower() in _TRUE for var in ("ZOO_OFFLINE", "HF_HUB_OFFLINE"))


def is_url(s: str) -> bool:
    """True for ``http://``, ``https://`` and ``file://`` URLs."""
    return urllib.parse.urlsplit(s).scheme.lower() in {"http", "https", "file"}


def _offline_var() -> str:
    return "ZOO_OFFLINE" if os.environ.get("ZOO_OFFLINE", "").strip().lower() in _TRUE else "HF_HUB_OFFLINE"


def _check_sha(sha256: str | None) -> str | None:
    if sha256 is None:
        return None
    s = sha256.strip().lower()
    if len(s) != 64 or any(c not in "0123456789abcdef" for c in s):
        raise ValueError(f"sha256 {sha256!r} is not a 64-character hex digest")
    return s


def _default_filename(url: str) -> str:
    name = urllib.parse.unquote(urllib.parse.urlsplit(url).path.rstrip("/").rsplit("/", 1)[-1])
    if not name:
        raise ValueError(f"cannot take a file name from URL {url!r}; pass filename=")
    return name


def _check_file_url(url: str) -> None:
    """``file://`` URLs must name an existing local file (urllib would say less)."""
    parts = urllib.parse.urlsplit(url)
    if parts.netloc not in ("", "localhost"):
        raise DownloadError(f"file URL {url!r} names host {parts.netloc!r}; use file:///absolute/path")
    local = Path(urllib.request.url2pathname(parts.path))
    if not local.is_file():
        raise FileNotFoundError(f"{local} does not exist (from URL {url})")


def download_file(
    url: str,
    sha256: str | None,
    dest_dir: str | os.PathLike[str],
    *,
    filename: str | None = None,
    progress: bool = True,
) -> Path:
    """Fetch ``url`` into ``dest_dir/filename``, verifying its sha256, re-using a cached copy whose digest matches.

    Args:
        url: ``http(s)://`` or ``file://`` URL.
        sha256: expected hex digest of the file. ``None`` means unknown (e.g. a ``model.json`` whose own digest is
            not published): the file is then fetched afresh when online, and a cached copy is used only offline.
        dest_dir: folder the file ends up in (created if missing), usually under :func:`cache_dir`.
        filename: name in ``dest_dir``; default: the last component of the URL path.
        progress: print download progress to stderr.

    Returns:
        Path of the verified local file.
    """
    expected = _check_sha(sha256)
    name = filename or _default_filename(url)
    if Path(name).name != name or name in {".", ".."}:
        raise ValueError(f"filename {name!r} must be a plain file name, not a path")
    dest_dir = Path(dest_dir).expanduser()
    dest = dest_dir / name
    scheme = urllib.parse.urlsplit(url).scheme.lower()

    if dest.is_file():
        if expected is not None and sha256_file(dest) == expected:
            return dest
        if expected is None and offline():
            return dest
    if offline() and scheme != "file":
        state = "holds a file with a different sha256" if dest.exists() else "does not hold it"
        raise OfflineError(
            f"{_offline_var()}=1 (offline mode) and {url} is not cached: {dest} {state}. Populate the cache by "
            f"running once with network access (unset ZOO_OFFLINE/HF_HUB_OFFLINE), or copy the file to {dest}"
            + (f" (its sha256 must be {expected})." if expected else ".")
            + " Set ZOO_HOME to use another cache folder."
        )
    if scheme == "file":
        _check_file_url(url)
    elif scheme not in {"http", "https"}:
        raise ValueError(f"unsupported URL scheme in {url!r}: use http://, https:// or file://")

    from torch.hub import download_url_to_file

    dest_dir.mkdir(parents=True, exist_ok=True)
    # torch streams into "<tmp>.<uuid>.partial" and renames it to tmp once the digest matches; tmp is then put in
    # place with os.replace (atomic, also over an existing file on Windows, unlike torch's shutil.move).
    tmp = dest_dir / f".{name}.{uuid.uuid4().hex}.download"
    if progress:
        sys.stderr.write(f"Downloading {url} to {dest}\n")
        sys.stderr.flush()
    try:
        try:
            # a full 64-digit "prefix" makes torch check the whole digest while it streams
            download_url_to_file(url, str(tmp), hash_prefix=expected, progress=progress)
        except urllib.error.HTTPError as e:
            raise DownloadError(f"download of {url} failed: HTTP {e.code} {e.reason}") from e
        except urllib.error.URLError as e:
            raise DownloadError(
                f"could not reach {url} ({e.reason}); check the network, or set ZOO_OFFLINE=1 to use only cached "
                f"files in {cache_dir()}"
            ) from e
        except (ConnectionError, TimeoutError, HTTPException) as e:
            raise DownloadError(f"download of {url} broke off ({type(e).__name__}: {e}); try again") from e
        except RuntimeError as e:
            if expected is None or "hash" not in str(e):
                raise
            raise BundleIntegrityError(
                f"{url} (saved as {dest}): sha256 mismatch, {e}. The download is corrupted or the file at the URL "
                "changed; try again, and if it persists the published digest is stale."
            ) from None
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def parse_hf_hub(ref: str) -> tuple[str, str | None]:
    """Split ``hf-hub:org/name[@revision]`` into ``(repo_id, revision)``.

    Args:
        ref: the reference, with the ``hf-hub:`` prefix.

    Returns:
        ``(repo_id, revision or None)``.
    """
    if not ref.startswith(HF_PREFIX):
        raise ValueError(f"{ref!r} is not an hf-hub reference (expected 'hf-hub:org/name')")
    body = ref[len(HF_PREFIX):].strip()
    repo_id, _, revision = body.partition("@")
    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise ValueError(f"{ref!r}: expected 'hf-hub:org/name' or 'hf-hub:org/name@revision'")
    return repo_id, (revision or None)


def snapshot_hf_hub(ref: str, *, files: tuple[str, ...] = ("model.json", "model.safetensors")) -> Path:
    """Resolve ``hf-hub:org/name[@revision]`` to a local folder with ``huggingface_hub.snapshot_download``.

    Files are cached under ``cache_dir()/huggingface``; in offline mode only that cache is used.

    Args:
        ref: ``hf-hub:org/name`` or ``hf-hub:org/name@revision``.
        files: file names to fetch from the repository.

    Returns:
        The local snapshot folder.
    """
    repo_id, revision = parse_hf_hub(ref)
    try:
        import huggingface_hub
    except ImportError as e:
        raise ImportError(
            f"{ref!r} needs the huggingface_hub package: pip install huggingface_hub "
            "(or download the bundle folder yourself and pass its path)"
        ) from e
    hf_cache = cache_dir() / "huggingface"
    local_only = offline()
    try:
        folder = huggingface_hub.snapshot_download(
            repo_id=repo_id,
            revision=revision,
            allow_patterns=list(files),
            cache_dir=str(hf_cache),
            local_files_only=local_only,
        )
    except Exception as e:  # huggingface_hub raises several error types (offline, not found, auth)
        if local_only:
            raise OfflineError(
                f"{_offline_var()}=1 (offline mode) and {ref} is not in the cache {hf_cache}. Populate it by running "
                "once with network access (unset ZOO_OFFLINE/HF_HUB_OFFLINE), e.g. "
                f"`python -c \"import zoo.hub as h; h.resolve('{ref}')\"`, with the same ZOO_HOME."
            ) from e
        raise DownloadError(f"could not fetch {ref} from the Hugging Face Hub: {type(e).__name__}: {e}") from e
    return Path(folder)

