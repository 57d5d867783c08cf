"""A self-contained HTML report: figures as data URIs, plotly.js inlined, nothing fetched from the network.

`render_html` returns one HTML document: a SIMULATED banner when the run's cells came
from the simulator, a summary (job counts, best model per category), every figure with
its caption, the scalability table, the jobs that were not scored and why, and the run's
config and environment.
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import json
from collections.abc import Sequence
from typing import TYPE_CHECKING

import pandas as pd

from scdrugmap.evaluate.store import MODELS
from scdrugmap.report.figures import SAMPLE_SECTION
from scdrugmap.report.serialise import make_json_safe

if TYPE_CHECKING:
    from scdrugmap.report.figures import ReportFigure
    from scdrugmap.report.run import RunData

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 0 auto; max-width: 1200px;
       padding: 1rem 2rem 3rem; color: #222; line-height: 1.45; }
h1 { margin-bottom: .2rem; } h2 { border-bottom: 1px solid #ddd; padding-bottom: .2rem; margin-top: 2.2rem; }
.banner { background: #E69F00; color: #000; font-weight: 700; padding: .8rem 1rem; border: 3px solid #000;
          margin: 1rem 0; font-size: 1.1rem; }
.facts { color: #555; font-size: .9rem; }
table { border-collapse: collapse; font-size: .85rem; margin: .5rem 0 1rem; }
th, td { border-bottom: 1px solid #ddd; padding: .25rem .6rem; text-align: left; vertical-align: top; }
th { background: #f3f3f3; }
figure { margin: 1.2rem 0 2rem; } figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { font-size: .88rem; color: #444; margin-top: .3rem; }
pre { background: #f7f7f7; padding: .8rem; overflow-x: auto; font-size: .8rem; }
nav ul { columns: 2; font-size: .9rem; }
"""


def data_uri(image: bytes, *, fmt: str = "png") -> str:
    """Return saved image bytes (``png`` or ``svg``) as a base64 data URI."""
    mime = "image/svg+xml" if fmt == "svg" else f"image/{fmt}"
    return f"data:{mime};base64,{base64.b64encode(image).decode('ascii')}"


def _table(frame: pd.DataFrame, *, floats: str = "{:.3f}") -> str:
    if frame.empty:
        return "<p><em>None.</em></p>"
    shown = frame[[c for c in frame.columns if not str(c).startswith("_")]].copy()
    for column in shown.columns:
        if pd.api.types.is_float_dtype(shown[column]):
            shown[column] = shown[column].map(lambda v: "—" if pd.isna(v) else floats.format(v))
    return shown.to_html(index=False, border=0, escape=True, na_rep="—")


def html_table(frame: pd.DataFrame, *, floats: str = "{:.3f}") -> str:
    """Return ``frame`` as an HTML table (floats formatted, NaN as a dash, text escaped); "None." when empty."""
    return _table(frame, floats=floats)


def _format_scalability(frame: pd.DataFrame) -> pd.DataFrame:
    shown = frame.copy()

    def number(value, digits=3):
        if value is None or pd.isna(value):
            return "—"
        value = float(value)
        return f"{value:,.0f}" if abs(value) >= 10 ** digits else f"{value:.{digits}g}"

    for column in ("embedding time (s)", "inference (cells/s)", "training time per fold (s)", "training (cells/s)"):
        if column in shown:
            shown[column] = shown[column].map(number).astype(object)
    for column in ("parameters", "cells embedded", "output dim"):
        if column in shown:
            shown[column] = shown[column].map(lambda v: "—" if v is None or pd.isna(v) else f"{int(v):,}")
    return shown


def _plotly_parts(interactive: Sequence[tuple[str, object]]) -> tuple[str, list[tuple[str, str]]]:
    if not interactive:
        return "", []
    import plotly.io as pio
    import plotly.offline as offline

    script = f"<script>{offline.get_plotlyjs()}</script>"
    # numbered div ids (plotly's own are random): a page made twice differs only in its generation time
    divs = [(title, pio.to_html(figure, full_html=False, include_plotlyjs=False, div_id=f"interactive-{number}",
                                config={"displaylogo": False, "responsive": True}))
            for number, (title, figure) in enumerate(interactive, start=1)]
    return script, divs


