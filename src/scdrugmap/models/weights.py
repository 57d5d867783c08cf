"""Download, verify and cache official model weights.

Each model module declares where its official files live as `WeightsSource`
objects; this module fetches them into ``$SCDRUGMAP_HOME/weights/<name>/``,
resuming partial downloads (HTTP Range), checking sha256 and size, and moving
each file into place atomically. Hugging Face files are fetched by URL from
``HF_ENDPOINT`` (default https://huggingface.co), so one code path serves every
host and a local test server.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from scdrugmap import config
from scdrugmap.errors import CheckpointError, WeightsNotFoundError

log = logging.getLogger(__name__)

HF_ENDPOINT_ENV = "HF_ENDPOINT"
DEFAULT_HF_ENDPOINT = "https://huggingface.co"
#: Written after every file of a source was downloaded and verified.
MANIFEST = "scdrugmap-manifest.json"
CHUNK = 1 << 20


@dataclass(frozen=True)
class RemoteFile:
    """One file of a model's weights.

    ``url`` may start with ``hf://owner/repo/revision/`` for a Hugging Face file;
    ``sha256`` and ``size`` are checked when known (None for sources whose
    publishers give no checksum: the digest is then recorded at first download).
    """

    filename: str
    url: str
    sha256: str | None = None
    size: int | None = None

    def resolved_url(self) -> str:
        if self.url.startswith("hf://"):
            owner, repo, revision, path = self.url[len("hf://") :].split("/", 3)
            endpoint = os.environ.get(HF_ENDPOINT_ENV, DEFAULT_HF_ENDPOINT).rstrip("/")
            return f"{endpoint}/{owner}/{repo}/resolve/{revision}/{path}"
        return self.url


def hf_file(repo: str, path: str, *, revision: str = "main", filename: str | None = None,
            sha256: str | None = None, size: int | None = None) -> RemoteFile:
    """Describe the file ``path`` of the Hugging Face repository ``repo`` (``owner/name``).

    The file is cached under its base name unless ``filename`` gives another (e.g. ``1_Pooling/config.json``).
    """
    return RemoteFile(filename=filename or Path(path).name, url=f"hf://{repo}/{revision}/{path}",
                      sha256=sha256, size=size)


@dataclass(frozen=True)
class WeightsSource:
    """Where the official files of one model variant come from.

    ``name`` is the cache folder; ``token_env`` names the environment variable
    holding an access token for gated models (e.g. ``HF_TOKEN`` for Llama 3).
    """

    name: str
    files: tuple[RemoteFile, ...]
    homepage: str = ""
    license: str = ""
    token_env: str | None = None


def cache_path(source: WeightsSource) -> Path:
    """Return the folder that holds (or will hold) the files of ``source``."""
    return config.weights_cache_dir() / source.name


def is_cached(source: WeightsSource) -> bool:
    """Return True when every file of ``source`` was downloaded and verified."""
    folder = cache_path(source)
    manifest_path = folder / MANIFEST
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    for remote in source.files:
        path = folder / remote.filename
        if not path.exists():
            return False
        if remote.filename in manifest:
            continue
        # a file copied in by hand counts when it matches the published checksum
        if remote.sha256 is None or sha256_file(path) != remote.sha256:
            return False
    return True


def sha256_file(path: str | Path, chunk_size: int = 1 << 20) -> str:
    """Return the hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk_size):
            digest.update(block)
    return digest.hexdigest()


def _request(remote: RemoteFile, source: WeightsSource, start: int) -> urllib.request.Request:
    request = urllib.request.Request(remote.resolved_url(), headers={"User-Agent": "scdrugmap"})
    if start:
        request.add_header("Range", f"bytes={start}-")
    if source.token_env and (token := os.environ.get(source.token_env)):
        # not copied onto redirects: the token must not reach the CDN host a hub redirects to
        request.add_unredirected_header("Authorization", f"Bearer {token}")
    return request


