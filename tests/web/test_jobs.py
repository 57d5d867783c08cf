"""Prediction jobs through the API: uploads and their checks, tokens, limits, the worker, restarts."""

from __future__ import annotations

import io
import json
import os
import socket

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
from sqlalchemy import select, update

from scdrugmap.web.db import HeadBundle, PredictionJob, utcnow


def _run(client, token, **data):
    return client.post(f"/api/jobs/{token}/run", data={"bundle_id": _bundle_id(client), **data})


def _bundle_id(client):
    return client.get("/api/bundles").json()[0]["id"]


def _stored_uploads(client):
    folder = client.app.state.storage.upload_dir
    return sorted(p.name for p in folder.glob("*.h5ad"))


def _jobs(client):
    with client.app.state.sessions() as session:
        return session.scalars(select(PredictionJob)).all()


# --- uploads -------------------------------------------------------------------------------------------------

def test_valid_upload_creates_a_checked_job_with_its_report(client, upload, good_h5ad):
    response = upload(client, good_h5ad)
    assert response.status_code == 201
    body = response.json()
    assert len(body["token"]) >= 43  # 32 random bytes, url-safe base64
    job = body["job"]
    assert job["status"] == "checked" and job["file"] == "cells.h5ad"
    assert (job["n_cells"], job["n_genes"]) == (60, 57)
    report = job["report"]
    assert report["ok"] and report["facts"]["value_kind"] == "counts"
    assert report["facts"]["labels"] == {"sensitive": 30, "resistant": 30}
    assert [t["column"] for t in report["tables"]][:2] == ["study", "sample"]
    assert body["links"]["page"] == f"/jobs/{body['token']}"


def test_upload_is_stored_under_a_random_name_outside_served_folders(client, upload, good_h5ad):
    token = upload(client, good_h5ad, name="../../etc/evil name.h5ad").json()["token"]
    stored = _stored_uploads(client)
    assert len(stored) == 1 and len(stored[0]) == len("0" * 32 + ".h5ad")
    assert "evil" not in stored[0]
    assert client.get(f"/api/jobs/{token}").json()["file"] == "evil name.h5ad"
    static = client.app.routes[-1].app.directory  # the /static mount
    assert not str(client.app.state.storage.upload_dir).startswith(str(static))
    assert client.get(f"/static/{stored[0]}").status_code == 404
    assert client.get("/static/../uploads/" + stored[0]).status_code == 404


def test_unlabelled_data_is_accepted_with_a_note(client, upload, adata_factory, to_h5ad):
    response = upload(client, to_h5ad(adata_factory(labelled=False)))
    assert response.status_code == 201
    report = response.json()["job"]["report"]
    assert report["ok"]
    notes = [p for p in report["problems"] if p["severity"] == "note"]
    assert notes and "response" in notes[0]["where"]
    assert report["tables"][0]["column"] == "sample"


@pytest.mark.parametrize(("name", "content_type", "content", "status", "says"), [
    ("cells.csv", "text/csv", b"a,b\n1,2\n", 415, "only .h5ad"),
    ("cells.h5ad", "text/plain", b"\x89HDF\r\n\x1a\nxx", 415, "content type"),
    ("cells.h5ad", "image/png", b"\x89PNG....", 415, "content type"),
    ("cells.h5ad", "application/octet-stream", b"just some text, not HDF5", 422, "no HDF5 signature"),
    ("cells.h5ad", "application/octet-stream", b"", 422, "empty"),
])
def test_invalid_uploads_are_refused_and_nothing_is_kept(client, upload, name, content_type, content, status, says):
    response = upload(client, content, name=name, content_type=content_type)
    assert response.status_code == status
    assert says in response.json()["detail"]
    assert _stored_uploads(client) == [] and _jobs(client) == []
    assert list(client.app.state.storage.staging_dir.iterdir()) == []


def test_upload_without_a_file_is_refused_with_422(client):
    response = client.post("/api/jobs", data={"other": "field"})
    assert response.status_code == 422
    assert "file" in response.json()["detail"]


@pytest.mark.filterwarnings("ignore:.*(not unique|without encoding metadata)")
def test_hdf5_that_is_not_anndata_is_refused(client, upload, tmp_path):
    path = tmp_path / "plain.h5"
    with h5py.File(path, "w") as handle:
        handle["numbers"] = np.arange(10)
    response = upload(client, path.read_bytes())
    assert response.status_code == 422
    assert "AnnData" in response.json()["detail"]
    assert str(tmp_path) not in response.text and "staging" not in response.text
    assert _stored_uploads(client) == [] and _jobs(client) == []


