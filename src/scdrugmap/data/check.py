"""Check a data set against the data contract and describe it, as ``scdrugmap check`` shows it.

`check_adata` never raises for bad data: it collects `Problem` lines (errors and
warnings) and facts, so a user sees every problem at once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd
import scipy.sparse as sp

from scdrugmap.data import schema
from scdrugmap.errors import SchemaError

if TYPE_CHECKING:
    import anndata as ad

Severity = Literal["error", "warning"]
#: Inverse transforms tried to name the scale of log-transformed data.
LOG_BASES = {"log1p (natural)": np.e, "log2(x+1)": 2.0, "log10(x+1)": 10.0}


@dataclass(frozen=True)
class Problem:
    """One thing wrong with the data: where, what, and the fix, in one line."""

    severity: Severity
    where: str
    message: str

    def __str__(self) -> str:
        return f"{self.severity}: {self.where}: {self.message}"


@dataclass
class CheckReport:
    """What `check_adata` found: facts to show, and problems to fix."""

    source: str
    facts: dict[str, Any] = field(default_factory=dict)
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "error"]

    @property
    def ok(self) -> bool:
        return not self.errors

    def add(self, severity: Severity, where: str, message: str) -> None:
        self.problems.append(Problem(severity, where, message))


def describe_values(X: np.ndarray | sp.spmatrix, max_rows: int = 2000) -> dict[str, Any]:
    """Return the value kind of ``X`` and a human detail (scale of log data, row totals)."""
    kind = schema.detect_value_kind(X)
    rows = X[: min(X.shape[0], max_rows)]
    dense_sums = np.asarray(rows.sum(axis=1)).ravel().astype(np.float64)
    detail = ""
    if kind == "log":
        for name, base in LOG_BASES.items():
            back = rows.copy() if sp.issparse(rows) else np.array(rows, dtype=np.float64)
            if sp.issparse(back):
                back.data = np.power(base, back.data.astype(np.float64)) - 1
                totals = np.asarray(back.sum(axis=1)).ravel()
            else:
                totals = (np.power(base, back) - 1).sum(axis=1)
            totals = totals[totals > 0]
            if totals.size > 1 and np.std(totals) / np.mean(totals) < 0.15:
                detail = f"{name} of values whose rows sum to about {np.median(totals):,.0f}"
                if np.median(totals) > 1e5:
                    detail += " (TPM-like: e.g. log2(TPM+1) over a gene subset)"
                break
        else:
            detail = "log-transformed (scale not recognised)"
    elif kind == "counts":
        detail = f"integers; median total per cell {np.median(dense_sums):,.0f}"
    elif kind == "zscore":
        detail = "negative values with mean near 0: z-scored (not counts; only rank-free models can use it)"
    return {"value_kind": kind, "value_detail": detail}


def _label_problems(report: CheckReport, obs: pd.DataFrame, keys: schema.ObsKeys) -> np.ndarray | None:
    column = keys.response
    if column not in obs:
        report.add("error", f"obs[{column!r}]", f"missing; columns present: {sorted(map(str, obs.columns))[:12]}. "
                   "Name the label column with --label-key.")
        return None
    values = obs[column]
    if values.isna().any():
        report.add("error", f"obs[{column!r}]", f"{int(values.isna().sum())} cells have no label. Label or remove them.")
        return None
    try:
        labels = schema.encode_labels(values.to_numpy(), column=column, source=report.source)
    except SchemaError as err:
        report.add("error", f"obs[{column!r}]", str(err).split(": ", 1)[-1])
        return None
    n_pos = int(labels.sum())
    report.facts["labels"] = {"sensitive": n_pos, "resistant": int(labels.size - n_pos)}
    if n_pos in (0, labels.size):
        only = schema.SENSITIVE if n_pos else schema.RESISTANT
        report.add("error", f"obs[{column!r}]", f"all {labels.size} cells are {only}; a classifier needs both classes.")
    return labels


def _balance_table(obs: pd.DataFrame, column: str, labels: np.ndarray) -> pd.DataFrame:
    frame = pd.DataFrame({column: obs[column].astype(str).to_numpy(), "sensitive": labels})
    table = frame.groupby(column).agg(cells=("sensitive", "size"), sensitive=("sensitive", "sum"))
    table["resistant"] = table["cells"] - table["sensitive"]
    return table


def _matrix_problems(report: CheckReport, adata: ad.AnnData, X, needs: str) -> None:
    stored = X.data if sp.issparse(X) else np.asarray(X)
    if not np.isfinite(stored).all():
        n_nan = int(np.isnan(stored).sum())
        n_inf = int(np.isinf(stored).sum())
        report.add("error", "X", f"{n_nan} NaN and {n_inf} inf values. Replace them (e.g. with 0) or drop those cells.")
        return
    kind = report.facts["value_kind"]
    if needs == "counts" and kind != "counts":
        report.add("error", "X", f"the model needs raw counts but the values look {kind}. Pass the raw counts (--layer).")
    elif needs == "nonnegative" and (stored < 0).any():
        report.add("error", "X", f"{int((stored < 0).sum())} negative values; the model ranks non-negative expression. "
                   "Pass counts or normalised expression (--layer).")
    nonzero_per_cell = np.asarray((X != 0).sum(axis=1)).ravel()
    empty_cells = np.flatnonzero(nonzero_per_cell == 0)
    if empty_cells.size:
        names = ", ".join(map(str, adata.obs_names[empty_cells[:3]]))
        report.add("error", "X", f"{empty_cells.size} cells have no expressed gene (e.g. {names}). Filter them out.")
    nonzero_per_gene = np.asarray((X != 0).sum(axis=0)).ravel()
    empty_genes = np.flatnonzero(nonzero_per_gene == 0)
    if empty_genes.size:
        names = ", ".join(map(str, adata.var_names[empty_genes[:3]]))
        report.add("warning", "var", f"{empty_genes.size} genes are zero in every cell (e.g. {names}); "
                   "they carry no information (filter them with scanpy.pp.filter_genes).")


def _gene_problems(report: CheckReport, adata: ad.AnnData) -> None:
    import anndata as ad

    from scdrugmap.data.genes import detect_gene_id_type, harmonise_genes

    names = adata.var_names.astype(str)
    if names.duplicated().any():
        dup = names[names.duplicated()].unique()[:3].tolist()
        report.add("error", "var_names", f"{int(names.duplicated().sum())} duplicate gene names (e.g. {dup}). "
                   "Sum or drop duplicates (adata.var_names_make_unique() keeps them apart).")
        return
    id_type = detect_gene_id_type(names)
    report.facts["gene_id_type"] = id_type
    genes_only = ad.AnnData(obs=pd.DataFrame(index=["_"]), var=adata.var.copy())
    try:
        harmonise_genes(genes_only)
    except SchemaError as err:
        report.add("error", "var_names", str(err))
        return
    known = (genes_only.var["ensembl_id"].notna() & (genes_only.var["ensembl_id"].astype(str) != "")).to_numpy()
    report.facts["genes_mapped"] = {"mapped": int(known.sum()), "total": len(names)}
    unknown = names[~known]
    if not known.any():
        report.add("error", "var_names", f"no gene id is a known human {id_type} (e.g. {unknown[:3].tolist()}). "
                   "Use gene symbols or Ensembl ids as var_names.")
    elif unknown.size:
        report.add("warning", "var_names", f"{unknown.size} of {len(names)} gene ids are not known human genes "
                   f"(e.g. {unknown[:3].tolist()}); models ignore them.")


def _fold_problems(report: CheckReport, obs: pd.DataFrame, keys: schema.ObsKeys, labels: np.ndarray,
                   n_folds: int, split: str, severity: Severity) -> None:
    for kind in schema.CATEGORY_KINDS:
        column = keys.category(kind)
        if column not in obs:
            continue
        for value, rows in obs.groupby(column, observed=True).indices.items():
            y = labels[rows]
            where = f"obs[{column!r}]=={value!r}"
            if y.min() == y.max():
                report.add(severity, where, f"only {'sensitive' if y[0] else 'resistant'} cells; no fold can be "
                           "scored there (the benchmark lists it as skipped).")
                continue
            if split == "sample" and keys.sample in obs:
                units = obs[keys.sample].to_numpy()[rows]
                per_class = [np.unique(units[y == c]).size for c in (0, 1)]
                if min(per_class) < 2:
                    report.add(severity, where, f"{per_class[1]} sensitive and {per_class[0]} resistant samples; "
                               "a sample-grouped split needs at least 2 of each. Use --split cell to split cells.")
                elif np.unique(units).size < n_folds:
                    report.add(severity, where, f"{np.unique(units).size} samples for {n_folds} grouped folds; "
                               f"use --folds {np.unique(units).size} or fewer.")
            elif min(int(y.sum()), int(y.size - y.sum())) < n_folds:
                report.add(severity, where, f"the smaller class has {min(int(y.sum()), int(y.size - y.sum()))} cells "
                           f"for {n_folds} stratified folds; use fewer --folds.")


def check_adata(adata: ad.AnnData, *, source: str = "data", keys: schema.ObsKeys | None = None,
                layer: str | None = None, needs: Literal["counts", "nonnegative", "any"] = "any",
                n_folds: int = 10, split: Literal["sample", "cell"] = "sample", strict: bool = False) -> CheckReport:
    """Check ``adata`` against the data contract and describe it.

    Parameters
    ----------
    adata
        The data (in memory or backed).
    source
        Name shown in messages (usually the file path).
    keys
        obs column names.
    layer
        Expression layer to check instead of ``X``.
    needs
        What the intended model needs: ``counts``, ``nonnegative`` or ``any``.
    n_folds, split
        The intended pooled split, to flag categories it cannot serve.
    strict
        Count fold feasibility problems as errors rather than warnings.

    Returns
    -------
    The report: ``facts`` (shape, value kind, gene id type and mapping, label balance),
    ``tables`` (balance per study, per sample, per category) and ``problems``.
    """
    keys = keys or schema.ObsKeys()
    report = CheckReport(source=source)
    report.facts["shape"] = (int(adata.n_obs), int(adata.n_vars))
    if adata.n_obs == 0 or adata.n_vars == 0:
        report.add("error", "X", f"the data has {adata.n_obs} cells and {adata.n_vars} genes; nothing to use.")
        return report
    try:
        X = schema.expression_matrix(adata, layer)
    except SchemaError as err:
        report.add("error", "layers", str(err))
        return report
    if hasattr(X, "to_memory"):
        X = X.to_memory()
    X = sp.csr_matrix(X) if sp.issparse(X) else np.asarray(X)
    report.facts.update(describe_values(X))
    if adata.obs_names.duplicated().any():
        dup = adata.obs_names[adata.obs_names.duplicated()].unique()[:3].tolist()
        report.add("error", "obs_names", f"{int(adata.obs_names.duplicated().sum())} duplicate cell names (e.g. {dup}). "
                   "Make them unique (adata.obs_names_make_unique()).")
    _matrix_problems(report, adata, X, needs)
    _gene_problems(report, adata)
    obs = adata.obs
    labels = _label_problems(report, obs, keys)
    if labels is None:
        return report
    for column in (keys.study, keys.sample, *(keys.category(k) for k in schema.CATEGORY_KINDS)):
        if column in obs:
            report.tables[column] = _balance_table(obs, column, labels)
    if keys.sample in obs:
        per_sample = report.tables[keys.sample]
        mixed = per_sample[(per_sample["sensitive"] > 0) & (per_sample["resistant"] > 0)]
        report.facts["label_design"] = (
            "per-sample (every sample has one label)" if mixed.empty
            else f"per-cell ({len(mixed)} of {len(per_sample)} samples mix both labels)")
    else:
        report.add("warning", f"obs[{keys.sample!r}]", "missing: splits cannot keep a patient out of both train and "
                   "test. Name the patient/sample column with --sample-key, or use --split cell.")
    _fold_problems(report, obs, keys, labels, n_folds, split if keys.sample in obs else "cell",
                   "error" if strict else "warning")
    return report
