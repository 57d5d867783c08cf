"""The REST API (``/api``, schema at ``/api/openapi.json``) and ``/health``.

Jobs are created by uploading an ``.h5ad`` (``POST /api/jobs``), which answers with the job's
token once the file passed its checks; every later call names the token in its path. There is
no call that lists jobs.
"""

from __future__ import annotations

import io
import logging
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, File, Form, HTTPException, Query, Request, UploadFile
from fastapi.responses import FileResponse, JSONResponse, Response
from pydantic import BaseModel, Field
from sqlalchemy import func, select, text
from sqlalchemy.orm import Session

from scdrugmap import __version__
from scdrugmap.report.serialise import make_json_safe
from scdrugmap.web import jobs as job_service
from scdrugmap.web import results as result_service
from scdrugmap.web.bundles import public_bundles
from scdrugmap.web.db import BenchmarkResult, PredictionJob
from scdrugmap.web.deps import DbSession, job_or_404, submit
from scdrugmap.web.results import dataset_facts, records, run_summary
from scdrugmap.web.storage import UploadRejected

log = logging.getLogger(__name__)

router = APIRouter()
MAX_PAGE_ROWS = 1000


# --- response models (they shape the OpenAPI schema) -------------------------------------------------------

class Health(BaseModel):
    status: str = Field(description="ok, or error when the database, the disk or the worker is not usable")
    version: str
    database: str
    worker: str = Field(description="running, stopped (serving without a worker) or dead")
    jobs_waiting: int = Field(description="the queue: jobs submitted and waiting for the worker")
    jobs_running: int
    uploads_pending: int = Field(0, description="uploads checked but not submitted (they count toward the limits)")
    disk_free_mb: float = Field(0.0, description="free space on the disk of the uploads and job outputs")
    storage_used_mb: float = Field(0.0, description="space the uploads and job outputs use, of the quota")
    storage_quota_mb: float = 0.0
    problems: list[str] = Field(default_factory=list, description="why the status is error")


class CatalogEntry(BaseModel):
    dataset_id: str
    collection: str
    study: str | None = None
    subgroup: str | None = None
    tissue: str | None = None
    cancer_type: str | None = None
    therapy: str | None = None
    regimen: str | None = None
    n_samples: int | None = None


class CategoryCells(BaseModel):
    category: str
    value: str
    n_cells: int
    n_sensitive: int
    n_resistant: int


class DatasetFacts(BaseModel):
    facts: dict[str, Any]
    cells: list[CategoryCells]


class RunInfo(BaseModel):
    id: int
    name: str
    n_jobs: int
    imported_at: datetime
    models: list[str]


class RunSummary(BaseModel):
    run: str
    choices: dict[str, list[str]]
    picked: dict[str, str | None]
    by_model: list[dict[str, Any]]
    by_value: list[dict[str, Any]]


class ModelInfo(BaseModel):
    name: str
    bundles: int


class BundleInfo(BaseModel):
    id: int
    name: str
    model: str
    kind: str
    strategy: str
    sha256: str
    meta: dict[str, Any]


class Problem(BaseModel):
    severity: str
    where: str
    message: str


class CheckReport(BaseModel):
    source: str
    ok: bool
    facts: dict[str, Any]
    tables: list[dict[str, Any]]
    problems: list[Problem]


class JobBundle(BaseModel):
    id: int
    name: str
    model: str
    kind: str
    strategy: str
    uploaded: bool


class JobView(BaseModel):
    status: str = Field(description="checked, queued, running, done, failed or interrupted")
    stage: str
    progress: float
    message: str | None
    file: str
    n_cells: int
    n_genes: int
    model: str | None
    threshold: float
    bundle: JobBundle | None
    created_at: datetime
    queued_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None
    report: CheckReport
    summary: dict[str, Any]


class JobCreated(BaseModel):
    token: str = Field(description="the only key to this job: keep it; it is shown once and not stored")
    job: JobView
    links: dict[str, str]


class Rejection(BaseModel):
    detail: str
    report: CheckReport | None = None


class PredictionRows(BaseModel):
    total: int
    offset: int
    rows: list[dict[str, Any]]


# --- health ------------------------------------------------------------------------------------------------

@router.get("/health", response_model=Health, tags=["operations"],
            responses={503: {"model": Health, "description": "the database, the disk or the worker is not usable"}})
