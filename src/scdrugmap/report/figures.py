"""Figures of a benchmark report, drawn with matplotlib (Agg, no pyplot) from a run's stored results.

Every builder takes plain frames read from a run directory (`scdrugmap.report.run`) and
returns a `matplotlib.figure.Figure`; nothing here trains or embeds. Conventions shared by
all figures:

- one colour per model everywhere (`scdrugmap.report.style.model_colours`, Okabe-Ito based);
  the training setting (strategy + head) is told apart by line style, hatch or panel;
- only scored jobs (status ``done``) are drawn; a fold whose metric is NaN is left out of
  means, SDs and counts (never drawn as 0);
- legends sit outside the axes, so they never cover data;
- the paper figures show the pooled scenario under the patient-grouped split
  (``split=sample``) when the run has it; the leakage panel compares both splits.

Artists carry a ``gid`` (``bar|<model>``, ``radar|<model>|<setting>``...) so tests can
count what was drawn per model.
"""

from __future__ import annotations

import functools
import logging
import re
import textwrap
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import matplotlib as mpl
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import LogFormatterSciNotation

from scdrugmap.evaluate.metrics import binary_curves
from scdrugmap.evaluate.projection import Projection, project_embedding, umap_fallback_reason
from scdrugmap.evaluate.store import MODELS, PREDICTIONS
from scdrugmap.report.render import RenderedFigure
from scdrugmap.report.run import (
    RunData,
    categories_order,
    labelled_predictions,
    reference_split,
    scored,
    settings_order,
)
from scdrugmap.report.stats import friedman_nemenyi
from scdrugmap.report.style import (
    EDGE_COLOUR,
    RC_PARAMS,
    RESPONSE_COLOURS,
    SETTING_LINESTYLES,
    UNKNOWN_COLOUR,
    category_colours,
    category_name,
    metric_name,
    model_colours,
    model_name,
    wrap_label,
)
from scdrugmap.report.tables import category_scores, scalability_table, value_scores
from scdrugmap.report.trust import plot_trust

if TYPE_CHECKING:
    import numpy.typing as npt
    from matplotlib.axes import Axes
    from matplotlib.projections.polar import PolarAxes

    from scdrugmap.evaluate.store import EmbeddingMap

log = logging.getLogger(__name__)



def styled(builder: Callable[..., Figure]) -> Callable[..., Figure]:
    """Draw a figure under the report's matplotlib settings (`RC_PARAMS`), leaving global ones alone."""

    @functools.wraps(builder)
    def wrapper(*args, **kwargs) -> Figure:
        with mpl.rc_context(RC_PARAMS):
            return builder(*args, **kwargs)

    return wrapper


def _figure(width: float, height: float) -> Figure:
    return Figure(figsize=(min(width, 40.0), min(height, 40.0)), layout="constrained")


@styled
def message_figure(title: str, message: str) -> Figure:
    """Return a small figure that says why a plot could not be drawn (kept in the report, never silent)."""
    figure = _figure(6, 1.6)
    ax = figure.add_subplot()
    ax.set_axis_off()
    ax.set_title(title, loc="left")
    ax.text(0.0, 0.6, textwrap.fill(message, 90, break_long_words=False), transform=ax.transAxes, va="top", ha="left", gid="message")
    return figure


def _models_in(frame: pd.DataFrame, colours: dict[str, str]) -> list[str]:
    present = set(frame["model"])
    return [m for m in colours if m in present] + sorted(present - set(colours))


def _colour(colours: dict[str, str], model: str) -> str:
    return colours.get(model, UNKNOWN_COLOUR)


def _setting_styles(settings: Sequence[str]) -> dict[str, Any]:
    return {s: SETTING_LINESTYLES[i % len(SETTING_LINESTYLES)] for i, s in enumerate(settings)}


def _model_handles(models: Sequence[str], colours: dict[str, str], *, kind: str = "patch") -> list:
    if kind == "line":
        return [Line2D([], [], color=_colour(colours, m), marker="o", markersize=4, label=model_name(m))
                for m in models]
    return [Patch(facecolor=_colour(colours, m), edgecolor=EDGE_COLOUR, linewidth=0.4, label=model_name(m)) for m in models]


def _setting_handles(settings: Sequence[str]) -> list:
    styles = _setting_styles(settings)
    return [Line2D([], [], color="#555555", linestyle=styles[s], label=s) for s in settings]


def _legend(figure: Figure, handles: list, title: str) -> None:
    figure.legend(handles=handles, loc="outside right upper", title=title, alignment="left")


def _suptitle(figure: Figure, text: str, *, legend: bool = True) -> None:
    """Set a left-aligned figure title, wrapped to the figure's width so it never runs into a right legend."""
    characters = int(max(40, (figure.get_figwidth() - (2.2 if legend else 0.4)) * 11))
    figure.suptitle(textwrap.fill(text, characters), x=0.01, ha="left")


def _top(means: pd.Series, sds: pd.Series) -> float:
    """Return the upper y limit of a 0-1 score axis: 1.1, raised to show the longest error bar."""
    reach = (means + sds.fillna(0)).max() if len(means) else 1.0
    return float(min(max(1.1, reach + 0.05), 1.6))


def _mark_bar(ax: Axes, x: float, text: str, *, gid: str) -> None:
    """Write a small vertical note at a bar position: "0" for a zero-height bar, "n/a" for no score."""
    ax.text(x, 0.01, text, rotation=90, ha="center", va="bottom", fontsize=6, color="#555555", gid=gid)


def _scope(split: str, scenario: str = "pooled") -> str:
    split_text = "patient-grouped split" if split == "sample" else "cell-level split"
    return f"{scenario} scenario, {split_text} (split = {split})"


# --- 1. grouped bars of mean F1 per category value ---------------------------------------------------------

@styled
def plot_metric_bars(results: pd.DataFrame, colours: dict[str, str], *, split: str | None = None,
                     metric: str = "f1") -> Figure:
    """Grouped bars of mean ``metric`` per model for every category value, one panel per setting.

    Bars are grouped by category value (tissue, cancer type, therapy, regimen, separated by
    dashed lines); error bars are the SD over folds (NaN folds left out; none with one fold).
    """
    split = split or reference_split(results)
    table = value_scores(results, split=split)
    table = table[table[f"{metric}_mean"].notna()]
    if table.empty:
        return message_figure(f"Mean {metric_name(metric)} per category", f"No scored job under split = {split}.")
    settings = [s for s in settings_order(results) if s in set(table["setting"])]
    models = _models_in(table, colours)
    groups = [(c, v) for c in categories_order(table)
              for v in sorted(set(table.loc[table["category"] == c, "value"]))]
    width = 0.8 / len(models)
    figure = _figure(max(6.5, len(groups) * (0.16 * len(models) + 0.35) + 2.5), 2.3 * len(settings) + 1.3)
    axes = figure.subplots(len(settings), 1, sharex=True, squeeze=False)[:, 0]
    positions = {group: index for index, group in enumerate(groups)}
    for ax, setting in zip(axes, settings, strict=True):
        part = table[table["setting"] == setting]
        for number, model in enumerate(models):
            rows = part[part["model"] == model]
            if rows.empty:
                continue
            x = [positions[(c, v)] - 0.4 + width * (number + 0.5) for c, v in zip(rows["category"], rows["value"],
                                                                                   strict=True)]
            scored_groups = set(zip(rows["category"], rows["value"], strict=True))
            for group in groups:  # a model of this panel with no score for a value: say so, not a gap
                if group not in scored_groups:
                    _mark_bar(ax, positions[group] - 0.4 + width * (number + 0.5), "n/a", gid=f"missing|{model}")
            for x_zero in np.asarray(x)[rows[f"{metric}_mean"].to_numpy() < 0.005]:
                _mark_bar(ax, x_zero, "0", gid=f"zero|{model}")
            ax.bar(x, rows[f"{metric}_mean"], width, yerr=rows[f"{metric}_sd"].to_numpy(), color=_colour(colours, model),
                   edgecolor=EDGE_COLOUR, linewidth=0.4, label=model_name(model), gid=f"bar|{model}",
                   error_kw={"elinewidth": 0.7, "capsize": 1.5, "ecolor": EDGE_COLOUR})
        ax.set_ylim(0, _top(table[f"{metric}_mean"], table[f"{metric}_sd"]))
        ax.set_yticks(np.linspace(0, 1, 6))
        ax.set_ylabel(f"Mean {metric_name(metric)}\n(± SD over folds)")
        ax.set_title(setting, loc="left", fontweight="bold")
        bounds = [i for i in range(1, len(groups)) if groups[i][0] != groups[i - 1][0]]
        for bound in bounds:
            ax.axvline(bound - 0.5, color="#999999", linestyle="--", linewidth=0.7)
        ax.set_xlim(-0.6, len(groups) - 0.4)
    categories = list(dict.fromkeys(c for c, _ in groups))
    centres = [np.mean([i for i, (c, _) in enumerate(groups) if c == category]) for category in categories]
    top = axes[0].secondary_xaxis("top")
    top.set_xticks(centres, labels=[category_name(c) for c in categories], fontweight="bold")
    top.tick_params(length=0)
    top.spines["top"].set_visible(False)
    axes[-1].set_xticks(range(len(groups)), labels=[wrap_label(v) for _, v in groups], rotation=35, ha="right",
                        rotation_mode="anchor")
    axes[-1].set_xlabel(f"Category value ({_scope(split)})")
    _legend(figure, _model_handles(models, colours), "Model")
    _suptitle(figure, f"Mean {metric_name(metric)} per model across tissue, cancer type, therapy and regimen")
    return figure


