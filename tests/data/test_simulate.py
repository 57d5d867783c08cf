"""The simulator: catalog-shaped layout, per-sample labels, determinism, streaming, and a learnable signal."""

from __future__ import annotations

import filecmp
import functools
import subprocess
import sys

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from scdrugmap.data import schema
from scdrugmap.data.genes import map_genes
from scdrugmap.data.simulate import (
    CELL_TYPE,
    TIMEPOINT,
    _largest_remainder,
    parse_sample_design,
    simulate_collection,
)
from scdrugmap.errors import SchemaError

OBS_COLUMNS = [schema.RESPONSE, schema.STUDY, schema.DATASET, schema.SAMPLE, schema.TISSUE, schema.CANCER_TYPE,
               schema.THERAPY, schema.REGIMEN, CELL_TYPE, TIMEPOINT]


@pytest.fixture
def catalog_path(shared):
    return shared("catalog", "datasets.csv")


@functools.lru_cache(maxsize=1)
def _small(catalog_path) -> ad.AnnData:
    return simulate_collection(1500, n_genes=300, seed=7, catalog_path=catalog_path)


@pytest.fixture
def small(catalog_path):
    """One small collection shared by the tests that only read it."""
    return _small(catalog_path)


def _same(left: ad.AnnData, right: ad.AnnData) -> None:
    assert left.shape == right.shape
    assert (left.X != right.X).nnz == 0
    pd.testing.assert_frame_equal(left.obs, right.obs)
    pd.testing.assert_frame_equal(left.var, right.var)


@pytest.mark.parametrize(
    ("design", "n_samples", "expected"),
    [
        ("pre (resistant 2, sensitive 1)", 3, [("pre", "resistant")] * 2 + [("pre", "sensitive")]),
        ("resistant 1, sensitive 1", 2, [("", "resistant"), ("", "sensitive")]),
        ("pre (sensitive 2), post (resistant 1)", 3, [("pre", "sensitive")] * 2 + [("post", "resistant")]),
        ("pre (resistant 1, sensitive 1); post (resistant 1, sensitive 2)", 5,
         [("pre", "resistant"), ("pre", "sensitive"), ("post", "resistant")] + [("post", "sensitive")] * 2),
        ("resistant 1, persistant 1, sensitive 1", 3, [("", "resistant")] * 2 + [("", "sensitive")]),
    ],
)
def test_parse_sample_design_reads_timepoints_and_labels(design, n_samples, expected):
    samples = parse_sample_design(design, n_samples)
    assert [(s.timepoint, s.response) for s in samples] == expected


def test_parse_sample_design_refuses_a_count_that_disagrees_with_n_samples():
    with pytest.raises(SchemaError, match="names 3 samples but n_samples is 4"):
        parse_sample_design("pre (resistant 2, sensitive 1)", 4)


def test_every_catalog_design_parses_to_its_n_samples(catalog_path):
    catalog = pd.read_csv(catalog_path)
    for design, n in catalog[["sample_design", "n_samples"]].itertuples(index=False):
        assert len(parse_sample_design(design, n)) == n


def test_largest_remainder_keeps_the_total_and_the_proportions():
    counts = _largest_remainder(10, np.array([1.0, 1.0, 1.0]))
    assert counts.sum() == 10 and counts.max() - counts.min() <= 1
    assert _largest_remainder(7, np.array([0.0, 3.0])).tolist() == [0, 7]


def test_simulated_collection_follows_the_obs_schema_and_the_catalog(small, catalog_path):
    assert list(small.obs.columns) == OBS_COLUMNS
    assert set(small.obs[schema.RESPONSE].unique()) == {schema.SENSITIVE, schema.RESISTANT}
    catalog = pd.read_csv(catalog_path).set_index("dataset_id")
    present = small.obs[schema.DATASET].astype(str)
    for column in (schema.STUDY, schema.TISSUE, schema.CANCER_TYPE, schema.THERAPY, schema.REGIMEN):
        expected = catalog.loc[present, column].astype(str).to_numpy()
        assert (small.obs[column].astype(str).to_numpy() == expected).all(), column
    assert set(present) <= set(catalog.index[catalog["collection"] == "primary"])
    assert small.uns["simulated"] is True
    params = small.uns["scdrugmap"]["simulation"]
    assert (params["n_cells"], params["n_genes"], params["seed"]) == (1500, 300, 7)
    assert set(params["resistance_genes"]) <= set(small.var_names)


