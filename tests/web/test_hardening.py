"""The web server against a hostile user: memory bombs, cross-site posts, floods, full disks, crafted bundles."""

from __future__ import annotations

import errno
import io
import json
import struct
from datetime import timedelta
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
from anndata.io import write_elem
from sqlalchemy import update

from broken_inputs import memory_bomb
from scdrugmap.web.db import PredictionJob, hash_token, utcnow


def _run(client, token, **data):
    bundle_id = client.get("/api/bundles").json()[0]["id"]
    return client.post(f"/api/jobs/{token}/run", data={"bundle_id": bundle_id, **data})


def _files(tmp_path) -> list[str]:
    return sorted(str(p.relative_to(tmp_path)) for p in (tmp_path / "web").rglob("*") if p.is_file()
                  and p.suffix != ".db" and "scdrugmap.db" not in p.name)


# --- uploads: the gate before anything is read ---------------------------------------------------------------

def test_memory_bomb_upload_is_refused_at_upload_without_reading_it(client, upload, tmp_path):
    bomb = memory_bomb(tmp_path).read_bytes()
    assert len(bomb) < 2_000_000
    response = upload(client, bomb, name="bomb.h5ad")
    assert response.status_code == 422
    detail = response.json()["detail"]
    assert detail.startswith("bomb.h5ad: X: declares 25,000 x 20,000 values") and "never written" in detail
    assert str(tmp_path) not in detail  # the server's paths stay hidden
    assert list(client.app.state.storage.staging_dir.iterdir()) == []
    assert list(client.app.state.storage.upload_dir.glob("*.h5ad")) == []


def test_upload_needing_more_than_a_jobs_memory_is_refused(make_client, upload, adata_factory, to_h5ad):
    client = make_client(job_memory_mb=1)  # data budget: a quarter MiB
    response = upload(client, to_h5ad(adata_factory(n_cells=2000)))
    assert response.status_code == 422 and "more than the memory budget" in response.json()["detail"]


def test_compression_bomb_upload_is_refused(client, upload, tmp_path, adata_factory):
    path = tmp_path / "zipped.h5ad"
    adata_factory(n_cells=20).write_h5ad(path)
    with h5py.File(path, "a") as handle:
        del handle["X"], handle["obs"]
        n_cells = 300_000
        write_elem(handle, "obs", pd.DataFrame(index=[f"c{i}" for i in range(n_cells)]))
        block = np.ones((10_000, handle["var/_index"].shape[0]), dtype=np.float32)
        X = handle.create_dataset("X", shape=(n_cells, block.shape[1]), dtype="float32", chunks=(10_000, 57),
                                  compression="gzip", compression_opts=9)
        for start in range(0, n_cells, 10_000):
            X[start : start + 10_000] = block
    content = path.read_bytes()
    response = upload(client, content, name="zipped.h5ad")
    assert response.status_code == 422, response.text
    assert "expand to" in response.json()["detail"] and "-fold" in response.json()["detail"]


# --- cross-site requests -------------------------------------------------------------------------------------

@pytest.mark.parametrize("headers", [{"origin": "http://evil.example"}, {"origin": "null"},
                                     {"sec-fetch-site": "cross-site", "origin": "http://evil.example"},
                                     {"referer": "http://evil.example/page"}])
def test_cross_site_form_and_api_posts_are_refused(client, good_h5ad, headers):
    page = client.post("/predict", files={"file": ("cells.h5ad", io.BytesIO(good_h5ad), "application/x-hdf5")},
                       headers=headers, follow_redirects=False)
    assert page.status_code == 403 and "cross-site request refused" in page.text
    api = client.post("/api/jobs", files={"file": ("cells.h5ad", io.BytesIO(good_h5ad), "application/x-hdf5")},
                      headers=headers)
    assert api.status_code == 403 and "cross-site request refused" in api.json()["detail"]
    assert list(client.app.state.storage.upload_dir.glob("*.h5ad")) == []