@pytest.mark.filterwarnings("ignore:.*(not unique|without encoding metadata)")
def test_data_with_errors_is_refused_with_the_check_report(client, upload, adata_factory, to_h5ad):
    adata = adata_factory()
    X = adata.X.toarray()
    X[0, 0] = np.nan
    adata.X = X
    adata.var_names = ["TP53", *adata.var_names[1:-1], "TP53"]
    response = upload(client, to_h5ad(adata))
    assert response.status_code == 422
    body = response.json()
    assert "errors" in body["detail"]
    errors = [p for p in body["report"]["problems"] if p["severity"] == "error"]
    assert {p["where"] for p in errors} >= {"X", "var_names"}
    assert any("NaN" in p["message"] for p in errors)
    assert _stored_uploads(client) == [] and _jobs(client) == []


def test_oversize_upload_is_refused_with_413(make_client, upload, good_h5ad):
    small = make_client(max_upload_mb=len(good_h5ad) / 2 / 1024 / 1024)
    response = upload(small, good_h5ad)
    assert response.status_code == 413
    assert "limit" in response.json()["detail"]
    assert _stored_uploads(small) == [] and _jobs(small) == []


def test_upload_over_the_limit_but_under_the_envelope_allowance_is_refused(make_client, upload, good_h5ad):
    limit_mb = (len(good_h5ad) - 1000) / 1024 / 1024  # passes the body cap (limit + 1 MiB), not the file limit
    small = make_client(max_upload_mb=limit_mb)
    response = upload(small, good_h5ad)
    assert response.status_code == 413
    assert _stored_uploads(small) == [] and list(small.app.state.storage.staging_dir.iterdir()) == []


def test_streamed_body_without_length_is_cut_at_the_limit(make_client):
    small = make_client(max_upload_mb=0.01)

    def chunks():
        yield b"--x\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.h5ad\"\r\n\r\n"
        for _ in range(300):
            yield b"\0" * 8192

    response = small.post("/api/jobs", content=chunks(), headers={"content-type": "multipart/form-data; boundary=x"})
    assert response.status_code == 413


# --- tokens --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("path", ["/api/jobs/{t}", "/api/jobs/{t}/predictions", "/api/jobs/{t}/samples",
                                  "/api/jobs/{t}/predictions.csv", "/api/jobs/{t}/predictions.h5ad"])
def test_wrong_or_malformed_token_reads_as_no_such_job(client, upload, good_h5ad, path):
    token = upload(client, good_h5ad).json()["token"]
    wrong = token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB")
    for candidate in (wrong, "short", "x" * 64, "../../etc/passwd"):
        response = client.get(path.format(t=candidate))
        assert response.status_code == 404, candidate
    assert client.get(path.format(t=token)).status_code in (200, 409)


def test_wrong_token_cannot_queue_a_job(client, upload, good_h5ad):
    token = upload(client, good_h5ad).json()["token"]
    response = client.post(f"/api/jobs/{token[::-1]}/run", data={"bundle_id": _bundle_id(client)})
    assert response.status_code == 404
    assert client.get(f"/api/jobs/{token}").json()["status"] == "checked"


def test_jobs_cannot_be_listed_or_reached_without_a_token(client, upload, good_h5ad):
    upload(client, good_h5ad)
    assert client.get("/api/jobs").status_code == 405
    assert client.get("/api/jobs/").status_code in (404, 405)
    assert client.get("/jobs").status_code == 404
    assert client.get("/jobs/").status_code == 404


def test_database_keeps_only_the_token_hash(client, upload, good_h5ad):
    token = upload(client, good_h5ad).json()["token"]
    (job,) = _jobs(client)
    assert token not in job.token_hash and len(job.token_hash) == 64


# --- submitting ----------------------------------------------------------------------------------------------

def test_run_needs_a_bundle_of_the_chosen_model(client, upload, good_h5ad):
    token = upload(client, good_h5ad).json()["token"]
    assert client.post(f"/api/jobs/{token}/run", data={}).status_code == 422
    response = _run(client, token, model="hvg")
    assert response.status_code == 422 and "trained on pca" in response.json()["detail"]
    response = client.post(f"/api/jobs/{token}/run", data={"bundle_id": 999})
    assert response.status_code == 422
    response = _run(client, token, model="nonexistent")
    assert response.status_code == 422 and "unknown model" in response.json()["detail"]
    response = _run(client, token, threshold="1.5")
    assert response.status_code == 422
    assert client.get(f"/api/jobs/{token}").json()["status"] == "checked"


