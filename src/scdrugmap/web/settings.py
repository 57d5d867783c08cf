"""What a web server is told at start: its database, folders, limits and worker pace.

Every folder defaults to one under ``SCDRUGMAP_HOME/web`` (see `scdrugmap.config`), outside
any folder the server serves: uploads, job outputs and the SQLite database live there.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

from scdrugmap import config as paths
from scdrugmap.errors import ConfigError

DEFAULT_MAX_UPLOAD_MB = 500.0
DEFAULT_MAX_CONCURRENT_JOBS = 1
DEFAULT_MAX_QUEUED_JOBS = 20


@dataclass(frozen=True)
class Settings:
    """Configuration of one web server.

    Attributes
    ----------
    db_url
        SQLAlchemy URL (``postgresql://user@host/db`` or ``sqlite:///path``); None means a
        SQLite file ``scdrugmap.db`` in ``data_dir``.
    data_dir
        Root of the server's files (default ``SCDRUGMAP_HOME/web``).
    upload_dir
        Where uploaded ``.h5ad`` files and head bundles are kept (default ``data_dir/uploads``).
    output_dir
        Where finished jobs write their predictions (default ``data_dir/jobs``).
    bundle_dir
        Folder whose sub-folders are head bundles offered to every user (default ``data_dir/bundles``).
    results
        Run folders of ``scdrugmap benchmark`` to import into the database at start.
    weights
        Local weights per model name, for models whose weights are not in the cache.
    max_upload_mb
        Largest accepted upload, in MiB.
    max_concurrent_jobs
        Predictions running at once.
    max_queued_jobs
        Jobs waiting or running at once, over all users; more are refused with 429.
    projection
        2-D view of the embeddings (`scdrugmap.report.projection.project_embedding`): ``umap`` (needs
        umap-learn and `MIN_UMAP_CELLS` cells; PCA otherwise, with a warning) or ``pca``.
    run_worker
        Start the background worker with the app (tests drive it by hand).
    poll_seconds, heartbeat_seconds, stale_seconds
        How often the worker looks for jobs, how often it marks its jobs alive, and after how
        long without a heartbeat a running job counts as interrupted.
    max_plot_points
        Cells drawn in the 2-D view (a fixed random subset of larger data sets).
    """

    db_url: str | None = None
    data_dir: Path | None = None
    upload_dir: Path | None = None
    output_dir: Path | None = None
    bundle_dir: Path | None = None
    results: tuple[Path, ...] = ()
    weights: dict[str, str] = field(default_factory=dict)
    max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB
    max_concurrent_jobs: int = DEFAULT_MAX_CONCURRENT_JOBS
    max_queued_jobs: int = DEFAULT_MAX_QUEUED_JOBS
    projection: Literal["umap", "pca"] = "umap"
    run_worker: bool = True
    poll_seconds: float = 1.0
    heartbeat_seconds: float = 5.0
    stale_seconds: float = 60.0
    max_plot_points: int = 5000

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)

    def resolved(self) -> Settings:
        """Return a copy with every default folder filled in and the limits checked.

        Raises
        ------
        ConfigError
            When a limit is not positive or the projection is unknown.
        """
        if self.max_upload_mb <= 0 or self.max_concurrent_jobs < 1 or self.max_queued_jobs < 1:
            msg = (f"max_upload_mb={self.max_upload_mb}, max_concurrent_jobs={self.max_concurrent_jobs}, "
                   f"max_queued_jobs={self.max_queued_jobs}: every limit must be positive.")
            raise ConfigError(msg)
        if self.projection not in ("umap", "pca"):
            msg = f"projection {self.projection!r} is not available; choose umap or pca."
            raise ConfigError(msg)
        data_dir = Path(self.data_dir) if self.data_dir else paths.home_dir() / "web"
        return replace(
            self,
            data_dir=data_dir,
            db_url=self.db_url or f"sqlite:///{data_dir / 'scdrugmap.db'}",
            upload_dir=Path(self.upload_dir) if self.upload_dir else data_dir / "uploads",
            output_dir=Path(self.output_dir) if self.output_dir else data_dir / "jobs",
            bundle_dir=Path(self.bundle_dir) if self.bundle_dir else data_dir / "bundles",
            results=tuple(Path(p) for p in self.results),
        )