def health(request: Request, session: DbSession) -> Any:
    """Report the database, the worker, the queue and the disk; answer 503 when any of them is not usable."""
    worker = request.app.state.worker
    settings = request.app.state.settings
    storage = request.app.state.storage
    worker_state = "running" if worker.alive else ("dead" if settings.run_worker else "stopped")
    problems = []
    try:
        free = storage.free_bytes()
        used = storage.usage_bytes()
    except OSError as err:
        free, used = 0, 0
        problems.append(f"the storage folders cannot be read ({err.strerror or err})")
    facts = {"version": __version__, "worker": worker_state, "disk_free_mb": round(free / 2**20, 1),
             "storage_used_mb": round(used / 2**20, 1), "storage_quota_mb": settings.disk_quota_mb}
    if free < settings.min_free_disk_mb * 2**20 and not problems:
        problems.append(f"less than {settings.min_free_disk_mb:g} MiB free on the disk")
    if worker_state == "dead":
        problems.append("the job worker is not running")
    try:
        session.execute(text("SELECT 1"))
        counts = dict(session.execute(select(PredictionJob.status, func.count()).group_by(PredictionJob.status)).all())
    except Exception:  # any database failure reads as unhealthy
        log.exception("health check: database unreachable")
        return JSONResponse({"status": "error", "database": "unreachable", "jobs_waiting": 0, "jobs_running": 0,
                             "uploads_pending": 0, **facts, "problems": [*problems, "the database cannot be reached"]},
                            status_code=503)
    body = {"status": "error" if problems else "ok", "database": "ok", **facts,
            "jobs_waiting": int(counts.get("queued", 0)), "jobs_running": int(counts.get("running", 0)),
            "uploads_pending": int(counts.get("checked", 0)), "problems": problems}
    return JSONResponse(body, status_code=503) if problems else body


# --- catalog -----------------------------------------------------------------------------------------------

@router.get("/api/catalog", response_model=list[CatalogEntry], tags=["catalog"])
def catalog(collection: str | None = None, tissue: str | None = None, cancer_type: str | None = None,
            therapy: str | None = None, regimen: str | None = None) -> Any:
    """List the curated data sets, filtered (case-insensitive substring) by any of the five fields."""
    from scdrugmap.data.catalog import filter_catalog

    table = filter_catalog(collection=collection or None, tissue=tissue or None, cancer_type=cancer_type or None,
                           therapy=therapy or None, regimen=regimen or None)
    return records(table[[c for c in CatalogEntry.model_fields if c in table.columns]])


@router.get("/api/catalog/{dataset_id}", response_model=DatasetFacts, tags=["catalog"])
def dataset(dataset_id: str) -> Any:
    """Show every fact of one data set and its cells per category value."""
    return dataset_facts(dataset_id)


# --- benchmark results -------------------------------------------------------------------------------------

@router.get("/api/runs", response_model=list[RunInfo], tags=["benchmarks"])
def runs(session: DbSession) -> Any:
    """List the imported benchmark runs."""
    listed = []
    for run in result_service.list_runs(session):
        models = sorted(session.scalars(select(BenchmarkResult.model).where(BenchmarkResult.run_id == run.id)
                                        .group_by(BenchmarkResult.model)))
        listed.append({"id": run.id, "name": run.name, "n_jobs": run.n_jobs, "imported_at": run.imported_at,
                       "models": models})
    return listed


ChoiceQuery = Annotated[str | None, Query(max_length=300)]


@router.get("/api/runs/{run_id}/summary", response_model=RunSummary, tags=["benchmarks"])
def summary(run_id: int, session: DbSession, category: ChoiceQuery = None, strategy: ChoiceQuery = None,
            head: ChoiceQuery = None, scenario: ChoiceQuery = None, split: ChoiceQuery = None) -> Any:
    """Mean and sd of every metric per model, and per model and category value, for one choice of
    category, strategy, head, scenario and split (defaults: the first available, frozen/mlp/pooled/sample)."""
    found = run_summary(session, run_id, {"category": category, "strategy": strategy, "head": head,
                                          "scenario": scenario, "split": split})
    return {k: v for k, v in found.items() if not k.startswith("_")}


@router.get("/api/runs/{run_id}/summary.csv", tags=["benchmarks"],
            responses={200: {"content": {"text/csv": {}}, "description": "the per model and value table"}})