@pytest.mark.parametrize(("model", "values", "says"), [
    ("scfoundation", "log", "needs raw counts"),
    ("geneformer", "zscore", "ranks non-negative expression"),
])
def test_model_input_needs_are_checked_before_queueing(client, upload, adata_factory, to_h5ad, model, values, says):
    adata = adata_factory()
    X = np.log1p(adata.X.toarray() * 1.7)
    adata.X = X if values == "log" else (X - X.mean(axis=0)) / (X.std(axis=0) + 1)
    token = upload(client, to_h5ad(adata)).json()["token"]
    with client.app.state.sessions() as session:
        bundle = HeadBundle(name=f"{model}-head", model=model, kind="mlp", strategy="frozen", sha256="0" * 64,
                            meta={}, location="/nowhere", public=True)
        session.add(bundle)
        session.commit()
        bundle_id = bundle.id
    response = client.post(f"/api/jobs/{token}/run", data={"bundle_id": bundle_id})
    assert response.status_code == 422
    assert says in response.json()["detail"]
    assert client.get(f"/api/jobs/{token}").json()["status"] == "checked"


def test_queued_job_cannot_be_submitted_twice(client, upload, good_h5ad):
    token = upload(client, good_h5ad).json()["token"]
    first = _run(client, token)
    assert first.status_code == 202 and first.json()["status"] == "queued"
    assert _run(client, token).status_code == 409


def test_queue_limit_refuses_with_429(make_client, upload, good_h5ad):
    client = make_client(max_queued_jobs=1)
    first, second = (upload(client, good_h5ad).json()["token"] for _ in range(2))
    assert _run(client, first).status_code == 202
    response = _run(client, second)
    assert response.status_code == 429 and "limit" in response.json()["detail"]
    client.app.state.worker.run_pending()
    assert _run(client, second).status_code == 202


def test_worker_runs_a_job_and_its_results_download(client, upload, good_h5ad, tmp_path):
    token = upload(client, good_h5ad).json()["token"]
    assert client.get(f"/api/jobs/{token}/predictions").status_code == 409
    assert client.get(f"/api/jobs/{token}/predictions.csv").status_code == 409
    _run(client, token, threshold="0.4")
    assert client.app.state.worker.run_pending() == 1
    job = client.get(f"/api/jobs/{token}").json()
    assert job["status"] == "done" and job["progress"] == 1.0 and job["threshold"] == 0.4
    summary = job["summary"]
    assert summary["n_cells"] == 60 and summary["n_sensitive"] + summary["n_resistant"] == 60
    assert summary["projection"] == "pca" and set(summary["agreement"]) >= {"f1", "auroc"}

    page = client.get(f"/api/jobs/{token}/predictions", params={"offset": 10, "limit": 5}).json()
    assert page["total"] == 60 and len(page["rows"]) == 5 and page["rows"][0]["cell"] == "cell10"
    assert {"probability", "prediction", "x", "y", "sample", "observed"} <= set(page["rows"][0])
    samples = client.get(f"/api/jobs/{token}/samples").json()
    assert [s["sample"] for s in samples] == [f"P{i}" for i in range(6)]
    assert sum(s["cells"] for s in samples) == 60

    csv = client.get(f"/api/jobs/{token}/predictions.csv")
    assert csv.headers["content-disposition"] == 'attachment; filename="cells.predicted.csv"'
    table = pd.read_csv(io.StringIO(csv.text))
    assert list(table.columns[:3]) == ["cell", "prob_sensitive", "prediction"]
    called = np.where(table["prob_sensitive"] >= 0.4, "sensitive", "resistant")
    assert (table["prediction"] == called).all()

    h5ad = client.get(f"/api/jobs/{token}/predictions.h5ad")
    path = tmp_path / "out.h5ad"
    path.write_bytes(h5ad.content)
    result = ad.read_h5ad(path)
    assert "scdrugmap_pca_prob_sensitive" in result.obs and "scdrugmap_pca_prediction" in result.obs
    assert result.obsm["X_pca"].shape == (60, 50) and result.obsm["X_pca_pca"].shape == (60, 2)
    np.testing.assert_allclose(result.obs["scdrugmap_pca_prob_sensitive"], table["prob_sensitive"], rtol=1e-6)


