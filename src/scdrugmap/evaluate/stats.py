"""Statistics over a run's folds: sample-level AUROC with a bootstrap interval, and the label design.

Response labels are often given per patient (every cell of a sample shares one label), so a
sample, not a cell, is the unit whose prediction matters. `sample_level_auroc` aggregates each
job's test cells to samples (mean probability) and scores all out-of-fold samples of a category
value together, comparing a sensitive and a resistant sample only when they were predicted by the
same fold's model: a fold's scores rank its own test samples, and a head trained on a fold with
more sensitive samples shifts all its scores up, so comparing across folds would reward or punish
differences between training sets (a constant-per-fold reference could score anywhere from 0 to
1). Pooled over folds this way, the majority reference scores exactly 0.5. The interval is a
percentile bootstrap over samples.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd

from scdrugmap.evaluate.metrics import aggregate_samples

if TYPE_CHECKING:
    import numpy.typing as npt

#: Columns naming one setting of one category value (its folds are the rows that share them).
VALUE_COLUMNS = ["model", "strategy", "head", "scenario", "category", "value", "split"]
CATEGORY_COLUMNS = ["model", "strategy", "head", "scenario", "category", "split"]
BOOTSTRAP = 2000
CONFIDENCE = 0.95
LabelDesign = Literal["per-sample", "per-cell", "unknown"]


def label_design(cells: pd.DataFrame | None) -> LabelDesign:
    """Say how labels are given: ``per-sample`` when every sample's cells share one label.

    ``cells`` has one row per cell with ``response`` and ``sample`` (the run's cells table);
    ``unknown`` when either is missing.
    """
    if cells is None or not {"response", "sample"} <= set(cells.columns):
        return "unknown"
    mixed = cells.groupby("sample", observed=True)["response"].nunique() > 1
    return "per-cell" if mixed.any() else "per-sample"


def sample_predictions(predictions: pd.DataFrame, cells: pd.DataFrame) -> pd.DataFrame:
    """Return one row per scored job and test sample: ``key``, `aggregate_samples`' columns.

    ``predictions`` are the run's per-cell predictions (``cell``, ``label``, ``probability``,
    ``key``); ``cells`` names each cell's ``sample``.
    """
    columns = ["key", "sample", "label", "mixed", "n_cells", "mean_probability", "fraction_sensitive"]
    if predictions.empty:
        return pd.DataFrame(columns=columns)
    sample_of = cells.drop_duplicates("cell").set_index("cell")["sample"].astype(str)
    # `aggregate_samples` of every job at once: one grouping by (key, sample), both sorted as text
    table = aggregate_samples(predictions["label"], predictions["probability"],
                              predictions["cell"].map(sample_of).fillna("unknown").to_numpy(),
                              keys=predictions["key"].astype(str).to_numpy())
    return table[columns]


def grouped_pair_counts(labels: npt.ArrayLike, scores: npt.ArrayLike, groups: npt.ArrayLike,
                        strata: npt.ArrayLike, n_groups: int) -> dict[str, npt.NDArray[np.float64]]:
    """Count, per group, the Mann-Whitney wins over the pairs of a sensitive and a resistant item of one stratum.

    The pair counts of many groups at once (the cells of every setting and confounder value of a
    run), from one sort: items are ordered by group, stratum and score, and each run of tied
    scores adds its positives times the negatives below it in its stratum, plus half those tied
    with it. Exactly the count of the pair matrix ``(a > b) + 0.5 * (a == b)`` (sums of halves, exact
    in float64 below 2**53 pairs), with memory growing with the items, not their pairs (a cell type of
    30,000 test cells has 2e8 pairs), and no Python loop over strata.

    Parameters
    ----------
    labels, scores
        Per item: label (1 = sensitive, 0 = resistant) and score; items with a NaN score are left out.
    groups
        Per item, its group's code in ``range(n_groups)``.
    strata
        Per item, its stratum (any values; pairs are compared only within one group and stratum).

    Returns
    -------
    Per group (arrays of ``n_groups``): ``wins``, ``pairs``, ``strata`` (strata holding both labels)
    and ``items`` (items with a score).
    """
    item_labels = np.asarray(labels, dtype=np.int64)
    item_scores = np.asarray(scores, dtype=np.float64)
    item_groups = np.asarray(groups, dtype=np.int64)
    keep = np.isfinite(item_scores)
    item_labels, item_scores, item_groups = item_labels[keep], item_scores[keep], item_groups[keep]
    kept_strata = np.asarray(strata)[keep]
    if kept_strata.dtype.kind in "iu" and (not kept_strata.size or 0 <= kept_strata.min() <= kept_strata.max() < 2**31):
        stratum_codes = kept_strata.astype(np.int64, copy=False)  # codes already: no sort to renumber them
    else:
        stratum_codes = np.unique(kept_strata, return_inverse=True)[1].reshape(-1).astype(np.int64)
    out = {"wins": np.zeros(n_groups), "pairs": np.zeros(n_groups), "strata": np.zeros(n_groups),
           "items": np.bincount(item_groups, minlength=n_groups).astype(np.float64)}
    if not item_labels.size:
        return out
    block = item_groups * (int(stratum_codes.max()) + 1) + stratum_codes  # one (group, stratum)
    order = np.lexsort((item_scores, block))
    block, sorted_scores = block[order], item_scores[order]
    negative = (item_labels[order] == 0).astype(np.int64)
    positive = 1 - negative
    new_block = np.ones(block.size, dtype=bool)
    new_block[1:] = block[1:] != block[:-1]
    new_run = new_block.copy()
    new_run[1:] |= sorted_scores[1:] != sorted_scores[:-1]
    block_starts, run_starts = np.flatnonzero(new_block), np.flatnonzero(new_run)
    negatives_before = np.cumsum(negative) - negative  # negatives earlier in the sorted order
    run_block = np.cumsum(new_block)[run_starts] - 1
    below = negatives_before[run_starts] - negatives_before[block_starts[run_block]]  # in the run's stratum
    run_wins = np.add.reduceat(positive, run_starts) * (below + 0.5 * np.add.reduceat(negative, run_starts))
    block_positive = np.add.reduceat(positive, block_starts)
    block_negative = np.add.reduceat(negative, block_starts)
    both = (block_positive > 0) & (block_negative > 0)
    group_of_block = item_groups[order][block_starts][both]
    block_wins = np.bincount(run_block, weights=run_wins)[both]
    block_pairs = (block_positive * block_negative)[both].astype(np.float64)
    out["wins"] = np.bincount(group_of_block, weights=block_wins, minlength=n_groups).astype(np.float64)
    out["pairs"] = np.bincount(group_of_block, weights=block_pairs, minlength=n_groups).astype(np.float64)
    out["strata"] = np.bincount(group_of_block, minlength=n_groups).astype(np.float64)
    return out


def _auroc_fields(counts: dict[str, npt.NDArray[np.float64]], group: int) -> dict[str, float | int | str]:
    """Return `within_fold_auroc`'s point fields of one group of `grouped_pair_counts` (no interval)."""
    items, pairs = int(counts["items"][group]), int(counts["pairs"][group])
    reason = "" if pairs else ("no fold's test samples hold both labels" if items else "no sample with a prediction")
    return {"auroc": float(counts["wins"][group] / pairs) if pairs else float("nan"), "ci_low": float("nan"),
            "ci_high": float("nan"), "n_items": items, "n_pairs": pairs, "n_strata": int(counts["strata"][group]),
            "reason": reason}


