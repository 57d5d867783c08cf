"""`scdrugmap check`: one clear line per problem, a non-zero exit, never a traceback."""

import subprocess
import sys

import numpy as np
import pytest
import scipy.sparse as sp
from typer.testing import CliRunner

from scdrugmap.cli import app
from scdrugmap.data.check import check_adata
from tests_helpers import make_adata

runner = CliRunner()


def _run(path, *args):
    return runner.invoke(app, ["check", str(path), *args])


def _write(adata, tmp_path, name="data.h5ad"):
    path = tmp_path / name
    adata.write_h5ad(path)
    return path


def _cli(*args):
    return subprocess.run([sys.executable, "-c", "from scdrugmap.cli import main; main()", *args],
                          capture_output=True, text=True, timeout=120)


def test_missing_file_is_one_line_without_traceback(tmp_path):
    done = _cli("check", str(tmp_path / "nope.h5ad"))
    assert done.returncode == 1
    assert "no such file" in done.stderr and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_not_an_h5ad_file(tmp_path):
    path = tmp_path / "cells.h5ad"
    path.write_text("cell,gene\n1,2\n")
    done = _cli("check", str(path))
    assert done.returncode == 1 and "not an h5ad file" in done.stderr and "Traceback" not in done.stderr


def test_clean_data_passes(adata, tmp_path):
    result = _run(_write(adata, tmp_path), "--folds", "2")
    assert result.exit_code == 0, result.output
    assert "counts" in result.output and "symbol" in result.output


@pytest.mark.parametrize(("change", "expected"), [
    (lambda a: a.obs.drop(columns="response", inplace=True), "obs['response']: missing"),
    (lambda a: a.obs.__setitem__("response", ["partial"] * a.n_obs), "expected sensitive/resistant"),
    (lambda a: a.obs.__setitem__("response", ["resistant"] * a.n_obs), "all 80 cells are resistant"),
])
def test_label_problems_are_named(adata, tmp_path, change, expected):
    change(adata)
    result = _run(_write(adata, tmp_path))
    assert result.exit_code == 1
    assert expected in result.output


def test_label_key_names_another_column(adata, tmp_path):
    adata.obs["outcome"] = adata.obs.pop("response")
    assert _run(_write(adata, tmp_path), "--label-key", "outcome", "--folds", "2").exit_code == 0


def test_nan_and_inf_values(adata, tmp_path):
    X = adata.X.toarray()
    X[0, 0], X[1, 1] = np.nan, np.inf
    adata.X = sp.csr_matrix(X)
    result = _run(_write(adata, tmp_path))
    assert result.exit_code == 1 and "1 NaN and 1 inf" in result.output


def test_negative_values_refused_where_counts_are_needed(adata):
    X = adata.X.toarray()
    X[0, 0] = -3
    adata.X = sp.csr_matrix(X)
    report = check_adata(adata, needs="counts", n_folds=2)
    assert any("needs raw counts" in str(p) for p in report.errors)
    assert check_adata(adata, needs="any", n_folds=2).ok


def test_empty_cells_and_genes(adata, tmp_path):
    X = adata.X.toarray()
    X[3, :] = 0
    X[:, 7] = 0
    adata.X = sp.csr_matrix(X)
    report = check_adata(adata, n_folds=2)
    assert any("1 cells have no expressed gene (e.g. cell3)" in str(p) for p in report.errors)
    assert any("1 genes are zero in every cell" in str(p) and p.severity == "warning" for p in report.problems)


def test_duplicate_gene_and_cell_names(adata, tmp_path):
    names = list(adata.var_names)
    names[1] = names[0]
    adata.var_names = names
    cells = list(adata.obs_names)
    cells[1] = cells[0]
    adata.obs_names = cells
    messages = [str(p) for p in check_adata(adata, n_folds=2).errors]
    assert any("duplicate gene names" in m for m in messages)
    assert any("duplicate cell names" in m for m in messages)


def test_unknown_gene_ids(adata):
    adata.var_names = [f"NOT_A_GENE_{i}" for i in range(adata.n_vars)]
    report = check_adata(adata, n_folds=2)
    assert any("no gene id is a known human" in str(p) for p in report.errors)


def test_category_with_too_few_samples_for_the_folds(tmp_path):
    adata = make_adata(n_cells=40, n_samples=4)
    report = check_adata(adata, n_folds=10)
    assert report.ok  # fold problems are warnings unless --strict
    assert any("samples for 10 grouped folds" in str(p) or "needs at least 2 of each" in str(p)
               for p in report.problems)
    result = _run(_write(adata, tmp_path), "--strict")
    assert result.exit_code == 1


def test_missing_sample_column_warns_about_leakage(adata):
    del adata.obs["sample"]
    report = check_adata(adata, n_folds=2)
    assert any("--sample-key" in str(p) for p in report.problems)


@pytest.mark.parametrize(("name", "kind", "id_type", "design"), [
    ("GSE120575_melanoma_icb_tcells.h5ad", "log", "symbol", "per-sample"),
    ("GSE157220_hnscc_gefitinib.h5ad", "zscore", "entrez", "per-cell"),
    ("GSE157220_hnscc_afatinib.h5ad", "zscore", "entrez", "per-cell"),
])
def test_real_files_are_described_correctly(shared, name, kind, id_type, design):
    result = _run(shared("data", name))
    assert result.exit_code == 0, result.output
    report = check_adata(__import__("anndata").read_h5ad(shared("data", name)))
    assert report.facts["value_kind"] == kind
    assert report.facts["gene_id_type"] == id_type
    assert report.facts["label_design"].startswith(design)
    if name.startswith("GSE120575"):
        assert "log2(x+1)" in report.facts["value_detail"] and "TPM" in report.facts["value_detail"]
        assert len(report.tables["sample"]) == 19
