"""Plotly figures for the pages, returned as plain dicts (``{"data", "layout"}``) that the page draws.

The page embeds each dict in a ``<script type="application/json">`` block and ``static/app.js``
hands it to the plotly.js the server ships, so no page runs inline script and nothing comes
from a CDN. Colours are the report's (`scdrugmap.report.style`): a model, and a response, looks
the same in the HTML report and on every page.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from scdrugmap.report.serialise import make_json_safe
from scdrugmap.report.style import EDGE_COLOUR, NEUTRAL_COLOUR, PROBABILITY_COLOURSCALE, model_colours

METRIC_LABELS = {"f1": "F1", "auroc": "AUROC", "accuracy": "accuracy", "precision": "precision", "recall": "recall"}
_LAYOUT: dict[str, Any] = {"template": "plotly_white", "margin": {"l": 60, "r": 20, "t": 50, "b": 60}, "height": 420,
           "font": {"family": "system-ui, sans-serif", "size": 13}}


def _as_dict(figure: Any) -> dict[str, Any]:
    """Return a figure as JSON-safe data (NaN becomes null, numpy values plain Python)."""
    return make_json_safe(figure.to_plotly_json())


def metric_bar(by_model: pd.DataFrame, metric: str, subtitle: str) -> dict[str, Any]:
    """Return a bar per model: the mean of ``metric`` over scored folds, with its sd as error bar."""
    import plotly.graph_objects as go

    label = METRIC_LABELS.get(metric, metric)
    frame = by_model.dropna(subset=[f"{metric}_mean"]) if f"{metric}_mean" in by_model else by_model.iloc[0:0]
    models = frame["model"].astype(str).tolist() if len(frame) else []
    colours = model_colours(models)
    figure = go.Figure(go.Bar(
        x=frame["model"].tolist() if len(frame) else [], y=frame[f"{metric}_mean"].tolist() if len(frame) else [],
        error_y={"type": "data", "array": frame[f"{metric}_sd"].fillna(0).tolist() if len(frame) else []},
        marker_color=[colours[model] for model in models],
        hovertemplate="%{x}: %{y:.3f}<extra></extra>"))
    figure.update_layout(**{**_LAYOUT, "margin": {**_LAYOUT["margin"], "t": 70}},
                         title={"text": f"mean {label} per model", "subtitle": {"text": subtitle}},
                         yaxis={"title": f"mean {label}", "range": [0, 1.05]}, xaxis={"title": "model"})
    return _as_dict(figure)


def metric_radar(by_value: pd.DataFrame, metric: str, *, category: str,
                 by_category: pd.DataFrame | None = None) -> dict[str, Any]:
    """Return one closed radar trace per model: mean ``metric`` per value of ``category``.

    A radar needs three axes: with fewer values, the axes are the categories (``by_category``,
    each model's mean over all values of each category) when there are three or more of them.
    """
    import plotly.graph_objects as go

    label = METRIC_LABELS.get(metric, metric)
    column = f"{metric}_mean"
    table, axis, title = by_value, "value", f"{label} per {category} value"
    few = column not in by_value or by_value["value"].nunique() < 3
    if few and by_category is not None and column in by_category and by_category["category"].nunique() >= 3:
        table, axis = by_category, "category"
        title = f"{label} per category (only {by_value['value'].nunique()} {category} values)"
    figure = go.Figure()
    if column in table and len(table):
        axes = sorted(table[axis].astype(str).unique())
        colours = model_colours(table["model"].astype(str))
        for model, rows in table.groupby("model", sort=True):
            means = rows.set_index(rows[axis].astype(str))[column].reindex(axes)
            radius = [None if pd.isna(v) else float(v) for v in [*means.tolist(), means.iloc[0]]]
            figure.add_trace(go.Scatterpolar(
                r=radius, theta=[*axes, axes[0]], name=str(model), fill="toself", opacity=0.55,
                line_color=colours[str(model)],
                hovertemplate="%{theta}: %{r:.3f}<extra>" + str(model) + "</extra>"))
    figure.update_layout(**_LAYOUT, title=title, polar={"radialaxis": {"range": [0, 1]}}, showlegend=True)
    return _as_dict(figure)


def prediction_scatter(frame: pd.DataFrame, *, method: str, title: str, max_points: int, seed: int = 0) -> dict[str, Any]:
    """Return a 2-D scatter of cells coloured by the probability of sensitivity (a fixed subset above ``max_points``)."""
    import plotly.graph_objects as go

    cells = frame.dropna(subset=["x", "y"])
    if len(cells) > max_points:
        rows = np.sort(np.random.default_rng(seed).choice(len(cells), max_points, replace=False))
        cells = cells.iloc[rows]
        title += f" ({max_points:,} of {len(frame):,} cells shown)"
    # one trace per trust group: confident cells as dots, uncertain sets as open circles, out-of-distribution
    # cells as crosses (colour is always the calibrated probability)
    sets = cells["set"].astype(str) if "set" in cells else pd.Series("", index=cells.index)
    ood = cells["ood"].fillna(False).astype(bool) if "ood" in cells else pd.Series(False, index=cells.index)
    groups = (("out of distribution", ood, "x"), ("uncertain (both classes in the set)", ~ood & (sets == "uncertain"),
                                                   "circle-open"),
              ("confident", ~ood & (sets != "uncertain"), "circle"))
    figure = go.Figure()
    for index, (name, rows, symbol) in enumerate(groups):
        part = cells[rows.to_numpy()]
        if part.empty:
            continue
        figure.add_trace(go.Scatter(
            x=part["x"].tolist(), y=part["y"].tolist(), mode="markers", name=f"{name} ({len(part):,})",
            text=part["cell"].astype(str).tolist(),
            marker={"size": 6, "symbol": symbol, "color": part["probability"].tolist(),
                    "colorscale": [list(stop) for stop in PROBABILITY_COLOURSCALE], "cmin": 0, "cmax": 1,
                    "showscale": index == len(groups) - 1 or len(figure.data) == 0,
                    "colorbar": {"title": {"text": "P(sensitive)"}}, "line": {"width": 1 if symbol != "circle" else 0}},
            hovertemplate=f"%{{text}}<br>P(sensitive) %{{marker.color:.3f}}<br>{name}<extra></extra>"))
    axis = "UMAP" if method == "umap" else "PC"
    figure.update_layout(**{**_LAYOUT, "height": 480}, title=title, xaxis={"title": f"{axis} 1"},
                         yaxis={"title": f"{axis} 2"})
    return _as_dict(figure)


def probability_histogram(frame: pd.DataFrame, *, threshold: float) -> dict[str, Any]:
    """Return the distribution of the probability of sensitivity, with the decision threshold marked."""
    import plotly.graph_objects as go

    readable = frame.dropna(subset=["probability"])
    sets = readable["set"].astype(str) if "set" in readable else pd.Series("", index=readable.index)
    ood = readable["ood"].fillna(False).astype(bool) if "ood" in readable else pd.Series(False, index=readable.index)
    figure = go.Figure()
    for name, rows, colour in (("confident", ~ood & (sets != "uncertain"), NEUTRAL_COLOUR),
                               ("uncertain set", ~ood & (sets == "uncertain"), "#BBBBBB"),
                               ("out of distribution", ood, EDGE_COLOUR)):
        values = readable.loc[rows.to_numpy(), "probability"]
        if len(values):
            figure.add_trace(go.Histogram(x=values.tolist(), xbins={"start": 0, "end": 1.0001, "size": 0.05},
                                          marker_color=colour, name=f"{name} ({len(values):,})"))
    figure.update_layout(barmode="stack")
    figure.add_vline(x=threshold, line_dash="dash", line_color=EDGE_COLOUR)
    figure.update_layout(**{**_LAYOUT, "height": 320}, title="calibrated probability of sensitivity",
                         xaxis={"title": "P(sensitive)", "range": [0, 1]}, yaxis={"title": "cells"})
    return _as_dict(figure)
