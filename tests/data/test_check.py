"""`scdrugmap check`: one clear line per problem, a non-zero exit, never a traceback."""

import subprocess
import sys

import anndata
import numpy as np
import pytest
import scipy.sparse as sp
from typer.testing import CliRunner

from scdrugmap.cli import app
from scdrugmap.data.check import check_adata, count_matrix
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


def test_counts_per_value_are_aligned_columns_and_long_tables_say_how_many_more(adata, tmp_path):
    adata.obs["sample"] = [f"s{i:02d}" for i in range(adata.n_obs)]  # 80 samples: 40 shown
    result = _run(_write(adata, tmp_path), "--folds", "2")
    lines = result.output.splitlines()
    table = lines[lines.index("cells per sample") + 1:]
    header, first = table[0], table[1]
    assert header.split() == ["sample", "cells", "sensitive", "resistant"]
    assert first.split()[:2] == ["s00", "1"] and len(first) == len(header)  # numbers end under their header
    assert table[41] == "... 40 more"
    study = lines[lines.index("cells per study") + 1:]
    n_studies = adata.obs["study"].nunique()
    assert sum(int(line.split()[-3].replace(",", "")) for line in study[1:1 + n_studies]) == adata.n_obs
    assert study[1 + n_studies].startswith("cells per")  # the next table: every study was counted


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


def test_mouse_gene_ids_are_an_error_of_the_report():
    adata = make_adata(n_cells=40, n_samples=4)
    adata.var_names = [f"ENSMUSG{i:011d}" for i in range(adata.n_vars)]
    report = check_adata(adata, n_folds=2)  # the rest of the data is still checked and described
    assert any("non-human Ensembl ids" in str(p) for p in report.errors)
    assert report.tables and "gene_id_type" not in report.facts


def test_one_sample_with_both_labels_counts_for_each_label():
    adata = make_adata(n_cells=40, n_samples=4)
    adata.obs["sample"] = "S1"  # one sample holding sensitive and resistant cells
    messages = [str(p) for p in check_adata(adata, n_folds=2).problems]
    assert any("1 sample: 1 with sensitive cells, 1 with resistant cells; a sample-grouped split needs at least 2 "
               "of each" in m for m in messages), messages


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


# --- streaming: the matrix is read once in blocks, so backed files of any size check in bounded memory ---

def _awkward_counts():
    """Counts with a NaN, an inf, a negative value, an empty cell, an empty gene and a stored zero."""
    X = make_adata().X.toarray()
    X[0, 0], X[1, 1], X[2, 2] = np.nan, np.inf, -3
    X[3, :] = 0
    X[:, 7] = 0
    matrix = sp.csr_matrix(X)
    row4 = slice(matrix.indptr[4], matrix.indptr[5])
    matrix.data[row4][0] = 0  # stored but zero: not expressed
    return matrix


def _as_layout(X, layout):
    return {"csr": sp.csr_matrix(X), "csc": sp.csc_matrix(X), "dense": X.toarray()}[layout]


def _backed(X, tmp_path, name="backed.h5ad"):
    adata = make_adata()
    adata.X = X
    path = tmp_path / name
    adata.write_h5ad(path)
    return anndata.read_h5ad(path, backed="r")


class _Recording:
    """A backed matrix that records every slice read from it."""

    def __init__(self, X):
        self.X, self.format, self.shape, self.reads = X, X.format, X.shape, []

    def __getitem__(self, key):
        self.reads.append(key)
        return self.X[key]


@pytest.mark.parametrize("backed", [False, True])
@pytest.mark.parametrize("layout", ["csr", "csc", "dense"])
def test_counts_read_in_small_blocks_equal_whole_matrix_counts(tmp_path, layout, backed):
    whole = _awkward_counts()
    X = _as_layout(whole, layout)
    if backed:
        adata = _backed(X, tmp_path)
        X = adata.X
        assert not isinstance(X, np.ndarray) and not sp.issparse(X)  # really on disk
    counts = count_matrix(X, chunk_rows=7, head_rows=5)
    dense = whole.toarray()
    assert (counts.n_nan, counts.n_inf, counts.n_negative) == (1, 1, 1)
    np.testing.assert_array_equal(counts.nonzero_per_cell, (dense != 0).sum(axis=1))
    np.testing.assert_array_equal(counts.nonzero_per_gene, (dense != 0).sum(axis=0))
    assert counts.nonzero_per_cell[3] == 0 and counts.nonzero_per_gene[7] == 0
    assert counts.nonzero_per_cell[4] == np.diff(whole.indptr)[4] - 1  # the stored zero is not counted
    head = counts.head.toarray() if sp.issparse(counts.head) else counts.head
    np.testing.assert_array_equal(head, dense[:5])
    default = count_matrix(X)  # one block
    np.testing.assert_array_equal(default.nonzero_per_gene, counts.nonzero_per_gene)
    np.testing.assert_array_equal(default.nonzero_per_cell, counts.nonzero_per_cell)


