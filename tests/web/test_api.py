"""REST API: health, catalog, benchmark runs and their summaries, models and bundles, the OpenAPI schema."""

from __future__ import annotations

import io

import pandas as pd
import pytest

from scdrugmap.errors import ConfigError


@pytest.fixture
def api(make_client, results_dir):
    return make_client(results=(results_dir,))


def test_health_reports_database_and_worker_state(api):
    response = api.get("/health")
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "ok" and body["database"] == "ok"
    assert body["worker"] == "stopped"  # the test app runs without its worker
    assert body["jobs_waiting"] == 0 and body["jobs_running"] == 0


def test_health_answers_503_when_the_database_fails(api, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("database is gone")

    monkeypatch.setattr("sqlalchemy.orm.Session.execute", broken)
    response = api.get("/health")
    assert response.status_code == 503
    assert response.json()["database"] == "unreachable"
    assert "database is gone" not in response.text


def test_catalog_lists_all_datasets_and_filters_by_each_field(api):
    everything = api.get("/api/catalog").json()
    assert len(everything) == 60
    assert {"dataset_id", "collection", "tissue", "cancer_type", "therapy", "regimen"} <= set(everything[0])
    validation = api.get("/api/catalog", params={"collection": "validation"}).json()
    assert len(validation) == 24 and all(row["collection"] == "validation" for row in validation)
    melanoma = api.get("/api/catalog", params={"cancer_type": "melanoma", "therapy": "Immunotherapy"}).json()
    assert melanoma and all("Melanoma" in row["cancer_type"] for row in melanoma)
    assert api.get("/api/catalog", params={"regimen": "no such drug"}).json() == []


def test_dataset_shows_facts_and_cell_counts(api):
    body = api.get("/api/catalog/P01").json()
    assert body["facts"]["dataset_id"] == "P01"
    assert body["facts"]["pmid"] == "34845188"
    tissue = [c for c in body["cells"] if c["value"] == "Bone marrow aspirate"]
    assert tissue and tissue[0]["n_cells"] == tissue[0]["n_sensitive"] + tissue[0]["n_resistant"]


def test_unknown_dataset_is_404_with_a_message(api):
    response = api.get("/api/catalog/P99")
    assert response.status_code == 404
    assert "P99" in response.json()["detail"]


def test_imported_run_is_listed_with_its_models(api):
    runs = api.get("/api/runs").json()
    assert len(runs) == 1
    assert runs[0]["name"] == "tiny-run" and runs[0]["n_jobs"] == 126
    assert runs[0]["models"] == ["hvg", "majority", "pca"]


def test_summary_defaults_to_frozen_mlp_pooled_sample_and_averages_scored_folds(api):
    run_id = api.get("/api/runs").json()[0]["id"]
    assert api.get(f"/api/runs/{run_id}/summary").json()["picked"] == {
        "category": "cancer_type", "strategy": "frozen", "head": "mlp", "scenario": "pooled", "split": "sample"}
    body = api.get(f"/api/runs/{run_id}/summary", params={"category": "regimen"}).json()
    assert body["choices"]["head"] == ["logistic", "mlp"]
    assert body["choices"]["category"] == ["cancer_type", "regimen", "tissue"]
    by_model = {row["model"]: row for row in body["by_model"]}
    assert by_model["pca"]["f1_mean"] > by_model["majority"]["f1_mean"]
    assert by_model["majority"]["n_folds"] == 8 and by_model["majority"]["n_not_scored"] == 1
    erlotinib = [r for r in body["by_value"] if r["model"] == "majority" and r["value"] == "erlotinib"][0]
    assert erlotinib["n_folds"] == 2 and erlotinib["n_not_scored"] == 1


def test_summary_follows_the_chosen_category_and_ignores_unknown_choices(api):
    run_id = api.get("/api/runs").json()[0]["id"]
    body = api.get(f"/api/runs/{run_id}/summary", params={"category": "tissue", "head": "nonsense"}).json()
    assert body["picked"]["category"] == "tissue" and body["picked"]["head"] == "mlp"
    assert {r["value"] for r in body["by_value"]} == {"Tumor tissue", "Cell line"}


def test_summary_csv_downloads_the_table(api):
    run_id = api.get("/api/runs").json()[0]["id"]
    response = api.get(f"/api/runs/{run_id}/summary.csv", params={"category": "tissue", "head": "logistic"})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/csv")
    assert "attachment" in response.headers["content-disposition"]
    table = pd.read_csv(io.StringIO(response.text))
    assert len(table) == 6  # 3 models x 2 tissues
    assert set(table["head"]) == {"logistic"} and set(table["category"]) == {"tissue"}
    assert {"f1_mean", "auroc_mean", "n_folds"} <= set(table.columns)


def test_unknown_run_is_404(api):
    assert api.get("/api/runs/999/summary").status_code == 404
    assert api.get("/api/runs/999/summary.csv").status_code == 404


def test_reimporting_a_run_replaces_its_rows(make_client, results_dir):
    make_client(results=(results_dir,))
    again = make_client(results=(results_dir,))
    runs = again.get("/api/runs").json()
    assert len(runs) == 1 and runs[0]["n_jobs"] == 126


def test_importing_a_folder_without_results_fails_with_a_message(make_client, tmp_path):
    empty = tmp_path / "empty-run"
    empty.mkdir()
    with pytest.raises(ConfigError, match="no results found"):
        make_client(results=(empty,))


def test_models_and_bundles_list_the_registered_head(api):
    models = {m["name"]: m["bundles"] for m in api.get("/api/models").json()}
    assert models["pca"] == 1 and models["scgpt"] == 0
    bundles = api.get("/api/bundles").json()
    assert [(b["name"], b["model"], b["kind"]) for b in bundles] == [("pca-demo", "pca", "logistic")]
    assert len(bundles[0]["sha256"]) == 64
    assert "location" not in bundles[0]  # no server path leaves the server


def test_openapi_schema_lists_the_api_and_no_job_listing(api):
    schema = api.get("/api/openapi.json").json()
    paths = schema["paths"]
    for path in ("/health", "/api/catalog", "/api/catalog/{dataset_id}", "/api/runs", "/api/runs/{run_id}/summary",
                 "/api/runs/{run_id}/summary.csv", "/api/models", "/api/bundles", "/api/jobs", "/api/jobs/{token}",
                 "/api/jobs/{token}/run", "/api/jobs/{token}/predictions", "/api/jobs/{token}/samples",
                 "/api/jobs/{token}/predictions.csv", "/api/jobs/{token}/predictions.h5ad"):
        assert path in paths, path
    assert set(paths["/api/jobs"]) == {"post"}
    assert not any(p.startswith("/jobs") or p == "/" for p in paths)  # pages stay out of the schema
    assert api.get("/docs").status_code == 404  # the Swagger page would load a CDN


def test_plotly_is_served_from_the_installed_package(api):
    from scdrugmap.web.app import plotly_js_path

    response = api.get("/vendor/plotly.min.js", headers={"accept-encoding": "identity"})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/javascript")
    assert response.content == plotly_js_path().read_bytes()
    assert response.text.startswith("/**\n* plotly.js v")


def test_plotly_is_sent_gzipped_to_clients_that_accept_it(api):
    from scdrugmap.web.app import plotly_js_path

    response = api.get("/vendor/plotly.min.js", headers={"accept-encoding": "gzip"})
    assert response.headers["content-encoding"] == "gzip"
    assert response.content == plotly_js_path().read_bytes()  # httpx decodes it


def test_database_backend_is_the_one_the_environment_asks_for(api):
    import os

    backend = api.app.state.sessions.kw["bind"].dialect.name
    assert backend == ("postgresql" if os.environ.get("SCDRUGMAP_TEST_POSTGRES") == "1" else "sqlite")


def test_serve_builds_the_app_from_its_arguments_and_runs_uvicorn_quietly(monkeypatch, tmp_path, results_dir):
    import logging

    import uvicorn

    from scdrugmap.web import serve
    from scdrugmap.web.logs import JsonFormatter

    calls = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **options: calls.update(app=app, **options))
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    try:
        serve(f"sqlite:///{tmp_path / 'served.db'}", host="127.0.0.1", port=8123, results=[results_dir],
              upload_dir=tmp_path / "up", max_upload_mb=5, max_concurrent_jobs=2, data_dir=tmp_path / "web")
        assert isinstance(root.handlers[0].formatter, JsonFormatter)
    finally:
        root.handlers[:] = saved_handlers
        root.setLevel(saved_level)
        logging.captureWarnings(False)
    settings = calls["app"].state.settings
    assert (calls["host"], calls["port"], calls["access_log"]) == ("127.0.0.1", 8123, False)
    assert settings.max_upload_mb == 5 and settings.max_concurrent_jobs == 2
    assert settings.upload_dir == tmp_path / "up" and (tmp_path / "up").is_dir()
    assert settings.results == (results_dir,)
