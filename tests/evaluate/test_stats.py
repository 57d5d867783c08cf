"""Statistics over folds: sample-level AUROC with pairs compared within their fold, and its bootstrap interval."""

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from scdrugmap.evaluate.splits import permute_labels
from scdrugmap.evaluate.stats import (
    compare_models,
    confounder_auroc,
    grouped_pair_counts,
    label_design,
    paired_test,
    permutation_pvalues,
    sample_level_auroc,
    within_fold_auroc,
)


def test_within_fold_auroc_of_one_fold_is_the_ordinary_auroc_with_an_interval_around_it():
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1], 20)
    scores = labels + rng.normal(0, 1, 40)
    result = within_fold_auroc(labels, scores, np.zeros(40))
    assert result["auroc"] == pytest.approx(roc_auc_score(labels, scores))
    assert result["ci_low"] < result["auroc"] < result["ci_high"] and result["n_pairs"] == 400


def test_within_fold_auroc_without_bootstrap_equals_the_per_stratum_auroc_weighted_by_pairs():
    """The cell-level path (no bootstrap) scores large strata from ranks, never a pairs matrix."""
    rng = np.random.default_rng(4)
    strata = rng.integers(0, 3, 3000)
    labels = rng.integers(0, 2, 3000)
    scores = np.round(labels * 0.5 + rng.normal(0, 1, 3000), 1)  # rounded: ties within and across labels
    result = within_fold_auroc(labels, scores, strata, n_bootstrap=0)
    pairs = [(labels[strata == s] == 1).sum() * (labels[strata == s] == 0).sum() for s in range(3)]
    expected = sum(roc_auc_score(labels[strata == s], scores[strata == s]) * n for s, n in enumerate(pairs))
    assert result["n_pairs"] == sum(pairs) and result["auroc"] == pytest.approx(expected / sum(pairs), abs=1e-12)
    assert np.isnan(result["ci_low"])


def test_a_constant_per_fold_reference_scores_one_half_whatever_the_folds_priors():
    """Pooling folds naively would rank the folds' training priors (here perfectly anti-correlated)."""
    labels = np.array([1, 1, 1, 0, 1, 0, 0, 0])
    folds = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    prior = np.where(folds == 0, 0.25, 0.75)  # fold 0 holds more sensitive samples, so it trained on fewer
    assert roc_auc_score(labels, prior) < 0.3
    result = within_fold_auroc(labels, prior, folds)
    assert result["auroc"] == 0.5 and result["ci_low"] == 0.5 == result["ci_high"]
    assert result["n_pairs"] == 3 + 3 and result["n_strata"] == 2


def test_folds_with_one_label_add_no_pairs_and_none_at_all_is_nan_with_a_reason():
    result = within_fold_auroc([1, 1, 0, 0], [0.9, 0.8, 0.1, 0.2], [0, 0, 1, 1])
    assert np.isnan(result["auroc"]) and result["reason"] == "no fold's test samples hold both labels"


def test_sample_level_auroc_aggregates_cells_to_samples_per_fold_and_value():
    cells = pd.DataFrame({"cell": [f"c{i}" for i in range(8)], "sample": list("aabbccdd"),
                          "response": ["sensitive"] * 2 + ["resistant"] * 2 + ["sensitive"] * 2 + ["resistant"] * 2})
    predictions = pd.DataFrame({"cell": [f"c{i}" for i in range(8)], "label": [1, 1, 0, 0, 1, 1, 0, 0],
                                "probability": [0.9, 0.1, 0.4, 0.4, 0.6, 0.6, 0.7, 0.5],
                                "key": ["k0"] * 4 + ["k1"] * 4})
    results = pd.DataFrame({"key": ["k0", "k1"], "model": "m", "strategy": "frozen", "head": "mlp",
                            "scenario": "pooled", "category": "tissue", "value": "T", "split": "sample",
                            "status": "done", "level": "cell"})
    table = sample_level_auroc(predictions, cells, results, n_bootstrap=50)
    row = table.iloc[0]
    assert row["n_samples"] == 4 and row["n_pairs"] == 2 and row["n_folds"] == 2
    assert row["auroc"] == pytest.approx((1.0 + 0.5) / 2)  # fold 0: a (0.5) above b (0.4); fold 1: c and d tie at 0.6
    assert label_design(cells) == "per-sample"
    assert label_design(cells.assign(sample="one")) == "per-cell" and label_design(None) == "unknown"