# --- 2. radar plots --------------------------------------------------------------------------------------

RADAR_MIN_SPOKES = 3


def _polar_spokes(ax: PolarAxes, labels: Sequence[str]) -> np.ndarray:
    angles = np.linspace(0, 2 * np.pi, len(labels), endpoint=False)
    ax.set_theta_offset(np.pi / 2)
    ax.set_theta_direction(-1)
    ax.set_xticks(angles, labels=[wrap_label(label, 14) for label in labels])
    ax.set_ylim(0, 1)
    ax.set_yticks([0.2, 0.4, 0.6, 0.8, 1.0], labels=["0.2", "0.4", "0.6", "0.8", "1.0"], fontsize=7,
                  color="#555555")
    ax.set_rlabel_position(180 / len(labels))  # between the first two spokes, off the data lines
    ax.tick_params(axis="x", pad=6)
    return angles


@styled
def plot_radar(results: pd.DataFrame, colours: dict[str, str], *, split: str | None = None,
               metrics: Sequence[str] = ("f1", "auroc")) -> Figure:
    """Radar plots (radius 0-1) of mean F1 and AUROC: spokes are the categories, then each category's values.

    The first column has one spoke per category (mean over all its scored folds); a column
    follows for every category with at least three values (one spoke per value). Colour is
    the model, line style the setting.
    """
    split = split or reference_split(results)
    overall = category_scores(results, split=split)
    per_value = value_scores(results, split=split)
    if overall.empty:
        return message_figure("Radar plots", f"No scored job under split = {split}.")
    categories = categories_order(overall)
    panels: list[tuple[str, str | None, list[str]]] = [("All categories", None, categories)]
    for category in categories:
        values = sorted(set(per_value.loc[per_value["category"] == category, "value"]))
        if len(values) >= RADAR_MIN_SPOKES:
            panels.append((category_name(category), category, values))
    settings = [s for s in settings_order(results) if s in set(overall["setting"])]
    styles = _setting_styles(settings)
    models = _models_in(overall, colours)
    figure = _figure(max(7.0, 3.2 * len(panels) + 2.2), 3.3 * len(metrics))
    axes = figure.subplots(len(metrics), len(panels), squeeze=False, subplot_kw={"projection": "polar"})
    for row, metric in enumerate(metrics):
        for column, (title, panel_category, spokes) in enumerate(panels):
            ax = axes[row, column]
            angles = _polar_spokes(ax, [category_name(s) for s in spokes] if panel_category is None else spokes)
            frame = overall if panel_category is None else per_value[per_value["category"] == panel_category]
            key = "category" if panel_category is None else "value"
            for setting in settings:
                for model in models:
                    rows = frame[(frame["setting"] == setting) & (frame["model"] == model)].set_index(key)
                    if rows.empty or rows[f"{metric}_mean"].isna().all():
                        continue
                    radius = rows[f"{metric}_mean"].reindex(spokes).to_numpy(dtype=np.float64)
                    ax.plot(np.append(angles, angles[0]), np.append(radius, radius[0]), color=_colour(colours, model),
                            linestyle=styles[setting], linewidth=1.3, marker="o", markersize=3,
                            gid=f"radar|{model}|{setting}")
            ax.set_title(f"{metric_name(metric)}: {title}", pad=14)
    handles = _model_handles(models, colours, kind="line")
    if len(settings) > 1:
        handles += [Line2D([], [], color="none", label=" ")] + _setting_handles(settings)
    _legend(figure, handles, "Model / setting" if len(settings) > 1 else "Model")
    _suptitle(figure, f"Mean F1 and AUROC per category (radius 0-1; {_scope(split)})")
    return figure


# --- 3. violins across cancer types -------------------------------------------------------------------------

@styled
def plot_violins(results: pd.DataFrame, colours: dict[str, str], *, split: str | None = None,
                 category: str = "cancer_type", metric: str = "f1", seed: int = 0) -> Figure:
    """Violins with inner box plots of fold-level ``metric`` across all values of ``category``, per model.

    One panel per setting. Each dot is one scored fold of one category value; a violin needs
    at least two distinct values (otherwise only the box and dots are drawn).
    """
    split = split or reference_split(results)
    done = scored(results, scenario="pooled", split=split)
    done = done[(done["category"] == category) & done[metric].notna()]
    if done.empty:
        return message_figure(f"{metric_name(metric)} across {category_name(category).lower()}s",
                              f"No scored {category_name(category).lower()} job under split = {split}.")
    settings = [s for s in settings_order(results) if s in set(done["setting"])]
    models = _models_in(done, colours)
    rng = np.random.default_rng(seed)
    figure = _figure(max(5.0, 0.75 * len(models) * len(settings) + 2.5), 3.6)
    axes = figure.subplots(1, len(settings), sharey=True, squeeze=False)[0]
    n_values = done["value"].nunique()
    for ax, setting in zip(axes, settings, strict=True):
        part = done[done["setting"] == setting]
        for position, model in enumerate(models):
            values = part.loc[part["model"] == model, metric].to_numpy(dtype=np.float64)
            if values.size == 0:
                continue
            colour = _colour(colours, model)
            if values.size >= 2 and np.ptp(values) > 0:
                parts = ax.violinplot([values], positions=[position], widths=0.8, showextrema=False)
                for body in parts["bodies"]:
                    body.set_facecolor(colour)
                    body.set_edgecolor(EDGE_COLOUR)
                    body.set_alpha(0.55)
                    body.set_gid(f"violin|{model}")
            boxes = ax.boxplot([values], positions=[position], widths=0.16, showfliers=False, patch_artist=True,
                               medianprops={"color": "white", "linewidth": 1.2},
                               boxprops={"facecolor": EDGE_COLOUR, "edgecolor": EDGE_COLOUR},
                               whiskerprops={"color": EDGE_COLOUR}, capprops={"color": EDGE_COLOUR})
            for box in boxes["boxes"]:
                box.set_gid(f"box|{model}")
            jitter = rng.uniform(-0.22, 0.22, values.size)
            ax.scatter(position + jitter, values, s=7, color=colour, edgecolor=EDGE_COLOUR, linewidth=0.3, zorder=3,
                       gid=f"points|{model}")
        ax.set_xticks(range(len(models)), labels=[model_name(m) for m in models], rotation=30, ha="right",
                      rotation_mode="anchor")
        ax.set_xlim(-0.6, len(models) - 0.4)
        ax.set_ylim(-0.03, 1.05)
        ax.set_title(setting, loc="left", fontweight="bold")
        ax.set_xlabel("Model")
    axes[0].set_ylabel(f"{metric_name(metric)} per fold")
    _suptitle(figure, f"{metric_name(metric)} across {n_values} {category_name(category).lower()}"
                    f"{'s' if n_values != 1 else ''} (each dot a fold; {_scope(split)})", legend=False)
    return figure


# --- 4. circular bar charts per category --------------------------------------------------------------------

CIRCULAR_MIN_SLOTS = 24


