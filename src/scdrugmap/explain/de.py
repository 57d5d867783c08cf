"""Differential expression between resistant and sensitive cells, observed or predicted.

Two tests, and the output says which one produced each row:

``wilcoxon``
    scanpy's ``rank_genes_groups`` (Wilcoxon rank-sum, tie-corrected) on log-normalised expression, within
    each cell type when a cell-type key is given. Cells are the replicates, so where labels are given per
    sample (patient) this test is pseudoreplicated: its p-values are far too small.
``pseudobulk``
    pydeseq2 (DESeq2's negative-binomial Wald test) on raw counts summed per sample and group (and per
    cell type when a cell-type key is given), where each group has at least ``min_samples`` pseudobulk
    samples. Samples are the replicates. This is the default when labels are constant within each sample.

Fold changes are resistant over sensitive (``log2fc > 0``: higher in resistant cells); ``qvalue`` is the
Benjamini-Hochberg adjustment of ``pvalue`` within one comparison, stratum and test.

Counts and other values
-----------------------
DESeq2 models integer counts, so pseudobulk needs raw UMI counts in ``X`` or ``layer``. Log-normalised,
z-scored, TPM or other non-integer values make `differential_expression` raise `SchemaError` naming what
was found, unless ``non_counts="wilcoxon"``: then the Wilcoxon test runs instead (a warning is logged and
the ``test`` column says ``wilcoxon``). The Wilcoxon test log-normalises counts, TPM and normalised values
(10,000 per cell, log1p, as the baselines do) and takes log values as they are; for z-scored or other
signed values the ranks are still valid but a fold change is not defined, so ``log2fc`` is NaN there.
"""

from __future__ import annotations

import logging
import re
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd
import scipy.sparse as sp

from scdrugmap.data import schema
from scdrugmap.data.schema import detect_value_kind, expression_matrix
from scdrugmap.errors import ConfigError, SchemaError

if TYPE_CHECKING:
    import anndata as ad
    import numpy.typing as npt

    from scdrugmap.models.base import Progress

log = logging.getLogger(__name__)

Test = Literal["auto", "wilcoxon", "pseudobulk", "both"]
#: Columns of the table `differential_expression` returns, in order.
DE_COLUMNS = ("gene", "comparison", "stratum", "test", "log2fc", "pvalue", "qvalue", "score", "n_resistant",
              "n_sensitive")
#: Stratum name when no cell-type key is given.
ALL_CELLS = "all"
#: Group names, in the direction of every fold change (first over second).
GROUPS = (schema.RESISTANT, schema.SENSITIVE)
#: Value kinds that are log-normalised before the Wilcoxon test (as `scdrugmap.models.baselines.log_normalise`).
UNLOGGED_KINDS = frozenset({"counts", "tpm", "normalised"})
#: Value kinds for which a fold change is defined (non-negative expression).
FOLD_CHANGE_KINDS = frozenset({"counts", "tpm", "normalised", "log"})


def benjamini_hochberg(pvalues: npt.ArrayLike) -> npt.NDArray[np.float64]:
    """Return Benjamini-Hochberg q-values; NaN p-values stay NaN and do not count as tests."""
    p = np.asarray(pvalues, dtype=np.float64)
    q = np.full(p.shape, np.nan)
    finite = np.flatnonzero(np.isfinite(p))
    if finite.size:
        order = finite[np.argsort(p[finite], kind="stable")]
        ranked = p[order] * finite.size / np.arange(1, finite.size + 1)
        q[order] = np.minimum(1.0, np.minimum.accumulate(ranked[::-1])[::-1])
    return q


def response_groups(values: npt.ArrayLike, *, column: str = schema.RESPONSE) -> npt.NDArray[np.object_]:
    """Return ``"resistant"``/``"sensitive"`` per cell from labels (sensitive/resistant, 1/0, ...); None where missing.

    Raises
    ------
    SchemaError
        When a present value is not an accepted label spelling (see `scdrugmap.data.schema.LABEL_CODES`).
    """
    series = pd.Series(np.asarray(values, dtype=object))
    missing = series.isna().to_numpy()
    out = np.full(series.size, None, dtype=object)
    if (~missing).any():
        codes = schema.encode_labels(series[~missing].to_numpy(), column=column)
        out[~missing] = np.where(codes == 1, schema.SENSITIVE, schema.RESISTANT)
    return out


