"""The `check` report of an upload, read for prediction rather than benchmarking.

`scdrugmap.data.check.check_adata` judges data for the benchmark, where labels and folds
matter. Predicting needs neither: a missing or one-class label column becomes a note (labels
only serve to compare predictions with what was observed), and fold feasibility is left out.
Everything about the matrix, cell names and genes keeps its severity.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pandas as pd

from scdrugmap.data import schema
from scdrugmap.data.check import check_adata
from scdrugmap.report.serialise import make_json_safe

if TYPE_CHECKING:
    import anndata as ad

#: Rows shown per balance table on the report page.
MAX_TABLE_ROWS = 50


def _table_rows(table: pd.DataFrame, column: str) -> dict[str, Any]:
    rows = [{"value": str(index), **{k: int(v) for k, v in row.items()}} for index, row in
            table.head(MAX_TABLE_ROWS).iterrows()]
    return {"column": column, "rows": rows, "more": max(0, len(table) - MAX_TABLE_ROWS)}


def prediction_report(adata: ad.AnnData, *, source: str, keys: schema.ObsKeys | None = None) -> dict[str, Any]:
    """Check ``adata`` for prediction and return the report as plain JSON.

    Returns
    -------
    ``{"source", "ok", "facts", "tables": [{"column", "rows", "more"}], "problems": [{"severity", "where",
    "message"}]}``; severities are ``error`` (nothing can be queued), ``warning`` and ``note``.
    """
    keys = keys or schema.ObsKeys()
    report = check_adata(adata, source=source, keys=keys, needs="any", n_folds=2, split="cell")
    label_where = f"obs[{keys.response!r}]"
    problems = []
    for problem in report.problems:
        if "]==" in problem.where:  # fold feasibility of one category value: a benchmark concern
            continue
        severity = "note" if problem.where == label_where else problem.severity
        message = problem.message
        if problem.where == label_where:
            message += " Labels are optional for prediction: they only serve to compare predictions."
        problems.append({"severity": severity, "where": problem.where, "message": message})
    tables = [_table_rows(table, column) for column, table in report.tables.items()]
    if not tables and adata.n_obs:
        for column in (keys.sample, keys.study):
            if column in adata.obs:
                counts = adata.obs[column].astype(str).value_counts().sort_index().rename("cells").to_frame()
                tables.append(_table_rows(counts, column))
    facts = dict(report.facts)
    facts["labelled"] = keys.response in adata.obs and "labels" in facts
    facts["has_samples"] = keys.sample in adata.obs
    return make_json_safe({"source": source, "ok": not any(p["severity"] == "error" for p in problems), "facts": facts,
                   "tables": tables, "problems": problems})


def model_input_problem(report: dict[str, Any], *, model: str, input_kind: str) -> str | None:
    """Return why ``model`` cannot read the checked data (its value kind), or None when it can."""
    kind = report.get("facts", {}).get("value_kind")
    if input_kind == "counts" and kind != "counts":
        return f"{model} needs raw counts, but the uploaded values look {kind}. Upload the raw counts."
    if input_kind == "nonnegative" and kind not in schema.NONNEGATIVE_KINDS:
        return f"{model} ranks non-negative expression, but the uploaded values look {kind}. Upload counts or " \
               "normalised expression."
    return None
