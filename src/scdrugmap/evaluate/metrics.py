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

from typing import TYPE_CHECKING, NamedTuple

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
    values["auroc"] = binary_curves(y, p).auroc  # scikit-learn's roc_auc_score, without its import
    return values, reasons


class BinaryCurves(NamedTuple):
    """A fold's ROC and precision-recall curves and their areas (`binary_curves`)."""

    fpr: npt.NDArray[np.float64]
    tpr: npt.NDArray[np.float64]
    precision: npt.NDArray[np.float64]
    recall: npt.NDArray[np.float64]
    auroc: float
    average_precision: float


def binary_curves(labels: npt.ArrayLike, scores: npt.ArrayLike) -> BinaryCurves:
    """Return the ROC and precision-recall curves of binary labels (1 = positive) and their areas, in numpy.

    The same arrays and numbers as scikit-learn's ``roc_curve`` (``drop_intermediate=True``),
    ``precision_recall_curve``, ``roc_auc_score`` and ``average_precision_score`` (same sorting,
    thresholds and sums; tested), without their input validation, which costs more than the curves
    for a fold of a few hundred cells. Both classes must be present and every score finite.
    """
    y_true = np.asarray(labels) == 1
    y_score = np.asarray(scores)
    order = np.argsort(y_score, kind="stable")[::-1]  # descending (the order within ties changes no count)
    y_score, y_sorted = y_score[order], y_true[order].astype(np.float64)
    threshold_idxs = np.concatenate([np.flatnonzero(np.diff(y_score)), [y_sorted.size - 1]])
    tps = np.cumsum(y_sorted, dtype=np.float64)[threshold_idxs]
    fps = 1 + threshold_idxs.astype(np.float64) - tps
    # ROC: keep the corners only (points where neither count changes its slope are dropped), start at (0, 0)
    roc_fps, roc_tps = fps, tps
    if fps.size > 2:
        corners = np.flatnonzero(np.concatenate([[True], np.logical_or(np.diff(fps, 2), np.diff(tps, 2)), [True]]))
        roc_fps, roc_tps = fps[corners], tps[corners]
    roc_fps, roc_tps = np.concatenate([[0.0], roc_fps]), np.concatenate([[0.0], roc_tps])
    fpr, tpr = roc_fps / roc_fps[-1], roc_tps / roc_tps[-1]
    # precision-recall, recall decreasing, ending at (recall 0, precision 1)
    predicted = tps + fps
    precision = np.where(predicted != 0, np.divide(tps, predicted, out=np.zeros_like(tps), where=predicted != 0), 0.0)
    precision = np.concatenate([precision[::-1], [1.0]])
    recall = np.concatenate([(tps / tps[-1])[::-1], [0.0]])
    auroc = float(np.trapezoid(tpr, fpr))
    average_precision = float(max(0.0, -np.sum(np.diff(recall) * precision[:-1])))
    return BinaryCurves(fpr, tpr, precision, recall, auroc, average_precision)


def aggregate_samples(labels: npt.ArrayLike, probability: npt.ArrayLike, samples: npt.ArrayLike,
                      threshold: float = THRESHOLD, *, keys: npt.ArrayLike | None = None) -> pd.DataFrame:
    """Return one row per sample of its cells' predictions.

    Columns: ``sample``, ``label`` (the label of most of its cells, 1 = sensitive), ``mixed`` (its
    cells hold both labels), ``n_cells`` (cells with a prediction), ``mean_probability`` and
    ``fraction_sensitive`` (share of its cells called sensitive at ``threshold``). Cells without a
    prediction are left out; a sample with none has NaN aggregates. Rows are sorted by sample (as text).

    ``keys`` (one per cell, e.g. the job) aggregates every key's samples apart in one pass: a ``key``
    column comes first and rows are sorted by key, then sample, as one call per key would give them.
    """
    # grouped by integer codes numbered in text order (a fixed-width text array of every cell's job key
    # would take 280 bytes per cell: 1.5 GB for a full-size run's predictions)
    sample_codes, sample_names = _text_codes(samples)
    frame = pd.DataFrame({"sample": sample_codes, "label": np.asarray(labels, dtype=np.float64),
                          "probability": np.asarray(probability, dtype=np.float64)})
    frame["called"] = np.where(frame["probability"].isna(), np.nan, frame["probability"] >= threshold)
    by = ["sample"]
    names = {"sample": sample_names}
    if keys is not None:
        key_codes, names["key"] = _text_codes(keys)
        frame.insert(0, "key", key_codes)
        by = ["key", "sample"]
    grouped = frame.groupby(by, sort=True)
    labels_of = grouped["label"]
    lowest, highest = labels_of.min(), labels_of.max()
    table = pd.DataFrame({
        "label": (labels_of.mean() >= 0.5).astype(np.int64),
        "mixed": (lowest != highest) & lowest.notna(),  # two distinct labels (NaN left out, as by nunique)
        "n_cells": grouped["probability"].count(),
        "mean_probability": grouped["probability"].mean(),
        "fraction_sensitive": grouped["called"].mean(),
    }).reset_index()
    for column, values in names.items():
        table[column] = values[table[column].to_numpy()]
    return table


def _text_codes(values: npt.ArrayLike) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.object_]]:
    """Return each value's code, numbered in the sorted order of the values as text, and those texts."""
    codes, uniques = pd.factorize(pd.Series(np.asarray(values, dtype=object)).astype(str), sort=True)
    return codes, np.asarray(uniques, dtype=object)


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
        known = table["fraction_sensitive"].notna()
        values["auroc_fraction"] = binary_curves(table.loc[known, "label"].to_numpy(),
                                                 table.loc[known, "fraction_sensitive"].to_numpy()).auroc
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
