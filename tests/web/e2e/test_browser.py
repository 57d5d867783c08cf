"""End to end in headless Chromium: upload -> check report -> prediction -> results; the explorer's charts.

Each test saves screenshots to the artifacts folder (see conftest) for a person to look at.
"""

from __future__ import annotations

import re

import numpy as np
import pytest


def _write(adata, folder, name):
    path = folder / name
    adata.write_h5ad(path)
    return path


def test_upload_check_predict_and_results(server, page, artifacts, tmp_path, adata_factory):
    data = _write(adata_factory(n_cells=300, n_samples=6, seed=5), tmp_path, "melanoma-demo.h5ad")
    page.goto(f"{server}/predict")
    page.screenshot(path=str(artifacts / "01-predict.png"), full_page=True)

    page.set_input_files("#upload-file", str(data))
    page.click("#upload-button")
    page.wait_for_url(re.compile(r"/jobs/[A-Za-z0-9_-]{40,}$"))
    report = page.locator("#check-report")
    assert "ready" in report.inner_text()
    assert "300 cells × 57 genes" in report.inner_text()
    assert page.locator("#bundle-select option:checked").inner_text().startswith("pca-demo")
    page.screenshot(path=str(artifacts / "02-check-report.png"), full_page=True)

    page.click("#run-button")
    page.wait_for_selector("#results-link", timeout=60_000)  # the page follows the job and reloads when done
    assert page.locator("#job-state").inner_text() == "done"
    page.screenshot(path=str(artifacts / "03-job-done.png"), full_page=True)

    page.click("#results-link")
    page.wait_for_selector("#scatter-chart[data-rendered='1']")
    page.wait_for_selector("#histogram-chart[data-rendered='1']")
    assert page.locator("#scatter-chart .scatterlayer .point").count() == 300
    assert page.locator("#n-cells").inner_text() == "300"
    assert page.locator("#sample-table tbody tr").count() == 6
    assert page.locator("#cell-table tbody tr").count() == 50
    page.click("#cell-table th:has-text('probability')")
    shown = [float(t) for t in page.locator("#cell-table tbody tr td:nth-child(2)").all_inner_texts()]
    assert shown == sorted(shown)
    page.screenshot(path=str(artifacts / "04-results.png"), full_page=True)

    with page.expect_download() as download:
        page.click("#download-csv")
    lines = download.value.path().read_text().splitlines()
    assert lines[0].startswith("cell,prob_sensitive,prediction") and len(lines) == 301
    assert page.problems == []


def test_invalid_upload_shows_the_errors_and_queues_nothing(server, page, artifacts, tmp_path, adata_factory):
    adata = adata_factory(seed=6)
    X = adata.X.toarray()
    X[3, :] = 0
    X[5, 2] = np.inf
    adata.X = X
    data = _write(adata, tmp_path, "broken.h5ad")
    page.goto(f"{server}/predict")
    page.set_input_files("#upload-file", str(data))
    page.click("#upload-button")
    page.wait_for_selector("#check-report")
    assert page.url.endswith("/predict")
    errors = page.locator("ul.problems li.error").all_inner_texts()
    assert any("inf" in e for e in errors)
    assert "fix them and upload again" in page.locator("#upload-error").inner_text()
    page.screenshot(path=str(artifacts / "05-invalid-upload.png"), full_page=True)


def test_explorer_draws_bar_and_radar_and_sorts_and_downloads(server, page, artifacts):
    page.goto(f"{server}/benchmarks")
    page.wait_for_selector("#bar-chart[data-rendered='1']")
    page.wait_for_selector("#radar-chart[data-rendered='1']")
    assert page.locator("#bar-chart .bars .point").count() == 3
    page.select_option("select[name=category]", "regimen")
    page.wait_for_url(re.compile(r"category=regimen"))
    page.wait_for_selector("#radar-chart[data-rendered='1']")
    assert page.locator("#radar-chart .scatterlayer .trace").count() == 3
    assert "cisplatin" in page.locator("#radar-chart").inner_text()
    page.screenshot(path=str(artifacts / "06-explorer-regimen.png"), full_page=True)

    page.select_option("select[name=category]", "tissue")
    page.wait_for_url(re.compile(r"category=tissue"))
    page.wait_for_selector("#bar-chart[data-rendered='1']")
    assert "Tumor tissue" in page.locator("#summary-table").inner_text()
    page.click("#summary-table th:has-text('F1')")
    page.click("#summary-table th:has-text('F1')")  # second click: descending
    first_model = page.locator("#summary-table tbody tr td").first.inner_text()
    assert first_model == "pca"
    page.screenshot(path=str(artifacts / "07-explorer-tissue-sorted.png"), full_page=True)

    with page.expect_download() as download:
        page.click("#csv-download")
    text = download.value.path().read_text()
    assert text.startswith("category,model,value") and "Tumor tissue" in text
    assert page.problems == []


def test_home_and_catalog_filters_in_the_browser(server, page, artifacts):
    page.goto(server)
    assert page.locator(".tile").count() == 3
    page.screenshot(path=str(artifacts / "00-home.png"), full_page=True)
    page.click(".tile:has-text('Catalog')")
    page.wait_for_url(re.compile(r"/catalog$"))
    total = page.locator("#catalog-table tbody tr").count()
    page.select_option("select[name=cancer_type]", "Melanoma")
    page.click("button:has-text('Filter')")
    page.wait_for_url(re.compile(r"cancer_type=Melanoma"))
    rows = page.locator("#catalog-table tbody tr")
    assert 0 < rows.count() < total
    page.screenshot(path=str(artifacts / "08-catalog.png"), full_page=True)
    rows.first.locator("a").click()
    page.wait_for_selector("h2:has-text('Cells')")
    page.screenshot(path=str(artifacts / "09-dataset.png"), full_page=True)


@pytest.mark.in_process_jobs
def test_job_page_follows_the_progress_of_a_running_job(server, page, artifacts, tmp_path, adata_factory,
                                                        monkeypatch):
    import threading

    from scdrugmap.web import worker

    release = threading.Event()
    real = worker.run_prediction

    def held(*args, progress, **kwargs):
        progress("embedding cells", 0.4)
        release.wait(30)
        return real(*args, progress=progress, **kwargs)

    monkeypatch.setattr(worker, "run_prediction", held)
    data = _write(adata_factory(n_cells=120, seed=7), tmp_path, "slow.h5ad")
    page.goto(f"{server}/predict")
    page.set_input_files("#upload-file", str(data))
    page.click("#upload-button")
    page.wait_for_selector("#run-form")
    page.click("#run-button")
    page.wait_for_selector("#job-stage:has-text('embedding cells · 40%')")  # the page polls the API
    assert page.locator("#job-state").inner_text() == "running"
    width = page.locator("#job-progress .bar").evaluate("bar => bar.style.width")
    assert width == "40%"
    page.screenshot(path=str(artifacts / "10-job-running.png"), full_page=True)
    release.set()
    page.wait_for_selector("#results-link", timeout=60_000)
    assert page.problems == []
