"""Attribution of baseline heads: the torch path equals predict_cells, IG is complete, planted genes lead."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from explain_helpers import HEAD_COLLECTION, labels, planted, precision_at, simulated

from scdrugmap.errors import CheckpointError, ConfigError, SchemaError
from scdrugmap.explain.attribution import (
    DELETION_COLUMNS,
    SUMMARY_COLUMNS,
    Attributions,
    attribute_expression,
    make_predict_function,
    measure_deletion_effects,
    token_attribution_hook,
)
from scdrugmap.models.baselines import HVGEncoder, PCAEncoder, log_normalise
from scdrugmap.train.bundle import Head, sigmoid
from scdrugmap.train.predict import fit_head, predict_cells


def train_bundle(encoder, adata, y, groups, path, *, head="mlp"):
    """Train a head with the package's own `fit_head` and save it as a bundle folder."""
    return fit_head(encoder, adata, y, groups, head=head).save(path)


@pytest.fixture(scope="module")
def collection():
    return simulated(*HEAD_COLLECTION)


@pytest.fixture(scope="module")
def hvg_bundle(collection, tmp_path_factory):
    """The paper's MLP head (default settings) on the hvg baseline, trained on every labelled cell."""
    groups = collection.obs["sample"].astype(str).to_numpy()
    return train_bundle(HVGEncoder(), collection, labels(collection), groups, tmp_path_factory.mktemp("hvg"))


@pytest.fixture(scope="module")
def hvg_attributions(collection, hvg_bundle):
    return attribute_expression(collection, hvg_bundle, max_cells=500)


def small_data(n_cells: int = 120, seed: int = 0) -> ad.AnnData:
    data = simulated(*HEAD_COLLECTION)
    rows = np.random.default_rng(seed).choice(data.n_obs, n_cells, replace=False)
    return data[np.sort(rows), :120].copy()


def test_hvg_head_attribution_finds_the_planted_resistance_genes(collection, hvg_attributions):
    result = hvg_attributions
    assert result.values.shape == (500, collection.n_vars)  # 300 genes < 2,000: hvg keeps them all
    assert precision_at(result.top_genes(20), planted(collection)) >= 0.8
    assert list(result.summary().columns) == list(SUMMARY_COLUMNS)
    resistant = result.obs_names[result.probability < 0.5]
    assert precision_at(result.top_genes(20, cells=resistant), planted(collection)) >= 0.8
    assert np.abs(result.convergence_delta).max() < 0.01


def test_gradients_say_the_direction_of_the_planted_genes(collection, hvg_bundle):
    gradient = attribute_expression(collection, hvg_bundle, method="gradient", max_cells=300).summary()
    mean = gradient.set_index("gene")["attribution_mean"]
    # P(sensitive) falls with genes planted up in resistant cells (ABCB1, VIM, ...) and rises with those down
    assert (mean[["ABCB1", "ABCG2", "VIM", "CD44"]] < 0).all() and (mean[["BAX", "PMAIP1", "FAS"]] > 0).all()


def test_same_seed_same_attributions(collection, hvg_bundle, hvg_attributions):
    again = attribute_expression(collection, hvg_bundle, max_cells=500, n_steps=10)
    first = attribute_expression(collection, hvg_bundle, max_cells=500, n_steps=10)
    np.testing.assert_array_equal(again.values, first.values)
    np.testing.assert_array_equal(again.obs_names, hvg_attributions.obs_names)
    other = attribute_expression(collection, hvg_bundle, max_cells=500, seed=1, method="gradient")
    assert not np.array_equal(other.obs_names, hvg_attributions.obs_names)


@pytest.mark.parametrize(("encoder", "head", "kind"), [(HVGEncoder, "mlp", "counts"), (PCAEncoder, "logistic", "counts"),
                                                       (PCAEncoder, "mlp", "log")])
def test_torch_path_reproduces_predict_cells(encoder, head, kind, tmp_path):
    data = small_data()
    if kind == "log":
        data.X = log_normalise(data.X, "counts")
    options = {"n_components": 10} if encoder is PCAEncoder else {"n_top_genes": 60}
    bundle = train_bundle(encoder(**options), data, labels(data), None, tmp_path / "bundle", head=head)
    expected = sigmoid(predict_cells(encoder(**options), data, Head.read(bundle))[0])
    for wrt in ("normalised", "expression"):
        result = attribute_expression(data, bundle, method="gradient", wrt=wrt, max_cells=None, batch_size=50)
        np.testing.assert_allclose(result.probability, expected, atol=2e-6)
    assert result.values.shape == (data.n_obs, data.n_vars)