def predicted_groups(probability: npt.ArrayLike, *, threshold: float = 0.5) -> npt.NDArray[np.object_]:
    """Return the predicted group per cell: sensitive where P(sensitive) >= ``threshold``; None where NaN."""
    p = np.asarray(probability, dtype=np.float64)
    out = np.where(p >= threshold, schema.SENSITIVE, schema.RESISTANT).astype(object)
    out[np.isnan(p)] = None
    return out


def labels_are_per_sample(groups: npt.ArrayLike, samples: npt.ArrayLike) -> bool:
    """Whether every sample's labelled cells share one label (then cells are not independent replicates)."""
    frame = pd.DataFrame({"group": np.asarray(groups, dtype=object), "sample": np.asarray(samples, dtype=object)})
    frame = frame.dropna()
    return bool(frame.empty or frame.groupby("sample", sort=False)["group"].nunique().max() <= 1)


def label_groups(adata: ad.AnnData, labels: npt.ArrayLike | None = None,
                 label_key: str = schema.RESPONSE) -> npt.NDArray[np.object_]:
    """Return each cell's group (resistant/sensitive, None where unlabelled) from ``labels`` or ``obs[label_key]``."""
    if labels is None:
        if label_key not in adata.obs:
            msg = (f"obs has no {label_key!r} column; columns present: {list(adata.obs.columns)[:10]}. "
                   "Name the label column (label_key=) or pass labels=.")
            raise SchemaError(msg)
        return response_groups(adata.obs[label_key].to_numpy(), column=label_key)
    values = np.asarray(labels, dtype=object)
    if values.shape != (adata.n_obs,):
        msg = f"labels has shape {values.shape}; expected one label per cell, ({adata.n_obs},)."
        raise SchemaError(msg)
    return response_groups(values, column="labels")


def _obs_column(adata: ad.AnnData, key: str, what: str) -> npt.NDArray[np.object_]:
    if key not in adata.obs:
        msg = f"obs has no {key!r} column for the {what}; columns present: {list(adata.obs.columns)[:10]}."
        raise SchemaError(msg)
    return adata.obs[key].astype(str).to_numpy().astype(object)


def _strata(adata: ad.AnnData, cell_type_key: str | None) -> npt.NDArray[np.object_]:
    if cell_type_key is None:
        return np.full(adata.n_obs, ALL_CELLS, dtype=object)
    return _obs_column(adata, cell_type_key, "cell types")


def _choose_tests(test: Test, groups: np.ndarray, samples: np.ndarray | None, min_samples: int,
                  min_cells: int) -> list[str]:
    if test == "both":
        return ["wilcoxon", "pseudobulk"]
    if test in ("wilcoxon", "pseudobulk"):
        return [test]
    if test != "auto":
        msg = f"test={test!r}; expected 'auto', 'wilcoxon', 'pseudobulk' or 'both'."
        raise ConfigError(msg)
    if samples is None:
        return ["wilcoxon"]
    per_sample = labels_are_per_sample(groups, samples)
    labelled = np.array([g is not None for g in groups])
    # only samples of min_cells cells or more make a pseudobulk sample (as `_pseudobulk` keeps them)
    n_samples = {}
    for g in GROUPS:
        _, sizes = np.unique(samples[labelled & (groups == g)].astype(str), return_counts=True)
        n_samples[g] = int((sizes >= min_cells).sum())
    if per_sample and min(n_samples.values()) >= min_samples:
        return ["pseudobulk"]
    if per_sample:
        log.warning("labels are per sample but a group has fewer than %d samples of >= %d cells (%s); using the "
                    "Wilcoxon test, whose cells are pseudoreplicates: treat its p-values as descriptive",
                    min_samples, min_cells, n_samples)
    return ["wilcoxon"]


