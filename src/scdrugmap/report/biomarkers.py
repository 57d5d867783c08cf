"""Figures of a biomarker analysis (`scdrugmap.tl.biomarkers`): volcano, dot plot, attribution and enrichment bars.

Each builder takes the plain frames of a `Biomarkers` result and returns a `matplotlib.figure.Figure`,
drawn under the report's settings (`scdrugmap.report.style.RC_PARAMS`), in the response colours
(resistant orange, sensitive blue). Every title states the unit and N. Artists carry a ``gid``
(``volcano|<comparison>|<test>``, ``bar|<gene>``, ...) so tests can count what was drawn.
"""

from __future__ import annotations

import functools
import textwrap
from collections.abc import Callable, Mapping
from typing import Any

import matplotlib as mpl
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from scdrugmap.report.style import EDGE_COLOUR, NEUTRAL_COLOUR, RC_PARAMS, RESPONSE_COLOURS, model_name

#: q-value below which a gene is coloured in the volcano.
ALPHA = 0.05
#: Genes named per direction in each volcano panel.
LABELLED = 6
#: Smallest p-value drawn (log10 of 0 is not finite).
P_FLOOR = 1e-300


def styled(builder: Callable[..., Figure]) -> Callable[..., Figure]:
    """Draw a figure under the report's matplotlib settings, leaving the global ones alone."""

    @functools.wraps(builder)
    def wrapper(*args: Any, **kwargs: Any) -> Figure:
        with mpl.rc_context(RC_PARAMS):
            return builder(*args, **kwargs)

    return wrapper


def _title(figure: Figure, text: str, width: float) -> None:
    figure.suptitle(textwrap.fill(text, int(max(50, width * 13))), x=0.01, ha="left")


def _unit(test: str) -> str:
    return "pseudobulk samples" if test == "pseudobulk" else "cells"


@styled
def plot_volcano(table: pd.DataFrame) -> Figure:
    """Draw one volcano per comparison and test: log2 fold change (resistant / sensitive) against -log10 p.

    Genes at q < `ALPHA` are coloured by direction (higher in resistant: orange; lower: blue) and the
    `LABELLED` strongest of each direction are named. Where no fold change is defined (z-scored values),
    the x axis is the signed test statistic instead.
    """
    panels = list(table.groupby(["comparison", "test"], sort=False).groups)
    figure = Figure(figsize=(4.6 * max(1, len(panels)), 4.4), layout="constrained")
    axes = figure.subplots(1, max(1, len(panels)), squeeze=False)[0]
    for ax, (comparison, test) in zip(axes, panels, strict=False):
        rows = table[(table["comparison"] == comparison) & (table["test"] == test)].dropna(subset=["pvalue"])
        use_fc = rows["log2fc"].notna().any()
        x = rows["log2fc" if use_fc else "score"].to_numpy(dtype=np.float64)
        y = -np.log10(np.maximum(rows["pvalue"].to_numpy(dtype=np.float64), P_FLOOR))
        significant = rows["qvalue"].to_numpy(dtype=np.float64) < ALPHA
        up = significant & (rows["score"].to_numpy(dtype=np.float64) > 0)
        down = significant & (rows["score"].to_numpy(dtype=np.float64) < 0)
        rest = ~(up | down)
        ax.scatter(x[rest], y[rest], s=5, color=NEUTRAL_COLOUR, alpha=0.5, linewidths=0, gid=f"volcano|{comparison}|{test}")
        ax.scatter(x[up], y[up], s=8, color=RESPONSE_COLOURS["resistant"], linewidths=0, label="higher in resistant")
        ax.scatter(x[down], y[down], s=8, color=RESPONSE_COLOURS["sensitive"], linewidths=0, label="lower in resistant")
        for mask in (up, down):
            picked = np.flatnonzero(mask)
            picked = picked[np.argsort(-y[picked], kind="stable")][:LABELLED]
            for i in picked:
                ax.annotate(str(rows["gene"].iloc[i]), (x[i], y[i]), fontsize=6, xytext=(2, 2),
                            textcoords="offset points", gid=f"label|{rows['gene'].iloc[i]}")
        ax.axvline(0, color=EDGE_COLOUR, linewidth=0.5)
        n_res = int(rows["n_resistant"].max()) if len(rows) else 0
        n_sens = int(rows["n_sensitive"].max()) if len(rows) else 0
        strata = rows["stratum"].nunique()
        where = "" if strata <= 1 else f", {strata} cell types"
        ax.set_title(f"{comparison} labels, {test}{where}\nN = {rows['gene'].nunique():,} genes; "
                     f"{n_res:,} resistant vs {n_sens:,} sensitive {_unit(test)}", loc="left")
        ax.set_xlabel("log2 fold change, resistant / sensitive" if use_fc else "test statistic (positive: higher in "
                      "resistant)")
        ax.set_ylabel("-log10 p-value")
        ax.legend(loc="upper left", fontsize=7, title=f"q < {ALPHA}")
    _title(figure, "Differential expression between resistant and sensitive cells (one point per gene)",
           figure.get_figwidth())
    return figure


