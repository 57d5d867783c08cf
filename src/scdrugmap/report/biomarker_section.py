"""The report's biomarker section: what ``scdrugmap biomarkers DATA --run RUN_DIR`` wrote into the run folder.

`biomarker_section` reads the run's biomarker folder through the store (`RunFolder.biomarkers`) and returns
the section's HTML: per comparison, a caption (which groups were compared, the test, the unit and N and how
cells were aggregated, the model explained), the top genes of each direction (test, log2FC, q, attribution,
deletion change, stability), the caveats, the enrichment table and the figures the analysis drew. A run
without one gets a single line with the command that makes it. `top_gene_rows` is the same table as a frame
(the report writes it as CSV).
"""

from __future__ import annotations

import html
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from scdrugmap.explain.de import top_genes
from scdrugmap.report.html import data_uri, html_table
from scdrugmap.report.style import model_name

if TYPE_CHECKING:
    from scdrugmap.evaluate.store import BiomarkerFolder
    from scdrugmap.report.run import RunData

SECTION = "Biomarkers"
ANCHOR = "biomarkers"
#: Genes per direction and comparison in the report's tables.
TOP_GENES = 10
#: Gene sets per comparison and method in the enrichment table.
ENRICHMENT_ROWS = 5
#: Columns of `top_gene_rows`.
TOP_COLUMNS = ("comparison", "test", "direction", "rank", "gene", "log2fc", "qvalue", "attribution_abs_mean",
               "deletion_delta", "stability")
FIGURE_CAPTIONS = {
    "volcano": "One point per gene: log2 fold change (resistant over sensitive) against -log10 p, per comparison and "
               "test; genes at q < 0.05 coloured by direction, the strongest named.",
    "dotplot": "The top genes of each direction: mean expression (colour) and share of expressing cells (size) per "
               "sample and group.",
    "attribution": "The genes the model relies on: mean |attribution| per attributed cell (bars coloured by the DE "
                   "direction), and the mean change in P(sensitive) when a gene is zeroed in the cells expressing it.",
    "enrichment_figure": "Gene sets over-represented among the top genes of each direction, and the rank-based "
                         "enrichment over all genes: -log10 q.",
}
FIGURE_TITLES = {"volcano": "Volcano", "dotplot": "Top genes by sample", "attribution": "Attribution and deletion",
                 "enrichment_figure": "Gene-set enrichment"}


def top_gene_rows(found: BiomarkerFolder, k: int = TOP_GENES) -> pd.DataFrame:
    """Return the ``k`` top genes per comparison, test and direction (smallest p first; within cell types: the
    gene's best stratum).

    Columns `TOP_COLUMNS`; ``direction`` is ``up`` (higher in resistant cells) or ``down``.
    """
    rows = []
    table = found.table
    for comparison in found.facts.get("comparisons") or list(dict.fromkeys(table["comparison"])):
        for test in dict.fromkeys(table.loc[table["comparison"] == comparison, "test"]):
            part = table[(table["comparison"] == comparison) & (table["test"] == test)]
            best = part.dropna(subset=["pvalue"]).sort_values("pvalue", kind="stable").drop_duplicates("gene")
            best = best.set_index("gene")
            for direction in ("up", "down"):
                for rank, gene in enumerate(top_genes(part, k, direction=direction), start=1):
                    row = best.loc[gene]
                    rows.append({"comparison": comparison, "test": test, "direction": direction, "rank": rank,
                                 "gene": gene, **{c: row[c] for c in TOP_COLUMNS[5:]}})
    return pd.DataFrame(rows, columns=list(TOP_COLUMNS))


def _number(value: Any, spec: str) -> str:
    return "—" if value is None or pd.isna(value) else format(float(value), spec)


def groups_caption(facts: dict[str, Any], comparison: str) -> str:
    """Say which groups were compared: observed labels, a head's predictions, or a run's out-of-fold predictions."""
    model = model_name(str(facts.get("model") or ""))
    if comparison == "observed":
        return f"observed labels (obs['{facts.get('label_key', 'response')}'])"
    run = facts.get("run")
    threshold = facts.get("threshold", 0.5)
    if run:
        setting = run.get("setting", {})
        where = ", ".join(f"{k} {v}" for k, v in setting.items())
        return (f"groups predicted by the run's out-of-fold predictions of {model} ({where}; P(sensitive) of "
                f"{threshold:g} and above: sensitive; {run.get('cells_predicted', 0):,} cells predicted)")
    return (f"groups predicted by the {model} head on these cells (calibrated P(sensitive) of {threshold:g} and "
            "above: sensitive)")