def render_html(run: RunData, figures: Sequence[ReportFigure], *, best: pd.DataFrame, scalability: pd.DataFrame,
                unscored: pd.DataFrame, counts: dict[str, int],
                interactive: Sequence[tuple[str, object]] = (), samples: pd.DataFrame | None = None,
                design_note: str = "", tests: pd.DataFrame | None = None,
                confounders: pd.DataFrame | None = None, biomarkers: str = "") -> str:
    """Return the report as one HTML document that works offline.

    Parameters
    ----------
    run
        The run read by `scdrugmap.report.run.read_run_data`.
    figures
        Figures in report order; each is embedded as a PNG data URI with its caption: the PNG
        the report writes as a file (`ReportFigure.save`), made once for both.
    best, scalability, unscored
        Tables from `scdrugmap.report.tables`.
    counts
        Jobs done, skipped and failed.
    interactive
        (title, plotly figure) pairs; plotly.js is inlined once, never loaded from a CDN.
    samples, design_note
        The sample-level table (`scdrugmap.report.tables.sample_level_table`) and why it comes first
        or not; it is the report's first section when the run's labels are per sample, with the
        figures of that section.
    tests
        The paired tests (`scdrugmap.report.tables.comparison_table`), shown after the summary.
    confounders
        AUROC within cell types and studies (`scdrugmap.report.tables.confounder_table`), shown after
        the paired tests with the warnings where labels coincide with samples, cell lines or sublines.
    biomarkers
        The biomarker section's HTML (`scdrugmap.report.biomarker_section.biomarker_section`), shown after
        the figures; a section with a heading gets a link in the contents.
    """
    escape = html.escape
    config = run.config
    title = f"scDrugMap benchmark report: {escape(run.run_dir.name)}"
    plotly_script, plotly_divs = _plotly_parts(interactive)
    parts: list[str] = ["<!DOCTYPE html>", "<html lang='en'><head><meta charset='utf-8'>",
                        "<meta name='viewport' content='width=device-width, initial-scale=1'>",
                        f"<title>{title}</title><style>{CSS}</style>", plotly_script, "</head><body>",
                        f"<h1>{title}</h1>"]
    if run.simulated:
        parts.append("<div class='banner' id='simulated-banner'>SIMULATED DATA: the cells of this run come from "
                     "scDrugMap's simulator (config data = \"demo\"). The scores show that the pipeline works; they "
                     "say nothing about real drug response.</div>")
    generated = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    parts.append(f"<p class='facts'>Data: <code>{escape(str(config.get('data', 'unknown')))}</code> · "
                 f"models: {escape(', '.join(run.model_list))} · jobs: {counts['done']} scored, "
                 f"{counts['skipped']} skipped, {counts['failed']} failed · run folder "
                 f"<code>{escape(str(run.run_dir))}</code> · generated {generated}</p>")
    sections = list(dict.fromkeys(f.section for f in figures))
    sample_first = run.label_design == "per-sample" and samples is not None
    parts.append("<nav><ul>")
    if sample_first:
        parts.append(f"<li><a href='#{_anchor(SAMPLE_SECTION)}'>{SAMPLE_SECTION}</a></li>")
        sections = [s for s in sections if s != SAMPLE_SECTION]
    parts.append("<li><a href='#summary'>Summary: best model per category</a></li>")
    for section in sections:
        parts.append(f"<li><a href='#{_anchor(section)}'>{escape(section)}</a></li>")
    if plotly_divs:
        parts.append("<li><a href='#interactive'>Interactive figures</a></li>")
    if "<h2 id='biomarkers'>" in biomarkers:
        parts.append("<li><a href='#biomarkers'>Biomarkers</a></li>")
    parts.append("<li><a href='#scalability-table'>Scalability table</a></li><li><a href='#unscored'>Jobs not "
                 "scored</a></li><li><a href='#config'>Config and environment</a></li></ul></nav>")
    if sample_first:
        parts.append(_sample_section(samples, design_note, [f for f in figures if f.section == SAMPLE_SECTION]))
    parts.append("<h2 id='summary'>Summary: best model per category</h2>"
                 "<p>Pooled scenario; mean AUROC over every fold of the category's values where it is defined (SD "
                 "over folds), and whether the best model beats the majority reference over paired folds. The "
                 "patient-grouped split (sample) is listed first; the cell-level split (cell) lets cells of one "
                 "patient sit in both train and test.</p>")
    parts.append(_table(best))
    if tests is not None:
        parts.append("<h3 id='paired-tests'>Paired tests</h3><p>Each model against the majority reference and "
                     "against the best baseline of each category value, over the folds both scored: mean AUROC "
                     "difference, bootstrap 95% interval over folds, and a one-sided sign-flip permutation p-value "
                     "(exact for up to 16 folds). A model beats the other at p &lt; 0.05 with a positive mean.</p>")
        parts.append(_table(tests))
    warnings = run.coincidences
    if confounders is not None or warnings:
        parts.append("<h3 id='confounders'>Confounders</h3>")
        parts.extend(f"<p class='banner' style='background:#FFF3CD;font-weight:400;font-size:.95rem'>Warning: "
                     f"{escape(text)}</p>" for text in warnings)
        if confounders is not None:
            parts.append("<p>AUROC over all test cells, within each cell type and study (pairs of one cell type or "
                         "study and one fold only), and per cell type or study. A score that holds over all cells "
                         "but falls to 0.5 within cell types comes from cell-type composition.</p>")
            parts.append(_table(confounders))
    for section in sections:
        if section == SAMPLE_SECTION:
            parts.append(_sample_section(samples, design_note, [f for f in figures if f.section == section]))
            continue
        parts.append(f"<h2 id='{_anchor(section)}'>{escape(section)}</h2>")
        parts.extend(_figure_html(item) for item in figures if item.section == section)
    if plotly_divs:
        parts.append("<h2 id='interactive'>Interactive figures</h2>")
        for name, div in plotly_divs:
            parts.append(f"<figure><h3>{escape(name)}</h3>{div}<figcaption>Hover a bar for its mean, SD and number "
                         "of scored folds; the buttons switch between F1 and AUROC; click a model in the legend to "
                         "hide it.</figcaption></figure>")
    if biomarkers:
        parts.append(biomarkers)
    parts.append("<h2 id='scalability-table'>Scalability table</h2><p>Parameters and output dimension of each "
                 f"model; inference is embedding every cell once (from {MODELS}; a cache hit repeats the "
                 "original timing); training is fitting the head or LoRA and predicting one test fold.</p>")
    parts.append(_table(_format_scalability(scalability)))
    parts.append("<h2 id='unscored'>Jobs not scored</h2><p>Skipped and failed jobs have no metrics and appear in "
                 "no figure.</p>")
    parts.append(_table(unscored))
    parts.append("<h2 id='config'>Config and environment</h2>")
    parts.append(f"<h3>Config</h3><pre>{escape(json.dumps(make_json_safe(config), indent=1, default=str))}</pre>")
    parts.append(f"<h3>Environment</h3><pre>{escape(json.dumps(make_json_safe(run.environment), indent=1, default=str))}</pre>")
    parts.append("</body></html>")
    return "\n".join(parts)


def _figure_html(item: ReportFigure) -> str:
    escape = html.escape
    return (f"<figure id='figure-{escape(item.name)}'><h3>{escape(item.title)}</h3>"
            f"<img src='{data_uri(item.save('png'))}' alt='{escape(item.title)}'>"
            f"<figcaption>{escape(item.caption)}</figcaption></figure>")


def _sample_section(samples: pd.DataFrame | None, note: str, figures: Sequence[ReportFigure]) -> str:
    """Return the sample-level section: why it stands where it does, its figures and its table."""
    parts = [f"<h2 id='{_anchor(SAMPLE_SECTION)}'>{SAMPLE_SECTION}</h2>", f"<p>{html.escape(note)}</p>"]
    parts.extend(_figure_html(item) for item in figures)
    parts.append("<h3>Sample-level AUROC per category value</h3><p>Each sample's mean probability over its test "
                 "cells; pairs of a sensitive and a resistant sample are compared within their fold; 95% "
                 "percentile bootstrap interval over samples. A note says why a value has no score.</p>")
    parts.append(_table(samples if samples is not None else pd.DataFrame(), floats="{:.2f}"))
    return "\n".join(parts)


def _anchor(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text.lower())
