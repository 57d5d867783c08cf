"""The server's files: uploads and job outputs under random names, never a path a user typed.

An upload is streamed to a staging file (counting bytes against the limit), its HDF5
signature and AnnData structure are checked there, and only a valid file is moved to
``upload_dir/<random>.h5ad``. Names in the database are random hex; `Storage` refuses any
other name, so no value from a request can reach the file system.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
import shutil
import struct
import threading
import time
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from scdrugmap.data.gate import validate_input
from scdrugmap.data.io import HDF5_SIGNATURE, read_h5ad
from scdrugmap.errors import SchemaError, is_write_failure
from scdrugmap.readwrite import META_FILE as BUNDLE_META
from scdrugmap.readwrite import WEIGHTS_FILE as BUNDLE_WEIGHTS

if TYPE_CHECKING:
    import anndata as ad

    from scdrugmap.web.settings import Settings

#: Content types a browser or client may send for an .h5ad file (unknown binary types come as octet-stream).
H5AD_CONTENT_TYPES = frozenset({"", "application/octet-stream", "application/x-hdf5", "application/x-hdf",
                                "application/x-h5ad", "application/vnd.anndata"})
BUNDLE_META_TYPES = frozenset({"", "application/json", "application/octet-stream", "text/plain"})
BUNDLE_WEIGHT_TYPES = frozenset({"", "application/octet-stream"})
BUNDLE_KINDS = frozenset({"mlp", "logistic", "lora"})
MAX_BUNDLE_META_BYTES = 1 << 20
CHUNK_BYTES = 1 << 20
_RANDOM_NAME = re.compile(r"^[0-9a-f]{32}$")
_SAFE_CHARS = re.compile(r"[^A-Za-z0-9._+ -]")


class UploadRejected(Exception):
    """An upload the server refuses, with the HTTP status and a message safe to show."""

    def __init__(self, status: int, message: str, report: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.report = report


def display_name(filename: str | None, default: str = "upload.h5ad") -> str:
    """Return a file name safe to show and to offer as a download name (never used as a path)."""
    base = re.split(r"[\\/]", filename or "")[-1].strip()
    base = _SAFE_CHARS.sub("_", base)[:120].lstrip(".")
    return base or default


def _content_type(value: str | None) -> str:
    return (value or "").split(";")[0].strip().lower()


class Storage:
    """The folders of one server and the random names inside them."""

    def __init__(self, settings: Settings) -> None:
        assert settings.upload_dir is not None and settings.output_dir is not None  # settings.resolved()
        self.settings = settings
        self.upload_dir = Path(settings.upload_dir)
        self.output_root = Path(settings.output_dir)
        self.staging_dir = self.upload_dir / ".staging"
        self.bundle_root = self.upload_dir / "bundles"
        self.max_upload_bytes = settings.max_upload_bytes
        #: Uploads checked at once (each check reads its file in blocks).
        self.checking = threading.BoundedSemaphore(settings.max_concurrent_checks)

    def ensure(self) -> None:
        """Create the folders, readable by the server's user only."""
        for folder in (self.upload_dir, self.output_root, self.staging_dir, self.bundle_root):
            folder.mkdir(parents=True, exist_ok=True, mode=0o700)

    @staticmethod
    def new_name() -> str:
        return secrets.token_hex(16)

    @staticmethod
    def _checked(name: str) -> str:
        if not _RANDOM_NAME.match(name or ""):
            msg = f"refusing storage name {name!r}: names are 32 hex characters made by the server"
            raise ValueError(msg)
        return name

    def upload_path(self, name: str) -> Path:
        return self.upload_dir / f"{self._checked(name)}.h5ad"

    def output_dir(self, name: str) -> Path:
        return self.output_root / self._checked(name)

    def partial_output_dir(self, name: str) -> Path:
        """Where a running job writes; renamed to `output_dir` only when every file was written."""
        return self.output_root / f".partial-{self._checked(name)}"

    def publish_output(self, name: str) -> Path:
        """Move a job's finished outputs into place (one rename) and return the folder."""
        final = self.output_dir(name)
        os.replace(self.partial_output_dir(name), final)
        return final

    def remove_output(self, name: str | None) -> None:
        if not name:
            return
        with contextlib.suppress(ValueError):
            shutil.rmtree(self.output_dir(name), ignore_errors=True)
            shutil.rmtree(self.partial_output_dir(name), ignore_errors=True)

    # --- disk --------------------------------------------------------------------------------------------

    def usage_bytes(self) -> int:
        """Bytes held under the upload and output folders (uploads, bundles, staging, job outputs)."""
        total = 0
        for root in (self.upload_dir, self.output_root):
            for folder, _, files in os.walk(root):
                for name in files:
                    with contextlib.suppress(OSError):
                        total += os.lstat(os.path.join(folder, name)).st_size
        return total

    def free_bytes(self) -> int:
        """Free bytes on the disk of the upload folder."""
        self.ensure()
        return shutil.disk_usage(self.upload_dir).free

    def disk_problem(self, incoming: int = 0) -> str | None:
        """Return why the server cannot take ``incoming`` more bytes now (disk nearly full, quota used), or None."""
        settings = self.settings
        free = self.free_bytes()
        if free - incoming < settings.min_free_disk_mb * 2**20:
            return (f"the server's disk is nearly full ({free / 2**20:,.0f} MiB free); uploads are refused until "
                    "space is freed. Try again later.")
        if self.usage_bytes() + incoming > settings.disk_quota_mb * 2**20:
            return (f"the server's storage quota ({settings.disk_quota_mb:,.0f} MiB) is used up by earlier uploads "
                    "and results; they expire over time. Try again later.")
        return None

    def clean_stale(self, older_than: float = 3600.0, keep: set[str] | None = None) -> int:
        """Delete staging files and partial outputs older than ``older_than`` seconds (not in ``keep``)."""
        cutoff = time.time() - older_than
        removed = 0
        candidates = list(self.staging_dir.glob("*.part")) + list(self.output_root.glob(".partial-*"))
        for path in candidates:
            if keep and path.name.removeprefix(".partial-") in keep:
                continue
            with contextlib.suppress(OSError):
                if path.lstat().st_mtime < cutoff:
                    shutil.rmtree(path) if path.is_dir() else path.unlink()
                    removed += 1
        return removed

    def bundle_dir(self, name: str) -> Path:
        return self.bundle_root / self._checked(name)

    # --- h5ad uploads ----------------------------------------------------------------------------------

    def stage(self, stream: IO[bytes], *, filename: str | None, content_type: str | None,
              limit: int | None = None) -> Path:
        """Copy an uploaded file into the staging area, refusing a wrong type, an oversize or a non-HDF5 file.

        Raises
        ------
        UploadRejected
            415 for a wrong extension or content type, 413 above the size limit, 422 when empty or not HDF5.
        """
        limit = self.max_upload_bytes if limit is None else limit
        name = display_name(filename)
        if not name.lower().endswith(".h5ad"):
            raise UploadRejected(415, f"{name}: only .h5ad files (AnnData) are accepted.")
        kind = _content_type(content_type)
        if kind not in H5AD_CONTENT_TYPES:
            raise UploadRejected(415, f"{name}: content type {kind!r} is not an h5ad file; send it as "
                                      "application/octet-stream or application/x-hdf5.")
        self.ensure()
        staged = self.staging_dir / f"{self.new_name()}.part"
        size = 0
        try:
            with open(staged, "wb") as handle:
                while block := stream.read(CHUNK_BYTES):
                    size += len(block)
                    if size > limit:
                        raise UploadRejected(413, f"{name}: larger than the upload limit of "
                                                  f"{limit / 1024 / 1024:g} MiB.")
                    handle.write(block)
            if size == 0:
                raise UploadRejected(422, f"{name}: the file is empty.")
            with open(staged, "rb") as handle:
                if handle.read(len(HDF5_SIGNATURE)) != HDF5_SIGNATURE:
                    raise UploadRejected(422, f"{name}: not an h5ad file (no HDF5 signature). Write it with "
                                              "AnnData.write_h5ad.")
        except OSError as err:
            staged.unlink(missing_ok=True)
            if is_write_failure(err):
                raise UploadRejected(507, f"{name}: the server's disk is full; the upload was not kept. Try again "
                                          "later.") from err
            raise
        except BaseException:
            staged.unlink(missing_ok=True)
            raise
        return staged

    def gate_staged(self, staged: Path, *, name: str) -> Any:
        """Run the validation gate on a staged file (HDF5 level: nothing is read into memory).

        The data must fit a job's memory (`Settings.job_data_budget`) and expand at most
        `Settings.max_expansion` times from disk to memory; a file declaring values it never wrote, in an
        unknown encoding, or with links to other files is refused. Messages name the upload, never the
        server's path.

        Raises
        ------
        UploadRejected
            422 with the gate's one line.
        """
        try:
            return validate_input(staged, source=name, max_memory=self.settings.job_data_budget or 2**62,
                                  in_memory=True, scan=False, max_expansion=self.settings.max_expansion)
        except SchemaError as err:
            raise UploadRejected(422, str(err).replace(str(staged), name)) from err

    def read_staged(self, staged: Path, *, name: str) -> ad.AnnData:
        """Open a staged file backed (the matrix stays on disk); messages name the upload, never the server's path.

        Raises
        ------
        UploadRejected
            422 when the file is HDF5 but not a readable AnnData.
        """
        try:
            return read_h5ad(staged, backed=True)
        except SchemaError as err:
            raise UploadRejected(422, str(err).replace(str(staged), name)) from err
        except Exception as err:  # h5py and anndata raise many kinds on crafted files
            raise UploadRejected(422, f"{name}: HDF5 but not a readable AnnData file. Write it with "
                                      "AnnData.write_h5ad.") from err

    def keep(self, staged: Path) -> str:
        """Move a checked staging file to its final random name; return that name."""
        name = self.new_name()
        os.replace(staged, self.upload_path(name))
        return name

    # --- uploaded head bundles -------------------------------------------------------------------------

    def store_bundle(self, meta_stream: IO[bytes], meta_type: str | None, weights_stream: IO[bytes],
                     weights_type: str | None, *, known_models: set[str]) -> tuple[str, dict[str, Any], str]:
        """Check an uploaded bundle (``head.json`` + ``head.safetensors``) and store it; return (name, meta, sha256).

        Raises
        ------
        UploadRejected
            When a part has the wrong type or size, the JSON is not a bundle description, or the
            weights are not a safetensors file.
        """
        if _content_type(meta_type) not in BUNDLE_META_TYPES or _content_type(weights_type) not in BUNDLE_WEIGHT_TYPES:
            raise UploadRejected(415, f"the bundle needs {BUNDLE_META} (JSON) and {BUNDLE_WEIGHTS} (binary).")
        raw_meta = meta_stream.read(MAX_BUNDLE_META_BYTES + 1)
        if len(raw_meta) > MAX_BUNDLE_META_BYTES:
            raise UploadRejected(413, f"{BUNDLE_META}: larger than {MAX_BUNDLE_META_BYTES // 1024} KiB.")
        try:
            meta = json.loads(raw_meta)
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise UploadRejected(422, f"{BUNDLE_META}: not valid JSON ({err.__class__.__name__}).") from err
        if not isinstance(meta, dict) or meta.get("model") not in known_models or meta.get("kind") not in BUNDLE_KINDS:
            raise UploadRejected(422, f"{BUNDLE_META}: needs 'model' (one of {', '.join(sorted(known_models))}) and "
                                      f"'kind' ({', '.join(sorted(BUNDLE_KINDS))}); train it with `scdrugmap train`.")
        self.ensure()
        name = self.new_name()
        folder = self.bundle_dir(name)
        folder.mkdir(mode=0o700)
        digest = hashlib.sha256(raw_meta)
        try:
            size = 0
            with open(folder / BUNDLE_WEIGHTS, "wb") as handle:
                while block := weights_stream.read(CHUNK_BYTES):
                    size += len(block)
                    if size > self.max_upload_bytes:
                        raise UploadRejected(413, f"{BUNDLE_WEIGHTS}: larger than the upload limit.")
                    digest.update(block)
                    handle.write(block)
            _check_safetensors(folder / BUNDLE_WEIGHTS)
            (folder / BUNDLE_META).write_bytes(raw_meta)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        return name, meta, digest.hexdigest()

    def remove_bundle(self, name: str) -> None:
        with contextlib.suppress(ValueError):
            shutil.rmtree(self.bundle_dir(name), ignore_errors=True)

    def remove_upload(self, name: str) -> None:
        with contextlib.suppress(ValueError):
            self.upload_path(name).unlink(missing_ok=True)