def test_cross_site_run_of_a_job_is_refused(client, upload, good_h5ad):
    token = upload(client, good_h5ad).json()["token"]
    bundle_id = client.get("/api/bundles").json()[0]["id"]
    refused = client.post(f"/jobs/{token}/run", data={"bundle_id": bundle_id},
                          headers={"origin": "http://evil.example"}, follow_redirects=False)
    assert refused.status_code == 403
    assert client.get(f"/api/jobs/{token}").json()["status"] == "checked"


@pytest.mark.parametrize("headers", [{}, {"origin": "http://testserver"}, {"sec-fetch-site": "same-origin"},
                                     {"referer": "http://testserver/predict"}])
def test_same_origin_pages_and_scripts_may_post(client, good_h5ad, headers):
    page = client.post("/predict", files={"file": ("cells.h5ad", io.BytesIO(good_h5ad), "application/x-hdf5")},
                       headers=headers, follow_redirects=False)
    assert page.status_code == 303, page.text


def test_configured_origins_may_post_and_reads_are_never_refused(make_client, good_h5ad):
    client = make_client(allowed_origins=("https://lab.example.org/",))
    allowed = client.post("/api/jobs", files={"file": ("c.h5ad", io.BytesIO(good_h5ad), "application/x-hdf5")},
                          headers={"origin": "https://lab.example.org", "sec-fetch-site": "cross-site"})
    assert allowed.status_code == 201
    assert client.get("/api/catalog", headers={"origin": "http://evil.example"}).status_code == 200


# --- rate limits ---------------------------------------------------------------------------------------------

def test_uploads_over_the_rate_are_refused_with_retry_after(make_client, upload, good_h5ad):
    client = make_client(rate_limits={"upload": (2, 60.0)})
    assert [upload(client, good_h5ad).status_code for _ in range(2)] == [201, 201]
    refused = upload(client, good_h5ad)
    assert refused.status_code == 429 and 1 <= int(refused.headers["retry-after"]) <= 60
    assert "too many upload requests" in refused.json()["detail"]
    assert len(list(client.app.state.storage.upload_dir.glob("*.h5ad"))) == 2


def test_token_guesses_and_submissions_are_rate_limited(make_client, upload, good_h5ad):
    client = make_client(rate_limits={"lookup": (5, 60.0), "submit": (1, 60.0)})
    answers = [client.get(f"/api/jobs/{'x' * 43}{i}").status_code for i in range(7)]
    assert answers == [404] * 5 + [429] * 2
    page = client.get("/jobs/" + "y" * 43)
    assert page.status_code == 429 and "retry-after" in page.headers
    token = upload(client, good_h5ad).json()["token"]
    assert _run(client, token).status_code == 202
    assert client.post(f"/api/jobs/{token}/run", data={}).status_code == 429


# --- jobs in their own process --------------------------------------------------------------------------------

def test_a_job_runs_in_its_own_process_and_publishes_its_outputs(make_client, upload, good_h5ad):
    client = make_client(job_isolation="process")
    token = upload(client, good_h5ad).json()["token"]
    _run(client, token)
    assert client.app.state.worker.run_pending() == 1
    job = client.get(f"/api/jobs/{token}").json()
    assert job["status"] == "done", job["message"]
    assert job["summary"]["n_cells"] == 60
    csv = client.get(f"/api/jobs/{token}/predictions.csv")
    assert csv.status_code == 200 and csv.text.startswith("cell,prob_sensitive,prediction")
    assert [p.name for p in client.app.state.storage.output_root.iterdir() if p.name.startswith(".")] == []


def test_a_job_over_the_memory_limit_fails_alone_with_a_clear_message(make_client, upload, good_h5ad):
    client = make_client(job_isolation="process", job_memory_mb=700)
    token = upload(client, good_h5ad).json()["token"]
    _run(client, token)
    client.app.state.worker.run_pending()
    job = client.get(f"/api/jobs/{token}").json()
    assert job["status"] == "failed"
    assert "more memory than this server allows one job (each job may use 700 MiB)" in job["message"]
    assert list(client.app.state.storage.output_root.iterdir()) == []
    assert client.get("/health").status_code == 200  # the server is fine


