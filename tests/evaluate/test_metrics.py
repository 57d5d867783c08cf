import math

import numpy as np
import pandas as pd

from scdrugmap.evaluate.metrics import compute_metrics, summarise


def test_metrics_match_hand_counts():
    values, reasons = compute_metrics([1, 1, 0, 0], [0.9, 0.2, 0.6, 0.1])
    assert values["accuracy"] == 0.5
    assert values["precision"] == 0.5 and values["recall"] == 0.5 and values["f1"] == 0.5
    assert values["auroc"] == 0.75
    assert reasons == {}


def test_undefined_metrics_are_nan_with_reason_not_zero():
    values, reasons = compute_metrics([0, 0, 0], [0.1, 0.2, 0.3])
    assert math.isnan(values["auroc"]) and "only resistant" in reasons["auroc"]
    assert math.isnan(values["precision"]) and "predicted sensitive" in reasons["precision"]
    assert math.isnan(values["recall"])
    assert values["accuracy"] == 1.0


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