def _bootstrap_interval(labels: npt.NDArray[np.int64], scores: npt.NDArray[np.float64],
                        strata: npt.NDArray[np.generic], *, n_bootstrap: int, confidence: float,
                        seed: int) -> tuple[float, float]:
    """Return the percentile bootstrap interval of the within-stratum AUROC (items drawn with replacement).

    Each draw takes as many items as there are, uniformly with replacement (each item's count in a
    draw is multinomial); draws that hold no pair within a stratum are left out. Items are few
    (samples, not cells): each stratum's pair matrix is weighted by the draws' counts.
    """
    keep = np.isfinite(scores)
    labels, scores, strata = labels[keep], scores[keep], strata[keep]
    size = labels.size
    rng = np.random.default_rng(seed)
    drawn_items = rng.integers(0, size, size=(n_bootstrap, size))
    counts = np.bincount((drawn_items + size * np.arange(n_bootstrap)[:, None]).ravel(),
                         minlength=n_bootstrap * size).reshape(n_bootstrap, size).astype(np.float64)
    wins = np.zeros(n_bootstrap)
    pairs = np.zeros(n_bootstrap)
    codes = np.unique(strata, return_inverse=True)[1].reshape(-1)
    for code in range(int(codes.max()) + 1 if size else 0):
        members = np.flatnonzero(codes == code)
        pos, neg = members[labels[members] == 1], members[labels[members] == 0]
        if not (pos.size and neg.size):
            continue
        a, b = scores[pos][:, None], scores[neg][None, :]
        wins += np.einsum("bi,ij,bj->b", counts[:, pos], (a > b) + 0.5 * (a == b), counts[:, neg])
        pairs += counts[:, pos].sum(axis=1) * counts[:, neg].sum(axis=1)
    scored = pairs > 0
    if not scored.any():
        return float("nan"), float("nan")
    tail = (1 - confidence) / 2
    low, high = np.quantile(wins[scored] / pairs[scored], [tail, 1 - tail])
    return float(low), float(high)


