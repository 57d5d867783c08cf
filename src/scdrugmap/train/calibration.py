"""Calibrate a binary head's probabilities on its inner validation split, and measure calibration.

`PlattCalibrator` maps a head's score for *sensitive* to a calibrated probability,
``sigmoid(slope * logit(p) + intercept)``, with slope and intercept fitted on the inner validation
split (cells the head did not train on) by L-BFGS-B on log loss.

Why Platt and not temperature scaling: temperature scaling is Platt with the intercept fixed at 0, so it
can only soften or sharpen the head around p = 0.5. A frozen-embedding head trained on a fold whose
share of sensitive cells differs from the validation cells' (sample-grouped splits make this common:
every cell of a patient shares its label) is also shifted, and only an intercept corrects that. Two
parameters fitted on a few hundred cells are still well determined, and three guards keep small
validation splits from over-fitting:

- Platt's smoothed targets, ``(n_pos + 1) / (n_pos + 2)`` for sensitive and ``1 / (n_neg + 2)`` for
  resistant cells (Platt 1999, as scikit-learn's ``CalibratedClassifierCV(method="sigmoid")``), so a
  perfectly separated validation split gives a finite slope;
- the slope is kept at or above `MIN_SLOPE`, so calibration never reverses or erases the head's ranking
  (AUROC is unchanged; temperature scaling's other virtue);
- a split with fewer than ``min_cells_per_class`` cells of either class (one class only included) is
  not fitted at all: the calibrator is the identity, and ``reason_`` says why. Nothing crashes.

Metrics for the benchmark: `brier_score`, `expected_calibration_error` (equal-width bins),
`reliability_curve` (the report's reliability diagram) and `calibration_metrics` (all of them before
and after calibration, for one fold).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np

from scdrugmap.data import schema
from scdrugmap.errors import SchemaError
from scdrugmap.train._trust import (
    Estimator,
    State,
    binary_labels,
    check_fitted,
    check_lengths,
    probability_vector,
    require_keys,
)

if TYPE_CHECKING:
    import numpy.typing as npt

log = logging.getLogger(__name__)

ScoreKind = Literal["probability", "logit"]
#: Probabilities are clipped to [EPSILON, 1 - EPSILON] before taking the logit (float32 heads saturate).
EPSILON = 1e-7
#: The smallest slope a fit may reach: a positive slope keeps the head's ranking of cells.
MIN_SLOPE = 0.01
#: Default fewest validation cells of each class for a fit; below it the calibrator is the identity.
MIN_CELLS_PER_CLASS = 5
#: Default number of equal-width probability bins of the ECE and the reliability curve.
N_BINS = 10
STATE_KEYS = ("slope", "intercept", "n_cells", "score_kind", "min_cells_per_class", "reason")


def _logit(probabilities: np.ndarray) -> np.ndarray:
    clipped = np.clip(probabilities, EPSILON, 1.0 - EPSILON)
    return np.log(clipped) - np.log1p(-clipped)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    out = np.empty_like(z)
    positive = z >= 0
    out[positive] = 1.0 / (1.0 + np.exp(-z[positive]))
    e = np.exp(z[~positive])
    out[~positive] = e / (1.0 + e)
    return out


def _platt_loss(params: np.ndarray, x: np.ndarray, targets: np.ndarray) -> tuple[float, np.ndarray]:
    """Mean log loss of sigmoid(a x + b) against soft targets, and its gradient in (a, b)."""
    z = params[0] * x + params[1]
    loss = np.mean(np.logaddexp(0.0, z) - targets * z)
    residual = _sigmoid(z) - targets
    return float(loss), np.array([np.mean(residual * x), np.mean(residual)])


class PlattCalibrator(Estimator):
    """Platt scaling of a binary head's P(sensitive), fitted on validation cells.

    Parameters
    ----------
    score_kind
        What `fit` and `transform` receive: ``probability`` (P(sensitive) in [0, 1]) or ``logit``
        (the head's raw score).
    min_cells_per_class
        Fewest validation cells of each class needed to fit; with fewer the calibrator is the identity
        and ``reason_`` says why.

    Attributes
    ----------
    slope_, intercept_
        The fitted map ``sigmoid(slope_ * logit + intercept_)``; 1 and 0 for the identity.
    n_cells_
        Validation cells used (those with a finite score).
    reason_
        Empty when Platt scaling was fitted; otherwise why the calibrator is the identity.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> z = rng.normal(size=500)
    >>> y = rng.random(500) < 1 / (1 + np.exp(-z))
    >>> over_confident = 1 / (1 + np.exp(-4 * z))
    >>> calibrator = PlattCalibrator().fit(over_confident, y)
    >>> round(calibrator.slope_, 1)
    0.3
    """

    def __init__(self, *, score_kind: ScoreKind = "probability",
                 min_cells_per_class: int = MIN_CELLS_PER_CLASS) -> None:
        self.score_kind = score_kind
        self.min_cells_per_class = min_cells_per_class

    def _logits(self, scores: npt.ArrayLike) -> np.ndarray:
        if self.score_kind == "probability":
            return _logit(probability_vector(scores))
        if self.score_kind == "logit":
            limit = _logit(np.array([1.0]))[0]  # the logit of 1 - EPSILON, as for probabilities
            return np.clip(np.asarray(scores, dtype=np.float64).reshape(-1), -limit, limit)
        msg = f"score_kind={self.score_kind!r}; expected 'probability' or 'logit'."
        raise SchemaError(msg)

    def _identity(self, n_cells: int, reason: str) -> PlattCalibrator:
        self.slope_, self.intercept_, self.n_cells_, self.reason_ = 1.0, 0.0, n_cells, reason
        log.warning("calibration left as the identity: %s", reason)
        return self

    def fit(self, scores: npt.ArrayLike, labels: npt.ArrayLike) -> PlattCalibrator:
        """Fit slope and intercept on validation cells (scores as ``score_kind`` says; labels 1/0).

        Cells with a NaN score are left out. Too few cells of a class, or an optimiser that fails, leave
        the identity with ``reason_`` set; nothing is raised for them.

        Raises
        ------
        SchemaError
            When labels are not binary, a probability is outside [0, 1], or the lengths differ.
        """
        from scipy.optimize import minimize

        y = binary_labels(labels)
        x = self._logits(scores)
        check_lengths(y, x, what="scores")
        finite = np.isfinite(x)
        x, y = x[finite], y[finite]
        counts = np.bincount(y, minlength=2)
        if counts.min() < self.min_cells_per_class:
            few = [f"{counts[k]} {name}" for k, name in ((1, schema.SENSITIVE), (0, schema.RESISTANT))
                   if counts[k] < self.min_cells_per_class]
            return self._identity(int(y.size), f"validation split has {' and '.join(few)} cells, fewer than "
                                               f"{self.min_cells_per_class} per class needed to fit")
        targets = np.where(y == 1, (counts[1] + 1.0) / (counts[1] + 2.0), 1.0 / (counts[0] + 2.0))
        start = np.array([1.0, 0.0])
        result = minimize(_platt_loss, start, args=(x, targets), jac=True, method="L-BFGS-B",
                          bounds=[(MIN_SLOPE, None), (None, None)])
        if not np.all(np.isfinite(result.x)) or result.fun > _platt_loss(start, x, targets)[0] + 1e-12:
            return self._identity(int(y.size), f"the Platt fit did not converge ({result.message})")
        self.slope_, self.intercept_ = float(result.x[0]), float(result.x[1])
        self.n_cells_, self.reason_ = int(y.size), ""
        log.debug("Platt calibration on %d cells: slope %.3f, intercept %.3f", y.size, self.slope_, self.intercept_)
        return self

    def transform(self, scores: npt.ArrayLike) -> npt.NDArray[np.float64]:
        """Return calibrated P(sensitive) per cell (float64); a NaN score stays NaN."""
        check_fitted(self, "slope_")
        if self.reason_ and self.score_kind == "probability":
            return probability_vector(scores)  # the identity, exactly
        z = self.slope_ * self._logits(scores) + self.intercept_
        out = np.full(z.shape, np.nan)
        finite = np.isfinite(z)
        out[finite] = _sigmoid(z[finite])
        return out

    def fit_transform(self, scores: npt.ArrayLike, labels: npt.ArrayLike) -> npt.NDArray[np.float64]:
        return self.fit(scores, labels).transform(scores)

    def state(self) -> State:
        """Return the fitted state: floats and strings only (it goes into a head bundle's JSON)."""
        check_fitted(self, "slope_")
        return {"slope": self.slope_, "intercept": self.intercept_, "n_cells": self.n_cells_,
                "score_kind": self.score_kind, "min_cells_per_class": self.min_cells_per_class,
                "reason": self.reason_}

    @classmethod
    def from_state(cls, state: State) -> PlattCalibrator:
        """Rebuild a fitted calibrator from `state`; a missing key raises `CheckpointError` naming it."""
        require_keys(state, STATE_KEYS, cls.__name__)
        calibrator = cls(score_kind=str(state["score_kind"]),  # type: ignore[arg-type]
                         min_cells_per_class=int(state["min_cells_per_class"]))
        calibrator.slope_, calibrator.intercept_ = float(state["slope"]), float(state["intercept"])
        calibrator.n_cells_, calibrator.reason_ = int(state["n_cells"]), str(state["reason"])
        return calibrator


def _finite_pairs(labels: npt.ArrayLike, probabilities: npt.ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    y = binary_labels(labels)
    p = probability_vector(probabilities)
    check_lengths(y, p)
    finite = np.isfinite(p)
    return y[finite].astype(np.float64), p[finite]


def brier_score(labels: npt.ArrayLike, probabilities: npt.ArrayLike) -> float:
    """Return the Brier score, the mean of (P(sensitive) - label)^2 over cells with a finite probability.

    NaN when no cell has one.
    """
    y, p = _finite_pairs(labels, probabilities)
    return float(np.mean((p - y) ** 2)) if y.size else float("nan")


def _bin_of(probabilities: np.ndarray, n_bins: int) -> np.ndarray:
    if n_bins < 1:
        msg = f"n_bins={n_bins}; expected at least 1."
        raise SchemaError(msg)
    return np.minimum((probabilities * n_bins).astype(np.int64), n_bins - 1)


@dataclass(frozen=True)
class ReliabilityCurve:
    """Observed against predicted probability of sensitive, in equal-width bins of the predicted one.

    Every array has one entry per bin (``bin_edges`` one more); an empty bin has NaN means and 0 cells.
    """

    bin_edges: npt.NDArray[np.float64]
    mean_predicted: npt.NDArray[np.float64]
    fraction_sensitive: npt.NDArray[np.float64]
    n_cells: npt.NDArray[np.int64]


def reliability_curve(labels: npt.ArrayLike, probabilities: npt.ArrayLike, n_bins: int = N_BINS) -> ReliabilityCurve:
    """Return the reliability diagram's points: per equal-width bin, mean prediction and observed share.

    Bin ``k`` holds probabilities in ``[k / n_bins, (k + 1) / n_bins)``; the last bin also holds 1.
    Cells with a NaN probability are left out.
    """
    y, p = _finite_pairs(labels, probabilities)
    bins = _bin_of(p, n_bins)
    n_cells = np.bincount(bins, minlength=n_bins).astype(np.int64)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_predicted = np.bincount(bins, weights=p, minlength=n_bins) / n_cells
        fraction = np.bincount(bins, weights=y, minlength=n_bins) / n_cells
    return ReliabilityCurve(np.linspace(0.0, 1.0, n_bins + 1), mean_predicted, fraction, n_cells)


def expected_calibration_error(labels: npt.ArrayLike, probabilities: npt.ArrayLike, n_bins: int = N_BINS) -> float:
    """Return the expected calibration error of P(sensitive) over equal-width bins.

    ``sum_k (n_k / n) * |fraction sensitive in bin k - mean probability in bin k|``, bins as in
    `reliability_curve` (``[0, 0.1), [0.1, 0.2), ..., [0.9, 1]`` by default). NaN when no cell has a
    finite probability.
    """
    curve = reliability_curve(labels, probabilities, n_bins)
    total = curve.n_cells.sum()
    if total == 0:
        return float("nan")
    used = curve.n_cells > 0
    gaps = np.abs(curve.fraction_sensitive[used] - curve.mean_predicted[used])
    return float(np.sum(curve.n_cells[used] * gaps) / total)


def calibration_metrics(labels: npt.ArrayLike, raw: npt.ArrayLike, calibrated: npt.ArrayLike, *,
                        n_bins: int = N_BINS) -> dict[str, float | str]:
    """Return one fold's Brier score and ECE before (``raw``) and after (``calibrated``) calibration.

    Keys: ``brier_raw``, ``brier_calibrated``, ``ece_raw``, ``ece_calibrated``, ``n_cells`` (cells with
    both probabilities finite) and ``reason`` (empty, or why the metrics are NaN).
    """
    y = binary_labels(labels)
    before, after = probability_vector(raw, name="raw"), probability_vector(calibrated, name="calibrated")
    check_lengths(y, before)
    check_lengths(y, after, what="calibrated")
    keep = np.isfinite(before) & np.isfinite(after)
    y, before, after = y[keep], before[keep], after[keep]
    reason = "" if y.size else "no cell of this fold has a finite probability"
    return {"brier_raw": brier_score(y, before), "brier_calibrated": brier_score(y, after),
            "ece_raw": expected_calibration_error(y, before, n_bins),
            "ece_calibrated": expected_calibration_error(y, after, n_bins),
            "n_cells": int(y.size), "reason": reason}