def differential_expression(
    adata: ad.AnnData,
    *,
    labels: npt.ArrayLike | None = None,
    label_key: str = schema.RESPONSE,
    sample_key: str | None = schema.SAMPLE,
    cell_type_key: str | None = None,
    test: Test = "auto",
    layer: str | None = None,
    comparison: str = "observed",
    covariates: Sequence[str] | None = None,
    min_cells: int = 10,
    min_samples: int = 2,
    min_gene_counts: int = 10,
    non_counts: Literal["raise", "wilcoxon"] = "raise",
    progress: Progress | None = None,
) -> pd.DataFrame:
    """Test every gene for a difference between resistant and sensitive cells.

    Parameters
    ----------
    adata
        Cells x genes; expression in ``X`` or ``layers[layer]`` (raw counts for pseudobulk).
    labels
        One label per cell (sensitive/resistant, 1/0, or None to leave a cell out), e.g.
        `predicted_groups` of a head's probabilities; default: ``obs[label_key]``.
    label_key
        obs column of the observed labels, read when ``labels`` is None.
    sample_key
        obs column of the sample (patient); needed for pseudobulk, and for ``auto`` to see whether
        labels are per sample. None: no samples (Wilcoxon only).
    cell_type_key
        obs column of cell types: each test then runs within each cell type (the ``stratum`` column).
    test
        ``auto`` (pseudobulk when labels are constant within each sample and each group has
        ``min_samples`` samples, else Wilcoxon), ``wilcoxon``, ``pseudobulk`` or ``both``.
    layer
        Expression layer to read (``X`` when None).
    comparison
        Written to the ``comparison`` column (e.g. ``observed``, ``predicted``).
    covariates
        obs columns added to the pseudobulk design before the group (``~ covariates + group``). None
        (default): the study (``obs['study']``) when it has two or more levels there and leaves the design
        full rank, and the sample when labels vary within samples (predicted labels: a paired design).
        An empty sequence: no covariate.
    min_cells
        Fewest cells for a pseudobulk sample, and for each group of a Wilcoxon stratum.
    min_samples
        Fewest pseudobulk samples per group for a pseudobulk stratum.
    min_gene_counts
        Pseudobulk tests a gene only where it has at least this many counts in at least as many pseudobulk
        samples as the smaller group has (edgeR's ``filterByExpr`` rule, simplified); other genes get NaN
        p-values and do not count in the BH adjustment. Nearly silent genes carry no power and their
        Wald p-values are the least reliable.
    non_counts
        What pseudobulk does with values that are not raw counts: ``raise`` (`SchemaError`) or
        ``wilcoxon`` (run the Wilcoxon test in its place, with a warning).
    progress
        Called with (strata done, strata in all).

    Returns
    -------
    One row per gene, comparison, stratum and test, columns `DE_COLUMNS`: ``gene``, ``comparison``,
    ``stratum`` (cell type, or ``all``), ``test`` (``wilcoxon`` or ``pseudobulk``), ``log2fc``
    (resistant over sensitive), ``pvalue``, ``qvalue`` (BH within comparison, stratum and test), ``score``
    (signed statistic: Wilcoxon z or DESeq2 Wald statistic, positive = higher in resistant) and
    ``n_resistant``/``n_sensitive`` (cells, or pseudobulk samples). Rows are sorted by test, stratum and
    p-value. Strata left out (too few cells or samples) are listed with the reason in
    ``table.attrs["skipped"]``; the pseudobulk design of each stratum is in ``table.attrs["designs"]``.

    Raises
    ------
    SchemaError
        For missing columns, unreadable labels, or non-count values with pseudobulk (see ``non_counts``).
    ConfigError
        For an unknown test, or covariates that make the design rank deficient.
    """
    start = time.perf_counter()
    groups = label_groups(adata, labels, label_key)
    samples = None if sample_key is None or sample_key not in adata.obs else _obs_column(adata, sample_key, "samples")
    if sample_key is not None and samples is None and test in ("pseudobulk", "both"):
        msg = f"pseudobulk needs samples, but obs has no {sample_key!r} column. Name it with sample_key=."
        raise SchemaError(msg)
    tests = _choose_tests(test, groups, samples, min_samples, min_cells)
    strata = _strata(adata, cell_type_key)
    X = expression_matrix(adata, layer)
    if hasattr(X, "to_memory"):
        X = X.to_memory()
    kind = detect_value_kind(X)
    if "pseudobulk" in tests and kind != "counts":
        where = f"layers[{layer!r}]" if layer else "X"
        if non_counts == "raise":
            msg = (f"pseudobulk (DESeq2) sums raw integer counts per sample, but {where} looks {kind}. "
                   "Pass the raw UMI counts (layer='counts'), or use test='wilcoxon' "
                   "(non_counts='wilcoxon' runs it in place of pseudobulk).")
            raise SchemaError(msg)
        log.warning("%s looks %s, not raw counts: running the Wilcoxon test in place of pseudobulk", where, kind)
        tests = list(dict.fromkeys("wilcoxon" if t == "pseudobulk" else t for t in tests))
    log.info("differential expression (%s, %s) on %d cells: %s", comparison, ", ".join(tests), adata.n_obs,
             "within each " + cell_type_key if cell_type_key else "all cells")
    genes = np.asarray(adata.var_names.astype(str))
    levels = list(dict.fromkeys(strata[[g is not None for g in groups]]))
    frames, skipped, designs = [], {}, {}
    total, done = len(levels) * len(tests), 0
    for name in tests:
        for level in levels:
            in_stratum = strata == level
            if name == "wilcoxon":
                frame, reason = _wilcoxon(X, kind, groups, in_stratum, genes, min_cells)
            else:
                frame, reason, design = _pseudobulk(adata, X, groups, samples, in_stratum, genes, min_cells=min_cells,
                                                    min_samples=min_samples, min_gene_counts=min_gene_counts,
                                                    covariates=covariates)
                if design:
                    designs[str(level)] = design
            if frame is None:
                skipped[f"{name}:{level}"] = reason
                log.info("%s in stratum %r left out: %s", name, level, reason)
            else:
                frames.append(frame.assign(stratum=str(level), test=name))
            done += 1
            if progress is not None:
                progress(done, total)
    table = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=list(DE_COLUMNS))
    table["comparison"] = comparison
    table = table.sort_values(["test", "stratum", "pvalue"], kind="stable", na_position="last")
    table = table.loc[:, list(DE_COLUMNS)].reset_index(drop=True)
    table.attrs.update(skipped=skipped, designs=designs, value_kind=kind)
    log.info("    finished differential expression in %.1fs (%d rows)", time.perf_counter() - start, len(table))
    return table