def test_uploaded_bundle_is_used_by_its_job_only_and_never_listed(client, upload, good_h5ad, bundle_root):
    folder = bundle_root / "pca-demo"
    token = upload(client, good_h5ad).json()["token"]
    other = upload(client, good_h5ad).json()["token"]
    files = {"head_json": ("head.json", (folder / "head.json").read_bytes(), "application/json"),
             "head_safetensors": ("head.safetensors", (folder / "head.safetensors").read_bytes(),
                                  "application/octet-stream")}
    response = client.post(f"/api/jobs/{token}/run", files=files, data={"model": "pca"})
    assert response.status_code == 202
    assert response.json()["bundle"]["uploaded"] is True
    private_id = response.json()["bundle"]["id"]
    assert [b["id"] for b in client.get("/api/bundles").json()] != [private_id]
    assert client.post(f"/api/jobs/{other}/run", data={"bundle_id": private_id}).status_code == 422
    client.app.state.worker.run_pending()
    assert client.get(f"/api/jobs/{token}").json()["status"] == "done"


@pytest.mark.parametrize(("meta", "weights", "says"), [
    (b"{not json", b"\0" * 16, "not valid JSON"),
    (json.dumps({"model": "nonexistent", "kind": "mlp"}).encode(), b"\0" * 16, "needs 'model'"),
    (json.dumps({"model": "pca", "kind": "logistic"}).encode(), b"\xff" * 16, "not a safetensors"),
])
def test_invalid_uploaded_bundle_is_refused(client, upload, good_h5ad, meta, weights, says):
    token = upload(client, good_h5ad).json()["token"]
    files = {"head_json": ("head.json", meta, "application/json"),
             "head_safetensors": ("head.safetensors", weights, "application/octet-stream")}
    response = client.post(f"/api/jobs/{token}/run", files=files)
    assert response.status_code == 422 and says in response.json()["detail"]
    assert list(client.app.state.storage.bundle_root.iterdir()) == []
    assert client.get(f"/api/jobs/{token}").json()["status"] == "checked"


def test_bundle_needs_both_files(client, upload, good_h5ad):
    token = upload(client, good_h5ad).json()["token"]
    response = client.post(f"/api/jobs/{token}/run", files={"head_json": ("head.json", b"{}", "application/json")})
    assert response.status_code == 422 and "both" in response.json()["detail"]


def test_failed_job_shows_a_message_without_server_paths(client, upload, good_h5ad, tmp_path):
    token = upload(client, good_h5ad).json()["token"]
    with client.app.state.sessions() as session:
        broken = HeadBundle(name="broken", model="pca", kind="mlp", strategy="frozen", sha256="0" * 64, meta={},
                            location=str(tmp_path / "no-bundle-here"), public=True)
        session.add(broken)
        session.commit()
        bundle_id = broken.id
    client.post(f"/api/jobs/{token}/run", data={"bundle_id": bundle_id})
    client.app.state.worker.run_pending()
    job = client.get(f"/api/jobs/{token}").json()
    assert job["status"] == "failed"
    assert "not a head bundle" in job["message"]
    assert str(tmp_path) not in job["message"]
    # a failed job can be submitted again with another bundle
    assert _run(client, token).status_code == 202


def test_crash_inside_a_job_is_logged_and_shown_as_a_reference(client, upload, good_h5ad, monkeypatch, caplog):
    def crash(*args, **kwargs):
        raise RuntimeError("secret internal detail")

    monkeypatch.setattr("scdrugmap.web.worker.run_prediction", crash)
    token = upload(client, good_h5ad).json()["token"]
    _run(client, token)
    client.app.state.worker.run_pending()
    job = client.get(f"/api/jobs/{token}").json()
    assert job["status"] == "failed" and "internal error (reference" in job["message"]
    assert "secret internal detail" not in json.dumps(job)
    crashed = [r for r in caplog.records if r.getMessage() == "job crashed"]
    assert crashed and crashed[0].exc_info is not None


# --- restarts ------------------------------------------------------------------------------------------------