def test_backed_matrices_are_read_a_block_at_a_time(tmp_path):
    rows = _Recording(_backed(_awkward_counts(), tmp_path, "csr.h5ad").X)
    count_matrix(rows, chunk_rows=7)
    assert len(rows.reads) == -(-80 // 7)
    assert all(isinstance(k, slice) and k.stop - k.start <= 7 for k in rows.reads)
    columns = _Recording(_backed(sp.csc_matrix(_awkward_counts()), tmp_path, "csc.h5ad").X)
    count_matrix(columns, chunk_rows=7)  # 7 rows of 75 genes: about 7 columns of 80 cells
    assert all(k[0] == slice(None) and k[1].stop - k[1].start <= 7 for k in columns.reads)
    assert sum(min(k[1].stop, 75) - k[1].start for k in columns.reads) == 75  # every gene read once


def test_value_kind_of_a_backed_csc_matrix_is_sampled_by_column_blocks(tmp_path, monkeypatch):
    from scdrugmap.data import schema

    X = sp.csc_matrix(make_adata().X)
    columns = _Recording(_backed(X, tmp_path).X)
    monkeypatch.setattr(schema, "CSC_BLOCK_CELLS", 80 * 10)  # 10 genes per block
    head = schema.head_rows(columns, 30)
    np.testing.assert_array_equal(head.toarray(), X[:30].toarray())
    assert len(columns.reads) == 8 and all(k[0] == slice(None) for k in columns.reads)
    assert schema.detect_value_kind(columns) == schema.detect_value_kind(X) == "counts"


def _report_view(report):
    return (report.facts, [str(p) for p in report.problems], {k: t.to_dict() for k, t in report.tables.items()})


@pytest.mark.parametrize("layout", ["csr", "csc"])
def test_backed_file_gives_the_same_report_as_in_memory(tmp_path, layout):
    adata = make_adata()
    X = adata.X.toarray()
    X[3, :] = 0
    X[:, 7] = 0
    adata.X = _as_layout(sp.csr_matrix(X), layout)
    path = _write(adata, tmp_path)
    in_memory = check_adata(anndata.read_h5ad(path), n_folds=2, needs="counts")
    backed = anndata.read_h5ad(path, backed="r")
    try:
        streamed = check_adata(backed, n_folds=2, needs="counts", chunk_rows=7)
    finally:
        backed.file.close()
    assert _report_view(streamed) == _report_view(in_memory)
    assert any("1 cells have no expressed gene (e.g. cell3)" in str(p) for p in streamed.errors)
    assert streamed.facts["value_kind"] == "counts"


def test_backed_nan_and_negative_values_are_reported_like_in_memory(tmp_path):
    adata = make_adata()
    X = adata.X.toarray()
    X[5, 2] = -1.5
    adata.X = sp.csr_matrix(X)
    path = _write(adata, tmp_path)
    backed = anndata.read_h5ad(path, backed="r")
    try:
        report = check_adata(backed, n_folds=2, needs="nonnegative", chunk_rows=7)
    finally:
        backed.file.close()
    assert _report_view(report) == _report_view(check_adata(anndata.read_h5ad(path), n_folds=2, needs="nonnegative"))
    assert any("1 negative values" in str(p) for p in report.errors)


def test_other_sparse_formats_are_counted_like_csr():
    whole = _awkward_counts()
    coo, csr = count_matrix(whole.tocoo(), chunk_rows=7), count_matrix(whole, chunk_rows=7)
    assert (coo.n_nan, coo.n_inf, coo.n_negative) == (csr.n_nan, csr.n_inf, csr.n_negative)
    np.testing.assert_array_equal(coo.nonzero_per_cell, csr.nonzero_per_cell)
    np.testing.assert_array_equal(coo.nonzero_per_gene, csr.nonzero_per_gene)


@pytest.mark.parametrize("layout", ["csr", "csc", "dense"])
def test_counts_of_positive_values_equal_whole_matrix_counts(tmp_path, layout):
    """Counts, all positive: the one-min-one-max shortcut counts exactly what a value-by-value pass counts."""
    whole = sp.csr_matrix(make_adata().X)
    assert whole.data.min() > 0
    for X in (_as_layout(whole, layout), _backed(_as_layout(whole, layout), tmp_path, f"{layout}.h5ad").X):
        counts = count_matrix(X, chunk_rows=7)
        dense = whole.toarray()
        assert (counts.n_nan, counts.n_inf, counts.n_negative) == (0, 0, 0)
        np.testing.assert_array_equal(counts.nonzero_per_cell, (dense != 0).sum(axis=1))
        np.testing.assert_array_equal(counts.nonzero_per_gene, (dense != 0).sum(axis=0))


def test_rows_of_a_backed_csr_matrix_equal_anndatas_slices(tmp_path):
    from scdrugmap.data.schema import row_block

    X = _backed(_awkward_counts(), tmp_path).X
    for start, stop in ((0, 7), (7, 30), (75, 90), (80, 81)):
        block, expected = row_block(X, start, stop), X[start:min(stop, X.shape[0])]
        assert sp.isspmatrix_csr(block) and block.shape == expected.shape
        assert block.dtype == expected.dtype and block.indices.dtype == expected.indices.dtype
        np.testing.assert_array_equal(block.toarray(), expected.toarray())


def test_balance_tables_equal_a_pandas_groupby_of_the_text_values():
    import pandas as pd

    from scdrugmap.data.check import _balance_table

    obs = make_adata(n_cells=300, n_samples=12).obs
    n = len(obs)
    mixed = np.array([None, np.nan, "x", 3] * (n // 4), dtype=object)  # None, NaN, text and a number
    obs = obs.assign(mixed=mixed, numbers=np.arange(n) % 7 * 1.5, text=obs["sample"].astype(str))
    labels = (obs["response"].astype(str) == "sensitive").to_numpy().astype(np.int8)
    for column in obs.columns:
        frame = pd.DataFrame({column: obs[column].astype(str).to_numpy(), "sensitive": labels})
        expected = frame.groupby(column).agg(cells=("sensitive", "size"), sensitive=("sensitive", "sum"))
        expected["resistant"] = expected["cells"] - expected["sensitive"]
        table = _balance_table(obs, column, labels)
        pd.testing.assert_frame_equal(table, expected, check_dtype=False)  # groupby narrows small sums to int8
        assert (table.dtypes == np.int64).all()


def test_index_counts_in_chunks_equal_bincount():
    from scdrugmap.data.check import COUNT_CHUNK, _index_counts

    indices = np.random.default_rng(0).integers(0, 3000, 2 * COUNT_CHUNK + 17).astype(np.int32)  # three chunks
    np.testing.assert_array_equal(_index_counts(indices, 3005), np.bincount(indices, minlength=3005))
    np.testing.assert_array_equal(_index_counts(indices[:10], 3005), np.bincount(indices[:10], minlength=3005))


def test_csr_rows_are_views_in_memory_and_equal_the_rows_of_a_backed_matrix(tmp_path):
    from scdrugmap.data.schema import csr_rows

    whole = _awkward_counts()
    backed = _backed(whole, tmp_path).X
    for start, stop in ((0, 7), (7, 30), (75, 90)):
        expected = whole[start:stop]
        for X in (whole, backed):
            data, indices, indptr = csr_rows(X, start, stop)
            rows = sp.csr_matrix((data, indices, indptr), shape=expected.shape)
            np.testing.assert_array_equal(rows.toarray(), expected.toarray())
            assert indptr[0] == 0
        data, indices, _ = csr_rows(whole, start, stop)
        assert np.shares_memory(data, whole.data) and np.shares_memory(indices, whole.indices)  # nothing copied