# --- Wilcoxon ---------------------------------------------------------------------------------------------

@contextmanager
def _keep_torch_threads() -> Iterator[None]:
    """Restore torch's thread count after scanpy's numba kernels, which can change it.

    numba's OpenMP layer and torch share libgomp: starting numba's pool (scanpy's Wilcoxon does) sets the
    process-wide OpenMP thread count, so a caller's ``torch.set_num_threads(1)`` silently became 2 again
    (attribution after DE ran several times slower on 2 shared cores). torch is not imported here.
    """
    torch = sys.modules.get("torch")
    before = torch.get_num_threads() if torch is not None else None
    try:
        yield
    finally:
        if torch is not None and torch.get_num_threads() != before:
            torch.set_num_threads(before)


def _wilcoxon(X, kind: str, groups: np.ndarray, in_stratum: np.ndarray, genes: np.ndarray,
              min_cells: int) -> tuple[pd.DataFrame | None, str]:
    import anndata as ad
    import scanpy as sc

    from scdrugmap.models.baselines import log_normalise

    rows = np.flatnonzero(in_stratum & np.array([g is not None for g in groups]))
    counts = {g: int((groups[rows] == g).sum()) for g in GROUPS}
    if min(counts.values()) < max(2, min_cells):  # a rank test needs two cells a group at least
        return None, f"fewer than {max(2, min_cells)} cells in a group ({counts})"
    values = X[rows]
    values = log_normalise(values, kind) if kind in UNLOGGED_KINDS else values
    obs = pd.DataFrame({"group": pd.Categorical(groups[rows].astype(str), categories=list(GROUPS))})
    obs.index = obs.index.astype(str)
    cells = ad.AnnData(X=sp.csr_matrix(values, dtype=np.float32) if sp.issparse(values) else
                       np.asarray(values, dtype=np.float32), obs=obs, var=pd.DataFrame(index=genes))
    with _keep_torch_threads():
        sc.tl.rank_genes_groups(cells, "group", groups=[schema.RESISTANT], reference=schema.SENSITIVE,
                                method="wilcoxon", tie_correct=True, use_raw=False, key_added="scdrugmap_de")
    result = sc.get.rank_genes_groups_df(cells, group=schema.RESISTANT, key="scdrugmap_de")
    log2fc = result["logfoldchanges"].to_numpy(dtype=np.float64) if kind in FOLD_CHANGE_KINDS else np.nan
    frame = pd.DataFrame({"gene": result["names"].astype(str).to_numpy(), "log2fc": log2fc,
                          "pvalue": result["pvals"].to_numpy(dtype=np.float64),
                          "score": result["scores"].to_numpy(dtype=np.float64),
                          "n_resistant": counts[schema.RESISTANT], "n_sensitive": counts[schema.SENSITIVE]})
    frame["qvalue"] = benjamini_hochberg(frame["pvalue"])
    return frame, ""