def test_restart_resumes_queued_jobs_and_marks_interrupted_running_ones(make_client, upload, good_h5ad, wait_for):
    before = make_client()
    queued = upload(before, good_h5ad).json()["token"]
    running = upload(before, good_h5ad).json()["token"]
    _run(before, queued)
    _run(before, running)
    dead_worker = f"{socket.gethostname()}|{2**22 + 12345}|deadbeef"  # a pid no process has
    with before.app.state.sessions() as session:
        job_id = session.scalar(select(PredictionJob.id).order_by(PredictionJob.id.desc()).limit(1))
        session.execute(update(PredictionJob).where(PredictionJob.id == job_id)
                        .values(status="running", worker_id=dead_worker, heartbeat_at=utcnow(), started_at=utcnow()))
        session.commit()
    before.__exit__(None, None, None)

    after = make_client(run_worker=True, poll_seconds=0.05)
    interrupted = after.get(f"/api/jobs/{running}").json()
    assert interrupted["status"] == "interrupted"
    assert "server stopped" in interrupted["message"]
    wait_for(lambda: after.get(f"/api/jobs/{queued}").json()["status"] == "done")
    assert after.get("/health").json()["worker"] == "running"
    page = after.get(f"/jobs/{running}")
    assert "interrupted" in page.text and "submit it again" in page.text
    resubmitted = _run(after, running)
    assert resubmitted.status_code == 202
    wait_for(lambda: after.get(f"/api/jobs/{running}").json()["status"] == "done")


def test_running_job_of_another_host_is_interrupted_only_after_its_heartbeat_stops(client, upload, good_h5ad):
    token = upload(client, good_h5ad).json()["token"]
    _run(client, token)
    worker = client.app.state.worker
    with client.app.state.sessions() as session:
        session.execute(update(PredictionJob).values(status="running", worker_id="elsewhere|1|cafe",
                                                     heartbeat_at=utcnow()))
        session.commit()
    assert worker.recover(at_start=True) == 0
    assert client.get(f"/api/jobs/{token}").json()["status"] == "running"
    with client.app.state.sessions() as session:
        old = utcnow().replace(year=utcnow().year - 1)
        session.execute(update(PredictionJob).values(heartbeat_at=old))
        session.commit()
    assert worker.recover() == 1
    assert client.get(f"/api/jobs/{token}").json()["status"] == "interrupted"


def test_graceful_stop_marks_its_own_running_jobs_interrupted(client, upload, good_h5ad):
    token = upload(client, good_h5ad).json()["token"]
    _run(client, token)
    worker = client.app.state.worker
    assert worker.claim() is not None
    worker.stop(timeout=0.1)
    job = client.get(f"/api/jobs/{token}").json()
    assert job["status"] == "interrupted"


def test_two_workers_never_claim_the_same_job(make_client, upload, good_h5ad):
    first = make_client()
    second = make_client()
    token = upload(first, good_h5ad).json()["token"]
    _run(first, token)
    claims = [first.app.state.worker.claim(), second.app.state.worker.claim()]
    assert sorted(claims, key=lambda c: c is None) [1] is None and any(claims)


def test_settings_refuse_non_positive_limits(make_client):
    from scdrugmap.errors import ConfigError

    with pytest.raises(ConfigError, match="positive"):
        make_client(max_concurrent_jobs=0)


def test_default_database_is_a_sqlite_file_under_scdrugmap_home(tmp_path, monkeypatch):
    from scdrugmap.web import Settings

    monkeypatch.setenv("SCDRUGMAP_HOME", str(tmp_path))
    settings = Settings().resolved()
    assert settings.db_url == f"sqlite:///{tmp_path / 'web' / 'scdrugmap.db'}"
    assert settings.upload_dir == tmp_path / "web" / "uploads"
    assert os.path.commonpath([settings.upload_dir, settings.output_dir]) == str(tmp_path / "web")


def test_cells_the_model_cannot_read_have_no_prediction(client, upload, good_h5ad, monkeypatch):
    import scdrugmap.train.predict as predict

    real = predict.predict_cells

    def partly(*args, **kwargs):
        probability, embeddings = real(*args, **kwargs)
        probability[:3] = np.nan
        return probability, embeddings

    monkeypatch.setattr(predict, "predict_cells", partly)
    token = upload(client, good_h5ad).json()["token"]
    _run(client, token)
    client.app.state.worker.run_pending()
    summary = client.get(f"/api/jobs/{token}").json()["summary"]
    assert summary["n_missing"] == 3 and summary["n_sensitive"] + summary["n_resistant"] == 57
    rows = client.get(f"/api/jobs/{token}/predictions", params={"limit": 4}).json()["rows"]
    assert [r["prediction"] for r in rows[:3]] == [None, None, None] and rows[3]["prediction"] is not None
    assert [r["probability"] for r in rows[:3]] == [None, None, None]
    table = pd.read_csv(io.StringIO(client.get(f"/api/jobs/{token}/predictions.csv").text))
    assert table["prediction"].isna().sum() == 3
    assert "3 cells could not be read" in client.get(f"/jobs/{token}/results").text
