"""Per-fold classification metrics with sensitive as the positive class, per cell and per sample.

A metric that is undefined for a fold is NaN with a reason, never 0: AUROC, F1 and precision need
both classes in the test fold (on a fold of resistant cells only, any sensitive call gives F1 0,
which says nothing about the model), recall needs a sensitive cell, precision a sensitive call.
Means over folds use only the folds where the metric is defined, and say how many those are.

`compute_sample_metrics` scores the same predictions per sample (patient): each sample's test cells
are aggregated to their mean probability (and the fraction called sensitive), the unit at which
response labels are usually given.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    import numpy.typing as npt

METRICS = ("f1", "auroc", "accuracy", "precision", "recall")
LEVELS = ("cell", "sample")
#: Call a cell (or a sample's mean probability) sensitive from this probability on.
THRESHOLD = 0.5


def compute_metrics(y_true: npt.ArrayLike, probability: npt.ArrayLike, threshold: float = THRESHOLD,
                    *, unit: str = "cell") -> tuple[dict[str, float], dict[str, str]]:
    """Return (metrics, reasons) for one fold; ``reasons`` explains each NaN.

    Items whose probability is NaN (e.g. an unanswered prompt) are left out and counted. ``unit``
    names the items in the reasons (``cell`` or ``sample``).
    """
    from sklearn.metrics import roc_auc_score

    y = np.asarray(y_true).astype(np.int64)
    p = np.asarray(probability, dtype=np.float64)
    keep = ~np.isnan(p)
    reasons: dict[str, str] = {}
    if not keep.all():
        reasons["missing"] = f"{int((~keep).sum())} of {p.size} {unit}s have no prediction and are left out"
    y, p = y[keep], p[keep]
    values = dict.fromkeys(METRICS, float("nan"))
    if y.size == 0:
        for name in METRICS:
            reasons[name] = f"no {unit} with a prediction"
        return values, reasons
    predicted = p >= threshold
    positive = y == 1
    tp = int((predicted & positive).sum())
    fp = int((predicted & ~positive).sum())
    fn = int((~predicted & positive).sum())
    values["accuracy"] = float((predicted == positive).mean())
    one_class = None if np.unique(y).size == 2 else (
        f"the test fold holds only {'sensitive' if positive.all() else 'resistant'} {unit}s")
    if positive.any():
        values["recall"] = tp / (tp + fn)
    else:
        reasons["recall"] = f"the test fold has no sensitive {unit}"
    if one_class is not None:
        for name in ("auroc", "f1", "precision"):
            reasons[name] = one_class
        return values, reasons
    if tp + fp:
        values["precision"] = tp / (tp + fp)
    else:
        reasons["precision"] = f"no {unit} was predicted sensitive"
    values["f1"] = 2 * tp / (2 * tp + fp + fn)  # both classes present: 2tp + fn > 0
    values["auroc"] = float(roc_auc_score(y, p))
    return values, reasons


def aggregate_samples(labels: npt.ArrayLike, probability: npt.ArrayLike, samples: npt.ArrayLike,
                      threshold: float = THRESHOLD) -> pd.DataFrame:
    """Return one row per sample of its cells' predictions.

    Columns: ``sample``, ``label`` (the label of most of its cells, 1 = sensitive), ``mixed`` (its
    cells hold both labels), ``n_cells`` (cells with a prediction), ``mean_probability`` and
    ``fraction_sensitive`` (share of its cells called sensitive at ``threshold``). Cells without a
    prediction are left out; a sample with none has NaN aggregates.
    """
    frame = pd.DataFrame({"sample": np.asarray(samples).astype(str), "label": np.asarray(labels, dtype=np.float64),
                          "probability": np.asarray(probability, dtype=np.float64)})
    frame["called"] = np.where(frame["probability"].isna(), np.nan, frame["probability"] >= threshold)
    grouped = frame.groupby("sample", sort=True)
    table = pd.DataFrame({
        "label": (grouped["label"].mean() >= 0.5).astype(np.int64),
        "mixed": grouped["label"].nunique() > 1,
        "n_cells": grouped["probability"].count(),
        "mean_probability": grouped["probability"].mean(),
        "fraction_sensitive": grouped["called"].mean(),
    })
    return table.reset_index()


def compute_sample_metrics(labels: npt.ArrayLike, probability: npt.ArrayLike, samples: npt.ArrayLike,
                           threshold: float = THRESHOLD) -> tuple[dict[str, float], dict[str, str]]:
    """Return (metrics, reasons) of one fold's test samples: each sample's mean probability is its score.

    The metrics are those of `compute_metrics` over samples, plus ``auroc_fraction``: the AUROC of
    the fraction of a sample's cells called sensitive. A sample whose cells mix labels takes the
    label of most of them (said in ``reasons["mixed"]``).
    """
    table = aggregate_samples(labels, probability, samples, threshold)
    values, reasons = compute_metrics(table["label"], table["mean_probability"], threshold, unit="sample")
    values["auroc_fraction"] = float("nan")
    if np.isfinite(values["auroc"]):
        from sklearn.metrics import roc_auc_score

        known = table["fraction_sensitive"].notna()
        values["auroc_fraction"] = float(roc_auc_score(table.loc[known, "label"],
                                                       table.loc[known, "fraction_sensitive"]))
    else:
        reasons["auroc_fraction"] = reasons.get("auroc", "")
    if table["mixed"].any():
        reasons["mixed"] = (f"{int(table['mixed'].sum())} of {len(table)} samples mix both labels; each takes "
                            "the label of most of its cells")
    return values, reasons


def summarise(results: pd.DataFrame, by: list[str]) -> pd.DataFrame:
    """Return mean and sd of every metric over the folds where it is defined, per group ``by``.

    ``n_folds`` counts the scored (``done``) folds; ``<metric>_n`` the folds where that metric is
    defined (the others are NaN with a reason and are left out of its mean and sd).
    """
    done = results[results["status"] == "done"]
    aggregations = {}
    for name in METRICS:
        aggregations[f"{name}_mean"] = (name, "mean")
        aggregations[f"{name}_sd"] = (name, "std")
        aggregations[f"{name}_n"] = (name, "count")
    aggregations["n_folds"] = ("fold", "size")
    return done.groupby(by, observed=True).agg(**aggregations).reset_index()