def summary_csv(run_id: int, session: DbSession, category: ChoiceQuery = None, strategy: ChoiceQuery = None,
                head: ChoiceQuery = None, scenario: ChoiceQuery = None, split: ChoiceQuery = None) -> Response:
    """Download the explorer's table (per model and category value) as CSV."""
    found = run_summary(session, run_id, {"category": category, "strategy": strategy, "head": head,
                                          "scenario": scenario, "split": split})
    table = found["_by_value"]
    for name, value in found["picked"].items():
        table.insert(len(table.columns) if name != "category" else 0, name, value)
    buffer = io.StringIO()
    table.to_csv(buffer, index=False)
    filename = f"scdrugmap-{found['run']}-{found['picked']['category']}.csv"
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in filename)
    return Response(buffer.getvalue(), media_type="text/csv",
                    headers={"content-disposition": f'attachment; filename="{safe}"'})


# --- models and bundles ------------------------------------------------------------------------------------

@router.get("/api/models", response_model=list[ModelInfo], tags=["prediction"])
def models(session: DbSession) -> Any:
    """List the registered models and how many public head bundles each has."""
    from scdrugmap.registry import model_names

    counts: dict[str, int] = {}
    for bundle in public_bundles(session):
        counts[bundle.model] = counts.get(bundle.model, 0) + 1
    return [{"name": name, "bundles": counts.get(name, 0)} for name in model_names()]


@router.get("/api/bundles", response_model=list[BundleInfo], tags=["prediction"])
def bundles(session: DbSession) -> Any:
    """List the head bundles every user may predict with."""
    return [{"id": b.id, "name": b.name, "model": b.model, "kind": b.kind, "strategy": b.strategy, "sha256": b.sha256,
             "meta": b.meta} for b in public_bundles(session)]


# --- jobs --------------------------------------------------------------------------------------------------

def links(token: str) -> dict[str, str]:
    return {"page": f"/jobs/{token}", "api": f"/api/jobs/{token}", "run": f"/api/jobs/{token}/run",
            "results": f"/jobs/{token}/results", "csv": f"/api/jobs/{token}/predictions.csv",
            "h5ad": f"/api/jobs/{token}/predictions.h5ad", "biomarkers": f"/api/jobs/{token}/biomarkers",
            "biomarkers_csv": f"/api/jobs/{token}/biomarkers.csv"}


@router.post("/api/jobs", status_code=201, response_model=JobCreated, tags=["prediction"],
             responses={413: {"model": Rejection}, 415: {"model": Rejection}, 422: {"model": Rejection}})
def create_job(request: Request, session: DbSession,
               file: Annotated[UploadFile, File(description="an .h5ad file of cells x genes")]) -> Any:
    """Upload an .h5ad and check it. Valid data becomes a job (its token is in the answer); data with errors
    is refused with the check report, and nothing is kept."""
    try:
        token, job = job_service.create_job(session, request.app.state.storage, file.file, filename=file.filename,
                                            content_type=file.content_type)
    except UploadRejected as err:
        return JSONResponse({"detail": err.message, "report": err.report}, status_code=err.status)
    return {"token": token, "job": job_service.job_view(session, job), "links": links(token)}


@router.get("/api/jobs/{token}", response_model=JobView, tags=["prediction"], responses={404: {"model": Rejection}})
def get_job(token: str, session: DbSession) -> Any:
    """Show a job: its state and progress, check report, choices and (when done) summary."""
    return job_service.job_view(session, job_or_404(session, token))


@router.post("/api/jobs/{token}/run", status_code=202, response_model=JobView, tags=["prediction"],
             responses={404: {"model": Rejection}, 409: {"model": Rejection}, 422: {"model": Rejection},
                        429: {"model": Rejection}})
def run_job(request: Request, token: str, session: DbSession,
            model: Annotated[str | None, Form(max_length=100)] = None,
            bundle_id: Annotated[int | None, Form()] = None,
            threshold: Annotated[float, Form(gt=0, lt=1)] = 0.5,
            head_json: Annotated[UploadFile | None, File(description="head.json of an own bundle")] = None,
            head_safetensors: Annotated[UploadFile | None, File(description="head.safetensors")] = None) -> Any:
    """Queue the prediction of a checked job with a model and a head bundle (listed, or uploaded here).
    A failed or interrupted job can be submitted again."""
    job = submit(request, session, token, model=model, bundle_id=bundle_id, threshold=threshold,
                 head_json=head_json, head_safetensors=head_safetensors)
    return job_service.job_view(session, job)


def _finished_frame(request: Request, session: Session, token: str):
    job = job_or_404(session, token)
    frame = job_service.predictions_frame(request.app.state.storage, job)
    if frame is None:
        raise HTTPException(409, f"the job is {job.status}; predictions exist once it is done.")
    return job, frame