def test_cells_split_between_data_sets_as_the_catalog_counts_say(catalog_path):
    adata = simulate_collection(20_000, n_genes=20, seed=0, catalog_path=catalog_path)
    cells = adata.obs[schema.DATASET].value_counts()
    # P19 (GSE138267) holds 61,001 of the primary collection's 326,751 cells; P07 (CAR-T) holds 324.
    assert cells["P19"] == pytest.approx(20_000 * 61_001 / 326_751, abs=2)
    assert cells["P07"] == pytest.approx(20_000 * 324 / 326_751, abs=2)
    resistant = (adata.obs[schema.RESPONSE] == schema.RESISTANT).groupby(adata.obs[schema.DATASET], observed=True)
    assert resistant.sum()["P07"] == pytest.approx(20_000 * 316 / 326_751, abs=2)


def test_each_sample_has_one_label_and_the_design_sets_how_many_of_each(small, catalog_path):
    obs = small.obs
    assert obs.groupby(schema.SAMPLE, observed=True)[schema.RESPONSE].nunique().max() == 1
    assert obs.groupby(schema.SAMPLE, observed=True)[schema.DATASET].nunique().max() == 1
    catalog = pd.read_csv(catalog_path).set_index("dataset_id")
    labels = obs.groupby([schema.DATASET, schema.SAMPLE], observed=True)[schema.RESPONSE].first()
    for dataset, per_sample in labels.groupby(level=0, observed=True):
        design = parse_sample_design(catalog.loc[dataset, "sample_design"], catalog.loc[dataset, "n_samples"])
        allowed = pd.Series([s.response for s in design]).value_counts()
        seen = per_sample.value_counts()
        assert (seen <= allowed.reindex(seen.index)).all(), dataset


def test_genes_are_real_symbols_with_their_ensembl_ids(small):
    mapping = map_genes(small.var_names)
    assert (mapping["matched_by"] == "symbol").all()
    assert (mapping["ensembl_id"].to_numpy() == small.var["ensembl_id"].to_numpy()).all()
    assert small.var_names.is_unique


def test_counts_are_non_negative_integers_like_umis(small):
    X = small.X
    assert X.dtype == np.float32 and X.format == "csr"
    assert (X.data > 0).all() and np.array_equal(X.data, np.round(X.data))
    assert schema.detect_value_kind(X) == "counts"
    umis = np.asarray(X.sum(axis=1)).ravel()
    assert 500 < np.median(umis) < 5000


def test_same_seed_gives_the_same_collection_and_another_seed_does_not(small, catalog_path):
    again = simulate_collection(1500, n_genes=300, seed=7, catalog_path=catalog_path)
    _same(small, again)
    other = simulate_collection(1500, n_genes=300, seed=8, catalog_path=catalog_path)
    assert (other.X != small.X).nnz > 0


def test_streaming_writes_the_same_collection_as_in_memory_whatever_the_chunk_size(small, catalog_path, tmp_path):
    first = simulate_collection(1500, n_genes=300, seed=7, catalog_path=catalog_path,
                                out_path=tmp_path / "a.h5ad", chunk_size=100)
    second = simulate_collection(1500, n_genes=300, seed=7, catalog_path=catalog_path,
                                 out_path=tmp_path / "b.h5ad", chunk_size=10_000)
    assert first == tmp_path / "a.h5ad"
    assert filecmp.cmp(first, second, shallow=False)
    streamed = ad.read_h5ad(first)
    _same(small, streamed)
    assert streamed.uns["simulated"] is True
    assert streamed.uns["scdrugmap"]["simulation"]["seed"] == 7
    assert not list(tmp_path.glob(".*partial"))


