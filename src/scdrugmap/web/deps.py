"""Request dependencies shared by the JSON API (`scdrugmap.web.api`) and the pages (`scdrugmap.web.pages`).

One database session per request (`get_session`, `DbSession`), the job behind a token
(`job_or_404`), and queueing a job (`submit`). Neither router imports the other: both import
this module and `scdrugmap.web.results`.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, HTTPException, Request, UploadFile
from sqlalchemy.orm import Session

from scdrugmap.web import jobs as job_service
from scdrugmap.web.db import PredictionJob
from scdrugmap.web.storage import UploadRejected

NO_JOB = "no such job: the token is wrong or the job was removed."


def get_session(request: Request) -> Iterator[Session]:
    """FastAPI dependency: one database session per request."""
    with request.app.state.sessions() as session:
        yield session


DbSession = Annotated[Session, Depends(get_session)]


def job_or_404(session: Session, token: str) -> PredictionJob:
    """Return the job of ``token``; raise HTTPException 404 when there is none."""
    job = job_service.find_job(session, token)
    if job is None:
        raise HTTPException(404, NO_JOB)
    return job


def submit(request: Request, session: Session, token: str, *, model: str | None, bundle_id: int | None,
           threshold: float, head_json: UploadFile | None, head_safetensors: UploadFile | None) -> PredictionJob:
    """Queue a job (shared by the API and the page); raises HTTPException with a message to show."""
    job = job_or_404(session, token)
    given = [part for part in (head_json, head_safetensors) if part is not None and part.filename]
    if len(given) == 1:
        raise HTTPException(422, "an uploaded bundle needs both head.json and head.safetensors.")
    upload = None
    if head_json is not None and head_safetensors is not None and len(given) == 2:
        upload = (head_json.file, head_json.content_type, head_safetensors.file, head_safetensors.content_type)
    try:
        job_service.submit_job(session, request.app.state.storage, request.app.state.settings, job, model=model or None,
                               bundle_id=bundle_id, threshold=threshold, bundle_upload=upload)
    except (job_service.JobRefused, UploadRejected) as err:
        raise HTTPException(err.status, err.message) from err
    request.app.state.worker.wake()
    return job
