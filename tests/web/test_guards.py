"""Predictions a lab can trust: the gene-overlap and value-kind guards refuse alike on the CLI, in Python and on
the web, and every prediction carries a calibrated probability, a conformal set and an OOD flag."""

from __future__ import annotations

import io

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

import scdrugmap as sdm
from scdrugmap.cli import app
from scdrugmap.errors import SchemaError

runner = CliRunner()


def _command(*args: str):
    """Run ``scdrugmap ARGS`` as a user does (a new process, errors through the real entry point)."""
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-c", "from scdrugmap.cli import main; main()", *args],
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def afatinib_head(tmp_path_factory):
    """A pca head trained on the z-scored, Entrez-id afatinib cell lines (GSE157220)."""
    from tests_helpers import shared_path

    folder = tmp_path_factory.mktemp("heads") / "pca-afatinib"
    return sdm.tl.train(ad.read_h5ad(shared_path("data", "GSE157220_hnscc_afatinib.h5ad")), "pca").save(folder)


def _web_submit(make_client, head_dir, content: bytes):
    client = make_client(bundle_dir=head_dir.parent)
    posted = client.post("/api/jobs", files={"file": ("cells.h5ad", io.BytesIO(content), "application/octet-stream")})
    assert posted.status_code in (200, 201), posted.text
    token = posted.json()["token"]
    bundle = {b["name"]: b["id"] for b in client.get("/api/bundles").json()}[head_dir.name]
    return client, token, client.post(f"/api/jobs/{token}/run", data={"bundle_id": bundle, "model": "pca"})


def test_a_zscore_head_on_log_tpm_is_refused_alike_everywhere(shared, afatinib_head, tmp_path, make_client):
    icb = shared("data", "GSE120575_melanoma_icb_tcells.h5ad")
    result = _command("--quiet", "predict", str(icb), "--model", "pca", "--head", str(afatinib_head),
                      "--out", str(tmp_path / "out.h5ad"))
    assert result.returncode == 1
    text = " ".join(result.stderr.split())  # rich wraps long lines
    assert "the values look log, but the head was trained on zscore values" in text, result.stderr
    assert str(icb) in text and "Traceback" not in result.stderr and text.startswith("error:")
    assert not (tmp_path / "out.h5ad").exists() and not (tmp_path / "out.csv").exists()
    with pytest.raises(SchemaError, match="trained on zscore values"):
        sdm.tl.predict(ad.read_h5ad(icb), sdm.read_head(afatinib_head))
    _, _, refused = _web_submit(make_client, afatinib_head, icb.read_bytes())
    assert refused.status_code == 422 and "the values look log, but the head was trained on zscore" in refused.text


def test_the_gene_overlap_is_measured_through_harmonised_ids(shared, afatinib_head, tmp_path):
    icb = shared("data", "GSE120575_melanoma_icb_tcells.h5ad")  # symbols; the head's genes are Entrez ids
    allowed = _command("--quiet", "predict", str(icb), "--model", "pca", "--head", str(afatinib_head),
                       "--out", str(tmp_path / "out.h5ad"), "--allow-value-kind-mismatch")
    assert allowed.returncode == 1
    text = " ".join(allowed.stderr.split())
    assert "only 482 of the head's 2,000 genes (24%) are in the data" in text  # not 0: the ids are harmonised
    assert "symbol ids" in text and "--min-gene-overlap" in text
    run = runner.invoke(app, ["--quiet", "predict", str(icb), "--model", "pca", "--head", str(afatinib_head),
                              "--out", str(tmp_path / "out.h5ad"), "--allow-value-kind-mismatch",
                              "--min-gene-overlap", "0.2"])
    assert run.exit_code == 0, run.output
    assert "only 24% of the head's 2,000 genes are in the data (482)" in run.output
    assert "allowed by --allow-value-kind-mismatch" in run.output
    written = ad.read_h5ad(tmp_path / "out.h5ad")
    assert written.uns["scdrugmap"]["scdrugmap_pca"]["n_shared_genes"] == 482


def test_afatinib_to_gefitinib_prediction_carries_calibration_sets_and_flags(shared, afatinib_head, tmp_path):
    gefitinib = shared("data", "GSE157220_hnscc_gefitinib.h5ad")
    result = runner.invoke(app, ["predict", str(gefitinib), "--model", "pca", "--head", str(afatinib_head),
                                 "--out", str(tmp_path / "gef.h5ad")])
    assert result.exit_code == 0, result.output
    out = result.output
    assert "prediction sets at 90% confidence per class:" in out and "out of distribution: 0 of 66 cells" in out
    assert "against the observed labels (N = 66 cells): F1" in out and "set coverage:" in out
    assert "only 35% of the head's 2,000 genes" in out  # the warning band between 0.25 and 0.5
    table = pd.read_csv(tmp_path / "gef.csv", index_col="cell")
    key = "scdrugmap_pca"
    assert {f"{key}_prob_sensitive", f"{key}_prob_raw", f"{key}_set", f"{key}_ood", f"{key}_ood_score"} <= set(table)
    assert set(table[f"{key}_set"]) <= {"sensitive", "resistant", "uncertain", "none"}
    written = ad.read_h5ad(tmp_path / "gef.h5ad")
    summary = sdm.tl.prediction_summary(written, key)
    assert summary["scored"]["auroc"] > 0.95 and summary["coverage"]["coverage"] >= 0.9
    calibrated, raw = written.obs[f"{key}_prob_sensitive"], written.obs[f"{key}_prob_raw"]
    assert not np.allclose(calibrated, raw)  # calibration changed the probabilities ...
    assert (np.argsort(calibrated.to_numpy(), kind="stable") == np.argsort(raw.to_numpy(), kind="stable")).all()


def test_a_head_of_another_platform_is_refused_on_the_web_with_the_gene_overlap(make_client, adata_factory,
                                                                                  to_h5ad, tmp_path):
    head_dir = sdm.tl.train(adata_factory(seed=1), "pca", head="logistic").save(tmp_path / "heads" / "pca")
    from scdrugmap.data.genes import load_gene_table

    other = adata_factory(seed=2)
    symbols = load_gene_table()["gene_symbol"].dropna().astype(str)
    unused = [g for g in symbols[symbols.str.fullmatch(r"[A-Z][A-Z0-9]+")] if g not in set(other.var_names)][:45]
    other.var_names = unused + list(other.var_names[45:])  # real genes, but 12 of the head's 57
    client, token, refused = _web_submit(make_client, head_dir, to_h5ad(other))
    assert refused.status_code == 422 and "of the head's" in refused.text and "the minimum is 25%" in refused.text
    assert client.get(f"/api/jobs/{token}").json()["status"] != "queued"