#: Bytes per element of each safetensors dtype.
SAFETENSORS_DTYPES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2,
                      "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
#: Most tensors and dimensions an uploaded bundle may declare.
MAX_BUNDLE_TENSORS = 10_000
MAX_TENSOR_DIMS = 8


def _check_safetensors(path: Path) -> None:
    """Refuse a file that is not a well-formed safetensors file, before any tensor is read.

    The 8-byte header length and the JSON header must lie within the file; every tensor must have a
    known dtype, a shape of non-negative integers, and data offsets inside the file whose span is
    exactly its shape's size; spans may not overlap and must cover the data section.
    """
    weights = BUNDLE_WEIGHTS
    size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            raise UploadRejected(422, f"{weights}: not a safetensors file (too short).")
        (length,) = struct.unpack("<Q", head)
        if length > size - 8 or length > 100 * CHUNK_BYTES:
            raise UploadRejected(422, f"{weights}: not a safetensors file (bad header length).")
        try:
            header = json.loads(handle.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise UploadRejected(422, f"{weights}: not a safetensors file (bad header).") from err
    if not isinstance(header, dict):
        raise UploadRejected(422, f"{weights}: not a safetensors file (bad header).")
    tensors = {name: entry for name, entry in header.items() if name != "__metadata__"}
    if not tensors or len(tensors) > MAX_BUNDLE_TENSORS:
        raise UploadRejected(422, f"{weights}: holds {len(tensors)} tensors; a head bundle holds 1 to "
                                  f"{MAX_BUNDLE_TENSORS:,}.")
    data_size = size - 8 - length
    spans = []
    for name, entry in tensors.items():
        shown = repr(name[:80])
        if not isinstance(entry, dict) or entry.get("dtype") not in SAFETENSORS_DTYPES:
            raise UploadRejected(422, f"{weights}: tensor {shown} has no known dtype.")
        shape, offsets = entry.get("shape"), entry.get("data_offsets")
        if (not isinstance(shape, list) or len(shape) > MAX_TENSOR_DIMS
                or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape)):
            raise UploadRejected(422, f"{weights}: tensor {shown} has no valid shape ({str(shape)[:80]}).")
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(isinstance(n, int) and not isinstance(n, bool) for n in offsets)
                or not 0 <= offsets[0] <= offsets[1] <= data_size):
            raise UploadRejected(422, f"{weights}: tensor {shown} has data offsets {str(offsets)[:80]} outside the "
                                      f"file's {data_size:,} bytes of data.")
        expected = SAFETENSORS_DTYPES[entry["dtype"]]
        for n in shape:
            expected *= n
        if offsets[1] - offsets[0] != expected:
            raise UploadRejected(422, f"{weights}: tensor {shown} declares shape {shape} of {entry['dtype']} "
                                      f"({expected:,} bytes) but holds {offsets[1] - offsets[0]:,} bytes.")
        spans.append((offsets[0], offsets[1], shown))
    spans.sort()
    position = 0
    for start, end, shown in spans:
        if start != position:
            problem = "overlaps another tensor" if start < position else "leaves a gap before it"
            raise UploadRejected(422, f"{weights}: tensor {shown} {problem}; the file is damaged.")
        position = end
    if position != data_size:
        raise UploadRejected(422, f"{weights}: {data_size - position:,} bytes after the last tensor; the file is "
                                  "damaged.")