def within_fold_auroc(labels: npt.ArrayLike, scores: npt.ArrayLike, strata: npt.ArrayLike, *,
                      n_bootstrap: int = BOOTSTRAP, confidence: float = CONFIDENCE,
                      seed: int = 0) -> dict[str, float | int | str]:
    """Return the AUROC over the pairs of a sensitive and a resistant item of the same stratum, with a bootstrap interval.

    Parameters
    ----------
    labels, scores, strata
        Per item (e.g. a sample of one fold's test set): label (1 = sensitive), score, and the
        stratum (the fold) whose model scored it. Items with a NaN score are left out.
    n_bootstrap, confidence, seed
        Percentile bootstrap over items: the items are drawn with replacement (as many as there
        are) and the AUROC recomputed over the pairs the draw holds within each stratum; draws
        with no such pair are left out.

    Returns
    -------
    ``auroc``, ``ci_low``, ``ci_high``, ``n_items``, ``n_pairs``, ``n_strata`` (strata holding both
    labels) and ``reason`` (why the AUROC is NaN; empty otherwise).
    """
    item_labels: npt.NDArray[np.int64] = np.asarray(labels, dtype=np.int64)
    item_scores: npt.NDArray[np.float64] = np.asarray(scores, dtype=np.float64)
    item_strata: npt.NDArray[np.generic] = np.asarray(strata)
    out = _auroc_fields(grouped_pair_counts(item_labels, item_scores, np.zeros(item_labels.size, dtype=np.int64),
                                            item_strata, 1), 0)
    if n_bootstrap >= 1 and out["n_pairs"]:
        out["ci_low"], out["ci_high"] = _bootstrap_interval(item_labels, item_scores, item_strata,
                                                            n_bootstrap=n_bootstrap, confidence=confidence, seed=seed)
    return out


def sample_level_auroc(predictions: pd.DataFrame | None, cells: pd.DataFrame | None, results: pd.DataFrame, *,
                       by: list[str] | None = None, n_bootstrap: int = BOOTSTRAP, seed: int = 0) -> pd.DataFrame:
    """Return the sample-level AUROC of every category value's out-of-fold samples, with a bootstrap 95% interval.

    Each scored job's test cells are aggregated to samples (mean probability); all samples of a
    value's folds are scored together, pairs compared within their fold (`within_fold_auroc`).

    Parameters
    ----------
    predictions, cells
        The run's per-cell predictions and cells (with ``sample``).
    results
        The run's job rows (cell level is used): which job is which model, value and fold.
    by
        The columns of one group (default `VALUE_COLUMNS`: per category value; `CATEGORY_COLUMNS`
        pools the values of a category, each fold still its own stratum).

    Returns
    -------
    One row per group: its ``by`` columns, ``auroc``, ``ci_low``, ``ci_high``, ``n_samples`` (sample
    predictions scored), ``n_pairs``, ``n_folds`` (folds with both labels), ``reason``, and
    ``auroc_fraction`` (the same, scoring the fraction of a sample's cells called sensitive).
    Empty when the run has no predictions or no sample column.
    """
    by = by or VALUE_COLUMNS
    columns = [*by, "auroc", "ci_low", "ci_high", "n_samples", "n_pairs", "n_folds", "reason", "auroc_fraction"]
    if predictions is None or predictions.empty or cells is None or "sample" not in cells:
        return pd.DataFrame(columns=columns)
    jobs = results[(results["status"] == "done")]
    if "level" in jobs:
        jobs = jobs[jobs["level"].fillna("cell") == "cell"]
    jobs = jobs[["key", *by]].drop_duplicates("key")
    per_sample = sample_predictions(predictions[predictions["key"].isin(jobs["key"])], cells).merge(jobs, on="key")
    codes, first = _group_codes(per_sample, by)
    kept = per_sample.iloc[first][by].to_numpy(dtype=object)
    per_sample = per_sample[codes >= 0]
    codes = codes[codes >= 0]
    labels, keys = per_sample["label"].to_numpy(np.int64), per_sample["key"].to_numpy()
    scores = per_sample["mean_probability"].to_numpy(np.float64)
    scored = grouped_pair_counts(labels, scores, codes, keys, len(first))
    fraction = grouped_pair_counts(labels, per_sample["fraction_sensitive"], codes, keys, len(first))
    rows = []
    for group, members in enumerate(_rows_of_groups(codes, len(first))):
        fields = _auroc_fields(scored, group)
        if fields["n_pairs"] and n_bootstrap >= 1:  # the group's samples in their order: the draws depend on it
            fields["ci_low"], fields["ci_high"] = _bootstrap_interval(
                labels[members], scores[members], keys[members], n_bootstrap=n_bootstrap, confidence=CONFIDENCE,
                seed=seed)
        rows.append({**dict(zip(by, kept[group], strict=True)), "auroc": fields["auroc"], "ci_low": fields["ci_low"],
                     "ci_high": fields["ci_high"], "n_samples": fields["n_items"], "n_pairs": fields["n_pairs"],
                     "n_folds": fields["n_strata"], "reason": fields["reason"],
                     "auroc_fraction": _auroc_fields(fraction, group)["auroc"]})
    return pd.DataFrame(rows, columns=columns)


