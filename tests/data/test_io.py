"""Writing a changed AnnData as a copy of the file it was read from."""

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from scdrugmap.data.io import write_h5ad_changes
from tests_helpers import make_adata


def assert_equal(left, right):
    """Equal AnnData: matrices, frames (with dtypes), mappings of arrays and uns, raw."""
    def same(a, b, where):
        if isinstance(a, dict):
            assert set(a) == set(b), where
            for key in a:
                same(a[key], b[key], f"{where}/{key}")
        elif isinstance(a, pd.DataFrame):
            pd.testing.assert_frame_equal(a, b, obj=where)
        elif sp.issparse(a) or isinstance(a, np.ndarray):
            assert sp.issparse(a) == sp.issparse(b) and a.dtype == b.dtype and a.shape == b.shape, where
            np.testing.assert_array_equal(a.toarray() if sp.issparse(a) else a, b.toarray() if sp.issparse(b) else b)
        else:
            assert a == b, where

    same(left.X, right.X, "X")
    for name in ("obs", "var"):
        same(getattr(left, name), getattr(right, name), name)
    for name in ("layers", "obsm", "varm", "obsp", "varp", "uns"):
        same(dict(getattr(left, name)), dict(getattr(right, name)), name)
    assert (left.raw is None) == (right.raw is None)
    if left.raw is not None:
        same(left.raw.X, right.raw.X, "raw.X")
        same(left.raw.var, right.raw.var, "raw.var")


def _source(tmp_path, *, with_raw):
    """A file with layers, obsm, nested uns and string columns stored as strings (write_h5ad would convert them)."""
    adata = make_adata(n_cells=60, n_samples=6)
    adata.var["family"] = np.where(np.arange(adata.n_vars) % 3, "a", "b")  # repeats: becomes categorical on write
    adata.layers["counts"] = adata.X.copy()
    adata.obsm["X_pca"] = np.random.default_rng(0).normal(size=(adata.n_obs, 5)).astype(np.float32)
    adata.uns["nested"] = {"values": np.arange(3), "text": "x"}
    if with_raw:
        adata.raw = adata.copy()
    path = tmp_path / "source.h5ad"
    adata.write_h5ad(path, convert_strings_to_categoricals=False)
    return path


def _predicted(path):
    adata = ad.read_h5ad(path)
    adata.obs["call"] = np.where(np.arange(adata.n_obs) % 2, "sensitive", "resistant")  # strings, as predict adds
    adata.obs["score"] = np.linspace(0, 1, adata.n_obs, dtype=np.float32)
    adata.obs["flag"] = np.arange(adata.n_obs) % 5 == 0
    adata.uns.setdefault("scdrugmap", {})["scdrugmap_pca"] = {"model": "pca", "warnings": ["a", "b"], "alpha": 0.1}
    return adata


@pytest.mark.parametrize("with_raw", [False, True])
def test_changes_written_into_a_copy_read_back_as_a_whole_write(tmp_path, with_raw):
    source = _source(tmp_path, with_raw=with_raw)
    whole, changed = _predicted(source), _predicted(source)
    whole.write_h5ad(tmp_path / "whole.h5ad")
    write_h5ad_changes(changed, source, tmp_path / "changed.h5ad")
    expected, written = ad.read_h5ad(tmp_path / "whole.h5ad"), ad.read_h5ad(tmp_path / "changed.h5ad")
    assert_equal(written, expected)
    assert isinstance(written.var["family"].dtype, pd.CategoricalDtype)  # var was written again: converted
    assert isinstance(written.obs["call"].dtype, pd.CategoricalDtype)
    assert sp.issparse(written.X) and written.X.dtype == expected.X.dtype
    assert_equal(changed, whole)  # the AnnData in memory is left as write_h5ad leaves it
