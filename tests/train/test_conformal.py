import subprocess
import sys

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression

from scdrugmap.errors import CheckpointError, SchemaError
from scdrugmap.train._trust import join_state, split_state
from scdrugmap.train.conformal import MondrianConformal, coverage, set_outcomes


def _logistic_head(n_train=1000, n_pool=2000, seed=0):
    """Cells with 6 features and a 30/70 sensitive/resistant logistic truth; the head sees only 4 features."""
    rng = np.random.default_rng(seed)
    weights = np.array([1.5, -1.0, 0.8, 0.5, 0.7, -0.6])

    def cells(n):
        X = rng.normal(size=(n, weights.size))
        return X, (rng.random(n) < 1 / (1 + np.exp(-(X @ weights - 1.2)))).astype(np.int8)

    X_train, y_train = cells(n_train)
    head = LogisticRegression().fit(X_train[:, :4], y_train)
    X_pool, y_pool = cells(n_pool)
    return head.predict_proba(X_pool[:, :4])[:, 1], y_pool


@pytest.mark.parametrize("alpha", [0.1, 0.2])
def test_coverage_holds_overall_and_within_each_class_over_random_splits(alpha):
    probabilities, labels = _logistic_head(n_pool=1500)
    assert 0.25 < labels.mean() < 0.35  # imbalanced: per-class validity is what Mondrian sets add
    rng = np.random.default_rng(1)
    results = []
    for _ in range(50):
        order = rng.permutation(labels.size)
        calibration, test = order[:500], order[500:]
        conformal = MondrianConformal(alpha=alpha).fit(probabilities[calibration], labels[calibration])
        results.append(coverage(labels[test], conformal.predict_sets(probabilities[test])))
    for key in ("coverage", "coverage_resistant", "coverage_sensitive"):
        assert np.mean([r[key] for r in results]) >= 1 - alpha - 0.02, key
    assert 0.9 < np.mean([r["mean_set_size"] for r in results]) < 1.9  # informative: not every set is full


def test_sets_follow_the_finite_sample_quantile_of_each_class():
    probabilities, labels = _logistic_head(n_pool=300, seed=2)
    alpha = 0.1
    conformal = MondrianConformal(alpha=alpha).fit(probabilities, labels)
    new = np.linspace(0.0, 1.0, 101)
    sets = conformal.predict_sets(new)
    for k, p_class in enumerate([1.0 - new, new]):
        scores = np.sort(1.0 - np.where(labels == 1, probabilities, 1.0 - probabilities)[labels == k])
        rank = int(np.ceil((1 - alpha) * (scores.size + 1)))  # split conformal's corrected quantile
        quantile = scores[rank - 1] if rank <= scores.size else np.inf
        assert np.array_equal(sets[:, k], 1.0 - p_class <= quantile)


def test_sets_are_the_same_from_raw_or_platt_calibrated_probabilities():
    from scdrugmap.train.calibration import PlattCalibrator

    probabilities, labels = _logistic_head(n_pool=1500, seed=3)
    validation, test = slice(0, 500), slice(500, None)
    calibrator = PlattCalibrator().fit(probabilities[validation], labels[validation])
    raw = MondrianConformal().fit(probabilities[validation], labels[validation]).predict(probabilities[test])
    calibrated = MondrianConformal().fit(calibrator.transform(probabilities[validation]), labels[validation])
    assert np.array_equal(calibrated.predict(calibrator.transform(probabilities[test])), raw)


def test_outcomes_name_each_set():
    sets = np.array([[True, False], [False, True], [True, True], [False, False]])
    assert set_outcomes(sets).tolist() == ["resistant", "sensitive", "uncertain", "none"]
    conformal = MondrianConformal(alpha=0.2).fit(*_logistic_head(n_pool=500, seed=3))
    assert set(conformal.predict([0.0, 0.5, 1.0])) <= {"resistant", "sensitive", "uncertain", "none"}
    assert conformal.predict([0.001])[0] == "resistant" and conformal.predict([0.999])[0] == "sensitive"


def test_a_class_absent_from_calibration_is_in_every_set_with_a_reason():
    probabilities, labels = _logistic_head(n_pool=400, seed=4)
    resistant_only = labels == 0
    conformal = MondrianConformal().fit(probabilities[resistant_only], labels[resistant_only])
    assert "no sensitive cell" in conformal.reason_
    sets = conformal.predict_sets(np.linspace(0, 1, 50))
    assert sets[:, 1].all() and not sets[:, 0].all()