def _group_codes(frame: pd.DataFrame, by: list[str]) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.intp]]:
    """Return each row's group code over ``by`` (numbered in order of first appearance; -1 where a key is NA)
    and the position of each group's first row: the groups of ``frame.groupby(by, sort=False)``, in its order."""
    numbers = frame.groupby(by, sort=False, observed=True).ngroup()
    codes = numbers.fillna(-1).to_numpy(np.int64)
    seen = np.flatnonzero(codes >= 0)
    _, first = np.unique(codes[seen], return_index=True)
    return codes, seen[first]


def _rows_of_groups(codes: npt.NDArray[np.int64], n_groups: int) -> list[npt.NDArray[np.intp]]:
    """Return the row positions of each group of `_group_codes`, in row order (rows of code -1 left out)."""
    order = np.argsort(codes, kind="stable")
    ends = np.cumsum(np.bincount(codes + 1, minlength=n_groups + 1))  # code -1 sorts first
    return [order[ends[group]:ends[group + 1]] for group in range(n_groups)]


# --- paired comparisons with the majority reference and the best baseline -------------------------------------------

#: The reference every model is compared with: it predicts each fold's training share of sensitive cells.
REFERENCE = "majority"
#: Columns that identify one fold of one category value: the pairing of a model's and a reference's scores.
FOLD_COLUMNS = ["scenario", "category", "value", "fold", "split"]
#: Largest number of paired folds whose sign flips are enumerated exactly (2**16 patterns); above, sampled.
EXACT_FLIPS = 16
RANDOM_FLIPS = 20_000
ALPHA = 0.05
#: Below this AUROC a model is read as having no signal worth explaining further (in the findings).
CHANCE_BAND = 0.55


def paired_test(differences: npt.ArrayLike, *, n_bootstrap: int = BOOTSTRAP, confidence: float = CONFIDENCE,
                seed: int = 0) -> dict[str, float | int]:
    """Return a one-sided paired sign-flip permutation test of mean(differences) > 0, with a bootstrap interval.

    Under the null hypothesis (no difference) each paired difference is as likely positive as
    negative; the p-value is the share of sign patterns whose mean is at least the observed one
    (all 2**n patterns up to `EXACT_FLIPS` folds, else `RANDOM_FLIPS` random ones, counting the
    observed). The interval is a percentile bootstrap of the mean difference over folds.

    Returns
    -------
    ``n`` (paired folds), ``mean``, ``ci_low``, ``ci_high``, ``p_value`` (NaN when n = 0).
    """
    d = np.asarray(differences, dtype=np.float64)
    d = d[np.isfinite(d)]
    out: dict[str, float | int] = {"n": int(d.size), "mean": float("nan"), "ci_low": float("nan"),
                                   "ci_high": float("nan"), "p_value": float("nan")}
    if d.size == 0:
        return out
    observed = float(d.mean())
    out["mean"] = observed
    rng = np.random.default_rng(seed)
    if d.size <= EXACT_FLIPS:
        patterns = ((np.arange(2 ** d.size)[:, None] >> np.arange(d.size)) & 1) * 2 - 1
        flipped = (patterns * d).mean(axis=1)
        out["p_value"] = float(np.mean(flipped >= observed - 1e-12))
    else:
        signs = rng.choice([-1.0, 1.0], size=(RANDOM_FLIPS, d.size))
        flipped = (signs * d).mean(axis=1)
        out["p_value"] = float((1 + np.sum(flipped >= observed - 1e-12)) / (1 + RANDOM_FLIPS))
    means = d[rng.integers(0, d.size, size=(n_bootstrap, d.size))].mean(axis=1)
    tail = (1 - confidence) / 2
    out["ci_low"], out["ci_high"] = (float(v) for v in np.quantile(means, [tail, 1 - tail]))
    return out


