"""Differential expression: pseudobulk finds the planted genes, Wilcoxon per cell type, counts are required."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("scanpy")
pytest.importorskip("pydeseq2")

from explain_helpers import DE_COLLECTION, planted, precision_at, simulated  # noqa: E402

from scdrugmap.errors import ConfigError, SchemaError  # noqa: E402
from scdrugmap.explain.de import (  # noqa: E402
    DE_COLUMNS,
    benjamini_hochberg,
    differential_expression,
    labels_are_per_sample,
    predicted_groups,
    top_genes,
)
from scdrugmap.models.baselines import log_normalise  # noqa: E402


@pytest.fixture(scope="module")
def collection():
    return simulated(*DE_COLLECTION)


@pytest.fixture(scope="module")
def pseudobulk_table(collection):
    return differential_expression(collection)


def test_benjamini_hochberg_matches_scipy_and_leaves_nan_out():
    from scipy.stats import false_discovery_control

    p = np.array([0.01, 0.04, np.nan, 0.03, 0.5, 0.001])
    q = benjamini_hochberg(p)
    finite = ~np.isnan(p)
    np.testing.assert_allclose(q[finite], false_discovery_control(p[finite]))
    assert np.isnan(q[2])


def test_pseudobulk_is_the_default_for_per_sample_labels_and_finds_the_planted_genes(collection, pseudobulk_table):
    table = pseudobulk_table
    assert list(table.columns) == list(DE_COLUMNS)
    assert set(table["test"]) == {"pseudobulk"} and set(table["stratum"]) == {"all"}
    assert set(table["comparison"]) == {"observed"}
    assert table.attrs["designs"] == {"all": "~ study + group"}  # several studies: adjusted for
    truth = planted(collection)
    assert precision_at(top_genes(table, 20), truth) >= 0.8
    # the direction is resistant over sensitive: ABCB1 is planted up, BAX down (simulate.RESISTANCE_UP/DOWN)
    by_gene = table.set_index("gene")
    assert by_gene.loc["ABCB1", "log2fc"] > 0 > by_gene.loc["BAX", "log2fc"]
    assert np.sign(by_gene.loc["ABCB1", "score"]) == 1
    significant = table.loc[table["qvalue"] < 0.05, "gene"]
    assert len(significant) >= 10 and np.mean(significant.isin(truth)) >= 0.8
    assert (table["n_resistant"] >= 2).all() and (table["n_sensitive"] >= 2).all()


def test_same_data_same_table(collection, pseudobulk_table):
    pd.testing.assert_frame_equal(differential_expression(collection), pseudobulk_table)


def test_wilcoxon_runs_within_each_cell_type_and_names_the_strata_it_leaves_out(collection):
    calls = []
    table = differential_expression(collection, cell_type_key="cell_type", test="wilcoxon", min_cells=20,
                                    progress=lambda done, total: calls.append((done, total)))
    assert calls[-1] == (collection.obs["cell_type"].nunique(),) * 2
    counts = collection.obs.groupby(["cell_type", "response"], observed=True).size().unstack(fill_value=0)
    kept = set(counts.index[(counts >= 20).all(axis=1)])
    assert set(table["stratum"]) == kept and set(table["test"]) == {"wilcoxon"}
    left_out = {key.split(":", 1)[1] for key in table.attrs["skipped"]}
    assert left_out == set(counts.index) - kept
    for stratum, part in table.groupby("stratum"):
        assert part["gene"].is_unique and len(part) == collection.n_vars
        assert part["n_resistant"].iloc[0] == counts.loc[stratum, "resistant"]
        np.testing.assert_allclose(part["qvalue"], benjamini_hochberg(part["pvalue"]))
    malignant = table[table["stratum"] == "malignant"]
    assert precision_at(top_genes(malignant, 20), planted(collection)) >= 0.6


def test_pseudobulk_refuses_values_that_are_not_counts_and_falls_back_only_when_asked(collection):
    logged = collection.copy()
    logged.layers["log"] = log_normalise(logged.X, "counts")
    with pytest.raises(SchemaError, match=r"raw integer counts.*looks log.*layer='counts'"):
        differential_expression(logged, layer="log")
    table = differential_expression(logged, layer="log", non_counts="wilcoxon")
    assert set(table["test"]) == {"wilcoxon"} and table.attrs["value_kind"] == "log"
    zscored = collection[:, :50].copy()
    dense = zscored.X.toarray()
    zscored.X = (dense - dense.mean(0)) / np.maximum(dense.std(0), 1e-6)
    table = differential_expression(zscored, test="wilcoxon")
    assert table["log2fc"].isna().all() and table["pvalue"].notna().all()  # ranks valid, fold change undefined


def test_predicted_labels_varying_within_samples_are_tested_per_cell_or_paired_per_sample(collection):
    rng = np.random.default_rng(0)
    probability = rng.random(collection.n_obs)
    probability[:5] = np.nan
    groups = predicted_groups(probability)
    assert groups[0] is None and set(groups[5:]) == {"sensitive", "resistant"}
    samples = collection.obs["sample"].to_numpy()
    assert not labels_are_per_sample(groups, samples)
    assert labels_are_per_sample(collection.obs["response"].to_numpy(), samples)
    subset = collection[:, :40].copy()
    auto = differential_expression(subset, labels=groups, comparison="predicted")
    assert set(auto["test"]) == {"wilcoxon"} and set(auto["comparison"]) == {"predicted"}
    assert auto["n_resistant"].iloc[0] + auto["n_sensitive"].iloc[0] == collection.n_obs - 5
    paired = differential_expression(subset, labels=groups, test="pseudobulk", min_cells=5)
    assert paired.attrs["designs"] == {"all": "~ sample + group"}
    assert (paired["qvalue"].dropna() > 0.05).all()  # random predictions: nothing found


def test_bad_options_and_columns_are_refused_with_the_fix(collection):
    with pytest.raises(ConfigError, match="test='t'"):
        differential_expression(collection, test="t")
    with pytest.raises(SchemaError, match="obs has no 'label'"):
        differential_expression(collection, label_key="label")
    with pytest.raises(SchemaError, match="one label per cell"):
        differential_expression(collection, labels=["sensitive"])
    with pytest.raises(SchemaError, match="maybe"):
        differential_expression(collection, labels=np.full(collection.n_obs, "maybe"))
    with pytest.raises(ConfigError, match="rank deficient"):
        differential_expression(collection, covariates=["dataset", "study"], test="pseudobulk")


def test_auto_uses_wilcoxon_with_a_warning_when_a_group_has_one_sample(collection, caplog):
    samples = collection.obs["sample"].astype(str)
    largest = samples.groupby(collection.obs["response"].astype(str).to_numpy()).value_counts()
    keep = samples.isin([largest["resistant"].index[0], *largest["sensitive"].index[:3]])
    subset = collection[keep.to_numpy(), :30].copy()
    with caplog.at_level("WARNING"):
        table = differential_expression(subset, min_cells=1)
    assert set(table["test"]) == {"wilcoxon"}
    assert "pseudoreplicates" in caplog.text


def test_wilcoxon_leaves_the_torch_thread_count_as_it_was(collection):
    import torch

    torch.set_num_threads(1)  # numba's OpenMP pool (scanpy) would reset it to the core count
    differential_expression(collection[:, :20].copy(), test="wilcoxon")
    assert torch.get_num_threads() == 1


def test_auto_counts_only_samples_big_enough_for_pseudobulk():
    """Many tiny samples: too few pseudobulk samples of >= min_cells cells, so auto runs Wilcoxon, not nothing."""
    from scdrugmap.data.simulate import simulate_collection

    small = simulate_collection(240, n_genes=100, seed=0, resistance_strength=2.0)
    sizes = small.obs.groupby(["response", "sample"], observed=True).size()
    assert (sizes >= 10).groupby(level="response").sum().min() < 2 <= sizes.groupby(level="response").size().min()
    table = differential_expression(small)
    assert set(table["test"]) == {"wilcoxon"} and len(table) == small.n_vars