def test_integrated_gradients_are_complete_and_gradients_match_finite_differences(tmp_path):
    data = small_data(60)
    bundle = train_bundle(HVGEncoder(n_top_genes=40), data, labels(data), None, tmp_path / "b")
    calls = []
    attribute_expression(data, bundle, batch_size=25, max_cells=None, progress=lambda *done: calls.append(done))
    assert calls == [(25, 60), (50, 60), (60, 60)]
    for baseline in ("zero", "mean"):
        ig = attribute_expression(data, bundle, baseline=baseline, n_steps=64, max_cells=None)
        assert np.abs(ig.convergence_delta).max() < 2e-3  # sum of attributions = P(cell) - P(baseline)
        assert ig.genes.size == 40
    gradient = attribute_expression(data, bundle, method="gradient", wrt="expression", max_cells=None)
    times_input = attribute_expression(data, bundle, method="gradient_x_input", wrt="expression", max_cells=None)
    counts = data.X.toarray().astype(np.float64)
    np.testing.assert_allclose(times_input.values, gradient.values * counts, rtol=1e-5, atol=1e-9)
    predict = make_predict_function(HVGEncoder(), bundle)
    cell, step = 3, 0.05
    expressed = np.flatnonzero(counts[cell] >= 3)  # away from zero, where log1p bends sharply
    genes = expressed[np.argsort(-np.abs(gradient.values[cell, expressed]))[:3]]
    for gene in genes:
        moved = data[[cell]].copy()
        dense = moved.X.toarray()
        dense[0, gene] += step
        moved.X = sp.csr_matrix(dense)
        up = predict(moved)[0]
        dense[0, gene] -= 2 * step
        moved.X = sp.csr_matrix(dense)
        down = predict(moved)[0]
        assert (up - down) / (2 * step) == pytest.approx(gradient.values[cell, gene], rel=0.1, abs=1e-4)


def test_ig_through_count_normalisation_and_other_heads_are_refused(tmp_path):
    data = small_data(40)
    bundle = train_bundle(HVGEncoder(n_top_genes=20), data, labels(data), None, tmp_path / "b")
    with pytest.raises(ConfigError, match="degenerate"):
        attribute_expression(data, bundle, wrt="expression")
    with pytest.raises(ConfigError, match="method="):
        attribute_expression(data, bundle, method="saliency")
    meta = (tmp_path / "b" / "head.json").read_text().replace('"model": "hvg"', '"model": "geneformer"')
    (tmp_path / "b" / "head.json").write_text(meta)
    with pytest.raises(CheckpointError, match="attribute_tokens"):
        attribute_expression(data, bundle)
    with pytest.raises(ConfigError, match="no token attribution hook"):
        token_attribution_hook(HVGEncoder())


def test_deletion_equals_predicting_on_the_cells_with_the_gene_zeroed(tmp_path):
    data = small_data(50)
    bundle = train_bundle(HVGEncoder(n_top_genes=60), data, labels(data), None, tmp_path / "b")
    predict = make_predict_function(HVGEncoder(), bundle)
    genes = [*sorted(planted(data) & set(data.var_names))[:2], str(data.var_names[0])]
    calls = []
    table = measure_deletion_effects(data, predict, genes=genes, max_cells=None, rows_per_call=60,
                                     progress=lambda done, total: calls.append((done, total)))
    assert calls == [(1, 3), (2, 3), (3, 3)]  # 60 rows a call: one gene's copies of the 50 cells
    assert list(table.columns) == list(DELETION_COLUMNS) and set(table["gene"]) == set(genes)
    before = predict(data)
    for gene in genes:
        column = list(data.var_names).index(gene)
        zeroed = data.copy()
        dense = zeroed.X.toarray()
        expressing = dense[:, column] != 0
        dense[:, column] = 0
        zeroed.X = sp.csr_matrix(dense)
        delta = predict(zeroed) - before
        row = table.set_index("gene").loc[gene]
        assert row["n_expressing"] == expressing.sum()
        assert row["deletion_delta_all"] == pytest.approx(delta.mean(), abs=1e-6)
        if expressing.any():
            assert row["deletion_delta"] == pytest.approx(delta[expressing].mean(), abs=1e-6)
    one_call = measure_deletion_effects(data, predict, genes=genes, max_cells=None)
    pd.testing.assert_frame_equal(one_call, table)
    default = measure_deletion_effects(data, predict, max_cells=20, max_genes=5)
    assert len(default) == 5 and (default["n_cells"] == 20).all()
    with pytest.raises(SchemaError, match="NOT_A_GENE"):
        measure_deletion_effects(data, predict, genes=["NOT_A_GENE"])


def test_summary_over_chosen_cells_and_sparse_values():
    values = np.array([[1.0, -2.0], [3.0, 0.0], [-1.0, 0.0]], dtype=np.float32)
    dense = Attributions(values, np.array(["A", "B"]), np.array(["c0", "c1", "c2"]), np.zeros(3, np.float32), "gradient")
    sparse = Attributions(sp.csr_matrix(values), dense.genes, dense.obs_names, dense.probability, "gradient")
    pd.testing.assert_frame_equal(dense.summary(), sparse.summary())
    first = dense.summary(["c0", "c1"]).set_index("gene")
    assert first.loc["A", "attribution_mean"] == 2.0 and first.loc["B", "attribution_abs_mean"] == 1.0
    assert dense.summary().loc[0, "gene"] == "A"  # mean |attribution| 5/3 > 2/3
    with pytest.raises(SchemaError, match="not attributed"):
        dense.summary(["c9"])