@styled
def plot_circular_bars(results: pd.DataFrame, colours: dict[str, str], *, split: str | None = None,
                       metric: str = "f1") -> Figure:
    """Circular bar charts of mean ``metric`` (radius 0-1): one per category (columns) and setting (rows).

    Around each circle, the bars of one category value sit together, one bar per model.
    """
    split = split or reference_split(results)
    table = value_scores(results, split=split)
    table = table[table[f"{metric}_mean"].notna()]
    if table.empty:
        return message_figure("Circular bar charts", f"No scored job under split = {split}.")
    categories = categories_order(table)
    settings = [s for s in settings_order(results) if s in set(table["setting"])]
    models = _models_in(table, colours)
    figure = _figure(3.3 * len(categories) + 2.0, 3.5 * len(settings) + 0.6)
    axes = figure.subplots(len(settings), len(categories), squeeze=False, subplot_kw={"projection": "polar"})
    for row, setting in enumerate(settings):
        for column, category in enumerate(categories):
            ax = axes[row, column]
            part = table[(table["setting"] == setting) & (table["category"] == category)]
            values = sorted(set(table.loc[table["category"] == category, "value"]))
            # groups spread evenly around the circle; a bar never wider than 1/CIRCULAR_MIN_SLOTS of it
            spacing = 2 * np.pi / len(values)
            step = min(spacing / (len(models) + 1), 2 * np.pi / CIRCULAR_MIN_SLOTS)
            for number, model in enumerate(models):
                rows = part[part["model"] == model].set_index("value")
                if rows.empty:
                    continue
                theta = [values.index(v) * spacing + (number - (len(models) - 1) / 2) * step for v in rows.index]
                ax.bar(theta, rows[f"{metric}_mean"], width=step * 0.92, bottom=0.0, color=_colour(colours, model),
                       edgecolor=EDGE_COLOUR, linewidth=0.3, gid=f"circular|{model}")
            ax.set_theta_offset(np.pi / 2)
            ax.set_theta_direction(-1)
            ax.set_xticks([i * spacing for i in range(len(values))], labels=[wrap_label(v, 14) for v in values])
            ax.set_ylim(0, 1)
            ax.set_rorigin(-0.3)
            ax.set_yticks([0.25, 0.5, 0.75, 1.0], labels=["0.25", "0.5", "0.75", "1"], fontsize=7)
            ax.set_rlabel_position(np.degrees(spacing / 2))  # in the gap between the first two groups
            ax.grid(axis="x", visible=False)
            ax.set_title(f"{category_name(category)}\n{setting}" if len(settings) > 1 else category_name(category),
                         pad=12)
    _legend(figure, _model_handles(models, colours), "Model")
    _suptitle(figure, f"Mean {metric_name(metric)} per category value (bar length, 0-1; {_scope(split)})")
    return figure


# --- 5. embeddings (UMAP or PCA) ------------------------------------------------------------------------------

@styled
def plot_embedding(coordinates: npt.NDArray[np.floating], cells: pd.DataFrame, *, model: str,
                   method_label: str) -> Figure:
    """Scatter a model's 2-D cell map twice: coloured by cancer type and by response.

    ``cells`` has one row per point (columns ``cancer_type`` and ``response``; missing ones
    are drawn as "unknown").
    """
    axis = "UMAP" if method_label == "UMAP" else "PC"
    size = float(np.clip(6000 / max(len(cells), 1), 1.5, 14))
    figure = _figure(9.5, 4.9)
    axes = figure.subplots(1, 2)
    for ax, (column, title) in zip(axes, (("cancer_type", "Cancer type"), ("response", "Response")), strict=True):
        labels = cells[column].astype(str).to_numpy() if column in cells else np.full(len(cells), "unknown")
        names = sorted(set(labels))
        palette = ({n: RESPONSE_COLOURS.get(n, UNKNOWN_COLOUR) for n in names} if column == "response"
                   else category_colours(names))
        for name in names:
            rows = labels == name
            ax.scatter(coordinates[rows, 0], coordinates[rows, 1], s=size, color=palette[name], linewidth=0,
                       alpha=0.8, rasterized=True, label=f"{name} ({int(rows.sum())})", gid=f"embedding|{column}|{name}")
        ax.set_title(f"Coloured by {title.lower()}", loc="left")
        ax.set_xlabel(f"{axis} 1 (arbitrary units)")
        ax.set_ylabel(f"{axis} 2 (arbitrary units)")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=min(3, len(names)), markerscale=2.5,
                  title=f"{title} (cells)")
    _suptitle(figure, f"{model_name(model)} embeddings of {len(cells):,} cells: {method_label}", legend=False)
    return figure


def _stored_map(run: RunData, model: str, projection: Projection, seed: int) -> EmbeddingMap | None:
    """Return the run's stored map of ``model`` when it is what ``projection`` and ``seed`` would compute."""
    stored = run.embedding_map(model)
    if stored is None or stored.seed != seed:
        return None
    if stored.requested == projection or stored.method == projection:
        return stored
    return None


def _embedding_map(run: RunData, model: str, embedding: np.ndarray, *, projection: Projection,
                   seed: int) -> tuple[np.ndarray | None, str | None, str]:
    """Return (coordinates, method, fallback note) of a model's sample: the run's stored map, else computed."""
    stored = _stored_map(run, model, projection, seed)
    if stored is not None and stored.coordinates.shape == (embedding.shape[0], 2):
        log.debug("the %s map is the one stored in the run (%s)", model, stored.method)
        return stored.coordinates, stored.method, stored.note if projection != "pca" else ""
    coordinates, method = project_embedding(embedding, method=projection, seed=seed)
    note = ""
    if method == "pca" and projection != "pca":
        note = umap_fallback_reason(int(np.isfinite(embedding).all(axis=1).sum())) or ""
    return coordinates, method, note


def embedding_figures(run: RunData, *, projection: Projection = "auto",
                      seed: int | None = None) -> list[tuple[str, Figure]]:
    """Return (model, figure) for every model with a saved embedding sample.

    The 2-D map is the one the run stored with the sample when it was made the same way (method
    and seed; ``seed=None`` is the run's seed); older runs, or another method or seed, compute it.
    """
    seed = run.seed if seed is None else seed
    figures = []
    for model in run.embedding_models():
        embedding, cell_names = run.embedding(model)
        if embedding.ndim != 2 or embedding.shape[1] == 0 or embedding.shape[0] == 0:
            continue
        coordinates, method, note = _embedding_map(run, model, embedding, projection=projection, seed=seed)
        if coordinates is None:
            continue
        finite = np.isfinite(coordinates).all(axis=1)
        coordinates, cell_names = coordinates[finite], cell_names[finite]
        label = "UMAP" if method == "umap" else "PCA 2-D"
        if note:
            label += f" (fallback: {note})"
        if run.cells is not None:
            meta = run.cells.drop_duplicates("cell").set_index("cell").reindex(cell_names)
            meta = meta.fillna("unknown")
        else:
            meta = pd.DataFrame(index=cell_names)
        figures.append((model, plot_embedding(coordinates, meta.reset_index(drop=True), model=model,
                                              method_label=label)))
    return figures


# --- 6. scalability ---------------------------------------------------------------------------------------------

def format_si(value: float) -> str:
    """Return a count with an SI suffix: 51,000,000 -> "51 M", 24527.5 -> "24.5 k"."""
    for factor, suffix in ((1e12, " T"), (1e9, " G"), (1e6, " M"), (1e3, " k")):
        if abs(value) >= factor:
            return f"{value / factor:.3g}{suffix}"
    return f"{value:.3g}"


def format_seconds(value: float) -> str:
    """Return a duration in s, ms or µs with three significant digits."""
    if value >= 1:
        return f"{value:.3g} s"
    if value >= 1e-3:
        return f"{value * 1e3:.3g} ms"
    return f"{value * 1e6:.3g} µs"


#: Unicode superscripts of a power's exponent (`PlainLogFormatter`).
_SUPERSCRIPTS = str.maketrans("-0123456789", "⁻⁰¹²³⁴⁵⁶⁷⁸⁹")


class PlainLogFormatter(LogFormatterSciNotation):
    """The labels of a log axis (``10³``, ``2×10³``) written with Unicode superscripts, not mathtext.

    The same ticks and numbers as matplotlib's default `LogFormatterSciNotation`; only ``$\\mathdefault
    {10^{3}}$`` becomes ``10³``, which needs no mathtext parse (a tenth of a second per label set and
    renderer). A label of another form keeps its mathtext.
    """

    _POWER = re.compile(r"^\$\\mathdefault\{(-?)(?:(\d+(?:\.\d+)?)\\times)?(\d+)\^\{(-?\d+)\}\}\$$")

    def __call__(self, x: float, pos: int | None = None) -> str:
        label = super().__call__(x, pos)
        match = self._POWER.match(label)
        if match is None:
            return label
        sign, coefficient, base, exponent = match.groups()
        return f"{'−' if sign else ''}{coefficient + '×' if coefficient else ''}{base}{exponent.translate(_SUPERSCRIPTS)}"


def _log_x(ax: Axes) -> None:
    """Put the x axis on a log scale labelled by `PlainLogFormatter` (with matplotlib's default settings)."""
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(PlainLogFormatter(10))
    ax.xaxis.set_minor_formatter(PlainLogFormatter(10, labelOnlyBase=False))


