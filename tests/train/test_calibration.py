import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from scdrugmap.errors import CheckpointError, SchemaError
from scdrugmap.train._trust import join_state, split_state
from scdrugmap.train.calibration import (
    PlattCalibrator,
    brier_score,
    calibration_metrics,
    expected_calibration_error,
    reliability_curve,
)


def _sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def _over_confident_head(n, seed):
    """True P(sensitive) = sigmoid(z) at a 30/70 prior; the head says sigmoid(3 z + 1): too sure, and shifted."""
    rng = np.random.default_rng(seed)
    z = rng.normal(-0.9, 1.5, n)
    labels = (rng.random(n) < _sigmoid(z)).astype(np.int8)
    return _sigmoid(3.0 * z + 1.0), labels


def test_calibration_lowers_the_ece_of_an_over_confident_head_on_held_out_cells():
    validation, validation_labels = _over_confident_head(400, seed=0)
    held_out, held_out_labels = _over_confident_head(4000, seed=1)
    calibrator = PlattCalibrator().fit(validation, validation_labels)
    calibrated = calibrator.transform(held_out)
    metrics = calibration_metrics(held_out_labels, held_out, calibrated)
    assert calibrator.reason_ == ""
    assert 0.2 < calibrator.slope_ < 0.5 and calibrator.intercept_ < 0  # undoes the factor 3 and the shift
    assert metrics["ece_raw"] > 0.1
    assert metrics["ece_calibrated"] < 0.04 < metrics["ece_raw"] / 3
    assert metrics["brier_calibrated"] < metrics["brier_raw"]
    assert metrics["n_cells"] == 4000 and metrics["reason"] == ""


def test_calibration_keeps_the_ranking_of_cells():
    probabilities, labels = _over_confident_head(500, seed=2)
    calibrated = PlattCalibrator().fit_transform(probabilities, labels)
    assert roc_auc_score(labels, calibrated) == pytest.approx(roc_auc_score(labels, probabilities))


def test_a_head_that_ranks_backwards_gets_a_flat_slope_never_a_negative_one():
    probabilities, labels = _over_confident_head(500, seed=3)
    calibrator = PlattCalibrator().fit(1.0 - probabilities, labels)
    assert calibrator.slope_ == pytest.approx(0.01)


def test_logits_and_probabilities_give_the_same_calibration():
    probabilities, labels = _over_confident_head(300, seed=4)
    logits = np.log(probabilities) - np.log1p(-probabilities)
    from_p = PlattCalibrator().fit(probabilities, labels)
    from_logits = PlattCalibrator(score_kind="logit").fit(logits, labels)
    assert from_logits.slope_ == pytest.approx(from_p.slope_, rel=1e-4)
    assert np.allclose(from_logits.transform(logits), from_p.transform(probabilities), atol=1e-6)


@pytest.mark.parametrize(("labels", "expected"), [
    (np.ones(50, dtype=int), "0 resistant"),
    (np.r_[np.ones(47), np.zeros(3)], "3 resistant"),
    (np.r_[np.ones(2), np.zeros(2)], "2 sensitive and 2 resistant"),
    (np.zeros(0, dtype=int), "0 sensitive and 0 resistant"),
])
def test_too_few_cells_of_a_class_leave_the_identity_with_a_reason(labels, expected):
    rng = np.random.default_rng(5)
    probabilities = rng.random(labels.size)
    calibrator = PlattCalibrator().fit(probabilities, labels)
    assert expected in calibrator.reason_
    assert (calibrator.slope_, calibrator.intercept_) == (1.0, 0.0)
    assert np.array_equal(calibrator.transform(probabilities), probabilities)


def test_nan_scores_are_left_out_of_the_fit_and_stay_nan():
    probabilities, labels = _over_confident_head(300, seed=6)
    with_nan = probabilities.copy()
    with_nan[:10] = np.nan
    calibrator = PlattCalibrator().fit(with_nan, labels)
    clean = PlattCalibrator().fit(probabilities[10:], labels[10:])
    assert calibrator.n_cells_ == 290
    assert calibrator.slope_ == clean.slope_
    out = calibrator.transform(with_nan)
    assert np.isnan(out[:10]).all() and np.isfinite(out[10:]).all()


