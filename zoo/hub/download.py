"""Downloads into zoo's cache with sha256 verification, an offline mode and ``hf-hub:`` references.

- Cache folder: ``$ZOO_HOME`` or ``~/.cache/zoo/hub`` (:func:`cache_dir`).
- ``ZOO_OFFLINE=1`` (or ``HF_HUB_OFFLINE=1``) never touches the network: only cached files (and ``file://``
  URLs, which are local) are used; anything else is an :class:`OfflineError` naming the cache path to fill.
- Every download streams into a temporary file beside its destination, is hashed on the way, and is renamed into
  place only when the digest matches, so the cache never holds a partial or wrong file under its final name.

Only the standard library (urllib, no requests) at module level; ``huggingface_hub`` is imported on demand.
"""

from __future__ import annotations

import hashlib
import os
import sys
import tempfile
import urllib.error
import urllib.parse
import urllib.request
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

_CHUNK = 1 << 20
_TIMEOUT_S = 60.0
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


def _open(url: str):  # -> a binary file-like with .read(n), and the total size or None
    """Open ``url`` for streaming; ``file://`` reads the local file directly."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme.lower() == "file":
        local = Path(urllib.request.url2pathname(parts.path))
        if parts.netloc not in ("", "localhost"):
            raise DownloadError(f"file URL {url!r} names host {parts.netloc!r}; use file:///absolute/path")
        if not local.is_file():
            raise FileNotFoundError(f"{local} does not exist (from URL {url})")
        return open(local, "rb"), local.stat().st_size
    if parts.scheme.lower() not in {"http", "https"}:
        raise ValueError(f"unsupported URL scheme in {url!r}: use http://, https:// or file://")
    req = urllib.request.Request(url, headers={"User-Agent": "zoo-hub/1 (python urllib)"})
    try:
        resp = urllib.request.urlopen(req, timeout=_TIMEOUT_S)  # noqa: S310 - scheme checked above
    except urllib.error.HTTPError as e:
        raise DownloadError(f"download of {url} failed: HTTP {e.code} {e.reason}") from e
    except (urllib.error.URLError, TimeoutError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise DownloadError(
            f"could not reach {url} ({reason}); check the network, or set ZOO_OFFLINE=1 to use only cached files "
            f"in {cache_dir()}"
        ) from e
    length = resp.headers.get("Content-Length")
    return resp, int(length) if length and length.isdigit() else None


def _report(progress: bool, url: str, done: int, total: int | None, final: bool = False) -> None:
    if not progress:
        return
    if total:
        msg = f"\rDownloading {url}: {done / 2**20:.1f}/{total / 2**20:.1f} MiB ({100 * done // max(total, 1)}%)"
    else:
        msg = f"\rDownloading {url}: {done / 2**20:.1f} MiB"
    if final or sys.stderr.isatty():
        sys.stderr.write(msg + ("\n" if final else ""))
        sys.stderr.flush()


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
    is_file_url = urllib.parse.urlsplit(url).scheme.lower() == "file"

    if dest.is_file():
        if expected is not None and sha256_file(dest) == expected:
            return dest
        if expected is None and offline():
            return dest
    if offline() and not is_file_url:
        state = "holds a file with a different sha256" if dest.exists() else "does not hold it"
        raise OfflineError(
            f"{_offline_var()}=1 (offline mode) and {url} is not cached: {dest} {state}. Populate the cache by "
            f"running once with network access (unset ZOO_OFFLINE/HF_HUB_OFFLINE), or copy the file to {dest}"
            + (f" (its sha256 must be {expected})." if expected else ".")
            + " Set ZOO_HOME to use another cache folder."
        )

    dest_dir.mkdir(parents=True, exist_ok=True)
    src, total = _open(url)
    fd, tmp_name = tempfile.mkstemp(dir=dest_dir, prefix=f".{name}.", suffix=".part")
    tmp = Path(tmp_name)
    try:
        h = hashlib.sha256()
        done = 0
        with src, os.fdopen(fd, "wb") as out:
            while chunk := src.read(_CHUNK):
                out.write(chunk)
                h.update(chunk)
                done += len(chunk)
                _report(progress, url, done, total)
        _report(progress, url, done, total, final=True)
        if total is not None and done != total:
            raise DownloadError(f"download of {url} ended after {done} of {total} bytes; try again")
        actual = h.hexdigest()
        if expected is not None and actual != expected:
            raise BundleIntegrityError(
                f"{url} (saved as {dest}): sha256 mismatch, expected {expected}, actual {actual}. The download is "
                "corrupted or the file at the URL changed; try again, and if it persists the published digest is stale."
            )
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
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