@styled
def plot_scalability(table: pd.DataFrame, colours: dict[str, str]) -> Figure:
    """Dot plots on log scales: inference speed, training time per fold, and parameters, each labelled.

    Dots with their values (not bars: a bar's length means nothing on a log axis); models
    without a value (e.g. no parameter count for PCA) are marked "n/a".
    """
    if table.empty:
        return message_figure("Scalability", f"No model facts ({MODELS}) and no scored job.")
    per_model = table.drop_duplicates("_model")
    panels: list[tuple[str, pd.DataFrame, str, str, Callable[[float], str]]] = [
        ("Inference (embedding every cell)", per_model, "inference (cells/s)", "Cells per second (log scale)",
         lambda v: f"{format_si(v)} cells/s"),
        ("Training + prediction, per fold", table, "training time per fold (s)", "Seconds per fold (log scale)",
         format_seconds),
    ]
    if per_model["parameters"].notna().any():
        panels.append(("Model size", per_model, "parameters", "Parameters (log scale)", format_si))
    height = max(2.2, 0.3 * len(table) + 1.5)
    figure = _figure(4.3 * len(panels) + 1.0, height)
    axes = figure.subplots(1, len(panels), squeeze=False)[0]
    for ax, (title, frame, column, label, text) in zip(axes, panels, strict=True):
        values = pd.to_numeric(frame[column], errors="coerce").to_numpy(dtype=np.float64)
        names = [model_name(m) if column != "training time per fold (s)" or s in ("frozen", "—")
                 else f"{model_name(m)} ({'LoRA' if s == 'lora' else s})"
                 for m, s in zip(frame["_model"], frame["strategy"], strict=True)]
        y = np.arange(len(frame))
        known = np.isfinite(values) & (values > 0)
        ax.set_yticks(y, labels=names)
        ax.set_ylim(len(frame) - 0.5, -0.5)
        ax.grid(axis="y", color="#eeeeee", linewidth=0.8)
        if known.any():
            low, high = values[known].min(), values[known].max()
            _log_x(ax)
            ax.set_xlim(low / 3, high * 100)  # room for the value labels right of the dots
            ax.scatter(values[known], y[known], s=40, color=[_colour(colours, m) for m in frame["_model"][known]],
                       edgecolor=EDGE_COLOUR, linewidth=0.5, zorder=3, gid=f"scalability|{column}")
            for value, row in zip(values[known], y[known], strict=True):
                ax.annotate(text(value), (value, row), xytext=(6, 0), textcoords="offset points",
                            va="center", fontsize=7)
        for row in y[~known]:
            ax.text(0.02, row, "n/a", transform=ax.get_yaxis_transform(), va="center", fontsize=7, color="#777777")
        ax.set_xlabel(label)
        ax.set_title(title, loc="left")
    _suptitle(figure, "Scalability per model", legend=False)
    return figure


# --- 7. ROC and precision-recall curves, calibration ------------------------------------------------------------

#: Chance / perfect-calibration reference lines: thin, dark and loosely dotted, unlike any model's line.
CHANCE_STYLE = {"color": "#444444", "linestyle": (0, (1, 3)), "linewidth": 1.0}


def _pooled_curves(predictions: pd.DataFrame, split: str, columns: Sequence[str]) -> pd.DataFrame:
    """Return ``columns`` of the pooled predictions under ``split``: only those are copied (a full-size run's
    predictions have millions of rows and 14 columns; a copy of all of them was 380 MB)."""
    pooled = ((predictions["scenario"] == "pooled") & (predictions["split"] == split)).to_numpy()
    return predictions.loc[pooled, list(columns)]


#: Points of the common grid the per-fold ROC and PR curves are interpolated on before averaging.
CURVE_GRID = 101


def fold_curves(labels: npt.NDArray, scores: npt.NDArray) -> tuple[npt.NDArray, npt.NDArray, float, float] | None:
    """Return one fold's ROC and PR curves on `CURVE_GRID` points, its AUROC and average precision.

    The ROC curve is the true positive rate at each false positive rate of the grid (0 at 0); the PR
    curve the interpolated precision (the best precision at that recall or beyond). None when the
    fold does not hold both classes (no curve is defined).
    """
    if np.unique(labels).size < 2:
        return None
    grid = np.linspace(0, 1, CURVE_GRID)
    curves = binary_curves(labels, scores)  # scikit-learn's curves and areas, without its per-call validation
    roc = np.interp(grid, curves.fpr, curves.tpr)
    roc[0] = 0.0
    order = np.argsort(curves.recall, kind="stable")
    best_beyond = np.maximum.accumulate(curves.precision[order][::-1])[::-1]
    pr = np.interp(grid, curves.recall[order], best_beyond)
    return roc, pr, curves.auroc, curves.average_precision


def _mean_band(ax: Axes, curves: list[npt.NDArray], *, gid: str, label: str, **style) -> None:
    grid = np.linspace(0, 1, CURVE_GRID)
    stacked = np.vstack(curves)
    mean = stacked.mean(axis=0)
    ax.plot(grid, mean, label=label, gid=gid, **style)
    if len(curves) > 1:
        sd = stacked.std(axis=0, ddof=1)
        ax.fill_between(grid, np.clip(mean - sd, 0, 1), np.clip(mean + sd, 0, 1), color=style["color"], alpha=0.15,
                        linewidth=0, gid=f"band|{gid}")


def _fold_summary(values: list[float]) -> str:
    """Return "mean ± SD (n folds)" of per-fold scores."""
    sd = f" ± {np.std(values, ddof=1):.2f}" if len(values) > 1 else ""
    return f"{np.mean(values):.2f}{sd} ({len(values)} fold{'s' if len(values) != 1 else ''})"


@styled
def plot_roc_pr(predictions: pd.DataFrame | None, colours: dict[str, str], *, split: str = "sample",
                settings: Sequence[str] | None = None) -> Figure:
    """ROC and precision-recall curves per category (rows) and model: the mean of per-fold curves, ± SD band.

    Each scored fold with both classes gives one curve (interpolated on a common grid); the line
    is their mean and the band one SD. Curves are never pooled across folds: a fold's scores only
    rank its own test cells (a head trained on a fold with more sensitive cells shifts all its
    scores up), so pooling would reward or punish differences between folds' training sets. The
    majority reference thus reads 0.5. The legend gives the mean AUROC / average precision ± SD
    over folds and the number of folds; the dotted lines are chance (the diagonal, and the mean
    share of sensitive cells per fold).
    """
    if predictions is None or predictions.empty:
        return message_figure("ROC and precision-recall curves", f"The run stored no predictions ({PREDICTIONS}).")
    frame = _pooled_curves(predictions, split, ["category", "setting", "model", "key", "label", "probability"])
    if frame.empty:
        return message_figure("ROC and precision-recall curves", f"No predictions under split = {split}.")
    categories = categories_order(frame)
    settings = [s for s in (settings or sorted(set(frame["setting"]))) if s in set(frame["setting"])]
    styles = _setting_styles(settings)
    models = _models_in(frame, colours)
    figure = _figure(10.5, 3.1 * len(categories) + 0.6)
    axes = figure.subplots(len(categories), 2, squeeze=False)
    for row, category in enumerate(categories):
        roc_ax, pr_ax = axes[row]
        part = frame[frame["category"] == category]
        prevalences = part.groupby("key")["label"].mean()
        roc_ax.plot([0, 1], [0, 1], gid="chance", **CHANCE_STYLE)
        pr_ax.axhline(float(prevalences.mean()) if len(prevalences) else float("nan"), gid="chance", **CHANCE_STYLE)
        for setting in settings:
            for model in models:
                jobs = part[(part["setting"] == setting) & (part["model"] == model)]
                per_fold = [fold_curves(cells["label"].to_numpy(dtype=np.int64),
                                        cells["probability"].to_numpy(dtype=np.float64))
                            for _, cells in jobs.groupby("key", sort=True)]
                per_fold = [curves for curves in per_fold if curves is not None]
                if not per_fold:
                    continue
                rocs, prs, aurocs, precisions = (list(column) for column in zip(*per_fold, strict=True))
                name = model_name(model) if len(settings) == 1 else f"{model_name(model)}, {setting}"
                style = {"color": _colour(colours, model), "linestyle": styles[setting], "linewidth": 1.3}
                _mean_band(roc_ax, rocs, gid=f"roc|{model}|{setting}", label=f"{name}: {_fold_summary(aurocs)}",
                           **style)
                _mean_band(pr_ax, prs, gid=f"pr|{model}|{setting}", label=f"{name}: {_fold_summary(precisions)}",
                           **style)
        for ax, (xlabel, ylabel, kind) in zip(
                (roc_ax, pr_ax), (("False positive rate", "True positive rate", "ROC"),
                                  ("Recall (sensitive)", "Precision (sensitive)", "Precision-recall")), strict=True):
            ax.set_xlim(0, 1)
            ax.set_ylim(0, 1.02)
            ax.set_xlabel(xlabel)
            ax.set_ylabel(ylabel)
            ax.set_title(f"{category_name(category)}: {kind}", loc="left")
            if ax.get_legend_handles_labels()[0]:
                ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0),
                          title="Mean AUROC ± SD" if kind == "ROC" else "Mean average precision ± SD")
    _suptitle(figure, f"ROC and precision-recall curves: mean of per-fold curves ± SD band, folds never pooled "
              f"({_scope(split)})", legend=False)
    return figure


