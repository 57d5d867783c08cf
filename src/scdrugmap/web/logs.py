"""Structured logs: one JSON object per line, with job tokens kept out of them.

`configure_logging` is called by `scdrugmap.web.serve` only (a library never sets up handlers);
every module logs with ``logging.getLogger(__name__)`` and passes fields through ``extra``.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import traceback
from datetime import datetime, timezone
from typing import Any

#: Attributes every LogRecord has (and uvicorn's ANSI-coloured copy of the message); anything else on a
#: record came from ``extra`` and is logged as a field.
_RECORD_FIELDS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime",
                                                                                   "color_message"}
#: A job token in a URL path (after /jobs/); replaced before a path is logged.
_TOKEN_IN_PATH = re.compile(r"(/jobs/)[A-Za-z0-9_-]{16,}")


def redact_path(path: str) -> str:
    """Return ``path`` with any job token replaced, so logs never hold a key to a job."""
    return _TOKEN_IN_PATH.sub(r"\1{token}", path)


class JsonFormatter(logging.Formatter):
    """Format a record as one JSON line: time, level, logger, message, extra fields, exception."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _RECORD_FIELDS and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exception"] = "".join(traceback.format_exception(*record.exc_info))
        return json.dumps(entry, default=str)


def configure_logging(level: int = logging.INFO) -> None:
    """Send every log record (ours, uvicorn's, Python warnings) to stderr as JSON lines."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    logging.basicConfig(level=level, handlers=[handler], force=True)
    logging.captureWarnings(True)  # library warnings become JSON lines too
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
