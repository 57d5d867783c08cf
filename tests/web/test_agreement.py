"""One path per job: the same head and file give the same probabilities on the CLI, in Python and on the web.

Each case trains a head with `scdrugmap.tl.train`, saves it, then predicts one file three ways: the
``scdrugmap predict`` command, `scdrugmap.tl.predict`, and the web server's real upload and job endpoints
with its worker. The web server once refitted a baseline on the upload (AUROC 0.882 instead of 0.986 for
the afatinib -> gefitinib transfer below); these tests hold all three to 1e-6.
"""

from __future__ import annotations

import io
import json

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score
from typer.testing import CliRunner

import scdrugmap as sdm
from scdrugmap.cli import app
from scdrugmap.explain.de import top_genes

runner = CliRunner()
TOLERANCE = 1e-6


def _cli(data_path, model, head_dir, tmp_path, weights=None):
    out = tmp_path / "cli.h5ad"
    args = ["--quiet", "predict", str(data_path), "--model", model, "--head", str(head_dir), "--out", str(out)]
    if weights is not None:
        args += ["--weights", str(weights)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    table = pd.read_csv(out.with_suffix(".csv"), index_col="cell")
    return table[f"scdrugmap_{model}_prob_sensitive"].to_numpy(dtype=np.float64)


def _python(data_path, head_dir, weights=None):
    adata = ad.read_h5ad(data_path)
    head = sdm.read_head(head_dir)
    sdm.tl.predict(adata, head, weights=weights)
    return adata.obs[f"scdrugmap_{head.model}_prob_sensitive"].to_numpy(dtype=np.float64)


def _web(make_client, data_path, model, head_dir, weights=None):
    client = make_client(bundle_dir=head_dir.parent, weights={} if weights is None else {model: str(weights)})
    posted = client.post("/api/jobs", files={"file": ("cells.h5ad", io.BytesIO(data_path.read_bytes()),
                                                      "application/octet-stream")})
    assert posted.status_code in (200, 201), posted.text
    token = posted.json()["token"]
    bundles = {b["name"]: b["id"] for b in client.get("/api/bundles").json()}
    run = client.post(f"/api/jobs/{token}/run", data={"bundle_id": bundles[head_dir.name], "model": model})
    assert run.status_code in (200, 202), run.text
    client.app.state.worker.run_pending()
    job = client.get(f"/api/jobs/{token}").json()
    assert job["status"] == "done", job
    table = pd.read_csv(io.StringIO(client.get(f"/api/jobs/{token}/predictions.csv").text))
    return table["prob_sensitive"].to_numpy(dtype=np.float64), job["summary"]


def _agree(cli, python, web):
    for name, other in (("python", python), ("web", web)):
        assert cli.shape == other.shape
        assert np.array_equal(np.isnan(cli), np.isnan(other)), f"{name}: other cells unreadable"
        finite = ~np.isnan(cli)
        assert finite.any()
        assert np.abs(cli[finite] - other[finite]).max() <= TOLERANCE, name


@pytest.mark.parametrize(("model", "head"), [("pca", "mlp"), ("hvg", "logistic")])
def test_afatinib_head_predicts_gefitinib_alike_on_cli_python_and_web(shared, tmp_path, make_client, model, head):
    train = ad.read_h5ad(shared("data", "GSE157220_hnscc_afatinib.h5ad"))
    data_path = shared("data", "GSE157220_hnscc_gefitinib.h5ad")
    head_dir = sdm.tl.train(train, model, head=head).save(tmp_path / "heads" / f"{model}-{head}")
    cli = _cli(data_path, model, head_dir, tmp_path)
    python = _python(data_path, head_dir)
    web, summary = _web(make_client, data_path, model, head_dir)
    _agree(cli, python, web)
    labels = sdm.tl.labels_of(ad.read_h5ad(data_path))
    auroc = roc_auc_score(labels, cli)
    assert summary["agreement"]["auroc"] == pytest.approx(auroc, abs=1e-9)
    assert auroc > 0.9  # the transfer the issue measured: 0.986 (pca) and 0.989 (hvg) on the CLI


def test_minilm_head_predicts_alike_on_cli_python_and_web(tmp_path, make_client, adata_factory):
    pytest.importorskip("sentence_transformers")
    data_path = tmp_path / "cells.h5ad"
    adata_factory(n_cells=24, seed=3).write_h5ad(data_path)
    head_dir = sdm.tl.train(adata_factory(n_cells=24, seed=1), "minilm", head="logistic").save(tmp_path / "heads" / "minilm")
    cli = _cli(data_path, "minilm", head_dir, tmp_path)
    python = _python(data_path, head_dir)
    web, _ = _web(make_client, data_path, "minilm", head_dir)
    _agree(cli, python, web)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["frozen", "lora"])
