"""Explain a benchmark run's fold models, each on its own test cells.

A benchmark's out-of-fold prediction of a cell comes from the fold model that never saw it. To explain
those predictions, each fold's model (retrained exactly: `scdrugmap.evaluate.refit.refit_fold_heads`) is
attributed and has genes deleted on its own test cells only, never on cells it was trained on.

`attribute_folds` samples at most ``max_cells`` of the folds' test cells (with ``seed``, over all folds
together, so each fold contributes in proportion to its test cells), attributes each fold's head on its
sampled cells (`attribute_expression` for ``pca``/``hvg``, `attribute_tokens` for token models with a
hook), stacks the attributions, and compares the folds' top-k genes (`top_k_stability`): a gene's
stability is the share of fold models that rank it among their ``k`` most attributed genes.
`delete_in_folds` measures in-silico deletion the same way and pools the folds.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import pandas as pd
import scipy.sparse as sp

from scdrugmap.errors import ConfigError
from scdrugmap.explain.attribution import (
    DELETION_COLUMNS,
    EXPRESSION_MODELS,
    Attributions,
    attribute_expression,
    attribute_tokens,
    make_predict_function,
    measure_deletion_effects,
    sample_cells,
)
from scdrugmap.explain.stability import StabilityResult, top_k_stability

if TYPE_CHECKING:
    import anndata as ad
    import numpy.typing as npt

    from scdrugmap.evaluate.refit import FoldHead
    from scdrugmap.models.base import Encoder, Progress, TorchEncoder

log = logging.getLogger(__name__)


@dataclass
class FoldAttributions:
    """Attributions of every fold model on its own sampled test cells.

    Attributes
    ----------
    attributions
        The folds' attributions stacked (rows: the sampled cells, fold after fold; columns: the union of
        the folds' genes).
    stability
        The folds' top-k genes by mean |attribution| over their own cells, compared (`top_k_stability`,
        one ranking per fold with cells).
    cells
        Per fold key, the cells attributed.
    """

    attributions: Attributions
    stability: StabilityResult
    cells: dict[str, npt.NDArray[np.str_]]


def fold_cells(folds: Sequence[FoldHead], max_cells: int | None, seed: int = 0) -> dict[str, npt.NDArray[np.str_]]:
    """Return, per fold, its test cells among at most ``max_cells`` drawn with ``seed`` over all folds' test cells."""
    owner = np.concatenate([np.full(f.test_cells.size, i) for i, f in enumerate(folds)]) if folds else np.empty(0, int)
    names = np.concatenate([f.test_cells.astype(str) for f in folds]) if folds else np.empty(0, str)
    chosen = sample_cells(names.size, max_cells, seed)
    return {f.key: names[chosen][owner[chosen] == i] for i, f in enumerate(folds)}


def stack_attributions(parts: Sequence[Attributions]) -> Attributions:
    """Return attributions of several models on disjoint cells as one: rows stacked, genes united (0 where absent).

    Raises
    ------
    ConfigError
        When ``parts`` is empty or mixes methods.
    """
    if not parts:
        msg = "no attributions to stack."
        raise ConfigError(msg)
    methods = {p.method for p in parts}
    if len(methods) > 1:
        msg = f"attributions of different methods ({', '.join(sorted(methods))}) cannot be stacked."
        raise ConfigError(msg)
    genes = list(dict.fromkeys(g for p in parts for g in p.genes.astype(str)))
    same = all(p.genes.size == len(genes) and np.array_equal(p.genes.astype(str), genes) for p in parts)
    if same and not any(sp.issparse(p.values) for p in parts):
        values: Any = np.vstack([np.asarray(p.values, dtype=np.float32) for p in parts])
    else:
        column = {g: i for i, g in enumerate(genes)}
        blocks = []
        for part in parts:
            matrix = sp.csr_matrix(part.values, dtype=np.float32).tocoo()
            where = np.array([column[g] for g in part.genes.astype(str)], dtype=np.int64)
            blocks.append(sp.csr_matrix((matrix.data, (matrix.row, where[matrix.col])),
                                        shape=(matrix.shape[0], len(genes))))
        values = sp.vstack(blocks, format="csr")
    deltas = [p.convergence_delta for p in parts]
    return Attributions(values=values, genes=np.asarray(genes, dtype=str),
                        obs_names=np.concatenate([p.obs_names.astype(str) for p in parts]),
                        probability=np.concatenate([p.probability for p in parts]).astype(np.float32),
                        method=parts[0].method,
                        convergence_delta=None if any(d is None for d in deltas) else
                        np.concatenate([np.asarray(d) for d in deltas]).astype(np.float32))


def _subset(adata: ad.AnnData, cells: npt.NDArray[np.str_]) -> ad.AnnData:
    return adata[adata.obs_names.get_indexer(cells)].copy()