def test_saturated_probabilities_are_calibrated_without_overflow():
    labels = np.tile([0, 1], 20)
    probabilities = labels.astype(np.float64)  # a perfectly separating, saturated head
    calibrator = PlattCalibrator().fit(probabilities, labels)
    out = calibrator.transform(np.array([0.0, 1.0]))
    assert np.isfinite(calibrator.slope_) and 0.0 < out[0] < 0.1 and 0.9 < out[1] < 1.0


def test_bad_input_is_refused_with_the_values_found():
    with pytest.raises(SchemaError, match=r"\[1.5\]"):
        PlattCalibrator().fit([0.2, 1.5], [0, 1])
    with pytest.raises(SchemaError, match="expected 1 .sensitive. or 0"):
        PlattCalibrator().fit([0.2, 0.5], [0, 2])
    with pytest.raises(SchemaError, match="labels has 3 cells but scores has 2"):
        PlattCalibrator().fit([0.2, 0.5], [0, 1, 1])


def test_state_round_trip_gives_identical_outputs():
    probabilities, labels = _over_confident_head(300, seed=7)
    calibrator = PlattCalibrator().fit(probabilities, labels)
    arrays, facts = split_state(calibrator.state(), "calibration")
    assert arrays == {} and all(isinstance(v, (int, float, str)) for v in facts.values())
    again = PlattCalibrator.from_state(join_state(arrays, facts, "calibration"))
    assert np.array_equal(again.transform(probabilities), calibrator.transform(probabilities))
    identity = PlattCalibrator().fit(probabilities[:3], labels[:3])
    assert PlattCalibrator.from_state(identity.state()).reason_ == identity.reason_


def test_a_state_missing_a_key_is_refused_naming_it():
    state = PlattCalibrator().fit([0.1, 0.9], [0, 1]).state()
    del state["slope"]
    with pytest.raises(CheckpointError, match="lacks \\['slope'\\]"):
        PlattCalibrator.from_state(state)


def test_brier_and_ece_on_a_hand_computed_example():
    labels = np.array([1, 0, 1, 1])
    probabilities = np.array([0.9, 0.15, 0.55, 0.95])
    assert brier_score(labels, probabilities) == pytest.approx((0.01 + 0.0225 + 0.2025 + 0.0025) / 4)
    # bins [0.1, 0.2): {0.15 -> 0}, [0.5, 0.6): {0.55 -> 1}, [0.9, 1]: {0.9, 0.95 -> 1, 1}
    expected = (1 * 0.15 + 1 * 0.45 + 2 * abs(1 - 0.925)) / 4
    assert expected_calibration_error(labels, probabilities) == pytest.approx(expected)


def test_reliability_curve_uses_equal_width_bins_with_one_closed_last_bin():
    labels = np.array([0, 1, 1, 0, 1])
    probabilities = np.array([0.0, 0.25, 0.3, 0.5, 1.0])
    curve = reliability_curve(labels, probabilities, n_bins=4)
    assert np.allclose(curve.bin_edges, [0, 0.25, 0.5, 0.75, 1])
    assert curve.n_cells.tolist() == [1, 2, 1, 1]
    assert np.allclose(curve.mean_predicted, [0.0, 0.275, 0.5, 1.0])
    assert np.allclose(curve.fraction_sensitive, [0, 1, 0, 1])
    empty = reliability_curve(labels, probabilities, n_bins=10)
    assert np.isnan(empty.mean_predicted[1]) and empty.n_cells[1] == 0


def test_metrics_without_finite_probabilities_are_nan_with_a_reason():
    metrics = calibration_metrics([0, 1], [np.nan, np.nan], [np.nan, 0.5])
    assert np.isnan(metrics["brier_raw"]) and np.isnan(metrics["ece_calibrated"])
    assert metrics["reason"] and metrics["n_cells"] == 0
    assert np.isnan(brier_score([], []))
