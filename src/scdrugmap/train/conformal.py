"""Class-conditional (Mondrian) split-conformal prediction sets for the sensitive/resistant task.

`MondrianConformal` is fitted on calibration cells the head did not train on (its inner validation
split) and turns each new cell's P(sensitive) into a prediction set at level ``alpha``: ``sensitive``,
``resistant``, ``uncertain`` (both classes) or ``none`` (the empty set: the cell conforms to neither).

The p-values are those of the maintained library crepes (``crepes.ConformalClassifier``, BSD-3), used
as its own ``WrapClassifier(class_cond=True)`` uses it: Mondrian categories are the classes, the
non-conformity of a cell for class ``c`` is ``1 - p(c)`` (crepes' ``hinge``), and class ``c`` is in a
cell's set when its p-value

    p_c = (#{calibration cells of class c with score >= the cell's score for c} + 1) / (n_c + 1)

is at least ``alpha``: the finite-sample correction, which guarantees coverage ``>= 1 - alpha`` within
each class (not only over all cells, which would let the larger class hide the smaller's misses). We
use crepes' non-smoothed p-values, so a cell's set never depends on a random draw (the smoothed ones
are randomised; coverage is then a little above ``1 - alpha`` rather than at it).

The sets depend only on the order of scores within each class, so any increasing map of P(sensitive),
Platt scaling included (`scdrugmap.train.calibration`, slope kept positive), leaves them unchanged:
calibration and conformal sets may be fitted on the same validation cells.

They are computed here in numpy, with crepes' formula and a binary search over the sorted calibration
scores (tests/train/test_conformal.py checks them equal to crepes'): crepes compares every calibration
cell with every new cell in a Python loop and imports scikit-learn, which cost a prediction of 20,000
cells about 0.4 s and 1 s (profiled on a busy 2-core machine). Saved state is plain arrays, the calibration cells' scores and labels (crepes itself
keeps no other fitted state). MAPIE would serve as well, but its class-conditional sets need a fitted
scikit-learn estimator object, while a bundle stores arrays.

A class with no calibration cells, or with fewer than ``1 / alpha`` (e.g. 10 at alpha 0.1), cannot
be excluded at that level: p_c is then at least ``alpha`` for every cell, so the class is in every set
(conservative, never a crash), and ``reason_`` says so. A cell whose probability is NaN (the model could
not read it) gets both classes, ``uncertain``: the full set is the only one valid without a score.

crepes, the ``trust`` extra (``pip install "scdrugmap[trust]"``), is the reference the tests compare with.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import numpy as np

from scdrugmap.data import schema
from scdrugmap.errors import SchemaError
from scdrugmap.train._trust import (
    CLASS_NAMES,
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

#: The default miscoverage level: sets hold the true class of at least 90% of cells of each class.
ALPHA = 0.1
#: A cell's outcome from its set.
SET_SENSITIVE = schema.SENSITIVE
SET_RESISTANT = schema.RESISTANT
SET_UNCERTAIN = "uncertain"
SET_EMPTY = "none"
OUTCOMES: tuple[str, ...] = (SET_SENSITIVE, SET_RESISTANT, SET_UNCERTAIN, SET_EMPTY)
STATE_KEYS = ("scores", "labels", "alpha", "reason")


def class_probabilities(probabilities: npt.ArrayLike) -> npt.NDArray[np.float64]:
    """Return (cells x 2) probabilities, column 0 resistant and 1 sensitive, from P(sensitive)."""
    p = probability_vector(probabilities)
    return np.column_stack([1.0 - p, p])


def _check_alpha(alpha: float) -> float:
    if not 0.0 < alpha < 1.0:
        msg = f"alpha={alpha}; expected a miscoverage level strictly between 0 and 1 (e.g. 0.1)."
        raise SchemaError(msg)
    return float(alpha)


class MondrianConformal(Estimator):
    """Class-conditional split-conformal prediction sets from a binary head's P(sensitive).

    Parameters
    ----------
    alpha
        Miscoverage level: each class's cells get a set holding their class with probability at least
        ``1 - alpha``.

    Attributes
    ----------
    scores_
        Non-conformity ``1 - p(true class)`` of each calibration cell (float64).
    labels_
        The calibration cells' labels, 1 sensitive and 0 resistant (int8): the Mondrian categories.
    reason_
        Empty, or which class is in every set and why (absent, or too few calibration cells).

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> p = rng.random(400)
    >>> y = rng.random(400) < p
    >>> sets = MondrianConformal(alpha=0.2).fit(p, y).predict([0.02, 0.5, 0.98])
    >>> sets.tolist()
    ['resistant', 'uncertain', 'sensitive']
    """

    def __init__(self, *, alpha: float = ALPHA) -> None:
        self.alpha = alpha

    def fit(self, probabilities: npt.ArrayLike, labels: npt.ArrayLike) -> MondrianConformal:
        """Keep the calibration cells' non-conformity scores (cells with a NaN probability are left out).

        Raises
        ------
        SchemaError
            When labels are not binary, a probability is outside [0, 1], alpha is not in (0, 1), or the
            lengths differ.
        """
        alpha = _check_alpha(self.alpha)
        y = binary_labels(labels)
        p = class_probabilities(probabilities)
        check_lengths(y, p)
        finite = np.isfinite(p[:, 1])
        y = y[finite]
        self.scores_ = 1.0 - p[finite][np.arange(y.size), y]
        self.labels_ = y
        self.reason_ = self._reason(alpha)
        if self.reason_:
            log.warning("conformal sets: %s", self.reason_)
        return self

    def _reason(self, alpha: float) -> str:
        counts = np.bincount(self.labels_, minlength=2)
        # p_c >= 1 / (n_c + 1) for every cell, so a class is never excluded while 1 / (n_c + 1) >= alpha
        needed = int(np.floor(1.0 / alpha - 1.0)) + 1
        notes = []
        for k, name in enumerate(CLASS_NAMES):
            if counts[k] == 0:
                notes.append(f"the calibration cells have no {name} cell, so {name} is in every set")
            elif 1.0 / (counts[k] + 1) >= alpha:
                notes.append(f"{counts[k]} {name} calibration cells are fewer than the {needed} needed at "
                             f"alpha {alpha:g}, so {name} is in every set")
        return "; ".join(notes)

    def p_values(self, probabilities: npt.ArrayLike) -> npt.NDArray[np.float64]:
        """Return (cells x 2) conformal p-values, column 0 resistant, 1 sensitive; NaN for a NaN probability."""
        check_fitted(self, "scores_")
        p = class_probabilities(probabilities)
        out = np.full(p.shape, np.nan)
        finite = np.isfinite(p[:, 1])
        if not finite.any():
            return out
        for k in range(2):
            # crepes' non-smoothed Mondrian p-value, (#{calibration scores of class k >= s} + 1) / (n_k + 1),
            # counted by a binary search instead of one comparison of all calibration cells per cell
            calibration = np.sort(self.scores_[self.labels_ == k])
            at_least = calibration.size - np.searchsorted(calibration, 1.0 - p[finite, k], side="left")
            out[finite, k] = (at_least + 1) / (calibration.size + 1)
        return out

    def predict_sets(self, probabilities: npt.ArrayLike) -> npt.NDArray[np.bool_]:
        """Return (cells x 2) set membership, column 0 resistant, 1 sensitive; both True for a NaN probability."""
        alpha = _check_alpha(self.alpha)
        p_values = self.p_values(probabilities)
        return np.where(np.isnan(p_values), True, p_values >= alpha)

    def predict(self, probabilities: npt.ArrayLike) -> npt.NDArray[np.object_]:
        """Return each cell's outcome: ``sensitive``, ``resistant``, ``uncertain`` (both) or ``none`` (empty)."""
        return set_outcomes(self.predict_sets(probabilities))

    def state(self) -> State:
        """Return the fitted state: ``scores`` (float64) and ``labels`` (int8) arrays, ``alpha`` and ``reason``."""
        check_fitted(self, "scores_")
        return {"scores": self.scores_.copy(), "labels": self.labels_.copy(), "alpha": float(self.alpha),
                "reason": self.reason_}

    @classmethod
    def from_state(cls, state: State) -> MondrianConformal:
        """Rebuild a fitted object from `state`; a missing key raises `CheckpointError` naming it."""
        require_keys(state, STATE_KEYS, cls.__name__)
        conformal = cls(alpha=float(state["alpha"]))
        conformal.scores_ = np.asarray(state["scores"], dtype=np.float64).reshape(-1)
        conformal.labels_ = binary_labels(state["labels"], name=f"{cls.__name__} state 'labels'")
        check_lengths(conformal.labels_, conformal.scores_, what="scores")
        conformal.reason_ = str(state["reason"])
        return conformal