@styled
def plot_dotplot(expression: pd.DataFrame, facts: Mapping[str, Any], *, max_samples: int = 30) -> Figure:
    """Draw the top genes of each direction by sample and group: colour = mean expression, size = % expressing.

    With more than ``max_samples`` samples, those with the most cells are drawn (the title says so).
    """
    dot = facts.get("dotplot", {})
    genes = [*dot.get("genes_up", []), *dot.get("genes_down", [])]
    genes = [g for g in genes if g in set(expression["gene"])] or list(dict.fromkeys(expression["gene"]))
    cells = expression.drop_duplicates(["sample", "group"]).groupby("sample")["n_cells"].sum()
    total, kept = len(cells), min(len(cells), max_samples)
    largest = set(cells.sort_values(ascending=False, kind="stable").index[:kept])
    expression = expression[expression["sample"].isin(largest)]
    columns = (expression[["group", "sample"]].drop_duplicates()
               .sort_values(["group", "sample"], kind="stable").itertuples(index=False, name=None))
    columns = list(columns)
    index = {c: i for i, c in enumerate(columns)}
    row = {g: i for i, g in enumerate(genes)}
    frame = expression[expression["gene"].isin(row)]
    x = np.array([index[(g, s)] for g, s in zip(frame["group"], frame["sample"], strict=True)])
    y = frame["gene"].map(row).to_numpy()
    width = min(40.0, 2.8 + 0.24 * len(columns))
    figure = Figure(figsize=(width, 1.6 + 0.24 * len(genes)), layout="constrained")
    ax = figure.add_subplot()
    points = ax.scatter(x, y, s=4 + 80 * frame["fraction_expressing"].to_numpy(), c=frame["mean_expression"],
                        cmap="viridis", edgecolors=EDGE_COLOUR, linewidths=0.2, gid="dots")
    ax.set_xticks(range(len(columns)), [s for _, s in columns], rotation=90, fontsize=6)
    for tick, (group, _) in zip(ax.get_xticklabels(), columns, strict=True):
        tick.set_color(RESPONSE_COLOURS.get(group, EDGE_COLOUR))
    ax.set_yticks(range(len(genes)), genes)
    ax.set_ylim(len(genes) - 0.5, -0.5)
    up = len([g for g in dot.get("genes_up", []) if g in row])
    if 0 < up < len(genes):
        ax.axhline(up - 0.5, color=EDGE_COLOUR, linewidth=0.5)
    ax.set_xlabel("sample (orange: resistant, blue: sensitive cells of it)")
    figure.colorbar(points, ax=ax, label=f"mean expression ({dot.get('unit', '')})", shrink=0.6)
    sizes = [ax.scatter([], [], s=4 + 80 * share, color=NEUTRAL_COLOUR, label=f"{share:.0%}")
             for share in (0.25, 0.5, 1.0)]
    figure.legend(handles=sizes, title="cells expressing", loc="outside right lower")
    n_cells = int(frame.groupby(["sample", "group"])["n_cells"].first().sum())
    shown = f"the {kept} samples with most cells of {total}" if kept < total else f"{total:,} samples"
    _title(figure, f"Top genes higher (above the line) and lower in {dot.get('comparison', '')} resistant cells, by "
           f"sample and {dot.get('comparison', '')} group; N = {n_cells:,} cells in {shown}", width)
    return figure