def _fetch_file(remote: RemoteFile, source: WeightsSource, folder: Path,
                progress: Callable[[int, int | None], None] | None, timeout: float) -> str:
    """Download one file into ``folder``, resuming a ``.part`` file; return its sha256."""
    target = folder / remote.filename
    part = target.with_name(target.name + ".part")
    target.parent.mkdir(parents=True, exist_ok=True)
    start = part.stat().st_size if part.exists() else 0
    try:
        response = urllib.request.urlopen(_request(remote, source, start), timeout=timeout)  # noqa: S310
    except urllib.error.HTTPError as err:
        if err.code == 416 and start:  # the part file is already complete
            response = None
        elif err.code in (401, 403) and source.token_env:
            msg = (f"{remote.resolved_url()}: access denied ({err.code}). {source.name} is gated: accept its "
                   f"licence at {source.homepage} and set {source.token_env} to your access token.")
            raise WeightsNotFoundError(msg) from err
        else:
            msg = f"{remote.resolved_url()}: download failed with HTTP {err.code} {err.reason}."
            raise WeightsNotFoundError(msg) from err
    except (urllib.error.URLError, TimeoutError, OSError) as err:
        msg = (f"{remote.resolved_url()}: cannot reach the server ({err}). Download {source.name} on a machine "
               "with internet (`scdrugmap models download`) and pass --weights PATH.")
        raise WeightsNotFoundError(msg) from err
    if response is not None:
        content_type = response.headers.get("Content-Type", "")
        if content_type.startswith("text/html") and not remote.filename.endswith((".html", ".htm")):
            response.close()
            msg = (f"{remote.resolved_url()}: the server sent a web page instead of {remote.filename} (file hosts such "
                   f"as Google Drive or SharePoint ask for confirmation in a browser). Download it by hand from "
                   f"{source.homepage or remote.resolved_url()} and pass --weights PATH.")
            raise WeightsNotFoundError(msg)
        with response:
            resumed = start and response.status == 206
            total = response.length + (start if resumed else 0) if response.length is not None else remote.size
            with open(part, "ab" if resumed else "wb") as handle:
                done = start if resumed else 0
                while block := response.read(CHUNK):
                    handle.write(block)
                    done += len(block)
                    if progress is not None:
                        progress(done, total)
        if total is not None and done < total:  # the connection dropped: keep the part file to resume
            msg = (f"{remote.resolved_url()}: the connection dropped after {done} of {total} bytes; "
                   "rerun the same command to resume the download.")
            raise WeightsNotFoundError(msg)
    size = part.stat().st_size
    if remote.size is not None and size != remote.size:
        part.unlink()
        msg = f"{remote.filename}: downloaded {size} bytes, expected {remote.size}; the partial file was removed, retry."
        raise CheckpointError(msg)
    digest = sha256_file(part)
    if remote.sha256 is not None and digest != remote.sha256:
        part.unlink()
        msg = (f"{remote.filename}: sha256 {digest} does not match the published {remote.sha256}; "
               "the file was removed. Retry, and report it if it persists.")
        raise CheckpointError(msg)
    os.replace(part, target)
    return digest


def download(source: WeightsSource, *, force: bool = False, timeout: float = 60.0,
             progress: Callable[[str, int, int | None], None] | None = None) -> Path:
    """Fetch every file of ``source`` into the cache and return its folder.

    A file already verified is not fetched again (unless ``force``); an
    interrupted download resumes from its ``.part`` file.

    Raises
    ------
    WeightsNotFoundError
        When offline mode is on or the server cannot be reached.
    CheckpointError
        When a file's size or sha256 does not match.
    """
    folder = cache_path(source)
    if config.is_offline():
        msg = (f"{source.name} is not cached in {folder} and downloads are off ({config.OFFLINE_ENV}/HF_HUB_OFFLINE). "
               f"Run `scdrugmap models download {source.name}` online, or pass --weights PATH.")
        raise WeightsNotFoundError(msg)
    if force and folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    manifest_path = folder / MANIFEST
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    for remote in source.files:
        if (folder / remote.filename).exists() and remote.filename in manifest:
            continue
        log.info("downloading %s from %s", remote.filename, remote.resolved_url())
        report = None if progress is None else (lambda done, total, f=remote.filename: progress(f, done, total))
        manifest[remote.filename] = _fetch_file(remote, source, folder, report, timeout)
        tmp = manifest_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True))
        os.replace(tmp, manifest_path)
    return folder


def resolve_weights(source: WeightsSource, path: str | Path | None = None, *, allow_download: bool = True) -> Path:
    """Return where the weights are: ``path`` if given, else the cache, else a fresh download.

    Raises
    ------
    WeightsNotFoundError
        When ``path`` does not exist, or nothing is cached and downloading is impossible.
    """
    if path is not None:
        local = Path(path).expanduser()
        if not local.exists():
            msg = f"{local}: no such file or folder for {source.name} weights. Check --weights."
            raise WeightsNotFoundError(msg)
        return local
    if is_cached(source):
        return cache_path(source)
    if not allow_download or config.is_offline():
        msg = (f"{source.name} weights are not cached in {cache_path(source)}. "
               f"Run `scdrugmap models download {source.name}` (needs internet) or pass --weights PATH.")
        raise WeightsNotFoundError(msg)
    return download(source)