def test_golden_scgpt_head_predicts_alike_on_cli_python_and_web(shared, tmp_path, make_client, strategy):
    from tests_helpers import golden_case

    adata, weights, _ = golden_case(shared, "scgpt")
    data_path = tmp_path / "cells.h5ad"
    adata.write_h5ad(data_path)
    head_dir = sdm.tl.train(adata, "scgpt", strategy=strategy, weights=weights, device="cpu",
                            head_options={"epochs": 2}, lora_options={"epochs": 1}).save(tmp_path / "heads" / strategy)
    assert json.loads((head_dir / "head.json").read_text())["kind"] == ("lora" if strategy == "lora" else "mlp")
    cli = _cli(data_path, "scgpt", head_dir, tmp_path, weights)
    python = _python(data_path, head_dir, weights)
    web, _ = _web(make_client, data_path, "scgpt", head_dir, weights)
    _agree(cli, python, web)



def test_the_web_finds_the_same_biomarkers_as_tl_biomarkers_on_the_same_inputs(tmp_path, make_client, adata_factory,
                                                                               bundle_root):
    """The results page's biomarkers are `sdm.tl.biomarkers` of the job's predictions, number for number."""
    data_path = tmp_path / "cells.h5ad"
    adata_factory(n_cells=240, seed=3).write_h5ad(data_path)
    head_dir = bundle_root / "pca-demo"
    client = make_client(biomarkers=True, biomarker_cells=50, biomarker_genes=5, biomarker_bootstrap=2)
    posted = client.post("/api/jobs", files={"file": ("cells.h5ad", io.BytesIO(data_path.read_bytes()),
                                                      "application/octet-stream")})
    token = posted.json()["token"]
    bundles = {b["name"]: b["id"] for b in client.get("/api/bundles").json()}
    client.post(f"/api/jobs/{token}/run", data={"bundle_id": bundles[head_dir.name], "model": "pca"})
    client.app.state.worker.run_pending()
    found = client.get(f"/api/jobs/{token}/biomarkers").json()
    assert found["status"] == "done", found
    web = pd.read_csv(io.StringIO(client.get(f"/api/jobs/{token}/biomarkers.csv").text))
    expected = sdm.tl.biomarkers(ad.read_h5ad(data_path), head=sdm.read_head(head_dir), comparisons=["predicted"],
                                 threshold=0.5, test="both", non_counts="wilcoxon", top_k=10, max_cells=50,
                                 max_genes=5, n_bootstrap=2, n_permutations=200, seed=0).table
    assert {t["name"] for t in found["tests"]} == set(expected["test"]) == {"wilcoxon", "pseudobulk"}
    pd.testing.assert_frame_equal(web, expected.reset_index(drop=True), check_dtype=False, atol=TOLERANCE, rtol=0)
    genes = web.drop_duplicates("gene")
    assert genes["attribution_abs_mean"].notna().any() and genes["deletion_delta"].notna().sum() == 5
    # the page shows each test's top genes, and serves the figures it names
    page = client.get(f"/jobs/{token}/results").text
    for test in found["tests"]:
        part = expected[expected["test"] == test["name"]]
        for direction in ("up", "down"):
            shown = [row["gene"] for row in test[direction]]
            assert shown == top_genes(part, 10, direction=direction)
            assert all(f"<td>{gene}</td>" in page for gene in shown)
    for figure in found["figures"]:
        image = client.get(f"/api/jobs/{token}/biomarkers/{figure['role']}.png")
        assert image.status_code == 200 and image.content[:4] == b"\x89PNG"
    assert client.get(f"/api/jobs/{token}/biomarkers/secrets.png").status_code == 404
