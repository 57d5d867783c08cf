"""Colours, names and matplotlib settings shared by every figure of a report and of the web pages.

This is the one palette of scDrugMap: the report's matplotlib and plotly figures and the web
server's charts and pages (`scdrugmap.web.charts`, the CSS variables of ``base.html``) take
their model, response and probability colours from here.

Each model keeps one colour in every figure (`model_colours`). Colours come from the
Okabe-Ito palette (Okabe & Ito 2008, "Color Universal Design"), which stays distinct
under the common colour-vision deficiencies; baselines are black and greys, and models
beyond Okabe-Ito's seven hues take Paul Tol's "muted" colours (Tol 2021, "Colour
Schemes", SRON/EPS/TN/09-002).
"""

from __future__ import annotations

import logging
import textwrap
from collections.abc import Iterable
from typing import Any

log = logging.getLogger(__name__)

#: Okabe-Ito hues (black left out: it is the PCA baseline's).
OKABE_ITO = ("#E69F00", "#56B4E9", "#009E73", "#F0E442", "#0072B2", "#D55E00", "#CC79A7")
#: Paul Tol's muted scheme, for what Okabe-Ito cannot cover.
TOL_MUTED = ("#332288", "#88CCEE", "#44AA99", "#117733", "#999933", "#DDCC77", "#CC6677", "#882255", "#AA4499")

#: Fixed colours of the registry's models, so a model looks the same in every run's report.
KNOWN_MODEL_COLOURS: dict[str, str] = {
    "geneformer": "#0072B2", "scgpt": "#D55E00", "scfoundation": "#009E73", "uce": "#CC79A7",
    "cellplm": "#E69F00", "scbert": "#56B4E9", "tgpt": "#882255", "celllm": "#44AA99",
    "minilm": "#332288", "llm": "#999933",
    "pca": "#000000", "hvg": "#777777", "majority": "#BBBBBB",
}
#: Colours handed, in order, to models the registry does not know.
EXTRA_COLOURS = ("#117733", "#AA4499", "#88CCEE", "#CC6677", "#DDCC77", "#F0E442")

MODEL_NAMES: dict[str, str] = {
    "pca": "PCA", "hvg": "HVG", "majority": "Majority", "geneformer": "Geneformer", "tgpt": "tGPT",
    "scgpt": "scGPT", "scfoundation": "scFoundation", "uce": "UCE", "cellplm": "CellPLM", "scbert": "scBERT",
    "celllm": "CellLM", "minilm": "MiniLM", "llm": "LLM",
}
CATEGORY_NAMES: dict[str, str] = {
    "tissue": "Tissue", "cancer_type": "Cancer type", "therapy": "Therapy", "regimen": "Regimen",
}
METRIC_NAMES: dict[str, str] = {
    "f1": "F1", "auroc": "AUROC", "accuracy": "Accuracy", "precision": "Precision", "recall": "Recall",
}
#: Response colours (Okabe-Ito blue and orange: safe for red-green colour blindness).
RESPONSE_COLOURS: dict[str, str] = {"sensitive": "#0072B2", "resistant": "#E69F00"}
#: A missing response, an unknown model or value.
UNKNOWN_COLOUR = "#BBBBBB"
#: The probability of sensitivity as a plotly colour scale: 0 resistant, 0.5 undecided (grey), 1 sensitive.
PROBABILITY_COLOURSCALE: tuple[tuple[float, str], ...] = (
    (0.0, RESPONSE_COLOURS["resistant"]), (0.5, UNKNOWN_COLOUR), (1.0, RESPONSE_COLOURS["sensitive"]))
#: Outlines and reference marks that stand for no model or response (bar edges, a decision threshold).
EDGE_COLOUR = "#333333"
#: Data of no model and no response (the bars of a histogram over all cells).
NEUTRAL_COLOUR = "#999999"
#: Line styles telling training settings (strategy + head) apart; colour is kept for the model.
SETTING_LINESTYLES = ("-", "--", ":", "-.")

#: matplotlib settings of every report figure (used with ``matplotlib.rc_context``).
RC_PARAMS: dict[Any, Any] = {
    "font.size": 9, "axes.titlesize": 10, "axes.labelsize": 9, "legend.fontsize": 8, "xtick.labelsize": 8,
    "ytick.labelsize": 8, "axes.spines.top": False, "axes.spines.right": False, "axes.grid": False,
    "figure.dpi": 100, "savefig.dpi": 150, "svg.fonttype": "none", "pdf.fonttype": 42,
    "legend.frameon": False,
    "svg.hashsalt": "scdrugmap",  # SVG element ids from the content, not a random salt: the same figure, the same file
}


def model_colours(models: Iterable[str]) -> dict[str, str]:
    """Return one colour per model (in the order given): fixed ones for registry models, then free ones.

    Unknown models take the unused colour-blind-safe colours in sorted-name order, so the
    colour of a model depends only on the set of models, never on the order a figure meets
    them; the returned dict keeps the given order, which figures use to order models.
    """
    ordered = list(dict.fromkeys(models))
    names = sorted(ordered)
    colours = {name: KNOWN_MODEL_COLOURS[name] for name in names if name in KNOWN_MODEL_COLOURS}
    taken = set(colours.values())
    free = [colour for colour in dict.fromkeys((*EXTRA_COLOURS, *OKABE_ITO, *TOL_MUTED)) if colour not in taken]
    unknown = [name for name in names if name not in colours]
    if len(unknown) > len(free):
        log.warning("%d models but only %d distinct colour-blind-safe colours; colours repeat", len(names),
                    len(free) + len(taken))
    for index, name in enumerate(unknown):
        colours[name] = free[index % len(free)]
    return {name: colours[name] for name in ordered}


def category_colours(values: Iterable[str]) -> dict[str, str]:
    """Return a colour per category value (e.g. cancer types), in sorted order, Okabe-Ito first.

    The order starts away from `RESPONSE_COLOURS` (blue, orange), so a cancer type beside a
    response panel is not read as a response.
    """
    pool = ("#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442", "#E69F00", "#0072B2", "#000000", *TOL_MUTED)
    names = sorted(set(values))
    if len(names) > len(pool):
        log.warning("%d category values but %d distinct colours; colours repeat", len(names), len(pool))
    return {name: pool[index % len(pool)] for index, name in enumerate(names)}


def model_name(model: str) -> str:
    """Return the printed name of a model (``scgpt`` -> ``scGPT``)."""
    return MODEL_NAMES.get(model, model)


def category_name(category: str) -> str:
    """Return the printed name of a category kind (``cancer_type`` -> ``Cancer type``)."""
    return CATEGORY_NAMES.get(category, category.replace("_", " ").capitalize())


def metric_name(metric: str) -> str:
    return METRIC_NAMES.get(metric, metric)


def setting_name(strategy: str, head: str) -> str:
    """Return the printed name of a training setting (``frozen`` + ``mlp`` -> ``frozen · MLP head``)."""
    strategy_text = "LoRA" if strategy == "lora" else strategy
    head_text = {"mlp": "MLP", "logistic": "logistic"}.get(head, head)
    return f"{strategy_text} · {head_text} head"


#: Longest category label drawn on an axis; longer ones (regimens) are cut with an ellipsis (full text in tables).
MAX_LABEL = 40


def wrap_label(text: str, width: int = 16) -> str:
    """Break a long tick label on spaces, keeping short ones on one line."""
    if len(text) > MAX_LABEL:
        text = text[: MAX_LABEL - 1].rstrip() + "…"
    return textwrap.fill(text, width=width, break_long_words=False) if len(text) > width else text