# --- pseudobulk -------------------------------------------------------------------------------------------

def pseudobulk_counts(X, keys: pd.DataFrame) -> tuple[npt.NDArray[np.int64], pd.DataFrame]:
    """Sum the rows of ``X`` per distinct row of ``keys``; return (integer sums, keys with ``n_cells``).

    Raises
    ------
    SchemaError
        When a sum is not a whole number (the matrix does not hold counts).
    """
    codes, uniques = pd.MultiIndex.from_frame(keys.astype(str)).factorize()
    n = len(uniques)
    indicator = sp.csr_matrix((np.ones(len(codes)), (codes, np.arange(len(codes)))), shape=(n, len(codes)))
    sums = indicator @ (X if sp.issparse(X) else np.asarray(X))
    sums = sums.toarray() if sp.issparse(sums) else np.asarray(sums)
    rounded = np.rint(sums)
    if not np.allclose(sums, rounded, rtol=0, atol=1e-3):
        msg = "pseudobulk sums are not whole numbers: the matrix does not hold raw counts. Pass layer='counts'."
        raise SchemaError(msg)
    frame = uniques.to_frame(index=False)
    frame.columns = list(keys.columns)
    frame["n_cells"] = np.bincount(codes, minlength=n)
    return rounded.astype(np.int64), frame


def _safe(name: str) -> str:
    return "c_" + re.sub(r"\W", "_", name)


def _full_rank(meta: pd.DataFrame, factors: list[str]) -> bool:
    design = pd.get_dummies(meta[factors].astype(str), drop_first=True, dtype=float)
    matrix = np.column_stack([np.ones(len(meta)), design.to_numpy()]) if design.shape[1] else np.ones((len(meta), 1))
    return bool(np.linalg.matrix_rank(matrix) == matrix.shape[1] and matrix.shape[0] > matrix.shape[1])


def _design_covariates(adata: ad.AnnData, meta: pd.DataFrame, covariates: Sequence[str] | None,
                       paired: bool) -> list[str]:
    if covariates is not None:
        chosen = list(covariates)
        if not _full_rank(meta, [*(_safe(c) for c in chosen), "group"]):
            msg = (f"pseudobulk design ~ {' + '.join([*chosen, 'group'])} is rank deficient here (a covariate "
                   "level holds one group only, or too few samples); drop a covariate (covariates=[]).")
            raise ConfigError(msg)
        return chosen
    candidates = [schema.SAMPLE] if paired else [schema.STUDY]
    chosen = []
    for name in candidates:
        column = _safe(name)
        if column in meta and meta[column].nunique() > 1 and _full_rank(meta, [*(_safe(c) for c in chosen), column,
                                                                               "group"]):
            chosen.append(name)
    return chosen


