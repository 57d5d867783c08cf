"""The project's exceptions: every expected failure is a `ScDrugMapError`.

The CLI turns these into one red line and exit code 1; anything else is a bug
and keeps its traceback. Also here: how a refused file operation (a full disk, no
permission) reads as one line, for the CLI and the web worker alike.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path


class ScDrugMapError(Exception):
    """Base class of every error a user can fix without touching the code."""


class SchemaError(ScDrugMapError):
    """Input data breaks the data contract (obs columns, values, genes)."""


class CheckpointError(ScDrugMapError):
    """A checkpoint is missing, corrupted, or does not match the architecture."""


class WeightsNotFoundError(CheckpointError):
    """Weights are neither local nor cached, and cannot be downloaded now."""


class ConfigError(ScDrugMapError):
    """A run configuration names something that does not exist or cannot work."""


class SplitError(ScDrugMapError):
    """A split cannot be formed from the data as given."""


class OutputError(ScDrugMapError):
    """An output cannot be written (a full disk, no permission); nothing partial is left behind."""


def describe_os_error(err: OSError, path: str | Path | None = None) -> str:
    """Return one line for a failed file operation: the path, what went wrong, and the fix."""
    where = str(path or err.filename or "a file")
    text = str(err)
    if err.errno == errno.ENOSPC or "No space left on device" in text:
        return f"{where}: no space left on device. Free some space or write elsewhere (--out)."
    if err.errno == errno.EDQUOT or "quota exceeded" in text.lower():
        return f"{where}: disk quota exceeded. Free some space or write elsewhere (--out)."
    if isinstance(err, PermissionError) or err.errno in (errno.EACCES, errno.EPERM) or "Permission denied" in text:
        return f"{where}: permission denied. Choose a folder this user may write to (--out), or fix its permissions."
    if err.errno == errno.EROFS:
        return f"{where}: the file system is read-only. Write elsewhere (--out)."
    reason = os.strerror(err.errno) if err.errno else (text.splitlines()[0] if text else err.__class__.__name__)
    return f"{where}: {reason}."


#: errno values of a write that the disk or its permissions refused (other OSErrors pass through).
WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG})


def is_write_failure(err: OSError) -> bool:
    """Return True for an OSError that says the disk or its permissions refused a write."""
    return err.errno in WRITE_ERRNOS or any(text in str(err) for text in ("No space left on device",
                                                                           "Disk quota exceeded"))