def set_outcomes(sets: npt.ArrayLike) -> npt.NDArray[np.object_]:
    """Name each (cells x 2) membership row: ``resistant``, ``sensitive``, ``uncertain`` (both) or ``none``."""
    members = _membership(sets)
    table = np.array([[SET_EMPTY, SET_SENSITIVE], [SET_RESISTANT, SET_UNCERTAIN]], dtype=object)
    return table[members[:, 0].astype(np.int64), members[:, 1].astype(np.int64)]


def _membership(sets: npt.ArrayLike) -> npt.NDArray[np.bool_]:
    values = np.asarray(sets)
    if values.ndim == 1 and values.dtype.kind in "OUS":
        text = values.astype(str)
        bad = np.unique(text[~np.isin(text, OUTCOMES)])
        if bad.size:
            msg = f"sets has {bad[:3].tolist()}; expected outcomes {list(OUTCOMES)}."
            raise SchemaError(msg)
        resistant = np.isin(text, (SET_RESISTANT, SET_UNCERTAIN))
        sensitive = np.isin(text, (SET_SENSITIVE, SET_UNCERTAIN))
        return np.column_stack([resistant, sensitive])
    if values.ndim != 2 or values.shape[1] != 2:
        msg = (f"sets has shape {values.shape}; expected (cells x 2) membership (resistant, sensitive) "
               f"or one outcome per cell from {list(OUTCOMES)}.")
        raise SchemaError(msg)
    return values.astype(bool)