def compare_models(results: pd.DataFrame, *, baselines: set[str], metric: str = "auroc",
                   by: list[str] | None = None, reference: str = REFERENCE, seed: int = 0) -> pd.DataFrame:
    """Compare every model with the majority reference and with the best baseline, fold by fold.

    Parameters
    ----------
    results
        Job rows (cell level is used; sample-level rows are ignored).
    baselines
        The baseline models (e.g. pca, hvg): per category value, the one with the highest mean
        ``metric`` is "the best baseline" (frozen strategy, the model's head where it has it).
    by
        The groups to test: `VALUE_COLUMNS` (per category value, the default) or `CATEGORY_COLUMNS`
        (the folds of all values of a category; each fold still paired with the best baseline of
        its own value).

    Returns
    -------
    One row per group and comparison: its ``by`` columns, ``versus`` (``reference`` or
    ``best baseline``), ``against`` (the model compared with; several names when the best baseline
    differs between values), and `paired_test`'s ``n``, ``mean`` (mean paired difference of
    ``metric``), ``ci_low``, ``ci_high``, ``p_value``, and ``beats`` (mean > 0 at p < `ALPHA`).
    A model is not compared with itself (the reference, or a value's best baseline).
    """
    by = by or VALUE_COLUMNS
    columns = [*by, "versus", "against", "n", "mean", "ci_low", "ci_high", "p_value", "beats"]
    done = results[results["status"] == "done"]
    if "level" in done:
        done = done[done["level"].fillna("cell") == "cell"]
    done = done[[*dict.fromkeys([*VALUE_COLUMNS, "fold", metric])]]
    frozen = done[done["strategy"] == "frozen"]
    value_keys = ["scenario", "category", "value", "split"]
    best: dict[tuple, str] = {}
    candidates = frozen[frozen["model"].isin(baselines - {reference})]
    for key, part in candidates.groupby([*value_keys, "head"], sort=False, observed=True):
        means = part.groupby("model", observed=True)[metric].mean().dropna()
        if len(means):
            best[tuple(key)] = str(means.idxmax())

    heads = set(frozen["head"])
    scores = frozen.rename(columns={"model": "against", metric: "other"})[[*FOLD_COLUMNS, "head", "against", "other"]]
    best_table = pd.DataFrame([(*key, name) for key, name in best.items()], columns=[*value_keys, "head", "against"])
    done = done.reset_index(drop=True)
    folds = done[FOLD_COLUMNS].assign(head=done["head"].where(done["head"].isin(heads), "mlp").astype(object))

    def partners(comparison: str) -> pd.DataFrame:
        """Return the comparison's model and score on each row's fold (row for row with ``done``)."""
        if comparison == "reference":
            wanted = folds.assign(against=reference)
        else:  # the best baseline of the row's value and head (None where there is none)
            wanted = folds.merge(best_table, on=[*value_keys, "head"], how="left")
        return wanted.merge(scores, on=[*FOLD_COLUMNS, "head", "against"], how="left")

    paired_with = {comparison: partners(comparison) for comparison in ("reference", "best baseline")}
    rows = []
    for group, part in done.groupby(by, sort=False, observed=True):
        facts = dict(zip(by, group, strict=True))
        for comparison, every in paired_with.items():
            paired = every.iloc[part.index]
            keep = (paired["against"].notna() & (paired["against"] != part["model"].astype(object))).to_numpy()
            if not keep.any():
                continue
            differences = (part[metric].to_numpy(dtype=np.float64)[keep]
                           - paired["other"].to_numpy(dtype=np.float64)[keep])
            test = paired_test(differences, seed=seed)
            beats = bool(test["n"] and test["mean"] > 0 and test["p_value"] < ALPHA)
            rows.append({**facts, "versus": comparison, "against": ", ".join(sorted(set(paired["against"][keep]))),
                         **test, "beats": beats})
    return pd.DataFrame(rows, columns=columns)


def permutation_pvalues(results: pd.DataFrame, null: pd.DataFrame | None, *, by: list[str] | None = None,
                        metric: str = "auroc") -> pd.DataFrame:
    """Return the empirical p-value of each group's mean ``metric`` against the label-permutation null.

    The statistic is the mean over the group's scored folds (cell level); under each permutation
    it is the same mean against the shuffled labels. p = (1 + permutations at least as high) /
    (1 + permutations), so it is never 0.

    Returns
    -------
    One row per group: its ``by`` columns, ``observed``, ``null_mean``, ``n_permutations`` and
    ``p_value``. Empty when no null was computed.
    """
    by = by or VALUE_COLUMNS
    columns = [*by, "observed", "null_mean", "n_permutations", "p_value"]
    if null is None or null.empty:
        return pd.DataFrame(columns=columns)
    done = results[results["status"] == "done"]
    if "level" in done:
        done = done[done["level"].fillna("cell") == "cell"]
    observed = done.groupby(by, observed=True)[metric].mean().rename("observed")
    per_permutation = null.groupby([*by, "permutation"], observed=True)[metric].mean().dropna()
    rows = []
    for group, value in observed.dropna().items():
        group = group if isinstance(group, tuple) else (group,)
        try:
            draws = per_permutation.loc[group].to_numpy(dtype=np.float64)
        except KeyError:
            continue
        rows.append({**dict(zip(by, group, strict=True)), "observed": float(value), "null_mean": float(draws.mean()),
                     "n_permutations": int(draws.size),
                     "p_value": float((1 + np.sum(draws >= value - 1e-12)) / (1 + draws.size))})
    return pd.DataFrame(rows, columns=columns)