def test_a_class_with_fewer_than_one_over_alpha_cells_is_in_every_set():
    probabilities, labels = _logistic_head(n_pool=400, seed=5)
    keep = np.r_[np.flatnonzero(labels == 0), np.flatnonzero(labels == 1)[:9]]
    conformal = MondrianConformal(alpha=0.1).fit(probabilities[keep], labels[keep])
    assert "9 sensitive calibration cells are fewer than the 10 needed" in conformal.reason_
    assert conformal.predict_sets(np.linspace(0, 1, 50))[:, 1].all()
    ten = np.r_[np.flatnonzero(labels == 0), np.flatnonzero(labels == 1)[:10]]
    assert MondrianConformal(alpha=0.1).fit(probabilities[ten], labels[ten]).reason_ == ""


def test_a_cell_without_a_probability_gets_both_classes():
    conformal = MondrianConformal().fit(*_logistic_head(n_pool=300, seed=6))
    assert np.isnan(conformal.p_values([np.nan, 0.5])[0]).all()
    assert conformal.predict([np.nan])[0] == "uncertain"


def test_nan_probabilities_are_left_out_of_the_calibration_cells():
    probabilities, labels = _logistic_head(n_pool=300, seed=7)
    probabilities[:5] = np.nan
    conformal = MondrianConformal().fit(probabilities, labels)
    assert conformal.scores_.size == 295 and np.isfinite(conformal.scores_).all()


def test_coverage_on_a_hand_example():
    labels = np.array([1, 1, 0, 0, 0])
    sets = np.array(["sensitive", "none", "uncertain", "sensitive", "resistant"], dtype=object)
    result = coverage(labels, sets)
    assert result["coverage"] == pytest.approx(3 / 5)
    assert result["coverage_sensitive"] == pytest.approx(1 / 2)
    assert result["coverage_resistant"] == pytest.approx(2 / 3)
    assert result["mean_set_size"] == pytest.approx(5 / 5)
    assert result["mean_set_size_resistant"] == pytest.approx(4 / 3)
    assert result["share_uncertain"] == pytest.approx(1 / 5) and result["share_empty"] == pytest.approx(1 / 5)
    assert (result["n_cells"], result["n_sensitive"], result["n_resistant"], result["reason"]) == (5, 2, 3, "")


def test_coverage_of_an_absent_class_is_nan_with_a_reason():
    result = coverage([0, 0], np.array([[True, False], [False, True]]))
    assert np.isnan(result["coverage_sensitive"]) and result["coverage_resistant"] == 0.5
    assert "no sensitive cells" in result["reason"]


def test_bad_input_is_refused():
    with pytest.raises(SchemaError, match="alpha=1.5"):
        MondrianConformal(alpha=1.5).fit([0.5], [1])
    with pytest.raises(SchemaError, match="'maybe'"):
        coverage([1], np.array(["maybe"], dtype=object))
    with pytest.raises(SchemaError, match=r"shape \(2, 3\)"):
        coverage([1, 0], np.ones((2, 3), dtype=bool))


def test_state_round_trip_gives_identical_outputs():
    probabilities, labels = _logistic_head(n_pool=300, seed=8)
    conformal = MondrianConformal(alpha=0.2).fit(probabilities, labels)
    arrays, facts = split_state(conformal.state(), "conformal")
    assert set(arrays) == {"conformal.scores", "conformal.labels"}
    again = MondrianConformal.from_state(join_state(arrays, facts, "conformal"))
    new = np.linspace(0, 1, 201)
    assert np.array_equal(again.p_values(new), conformal.p_values(new))
    assert np.array_equal(again.predict(new), conformal.predict(new))
    state = conformal.state()
    del state["labels"]
    with pytest.raises(CheckpointError, match="lacks \\['labels'\\]"):
        MondrianConformal.from_state(state)


@pytest.mark.parametrize("n_calibration", [0, 3, 400])
def test_p_values_equal_crepes_non_smoothed_mondrian_p_values(n_calibration):
    crepes = pytest.importorskip("crepes")
    rng = np.random.default_rng(n_calibration)
    # ties between calibration and new cells (rounded probabilities), a class possibly absent, NaN cells
    calibration = rng.random(n_calibration).round(2)
    labels = (rng.random(n_calibration) < 0.3).astype(np.int8)
    new = np.concatenate([rng.random(500).round(2), [0.0, 1.0, np.nan]])
    conformal = MondrianConformal(alpha=0.2).fit(calibration, labels)
    classifier = crepes.ConformalClassifier().fit(conformal.scores_, bins=conformal.labels_)
    expected = np.full((new.size, 2), np.nan)
    finite = np.isfinite(new)
    for k, p in enumerate((1.0 - new[finite], new[finite])):
        expected[finite, k] = classifier.predict_p(1.0 - p, bins=np.full(p.size, k), smoothing=False)
    np.testing.assert_array_equal(conformal.p_values(new), expected)


def test_predicting_sets_imports_neither_crepes_nor_scikit_learn():
    code = ("import sys; from scdrugmap.train.conformal import MondrianConformal; "
            "MondrianConformal().fit([0.2, 0.8], [0, 1]).predict([0.5]); "
            "print(sorted(m for m in ('crepes', 'sklearn') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
