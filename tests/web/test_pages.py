"""Server-rendered pages, headers, error pages and logs."""

from __future__ import annotations

import io
import json
import logging
import re

import pytest

from scdrugmap.web.logs import JsonFormatter, redact_path


@pytest.fixture
def site(make_client, results_dir):
    return make_client(results=(results_dir,))


def _figure(html: str, name: str) -> dict:
    match = re.search(rf'<script type="application/json" id="figure-{name}">(.*?)</script>', html, re.S)
    assert match, name
    return json.loads(match.group(1))


def test_home_links_the_three_sections(site):
    html = site.get("/").text
    for link in ('href="/catalog"', 'href="/benchmarks"', 'href="/predict"'):
        assert link in html
    assert "60 curated data sets" in html


def test_catalog_page_filters_and_links_each_dataset(site):
    html = site.get("/catalog", params={"therapy": "Chemotherapy"}).text
    rows = re.findall(r'<a href="/catalog/([PV]\d\d)">', html)
    assert rows and "Chemotherapy" in html
    assert len(rows) < 60
    assert '<option value="Chemotherapy" selected>' in html
    page = site.get(f"/catalog/{rows[0]}")
    assert page.status_code == 200 and rows[0] in page.text and "Cells" in page.text


def test_unknown_dataset_page_is_a_404_page(site):
    response = site.get("/catalog/X42")
    assert response.status_code == 404
    assert "Not found" in response.text and "X42" in response.text


def test_benchmarks_redirects_to_the_only_run_and_draws_bar_and_radar(site):
    response = site.get("/benchmarks", follow_redirects=False)
    assert response.status_code == 307
    html = site.get(response.headers["location"], params={"category": "tissue", "metric": "auroc"}).text
    bar = _figure(html, "bar")
    assert bar["data"][0]["type"] == "bar" and bar["data"][0]["x"] == ["hvg", "majority", "pca"]
    radar = _figure(html, "radar")  # two tissues make no radar: its axes are the three categories
    assert {trace["type"] for trace in radar["data"]} == {"scatterpolar"}
    assert radar["data"][0]["theta"] == ["cancer_type", "regimen", "tissue", "cancer_type"]
    assert "per category" in radar["layout"]["title"]["text"]
    assert "AUROC" in bar["layout"]["title"]["text"]
    regimen = _figure(site.get(response.headers["location"], params={"category": "regimen"}).text, "radar")
    assert regimen["data"][0]["theta"] == ["anti-PD1", "cisplatin", "erlotinib", "anti-PD1"]
    assert [t["name"] for t in regimen["data"]] == ["hvg", "majority", "pca"]
    assert 'id="summary-table"' in html and "summary.csv?category=tissue" in html
    html = site.get(response.headers["location"], params={"category": "regimen"}).text
    assert "summary.csv?category=regimen&amp;strategy=frozen&amp;head=mlp" in html
    assert '<script src="/vendor/plotly.min.js"></script>' in html
    assert "cdn" not in html.lower()


def test_charts_and_pages_take_the_report_palette(site, upload, good_h5ad):
    from scdrugmap.report.style import PROBABILITY_COLOURSCALE, RESPONSE_COLOURS, model_colours

    explorer = site.get("/benchmarks", follow_redirects=False).headers["location"]
    html = site.get(explorer, params={"category": "regimen"}).text
    bar, radar = _figure(html, "bar"), _figure(html, "radar")
    colours = model_colours(bar["data"][0]["x"])
    assert bar["data"][0]["marker"]["color"] == list(colours.values())
    assert {t["name"]: t["line"]["color"] for t in radar["data"]} == colours  # one colour per model in both
    assert f"--sensitive: {RESPONSE_COLOURS['sensitive']}; --resistant: {RESPONSE_COLOURS['resistant']}" in html
    token = upload(site, good_h5ad).json()["token"]
    bundle_id = site.get("/api/bundles").json()[0]["id"]
    site.post(f"/api/jobs/{token}/run", data={"model": "pca", "bundle_id": str(bundle_id)})
    site.app.state.worker.run_pending()
    scatter = _figure(site.get(f"/jobs/{token}/results").text, "scatter")
    assert scatter["data"][0]["marker"]["colorscale"] == [list(stop) for stop in PROBABILITY_COLOURSCALE]


