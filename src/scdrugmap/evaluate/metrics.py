"""Per-fold classification metrics with sensitive as the positive class.

A metric that is undefined for a fold (AUROC with one class in the test fold,
precision with no predicted positive) is NaN with a reason, never 0.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    import numpy.typing as npt

METRICS = ("f1", "auroc", "accuracy", "precision", "recall")


def compute_metrics(y_true: npt.ArrayLike, probability: npt.ArrayLike,
                    threshold: float = 0.5) -> tuple[dict[str, float], dict[str, str]]:
    """Return (metrics, reasons) for one fold; ``reasons`` explains each NaN.

    Cells whose probability is NaN (e.g. an unanswered prompt) are left out and counted.
    """
    from sklearn.metrics import roc_auc_score

    y = np.asarray(y_true).astype(np.int64)
    p = np.asarray(probability, dtype=np.float64)
    keep = ~np.isnan(p)
    reasons: dict[str, str] = {}
    if not keep.all():
        reasons["missing"] = f"{int((~keep).sum())} of {p.size} cells have no prediction and are left out"
    y, p = y[keep], p[keep]
    values = dict.fromkeys(METRICS, float("nan"))
    if y.size == 0:
        for name in METRICS:
            reasons[name] = "no cell with a prediction"
        return values, reasons
    predicted = p >= threshold
    positive = y == 1
    tp = int((predicted & positive).sum())
    fp = int((predicted & ~positive).sum())
    fn = int((~predicted & positive).sum())
    values["accuracy"] = float((predicted == positive).mean())
    if tp + fp:
        values["precision"] = tp / (tp + fp)
    else:
        reasons["precision"] = "no cell was predicted sensitive"
    if positive.any():
        values["recall"] = tp / (tp + fn)
    else:
        reasons["recall"] = "the test fold has no sensitive cell"
    if 2 * tp + fp + fn:
        values["f1"] = 2 * tp / (2 * tp + fp + fn)
    else:
        reasons["f1"] = "no sensitive cell in the fold and none predicted"
    if np.unique(y).size == 2:
        values["auroc"] = float(roc_auc_score(y, p))
    else:
        reasons["auroc"] = f"the test fold holds only {'sensitive' if positive.all() else 'resistant'} cells"
    return values, reasons


def summarise(results: pd.DataFrame, by: list[str]) -> pd.DataFrame:
    """Return mean and sd of every metric over folds, per group ``by`` (NaN folds left out, counted)."""
    done = results[results["status"] == "done"]
    aggregations = {}
    for name in METRICS:
        aggregations[f"{name}_mean"] = (name, "mean")
        aggregations[f"{name}_sd"] = (name, "std")
    aggregations["n_folds"] = ("fold", "size")
    return done.groupby(by, observed=True).agg(**aggregations).reset_index()