CALIBRATION_BINS = 10


@styled
def plot_calibration(predictions: pd.DataFrame | None, colours: dict[str, str], *, split: str = "sample",
                     settings: Sequence[str] | None = None, n_bins: int = CALIBRATION_BINS) -> Figure:
    """Reliability curves per category: observed share of sensitive cells per bin of predicted probability.

    Bins are ``n_bins`` equal-width probability bins (empty bins are skipped); the legend
    gives the Brier score. Points on the diagonal are perfectly calibrated.
    """
    if predictions is None or predictions.empty:
        return message_figure("Calibration", f"The run stored no predictions ({PREDICTIONS}).")
    frame = _pooled_curves(predictions, split, ["category", "setting", "model", "label", "probability"])
    if frame.empty:
        return message_figure("Calibration", f"No predictions under split = {split}.")
    categories = categories_order(frame)
    settings = [s for s in (settings or sorted(set(frame["setting"]))) if s in set(frame["setting"])]
    styles = _setting_styles(settings)
    models = _models_in(frame, colours)
    columns = min(2, len(categories))
    rows = int(np.ceil(len(categories) / columns))
    figure = _figure(5.2 * columns + 0.4, 3.6 * rows + 0.5)
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    edges = np.linspace(0, 1, n_bins + 1)
    for ax, category in zip(axes, categories, strict=False):
        part = frame[frame["category"] == category]
        ax.plot([0, 1], [0, 1], gid="diagonal", **CHANCE_STYLE)
        for setting in settings:
            for model in models:
                cells = part[(part["setting"] == setting) & (part["model"] == model)]
                if cells.empty:
                    continue
                probability = cells["probability"].to_numpy(dtype=np.float64)
                labels = cells["label"].to_numpy(dtype=np.float64)
                bins = np.clip(np.digitize(probability, edges[1:-1]), 0, n_bins - 1)
                counts = np.bincount(bins, minlength=n_bins)
                filled = counts > 0
                predicted = np.bincount(bins, probability, n_bins)[filled] / counts[filled]
                observed = np.bincount(bins, labels, n_bins)[filled] / counts[filled]
                brier = float(np.mean((probability - labels) ** 2))
                name = model_name(model) if len(settings) == 1 else f"{model_name(model)}, {setting}"
                ax.plot(predicted, observed, color=_colour(colours, model), linestyle=styles[setting], marker="o",
                        markersize=3, linewidth=1.2, label=f"{name}: {brier:.3f}", gid=f"calibration|{model}|{setting}")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("Mean predicted probability of sensitive")
        ax.set_ylabel("Observed share of sensitive cells")
        ax.set_title(category_name(category), loc="left")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), title="Brier score")
    for ax in axes[len(categories):]:
        ax.set_axis_off()
    _suptitle(figure, f"Calibration ({n_bins} probability bins; test cells of all folds pooled; {_scope(split)})",
              legend=False)
    return figure


# --- 8. cross-study heatmap -----------------------------------------------------------------------------------

@styled
def plot_cross_study_heatmap(results: pd.DataFrame, colours: dict[str, str], *, metric: str = "f1") -> Figure:
    """Heatmap of mean ``metric`` per model (rows) and held-out study (columns), one panel per category.

    Each cell averages the scored leave-one-study-out jobs of that study over the category's
    values; grey "n/a" cells had no scored job (skipped or failed).
    """
    cross = results[results["scenario"] == "cross"]
    done = scored(results, scenario="cross")
    done = done[done[metric].notna()]
    if done.empty:
        reasons = sorted({_short_reason(r) for r in cross.get("reasons", pd.Series(dtype=object)).dropna()})
        detail = ("; ".join(reasons[:3]) if reasons else "the run has no cross-study jobs (--scenarios cross)")
        return message_figure("Cross-study (leave-one-study-out) heatmap", f"No cross-study job was scored: {detail}.")
    categories = categories_order(done)
    settings = [s for s in settings_order(results) if s in set(done["setting"])]
    models = _models_in(done, colours)
    rows = [(m, s) for s in settings for m in models if not done[(done["model"] == m) & (done["setting"] == s)].empty]
    columns = [(c, study) for c in categories for study in sorted(set(done.loc[done["category"] == c, "fold"]))]
    table = done.groupby(["model", "setting", "category", "fold"], observed=True)[metric].mean()
    matrix = np.array([[table.get((m, s, c, study), np.nan) for c, study in columns] for m, s in rows], dtype=float)
    label_width = max(len(model_name(m) if len(settings) == 1 else f"{model_name(m)} · {s}") for m, s in rows)
    figure = _figure(max(5.0, 0.62 * len(columns) + 0.075 * label_width + 2.2), 0.42 * len(rows) + 2.4)
    ax = figure.add_subplot()
    cmap = mpl.colormaps["viridis"].with_extremes(bad="#DDDDDD")
    image = ax.imshow(np.ma.masked_invalid(matrix), vmin=0, vmax=1, cmap=cmap, aspect="auto", gid="heatmap")
    for i in range(matrix.shape[0]):
        for j in range(matrix.shape[1]):
            value = matrix[i, j]
            ax.text(j, i, "n/a" if np.isnan(value) else f"{value:.2f}", ha="center", va="center", fontsize=7,
                    color="black" if np.isnan(value) or value > 0.55 else "white")
    ax.set_xticks(range(len(columns)), labels=[study for _, study in columns], rotation=35, ha="right",
                  rotation_mode="anchor")
    ax.set_yticks(range(len(rows)),
                  labels=[model_name(m) if len(settings) == 1 else f"{model_name(m)} · {s}" for m, s in rows])
    for index in range(1, len(columns)):
        if columns[index][0] != columns[index - 1][0]:
            ax.axvline(index - 0.5, color="white", linewidth=3)
    centres = [np.mean([j for j, (c, _) in enumerate(columns) if c == category]) for category in categories]
    top = ax.secondary_xaxis("top")
    top.set_xticks(centres, labels=[category_name(c) for c in categories], fontweight="bold")
    top.tick_params(length=0)
    ax.spines[:].set_visible(False)
    top.spines[:].set_visible(False)
    ax.set_xlabel("Held-out study")
    figure.colorbar(image, ax=ax, label=f"Mean {metric_name(metric)} on the held-out study", shrink=0.9)
    _suptitle(figure, f"Cross-study scenario (leave one study out): {metric_name(metric)} per model and held-out "
              "study, averaged over each category's values", legend=False)
    return figure


def _short_reason(reasons: str) -> str:
    import json

    try:
        parsed = json.loads(reasons)
    except (TypeError, json.JSONDecodeError):
        return str(reasons)
    return "; ".join(str(v) for v in parsed.values()) if isinstance(parsed, dict) else str(parsed)


# --- 9. rank / critical-difference plot ------------------------------------------------------------------------

#: Fewest independent blocks (category values of one category) the rank test and diagram are drawn for.
MIN_CD_BLOCKS = 5


def rank_blocks(table: pd.DataFrame, models: Sequence[str], metric: str) -> tuple[str | None, pd.DataFrame]:
    """Return the category whose values are the most complete blocks, and those blocks (values x models).

    Values of one category hold disjoint cells, so they are independent units; values of
    different categories share cells (one tissue may be one cancer type) and are never pooled.
    Models with no score anywhere are dropped, then values where a remaining model has none.
    """
    best: tuple[str | None, pd.DataFrame] = (None, pd.DataFrame())
    for category in categories_order(table) if not table.empty else []:
        part = table[table["category"] == category]
        wide = part.pivot_table(index="value", columns="model", values=f"{metric}_mean", aggfunc="first")
        wide = wide[[m for m in models if m in wide.columns]].dropna(axis=1, how="all").dropna()
        if best[0] is None or wide.shape[0] * (wide.shape[1] >= 2) > best[1].shape[0] * (best[1].shape[1] >= 2):
            best = (category, wide)
    return best


