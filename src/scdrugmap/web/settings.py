"""What a web server is told at start: its database, folders, limits and worker pace.

Every folder defaults to one under ``SCDRUGMAP_HOME/web`` (see `scdrugmap.config`), outside
any folder the server serves: uploads, job outputs and the SQLite database live there.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from scdrugmap import config as paths
from scdrugmap.errors import ConfigError

DEFAULT_MAX_UPLOAD_MB = 500.0
DEFAULT_MAX_CONCURRENT_JOBS = 1
DEFAULT_MAX_QUEUED_JOBS = 20
#: Address space of one job's process, in MiB (the interpreter and libraries take about `JOB_OVERHEAD_MB`).
DEFAULT_JOB_MEMORY_MB = 8192.0
#: Address space a job process needs before it holds any data (Python, numpy, pandas, anndata, BLAS threads).
JOB_OVERHEAD_MB = 2048.0
#: Requests per client and window (count, seconds): uploads, job submissions, job look-ups by token.
DEFAULT_RATE_LIMITS: dict[str, tuple[int, float]] = {"upload": (20, 60.0), "submit": (30, 60.0),
                                                     "lookup": (600, 60.0)}


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
    max_pending_uploads
        Uploads checked but not yet submitted, over all users; more uploads are refused with 429.
    job_memory_mb
        Address-space limit (``RLIMIT_AS``) of each job's process, in MiB; 0 runs jobs without a limit
        (needed for CUDA, which reserves far more address space than it uses). Uploads whose data would
        not fit are refused at upload (`job_data_budget`).
    job_isolation
        ``process`` (default): each job runs in its own process under ``job_memory_mb``, so one job can
        never take the server down; ``thread``: in the server's process (tests, debugging).
    job_timeout_seconds
        A job running longer is stopped and failed.
    max_concurrent_checks
        Uploads checked at once (each reads its file in blocks); more wait their turn.
    max_expansion
        Largest ratio of an upload's size in memory to its size on disk (compression bombs).
    retention_hours
        Uploads and job outputs are deleted this long after the upload (default 7 days), by the worker.
    disk_quota_mb
        Most disk the uploads and job outputs may use; over it the worker deletes the oldest finished
        jobs first, and uploads are refused (507) while it stays full.
    min_free_disk_mb
        Below this much free disk, uploads are refused and ``/health`` fails.
    cleanup_seconds
        How often the worker applies retention and the quota.
    rate_limits
        Per client (IP address) and kind of request (``upload``, ``submit``, ``lookup``): at most
        ``count`` requests in ``seconds``; more are answered 429 with ``Retry-After``. A count of 0
        turns that limit off.
    allowed_origins
        Origins (``https://example.org``) besides the server's own whose pages may post forms and call
        the API from a browser; every other cross-site request is refused (CSRF).
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
    biomarkers
        Find biomarkers in every prediction job, after its predictions are written: predicted-resistant vs
        predicted-sensitive cells (`scdrugmap.tl.biomarkers`; the Wilcoxon test, and pseudobulk DESeq2
        with the sample as a blocking factor where the upload names samples and holds counts). A job whose
        biomarkers fail still delivers its predictions; its page says why.
    biomarker_cells, biomarker_genes, biomarker_bootstrap
        Bounds that keep it fast: cells attributed and deleted from, genes deleted, bootstrap resamples of
        samples for the stability column (0: none).
    biomarker_attribution
        Models whose heads are attributed and have genes deleted (the baselines by default: a foundation
        model would embed every deleted copy); other heads get differential expression only.
    biomarker_gene_sets
        A GMT file of gene sets for the enrichment (None: no enrichment).
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
    max_pending_uploads: int = 100
    job_memory_mb: float = DEFAULT_JOB_MEMORY_MB
    job_isolation: Literal["process", "thread"] = "process"
    job_timeout_seconds: float = 6 * 3600.0
    max_concurrent_checks: int = 2
    max_expansion: float = 200.0
    retention_hours: float = 7 * 24.0
    disk_quota_mb: float = 20 * 1024.0
    min_free_disk_mb: float = 512.0
    cleanup_seconds: float = 300.0
    rate_limits: dict[str, tuple[int, float]] = field(default_factory=lambda: dict(DEFAULT_RATE_LIMITS))
    allowed_origins: tuple[str, ...] = ()
    projection: Literal["umap", "pca"] = "umap"
    run_worker: bool = True
    poll_seconds: float = 1.0
    heartbeat_seconds: float = 5.0
    stale_seconds: float = 60.0
    max_plot_points: int = 5000
    biomarkers: bool = True
    biomarker_cells: int = 200
    biomarker_genes: int = 20
    biomarker_bootstrap: int = 5
    biomarker_attribution: tuple[str, ...] = ("pca", "hvg")
    biomarker_gene_sets: Path | None = None

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)

    @property
    def job_memory_bytes(self) -> int | None:
        """The address-space limit of a job's process, or None for no limit."""
        return int(self.job_memory_mb * 2**20) if self.job_memory_mb > 0 else None

    @property
    def job_data_budget(self) -> int | None:
        """Memory an upload's data may need (the gate's budget): the job limit less the interpreter's share."""
        if self.job_memory_mb <= 0:
            return None
        return int(max(self.job_memory_mb - JOB_OVERHEAD_MB, self.job_memory_mb / 4) * 2**20)

    def biomarker_options(self) -> dict[str, Any] | None:
        """What a job needs to find biomarkers (JSON-safe, for the job's process), or None when turned off."""
        if not self.biomarkers:
            return None
        return {"max_cells": self.biomarker_cells, "max_genes": self.biomarker_genes,
                "n_bootstrap": self.biomarker_bootstrap, "attribute_models": list(self.biomarker_attribution),
                "gene_sets": None if self.biomarker_gene_sets is None else str(self.biomarker_gene_sets)}

    def resolved(self) -> Settings:
        """Return a copy with every default folder filled in and the limits checked.

        Raises
        ------
        ConfigError
            When a limit is not positive or the projection is unknown.
        """
        if (self.max_upload_mb <= 0 or self.max_concurrent_jobs < 1 or self.max_queued_jobs < 1
                or self.max_pending_uploads < 1 or self.max_concurrent_checks < 1 or self.retention_hours <= 0
                or self.disk_quota_mb <= 0 or self.job_timeout_seconds <= 0 or self.job_memory_mb < 0
                or self.biomarker_cells < 1 or self.biomarker_genes < 0 or self.biomarker_bootstrap < 0):
            msg = (f"max_upload_mb={self.max_upload_mb}, max_concurrent_jobs={self.max_concurrent_jobs}, "
                   f"max_queued_jobs={self.max_queued_jobs}, max_pending_uploads={self.max_pending_uploads}, "
                   f"max_concurrent_checks={self.max_concurrent_checks}, retention_hours={self.retention_hours}, "
                   f"disk_quota_mb={self.disk_quota_mb}, job_timeout_seconds={self.job_timeout_seconds}, "
                   f"job_memory_mb={self.job_memory_mb}, biomarker_cells={self.biomarker_cells}, biomarker_genes="
                   f"{self.biomarker_genes}, biomarker_bootstrap={self.biomarker_bootstrap}: every limit must be "
                   "positive (job_memory_mb, biomarker_genes and biomarker_bootstrap may be 0).")
            raise ConfigError(msg)
        if self.job_isolation not in ("process", "thread"):
            msg = f"job_isolation {self.job_isolation!r} is not available; choose process or thread."
            raise ConfigError(msg)
        unknown = sorted(set(self.rate_limits) - set(DEFAULT_RATE_LIMITS))
        if unknown:
            msg = f"rate_limits: unknown kinds {unknown}; the kinds are {', '.join(DEFAULT_RATE_LIMITS)}."
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
            rate_limits={**DEFAULT_RATE_LIMITS, **self.rate_limits},
            allowed_origins=tuple(origin.rstrip("/").lower() for origin in self.allowed_origins),
        )