def test_paired_sign_flip_test_is_exact_for_few_folds():
    result = paired_test([0.1, 0.2, 0.3, 0.4, 0.5])
    assert result["p_value"] == pytest.approx(1 / 32)  # only the observed signs reach the observed mean
    assert result["ci_low"] > 0 and result["n"] == 5
    assert paired_test([0.1, -0.1, 0.2, -0.2])["p_value"] > 0.3
    assert np.isnan(paired_test([np.nan])["p_value"])


def _fold_rows(model, scores, value="T", strategy="frozen"):
    return [{"key": f"{model}|{value}|{i}", "model": model, "strategy": strategy, "head": "mlp", "scenario": "pooled",
             "category": "tissue", "value": value, "fold": str(i), "split": "sample", "status": "done",
             "level": "cell", "auroc": s} for i, s in enumerate(scores)]


def test_models_are_compared_with_the_majority_reference_and_the_best_baseline_fold_by_fold():
    rows = (_fold_rows("majority", [0.5] * 6) + _fold_rows("pca", [0.6, 0.7, 0.65, 0.8, 0.7, 0.75])
            + _fold_rows("hvg", [0.55, 0.5, 0.6, 0.52, 0.58, 0.5]) + _fold_rows("scgpt", [0.62, 0.72, 0.6, 0.8, 0.7, 0.8]))
    table = compare_models(pd.DataFrame(rows), baselines={"pca", "hvg", "majority"})
    table = table.set_index(["model", "versus"])
    assert table.loc[("pca", "reference"), "beats"] and table.loc[("pca", "reference"), "p_value"] == 1 / 64
    assert table.loc[("pca", "reference"), "mean"] == pytest.approx(0.2)
    assert table.loc[("scgpt", "best baseline"), "against"] == "pca"
    assert not table.loc[("scgpt", "best baseline"), "beats"]  # +0.0067 on average: no evidence
    assert ("pca", "best baseline") not in table.index  # pca is the best baseline: not compared with itself
    assert table.loc[("hvg", "best baseline"), "mean"] < 0
    assert ("majority", "reference") not in table.index


def test_permuting_labels_keeps_every_sample_on_one_label_and_the_value_balance():
    rng = np.random.default_rng(0)
    samples = np.repeat(np.array([f"s{i}" for i in range(8)]), 5)
    labels = np.repeat(np.array([1, 1, 1, 0, 0, 0, 0, 1]), 5)
    values = np.where(np.arange(40) < 20, "A", "B")
    shuffled = permute_labels(labels, values, samples, rng)
    frame = pd.DataFrame({"sample": samples, "label": shuffled, "value": values})
    assert (frame.groupby("sample")["label"].nunique() == 1).all()
    assert [frame[values == v]["label"].sum() for v in "AB"] == [labels[values == v].sum() for v in "AB"]
    cells = permute_labels(labels, values, None, rng)
    assert cells.sum() == labels.sum() and not np.array_equal(cells, labels)


def test_a_benchmark_with_permutations_reports_an_empirical_p_value(tmp_path):
    from scdrugmap.evaluate.grid import BenchmarkConfig
    from scdrugmap.evaluate.runner import run_benchmark
    from scdrugmap.evaluate.store import read_run
    from tests_helpers import write_tiny_h5ad

    data = write_tiny_h5ad(tmp_path)
    config = BenchmarkConfig(data=str(data), out=str(tmp_path / "run"), models=["pca", "majority"], folds=2,
                             categories=["tissue"], scenarios=["pooled"], splits=["cell"], permutations=3,
                             head={"epochs": 2, "hidden": 16})
    results = run_benchmark(config)
    null = read_run(tmp_path / "run").permutations
    assert set(null["permutation"]) == {0, 1, 2} and set(null["model"]) == {"pca", "majority"}
    table = permutation_pvalues(results, null)
    pca = table[table["model"] == "pca"]
    assert (pca["n_permutations"] == 3).all() and pca["p_value"].between(0.25, 1).all()
    assert (table.loc[table["model"] == "majority", "p_value"] == 1.0).all()  # 0.5 every time: never better
    again = run_benchmark(config)  # resumed: nothing recomputed, nothing added
    assert len(read_run(tmp_path / "run").permutations) == len(null)
    assert len(again) == len(results)