@styled
def plot_critical_difference(results: pd.DataFrame, colours: dict[str, str], *, split: str | None = None,
                             metric: str = "auroc", alpha: float = 0.05,
                             min_blocks: int = MIN_CD_BLOCKS) -> Figure:
    """Critical-difference diagram (Demšar 2006) of the models' average ranks, one panel per setting.

    Blocks are independent units: the values of one category (`rank_blocks`: the category with
    the most values every model scored), each model's mean ``metric`` over folds. Rank 1 is best.
    Models joined by a thick bar do not differ by the Nemenyi test at ``alpha``; the title gives
    the Friedman test (`scdrugmap.report.stats`) and N. With fewer than ``min_blocks`` blocks
    nothing is ranked and the panel says why.
    """
    split = split or reference_split(results)
    table = value_scores(results, split=split)
    settings = [s for s in settings_order(results) if s in set(table["setting"])]
    if table.empty:
        return message_figure("Critical-difference diagram", f"No scored job under split = {split}.")
    blocks = {setting: rank_blocks(table[table["setting"] == setting],
                                   _models_in(table[table["setting"] == setting], colours), metric)
              for setting in settings}
    drawn = {s: w.shape[0] >= min_blocks and w.shape[1] >= 2 for s, (_, w) in blocks.items()}
    heights = [0.3 * np.ceil(w.shape[1] / 2) + 1.4 if drawn[s] else 0.7 for s, (_, w) in blocks.items()]
    figure = _figure(9.0, sum(heights) + 0.7)
    axes = figure.subplots(len(settings), 1, squeeze=False, gridspec_kw={"height_ratios": heights})[:, 0]
    for ax, setting in zip(axes, settings, strict=True):
        category, wide = blocks[setting]
        ax.set_axis_off()
        where = category_name(category).lower() if category else "any category"
        if not drawn[setting]:
            ax.set_title(setting, loc="left", fontsize=9)
            blocks_text = f"{wide.shape[0]} independent block{'' if wide.shape[0] == 1 else 's'}"
            reason = (f"Not drawn: N = {blocks_text} ({where} values scored by "
                      f"{wide.shape[1]} model(s) each); a rank test needs at least {min_blocks} blocks and two "
                      "models. Values of different categories share cells, so they are not pooled into more blocks.")
            ax.text(0, 0.5, textwrap.fill(reason, 120), transform=ax.transAxes, va="center", fontsize=8,
                    gid="message")
            continue
        test = friedman_nemenyi(wide, alpha=alpha)
        _draw_cd(ax, test, colours)
        ax.set_title(f"{setting}: Friedman χ² = {test.chi2:.2f} (p = {test.p_value:.3g}), "
                     f"N = {test.n_blocks} {where} values (independent blocks), k = {len(test.models)} models; "
                     f"Nemenyi CD (α = {alpha}) = {test.critical_difference:.2f}", loc="left", fontsize=9)
    _suptitle(figure, f"Average rank of mean {metric_name(metric)} across the values of one category "
              f"(1 = best; {_scope(split)})", legend=False)
    return figure


def _draw_cd(ax: Axes, test, colours: dict[str, str]) -> None:
    k = len(test.models)
    order = np.argsort(test.average_ranks, kind="stable")
    step = 0.28
    half = int(np.ceil(k / 2))
    bottom = -(max(half, k - half) + 1) * step - 0.2
    margin = 0.15 * (k - 1)
    ax.set_xlim(1 - margin, k + margin)
    ax.set_ylim(bottom, 0.75)
    ax.plot([1, k], [0, 0], color="black", linewidth=1.0)
    for rank in range(1, k + 1):
        ax.plot([rank, rank], [0, 0.07], color="black", linewidth=1.0)
        ax.text(rank, 0.1, str(rank), ha="center", va="bottom", fontsize=8)
    cd = test.critical_difference
    ax.plot([1, 1 + cd], [0.5, 0.5], color="black", linewidth=1.5, gid="cd-bar")
    ax.plot([1, 1], [0.45, 0.55], color="black", linewidth=1.0)
    ax.plot([1 + cd, 1 + cd], [0.45, 0.55], color="black", linewidth=1.0)
    ax.text(1 + cd / 2, 0.57, f"CD = {cd:.2f}", ha="center", va="bottom", fontsize=8)
    for position, index in enumerate(order):
        model, rank = test.models[index], test.average_ranks[index]
        left = position < half
        level = -(position + 1 if left else k - position) * step
        end = 1 - margin if left else k + margin
        colour = _colour(colours, model)
        ax.plot([rank, rank, end], [0, level, level], color=colour if colour != "#BBBBBB" else "#888888",
                linewidth=1.1)
        ax.text(end - 0.02 * k if left else end + 0.02 * k, level, f"{model_name(model)} ({rank:.2f})", va="center",
                ha="right" if left else "left", fontsize=8, gid=f"cd|{model}")
    for number, clique in enumerate(test.cliques()):
        ranks = [test.average_ranks[test.models.index(m)] for m in clique]
        y = -0.06 - 0.06 * number
        ax.plot([min(ranks) - 0.02, max(ranks) + 0.02], [y, y], color="black", linewidth=3.0,
                solid_capstyle="butt", gid="clique")


# --- 10. leakage: split=sample vs split=cell --------------------------------------------------------------------

SPLIT_HATCH = {"sample": "", "cell": "////"}