def test_streamed_file_reads_in_backed_mode(small, catalog_path, tmp_path):
    path = simulate_collection(1500, n_genes=300, seed=7, catalog_path=catalog_path, out_path=tmp_path / "c.h5ad")
    backed = ad.read_h5ad(path, backed="r")
    try:
        assert backed.isbacked and backed.shape == small.shape
        rows = backed.X[100:140]
        assert (rows != small.X[100:140]).nnz == 0
        assert backed.obs[schema.SAMPLE].equals(small.obs[schema.SAMPLE])
    finally:
        backed.file.close()


def test_validation_and_all_collections_use_their_own_data_sets(catalog_path):
    validation = simulate_collection(600, n_genes=20, seed=0, catalog_path=catalog_path, collection="validation")
    assert validation.obs[schema.DATASET].astype(str).str.startswith("V").all()
    both = simulate_collection(600, n_genes=20, seed=0, catalog_path=catalog_path, collection="all")
    assert {d[0] for d in both.obs[schema.DATASET].astype(str)} == {"P", "V"}
    with pytest.raises(SchemaError, match="collection 'test' is unknown"):
        simulate_collection(10, n_genes=20, catalog_path=catalog_path, collection="test")


def test_a_missing_catalog_is_an_error_naming_the_file(tmp_path):
    with pytest.raises(SchemaError, match="datasets.csv does not exist"):
        simulate_collection(10, n_genes=20, catalog_path=tmp_path / "datasets.csv")


def _leave_study_out_auroc(adata: ad.AnnData) -> float:
    """Mean per-fold AUROC of a logistic regression on 30 log1p PCs, five folds grouped by study.

    Grouping by study, not sample: within a study, holding samples out leaves the opposite labels in
    training, which makes a sample-grouped split score below 0.5 when there is no signal.
    """
    from sklearn.decomposition import PCA
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import GroupKFold

    X = adata.X.multiply(1e4 / adata.X.sum(axis=1)).tocsr()
    X.data = np.log1p(X.data)
    Z = PCA(n_components=30, random_state=0).fit_transform(X.toarray())
    y = (adata.obs[schema.RESPONSE] == schema.RESISTANT).to_numpy().astype(int)
    groups = adata.obs[schema.STUDY].astype(str).to_numpy()
    scores = []
    for train, test in GroupKFold(n_splits=5).split(Z, y, groups):
        model = LogisticRegression(max_iter=2000).fit(Z[train], y[train])
        scores.append(roc_auc_score(y[test], model.predict_proba(Z[test])[:, 1]))
    return float(np.mean(scores))


@pytest.mark.slow
def test_resistance_signal_is_learnable_but_not_trivial_and_vanishes_at_strength_zero(catalog_path):
    kwargs = {"n_genes": 500, "seed": 0, "catalog_path": catalog_path}
    signal = _leave_study_out_auroc(simulate_collection(2000, resistance_strength=1.0, **kwargs))
    null = _leave_study_out_auroc(simulate_collection(2000, resistance_strength=0.0, **kwargs))
    assert 0.65 < signal < 0.95
    assert abs(null - 0.5) < 0.08


def test_the_data_room_never_imports_torch():
    code = ("import sys, scdrugmap.data.genes, scdrugmap.data.simulate; "
            "sys.exit('torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_simulated_files_are_named_after_the_simulators_parameters(monkeypatch):
    from scdrugmap.data import simulate

    before = simulate.simulator_version()
    monkeypatch.setattr(simulate, "STUDY_PROGRAM_SD", simulate.STUDY_PROGRAM_SD + 0.1)
    assert simulate.simulator_version() != before  # a cached demo made with other effect sizes is never reused