def _pair_matrix_counts(labels, scores, strata):
    """Wins and pairs from every pair's comparison: the definition the vectorised counts must equal."""
    wins = pairs = 0.0
    finite = np.isfinite(scores)
    for stratum in set(strata[finite].tolist()):
        members = finite & (strata == stratum)
        pos, neg = scores[members & (labels == 1)], scores[members & (labels == 0)]
        a, b = pos[:, None], neg[None, :]
        wins += ((a > b) + 0.5 * (a == b)).sum()
        pairs += pos.size * neg.size
    return wins, pairs


def test_grouped_pair_counts_equal_the_pair_matrix_of_every_group_ties_and_nan_scores_included():
    rng = np.random.default_rng(7)
    n = 3000
    labels = rng.integers(0, 2, n)
    scores = np.round(rng.normal(labels * 0.4, 1, n), 1)  # rounded: ties within and across labels
    scores[rng.random(n) < 0.05] = np.nan
    groups = rng.integers(0, 6, n)
    strata = rng.choice(["k0", "k1", "k2", "k3"], n)
    labels[(groups == 5) & (strata == "k0")] = 1  # one group holds a stratum with a single label
    counts = grouped_pair_counts(labels, scores, groups, strata, 7)  # group 6 has no items
    for group in range(6):
        members = groups == group
        wins, pairs = _pair_matrix_counts(labels[members], scores[members], strata[members])
        assert counts["wins"][group] == wins and counts["pairs"][group] == pairs
        assert counts["items"][group] == np.isfinite(scores[members]).sum()
    assert counts["strata"][5] == 3 and counts["strata"][0] == 4
    assert counts["items"][6] == counts["pairs"][6] == 0


def test_confounder_auroc_scores_within_and_per_value_as_the_pairs_of_those_cells_say():
    rng = np.random.default_rng(8)
    n = 400
    cells = pd.DataFrame({"cell": [f"c{i}" for i in range(n)],
                          "cell_type": rng.choice(["T", "B", None], n, p=[0.45, 0.45, 0.1]),
                          "study": rng.choice(["s1", "s2"], n)})
    keys = rng.choice(["k0", "k1", "k2"], n)
    labels = rng.integers(0, 2, n)
    predictions = pd.DataFrame({"cell": cells["cell"], "key": keys, "label": labels,
                                "probability": np.round(rng.random(n) * 0.5 + labels * 0.3, 2)})
    results = pd.DataFrame({"key": ["k0", "k1", "k2"], "model": ["m", "m", "r"], "strategy": "frozen",
                            "head": "mlp", "scenario": "pooled", "category": "tissue", "split": "sample",
                            "status": "done", "level": "cell"})
    table = confounder_auroc(predictions, cells, results)
    scores, types = predictions["probability"].to_numpy(), cells["cell_type"].fillna("(none)").to_numpy()
    for model, part in (("m", np.isin(keys, ["k0", "k1"])), ("r", keys == "k2")):
        rows = table[table["model"] == model].set_index("scope")
        expected = {
            "all cells": _pair_matrix_counts(labels[part], scores[part], keys[part]),
            "within cell type": _pair_matrix_counts(labels[part], scores[part],
                                                    np.char.add(keys[part].astype(str), types[part])),
            "cell type: B": _pair_matrix_counts(labels[part & (types == "B")], scores[part & (types == "B")],
                                                keys[part & (types == "B")]),
        }
        for scope, (wins, pairs) in expected.items():
            assert rows.loc[scope, "n_pairs"] == pairs and rows.loc[scope, "auroc"] == wins / pairs
        assert list(rows.index) == ["all cells", "within cell type", "within study", "cell type: B", "cell type: T",
                                    "study: s1", "study: s2"]  # cells without a cell type: no row of their own
