"""Check a data set against the data contract and describe it, as ``scdrugmap check`` shows it.

`check_adata` never raises for bad data: it collects `Problem` lines (errors and
warnings) and facts, so a user sees every problem at once.

The expression matrix is read once, in blocks (`count_matrix`), so a backed file
(``read_h5ad(path, backed="r")``) is checked in bounded memory whatever its size.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, cast

import numpy as np
import pandas as pd
import scipy.sparse as sp

from scdrugmap.data import schema
from scdrugmap.data.confounders import label_coincidences, text_codes
from scdrugmap.errors import SchemaError

if TYPE_CHECKING:
    import anndata as ad

log = logging.getLogger(__name__)

Severity = Literal["error", "warning"]
#: Inverse transforms tried to name the scale of log-transformed data.
LOG_BASES = {"log1p (natural)": np.e, "log2(x+1)": 2.0, "log10(x+1)": 10.0}
#: Rows read at a time by `count_matrix` (10,000 cells of a 20,000-gene count matrix: about 130 MB as CSR).
CHUNK_ROWS = 10_000
#: Most values of a dense block (rows are fewer where genes are many): 2**25 float32 values, 128 MiB.
DENSE_BLOCK_VALUES = 2**25
#: Rows `describe_values` and `schema.detect_value_kind` sample.
HEAD_ROWS = 2000
#: numpy dtype kinds an expression matrix may hold: booleans, integers, floats.
NUMERIC_KINDS = "biuf"


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


def describe_values(X: np.ndarray | sp.spmatrix, max_rows: int = HEAD_ROWS) -> dict[str, Any]:
    """Return the value kind of ``X`` and a human detail (scale of log data, row totals), from its first rows."""
    kind = schema.detect_value_kind(X)
    rows = schema.head_rows(X, max_rows)
    dense_sums = np.asarray(rows.sum(axis=1)).ravel().astype(np.float64)
    detail = ""
    if kind == "log":
        for name, base in LOG_BASES.items():
            if sp.issparse(rows):
                back = cast("sp.csr_matrix", rows).copy()  # head_rows returns CSR when sparse
                back.data = np.power(base, back.data.astype(np.float64)) - 1
                totals = np.asarray(back.sum(axis=1)).ravel()
            else:
                totals = (np.power(base, np.array(rows, dtype=np.float64)) - 1).sum(axis=1)
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


@dataclass
class MatrixCounts:
    """Facts about every value of an expression matrix, gathered in one pass by `count_matrix`."""

    n_nan: int
    n_inf: int
    n_negative: int
    #: Non-zero values per cell and per gene (NaN and inf count as non-zero; stored zeros do not).
    nonzero_per_cell: np.ndarray
    nonzero_per_gene: np.ndarray
    #: The first rows, in memory (CSR or ndarray): what `describe_values` samples.
    head: np.ndarray | sp.csr_matrix


def _layout(X) -> str:
    """Say how ``X`` is stored: ``csr``/``csc`` (scipy, or anndata's backed datasets) or ``dense``."""
    if sp.issparse(X):
        return X.format if X.format in ("csr", "csc") else "other sparse"
    return X.format if getattr(X, "format", None) in ("csr", "csc") else "dense"


def _nonzero_per_segment(nonzero: np.ndarray | None, indptr: np.ndarray) -> np.ndarray:
    """Count the True entries of each compressed row (or column) of a block, with temporaries only for the False
    (``nonzero`` None: every entry is True)."""
    indptr = np.asarray(indptr, dtype=np.int64)
    stored = np.diff(indptr)
    if nonzero is None:
        return stored
    zeros = np.flatnonzero(~nonzero)  # stored zeros: usually none
    if zeros.size:
        segment = np.searchsorted(indptr, zeros + indptr[0], side="right") - 1
        stored -= np.bincount(segment, minlength=stored.size)
    return stored


#: Indices cast to intp at a time by `_index_counts` (2 MB).
COUNT_CHUNK = 1 << 18


def _index_counts(indices: np.ndarray, length: int) -> np.ndarray:
    """Return how often each of ``0 .. length - 1`` occurs in ``indices`` (all in range): ``np.bincount``'s counts.

    bincount casts int32 indices to intp first, in a new array as large as them all (40 MB for 5 million
    values, paid in page faults); here they are cast a chunk at a time into one small array.
    """
    if indices.dtype == np.intp or indices.size <= COUNT_CHUNK:
        return np.bincount(indices, minlength=length)
    counts = np.zeros(length, dtype=np.int64)
    buffer = np.empty(COUNT_CHUNK, dtype=np.intp)
    for start in range(0, indices.size, COUNT_CHUNK):
        part = buffer[: min(COUNT_CHUNK, indices.size - start)]
        part[...] = indices[start : start + COUNT_CHUNK]
        counts += np.bincount(part, minlength=length)
    return counts


def _stored(indices: np.ndarray, nonzero: np.ndarray | None) -> np.ndarray:
    """Return the indices of the non-zero stored values (``nonzero`` None or all True: all of them)."""
    return indices if nonzero is None or nonzero.all() else indices[nonzero]


def count_matrix(X, *, chunk_rows: int = CHUNK_ROWS, head_rows: int = HEAD_ROWS) -> MatrixCounts:
    """Count NaN, inf, negative and non-zero values of ``X`` per cell and per gene, reading it once in blocks.

    Parameters
    ----------
    X
        Cells x genes, in memory (numpy, scipy sparse) or backed (an h5py dataset, or anndata's on-disk
        CSR/CSC datasets from ``read_h5ad(path, backed="r")``). Only one block is in memory at a time.
    chunk_rows
        Rows per block. Dense blocks hold at most `DENSE_BLOCK_VALUES` values (fewer rows where genes are
        many). CSC matrices (column-major, in memory or backed) are read in blocks of columns instead, as
        many as hold about the same number of cells as ``chunk_rows`` rows: slicing the rows of a backed CSC
        matrix would read all of it.
    head_rows
        Rows kept in memory for `describe_values`.
    """
    chunk_rows = max(1, int(chunk_rows))
    layout = _layout(X)
    if layout == "other sparse":  # COO, LIL, ... are in memory already and cannot be sliced by rows
        X, layout = sp.csr_matrix(X), "csr"
    n_cells, n_genes = (int(n) for n in X.shape)
    n_head = min(n_cells, head_rows)
    per_cell = np.zeros(n_cells, dtype=np.int64)
    per_gene = np.zeros(n_genes, dtype=np.int64)
    totals = {"nan": 0, "inf": 0, "negative": 0}
    head_parts: list = []

    def count_values(values: np.ndarray) -> np.ndarray | None:
        """Count NaN, inf and negative values; return which are non-zero (None: all of them)."""
        if values.size == 0:
            return values != 0
        low, high = values.min(), values.max()  # NaN propagates to both; no temporary arrays
        if low > 0 and np.isfinite(high):  # the common case (counts): nothing to count, every value non-zero
            return None
        if not (np.isfinite(low) and np.isfinite(high)):
            totals["nan"] += int(np.count_nonzero(np.isnan(values)))
            totals["inf"] += int(np.count_nonzero(np.isinf(values)))
        if not low >= 0:  # NaN compares False: count
            totals["negative"] += int(np.count_nonzero(values < 0))
        return values != 0

    def check_indices(indices: np.ndarray, bound: int, axis: str) -> None:
        if indices.size and (int(indices.min()) < 0 or int(indices.max()) >= bound):
            msg = (f"stored {axis} indices reach {int(indices.max())} (or below 0) but there are {bound} {axis}s: "
                   "the sparse matrix is damaged. Write the file again with AnnData.write_h5ad.")
            raise SchemaError(msg)

    if layout == "csc":
        step = max(1, -(-chunk_rows * n_genes // max(1, n_cells)))
        log.debug("X is stored by column (CSC): reading it in blocks of %d genes", step)
        for start in range(0, n_genes, step):
            block = sp.csc_matrix(X[:, start : start + step])
            check_indices(block.indices, n_cells, "cell")
            nonzero = count_values(block.data)
            per_gene[start : start + block.shape[1]] = _nonzero_per_segment(nonzero, block.indptr)
            per_cell += _index_counts(_stored(block.indices, nonzero), n_cells)
            if n_head:
                head_parts.append(block[:n_head])
        head = sp.hstack(head_parts, format="csr") if head_parts else sp.csr_matrix((n_head, n_genes))
        return MatrixCounts(totals["nan"], totals["inf"], totals["negative"], per_cell, per_gene,
                            sp.csr_matrix(head))

    if layout == "dense":
        chunk_rows = min(chunk_rows, max(1, DENSE_BLOCK_VALUES // max(1, n_genes)))
    for start in range(0, n_cells, chunk_rows):
        if layout == "csr":
            data, indices, indptr = schema.csr_rows(X, start, start + chunk_rows)  # only read here
            check_indices(indices, n_genes, "gene")
            nonzero = count_values(data)
            per_cell[start : start + indptr.size - 1] = _nonzero_per_segment(nonzero, indptr)
            per_gene += _index_counts(_stored(indices, nonzero), n_genes)
            if start < n_head:  # copies, not views pinning the whole block
                rows = min(n_head - start, indptr.size - 1)
                end = int(indptr[rows])
                head_parts.append(sp.csr_matrix((data[:end].copy(), indices[:end].copy(), indptr[: rows + 1].copy()),
                                                shape=(rows, n_genes)))
            continue
        block = np.asarray(schema.row_block(X, start, start + chunk_rows))  # dense: a view where in memory
        nonzero = count_values(block)
        per_cell[start : start + block.shape[0]] = block.shape[1] if nonzero is None else nonzero.sum(axis=1)
        per_gene += block.shape[0] if nonzero is None else nonzero.sum(axis=0)
        if start < n_head:  # a copy, not a view pinning the whole block
            head_parts.append(block[: n_head - start].copy())
    if layout == "csr":
        head = sp.csr_matrix(sp.vstack(head_parts, format="csr")) if head_parts else sp.csr_matrix((0, n_genes))
    else:
        head = np.concatenate(head_parts) if head_parts else np.zeros((0, n_genes))
    return MatrixCounts(totals["nan"], totals["inf"], totals["negative"], per_cell, per_gene, head)


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
    """Return cells, sensitive and resistant cells per value of ``obs[column]`` (as text, sorted).

    The frame of ``groupby(column).agg(cells=size, sensitive=sum)`` on the text values (tested equal), counted
    by `numpy.bincount` over `scdrugmap.data.confounders.text_codes`: a tenth of the time, paid by ``check``
    for six columns.
    """
    codes, values = text_codes(obs[column])
    cells = np.bincount(codes, minlength=values.size).astype(np.int64)
    sensitive = np.bincount(codes, weights=labels, minlength=values.size).astype(np.int64)
    return pd.DataFrame({"cells": cells, "sensitive": sensitive, "resistant": cells - sensitive},
                        index=pd.Index(values, name=column))


def _value_problems(report: CheckReport, counts: MatrixCounts, needs: str) -> bool:
    """Add NaN, inf and value-kind problems (what the model ``needs``); return False when values are not finite."""
    where = report.facts.get("matrix", "X")
    if counts.n_nan or counts.n_inf:
        report.add("error", where, f"{counts.n_nan} NaN and {counts.n_inf} inf values. Replace them (e.g. with 0) "
                   "or drop those cells.")
        return False
    kind = report.facts["value_kind"]
    if needs == "counts" and kind != "counts":
        report.add("error", where, f"the model needs raw counts but the values look {kind}. Pass the raw counts "
                   "(--layer).")
    elif needs == "nonnegative" and counts.n_negative:
        report.add("error", where, f"{counts.n_negative} negative values; the model ranks non-negative expression. "
                   "Pass counts or normalised expression (--layer).")
    return True


def _empty_problems(report: CheckReport, adata: ad.AnnData, counts: MatrixCounts) -> None:
    empty_cells = np.flatnonzero(counts.nonzero_per_cell == 0)
    if empty_cells.size:
        names = ", ".join(map(str, adata.obs_names[empty_cells[:3]]))
        report.add("error", "X", f"{empty_cells.size} cells have no expressed gene (e.g. {names}). Filter them out.")
    empty_genes = np.flatnonzero(counts.nonzero_per_gene == 0)
    if empty_genes.size:
        names = ", ".join(map(str, adata.var_names[empty_genes[:3]]))
        report.add("warning", "var", f"{empty_genes.size} genes are zero in every cell (e.g. {names}); "
                   "they carry no information (filter them with scanpy.pp.filter_genes).")


def _duplicate_problems(report: CheckReport, adata: ad.AnnData) -> None:
    """Add an error for duplicate cell names and one for duplicate gene names."""
    if adata.obs_names.duplicated().any():
        dup = adata.obs_names[adata.obs_names.duplicated()].unique()[:3].tolist()
        report.add("error", "obs_names", f"{int(adata.obs_names.duplicated().sum())} duplicate cell names (e.g. {dup}). "
                   "Make them unique (adata.obs_names_make_unique()).")
    names = adata.var_names.astype(str)
    if names.duplicated().any():
        dup = names[names.duplicated()].unique()[:3].tolist()
        report.add("error", "var_names", f"{int(names.duplicated().sum())} duplicate gene names (e.g. {dup}). "
                   "Sum or drop duplicates (adata.var_names_make_unique() keeps them apart).")


def numeric_problem(X) -> str | None:
    """Return why ``X`` (in memory or backed) cannot hold expression values, or None when its dtype is numeric."""
    dtype = np.dtype(getattr(X, "dtype", np.float32))
    if dtype.kind not in NUMERIC_KINDS:
        return f"holds {dtype} values, not numbers. Store expression as integers or floats."
    return None


def matrix_report(adata: ad.AnnData, *, source: str = "data", layer: str | None = None,
                  needs: Literal["counts", "nonnegative", "any"] = "any", chunk_rows: int = CHUNK_ROWS
                  ) -> tuple[CheckReport, MatrixCounts | None]:
    """Check the matrix and the names of ``adata`` (shape, dtype, NaN, inf, value kind, duplicates), reading it once.

    The first part of `check_adata`, and what the validation gate (`scdrugmap.data.gate`) runs before any
    command or `scdrugmap.tl` function reads the data: one code for both.

    Returns
    -------
    The report (facts ``shape``, ``matrix``, ``value_kind``, ``value_detail``; errors) and the counts
    (None when the matrix could not be read).
    """
    report = CheckReport(source=source)
    report.facts["shape"] = (int(adata.n_obs), int(adata.n_vars))
    if adata.n_obs == 0 or adata.n_vars == 0:
        report.add("error", "X", f"the data has {adata.n_obs} cells and {adata.n_vars} genes; nothing to use.")
        return report, None
    try:
        X = schema.expression_matrix(adata, layer)
    except SchemaError as err:
        report.add("error", "layers", str(err))
        return report, None
    where = f"layers[{layer!r}]" if layer else "X"
    report.facts["matrix"] = where
    if X is None:
        report.add("error", where, "there is no expression matrix. Store the counts in X (or name a layer with --layer).")
        return report, None
    problem = numeric_problem(X)
    if problem:
        report.add("error", where, problem)
        return report, None
    try:
        counts = count_matrix(X, chunk_rows=chunk_rows)
    except SchemaError as err:
        report.add("error", where, str(err))
        return report, None
    report.facts.update(describe_values(counts.head))
    _duplicate_problems(report, adata)
    _value_problems(report, counts, needs)
    return report, counts


def _gene_problems(report: CheckReport, adata: ad.AnnData) -> None:
    import anndata as ad

    from scdrugmap.data.genes import harmonise_genes

    names = adata.var_names.astype(str)
    if names.duplicated().any():  # reported by _duplicate_problems; ids cannot be mapped one to one
        return
    genes_only = ad.AnnData(obs=pd.DataFrame(index=["_"]), var=adata.var.copy())
    try:  # non-human Ensembl ids, or two names of one gene: an error of the report
        harmonise_genes(genes_only)
    except SchemaError as err:
        report.add("error", "var_names", str(err))
        return
    id_type = genes_only.uns["scdrugmap"]["genes"]["id_type"]  # as harmonise_genes detected it
    report.facts["gene_id_type"] = id_type
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
    # samples as integer codes, once: counting distinct ones per value and class then sorts integers, not text
    samples = pd.factorize(obs[keys.sample])[0] if split == "sample" and keys.sample in obs else None
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
            if samples is not None:
                units = samples[rows]
                per_class = [np.unique(units[y == c]).size for c in (0, 1)]
                n_samples = np.unique(units).size
                if min(per_class) < 2:  # a sample may hold cells of both labels: it counts for each
                    report.add(severity, where, f"{n_samples} sample{'s' if n_samples != 1 else ''}: "
                               f"{per_class[1]} with sensitive cells, {per_class[0]} with resistant cells; a "
                               "sample-grouped split needs at least 2 of each. Use --split cell to split cells.")
                elif n_samples < n_folds:
                    report.add(severity, where, f"{n_samples} samples for {n_folds} grouped folds; "
                               f"use --folds {n_samples} or fewer.")
            elif min(int(y.sum()), int(y.size - y.sum())) < n_folds:
                report.add(severity, where, f"the smaller class has {min(int(y.sum()), int(y.size - y.sum()))} cells "
                           f"for {n_folds} stratified folds; use fewer --folds.")


def check_adata(adata: ad.AnnData, *, source: str = "data", keys: schema.ObsKeys | None = None,
                layer: str | None = None, needs: Literal["counts", "nonnegative", "any"] = "any",
                n_folds: int = 10, split: Literal["sample", "cell"] = "sample", strict: bool = False,
                chunk_rows: int = CHUNK_ROWS) -> CheckReport:
    """Check ``adata`` against the data contract and describe it.

    Parameters
    ----------
    adata
        The data, in memory or backed (``read_h5ad(path, backed="r")``): the expression matrix is read once in
        blocks of ``chunk_rows`` rows (`count_matrix`), so a backed file is checked in bounded memory.
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
    chunk_rows
        Rows read at a time (see `count_matrix`).

    Returns
    -------
    The report: ``facts`` (shape, value kind, gene id type and mapping, label balance),
    ``tables`` (balance per study, per sample, per category) and ``problems``.
    """
    keys = keys or schema.ObsKeys()
    report, counts = matrix_report(adata, source=source, layer=layer, needs=needs, chunk_rows=chunk_rows)
    if counts is None:
        return report
    if report.facts.get("value_kind") != "nonfinite" and counts.n_nan + counts.n_inf == 0:
        _empty_problems(report, adata, counts)
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
    for coincidence in label_coincidences(obs, labels, keys):  # samples, cell lines, sublines with one label each
        report.add("warning", f"obs[{coincidence.column!r}]", coincidence.message())
    return report
