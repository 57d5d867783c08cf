"""The web server's database: imported benchmark results, head bundles and prediction jobs.

One schema for SQLite (the default, a file under ``SCDRUGMAP_HOME``) and PostgreSQL
(``postgresql://`` URLs go through psycopg 3). Tables are created at start; times are
naive UTC.
"""

from __future__ import annotations

import hashlib
import logging
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    String,
    Text,
    create_engine,
    event,
)
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship, sessionmaker

log = logging.getLogger(__name__)

#: Job states: checked (uploaded and valid, no model chosen yet), queued, running, then one of the last three.
JOB_STATES = ("checked", "queued", "running", "done", "failed", "interrupted")
ACTIVE_STATES = ("queued", "running")
#: Largest id a row can have (a signed 64-bit integer in SQLite and PostgreSQL); larger ids name nothing.
MAX_ID = 2**63 - 1


def utcnow() -> datetime:
    """Return the current UTC time without tzinfo (how every column stores it)."""
    return datetime.now(timezone.utc).replace(tzinfo=None)


def hash_token(token: str) -> str:
    """Return the sha256 of a job token: the database keeps only this, never the token."""
    return hashlib.sha256(token.encode()).hexdigest()


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON}


class BenchmarkRun(Base):
    """One imported results store (a ``scdrugmap benchmark`` run folder)."""

    __tablename__ = "benchmark_runs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    source: Mapped[str] = mapped_column(String(1000), unique=True)
    fingerprint: Mapped[str | None] = mapped_column(String(64))
    config: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    n_jobs: Mapped[int] = mapped_column(Integer, default=0)
    imported_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    results: Mapped[list[BenchmarkResult]] = relationship(back_populates="run", cascade="all, delete-orphan",
                                                          passive_deletes=True)


class BenchmarkResult(Base):
    """One job row of a results store: a model and strategy evaluated on one fold."""

    __tablename__ = "benchmark_results"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("benchmark_runs.id", ondelete="CASCADE"), index=True)
    key: Mapped[str] = mapped_column(String(500))
    model: Mapped[str] = mapped_column(String(100))
    strategy: Mapped[str] = mapped_column(String(50))
    head: Mapped[str] = mapped_column(String(50))
    scenario: Mapped[str] = mapped_column(String(50))
    category: Mapped[str] = mapped_column(String(50))
    value: Mapped[str] = mapped_column(String(300))
    fold: Mapped[str] = mapped_column(String(20))
    split: Mapped[str] = mapped_column(String(20))
    status: Mapped[str] = mapped_column(String(20))
    n_train: Mapped[int | None] = mapped_column(Integer)
    n_test: Mapped[int | None] = mapped_column(Integer)
    seconds: Mapped[float | None] = mapped_column(Float)
    f1: Mapped[float | None] = mapped_column(Float)
    auroc: Mapped[float | None] = mapped_column(Float)
    accuracy: Mapped[float | None] = mapped_column(Float)
    precision: Mapped[float | None] = mapped_column(Float)
    recall: Mapped[float | None] = mapped_column(Float)
    reasons: Mapped[str | None] = mapped_column(Text)
    run: Mapped[BenchmarkRun] = relationship(back_populates="results")


class HeadBundle(Base):
    """A trained head bundle: registered from the bundle folder (public) or uploaded with one job (private)."""

    __tablename__ = "head_bundles"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    model: Mapped[str] = mapped_column(String(100))
    kind: Mapped[str] = mapped_column(String(20))
    strategy: Mapped[str] = mapped_column(String(20))
    sha256: Mapped[str] = mapped_column(String(64))
    meta: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    #: Registered bundles: the folder the operator configured. Uploaded ones: a random folder name in uploads.
    location: Mapped[str] = mapped_column(String(1000))
    public: Mapped[bool] = mapped_column(Boolean, default=True)
    #: The job an uploaded bundle belongs to (only that job may use it); None for registered bundles.
    owner_job_id: Mapped[int | None] = mapped_column(Integer, index=True)
    available: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class PredictionJob(Base):
    """An uploaded data set, its check report, and the prediction run on it."""

    __tablename__ = "prediction_jobs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    status: Mapped[str] = mapped_column(String(20), default="checked", index=True)
    stage: Mapped[str] = mapped_column(String(100), default="")
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    message: Mapped[str | None] = mapped_column(Text)
    display_name: Mapped[str] = mapped_column(String(200))
    upload_name: Mapped[str] = mapped_column(String(100))
    output_name: Mapped[str | None] = mapped_column(String(100))
    n_cells: Mapped[int] = mapped_column(Integer, default=0)
    n_genes: Mapped[int] = mapped_column(Integer, default=0)
    report: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    model: Mapped[str | None] = mapped_column(String(100))
    bundle_id: Mapped[int | None] = mapped_column(ForeignKey("head_bundles.id", ondelete="SET NULL"))
    threshold: Mapped[float] = mapped_column(Float, default=0.5)
    summary: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    worker_id: Mapped[str | None] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    queued_at: Mapped[datetime | None] = mapped_column(DateTime)
    started_at: Mapped[datetime | None] = mapped_column(DateTime)
    heartbeat_at: Mapped[datetime | None] = mapped_column(DateTime)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime)


def _driver_url(url: str) -> str:
    """Send plain ``postgresql://`` URLs through psycopg 3 (the driver the web extra installs)."""
    parsed = make_url(url)
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed.render_as_string(hide_password=False)


def make_engine(url: str) -> Engine:
    """Return an engine for ``url``; a SQLite file gets its folder, WAL mode and foreign keys."""
    url = _driver_url(url)
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(connection, _record) -> None:  # pragma: no cover - run by SQLAlchemy
            cursor = connection.cursor()
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.close()

        return engine
    return create_engine(url, pool_pre_ping=True)


def init_db(url: str) -> sessionmaker:
    """Create the tables (if missing) and return a session factory."""
    engine = make_engine(url)
    Base.metadata.create_all(engine)
    log.info("database ready", extra={"database": make_url(_driver_url(url)).render_as_string(hide_password=True)})
    return sessionmaker(engine, expire_on_commit=False)
