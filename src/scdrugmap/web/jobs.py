"""Prediction jobs: created from a checked upload, queued with a model and head bundle, read by token.

A job is reachable only through its token (``secrets.token_urlsafe``, 256 bits); the database
keeps the token's sha256, and nothing lists jobs. An unknown, malformed or missing token reads
as "no such job", the same answer whether or not a job exists.
"""

from __future__ import annotations

import logging
import re
import secrets
from typing import IO, TYPE_CHECKING, Any

import pandas as pd
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from scdrugmap.errors import ConfigError
from scdrugmap.web.bundles import check_bundle, describe
from scdrugmap.web.checks import model_input_problem, prediction_report
from scdrugmap.web.db import ACTIVE_STATES, MAX_ID, HeadBundle, PredictionJob, hash_token, utcnow
from scdrugmap.web.storage import Storage, UploadRejected, display_name

if TYPE_CHECKING:
    from scdrugmap.web.settings import Settings

log = logging.getLogger(__name__)

TOKEN_BYTES = 32
_TOKEN = re.compile(r"^[A-Za-z0-9_-]{32,128}$")
#: States from which a job can be (re)submitted with a model and bundle.
SUBMITTABLE = ("checked", "failed", "interrupted")
PREDICTIONS_PARQUET = "predictions.parquet"
PREDICTIONS_CSV = "predictions.csv"
PREDICTIONS_H5AD = "predictions.h5ad"
#: Folder of a job's output with the biomarkers of its predicted groups (`scdrugmap.tl.Biomarkers.write`).
BIOMARKERS_DIR = "biomarkers"