def baseline_models(models: list[str], facts: dict[str, dict] | None = None) -> set[str]:
    """Return the models of ``models`` that are baselines (PCA, HVG, the majority reference...).

    Read from the run's model facts (``family``) where stored, else from the model registry.
    """
    from scdrugmap.errors import ConfigError
    from scdrugmap.models.base import get_encoder_class

    found = set()
    for model in models:
        family = (facts or {}).get(model, {}).get("family")
        if family is None:
            try:
                family = get_encoder_class(model).family
            except ConfigError:  # a prompted language model, or one no longer registered
                family = None
        if family == "baseline":
            found.add(model)
    return found


# --- findings: the run's message in plain words ---------------------------------------------------------------------

def _fmt_p(p: float) -> str:
    return "p < 0.001" if p < 0.001 else f"p = {p:.3f}" if p < 0.01 else f"p = {p:.2f}"


def main_category(results: pd.DataFrame) -> str | None:
    """Return the category with the most scored pooled folds under the patient-grouped split (else any split)."""
    done = results[(results["status"] == "done") & (results["scenario"] == "pooled")]
    if "level" in done:
        done = done[done["level"].fillna("cell") == "cell"]
    if done.empty:
        return None
    preferred = done[done["split"] == "sample"] if (done["split"] == "sample").any() else done
    counts = preferred.groupby("category", sort=False)["auroc"].count()
    return str(counts.idxmax()) if len(counts) else None