def test_benchmarks_page_without_runs_explains_how_to_import(client):
    html = client.get("/benchmarks").text
    assert "--results RUN_DIR" in html


@pytest.mark.filterwarnings("ignore:.*(not unique|without encoding metadata)")
def test_upload_page_shows_the_report_of_invalid_data_and_keeps_nothing(site, adata_factory, to_h5ad):
    adata = adata_factory()
    adata.obs_names = ["same"] * adata.n_obs
    response = site.post("/predict", files={"file": ("bad.h5ad", io.BytesIO(to_h5ad(adata)),
                                                     "application/octet-stream")})
    assert response.status_code == 422
    assert 'id="check-report"' in response.text and "duplicate cell names" in response.text
    assert list(site.app.state.storage.upload_dir.glob("*.h5ad")) == []


def test_upload_page_refuses_a_text_file_with_a_message(site):
    response = site.post("/predict", files={"file": ("notes.h5ad", io.BytesIO(b"hello"), "application/octet-stream")})
    assert response.status_code == 422
    assert "no HDF5 signature" in response.text and 'id="upload-error"' in response.text


def test_upload_then_choose_then_results_pages(site, good_h5ad):
    response = site.post("/predict", files={"file": ("mine.h5ad", io.BytesIO(good_h5ad), "application/octet-stream")},
                         follow_redirects=False)
    assert response.status_code == 303
    job_url = response.headers["location"]
    html = site.get(job_url).text
    assert 'id="run-form"' in html and "pca-demo" in html and "ready" in html
    bundle_id = site.get("/api/bundles").json()[0]["id"]
    response = site.post(f"{job_url}/run", data={"model": "hvg", "bundle_id": str(bundle_id)})
    assert response.status_code == 422 and "trained on pca" in response.text and 'id="run-form"' in response.text
    response = site.post(f"{job_url}/run", data={"model": "pca", "bundle_id": str(bundle_id)}, follow_redirects=False)
    assert response.status_code == 303
    html = site.get(job_url).text
    assert 'data-poll="1"' in html and "queued" in html
    assert site.get(f"{job_url}/results", follow_redirects=False).status_code == 303
    site.app.state.worker.run_pending()
    html = site.get(job_url).text
    assert 'id="results-link"' in html
    html = site.get(f"{job_url}/results").text
    scatter = _figure(html, "scatter")
    assert sum(len(trace["x"]) for trace in scatter["data"]) == 60
    assert scatter["layout"]["xaxis"]["title"]["text"] == "PC 1"
    names = [trace["name"] for trace in scatter["data"]]  # confident, uncertain and OOD cells drawn apart
    assert all(name.split(" (")[0] in {"confident", "uncertain", "out of distribution"} for name in names), names
    assert 'id="n-uncertain"' in html and 'id="n-ood"' in html
    assert _figure(html, "histogram")["data"][0]["type"] == "histogram"
    assert html.count("<tr>") >= 50 and "page 1 of 2" in html
    assert 'id="sample-table"' in html and "P5" in html
    assert "cell59" in site.get(f"{job_url}/results", params={"page": 2}).text


def test_job_page_with_a_wrong_token_is_a_404_page(site):
    response = site.get("/jobs/" + "A" * 43)
    assert response.status_code == 404
    assert "full link" in response.text


def test_pages_send_security_headers_and_job_pages_are_not_cached(site, upload, good_h5ad):
    headers = site.get("/").headers
    assert "script-src 'self'" in headers["content-security-policy"]
    assert headers["x-content-type-options"] == "nosniff"
    assert headers["referrer-policy"] == "same-origin"  # job links never leak to other sites through Referer
    assert headers["x-frame-options"] == "DENY"
    token = upload(site, good_h5ad).json()["token"]
    assert site.get(f"/jobs/{token}").headers["cache-control"] == "no-store"
    assert site.get(f"/api/jobs/{token}").headers["cache-control"] == "no-store"