def test_caption(found: BiomarkerFolder, comparison: str, test: str) -> str:
    """Say what one test compared: the unit, N per group and how cells were aggregated."""
    facts = found.facts
    rows = found.table[(found.table["comparison"] == comparison) & (found.table["test"] == test)]
    per_stratum = rows.drop_duplicates("stratum")[["stratum", "n_resistant", "n_sensitive"]]
    strata = len(per_stratum)
    n_resistant, n_sensitive = int(per_stratum["n_resistant"].sum()), int(per_stratum["n_sensitive"].sum())
    within = f" within {strata} cell types (N summed over them)" if strata > 1 else ""
    samples = facts.get("groups", {}).get(comparison, {}).get("samples", {})
    if test == "pseudobulk":
        designs = facts.get("designs", {}).get(comparison, {})
        design = "; ".join(sorted(set(map(str, designs.values())))) if designs else "~ group"
        return (f"pseudobulk DESeq2 (Wald test, design {design}){within}: unit = pseudobulk sample (each sample's "
                f"raw counts summed per group), N = {n_resistant:,} resistant vs {n_sensitive:,} sensitive")
    kind = facts.get("value_kind")
    values = ("log1p of counts per 10,000" if kind in ("counts", "tpm", "normalised")
              else f"{kind} values as given")
    from_samples = (f", from {samples.get('resistant', 0)} vs {samples.get('sensitive', 0)} samples"
                    if facts.get("sample_key") else "")
    return (f"Wilcoxon rank-sum{within}: unit = cell ({values}; no aggregation), N = {n_resistant:,} resistant vs "
            f"{n_sensitive:,} sensitive cells{from_samples}")


def model_lines(facts: dict[str, Any]) -> list[str]:
    """Say how the model was explained: attribution, deletion and stability, one line each."""
    about = facts.get("attribution", {})
    parts = []
    if about.get("method"):
        who = about.get("model") or f"the {model_name(str(facts.get('model')))} head"
        refit = facts.get("fold_models", {})
        check = (f" (largest difference from the run's predictions {refit['max_difference']:.2g}, allowed "
                 f"{refit['tolerance']:g})" if refit.get("n_folds") else "")
        parts.append(f"Attribution: {about['method'].replace('_', ' ')} of the {about.get('explains', 'P(sensitive)')} "
                     f"on {about.get('n_cells', 0):,} cells, by {who}{check}; |attribution| is the mean over those "
                     "cells.")
    elif about.get("reason") or about.get("note"):
        parts.append(f"Attribution: none ({about.get('reason') or about.get('note')}).")
    deletion = facts.get("deletion")
    if deletion:
        parts.append(f"Deletion Δ: change in {deletion.get('explains', 'P(sensitive)')}, mean over the cells "
                     f"expressing the gene ({deletion.get('n_genes', 0)} genes deleted in {deletion.get('n_cells', 0):,} "
                     "cells; positive: the gene pushed cells towards resistance).")
    stability = facts.get("stability", {})
    method = stability.get("method") if isinstance(stability, dict) else None
    if method == "folds":
        parts.append(f"Stability: share of the {stability.get('n_folds')} fold models with the gene among their top "
                     f"{stability.get('k')} attributed genes (mean pairwise Jaccard of their top genes "
                     f"{_number(stability.get('jaccard_mean'), '.2f')}).")
    elif stability:
        first: dict[str, Any] = next(iter(stability.values()), {})
        parts.append(f"Stability: share of {first.get('resamples')} bootstrap resamples of samples with the gene "
                     f"among the top {first.get('k_per_direction')} of its direction.")
    else:
        parts.append("Stability: not computed (no bootstrap).")
    return parts


def genes_table(frame: pd.DataFrame) -> pd.DataFrame:
    """Return rows of `top_gene_rows` as the shown table: gene, log2FC, q, |attribution|, deletion Δ, stability."""
    shown = pd.DataFrame({
        "gene": frame["gene"],
        "log2FC": [_number(v, "+.2f") for v in frame["log2fc"]], "q": [_number(v, ".1e") for v in frame["qvalue"]],
        "|attribution|": [_number(v, ".2e") for v in frame["attribution_abs_mean"]],
        "deletion Δ": [_number(v, "+.2e") for v in frame["deletion_delta"]],
        "stability": [_number(v, ".2f") for v in frame["stability"]]})
    return shown