def coverage(labels: npt.ArrayLike, sets: npt.ArrayLike) -> dict[str, float | int | str]:
    """Return the empirical coverage and set sizes of prediction sets, over all cells and per class.

    Parameters
    ----------
    labels
        True labels, 1 sensitive and 0 resistant (or their names).
    sets
        (cells x 2) membership, column 0 resistant and 1 sensitive, as `MondrianConformal.predict_sets`
        gives; or one outcome per cell, as `MondrianConformal.predict` gives.

    Returns
    -------
    ``coverage`` (share of cells whose set holds their label), ``coverage_resistant``,
    ``coverage_sensitive``, ``mean_set_size`` (0 to 2) and ``mean_set_size_resistant`` and
    ``_sensitive``, ``share_uncertain`` and ``share_empty`` (cells with both classes and with none),
    ``n_cells``, ``n_resistant``, ``n_sensitive``, and ``reason``: empty, or why a value is NaN
    (no cells, or no cell of a class).
    """
    y = binary_labels(labels)
    members = _membership(sets)
    check_lengths(y, members, what="sets")
    covered = members[np.arange(y.size), y]
    size = members.sum(axis=1)
    result: dict[str, float | int | str] = {}
    reasons = []

    def mean(values: np.ndarray) -> float:
        return float(values.mean()) if values.size else float("nan")

    result["coverage"], result["mean_set_size"] = mean(covered), mean(size)
    result["share_uncertain"], result["share_empty"] = mean(size == 2), mean(size == 0)
    if not y.size:
        reasons.append("no cells")
    for k, name in enumerate(CLASS_NAMES):
        mine = y == k
        result[f"coverage_{name}"], result[f"mean_set_size_{name}"] = mean(covered[mine]), mean(size[mine])
        result[f"n_{name}"] = int(mine.sum())
        if y.size and not mine.any():
            reasons.append(f"no {name} cells: coverage_{name} and mean_set_size_{name} are NaN")
    result["n_cells"] = int(y.size)
    result["reason"] = "; ".join(reasons)
    return result