def leakage_table(results: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Return each model's score under both splits on the category values scored under both.

    One row per setting, model and category: ``sample_mean``, ``sample_sd``, ``cell_mean``,
    ``cell_sd`` (over the scored folds of the matched values, NaN folds left out), ``delta``
    (cell - sample) and ``n_values`` (values scored under both splits). Values scored under one
    split only are left out, so both bars describe the same cells.
    """
    done = scored(results, scenario="pooled")
    done = done[done[metric].notna()]
    per_split = {split: done[done["split"] == split] for split in ("sample", "cell")}
    keys = ["setting", "model", "category", "value"]
    matched = (per_split["sample"][keys].drop_duplicates()
               .merge(per_split["cell"][keys].drop_duplicates(), on=keys))
    rows = []
    for (setting, model, category), values in matched.groupby(["setting", "model", "category"], sort=False):
        row: dict[str, Any] = {"setting": setting, "model": model, "category": category, "n_values": len(values)}
        for split, frame in per_split.items():
            folds = frame.merge(values, on=keys)[metric]
            row[f"{split}_mean"], row[f"{split}_sd"] = float(folds.mean()), float(folds.std())
        row["delta"] = row["cell_mean"] - row["sample_mean"]
        rows.append(row)
    return pd.DataFrame(rows, columns=["setting", "model", "category", "n_values", "sample_mean", "sample_sd",
                                       "cell_mean", "cell_sd", "delta"])


def leakage_notes(results: pd.DataFrame) -> str:
    """Return what ran of the leakage comparison: per split, jobs run and category values scored."""
    pooled = results[results["scenario"] == "pooled"]
    parts = []
    for split in ("sample", "cell"):
        jobs = pooled[pooled["split"] == split]
        if jobs.empty:
            parts.append(f"split = {split}: not run (--split sample,cell runs both)")
            continue
        done = jobs[jobs["status"] == "done"]
        values = done[["category", "value"]].drop_duplicates()
        parts.append(f"split = {split}: {len(jobs)} jobs, {len(done)} scored on {len(values)} category values")
    return "; ".join(parts)


@styled
def plot_leakage(results: pd.DataFrame, colours: dict[str, str], *,
                 metrics: Sequence[str] = ("auroc", "f1")) -> Figure:
    """Side-by-side bars of each model's score under ``split=sample`` and ``split=cell``, same values only.

    A cell-level split puts cells of one patient on both sides of a fold; the gap to the
    patient-grouped split measures how much of the score such leakage buys. Only the category
    values scored under both splits are compared (`leakage_table`): each bar is the mean over
    their scored folds (± SD); the tick label gives Δ = cell - sample and the number of values.
    One panel per category (columns), metric and setting (rows); the title says what ran
    (`leakage_notes`).
    """
    notes = leakage_notes(results)
    tables = {metric: leakage_table(results, metric) for metric in metrics}
    if all(table.empty for table in tables.values()):
        return message_figure("Leakage panel", f"No category value was scored under both splits. What ran: {notes}.")
    every = pd.concat(tables.values(), ignore_index=True)
    categories = categories_order(every)
    settings = [s for s in settings_order(results) if s in set(every["setting"])]
    models = _models_in(every, colours)
    rows = [(metric, setting) for metric in metrics for setting in settings]
    figure = _figure(max(6.0, (0.6 * len(models) + 0.8) * len(categories) + 2.5), 2.8 * len(rows) + 1.2)
    axes = figure.subplots(len(rows), len(categories), squeeze=False)
    for row, (metric, setting) in enumerate(rows):
        table = tables[metric]
        top = _top(pd.concat([table["sample_mean"], table["cell_mean"]]),
                   pd.concat([table["sample_sd"], table["cell_sd"]])) if not table.empty else 1.1
        for column, category in enumerate(categories):
            ax = axes[row, column]
            part = table[(table["setting"] == setting) & (table["category"] == category)].set_index("model")
            tick_labels = []
            for position, model in enumerate(models):
                if model not in part.index:
                    tick_labels.append(f"{model_name(model)}\nn/a")
                    continue
                facts = part.loc[model]
                for offset, split in ((-0.2, "sample"), (0.2, "cell")):
                    mean, sd = float(facts[f"{split}_mean"]), float(facts[f"{split}_sd"])
                    if mean < 0.005:
                        _mark_bar(ax, position + offset, "0", gid=f"zero|{model}|{split}")
                    ax.bar(position + offset, mean, 0.4, yerr=0.0 if np.isnan(sd) else sd,
                           color=_colour(colours, model), alpha=1.0 if split == "sample" else 0.6,
                           hatch=SPLIT_HATCH[split], edgecolor=EDGE_COLOUR, linewidth=0.4,
                           gid=f"leakage|{model}|{split}",
                           error_kw={"elinewidth": 0.7, "capsize": 1.5, "ecolor": EDGE_COLOUR})
                values = int(facts["n_values"])
                tick_labels.append(f"{model_name(model)}\nΔ {facts['delta']:+.2f}\n"
                                   f"({values} value{'s' if values != 1 else ''})")
            if part.empty:
                ax.text(0.5, 0.5, "no value scored\nunder both splits", transform=ax.transAxes, ha="center",
                        va="center", fontsize=7, color="#555555", gid="message")
            if metric == "auroc":
                ax.axhline(0.5, gid="chance", **CHANCE_STYLE)
            ax.set_xticks(range(len(models)), labels=tick_labels, rotation=30 if len(models) > 4 else 0,
                          ha="right" if len(models) > 4 else "center", rotation_mode="anchor", fontsize=7)
            ax.set_xlim(-0.6, len(models) - 0.4)
            ax.set_ylim(0, top)
            ax.set_yticks(np.linspace(0, 1, 6))
            name = f"{category_name(category)}: {metric_name(metric)}"
            ax.set_title(name if len(settings) == 1 else f"{name}\n{setting}", loc="left")
        axes[row, 0].set_ylabel(f"Mean {metric_name(metric)} over folds (± SD)")
    handles = [Patch(facecolor="#777777", edgecolor=EDGE_COLOUR, label="split = sample\n(patients never on both sides)"),
               Patch(facecolor="#777777", alpha=0.6, hatch=SPLIT_HATCH["cell"], edgecolor=EDGE_COLOUR,
                     label="split = cell\n(one patient's cells on both sides)")]
    _legend(figure, handles + [Line2D([], [], color="none", label=" ")] + _model_handles(models, colours),
            "Split / model")
    _suptitle(figure, f"Leakage: the same category values under the patient-grouped and the cell-level split "
                      f"(pooled scenario; Δ = cell - sample). What ran: {notes}.")
    return figure


# --- 11. sample-level AUROC with bootstrap intervals ----------------------------------------------------------------

@styled
def plot_sample_auroc(scores: pd.DataFrame, colours: dict[str, str], *, split: str = "sample",
                      scenario: str = "pooled") -> Figure:
    """Sample-level AUROC with its bootstrap 95% interval per model (colour) and category value (rows).

    ``scores`` is `scdrugmap.report.run.RunData.sample_scores`: each sample's mean probability,
    scored over all out-of-fold samples of a value with pairs compared within their fold. One
    panel per setting; values without a score (no fold held both labels) are marked "n/a".
    """
    frame = scores[(scores["scenario"] == scenario) & (scores["split"] == split)] if not scores.empty else scores
    if frame.empty:
        return message_figure("Sample-level AUROC", f"No sample-level score under split = {split} ({scenario}); "
                              "the run needs a sample column and stored predictions.")
    settings = [s for s in dict.fromkeys(frame["setting"])]
    models = _models_in(frame, colours)
    rows = [(c, v) for c in categories_order(frame) for v in sorted(set(frame.loc[frame["category"] == c, "value"]))]
    figure = _figure(8.5, 0.32 * len(rows) * max(1, len(models)) / 2 + 1.6 * len(settings) + 0.6)
    axes = figure.subplots(1, len(settings), sharey=True, squeeze=False)[0]
    step = 0.7 / max(1, len(models))
    for ax, setting in zip(axes, settings, strict=True):
        part = frame[frame["setting"] == setting].set_index(["category", "value", "model"])
        ax.axvline(0.5, gid="chance", **CHANCE_STYLE)
        for number, model in enumerate(models):
            for index, (category, value) in enumerate(rows):
                y = index - 0.35 + step * (number + 0.5)
                if (category, value, model) not in part.index:
                    continue
                facts = part.loc[(category, value, model)]
                if np.isnan(facts["auroc"]):
                    ax.text(0.02, y, "n/a", fontsize=6, color="#777777", va="center", gid=f"missing|{model}")
                    continue
                low, high = facts["ci_low"], facts["ci_high"]
                ax.errorbar(facts["auroc"], y, xerr=[[facts["auroc"] - low], [high - facts["auroc"]]], fmt="o",
                            color=_colour(colours, model), markersize=4, elinewidth=1.0, capsize=2,
                            gid=f"sample_auroc|{model}")
        ax.set_xlim(0, 1)
        ax.set_ylim(len(rows) - 0.5, -0.5)
        ax.set_yticks(range(len(rows)), labels=[f"{category_name(c)}: {wrap_label(v, 30)}" for c, v in rows])
        ax.set_xlabel("Sample-level AUROC (95% bootstrap interval)")
        ax.set_title(setting, loc="left", fontweight="bold")
    _legend(figure, _model_handles(models, colours, kind="line"), "Model")
    _suptitle(figure, f"Sample-level AUROC: each sample's mean probability, pairs compared within their fold "
                      f"({_scope(split, scenario)})")
    return figure


# --- 12. confounders: AUROC within cell types and studies --------------------------------------------------------------

@styled
def plot_confounders(scores: pd.DataFrame, colours: dict[str, str], *, split: str = "sample",
                     scenario: str = "pooled") -> Figure:
    """Bars of AUROC over all test cells, within cell types, within studies and per cell type or study.

    ``scores`` is `scdrugmap.report.run.RunData.confounders`: pairs of cells are compared only
    within their fold (and within their cell type or study where the scope says so), so a model
    that reads only cell-type composition scores 0.5 "within cell type". One panel per category
    (columns) and setting (rows); the dotted line is chance.
    """
    frame = scores[(scores["scenario"] == scenario) & (scores["split"] == split)] if len(scores) else scores
    frame = frame[frame["auroc"].notna()] if len(frame) else frame
    if frame.empty or not frame["scope"].str.startswith("within").any():
        return message_figure("AUROC within cell types and studies",
                              "The run's cells name no cell type and no second study (--cell-type-key), or no "
                              f"job was scored under split = {split}.")
    categories = categories_order(frame)
    settings = list(dict.fromkeys(frame["setting"]))
    models = _models_in(frame, colours)
    scopes_of = {c: list(dict.fromkeys(frame.loc[frame["category"] == c, "scope"])) for c in categories}
    width = 0.8 / len(models)
    longest = max(len(v) for v in scopes_of.values())
    figure = _figure(max(6.0, sum(0.16 * len(models) * len(v) + 0.8 for v in scopes_of.values()) + 2.5),
                     2.6 * len(settings) + 1.0 + 0.05 * longest)
    axes = figure.subplots(len(settings), len(categories), squeeze=False, sharey=True)
    for row, setting in enumerate(settings):
        for column, category in enumerate(categories):
            ax = axes[row, column]
            scopes = scopes_of[category]
            part = frame[(frame["setting"] == setting) & (frame["category"] == category)].set_index(["scope", "model"])
            for number, model in enumerate(models):
                for index, scope in enumerate(scopes):
                    if (scope, model) in part.index:
                        ax.bar(index - 0.4 + width * (number + 0.5), float(part.loc[(scope, model), "auroc"]), width,
                               color=_colour(colours, model), edgecolor=EDGE_COLOUR, linewidth=0.4,
                               gid=f"confounder|{model}|{scope}")
            ax.axhline(0.5, gid="chance", **CHANCE_STYLE)
            for bound in (0.5, 0.5 + sum(s.startswith("within") for s in scopes)):
                ax.axvline(bound, color="#999999", linestyle="--", linewidth=0.7)
            ax.set_xticks(range(len(scopes)), labels=[wrap_label(s, 18) for s in scopes], rotation=40, ha="right",
                          rotation_mode="anchor", fontsize=7)
            ax.set_xlim(-0.6, len(scopes) - 0.4)
            ax.set_ylim(0, 1.05)
            name = category_name(category)
            ax.set_title(name if len(settings) == 1 else f"{name}\n{setting}", loc="left")
        axes[row, 0].set_ylabel("AUROC (pairs within folds)")
    _legend(figure, _model_handles(models, colours), "Model")
    _suptitle(figure, f"Confounders: AUROC over all test cells, within cell types and studies, and per cell type or "
                      f"study ({_scope(split, scenario)})")
    return figure


# --- all figures of a report -------------------------------------------------------------------------------------

@dataclass
class ReportFigure:
    """One figure of a report: file stem, section title, caption and the figure.

    ``figure`` is None for a figure drawn in another process (`scdrugmap.report.parallel`): its
    files were made there, and ``saved`` holds them.
    """

    name: str
    title: str
    caption: str
    figure: Figure | None
    section: str = "Paper figures"
    saved: dict[str, bytes] = field(default_factory=dict, repr=False, compare=False)
    _rendered: RenderedFigure | None = field(default=None, init=False, repr=False, compare=False)

    def save(self, fmt: str) -> bytes:
        """Return the figure saved as ``fmt``: laid out once, each format drawn once (`RenderedFigure`)."""
        if fmt not in self.saved:
            if self.figure is None:
                msg = f"figure {self.name!r} was drawn in another process without its {fmt} file"
                raise ValueError(msg)
            if self._rendered is None:
                self._rendered = RenderedFigure(self.figure)
            self.saved[fmt] = self._rendered.save(fmt)
        return self.saved[fmt]

    def drawn(self, formats: Sequence[str]) -> ReportFigure:
        """Return a copy holding only the files of ``formats`` (no figure): what another process sends back."""
        return ReportFigure(self.name, self.title, self.caption, None, self.section,
                            {fmt: self.save(fmt) for fmt in formats})


@dataclass(frozen=True)
class FigureGroup:
    """Figures of a report drawn together: ``draw`` returns them (none, one, or one per model).

    ``reads_predictions``: the group reads the run's per-cell predictions (or statistics made from
    them), not only its job results; the two kinds are drawn in different processes.
    """

    name: str
    draw: Callable[[], list[ReportFigure]]
    reads_predictions: bool


def _safe_name(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)


#: The report section of sample-level results: first when labels are per sample.
SAMPLE_SECTION = "Sample-level results"


def figure_groups(run: RunData, *, projection: Projection = "auto", seed: int | None = None) -> list[FigureGroup]:
    """Return the figure groups of a run's report in report order (``seed=None``: the run's seed); nothing is drawn yet."""
    results = run.results
    colours = model_colours(run.model_list)
    split = reference_split(results)
    settings = settings_order(results)
    predictions = functools.cache(lambda: labelled_predictions(run))  # shared by three groups, read on first use
    scope = _scope(split)
    beyond = "Beyond the paper"

    def one(name: str, draw: Callable[[], ReportFigure], *, reads_predictions: bool = False) -> FigureGroup:
        return FigureGroup(name, lambda: [draw()], reads_predictions)

    def embeddings() -> list[ReportFigure]:
        return [ReportFigure(f"embedding_{_safe_name(model)}", f"{model_name(model)} cell embeddings",
                             "2-D map of the saved embedding sample (up to 5,000 cells), coloured by cancer "
                             "type and by response. The method (UMAP, or PCA as fallback) is in the title.", figure)
                for model, figure in embedding_figures(run, projection=projection, seed=seed)]

    return [
        one("f1_bars", lambda: ReportFigure(
            "f1_bars", "Mean F1 per category value",
            f"Mean F1 per model for every tissue, cancer type, therapy and regimen ({scope}); error bars: SD "
            "over folds; folds with an undefined F1 and skipped or failed jobs are left out. One panel per "
            "training setting.", plot_metric_bars(results, colours, split=split))),
        one("radar", lambda: ReportFigure(
            "radar", "Radar plots of F1 and AUROC",
            "Mean F1 and AUROC (radius 0-1). First column: one spoke per category (mean over all its scored "
            "folds); then one radar per category with at least three values. Line style: training setting.",
            plot_radar(results, colours, split=split))),
        one("violin_cancer_type", lambda: ReportFigure(
            "violin_cancer_type", "F1 across cancer types",
            "Distribution of fold-level F1 over all cancer types per model: violin (kernel density), inner "
            "box plot (median, quartiles, whiskers at 1.5 IQR) and one dot per fold.",
            plot_violins(results, colours, split=split))),
        one("circular_bars", lambda: ReportFigure(
            "circular_bars", "Circular bar charts per category",
            "Mean F1 per category value (bar length from the inner ring, 0-1), one bar per model.",
            plot_circular_bars(results, colours, split=split))),
        FigureGroup("embeddings", embeddings, reads_predictions=False),
        one("sample_auroc", lambda: ReportFigure(
            "sample_auroc", "Sample-level AUROC",
            "Each test sample's cells are aggregated to their mean probability; all out-of-fold samples of a "
            "category value are scored together, a sensitive and a resistant sample compared only when the same "
            "fold's model scored both (so a fold's training balance cannot shift the score; the majority "
            f"reference reads 0.5). Bars: 95% percentile bootstrap interval over samples ({scope}); n/a: no fold "
            "held both labels.", plot_sample_auroc(run.sample_scores, colours, split=split), SAMPLE_SECTION),
            reads_predictions=True),
        one("confounders", lambda: ReportFigure(
            "confounders", "Confounders: AUROC within cell types and studies",
            "A sensitive and a resistant cell are compared only when the same fold's model scored both, and for "
            "\"within cell type\" (\"within study\") only when they also share a cell type (a study): a model that "
            "only reads cell-type composition or study batch scores 0.5 there, whatever its AUROC over all cells. "
            f"Right of the dashed lines, each cell type and study on its own ({scope}).",
            plot_confounders(run.confounders, colours, split=split), beyond), reads_predictions=True),
        one("scalability", lambda: ReportFigure(
            "scalability", "Scalability",
            f"Inference: cells embedded per second ({MODELS}). Training: mean seconds per fold for fitting the "
            "head or LoRA and predicting the test fold. Log scales.",
            plot_scalability(scalability_table(run), colours))),
        one("roc_pr", lambda: ReportFigure(
            "roc_pr", "ROC and precision-recall curves",
            f"One curve per scored fold (its test cells), averaged on a common grid: the line is the mean, the "
            f"band ± 1 SD over folds ({scope}). Legends: mean AUROC / average precision ± SD and the number of "
            "folds with both classes. Folds are never pooled into one curve, since each fold's scores only rank "
            "its own cells; the majority reference therefore reads 0.5.",
            plot_roc_pr(predictions(), colours, split=split, settings=settings), beyond), reads_predictions=True),
        one("trust", lambda: ReportFigure(
            "trust", "Calibration and conformal prediction sets",
            f"Left: reliability of each model's raw (dashed) and Platt-calibrated (solid) probabilities, test "
            f"cells pooled over folds ({scope}); ECE = expected calibration error over 10 equal-width bins. Each "
            "fold's head is calibrated on its inner validation split, never on test cells. Right: share of test "
            "cells whose Mondrian conformal set (alpha 0.1) holds their label, overall and per class, mean over "
            "folds; dotted line: the 90% guarantee; 'size': mean set size (1 = a single label, 2 = uncertain).",
            plot_trust(predictions(), results, colours, split=split), beyond), reads_predictions=True),
        one("cross_study_heatmap", lambda: ReportFigure(
            "cross_study_heatmap", "Cross-study heatmap",
            "Leave-one-study-out: mean F1 when each study is held out, averaged over the category's values. "
            "Grey n/a: no scored job.", plot_cross_study_heatmap(results, colours), beyond)),
        one("critical_difference", lambda: ReportFigure(
            "critical_difference", "Rank and critical-difference plot",
            "Average rank of each model's mean AUROC over the values of one category (Friedman test; Nemenyi "
            "post-hoc test at α = 0.05, Demšar 2006); the title states N. Only values of one category are "
            "blocks: they hold disjoint cells, while values of different categories share cells. With fewer "
            f"than {MIN_CD_BLOCKS} blocks the diagram is not drawn and says why. Models joined by a thick bar "
            "are not significantly different.", plot_critical_difference(results, colours, split=split), beyond)),
        one("leakage", lambda: ReportFigure(
            "leakage", "Leakage: split = sample vs split = cell",
            "AUROC and F1 of the same category values under patient-grouped folds (solid) and the paper's "
            "cell-level folds (hatched); values scored under one split only are left out. Higher scores under "
            "split = cell come from cells of one patient being on both sides of a fold. The title says what ran.",
            plot_leakage(results, colours), beyond)),
        one("calibration", lambda: ReportFigure(
            "calibration", "Calibration curves",
            f"Reliability curves: share of truly sensitive cells per bin of predicted probability ({scope}); "
            "Brier score in the legend (lower is better).",
            plot_calibration(predictions(), colours, split=split, settings=settings), beyond),
            reads_predictions=True),
    ]


def report_order(run: RunData, figures: list[ReportFigure]) -> list[ReportFigure]:
    """Return the figures (in group order) in report order: the sample-level figure first when labels are per sample."""
    sample = [f for f in figures if f.section == SAMPLE_SECTION]
    others = [f for f in figures if f.section != SAMPLE_SECTION]
    return [*sample, *others] if run.label_design == "per-sample" else [*others, *sample]


def build_figures(run: RunData, *, projection: Projection = "auto", seed: int | None = None) -> list[ReportFigure]:
    """Return every figure of a run's report, drawn here, in report order (``seed=None``: the run's seed)."""
    groups = figure_groups(run, projection=projection, seed=seed)
    return report_order(run, [figure for group in groups for figure in group.draw()])