def enrichment_table(enrichment: pd.DataFrame) -> pd.DataFrame:
    """The best sets per comparison and method with any evidence (p < 1: an over-representation with overlap)."""
    best = (enrichment[enrichment["pvalue"] < 1].sort_values(["comparison", "method", "pvalue"], kind="stable")
            .groupby(["comparison", "method"], sort=False).head(ENRICHMENT_ROWS))
    effect = np.where(best["method"] == "rank", best["nes"], best["fold_enrichment"])
    return pd.DataFrame({
        "comparison": best["comparison"], "method": best["method"], "gene set": best["gene_set"],
        "size": best["size"].astype("Int64"),
        "overlap": [_number(v, ".0f") for v in best["overlap"]],
        "effect (NES or fold)": [_number(v, ".2f") for v in effect],
        "q": [_number(v, ".2g") for v in best["qvalue"]],
        "genes": [", ".join(str(g).replace(";", ",").split(",")[:8]) if isinstance(g, str) else
                  ", ".join(map(str, list(g)[:8])) if g is not None and not isinstance(g, float) else ""
                  for g in best["genes"]]})


def missing_line(run: RunData) -> str:
    """Return the one line a report shows when the run has no biomarker analysis: the command that makes one."""
    data = str(run.config.get("data") or "DATA")
    if data == "demo":
        data = "DEMO.h5ad"
    models = [m for m in run.model_list if m != "majority"] or run.model_list or ["MODEL"]
    command = f"scdrugmap biomarkers {data} --model {models[0]} --run {run.run_dir}"
    return (f"<p class='facts' id='{ANCHOR}'>No biomarker analysis of this run yet; <code>{html.escape(command)}"
            "</code> adds one (this report then shows it).</p>")


def biomarker_section(run: RunData) -> str:
    """Return the HTML of the run's biomarker section, or `missing_line` when the run has none."""
    found = run.folder.biomarkers
    if found is None:
        return missing_line(run)
    escape = html.escape
    facts = found.facts
    model = model_name(str(facts.get("model") or ""))
    relies = f", and the genes {model} relies on" if model else ""
    parts = [f"<h2 id='{ANCHOR}'>{SECTION}</h2>",
             f"<p>Genes that separate resistant from sensitive cells{escape(relies)}, from "
             f"<code>{escape(str(found.path))}</code> (scDrugMap {escape(str(facts.get('version', '')))}, seed "
             f"{escape(str(facts.get('seed')))}). Up: higher in resistant cells; down: lower. log2FC: resistant over "
             "sensitive; q: Benjamini-Hochberg within comparison and test.</p>",
             "<ul class='facts'>" + "".join(f"<li>{escape(line)}</li>" for line in model_lines(facts)) + "</ul>"]
    tops = top_gene_rows(found)
    for comparison in facts.get("comparisons", []):
        parts.append(f"<h3>{escape(comparison.capitalize())} groups</h3><p>Compared: "
                     f"{escape(groups_caption(facts, comparison))}.</p>")
        for test in facts.get("tests", {}).get(comparison, []):
            parts.append(f"<p>{escape(test_caption(found, comparison, test))}.</p>")
            for direction, word in (("up", "higher"), ("down", "lower")):
                rows = tops[(tops["comparison"] == comparison) & (tops["test"] == test)
                            & (tops["direction"] == direction)]
                parts.append(f"<h4>Top genes {word} in resistant cells ({escape(test)})</h4>")
                parts.append(html_table(genes_table(rows)))
    caveats = facts.get("caveats", [])
    parts.extend(f"<p class='banner' style='background:#FFF3CD;font-weight:400;font-size:.95rem'>Caveat: "
                 f"{escape(text)}</p>" for text in caveats)
    if found.enrichment is not None and len(found.enrichment):
        source = facts.get("gene_sets", {})
        parts.append(f"<h3>Enrichment</h3><p>The {ENRICHMENT_ROWS} best gene sets per comparison and method (those "
                     "with any overlap), of "
                     f"{escape(str(source.get('n_sets', '')))} sets ({escape(str(source.get('source', '')))}): "
                     "ora_up / ora_down, hypergeometric test of the top genes of each direction; rank, preranked "
                     "enrichment on the test statistic (NES > 0: higher in resistant cells). q: BH.</p>")
        parts.append(html_table(enrichment_table(found.enrichment)))
    for role, path in found.figures.items():
        parts.append(f"<figure id='figure-biomarkers-{escape(role)}'><h3>{escape(FIGURE_TITLES.get(role, role))}</h3>"
                     f"<img src='{data_uri(path.read_bytes())}' alt='{escape(FIGURE_TITLES.get(role, role))}'>"
                     f"<figcaption>{escape(FIGURE_CAPTIONS.get(role, ''))}</figcaption></figure>")
    return "\n".join(parts)