@styled
def plot_attribution(table: pd.DataFrame, facts: Mapping[str, Any], *, top: int = 20) -> Figure:
    """Draw the genes the model relies on: mean |attribution| per cell, and the in-silico deletion change."""
    comparison = facts.get("comparisons", [None])[0]
    rows = table[table["comparison"] == comparison] if comparison is not None else table
    genes = rows.drop_duplicates("gene").set_index("gene")
    attribution = genes["attribution_abs_mean"].dropna().sort_values(ascending=False, kind="stable").head(top)
    deletion = genes["deletion_delta"].dropna()
    deletion = deletion.reindex(deletion.abs().sort_values(ascending=False, kind="stable").index).head(top)
    panels = [p for p in ((attribution, "attribution"), (deletion, "deletion")) if len(p[0])]
    figure = Figure(figsize=(4.2 * len(panels) + 0.4, 1.4 + 0.2 * max(len(p[0]) for p in panels)), layout="constrained")
    axes = figure.subplots(1, len(panels), squeeze=False)[0]
    about = facts.get("attribution", {})
    model = model_name(str(facts.get("model", "")))
    for ax, (values, kind) in zip(axes, panels, strict=True):
        y = np.arange(len(values))
        if kind == "attribution":
            higher = genes.loc[values.index, "score"].to_numpy(dtype=np.float64)
            colours = [RESPONSE_COLOURS["resistant"] if d > 0 else RESPONSE_COLOURS["sensitive"] if d < 0
                       else NEUTRAL_COLOUR for d in higher]
            ax.barh(y, values.to_numpy(), color=colours, edgecolor=EDGE_COLOUR, linewidth=0.3,
                    gid=[f"bar|{g}" for g in values.index])
            ax.set_xlabel("mean |attribution| per cell (probability)")
            ax.set_title(f"{about.get('method', '')} of {about.get('explains', 'P(sensitive)')}\nN = "
                         f"{about.get('n_cells', 0):,} cells", loc="left")
            ax.legend(handles=[Patch(color=RESPONSE_COLOURS["resistant"], label="higher in resistant cells"),
                               Patch(color=RESPONSE_COLOURS["sensitive"], label="lower in resistant cells")],
                      loc="lower right", fontsize=6, title=f"{comparison} labels, DE")
        else:
            colours = [RESPONSE_COLOURS["resistant"] if d > 0 else RESPONSE_COLOURS["sensitive"] for d in values]
            ax.barh(y, values.to_numpy(), color=colours, edgecolor=EDGE_COLOUR, linewidth=0.3,
                    gid=[f"deletion|{g}" for g in values.index])
            ax.axvline(0, color=EDGE_COLOUR, linewidth=0.5)
            ax.set_xlabel("change in P(sensitive), gene zeroed (probability)")
            deleted = facts.get("deletion", {})
            ax.set_title(f"in-silico deletion, mean over expressing cells\nN = {deleted.get('n_cells', 0):,} cells, "
                         f"{deleted.get('n_genes', 0):,} genes deleted", loc="left")
            ax.legend(handles=[Patch(color=RESPONSE_COLOURS["resistant"], label="the gene pushes to resistance"),
                               Patch(color=RESPONSE_COLOURS["sensitive"], label="the gene pushes to sensitivity")],
                      loc="lower right", fontsize=6)
        ax.set_yticks(y, list(values.index))
        ax.set_ylim(len(values) - 0.5, -0.5)
    who = "fold models rely on, each on its own test cells" if about.get("folds") else "head relies on"
    _title(figure, f"Genes the {model} {who}", figure.get_figwidth())
    return figure


@styled
def plot_enrichment(enrichment: pd.DataFrame, *, top: int = 10) -> Figure:
    """Draw the ``top`` gene sets of each comparison and method by p-value, as -log10 q bars."""
    panels = list(enrichment.groupby(["comparison", "method"], sort=False).groups)
    columns = min(3, len(panels))
    lines = -(-len(panels) // columns)
    figure = Figure(figsize=(4.6 * columns, 0.8 + lines * (0.9 + 0.2 * top)), layout="constrained")
    axes = figure.subplots(lines, columns, squeeze=False).ravel()
    titles = {"ora_up": "over-representation, top genes higher in resistant",
              "ora_down": "over-representation, top genes lower in resistant",
              "rank": "rank enrichment (GSEA preranked on the test statistic)"}
    for ax, (comparison, method) in zip(axes, panels, strict=False):
        rows = enrichment[(enrichment["comparison"] == comparison) & (enrichment["method"] == method)]
        shown = rows.sort_values("pvalue", kind="stable").head(top)
        values = -np.log10(np.maximum(shown["qvalue"].to_numpy(dtype=np.float64), P_FLOOR))
        if method == "rank":
            colours = [RESPONSE_COLOURS["resistant"] if n > 0 else RESPONSE_COLOURS["sensitive"]
                       for n in shown["nes"].to_numpy(dtype=np.float64)]
        else:
            colours = [RESPONSE_COLOURS["resistant" if method == "ora_up" else "sensitive"]] * len(shown)
        y = np.arange(len(shown))
        ax.barh(y, values, color=colours, edgecolor=EDGE_COLOUR, linewidth=0.3,
                gid=[f"set|{comparison}|{method}|{s}" for s in shown["gene_set"]])
        ax.axvline(-np.log10(ALPHA), color=EDGE_COLOUR, linewidth=0.5, linestyle="--")
        ax.set_yticks(y, [textwrap.shorten(str(s), 40) for s in shown["gene_set"]], fontsize=6)
        ax.set_ylim(max(len(shown), 1) - 0.5, -0.5)
        ax.set_xlabel("-log10 q (BH); dashed: q = 0.05")
        ax.set_title(f"{comparison} labels: {titles.get(method, method)}\nN = {len(rows):,} sets tested",
                     loc="left", fontsize=8)
    for ax in axes[len(panels):]:
        ax.set_axis_off()
    _title(figure, "Gene-set enrichment of the signatures (rank: orange = higher in resistant cells)",
           figure.get_figwidth())
    return figure