def test_pages_have_no_inline_script(site, upload, good_h5ad):
    token = upload(site, good_h5ad).json()["token"]
    for path in ("/", "/catalog", "/benchmarks/1", "/predict", f"/jobs/{token}"):
        html = site.get(path).text
        scripts = re.findall(r"<script(?![^>]*(?:src=|application/json))[^>]*>", html)
        assert scripts == [], path


def test_server_error_shows_a_generic_page_and_logs_the_trace(site, monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise RuntimeError("secret detail of the failure")

    monkeypatch.setattr("scdrugmap.web.pages.public_bundles", broken)
    monkeypatch.setattr("scdrugmap.web.api.public_bundles", broken)
    with caplog.at_level(logging.INFO):
        page = site.get("/")
        api = site.get("/api/bundles")
    assert page.status_code == 500 and api.status_code == 500
    for response in (page, api):
        assert "secret detail" not in response.text and "Traceback" not in response.text
    assert "Server error" in page.text
    assert api.json() == {"detail": "Something went wrong on the server. The error was logged; please try again later."}
    errors = [r for r in caplog.records if r.getMessage() == "unhandled error"]
    assert len(errors) == 2 and "secret detail" in str(errors[0].exc_info[1])


def test_request_log_lines_carry_no_job_token(site, upload, good_h5ad, caplog):
    token = upload(site, good_h5ad).json()["token"]
    with caplog.at_level(logging.INFO, logger="scdrugmap.web.app"):
        site.get(f"/jobs/{token}")
    requests = [r for r in caplog.records if r.getMessage() == "request"]
    assert requests and requests[-1].path == "/jobs/{token}" and requests[-1].status == 200
    ours = [r for r in caplog.records if r.name.startswith("scdrugmap")]  # httpx's test client logs its own URLs
    assert ours and all(token not in JsonFormatter().format(r) for r in ours)


def test_json_formatter_writes_one_object_with_extra_fields_and_exception():
    record = logging.LogRecord("scdrugmap.web", logging.ERROR, __file__, 1, "job %s failed", ("7",), None)
    record.job = 7
    try:
        raise ValueError("boom")
    except ValueError:
        import sys

        record.exc_info = sys.exc_info()
    entry = json.loads(JsonFormatter().format(record))
    assert entry["message"] == "job 7 failed" and entry["level"] == "error" and entry["job"] == 7
    assert "ValueError: boom" in entry["exception"]


def test_redact_path_hides_tokens_only():
    token = "abcDEF123_-" * 4
    assert redact_path(f"/jobs/{token}/results") == "/jobs/{token}/results"
    assert redact_path(f"/api/jobs/{token}") == "/api/jobs/{token}"
    assert redact_path("/catalog/P01") == "/catalog/P01"


def test_results_page_says_why_a_job_has_no_biomarkers_and_keeps_its_predictions(make_client, upload, good_h5ad,
                                                                                 monkeypatch):
    from scdrugmap import tl
    from scdrugmap.errors import SchemaError

    def refuse(*args, **kwargs):
        raise SchemaError("obs has no 'sample' column for the samples")

    monkeypatch.setattr(tl, "biomarkers", refuse)
    for client, reason in ((make_client(biomarkers=True), "obs has no &#39;sample&#39; column"),
                           (make_client(), "this server does not look for biomarkers")):
        token = upload(client, good_h5ad).json()["token"]
        bundle_id = client.get("/api/bundles").json()[0]["id"]
        client.post(f"/api/jobs/{token}/run", data={"model": "pca", "bundle_id": str(bundle_id)})
        client.app.state.worker.run_pending()
        assert client.get(f"/api/jobs/{token}").json()["status"] == "done"  # the predictions stand
        html = client.get(f"/jobs/{token}/results").text
        assert 'id="biomarkers-reason"' in html and reason in html and 'id="cell-table"' in html
        assert client.get(f"/api/jobs/{token}/biomarkers.csv").status_code == 404