def _pseudobulk(adata: ad.AnnData, X, groups: np.ndarray, samples: np.ndarray | None, in_stratum: np.ndarray,
                genes: np.ndarray, *, min_cells: int, min_samples: int, min_gene_counts: int,
                covariates: Sequence[str] | None) -> tuple[pd.DataFrame | None, str, str]:
    if samples is None:
        return None, "no sample column", ""
    labelled = in_stratum & np.array([g is not None for g in groups])
    rows = np.flatnonzero(labelled)
    if rows.size == 0:
        return None, "no labelled cell", ""
    paired = not labels_are_per_sample(groups[rows], samples[rows])
    wanted = [c for c in (covariates if covariates is not None else [schema.STUDY, schema.SAMPLE])
              if c in adata.obs and c != schema.SAMPLE]
    keys = pd.DataFrame({"sample": samples[rows], "group": groups[rows].astype(str)})
    for name in wanted:
        keys[_safe(name)] = adata.obs[name].astype(str).to_numpy()[rows]
    if covariates is not None:
        missing = [c for c in covariates if c not in adata.obs and c != schema.SAMPLE]
        if missing:
            msg = f"covariates {missing} are not obs columns; columns present: {list(adata.obs.columns)[:10]}."
            raise SchemaError(msg)
    counts, meta = pseudobulk_counts(X[rows], keys)
    if (meta.groupby(["sample", "group"]).size() > 1).any():
        msg = "a sample spans several levels of a covariate; covariates must be constant within each sample."
        raise SchemaError(msg)
    meta[_safe(schema.SAMPLE)] = meta["sample"]
    keep = meta["n_cells"].to_numpy() >= min_cells
    counts, meta = counts[keep], meta[keep].reset_index(drop=True)
    n_samples = {g: int((meta["group"] == g).sum()) for g in GROUPS}
    if min(n_samples.values()) < min_samples:
        return None, f"fewer than {min_samples} pseudobulk samples of >= {min_cells} cells in a group ({n_samples})", ""
    chosen = _design_covariates(adata, meta, covariates, paired)
    factors = [*(_safe(c) for c in chosen), "group"]
    design = "~" + " + ".join(factors)
    # filterByExpr-style: a gene is tested when it has min_gene_counts in as many pseudobulks as the smaller group
    expressed = (counts >= min_gene_counts).sum(axis=0) >= min(n_samples.values())
    if not expressed.any():
        return None, f"no gene has {min_gene_counts} counts in {min(n_samples.values())} pseudobulk samples", ""
    results = _deseq2(counts[:, expressed], meta[factors], genes[expressed], design)
    results = results.reindex(genes)
    frame = pd.DataFrame({"gene": genes, "log2fc": results["log2FoldChange"].to_numpy(dtype=np.float64),
                          "pvalue": results["pvalue"].to_numpy(dtype=np.float64),
                          "score": results["stat"].to_numpy(dtype=np.float64),
                          "n_resistant": n_samples[schema.RESISTANT], "n_sensitive": n_samples[schema.SENSITIVE]})
    frame["qvalue"] = benjamini_hochberg(frame["pvalue"])
    readable = "~ " + " + ".join([*chosen, "group"])
    return frame, "", readable


def _deseq2(counts: np.ndarray, meta: pd.DataFrame, genes: np.ndarray, design: str) -> pd.DataFrame:
    """Run pydeseq2 with one BLAS thread (its many tiny per-gene fits run ~5x slower with more)."""
    from pydeseq2.dds import DeseqDataSet
    from pydeseq2.default_inference import DefaultInference
    from pydeseq2.ds import DeseqStats
    from threadpoolctl import threadpool_limits

    names = [f"pb{i}" for i in range(len(meta))]
    frame = pd.DataFrame(counts, index=names, columns=genes)
    metadata = meta.astype(str).set_axis(names)
    inference = DefaultInference(n_cpus=1)
    with threadpool_limits(limits=1, user_api="blas"):
        dds = DeseqDataSet(counts=frame, metadata=metadata, design=design, inference=inference, quiet=True)
        dds.deseq2()
        stats = DeseqStats(dds, contrast=["group", schema.RESISTANT, schema.SENSITIVE], inference=inference,
                           quiet=True)
        stats.summary()
    return stats.results_df


def top_genes(table: pd.DataFrame, k: int = 20, *, direction: Literal["both", "up", "down"] = "both",
              test: str | None = None, stratum: str | None = None) -> list[str]:
    """Return the ``k`` genes with the smallest p-values (ties: larger |score|), each gene once.

    ``direction`` ``up`` keeps genes higher in resistant cells (score > 0), ``down`` lower.
    """
    rows = table
    if test is not None:
        rows = rows[rows["test"] == test]
    if stratum is not None:
        rows = rows[rows["stratum"] == stratum]
    if direction == "up":
        rows = rows[rows["score"] > 0]
    elif direction == "down":
        rows = rows[rows["score"] < 0]
    rows = rows.dropna(subset=["pvalue"]).assign(_strength=-rows["score"].abs())
    rows = rows.sort_values(["pvalue", "_strength", "gene"], kind="stable")
    return list(dict.fromkeys(rows["gene"].astype(str)))[:k]