def attribute_folds(adata: ad.AnnData, folds: Sequence[FoldHead], encoder: Encoder | None = None, *,
                    layer: str | None = None, max_cells: int | None = 500, top_k: int = 20, seed: int = 0,
                    n_steps: int | None = None, progress: Progress | None = None) -> FoldAttributions:
    """Attribute each fold's head on its own sampled test cells; compare the folds' top-k genes.

    Parameters
    ----------
    adata
        The cells of the run (every fold's test cells among them).
    folds
        The fold models with their test cells (`scdrugmap.evaluate.refit.refit_fold_heads`).
    encoder
        The loaded token model (token heads only; ``pca``/``hvg`` heads carry their whole path).
    layer
        Expression layer the models read.
    max_cells
        Cells attributed over all folds (drawn with ``seed``; None: every test cell).
    top_k
        Genes per fold compared for the stability.
    seed
        Seed of the cell sample.
    n_steps
        Integrated-gradients steps (None: the attribution function's default).
    progress
        Called with (folds done, folds).

    Returns
    -------
    `FoldAttributions`.

    Raises
    ------
    ConfigError
        When the heads are of a token model without an attribution hook (`token_attribution_hook`), or
        no encoder is given for them.
    """
    start = time.perf_counter()
    chosen = fold_cells(folds, max_cells, seed)
    steps: dict[str, Any] = {} if n_steps is None else {"n_steps": int(n_steps)}
    parts, rankings = [], {}
    for done, fold in enumerate(folds, start=1):
        cells = chosen[fold.key]
        if cells.size:
            subset = _subset(adata, cells)
            if fold.head.model in EXPRESSION_MODELS:
                part = attribute_expression(subset, fold.head, layer=layer, max_cells=None, seed=seed, **steps)
            else:
                if encoder is None:
                    msg = f"attributing {fold.head.model} fold heads needs the loaded encoder (encoder=)."
                    raise ConfigError(msg)
                part = attribute_tokens(cast("TorchEncoder", encoder), subset, fold.head, layer=layer, max_cells=None,
                                        seed=seed, **steps)
            parts.append(part)
            rankings[fold.key] = part.top_genes(top_k)
        if progress is not None:
            progress(done, len(folds))
    stacked = stack_attributions(parts)
    log.info("attributed %d fold models on %d of their test cells in %.1fs", len(rankings), len(stacked.obs_names),
             time.perf_counter() - start)
    return FoldAttributions(attributions=stacked, stability=top_k_stability(rankings, top_k), cells=chosen)


def delete_in_folds(adata: ad.AnnData, folds: Sequence[FoldHead], encoder: Encoder, genes: Sequence[str],
                    cells: dict[str, npt.NDArray[np.str_]], *, layer: str | None = None,
                    genes_per_call: int | None = None, progress: Progress | None = None) -> pd.DataFrame:
    """Delete ``genes`` one at a time in each fold's ``cells`` and pool the change in P(sensitive) over folds.

    Each fold's head scores its own cells (`make_predict_function`); per gene, the folds' means are pooled
    weighted by their cells expressing the gene (``deletion_delta``) or all their cells
    (``deletion_delta_all``), and the SD from the pooled sums. ``genes_per_call`` as in
    `measure_deletion_effects` (1 for a model whose output for a cell depends on the other cells given).

    Returns
    -------
    One row per gene, columns `DELETION_COLUMNS` (see `measure_deletion_effects`), ordered by
    |deletion_delta|.
    """
    parts = []
    for done, fold in enumerate(folds, start=1):
        chosen = cells.get(fold.key, np.empty(0, str))
        if chosen.size:
            predict = make_predict_function(encoder, fold.head, layer=layer)
            parts.append(measure_deletion_effects(_subset(adata, chosen), predict, genes=list(genes), layer=layer,
                                                  max_cells=None, max_genes=None, genes_per_call=genes_per_call))
        if progress is not None:
            progress(done, len(folds))
    if not parts:
        return pd.DataFrame(columns=list(DELETION_COLUMNS))
    frame = pd.concat(parts, ignore_index=True)
    n = frame["n_expressing"].to_numpy(dtype=np.float64)
    mean = frame["deletion_delta"].fillna(0.0).to_numpy()
    sd = frame["deletion_sd"].fillna(0.0).to_numpy()
    frame = frame.assign(_sum=mean * n, _square=(sd**2 * np.maximum(n - 1, 0) + mean**2 * n),
                         _all=frame["deletion_delta_all"] * frame["n_cells"])
    pooled = frame.groupby("gene", sort=False).agg(_sum=("_sum", "sum"), _square=("_square", "sum"),
                                                   _all=("_all", "sum"), n_expressing=("n_expressing", "sum"),
                                                   n_cells=("n_cells", "sum"))
    n_total = pooled["n_expressing"].to_numpy(dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        delta = np.where(n_total > 0, pooled["_sum"].to_numpy() / n_total, np.nan)
        variance = (pooled["_square"].to_numpy() - n_total * delta**2) / np.maximum(n_total - 1, 1)
    result = pd.DataFrame({"gene": pooled.index.astype(str).to_numpy(), "deletion_delta": delta,
                           "deletion_sd": np.where(n_total >= 2, np.sqrt(np.maximum(variance, 0.0)), np.nan),
                           "deletion_delta_all": (pooled["_all"] / pooled["n_cells"]).to_numpy(),
                           "n_expressing": pooled["n_expressing"].astype(int).to_numpy(),
                           "n_cells": pooled["n_cells"].astype(int).to_numpy()})
    result = result.assign(_size=-result["deletion_delta"].abs()).sort_values(["_size", "gene"], kind="stable",
                                                                              na_position="last")
    return result.drop(columns="_size").reset_index(drop=True)
