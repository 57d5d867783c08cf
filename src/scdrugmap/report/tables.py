"""Tables of a report: fold scores summarised, best model per category, scalability, unscored jobs.

Two levels of summary are used throughout. A *value score* is the mean (and SD) of a
metric over the folds of one category value (e.g. cancer type = Melanoma). A *category
score* is the mean (and SD) over every scored fold of all values of a category. Folds
where a metric is undefined (NaN, e.g. AUROC of a one-class fold) are left out of means,
SDs and counts; skipped and failed jobs are never scored.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd

from scdrugmap.evaluate.metrics import METRICS
from scdrugmap.report.run import RunData, categories_order, reference_split, scored
from scdrugmap.report.style import category_name, model_name


def _aggregate(done: pd.DataFrame, by: list[str], metrics: tuple[str, ...] = METRICS) -> pd.DataFrame:
    aggregations: dict[str, tuple[str, str]] = {}
    for name in metrics:
        aggregations[f"{name}_mean"] = (name, "mean")
        aggregations[f"{name}_sd"] = (name, "std")
        aggregations[f"{name}_n"] = (name, "count")
    if done.empty:
        return pd.DataFrame(columns=[*by, *aggregations])
    return done.groupby(by, observed=True, sort=False).agg(**aggregations).reset_index()


def value_scores(results: pd.DataFrame, *, split: str, scenario: str = "pooled") -> pd.DataFrame:
    """Return mean, SD and count of non-NaN folds of each metric per setting, model, category and value."""
    return _aggregate(scored(results, scenario=scenario, split=split),
                      ["setting", "model", "category", "value"])


def category_scores(results: pd.DataFrame, *, split: str, scenario: str = "pooled") -> pd.DataFrame:
    """Return mean, SD and count over all scored folds of each category, per setting and model."""
    return _aggregate(scored(results, scenario=scenario, split=split), ["setting", "model", "category"])


def _test_text(test: pd.Series | None) -> str:
    if test is None or not test["n"]:
        return "—"
    return (f"{test['mean']:+.2f} [{test['ci_low']:+.2f}, {test['ci_high']:+.2f}], p = {test['p_value']:.2g} "
            f"({int(test['n'])} folds)")


def best_models(results: pd.DataFrame, comparisons: pd.DataFrame | None = None) -> pd.DataFrame:
    """Return the best model and setting per category and split by mean AUROC (pooled scenario).

    Ties on mean AUROC are listed together. ``comparisons`` (`scdrugmap.evaluate.stats.compare_models`
    per category) adds whether the best model beats the majority reference: the mean paired AUROC
    difference [bootstrap 95% CI], its one-sided p-value and the number of paired folds. The
    runner-up column gives the next model and its AUROC, so the margin is visible.
    """
    rows = []
    done = scored(results, scenario="pooled")
    splits = sorted(set(done["split"]), key=lambda s: (s != reference_split(results), s))
    for split in splits:
        table = category_scores(results, split=split)
        for category in categories_order(table) if not table.empty else []:
            part = table[(table["category"] == category) & table["auroc_mean"].notna()]
            if part.empty:
                continue
            part = part.sort_values("auroc_mean", ascending=False, kind="stable")
            top = part["auroc_mean"].iloc[0]
            best = part[np.isclose(part["auroc_mean"], top)]
            rest = part[~np.isclose(part["auroc_mean"], top)]
            runner = (f"{model_name(rest['model'].iloc[0])} ({rest['setting'].iloc[0]}): "
                      f"{rest['auroc_mean'].iloc[0]:.3f}") if not rest.empty else "—"
            test = None
            if comparisons is not None and len(comparisons):
                match = comparisons[(comparisons["versus"] == "reference") & (comparisons["scenario"] == "pooled")
                                    & (comparisons["split"] == split) & (comparisons["category"] == category)
                                    & (comparisons["model"] == best["model"].iloc[0])
                                    & (comparisons["setting"] == best["setting"].iloc[0])]
                test = match.iloc[0] if len(match) else None
            rows.append({
                "category": category_name(category), "split": split,
                "best model": ", ".join(model_name(m) for m in best["model"]),
                "setting": ", ".join(dict.fromkeys(best["setting"])),
                "mean AUROC": float(top), "SD AUROC": float(best["auroc_sd"].iloc[0]),
                "mean F1": float(best["f1_mean"].iloc[0]), "scored folds": int(best["auroc_n"].iloc[0]),
                "vs majority: Δ AUROC [95% CI], p": _test_text(test),
                "beats majority": "—" if test is None or not test["n"] else ("yes" if test["beats"] else "no"),
                "runner-up": runner,
            })
    return pd.DataFrame(rows, columns=["category", "split", "best model", "setting", "mean AUROC", "SD AUROC",
                                       "mean F1", "scored folds", "vs majority: Δ AUROC [95% CI], p",
                                       "beats majority", "runner-up"])


def comparison_table(comparisons: pd.DataFrame) -> pd.DataFrame:
    """Return the printed paired tests: every model against the majority reference and the best baseline.

    ``comparisons`` is `scdrugmap.evaluate.stats.compare_models` (with ``setting``).
    """
    columns = ["model", "setting", "scenario", "split", "category", "versus", "against", "paired folds",
               "mean Δ AUROC", "95% CI", "p (one-sided)", "beats it"]
    if comparisons is None or comparisons.empty:
        return pd.DataFrame(columns=columns)
    frame = comparisons[comparisons["n"] > 0]
    return pd.DataFrame({
        "model": frame["model"].map(model_name), "setting": frame["setting"], "scenario": frame["scenario"],
        "split": frame["split"], "category": frame["category"].map(category_name), "versus": frame["versus"],
        "against": frame["against"].map(lambda names: ", ".join(model_name(n) for n in names.split(", "))),
        "paired folds": frame["n"].astype(int), "mean Δ AUROC": frame["mean"].astype(float),
        "95% CI": [f"{lo:+.2f} to {hi:+.2f}" for lo, hi in zip(frame["ci_low"], frame["ci_high"], strict=True)],
        "p (one-sided)": frame["p_value"].map(lambda p: f"{p:.2g}"),
        "beats it": frame["beats"].map({True: "yes", False: "no"}),
    }, columns=columns)


def scalability_table(run: RunData) -> pd.DataFrame:
    """Return per model and strategy: parameters, output dim, embedding (inference) and training speed.

    Inference facts come from the run's model facts (``run.models``: embedding every cell once); training facts
    from the scored jobs (``seconds`` per fold covers fitting the head or LoRA and
    predicting the test fold; speed is training cells per second of that time, median over folds).
    """
    done = scored(run.results)
    rows = []
    for model in run.model_list:
        facts = run.models.get(model, {})
        strategies = sorted(set(done.loc[done["model"] == model, "strategy"])) or ["—"]
        for strategy in strategies:
            jobs = done[(done["model"] == model) & (done["strategy"] == strategy)]
            seconds = jobs["seconds"].to_numpy(dtype=np.float64) if "seconds" in jobs else np.array([])
            n_train = jobs["n_train"].to_numpy(dtype=np.float64) if "n_train" in jobs else np.array([])
            positive = seconds > 0
            parameters = facts.get("parameters")
            rows.append({
                "model": model_name(model), "family": facts.get("family", "—"),
                "parameters": int(parameters) if parameters is not None else None,
                "output dim": facts.get("embedding_dim", facts.get("dim")),
                "embedding time (s)": facts.get("seconds"),
                "inference (cells/s)": facts.get("cells_per_second"),
                "cells embedded": facts.get("n_cells"),
                "strategy": strategy,
                "training time per fold (s)": float(np.mean(seconds)) if seconds.size else None,
                "training (cells/s)": (float(np.median(n_train[positive] / seconds[positive]))
                                       if positive.any() else None),
                "folds": int(seconds.size),
                "_model": model,
            })
    return pd.DataFrame(rows)


def _reason_text(reasons: str | None, status: str) -> str:
    try:
        parsed = json.loads(reasons) if isinstance(reasons, str) else {}
    except json.JSONDecodeError:
        return str(reasons)
    if not isinstance(parsed, dict):
        return str(parsed)
    if status == "failed" and "error" in parsed:
        lines = [line for line in str(parsed["error"]).strip().splitlines() if line.strip()]
        return lines[-1] if lines else "unknown error"
    return "; ".join(str(v) for v in parsed.values()) or "no reason stored"


def unscored_jobs(results: pd.DataFrame) -> pd.DataFrame:
    """Return skipped and failed jobs grouped by status, model and reason (with counts)."""
    missing = results[results["status"] != "done"]
    if missing.empty:
        return pd.DataFrame(columns=["status", "model", "scenario", "category", "reason", "jobs"])
    reasons = missing["reasons"] if "reasons" in missing else pd.Series(None, index=missing.index)
    frame = missing.assign(reason=[_reason_text(r, s) for r, s in zip(reasons, missing["status"], strict=True)])
    table = (frame.groupby(["status", "model", "scenario", "category", "reason"], observed=True)
             .size().rename("jobs").reset_index())
    table["model"] = table["model"].map(model_name)
    table["category"] = table["category"].map(category_name)
    return table


def job_counts(results: pd.DataFrame) -> dict[str, int]:
    """Return how many jobs are done, skipped and failed."""
    counts = results["status"].value_counts()
    return {status: int(counts.get(status, 0)) for status in ("done", "skipped", "failed")}


#: Why a report leads with sample-level results, by label design.
DESIGN_NOTES = {
    "per-sample": "Labels are given per sample (every sample's cells share one label), so a sample (patient) is "
                  "the unit whose response is known: the sample-level results come first.",
    "per-cell": "Labels differ between the cells of some samples, so cell-level results are primary; the "
                "sample-level results score each sample by the label of most of its cells.",
    "unknown": "The run's cells have no sample column; only cell-level results exist.",
}


def sample_level_table(scores: pd.DataFrame) -> pd.DataFrame:
    """Return the printed sample-level table: one row per model, setting, scenario, split and category value.

    ``scores`` is `scdrugmap.report.run.RunData.sample_scores`.
    """
    columns = ["model", "setting", "scenario", "split", "category", "value", "sample AUROC", "95% CI", "samples",
               "pairs", "folds", "note"]
    if scores.empty:
        return pd.DataFrame(columns=columns)
    order = {c: i for i, c in enumerate(categories_order(scores))}
    frame = scores.sort_values(["scenario", "split", "category", "value", "setting", "model"],
                               key=lambda c: c.map(order) if c.name == "category" else c, kind="stable")
    return pd.DataFrame({
        "model": frame["model"].map(model_name), "setting": frame["setting"], "scenario": frame["scenario"],
        "split": frame["split"], "category": frame["category"].map(category_name), "value": frame["value"],
        "sample AUROC": frame["auroc"].astype(float),
        "95% CI": [("—" if np.isnan(lo) else f"{lo:.2f}–{hi:.2f}") for lo, hi in zip(frame["ci_low"],
                                                                                      frame["ci_high"], strict=True)],
        "samples": frame["n_samples"].astype(int), "pairs": frame["n_pairs"].astype(int),
        "folds": frame["n_folds"].astype(int), "note": frame["reason"].fillna(""),
    }, columns=columns)


def confounder_table(scores: pd.DataFrame) -> pd.DataFrame:
    """Return the printed confounder table: AUROC over all cells, within cell types and studies, and per value.

    ``scores`` is `scdrugmap.report.run.RunData.confounders`.
    """
    columns = ["model", "setting", "scenario", "split", "category", "scope", "AUROC", "cells", "pairs", "note"]
    if scores is None or scores.empty:
        return pd.DataFrame(columns=columns)
    return pd.DataFrame({
        "model": scores["model"].map(model_name), "setting": scores["setting"], "scenario": scores["scenario"],
        "split": scores["split"], "category": scores["category"].map(category_name), "scope": scores["scope"],
        "AUROC": scores["auroc"].astype(float), "cells": scores["n_cells"].astype(int),
        "pairs": scores["n_pairs"].astype(int), "note": scores["reason"].fillna(""),
    }, columns=columns)