def test_a_failed_output_write_leaves_no_partial_outputs(client, upload, good_h5ad, monkeypatch):
    def full_disk(self, path, *args, **kwargs):
        Path(path).write_text("half a file")
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(pd.DataFrame, "to_csv", full_disk)  # predictions.parquet is written, the CSV fails
    token = upload(client, good_h5ad).json()["token"]
    _run(client, token)
    client.app.state.worker.run_pending()
    job = client.get(f"/api/jobs/{token}").json()
    assert job["status"] == "failed" and "disk is full" in job["message"]
    assert list(client.app.state.storage.output_root.iterdir()) == []
    assert client.get(f"/api/jobs/{token}/predictions.csv").status_code == 409


# --- retention, quota, limits on unsubmitted uploads ----------------------------------------------------------

def test_unsubmitted_uploads_count_toward_the_limit(make_client, upload, good_h5ad):
    client = make_client(max_pending_uploads=2)
    first = upload(client, good_h5ad).json()["token"]
    upload(client, good_h5ad)
    refused = upload(client, good_h5ad)
    assert refused.status_code == 429 and "uploads waiting or running" in refused.json()["detail"]
    _run(client, first)
    client.app.state.worker.run_pending()  # done jobs no longer hold the limit
    assert upload(client, good_h5ad).status_code == 201


def test_uploads_and_outputs_expire_after_the_retention_time(client, upload, good_h5ad, tmp_path):
    done = upload(client, good_h5ad).json()["token"]
    waiting = upload(client, good_h5ad).json()["token"]
    fresh = upload(client, good_h5ad).json()["token"]
    _run(client, done)
    client.app.state.worker.run_pending()
    old = utcnow() - timedelta(days=8)
    with client.app.state.sessions() as session:
        session.execute(update(PredictionJob).where(PredictionJob.token_hash.in_([hash_token(done), hash_token(waiting)]))
                        .values(created_at=old))
        session.commit()
    counts = client.app.state.worker.clean()
    assert counts["expired"] == 2
    assert client.get(f"/api/jobs/{done}").status_code == 404
    assert client.get(f"/api/jobs/{waiting}").status_code == 404
    assert client.get(f"/api/jobs/{fresh}").status_code == 200
    storage = client.app.state.storage
    assert len(list(storage.upload_dir.glob("*.h5ad"))) == 1 and list(storage.output_root.iterdir()) == []


def test_the_disk_quota_refuses_uploads_and_the_worker_frees_the_oldest_jobs(make_client, upload, good_h5ad):
    size_mb = len(good_h5ad) / 2**20
    client = make_client(disk_quota_mb=size_mb * 2.5)
    tokens = [upload(client, good_h5ad).json()["token"] for _ in range(2)]
    refused = upload(client, good_h5ad)
    assert refused.status_code == 507 and "quota" in refused.json()["detail"]
    lowered = make_client(disk_quota_mb=size_mb * 1.5)  # the operator restarts the server with a lower quota
    assert lowered.app.state.worker.clean()["over_quota"] == 1
    assert client.get(f"/api/jobs/{tokens[0]}").status_code == 404  # the oldest went first
    assert client.get(f"/api/jobs/{tokens[1]}").status_code == 200


# --- health --------------------------------------------------------------------------------------------------

def test_health_reports_disk_queue_and_worker(client, upload, good_h5ad):
    token = upload(client, good_h5ad).json()["token"]
    _run(client, token)
    body = client.get("/health").json()
    assert body["status"] == "ok" and body["problems"] == []
    assert body["jobs_waiting"] == 1 and body["uploads_pending"] == 0 and body["disk_free_mb"] > 0
    assert body["storage_used_mb"] > 0 and body["worker"] == "stopped"


def test_health_fails_when_the_disk_is_nearly_full(make_client):
    client = make_client(min_free_disk_mb=1e12)
    response = client.get("/health")
    assert response.status_code == 503 and "free on the disk" in response.json()["problems"][0]