@router.get("/api/jobs/{token}/predictions", response_model=PredictionRows, tags=["prediction"])
def predictions(request: Request, token: str, session: DbSession, offset: Annotated[int, Query(ge=0)] = 0,
                limit: Annotated[int, Query(ge=1, le=MAX_PAGE_ROWS)] = 100) -> Any:
    """Per-cell predictions of a finished job, a page at a time."""
    _, frame = _finished_frame(request, session, token)
    return {"total": len(frame), "offset": offset, "rows": records(frame.iloc[offset : offset + limit])}


@router.get("/api/jobs/{token}/samples", tags=["prediction"])
def samples(request: Request, token: str, session: DbSession) -> list[dict[str, Any]]:
    """Per sample: cells, cells predicted sensitive and resistant, mean probability, observed labels."""
    _, frame = _finished_frame(request, session, token)
    return records(job_service.sample_summary(frame))


def _download(request: Request, session: Session, token: str, filename: str, suffix: str, media_type: str):
    job = job_or_404(session, token)
    path = job_service.output_file(request.app.state.storage, job, filename)
    if path is None:
        raise HTTPException(409, f"the job is {job.status}; downloads exist once it is done.")
    stem = job.display_name.rsplit(".", 1)[0] or "predictions"
    return FileResponse(path, media_type=media_type, filename=f"{stem}.predicted{suffix}")


@router.get("/api/jobs/{token}/predictions.csv", tags=["prediction"],
            responses={200: {"content": {"text/csv": {}}, "description": "per-cell predictions"}})
def predictions_csv(request: Request, token: str, session: DbSession) -> FileResponse:
    """Download the per-cell predictions as CSV (cell, prob_sensitive, prediction, sample, observed)."""
    return _download(request, session, token, job_service.PREDICTIONS_CSV, ".csv", "text/csv")


@router.get("/api/jobs/{token}/predictions.h5ad", tags=["prediction"],
            responses={200: {"content": {"application/x-hdf5": {}}, "description": "the upload with predictions"}})
def predictions_h5ad(request: Request, token: str, session: DbSession) -> FileResponse:
    """Download the uploaded data with predictions in obs and the embedding (and its 2-D view) in obsm."""
    return _download(request, session, token, job_service.PREDICTIONS_H5AD, ".h5ad", "application/x-hdf5")


@router.get("/api/jobs/{token}/biomarkers", tags=["prediction"], responses={404: {"model": Rejection}})
def biomarkers(request: Request, token: str, session: DbSession) -> dict[str, Any]:
    """The biomarkers of a finished job: predicted-resistant vs predicted-sensitive cells (``status``, and when
    done the compared groups, the tests with their unit and N, the top genes per direction, caveats,
    enrichment and the figures at ``/api/jobs/<token>/biomarkers/<role>.png``)."""
    job = job_or_404(session, token)
    return make_json_safe(job_service.biomarker_view(request.app.state.storage, job))


@router.get("/api/jobs/{token}/biomarkers.csv", tags=["prediction"],
            responses={200: {"content": {"text/csv": {}}, "description": "one row per gene and test"}})
def biomarkers_csv(request: Request, token: str, session: DbSession) -> Response:
    """Download the biomarker table of a finished job (one row per gene and test; `scdrugmap.tl.BIOMARKER_COLUMNS`)."""
    import pandas as pd

    job = job_or_404(session, token)
    path = job_service.biomarker_file(request.app.state.storage, job, "table")
    if path is None:
        raise HTTPException(404, "this job has no biomarkers (see its results page for why).")
    stem = job.display_name.rsplit(".", 1)[0] or "predictions"
    return Response(pd.read_parquet(path).to_csv(index=False), media_type="text/csv",
                    headers={"Content-Disposition": f'attachment; filename="{stem}.biomarkers.csv"'})


@router.get("/api/jobs/{token}/biomarkers/{role}.png", tags=["prediction"],
            responses={200: {"content": {"image/png": {}}, "description": "a biomarker figure"}})
def biomarker_figure(request: Request, token: str, role: str, session: DbSession) -> FileResponse:
    """One figure of a job's biomarkers: ``volcano``, ``dotplot``, ``attribution`` or ``enrichment_figure``."""
    from scdrugmap.evaluate.store import BIOMARKER_FIGURES

    job = job_or_404(session, token)
    path = job_service.biomarker_file(request.app.state.storage, job, role) if role in BIOMARKER_FIGURES else None
    if path is None:
        raise HTTPException(404, f"this job has no biomarker figure {role!r}.")
    return FileResponse(path, media_type="image/png")
