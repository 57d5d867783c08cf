"""Which gene programs a signature falls in: over-representation and rank-based enrichment, no network.

Gene sets come from a GMT file (`read_gmt`: MSigDB, Enrichr, or the simulator's planted programs), read
from disk; nothing is downloaded.

`over_representation`
    A hypergeometric test of each set's overlap with a gene list (e.g. the top genes higher in resistant
    cells) against a universe (the genes tested), with Benjamini-Hochberg q-values.
`rank_enrichment`
    GSEA preranked (gseapy's ``prerank``, Subramanian et al. 2005, PNAS 102:15545) of a signed score
    per gene (e.g. the DE ``score``: positive = higher in resistant cells), with gene-set permutations.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from scdrugmap.data.genesets import read_gmt, write_gmt
from scdrugmap.errors import ConfigError
from scdrugmap.explain.de import benjamini_hochberg

if TYPE_CHECKING:
    import numpy.typing as npt

__all__ = ["ORA_COLUMNS", "RANK_COLUMNS", "de_scores", "filter_gene_sets", "leading_genes", "over_representation",
           "rank_enrichment", "read_gmt", "write_gmt"]

log = logging.getLogger(__name__)

#: Columns of `over_representation`.
ORA_COLUMNS = ("gene_set", "size", "overlap", "expected", "fold_enrichment", "pvalue", "qvalue", "genes")
#: Columns of `rank_enrichment`.
RANK_COLUMNS = ("gene_set", "size", "enrichment_score", "nes", "pvalue", "qvalue", "leading_edge")


def filter_gene_sets(gene_sets: Mapping[str, Iterable[str]], universe: Iterable[str], *, min_size: int = 3,
                     max_size: int = 500) -> dict[str, list[str]]:
    """Return the sets restricted to ``universe``, keeping those with ``min_size``..``max_size`` genes there."""
    known = set(universe)
    kept = {}
    for name, genes in gene_sets.items():
        members = [g for g in dict.fromkeys(genes) if g in known]
        if min_size <= len(members) <= max_size:
            kept[name] = members
    return kept


def over_representation(genes: Iterable[str], gene_sets: Mapping[str, Iterable[str]], *, universe: Iterable[str],
                        min_size: int = 3, max_size: int = 500) -> pd.DataFrame:
    """Test each gene set for more of ``genes`` than chance (one-sided hypergeometric test).

    Parameters
    ----------
    genes
        The gene list (e.g. `scdrugmap.explain.de.top_genes` of one direction).
    gene_sets
        ``{name: genes}`` (`read_gmt`).
    universe
        Every gene that could have been listed (the genes tested); sets and the list are restricted to it.
    min_size, max_size
        Sets with fewer or more genes in the universe are left out.

    Returns
    -------
    One row per set, columns `ORA_COLUMNS` (``expected`` = size x listed / universe; ``genes``: the
    overlap, comma-separated), by p-value (ties: larger fold enrichment first, then name).
    """
    from scipy.stats import hypergeom

    universe = list(dict.fromkeys(str(g) for g in universe))
    listed = set(str(g) for g in genes) & set(universe)
    sets = filter_gene_sets(gene_sets, universe, min_size=min_size, max_size=max_size)
    total, drawn = len(universe), len(listed)
    rows = []
    for name, members in sets.items():
        overlap = [g for g in members if g in listed]
        expected = len(members) * drawn / total if total else float("nan")
        pvalue = float(hypergeom.sf(len(overlap) - 1, total, len(members), drawn)) if drawn else 1.0
        rows.append({"gene_set": name, "size": len(members), "overlap": len(overlap), "expected": expected,
                     "fold_enrichment": len(overlap) / expected if expected else float("nan"),
                     "pvalue": pvalue, "genes": ",".join(overlap)})
    table = pd.DataFrame(rows, columns=[c for c in ORA_COLUMNS if c != "qvalue"])
    table["qvalue"] = benjamini_hochberg(table["pvalue"].to_numpy(dtype=np.float64))
    table = table.sort_values(["pvalue", "fold_enrichment", "gene_set"], ascending=[True, False, True], kind="stable")
    return table.loc[:, list(ORA_COLUMNS)].reset_index(drop=True)


def de_scores(table: pd.DataFrame, *, test: str | None = None, stratum: str | None = None,
              column: str = "score") -> pd.Series:
    """Return one signed score per gene from a DE table (the row of smallest p-value where a gene repeats)."""
    rows = table
    if test is not None:
        rows = rows[rows["test"] == test]
    if stratum is not None:
        rows = rows[rows["stratum"] == stratum]
    rows = rows.dropna(subset=[column, "pvalue"]).sort_values(["pvalue", "gene"], kind="stable")
    rows = rows.drop_duplicates("gene", keep="first")
    return pd.Series(rows[column].to_numpy(dtype=np.float64), index=rows["gene"].astype(str).to_numpy(), name=column)


def rank_enrichment(scores: pd.Series | Mapping[str, float], gene_sets: Mapping[str, Iterable[str]], *,
                    n_permutations: int = 1000, seed: int = 0, min_size: int = 3, max_size: int = 500,
                    weight: float = 1.0) -> pd.DataFrame:
    """GSEA preranked: is each set concentrated at the top or the bottom of the genes ranked by ``scores``?

    Parameters
    ----------
    scores
        A signed score per gene (higher = further up the list), e.g. `de_scores` or an attribution mean.
        Genes without a finite score are left out.
    gene_sets
        ``{name: genes}``; restricted to the scored genes, then filtered by ``min_size``..``max_size``.
    n_permutations
        Gene-set permutations for the p-values.
    seed
        Permutation seed (the same seed gives the same table).
    weight
        GSEA's weight on the scores (1: the classic weighted statistic).

    Returns
    -------
    One row per set, columns `RANK_COLUMNS`: ``enrichment_score`` and ``nes`` (normalised; positive:
    concentrated at the top), nominal ``pvalue`` (at least 1 / (n_permutations + 1), never 0), ``qvalue``
    (Benjamini-Hochberg of the nominal p-values; gseapy's own FDR differs), ``leading_edge``
    (comma-separated); by p-value, then |NES|.

    Raises
    ------
    ConfigError
        When gseapy (the ``explain`` extra) is not installed, or no set is left after filtering.
    """
    try:
        import gseapy
    except ImportError as err:
        msg = "rank_enrichment needs gseapy; install the explain extra: pip install 'scdrugmap[explain]'."
        raise ConfigError(msg) from err
    start = time.perf_counter()
    series = pd.Series(scores, dtype=np.float64)
    series.index = series.index.astype(str)
    series = series[np.isfinite(series.to_numpy())]
    series = series[~series.index.duplicated(keep="first")]
    sets = filter_gene_sets(gene_sets, series.index, min_size=min_size, max_size=max_size)
    if not sets:
        msg = (f"no gene set has {min_size}..{max_size} of the {series.size} scored genes; check that the GMT and "
               "the data use the same gene names (symbols or Ensembl ids).")
        raise ConfigError(msg)
    ranked = series.sort_values(ascending=False, kind="stable")
    result = gseapy.prerank(rnk=ranked, gene_sets=sets, permutation_num=n_permutations, seed=seed, threads=1,
                            min_size=min_size, max_size=max_size, weight=weight, outdir=None, no_plot=True,
                            verbose=False).res2d
    # gseapy reports 0 when no permutation reaches the observed score; with n permutations the smallest
    # p-value that can be claimed is 1 / (n + 1) (Phipson & Smyth 2010), never 0
    pvalue = np.maximum(result["NOM p-val"].to_numpy(dtype=np.float64), 1.0 / (n_permutations + 1))
    table = pd.DataFrame({
        "gene_set": result["Term"].astype(str).to_numpy(),
        "size": [len(sets[t]) for t in result["Term"].astype(str)],
        "enrichment_score": result["ES"].to_numpy(dtype=np.float64),
        "nes": result["NES"].to_numpy(dtype=np.float64),
        "pvalue": pvalue,
        "qvalue": benjamini_hochberg(pvalue),
        "leading_edge": result["Lead_genes"].astype(str).str.replace(";", ",").to_numpy(),
    })
    table = table.assign(_strength=-table["nes"].abs()).sort_values(["pvalue", "_strength", "gene_set"],
                                                                    kind="stable")
    log.info("rank enrichment of %d sets over %d genes in %.1fs", len(sets), series.size, time.perf_counter() - start)
    return table.drop(columns="_strength").reset_index(drop=True)


def leading_genes(table: pd.DataFrame, gene_set: str) -> npt.NDArray[np.str_]:
    """Return the leading-edge (rank) or overlap (ORA) genes of one set of an enrichment table."""
    column = "leading_edge" if "leading_edge" in table else "genes"
    value = table.loc[table["gene_set"] == gene_set, column]
    return np.array([g for g in str(value.iloc[0]).split(",") if g], dtype=str) if len(value) else np.array([], str)
