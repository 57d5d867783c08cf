"""Server-rendered pages: home, catalog, benchmark explorer, prediction (upload, job, results).

Pages share their data and dependencies with the API through `scdrugmap.web.results` and
`scdrugmap.web.deps` (never importing the API module itself); charts are plotly figures embedded
as JSON and drawn by ``static/app.js``.
"""

from __future__ import annotations

from typing import Annotated, Any
from urllib.parse import urlencode

from fastapi import APIRouter, File, Form, HTTPException, Query, Request, UploadFile
from fastapi.responses import RedirectResponse, Response
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from scdrugmap.web import charts
from scdrugmap.web import jobs as job_service
from scdrugmap.web.bundles import public_bundles
from scdrugmap.web.db import BenchmarkRun, PredictionJob
from scdrugmap.web.deps import DbSession, submit
from scdrugmap.web.results import (
    CHOICES,
    category_table,
    dataset_facts,
    list_runs,
    records,
    run_frame,
    run_summary,
)
from scdrugmap.web.storage import UploadRejected

router = APIRouter(include_in_schema=False)
ROWS_PER_PAGE = 50
METRICS_SHOWN = ("f1", "auroc", "accuracy", "precision", "recall")
CATALOG_COLUMNS = ("dataset_id", "collection", "study", "tissue", "cancer_type", "therapy", "regimen", "n_samples")


def render(request: Request, name: str, context: dict[str, Any], status: int = 200) -> Response:
    return request.app.state.templates.TemplateResponse(request, name, context, status_code=status)


@router.get("/")
def home(request: Request, session: DbSession) -> Response:
    from scdrugmap.data.catalog import load_catalog

    catalog = load_catalog()
    counts = {"datasets": len(catalog), "primary": int((catalog["collection"] == "primary").sum()),
              "runs": int(session.scalar(select(func.count()).select_from(BenchmarkRun)) or 0),
              "bundles": len(public_bundles(session))}
    return render(request, "home.html", {"counts": counts, "nav": "home"})


# --- catalog -----------------------------------------------------------------------------------------------

@router.get("/catalog")
def catalog_page(request: Request, collection: str | None = None, tissue: str | None = None,
                 cancer_type: str | None = None, therapy: str | None = None, regimen: str | None = None) -> Response:
    from scdrugmap.data.catalog import FILTERS, filter_catalog, load_catalog

    chosen = {"collection": collection, "tissue": tissue, "cancer_type": cancer_type, "therapy": therapy,
              "regimen": regimen}
    chosen = {k: (v or None) for k, v in chosen.items()}
    full = load_catalog()
    options = {name: sorted(full[name].dropna().astype(str).unique()) for name in FILTERS}
    table = filter_catalog(**chosen)
    rows = records(table[list(CATALOG_COLUMNS)])
    return render(request, "catalog.html", {"rows": rows, "columns": CATALOG_COLUMNS, "options": options,
                                            "chosen": chosen, "total": len(full), "nav": "catalog"})


@router.get("/catalog/{dataset_id}")
def dataset_page(request: Request, dataset_id: str) -> Response:
    found = dataset_facts(dataset_id)
    return render(request, "dataset.html", {**found, "nav": "catalog"})


# --- benchmark explorer ------------------------------------------------------------------------------------

@router.get("/benchmarks")
def benchmarks_page(request: Request, session: DbSession) -> Response:
    runs = list_runs(session)
    if len(runs) == 1:
        return RedirectResponse(f"/benchmarks/{runs[0].id}", status_code=307)
    return render(request, "benchmarks.html", {"runs": runs, "nav": "benchmarks"})


@router.get("/benchmarks/{run_id}")
def explorer_page(request: Request, run_id: int, session: DbSession,
                  category: Annotated[str | None, Query(max_length=300)] = None,
                  strategy: Annotated[str | None, Query(max_length=300)] = None,
                  head: Annotated[str | None, Query(max_length=300)] = None,
                  scenario: Annotated[str | None, Query(max_length=300)] = None,
                  split: Annotated[str | None, Query(max_length=300)] = None,
                  metric: Annotated[str, Query(max_length=20)] = "f1") -> Response:
    found = run_summary(session, run_id, {"category": category, "strategy": strategy, "head": head,
                                          "scenario": scenario, "split": split})
    metric = metric if metric in METRICS_SHOWN else "f1"
    picked = found["picked"]
    where = f"{picked['category']} · {picked['strategy']}/{picked['head']} · {picked['scenario']} · {picked['split']}"
    figures = {
        "bar": charts.metric_bar(found["_by_model"], metric, where),
        "radar": charts.metric_radar(found["_by_value"], metric, category=str(picked["category"]),
                                     by_category=category_table(run_frame(session, run_id, **{
                                         k: v for k, v in picked.items() if k != "category"}))),
    }
    query = urlencode({k: v for k, v in picked.items() if v is not None})
    return render(request, "explorer.html", {
        "run": session.get(BenchmarkRun, run_id), "runs": list_runs(session), "found": found, "choices": CHOICES,
        "metric": metric, "metrics": METRICS_SHOWN, "labels": charts.METRIC_LABELS, "figures": figures,
        "csv_query": query, "nav": "benchmarks"})