def test_health_fails_when_the_worker_died(make_client):
    client = make_client(run_worker=True, poll_seconds=0.05)
    assert client.get("/health").status_code == 200
    client.app.state.worker.stop(timeout=2)
    response = client.get("/health")
    assert response.status_code == 503 and response.json()["worker"] == "dead"


# --- uploaded head bundles -------------------------------------------------------------------------------------

def _safetensors(tensors: dict[str, np.ndarray], header_edit=None) -> bytes:
    from safetensors.numpy import save

    raw = save({k: np.ascontiguousarray(v) for k, v in tensors.items()})
    if header_edit is None:
        return raw
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + length])
    header_edit(header)
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + raw[8 + length :]


def _logistic(width=50):
    return {"mean": np.zeros(width, np.float32), "scale": np.ones(width, np.float32),
            "coef": np.zeros(width, np.float32), "intercept": np.zeros(1)}


def _huge(header):
    header["coef"]["shape"] = [100_000, 100_000]


def _past_end(header):
    start, end = header["coef"]["data_offsets"]
    header["coef"]["data_offsets"] = [start, end + 10**9]


@pytest.mark.parametrize(("meta", "tensors", "edit", "says"), [
    ({"model": "pca", "kind": "logistic", "embedding_dim": 50}, _logistic(), _huge, "declares shape [100000, 100000]"),
    ({"model": "pca", "kind": "logistic", "embedding_dim": 50}, _logistic(), _past_end, "outside the file"),
    ({"model": "pca", "kind": "logistic", "embedding_dim": 50},
     {"weights": np.zeros(50, np.float32), "bias": np.zeros(1)}, None, "a logistic head holds"),
    ({"model": "pca", "kind": "lora", "embedding_dim": 50},
     {"adapter.x.lora_A.weight": np.zeros((8, 50), np.float32)}, None, "kind 'lora' on pca"),
    ({"model": "scgpt", "kind": "logistic", "embedding_dim": 50}, _logistic(), None, "makes 512-wide"),
    ({"model": "pca", "kind": "mlp", "embedding_dim": 50},
     {"0.weight": np.zeros((8, 50), np.float32), "0.bias": np.zeros(8, np.float32),
      "2.weight": np.zeros((4, 9), np.float32), "2.bias": np.zeros(4, np.float32),
      "4.weight": np.zeros((1, 4), np.float32), "4.bias": np.zeros(1, np.float32)}, None, "do not chain"),
    ({"model": "pca", "kind": "logistic", "embedding_dim": 50},
     {**_logistic(), "coef": np.full(50, np.nan, np.float32)}, None, "NaN or inf"),
])
def test_uploaded_bundles_are_validated_fully_at_upload(client, upload, good_h5ad, meta, tensors, edit, says):
    token = upload(client, good_h5ad).json()["token"]
    files = {"head_json": ("head.json", json.dumps(meta).encode(), "application/json"),
             "head_safetensors": ("head.safetensors", _safetensors(tensors, edit), "application/octet-stream")}
    response = client.post(f"/api/jobs/{token}/run", files=files, data={"model": meta["model"]})
    assert response.status_code == 422, response.text
    assert says in response.json()["detail"], response.json()["detail"]
    assert list(client.app.state.storage.bundle_root.iterdir()) == []
    assert client.get(f"/api/jobs/{token}").json()["status"] == "checked"


# --- ids -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("path", ["/api/runs/99999999999999999999/summary", "/api/runs/99999999999999999999/summary.csv",
                                  "/benchmarks/99999999999999999999", "/api/runs/-1/summary"])
def test_out_of_range_ids_are_404(client, path):
    assert client.get(path).status_code == 404


def test_an_out_of_range_bundle_id_is_refused_not_a_crash(client, upload, good_h5ad):
    token = upload(client, good_h5ad).json()["token"]
    response = client.post(f"/api/jobs/{token}/run", data={"bundle_id": "99999999999999999999"})
    assert response.status_code == 422