class JobRefused(Exception):
    """A submission the server refuses: HTTP status and a message safe to show."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def new_token() -> str:
    return secrets.token_urlsafe(TOKEN_BYTES)


def find_job(session: Session, token: str | None) -> PredictionJob | None:
    """Return the job of ``token``, or None for an unknown or malformed token."""
    if not token or not _TOKEN.match(token):
        return None
    return session.scalar(select(PredictionJob).where(PredictionJob.token_hash == hash_token(token)))


def create_job(session: Session, storage: Storage, stream: IO[bytes], *, filename: str | None,
               content_type: str | None) -> tuple[str, PredictionJob]:
    """Check an uploaded ``.h5ad`` and, when it is valid, keep it as a new job; return (token, job).

    Uploads waiting for a submission count toward the server's limit (`Settings.max_pending_uploads`,
    with the queued and running jobs) and toward its disk quota. The file passes the validation gate
    (`scdrugmap.data.gate`: declared shape against a job's memory, unwritten values, encodings) before
    any of it is read, and is then checked in blocks, a few uploads at a time.

    Raises
    ------
    UploadRejected
        For a wrong type, an oversize or unreadable file (nothing is kept), data with errors (the
        rejection carries the check report; nothing is kept or queued), 429 when too many uploads
        wait, 507 when the disk or the quota is full.
    """
    name = display_name(filename)
    settings = storage.settings
    outstanding = outstanding_jobs(session)
    if outstanding >= settings.max_pending_uploads:
        raise UploadRejected(429, f"the server holds {outstanding} uploads waiting or running, its limit; submit or "
                                  "let earlier ones finish, or try again later.")
    problem = storage.disk_problem()
    if problem:
        raise UploadRejected(507, problem)
    staged = storage.stage(stream, filename=filename, content_type=content_type)
    try:
        problem = storage.disk_problem()
        if problem:
            raise UploadRejected(507, problem)
        storage.gate_staged(staged, name=name)
        with storage.checking:
            adata = storage.read_staged(staged, name=name)
            try:
                n_cells, n_genes = int(adata.n_obs), int(adata.n_vars)
                report = prediction_report(adata, source=name)
            except Exception as err:  # the checks assume a well-formed AnnData; a crafted one may break them
                log.warning("check failed on an upload", exc_info=True)
                raise UploadRejected(422, f"{name}: the data could not be checked; is it a valid AnnData "
                                          "file of cells x genes?") from err
            finally:
                adata.file.close()
        if not report["ok"]:
            raise UploadRejected(422, f"{name}: the data has errors (listed below); fix them and upload again.",
                                 report)
        upload_name = storage.keep(staged)
    finally:
        staged.unlink(missing_ok=True)
    token = new_token()
    job = PredictionJob(token_hash=hash_token(token), status="checked", display_name=name, upload_name=upload_name,
                        n_cells=n_cells, n_genes=n_genes, report=report, stage="checked")
    session.add(job)
    session.commit()
    log.info("upload accepted", extra={"job": job.id, "cells": job.n_cells, "genes": job.n_genes})
    return token, job


def outstanding_jobs(session: Session) -> int:
    """Jobs holding an upload that is not finished: checked (not yet submitted), queued or running."""
    return int(session.scalar(select(func.count()).select_from(PredictionJob)
                              .where(PredictionJob.status.in_(("checked", *ACTIVE_STATES)))) or 0)


def active_jobs(session: Session) -> int:
    return int(session.scalar(select(func.count()).select_from(PredictionJob)
                              .where(PredictionJob.status.in_(ACTIVE_STATES))) or 0)


def usable_bundle(session: Session, job: PredictionJob, bundle_id: int | None) -> HeadBundle | None:
    """Return a bundle the job may use: a public one, or one uploaded with this job."""
    if bundle_id is None or not 0 < bundle_id <= MAX_ID:
        return None
    bundle = session.get(HeadBundle, bundle_id)
    if bundle is None or not bundle.available or (not bundle.public and bundle.owner_job_id != job.id):
        return None
    return bundle


def submit_job(session: Session, storage: Storage, settings: Settings, job: PredictionJob, *, model: str | None,
               bundle_id: int | None, threshold: float = 0.5,
               bundle_upload: tuple[IO[bytes], str | None, IO[bytes], str | None] | None = None) -> None:
    """Queue ``job`` with a model and a head bundle (a registered one, or ``bundle_upload``: JSON and weights).

    Raises
    ------
    JobRefused
        409 when the job is not waiting for a choice, 422 for an unknown model or bundle, a bundle of
        another model, or data the model cannot read; 429 when the server has too many jobs waiting.
    UploadRejected
        When an uploaded bundle is not a bundle.
    """
    from scdrugmap.registry import model_names

    if job.status not in SUBMITTABLE:
        raise JobRefused(409, f"this job is {job.status}; only a checked, failed or interrupted job can be submitted.")
    if not 0.0 < threshold < 1.0:
        raise JobRefused(422, f"threshold {threshold}: choose a probability between 0 and 1.")
    known = set(model_names())
    if model is not None and model not in known:
        raise JobRefused(422, f"unknown model {model!r}; known models: {', '.join(sorted(known))}.")
    if active_jobs(session) >= settings.max_queued_jobs:
        raise JobRefused(429, f"the server has {settings.max_queued_jobs} jobs waiting or running, its limit; "
                              "try again later.")
    bundle: HeadBundle | None
    if bundle_upload is not None:
        meta_stream, meta_type, weights_stream, weights_type = bundle_upload
        name, meta, sha256 = storage.store_bundle(meta_stream, meta_type, weights_stream, weights_type,
                                                  known_models=known)
        try:
            check_bundle(storage.bundle_dir(name), known_models=known)
        except UploadRejected:
            storage.remove_bundle(name)
            raise
        bundle = HeadBundle(name="uploaded bundle", model=str(meta["model"]), kind=str(meta["kind"]),
                            strategy=str(meta.get("strategy", "frozen")), sha256=sha256, meta=describe(meta),
                            location=name, public=False, owner_job_id=job.id, available=True)
        session.add(bundle)
        session.flush()
    else:
        bundle = usable_bundle(session, job, bundle_id)
        if bundle is None:
            raise JobRefused(422, "choose one of the listed head bundles, or upload one (head.json and "
                                  "head.safetensors).")
    try:
        model = _check_choice(job, bundle, model or bundle.model)
        _check_head_applies(storage, job, bundle)
    except JobRefused:
        session.rollback()
        if not bundle.public:
            storage.remove_bundle(bundle.location)
        raise
    job.status = "queued"
    job.model = model
    job.bundle_id = bundle.id
    job.threshold = float(threshold)
    job.queued_at = utcnow()
    job.started_at = job.finished_at = job.heartbeat_at = None
    job.progress = 0.0
    job.stage = "waiting for a worker"
    job.message = None
    job.summary = {}
    job.worker_id = None
    session.commit()
    log.info("job queued", extra={"job": job.id, "model": model, "bundle": bundle.id})


def _check_head_applies(storage: Storage, job: PredictionJob, bundle: HeadBundle) -> None:
    """Refuse (422) an upload the head cannot be trusted on: too few of its genes, or values of another kind.

    The same guard as ``scdrugmap predict`` and `scdrugmap.tl.predict`, with the same message; the upload
    is opened backed, so only its gene names and first rows are read.
    """
    from scdrugmap import read_head, tl
    from scdrugmap.data.io import read_h5ad
    from scdrugmap.errors import ScDrugMapError
    from scdrugmap.web.bundles import bundle_folder

    try:
        head = read_head(bundle_folder(bundle, storage))
    except ScDrugMapError:
        return  # an unreadable bundle fails in the worker with its own message
    adata = read_h5ad(storage.upload_path(job.upload_name), backed=True)
    try:
        tl.check_head(adata, head, source=job.display_name)
    except ScDrugMapError as err:
        raise JobRefused(422, str(err)) from err
    finally:
        adata.file.close()


def _check_choice(job: PredictionJob, bundle: HeadBundle, model: str) -> str:
    """Return ``model`` when it fits the bundle and can read the checked data; refuse otherwise."""
    from scdrugmap.registry import input_kind as model_input_kind

    if bundle.model != model:
        raise JobRefused(422, f"the head bundle was trained on {bundle.model} embeddings, not {model}; choose "
                              f"model {bundle.model} or another bundle.")
    try:
        input_kind = model_input_kind(model)
    except (ImportError, ConfigError) as err:
        raise JobRefused(422, f"model {model} is not available on this server.") from err
    problem = model_input_problem(job.report, model=model, input_kind=input_kind)
    if problem:
        raise JobRefused(422, problem)
    return model


def job_view(session: Session, job: PredictionJob) -> dict[str, Any]:
    """Return what a job's owner may see: state, progress, report, choices and summary (no paths)."""
    bundle = session.get(HeadBundle, job.bundle_id) if job.bundle_id else None
    return {
        "status": job.status, "stage": job.stage, "progress": round(float(job.progress or 0.0), 4),
        "message": job.message, "file": job.display_name, "n_cells": job.n_cells, "n_genes": job.n_genes,
        "model": job.model, "threshold": job.threshold,
        "bundle": None if bundle is None else {"id": bundle.id, "name": bundle.name, "model": bundle.model,
                                               "kind": bundle.kind, "strategy": bundle.strategy,
                                               "uploaded": not bundle.public},
        "created_at": job.created_at, "queued_at": job.queued_at, "started_at": job.started_at,
        "finished_at": job.finished_at, "report": job.report, "summary": job.summary or {},
    }


def output_file(storage: Storage, job: PredictionJob, filename: str) -> Any:
    """Return the path of one of a finished job's output files (a fixed name in its random folder), or None."""
    if job.status != "done" or not job.output_name:
        return None
    path = storage.output_dir(job.output_name) / filename
    return path if path.is_file() else None


def predictions_frame(storage: Storage, job: PredictionJob) -> pd.DataFrame | None:
    path = output_file(storage, job, PREDICTIONS_PARQUET)
    return None if path is None else pd.read_parquet(path)


def biomarker_view(storage: Storage, job: PredictionJob) -> dict[str, Any]:
    """Return what the results page shows of a job's biomarkers (predicted resistant vs predicted sensitive).

    ``status`` and ``reason`` (from the job's summary), and when found: ``compared`` (which groups),
    ``lines`` (attribution, deletion, stability), per test its ``caption`` (unit, N, aggregation) and its
    ``up`` / ``down`` top genes, ``caveats``, ``enrichment`` rows and ``figures`` (role, title, caption; served
    at ``/api/jobs/<token>/biomarkers/<role>.png``).
    """
    from scdrugmap.errors import ConfigError as NotFound
    from scdrugmap.evaluate.store import read_biomarkers
    from scdrugmap.report import biomarker_section as section
    from scdrugmap.web.results import records

    about = dict((job.summary or {}).get("biomarkers") or {"status": "skipped",
                                                           "reason": "this job ran before biomarkers were found."})
    if about.get("status") != "done" or job.status != "done" or not job.output_name:
        return about
    try:
        found = read_biomarkers(storage.output_dir(job.output_name) / BIOMARKERS_DIR)
    except NotFound:
        return {"status": "failed", "reason": "the biomarker files of this job are missing."}
    facts, tops = found.facts, section.top_gene_rows(found)
    tests = []
    for test in facts.get("tests", {}).get("predicted", []):
        rows = tops[tops["test"] == test]
        tests.append({"name": test, "caption": section.test_caption(found, "predicted", test),
                      **{direction: records(section.genes_table(rows[rows["direction"] == direction]))
                         for direction in ("up", "down")}})
    enrichment = (records(section.enrichment_table(found.enrichment))
                  if found.enrichment is not None and len(found.enrichment) else [])
    figures = [{"role": role, "title": section.FIGURE_TITLES[role], "caption": section.FIGURE_CAPTIONS[role]}
               for role in found.figures]
    return {**about, "compared": section.groups_caption(facts, "predicted"), "lines": section.model_lines(facts),
            "tests": tests, "caveats": list(facts.get("caveats", [])), "enrichment": enrichment, "figures": figures}


def biomarker_file(storage: Storage, job: PredictionJob, role: str) -> Any:
    """Return the path of one of a finished job's biomarker files by role (`BIOMARKER_FILES`), or None."""
    from scdrugmap.evaluate.store import BIOMARKER_FILES

    name = BIOMARKER_FILES.get(role)
    if name is None or job.status != "done" or not job.output_name:
        return None
    path = storage.output_dir(job.output_name) / BIOMARKERS_DIR / name
    return path if path.is_file() else None


def sample_summary(frame: pd.DataFrame) -> pd.DataFrame:
    """Return per sample (or for all cells): cells, predicted sensitive/resistant, mean probability, observed label."""
    frame = frame.assign(sample=frame.get("sample", "all cells"))
    frame = frame.assign(called_sensitive=frame["prediction"] == "sensitive",
                         called_resistant=frame["prediction"] == "resistant")
    aggregations: dict[str, Any] = {"cells": ("cell", "size"), "predicted_sensitive": ("called_sensitive", "sum"),
                                    "predicted_resistant": ("called_resistant", "sum"),
                                    "mean_probability": ("probability", "mean")}
    if "observed" in frame:
        aggregations["observed"] = ("observed", lambda s: ", ".join(sorted(set(s.dropna().astype(str)))))
    table = frame.groupby("sample", sort=True).agg(**aggregations).reset_index()
    table["share_sensitive"] = table["predicted_sensitive"] / table["cells"]
    return table
