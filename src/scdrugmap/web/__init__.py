"""scDrugMap's web server: catalog, benchmark explorer and predictions on uploaded data.

FastAPI with server-rendered pages, a REST API (schema at ``/api/openapi.json``), SQLAlchemy
(SQLite under ``SCDRUGMAP_HOME`` by default, PostgreSQL by URL), and a worker that runs
predictions outside requests. Needs the ``web`` extra (fastapi, sqlalchemy, jinja2,
python-multipart, uvicorn, plotly; psycopg for PostgreSQL).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from scdrugmap.web.settings import DEFAULT_MAX_CONCURRENT_JOBS, DEFAULT_MAX_UPLOAD_MB, Settings

if TYPE_CHECKING:
    from fastapi import FastAPI


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the web application from ``settings`` (see `scdrugmap.web.app.create_app`)."""
    from scdrugmap.web.app import create_app as build

    return build(settings)


def serve(db_url: str | None = None, host: str = "127.0.0.1", port: int = 8000, results: Sequence[Path] = (),
          upload_dir: Path | None = None, max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB,
          max_concurrent_jobs: int = DEFAULT_MAX_CONCURRENT_JOBS, **options: Any) -> None:
    """Run the web server until interrupted, logging JSON lines to stderr.

    Parameters
    ----------
    db_url
        SQLAlchemy URL of the database (``postgresql://user:pass@host/db``); None means a SQLite
        file under ``SCDRUGMAP_HOME/web``.
    host, port
        Where to listen.
    results
        Benchmark run folders to import into the database before serving.
    upload_dir
        Where uploads are kept (default ``SCDRUGMAP_HOME/web/uploads``); never a served folder.
    max_upload_mb, max_concurrent_jobs
        Largest upload in MiB, and predictions running at once.
    options
        Any other `Settings` field (``bundle_dir``, ``max_queued_jobs``, ``weights``, ``projection``, ...).

    Raises
    ------
    ConfigError
        When a results folder holds no results or a limit is not positive.
    """
    import uvicorn

    from scdrugmap.web.logs import configure_logging

    configure_logging()
    settings = Settings(db_url=db_url, results=tuple(Path(p) for p in results), upload_dir=upload_dir,
                        max_upload_mb=max_upload_mb, max_concurrent_jobs=max_concurrent_jobs, **options)
    app = create_app(settings)
    uvicorn.run(app, host=host, port=port, access_log=False, log_config=None, server_header=False)


__all__ = ["Settings", "create_app", "serve"]