def _count(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def findings(results: pd.DataFrame, *, comparisons: pd.DataFrame, samples: pd.DataFrame,
             baselines: set[str] | None = None, confounders: pd.DataFrame | None = None,
             reference: str = REFERENCE, most: int = 5) -> list[str]:
    """Return three to five plain-language findings computed from a run's results (nothing hard-coded).

    Parameters
    ----------
    results
        The run's job rows.
    comparisons
        `compare_models` per category (``by=CATEGORY_COLUMNS``).
    samples
        `sample_level_auroc` per category (``by=CATEGORY_COLUMNS``).
    baselines
        The baseline models: only the others (foundation models) are compared with the best baseline.
    confounders
        `confounder_auroc` per category, for the AUROC within cell types.

    Returns
    -------
    Sentences on: the best model under patient-grouped pooled splits and whether it beats the
    majority reference; its sample-level AUROC; the cell-level split's inflation; its AUROC within
    cell types; the cross-study scenario against pooled; whether foundation models beat the best
    baseline. Each appears only when the run holds what it needs; the first five are kept.
    """
    category = main_category(results)
    if category is None:
        return ["No job was scored, so there is nothing to conclude yet."]
    done = results[(results["status"] == "done")]
    if "level" in done:
        done = done[done["level"].fillna("cell") == "cell"]
    frozen = done[(done["category"] == category) & (done["strategy"] == "frozen") & (done["head"] == "mlp")]
    category_text = category.replace("_", " ")
    pooled = frozen[(frozen["scenario"] == "pooled")]
    split = "sample" if (pooled["split"] == "sample").any() else "cell"
    grouped = pooled[pooled["split"] == split]
    means = grouped.groupby("model")["auroc"].agg(["mean", "count"]).dropna()
    candidates = means.drop(index=reference, errors="ignore")
    out: list[str] = []
    if candidates.empty:
        return ["Only the majority reference was scored; add models (--models pca,hvg,...) to compare."]
    best = str(candidates["mean"].idxmax())
    best_auroc = float(candidates.loc[best, "mean"])
    split_text = "patient-grouped" if split == "sample" else "cell-level"
    row = comparisons[(comparisons["model"] == best) & (comparisons["versus"] == "reference")
                      & (comparisons["scenario"] == "pooled") & (comparisons["split"] == split)
                      & (comparisons["category"] == category) & (comparisons["strategy"] == "frozen")
                      & (comparisons["head"] == "mlp")] if not comparisons.empty else comparisons
    if len(row) and row["n"].iloc[0]:
        test = row.iloc[0]
        verdict = "beats" if test["beats"] else "does not clearly beat"
        out.append(f"{best} ranks sensitive above resistant cells best under {split_text} splits: mean AUROC "
                   f"{best_auroc:.2f} over {int(candidates.loc[best, 'count'])} folds of the {category_text} values, "
                   f"and {verdict} the "
                   f"majority reference (AUROC 0.50; difference {test['mean']:+.2f}, 95% CI {test['ci_low']:+.2f} to "
                   f"{test['ci_high']:+.2f}, {_fmt_p(test['p_value'])}).")
    else:
        out.append(f"{best} scores best under {split_text} splits: mean AUROC {best_auroc:.2f} over "
                   f"{int(candidates.loc[best, 'count'])} folds of the {category_text} values.")
    sample_row = samples[(samples["model"] == best) & (samples["scenario"] == "pooled") & (samples["split"] == split)
                         & (samples["category"] == category) & (samples["strategy"] == "frozen")
                         & (samples["head"] == "mlp")] if not samples.empty else samples
    if len(sample_row) and np.isfinite(sample_row["auroc"].iloc[0]):
        s = sample_row.iloc[0]
        out.append(f"Per patient (each sample's mean probability, {int(s['n_samples'])} out-of-fold samples), {best} "
                   f"reaches AUROC {s['auroc']:.2f} (95% CI {s['ci_low']:.2f}-{s['ci_high']:.2f}).")
    both = pooled.pivot_table(index=["model", "value"], columns="split", values="auroc", aggfunc="mean")
    if {"sample", "cell"} <= set(both.columns):
        paired = both.dropna().loc[best] if best in both.dropna().index.get_level_values(0) else None
        if paired is not None and len(paired):
            gap = float(paired["cell"].mean() - paired["sample"].mean())
            verb = "inflates" if gap > 0.02 else "does not inflate" if gap > -0.02 else "lowers"
            out.append(f"Splitting cells instead of patients {verb} the score: {best}'s AUROC is "
                       f"{paired['cell'].mean():.2f} with cell-level folds against {paired['sample'].mean():.2f} with "
                       f"patient-grouped folds on the same {_count(len(paired), category_text + ' value')} "
                       f"({gap:+.2f}), because cells of one "
                       "patient then sit on both sides of a fold.")
    within = confounders[(confounders["model"] == best) & (confounders["scenario"] == "pooled")
                         & (confounders["split"] == split) & (confounders["category"] == category)
                         & (confounders["strategy"] == "frozen") & (confounders["head"] == "mlp")
                         ].set_index("scope")["auroc"] if confounders is not None and len(confounders) else None
    if within is not None and np.isfinite(within.get("within cell type", np.nan)):
        inside, overall = float(within["within cell type"]), float(within["all cells"])
        if overall < CHANCE_BAND:
            pass  # no signal over all cells: nothing to explain within cell types
        elif inside < overall - 0.05:
            out.append(f"Within cell types {best}'s AUROC falls to {inside:.2f} (from {overall:.2f} over all cells): "
                       "part of its score comes from which cell types a sample holds, not from how cells respond.")
        else:
            out.append(f"The signal holds within cell types: {best}'s AUROC is {inside:.2f} comparing cells of one "
                       f"cell type only ({overall:.2f} over all cells), so it is not cell-type composition alone.")
    cross = frozen[(frozen["scenario"] == "cross") & (frozen["model"] == best)]["auroc"].dropna()
    if len(cross):
        if cross.mean() < best_auroc - 0.02:
            out.append(f"Holding out a whole study is the harder test: {best}'s mean AUROC on a held-out study is "
                       f"{cross.mean():.2f} ({len(cross)} folds), below {best_auroc:.2f} in pooled folds, since a new "
                       "study brings its own batch effect and patients.")
        else:
            out.append(f"Held-out studies score as well as pooled folds here: {best}'s mean AUROC on a held-out "
                       f"study is {cross.mean():.2f} ({len(cross)} folds) against {best_auroc:.2f} pooled.")
    external = frozen[(frozen["scenario"] == "external") & (frozen["model"] == best)]["auroc"].dropna()
    if len(external):
        verb = "holds up" if external.mean() >= best_auroc - 0.05 else "drops"
        out.append(f"On the separate test file (--test-data), {best} trained on all of --data {verb}: AUROC "
                   f"{external.mean():.2f} over {_count(len(external), category_text + ' value')} scored there, "
                   f"against {best_auroc:.2f} within --data.")
    versus = comparisons[(comparisons["versus"] == "best baseline") & (comparisons["scenario"] == "pooled")
                         & (comparisons["split"] == split) & (comparisons["category"] == category)
                         & (comparisons["n"] > 0)] if not comparisons.empty else comparisons
    challengers = versus[~versus["model"].isin((baselines or set()) | {reference})] if len(versus) else versus
    if len(challengers):
        winners = challengers[challengers["beats"]]
        names = ", ".join(sorted(set(challengers["model"])))
        if len(winners):
            out.append(f"Against the best baseline ({', '.join(sorted(set(winners['against'])))}), "
                       f"{', '.join(sorted(set(winners['model'])))} score higher with evidence (paired folds, "
                       f"{_fmt_p(float(winners['p_value'].min()))}).")
        else:
            out.append(f"No model ({names}) beats the best baseline ({', '.join(sorted(set(challengers['against'])))})"
                       f" with evidence: a bigger model is not automatically a better predictor here.")
    return out[:most]


# --- confounders: AUROC within cell types and studies ---------------------------------------------------------------

def confounder_auroc(predictions: pd.DataFrame | None, cells: pd.DataFrame | None, results: pd.DataFrame, *,
                     by: list[str] | None = None, groups: tuple[str, ...] = ("cell_type", "study")) -> pd.DataFrame:
    """Return AUROC over all test cells, within each confounder, and within each of its values, per setting.

    Every score compares a sensitive and a resistant cell only when the same fold's model scored
    both (`within_fold_auroc`); "within cell type" further only when they share a cell type, so a
    model that reads cell-type composition and nothing else scores 0.5 there.

    Returns
    -------
    One row per setting (``by``, default `CATEGORY_COLUMNS`) and ``scope``: ``all cells``,
    ``within <group>`` and ``<group>: <value>`` (e.g. ``cell_type: Cytotoxic CD8``), with ``auroc``,
    ``n_cells``, ``n_pairs`` and ``reason``. Groups missing from ``cells`` are left out; empty
    without predictions.
    """
    by = by or CATEGORY_COLUMNS
    columns = [*by, "scope", "auroc", "n_cells", "n_pairs", "reason"]
    if predictions is None or predictions.empty or cells is None:
        return pd.DataFrame(columns=columns)
    present = [g for g in groups if g in cells and cells[g].nunique() > 1]
    jobs = results[results["status"] == "done"]
    if "level" in jobs:
        jobs = jobs[jobs["level"].fillna("cell") == "cell"]
    jobs = jobs[["key", *by]].drop_duplicates("key")
    cell_table = cells[["cell", *present]].drop_duplicates("cell")
    # inner merges on the key and the cell, row for row, without their join tables (millions of predictions)
    job_of = pd.Index(jobs["key"]).get_indexer(predictions["key"])
    cell_of = pd.Index(cell_table["cell"]).get_indexer(predictions["cell"])
    keep = (job_of >= 0) & (cell_of >= 0)
    frame = predictions.loc[keep, ["key", "label", "probability"]].reset_index(drop=True)
    for column in by:
        frame[column] = jobs[column].take(job_of[keep]).reset_index(drop=True)
    for group in present:
        frame[group] = cell_table[group].take(cell_of[keep]).reset_index(drop=True)
    codes, first = _group_codes(frame, by)
    settings = frame.iloc[first][by].to_numpy(dtype=object)
    labels, probability = frame["label"].to_numpy(), frame["probability"].to_numpy()  # as stored (float32)
    fold = pd.factorize(frame["key"])[0].astype(np.int32)  # strata as codes: no string per cell and pair
    # per group: each row's value code with a missing value as one more value (for "within"), and with
    # missing values left out, numbered in sorted order (for each value on its own)
    within = {group: _small_codes(*pd.factorize(frame[group], use_na_sentinel=False)) for group in present}
    per_value = {group: _small_codes(*pd.factorize(frame[group], sort=True)) for group in present}
    # one setting at a time, so the sort of `grouped_pair_counts` holds one setting's predictions, not a
    # full-size run's millions at once
    rows = []
    for setting, members in enumerate(_rows_of_groups(codes, len(first))):
        facts = dict(zip(by, settings[setting], strict=True))
        setting_labels, setting_scores, setting_folds = labels[members], probability[members], fold[members]
        one = np.zeros(members.size, dtype=np.int64)
        rows.append(_confounder_row(facts, "all cells",
                                    grouped_pair_counts(setting_labels, setting_scores, one, setting_folds, 1), 0))
        for group in present:  # pairs of one fold and one value of the group (a missing value is one value too)
            value_codes, values = within[group]
            strata = setting_folds.astype(np.int64) * len(values) + value_codes[members]
            rows.append(_confounder_row(facts, f"within {group.replace('_', ' ')}",
                                        grouped_pair_counts(setting_labels, setting_scores, one, strata, 1), 0))
        for group in present:  # each value on its own, in sorted order; cells without a value left out
            value_codes, values = per_value[group]
            value_of = value_codes[members]
            has_value = value_of >= 0
            counts = grouped_pair_counts(setting_labels[has_value], setting_scores[has_value], value_of[has_value],
                                         setting_folds[has_value], len(values))
            seen = np.bincount(value_of[has_value], minlength=len(values)) > 0
            rows.extend(_confounder_row(facts, f"{group.replace('_', ' ')}: {value}", counts, index)
                        for index, value in enumerate(values) if seen[index])
    return pd.DataFrame(rows, columns=columns)


def _confounder_row(facts: dict[str, object], scope: str, counts: dict[str, npt.NDArray[np.float64]],
                    group: int) -> dict[str, object]:
    fields = _auroc_fields(counts, group)
    return {**facts, "scope": scope, "auroc": fields["auroc"], "n_cells": fields["n_items"],
            "n_pairs": fields["n_pairs"], "reason": fields["reason"]}


def _small_codes(codes: npt.NDArray[np.intp], values: Any) -> tuple[npt.NDArray[np.int32], Any]:
    """Return `pd.factorize`'s codes as int32 (a full-size run's millions of predictions: half the memory)."""
    return codes.astype(np.int32), values
