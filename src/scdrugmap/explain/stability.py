"""How stable a gene signature is, and what the same analysis finds when the labels carry no signal.

Stability: the top-k genes of a ranking (differential expression, attribution, ...) recomputed on
cross-validation folds and on bootstrap resamples of samples, compared by Jaccard overlap; each gene's
``stability`` is the share of rankings that put it in the top k.

Null: `permutation_null` shuffles the labels and reruns differential expression, counting the genes that
pass the FDR threshold (there should be none, in nearly every permutation). Labels given per sample are
permuted across samples, within each study by default (a study's share of resistant samples stays as it
is, so study effects cannot pose as label effects); labels given per cell are shuffled within each sample.
Permutations are balanced by default (see `permute_labels`): shuffled labels that happen to resemble the
true ones would carry the real signal into the null.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from itertools import combinations
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd

from scdrugmap.data import schema
from scdrugmap.errors import ConfigError, SchemaError
from scdrugmap.explain.de import (
    differential_expression,
    label_groups,
    labels_are_per_sample,
    top_genes,
)

if TYPE_CHECKING:
    import anndata as ad
    import numpy.typing as npt

    from scdrugmap.models.base import Progress

log = logging.getLogger(__name__)

#: A ranking function: cells in, genes out (best first).
RankFunction = Callable[["ad.AnnData"], Sequence[str]]


@dataclass(frozen=True)
class StabilityResult:
    """Top-k overlap of several rankings of the same genes.

    Attributes
    ----------
    k
        How many top genes of each ranking were compared.
    jaccard_mean
        Mean Jaccard index over all pairs of rankings (NaN with fewer than two).
    jaccard
        Pairwise Jaccard indices (rankings x rankings, 1 on the diagonal).
    frequency
        Per gene, the share of rankings with the gene in their top k (``stability``), highest first.
    rankings
        The top-k genes of each ranking.
    """

    k: int
    jaccard_mean: float
    jaccard: pd.DataFrame
    frequency: pd.Series
    rankings: dict[str, list[str]]


def jaccard_index(first: Sequence[str], second: Sequence[str]) -> float:
    """Return |A & B| / |A | B| of two gene lists (NaN when both are empty)."""
    a, b = set(first), set(second)
    union = a | b
    return len(a & b) / len(union) if union else float("nan")


def top_k_stability(rankings: Mapping[str, Sequence[str]] | Sequence[Sequence[str]], k: int = 20) -> StabilityResult:
    """Compare the top ``k`` genes of several rankings (folds, resamples): pairwise Jaccard and per-gene frequency."""
    named = dict(rankings) if isinstance(rankings, Mapping) else {str(i): r for i, r in enumerate(rankings)}
    tops = {name: list(dict.fromkeys(str(g) for g in genes))[:k] for name, genes in named.items()}
    names = list(tops)
    matrix = pd.DataFrame(np.eye(len(names)), index=names, columns=names)
    pairs = []
    for a, b in combinations(names, 2):
        value = jaccard_index(tops[a], tops[b])
        matrix.loc[a, b] = matrix.loc[b, a] = value
        pairs.append(value)
    counts = pd.Series([g for genes in tops.values() for g in genes], dtype=object).value_counts(sort=False)
    frequency = (counts / max(1, len(names))).rename("stability")
    frequency = frequency.sort_values(ascending=False, kind="stable")
    frequency.index.name = "gene"
    mean = float(np.nanmean(pairs)) if pairs and not np.isnan(pairs).all() else float("nan")
    return StabilityResult(k=k, jaccard_mean=mean, jaccard=matrix, frequency=frequency, rankings=tops)


def de_ranking(k: int = 20, *, direction: Literal["both", "up", "down"] = "both", **options: Any) -> RankFunction:
    """Return a ranking function: `differential_expression` with ``options``, then its `top_genes`."""
    def rank(adata: ad.AnnData) -> list[str]:
        return top_genes(differential_expression(adata, **options), k, direction=direction)

    return rank


def cross_validation_stability(adata: ad.AnnData, rank: RankFunction, *, n_folds: int = 5,
                               group_key: str | None = schema.SAMPLE, label_key: str = schema.RESPONSE,
                               part: Literal["train", "test"] = "train", k: int = 20, seed: int = 0,
                               progress: Progress | None = None) -> StabilityResult:
    """Rank genes on each fold of a grouped, label-stratified k-fold split and compare the top ``k``.

    Parameters
    ----------
    adata
        Labelled cells.
    rank
        Cells -> genes, best first (e.g. `de_ranking`).
    n_folds
        Folds (as the benchmark's pooled split: `scdrugmap.evaluate.splits.assign_pooled_folds`).
    group_key
        obs column kept whole within a fold (samples); None splits cells.
    label_key
        obs column of the labels, for stratification.
    part
        Rank on each fold's training part (all other folds: the usual stability of a selection) or on its
        test part (disjoint cells, as attributions of each fold's model on its own test cells).
    k, seed, progress
        Top genes compared; split seed; called with (folds done, folds).

    Raises
    ------
    SplitError
        When the folds cannot be formed (too few samples or cells of a class).
    """
    from scdrugmap.errors import SplitError
    from scdrugmap.evaluate.splits import assign_pooled_folds

    labels = schema.encode_labels(adata.obs[label_key].to_numpy(), column=label_key)
    groups = None if group_key is None else adata.obs[group_key].astype(str).to_numpy()
    assignment, reason = assign_pooled_folds(labels, groups, n_folds=n_folds, seed=seed)
    if assignment is None:
        msg = f"cannot form {n_folds} folds: {reason}."
        raise SplitError(msg)
    rankings = {}
    for fold in range(n_folds):
        rows = np.flatnonzero((assignment != fold) if part == "train" else (assignment == fold))
        rankings[f"fold{fold}"] = list(rank(adata[rows].copy()))
        if progress is not None:
            progress(fold + 1, n_folds)
    return top_k_stability(rankings, k)


def bootstrap_stability(adata: ad.AnnData, rank: RankFunction, *, n_resamples: int = 20,
                        group_key: str | None = schema.SAMPLE, label_key: str = schema.RESPONSE, k: int = 20,
                        seed: int = 0, progress: Progress | None = None) -> StabilityResult:
    """Rank genes on bootstrap resamples and compare the top ``k``.

    Samples (``group_key``) are drawn with replacement, within each label so both groups stay
    represented; a sample drawn twice enters twice, renamed ``<sample>#<copy>`` so pseudobulk sees two
    replicates (``label_key`` names the labels to stratify by). With ``group_key`` None, cells are resampled. Resample ``i`` uses
    ``numpy.random.default_rng([seed, i])``: the same seed gives the same resamples.
    """
    groups = None if group_key is None else adata.obs[group_key].astype(str).to_numpy()
    rankings = {}
    for i in range(n_resamples):
        rng = np.random.default_rng([seed, i])
        if groups is None or group_key is None:
            rows = np.sort(rng.integers(0, adata.n_obs, adata.n_obs))
            resample = adata[rows].copy()
            resample.obs_names_make_unique()
        else:
            resample = _resample_groups(adata, groups, str(group_key), label_key, rng)
        rankings[f"resample{i}"] = list(rank(resample))
        if progress is not None:
            progress(i + 1, n_resamples)
    return top_k_stability(rankings, k)


def _resample_groups(adata: ad.AnnData, groups: np.ndarray, group_key: str, label_key: str,
                     rng: np.random.Generator) -> ad.AnnData:
    by_label = (adata.obs[label_key].astype(str).to_numpy() if label_key in adata.obs
                else np.zeros(adata.n_obs, dtype=object))
    first_label = pd.Series(by_label).groupby(groups, sort=True).first()
    chosen = []
    for _, members in first_label.groupby(first_label, sort=True):
        names = members.index.to_numpy()
        chosen.extend(rng.choice(names, size=names.size, replace=True))
    codes, uniques = pd.factorize(groups)
    order = np.argsort(codes, kind="stable")
    bounds = np.searchsorted(codes[order], np.arange(len(uniques) + 1))
    code_of = {name: i for i, name in enumerate(uniques)}
    pieces: list[np.ndarray] = []
    copy_numbers: list[np.ndarray] = []
    seen: dict[str, int] = {}
    for name in chosen:
        code = code_of[name]
        rows = order[bounds[code] : bounds[code + 1]]
        copy_numbers.append(np.full(rows.size, seen.get(name, 0)))
        seen[name] = seen.get(name, 0) + 1
        pieces.append(rows)
    rows, copy_number = np.concatenate(pieces), np.concatenate(copy_numbers)
    resample = adata[rows].copy()
    suffix = np.where(copy_number > 0, np.char.add("#", copy_number.astype(str)), "")
    resample.obs[group_key] = np.char.add(groups[rows].astype(str), suffix)
    resample.obs_names = np.char.add(np.asarray(adata.obs_names.astype(str))[rows], suffix)
    return resample


def _shuffle_block(labels: np.ndarray, rng: np.random.Generator, balanced: bool) -> np.ndarray:
    """Return a shuffle of one block's labels; balanced: true groups are mixed in proportion to their sizes."""
    if not balanced:
        return labels[rng.permutation(labels.size)]
    is_resistant = labels == schema.RESISTANT
    n, n_resistant = labels.size, int(is_resistant.sum())
    expected = n_resistant * n_resistant / n if n else 0.0  # true-resistant units kept resistant, on average
    kept = int(np.floor(expected)) + int(rng.random() < expected - np.floor(expected))
    kept = min(n_resistant, max(kept, n_resistant - (n - n_resistant)))
    out = np.full(n, schema.SENSITIVE, dtype=object)
    out[rng.choice(np.flatnonzero(is_resistant), size=kept, replace=False)] = schema.RESISTANT
    out[rng.choice(np.flatnonzero(~is_resistant), size=n_resistant - kept, replace=False)] = schema.RESISTANT
    return out


def permute_labels(groups: npt.ArrayLike, *, samples: npt.ArrayLike | None, within: npt.ArrayLike | None,
                   rng: np.random.Generator, balanced: bool = True) -> npt.NDArray[np.object_]:
    """Return shuffled labels: per-sample labels permuted across samples, per-cell labels shuffled.

    Per-sample labels (constant within each sample) are permuted across samples within each level of
    ``within`` (e.g. study); otherwise cells' labels are shuffled within each level of ``within`` (e.g.
    sample). Each block keeps its number of resistant units. Cells without a label (None) keep none.

    ``balanced`` (default) draws balanced permutations (Southworth, Kim & Owen 2009, J Comput Biol 16:625):
    in each block the shuffled resistant units are taken from the truly resistant and truly sensitive
    units in proportion to their sizes (rounded at random), so shuffled labels are uncorrelated with the
    true ones. A plain permutation of few samples often lands close to the true labelling (correlation
    0.3 with 40 samples is common), and then real effects pass as "null" discoveries.
    """
    groups = np.asarray(groups, dtype=object)
    out = groups.copy()
    labelled = np.flatnonzero([g is not None for g in groups])
    blocks = np.zeros(groups.size, dtype=object) if within is None else np.asarray(within, dtype=object)
    if samples is not None and labels_are_per_sample(groups, samples):
        samples = np.asarray(samples, dtype=object)
        table = pd.DataFrame({"sample": samples[labelled], "group": groups[labelled], "block": blocks[labelled]})
        per_sample = table.groupby("sample", sort=True).first()
        shuffled = per_sample["group"].copy()
        for _, members in per_sample.groupby("block", sort=True):
            shuffled.loc[members.index] = _shuffle_block(members["group"].to_numpy(), rng, balanced)
        out[labelled] = shuffled.loc[samples[labelled]].to_numpy()
        return out
    for _, rows in pd.Series(labelled).groupby(blocks[labelled], sort=True):
        rows = rows.to_numpy()
        out[rows] = _shuffle_block(groups[rows], rng, balanced)
    return out


def permutation_null(adata: ad.AnnData, *, n_permutations: int = 20, seed: int = 0, alpha: float = 0.05,
                     labels: npt.ArrayLike | None = None, label_key: str = schema.RESPONSE,
                     sample_key: str | None = schema.SAMPLE, within: str | None = None, balanced: bool = True,
                     progress: Progress | None = None, **options: Any) -> pd.DataFrame:
    """Rerun `differential_expression` on shuffled labels and count the genes at q < ``alpha``.

    Parameters
    ----------
    adata, labels, label_key, sample_key
        As for `differential_expression`.
    n_permutations, seed
        Permutation ``i`` uses ``numpy.random.default_rng([seed, i])``.
    alpha
        FDR threshold.
    within
        obs column inside whose levels labels are shuffled. None: the study (``obs['study']``, when
        present) for per-sample labels, the sample for per-cell labels.
    balanced
        Draw balanced permutations (see `permute_labels`), uncorrelated with the true labels.
    progress
        Called with (permutations done, permutations).
    **options
        Passed to `differential_expression` (``test``, ``layer``, ``cell_type_key``, ...).

    Returns
    -------
    One row per permutation and test: ``permutation``, ``test``, ``n_significant`` (genes with
    q < alpha in any stratum), ``min_qvalue``, ``n_genes_tested``.

    Raises
    ------
    SchemaError, ConfigError
        As `differential_expression`, and for an unknown ``within`` column.
    """
    if n_permutations < 1:
        msg = f"n_permutations={n_permutations}; expected at least 1."
        raise ConfigError(msg)
    start = time.perf_counter()
    groups = label_groups(adata, labels, label_key)
    samples = (adata.obs[sample_key].astype(str).to_numpy() if sample_key is not None and sample_key in adata.obs
               else None)
    per_sample = samples is not None and labels_are_per_sample(groups, samples)
    within_key = within if within is not None else (schema.STUDY if per_sample else sample_key)
    if within is not None and within not in adata.obs:
        msg = f"within={within!r} is not an obs column; columns present: {list(adata.obs.columns)[:10]}."
        raise SchemaError(msg)
    blocks = adata.obs[within_key].astype(str).to_numpy() if within_key and within_key in adata.obs else None
    log.info("label-permutation null: %d permutations (%s labels shuffled%s)", n_permutations,
             "per-sample" if per_sample else "per-cell", f" within {within_key}" if blocks is not None else "")
    rows = []
    for i in range(n_permutations):
        rng = np.random.default_rng([seed, i])
        shuffled = permute_labels(groups, samples=samples, within=blocks, rng=rng, balanced=balanced)
        table = differential_expression(adata, labels=shuffled, sample_key=sample_key,
                                        comparison=f"permutation{i}", **options)
        for test, part in table.groupby("test", sort=True):
            q = part["qvalue"].to_numpy(dtype=np.float64)
            rows.append({"permutation": i, "test": test,
                         "n_significant": int(part.loc[q < alpha, "gene"].nunique()),
                         "min_qvalue": float(np.nanmin(q)) if np.isfinite(q).any() else float("nan"),
                         "n_genes_tested": int(part.loc[np.isfinite(q), "gene"].nunique())})
        if progress is not None:
            progress(i + 1, n_permutations)
    result = pd.DataFrame(rows, columns=["permutation", "test", "n_significant", "min_qvalue", "n_genes_tested"])
    log.info("    finished the permutation null in %.1fs: %d of %d permutations with a gene at q < %g",
             time.perf_counter() - start, int((result.groupby("permutation")["n_significant"].max() > 0).sum()),
             n_permutations, alpha)
    return result
