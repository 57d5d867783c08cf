import math

import numpy as np
import pandas as pd
import pytest

from scdrugmap.evaluate.metrics import (
    aggregate_samples,
    binary_curves,
    compute_metrics,
    compute_sample_metrics,
    summarise,
)


def test_metrics_match_hand_counts():
    values, reasons = compute_metrics([1, 1, 0, 0], [0.9, 0.2, 0.6, 0.1])
    assert values["accuracy"] == 0.5
    assert values["precision"] == 0.5 and values["recall"] == 0.5 and values["f1"] == 0.5
    assert values["auroc"] == 0.75
    assert reasons == {}


def test_undefined_metrics_are_nan_with_reason_not_zero():
    values, reasons = compute_metrics([0, 0, 0], [0.1, 0.2, 0.3])
    assert math.isnan(values["auroc"]) and "only resistant" in reasons["auroc"]
    assert math.isnan(values["precision"]) and "only resistant" in reasons["precision"]
    assert math.isnan(values["recall"])
    assert values["accuracy"] == 1.0


def test_f1_on_a_fold_without_both_classes_is_nan_with_a_reason_never_zero():
    values, reasons = compute_metrics([0, 0, 0], [0.9, 0.8, 0.1])  # two false sensitive calls: F1 would be 0
    assert math.isnan(values["f1"]) and reasons["f1"] == "the test fold holds only resistant cells"
    values, reasons = compute_metrics([1, 1], [0.9, 0.8])
    assert math.isnan(values["f1"]) and math.isnan(values["auroc"]) and values["recall"] == 1.0


def test_means_use_only_the_folds_where_a_metric_is_defined():
    results = pd.DataFrame({"model": ["m"] * 3, "fold": ["0", "1", "2"], "status": "done",
                            "f1": [0.6, np.nan, 0.8], "auroc": [0.7, np.nan, 0.9], "accuracy": 1.0,
                            "precision": 0.5, "recall": 0.5})
    table = summarise(results, ["model"]).iloc[0]
    assert table["f1_mean"] == 0.7 and table["f1_n"] == 2 and table["n_folds"] == 3


def test_sample_metrics_score_each_samples_mean_probability():
    labels = [1, 1, 1, 0, 0, 0, 1, 1]
    probability = [0.9, 0.7, 0.2, 0.4, 0.3, 0.6, 0.6, np.nan]
    samples = ["a", "a", "a", "b", "b", "b", "c", "c"]
    table = aggregate_samples(labels, probability, samples).set_index("sample")
    assert table.loc["a", "mean_probability"] == pytest.approx(0.6)
    assert table.loc["a", "fraction_sensitive"] == pytest.approx(2 / 3)
    assert table.loc["c", "n_cells"] == 1
    values, reasons = compute_sample_metrics(labels, probability, samples)
    assert values["auroc"] == 1.0 and values["accuracy"] == 1.0
    assert values["auroc_fraction"] == 1.0
    values, reasons = compute_sample_metrics([1, 1], [0.2, 0.9], ["a", "b"])
    assert math.isnan(values["auroc"]) and reasons["auroc"] == "the test fold holds only sensitive samples"


def test_missing_predictions_are_left_out_and_counted():
    values, reasons = compute_metrics([1, 0, 1], [0.9, 0.1, np.nan])
    assert values["accuracy"] == 1.0
    assert "1 of 3" in reasons["missing"]


def test_summary_gives_mean_and_sd_over_done_folds():
    results = pd.DataFrame({"model": ["m"] * 3, "fold": ["0", "1", "2"], "status": ["done", "done", "skipped"],
                            "f1": [0.5, 0.7, np.nan], "auroc": [0.6, 0.8, np.nan], "accuracy": 0.5,
                            "precision": 0.5, "recall": 0.5})
    table = summarise(results, ["model"])
    assert table["f1_mean"].iloc[0] == 0.6
    assert np.isclose(table["f1_sd"].iloc[0], np.std([0.5, 0.7], ddof=1))
    assert table["n_folds"].iloc[0] == 2


@pytest.mark.parametrize("scores", ["continuous", "rounded", "three values"])
def test_binary_curves_equal_scikit_learn_curves_and_areas(scores):
    from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score, roc_curve

    rng = np.random.default_rng(len(scores))
    for n in (2, 5, 40, 300):
        y = np.r_[0, 1, rng.integers(0, 2, n - 2)]
        s = {"continuous": rng.random(n), "rounded": rng.random(n).round(1),
             "three values": rng.integers(0, 3, n).astype(float)}[scores]
        curves = binary_curves(y, s)
        fpr, tpr, _ = roc_curve(y, s)
        precision, recall, _ = precision_recall_curve(y, s)
        for mine, theirs in ((curves.fpr, fpr), (curves.tpr, tpr), (curves.precision, precision),
                             (curves.recall, recall)):
            np.testing.assert_array_equal(mine, theirs)
        assert curves.auroc == roc_auc_score(y, s)
        assert curves.average_precision == average_precision_score(y, s)


def test_aggregate_samples_by_key_equals_one_call_per_key():
    rng = np.random.default_rng(3)
    keys = rng.choice(["b", "a", "c"], 300)
    samples = rng.choice(["s10", "s2", "s1"], 300)
    labels, probability = rng.integers(0, 2, 300), rng.random(300)
    probability[:7] = np.nan
    together = aggregate_samples(labels, probability, samples, keys=keys)
    apart = pd.concat([aggregate_samples(labels[keys == k], probability[keys == k], samples[keys == k]).assign(key=k)
                       for k in sorted(set(keys))], ignore_index=True)
    pd.testing.assert_frame_equal(together, apart[together.columns])