# --- prediction --------------------------------------------------------------------------------------------

@router.get("/predict")
def predict_page(request: Request) -> Response:
    return render(request, "predict.html", {"nav": "predict"})


@router.post("/predict")
def upload_page(request: Request, session: DbSession, file: Annotated[UploadFile, File()]) -> Response:
    try:
        token, _ = job_service.create_job(session, request.app.state.storage, file.file, filename=file.filename,
                                          content_type=file.content_type)
    except UploadRejected as err:
        return render(request, "predict.html", {"nav": "predict", "error": err.message, "report": err.report},
                      status=err.status)
    return RedirectResponse(f"/jobs/{token}", status_code=303)


def _job_page(request: Request, session: Session, token: str, job: PredictionJob, *, error: str | None = None,
              status: int = 200) -> Response:
    bundles = public_bundles(session)
    from scdrugmap.registry import model_names

    models = model_names()
    view = job_service.job_view(session, job)
    default_model = job.model or (bundles[0].model if bundles else None)
    return render(request, "job.html", {"job": view, "token": token, "bundles": bundles, "models": models,
                                        "default_model": default_model, "error": error, "nav": "predict",
                                        "can_submit": job.status in job_service.SUBMITTABLE}, status=status)


@router.get("/jobs/{token}")
def job_page(request: Request, token: str, session: DbSession) -> Response:
    job = job_service.find_job(session, token)
    if job is None:
        raise HTTPException(404, "There is no job at this link. A job opens only with its full link.")
    return _job_page(request, session, token, job)


@router.post("/jobs/{token}/run")
def run_page(request: Request, token: str, session: DbSession,
             model: Annotated[str | None, Form(max_length=100)] = None,
             bundle_id: Annotated[str | None, Form(max_length=20)] = None,
             threshold: Annotated[float, Form(gt=0, lt=1)] = 0.5,
             head_json: Annotated[UploadFile | None, File()] = None,
             head_safetensors: Annotated[UploadFile | None, File()] = None) -> Response:
    chosen = int(bundle_id) if bundle_id and bundle_id.isdigit() else None
    try:
        submit(request, session, token, model=model, bundle_id=chosen, threshold=threshold, head_json=head_json,
               head_safetensors=head_safetensors)
    except HTTPException as err:
        session.rollback()
        job = job_service.find_job(session, token)
        if job is None:
            raise
        return _job_page(request, session, token, job, error=str(err.detail), status=err.status_code)
    return RedirectResponse(f"/jobs/{token}", status_code=303)


@router.get("/jobs/{token}/results")
def results_page(request: Request, token: str, session: DbSession,
                 page: Annotated[int, Query(ge=1, le=1_000_000)] = 1) -> Response:
    job = job_service.find_job(session, token)
    if job is None:
        raise HTTPException(404, "There is no job at this link. A job opens only with its full link.")
    frame = job_service.predictions_frame(request.app.state.storage, job)
    if frame is None:
        return RedirectResponse(f"/jobs/{token}", status_code=303)
    settings = request.app.state.settings
    view = job_service.job_view(session, job)
    method = view["summary"].get("projection")
    figures = {"histogram": charts.probability_histogram(frame, threshold=job.threshold)}
    if method and frame["x"].notna().any():
        name = "UMAP" if method == "umap" else "PCA"
        figures["scatter"] = charts.prediction_scatter(frame, method=method, max_points=settings.max_plot_points,
                                                       title=f"{name} of the {job.model} embedding")
    pages = max(1, -(-len(frame) // ROWS_PER_PAGE))
    page = min(page, pages)
    rows = records(frame.drop(columns=["x", "y"]).iloc[(page - 1) * ROWS_PER_PAGE : page * ROWS_PER_PAGE])
    return render(request, "results.html", {
        "job": view, "token": token, "figures": figures, "rows": rows, "page": page, "pages": pages,
        "columns": [c for c in frame.columns if c not in ("x", "y")],
        "samples": records(job_service.sample_summary(frame)),
        "biomarkers": job_service.biomarker_view(request.app.state.storage, job), "nav": "predict"})
