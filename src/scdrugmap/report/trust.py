"""How far a run's predictions can be trusted: reliability before and after calibration, and the coverage and
size of the conformal prediction sets, per model.

Reads what the benchmark stored: each test cell's raw and calibrated probability (``probability`` and
``calibrated`` of the predictions), and each fold's ``coverage*`` and ``mean_set_size`` (results).
Unit: cells, pooled over the reference split's test folds; N is in every legend.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from scdrugmap.report.style import model_name

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.figure import Figure

#: Equal-width probability bins of the reliability diagram.
RELIABILITY_BINS = 10
#: The benchmark's default conformal level: sets should cover at least this share of each class.
TARGET_COVERAGE = 0.9


def _reliability(probability: np.ndarray, labels: np.ndarray, n_bins: int) -> tuple[np.ndarray, np.ndarray, float]:
    edges = np.linspace(0, 1, n_bins + 1)
    bins = np.clip(np.digitize(probability, edges[1:-1]), 0, n_bins - 1)
    counts = np.bincount(bins, minlength=n_bins)
    filled = counts > 0
    predicted = np.bincount(bins, probability, n_bins)[filled] / counts[filled]
    observed = np.bincount(bins, labels, n_bins)[filled] / counts[filled]
    ece = float(np.sum(np.abs(predicted - observed) * counts[filled]) / max(counts.sum(), 1))
    return predicted, observed, ece


def plot_trust(predictions: pd.DataFrame | None, results: pd.DataFrame, colours: dict[str, str], *,
               split: str = "sample") -> Figure:
    """Left: reliability of raw (dashed) and calibrated (solid) probabilities per model, with the ECE.
    Right: mean coverage of the prediction sets overall and per class, and mean set size, per model."""
    from scdrugmap.report.figures import CHANCE_STYLE, _colour, _figure, message_figure

    done = results[(results["status"] == "done") & (results["split"] == split)]
    has_sets = "coverage" in done and done["coverage"].notna().any()
    if predictions is None or "calibrated" not in predictions or not has_sets:
        return message_figure("Trust", "This run stored no calibrated probabilities or prediction sets "
                                       "(an earlier version, or only majority/prompt jobs).")
    frame = predictions[(predictions["split"] == split) & predictions["calibrated"].notna()]
    models = [m for m in dict.fromkeys(frame["model"]) if m in set(done["model"])]
    figure = _figure(11.5, 4.6)
    left, right = figure.subplots(1, 2)
    left.plot([0, 1], [0, 1], gid="diagonal", **CHANCE_STYLE)
    for model in models:
        cells = frame[frame["model"] == model]
        labels = cells["label"].to_numpy(dtype=np.float64)
        for column, style, what in (("probability", "--", "raw"), ("calibrated", "-", "calibrated")):
            predicted, observed, ece = _reliability(cells[column].to_numpy(dtype=np.float64), labels,
                                                    RELIABILITY_BINS)
            left.plot(predicted, observed, linestyle=style, marker="o", markersize=3, color=_colour(colours, model),
                      label=f"{model_name(model)} {what}: ECE {ece:.3f}", gid=f"reliability|{model}|{what}")
    left.set_xlim(0, 1)
    left.set_ylim(0, 1)
    left.set_xlabel("Mean predicted P(sensitive) in the bin")
    left.set_ylabel("Observed share of sensitive cells")
    left.set_title(f"Reliability, test cells pooled over folds (N = {len(frame):,} cells)", loc="left")
    left.legend(fontsize=7, loc="upper left")
    measures = [("coverage", "all"), ("coverage_sensitive", "sensitive"), ("coverage_resistant", "resistant")]
    width = 0.8 / len(measures)
    x = np.arange(len(models))
    for index, (column, label) in enumerate(measures):
        means = [float(done.loc[done["model"] == m, column].mean()) if column in done else np.nan for m in models]
        right.bar(x + (index - 1) * width, means, width, label=f"coverage, {label} cells",
                  color=["#555555", "#0072B2", "#E69F00"][index], gid=f"coverage|{column}")
    right.axhline(TARGET_COVERAGE, color="#333333", linestyle=":", linewidth=1)
    sizes = [float(done.loc[done["model"] == m, "mean_set_size"].mean()) for m in models]
    for position, size in zip(x, sizes, strict=True):
        right.text(position, 0.02, f"size {size:.2f}", ha="center", va="bottom", fontsize=7, color="white")
    folds = {m: int(done.loc[done["model"] == m, "coverage"].notna().sum()) for m in models}
    right.set_xticks(x, [f"{model_name(m)}\n({folds[m]} folds)" for m in models])
    right.set_ylim(0, 1.05)
    right.set_ylabel("Share of test cells whose set holds their label")
    right.set_title("Conformal sets at 90% per class: mean over folds", loc="left")
    right.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=3)
    return figure
