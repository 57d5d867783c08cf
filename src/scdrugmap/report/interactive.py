"""Interactive plotly figures for the HTML report (plotly.js is inlined by `scdrugmap.report.html`).

Optional: without plotly installed the report keeps its static figures only.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import pandas as pd

from scdrugmap.report.run import categories_order, reference_split, settings_order
from scdrugmap.report.style import EDGE_COLOUR, UNKNOWN_COLOUR, category_name, metric_name, model_name
from scdrugmap.report.tables import value_scores

if TYPE_CHECKING:
    from plotly.graph_objects import Figure as PlotlyFigure

log = logging.getLogger(__name__)


def plotly_available() -> bool:
    try:
        import plotly  # noqa: F401
    except ImportError:
        log.warning("plotly is not installed; the HTML report has static figures only "
                    "(pip install 'scdrugmap[report]')")
        return False
    return True


def interactive_bars(results: pd.DataFrame, colours: dict[str, str], *, split: str | None = None,
                     metrics: tuple[str, ...] = ("f1", "auroc")) -> PlotlyFigure | None:
    """Return grouped bars of mean F1 (switchable to AUROC) per category value, one row per setting.

    Hovering a bar shows the model, the value, the mean, the SD over folds and the number of
    scored folds. Returns None when nothing was scored.
    """
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    split = split or reference_split(results)
    table = value_scores(results, split=split)
    if table.empty:
        return None
    settings = [s for s in settings_order(results) if s in set(table["setting"])]
    categories = categories_order(table)
    order = {(c, v): i for i, (c, v) in enumerate((c, v) for c in categories
                                                  for v in sorted(set(table.loc[table["category"] == c, "value"])))}
    models = [m for m in colours if m in set(table["model"])] + sorted(set(table["model"]) - set(colours))
    figure = make_subplots(rows=len(settings), cols=1, shared_xaxes=True, subplot_titles=settings,
                           vertical_spacing=0.12 / max(len(settings), 1))
    traces_per_metric = 0
    for number, metric in enumerate(metrics):
        for row, setting in enumerate(settings, start=1):
            part = table[table["setting"] == setting]
            for model in models:
                rows = part[part["model"] == model].copy()
                if rows.empty:
                    continue
                rows["order"] = [order[(c, v)] for c, v in zip(rows["category"], rows["value"], strict=True)]
                rows = rows.sort_values("order")
                figure.add_trace(go.Bar(
                    x=[[category_name(c) for c in rows["category"]], list(rows["value"])],
                    y=rows[f"{metric}_mean"], error_y={"type": "data", "array": rows[f"{metric}_sd"].fillna(0)},
                    name=model_name(model), legendgroup=model, showlegend=row == 1,
                    marker={"color": colours.get(model, UNKNOWN_COLOUR), "line": {"color": EDGE_COLOUR, "width": 0.5}},
                    customdata=rows[[f"{metric}_sd", f"{metric}_n"]].to_numpy(),
                    hovertemplate=(f"<b>{model_name(model)}</b><br>%{{x}}<br>{metric_name(metric)} = %{{y:.3f}}"
                                   " ± %{customdata[0]:.3f} (SD)<br>scored folds: %{customdata[1]}<extra></extra>"),
                    visible=number == 0), row=row, col=1)
                if number == 0:
                    traces_per_metric += 1
    buttons = []
    for number, metric in enumerate(metrics):
        visible = [False] * (traces_per_metric * len(metrics))
        visible[number * traces_per_metric:(number + 1) * traces_per_metric] = [True] * traces_per_metric
        buttons.append({"label": metric_name(metric), "method": "update", "args": [{"visible": visible}]})
    figure.update_layout(barmode="group", template="simple_white", height=320 * len(settings) + 120,
                         legend_title_text="Model", margin={"t": 80},
                         updatemenus=[{"buttons": buttons, "direction": "right", "x": 0, "y": 1.12, "xanchor": "left",
                                       "yanchor": "bottom", "type": "buttons"}],
                         title={"text": f"Mean score per category value (split = {split}); hover for SD and folds",
                                "x": 0.2})
    figure.update_yaxes(range=[0, 1.1], title_text="Mean ± SD over folds")
    return figure
