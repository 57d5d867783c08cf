"""A benchmark run as the report shows it: the run folder read through the store, results normalised.

The report reads only what a benchmark wrote, through `scdrugmap.evaluate.store.read_run`
(`RunFolder`): results, predictions, cells, embedding samples, model facts and the run's config.
Every file but the results is optional; a figure that needs a missing file says so instead of
failing.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from scdrugmap.data.confounders import label_coincidences
from scdrugmap.data.schema import CATEGORY_KINDS, ObsKeys, encode_labels
from scdrugmap.errors import ConfigError
from scdrugmap.evaluate.metrics import METRICS
from scdrugmap.evaluate.stats import (
    CATEGORY_COLUMNS,
    baseline_models,
    compare_models,
    confounder_auroc,
    label_design,
    sample_level_auroc,
)
from scdrugmap.evaluate.store import EmbeddingMap, RunFolder, read_run
from scdrugmap.report.style import setting_name

log = logging.getLogger(__name__)

#: Columns a job row must have; older runs without ``head``/``split``/``strategy`` get these defaults.
ROW_DEFAULTS: dict[str, str] = {"strategy": "frozen", "head": "mlp", "split": "sample", "scenario": "pooled"}
STRATEGY_ORDER = ("frozen", "lora")
HEAD_ORDER = ("mlp", "logistic")


@dataclass
class RunData:
    """Everything a report shows about one run: its folder (`RunFolder`) and its normalised results.

    ``results`` has the cell-level rows, with every column of `ROW_DEFAULTS` (filled for older runs),
    text keys, numeric metrics and a ``setting`` column (strategy and head, as the figures name
    them); ``sample_results`` the sample-level rows alike (None when the run has none). The other
    attributes are the folder's, read on first use.
    """

    folder: RunFolder
    results: pd.DataFrame
    sample_results: pd.DataFrame | None = None

    @property
    def run_dir(self) -> Path:
        return self.folder.path

    @property
    def predictions(self) -> pd.DataFrame | None:
        return self.folder.predictions

    @property
    def cells(self) -> pd.DataFrame | None:
        return self.folder.cells

    @property
    def models(self) -> dict[str, dict[str, Any]]:
        return self.folder.models

    @property
    def config(self) -> dict[str, Any]:
        return self.folder.config

    @property
    def environment(self) -> dict[str, Any]:
        return self.folder.environment

    @property
    def simulated(self) -> bool:
        """True when the cells came from the simulator (``config.data == "demo"``)."""
        return self.folder.simulated

    @property
    def model_list(self) -> list[str]:
        """Every model of the run, in the order the run config lists them (then any other, sorted)."""
        return self.folder.model_list

    @cached_property
    def label_design(self) -> str:
        """``per-sample`` when every sample's cells share one label, ``per-cell``, or ``unknown`` (no samples)."""
        return label_design(self.cells)

    @cached_property
    def sample_scores(self) -> pd.DataFrame:
        """Sample-level AUROC [bootstrap 95% interval] per model, setting and category value (computed once).

        Columns of `scdrugmap.evaluate.stats.sample_level_auroc`, and ``setting``.
        """
        table = sample_level_auroc(self.predictions, self.cells, self.results,
                                   seed=int(self.config.get("seed", 0) or 0))
        settings = self.results.drop_duplicates(["strategy", "head"]).set_index(["strategy", "head"])["setting"]
        table["setting"] = [settings.get((s, h), f"{s} · {h}") for s, h in zip(table["strategy"], table["head"],
                                                                                   strict=True)]
        return table

    @cached_property
    def comparisons(self) -> pd.DataFrame:
        """Paired tests per category: each model against the majority reference and the best baseline.

        `scdrugmap.evaluate.stats.compare_models` over all folds of a category's values, with ``setting``.
        """
        baselines = baseline_models(self.model_list, self.models)
        table = compare_models(self.results, baselines=baselines, by=CATEGORY_COLUMNS,
                               seed=int(self.config.get("seed", 0) or 0))
        settings = self.results.drop_duplicates(["strategy", "head"]).set_index(["strategy", "head"])["setting"]
        table["setting"] = [settings.get((s, h), f"{s} · {h}") for s, h in zip(table["strategy"], table["head"],
                                                                                   strict=True)]
        return table

    @cached_property
    def confounders(self) -> pd.DataFrame:
        """AUROC over all cells, within cell types and studies, and per value, per setting and category.

        `scdrugmap.evaluate.stats.confounder_auroc`, with ``setting``.
        """
        table = confounder_auroc(self.predictions, self.cells, self.results)
        settings = self.results.drop_duplicates(["strategy", "head"]).set_index(["strategy", "head"])["setting"]
        table["setting"] = [settings.get((s, h), f"{s} · {h}") for s, h in zip(table["strategy"], table["head"],
                                                                                   strict=True)]
        return table

    @cached_property
    def coincidences(self) -> list[str]:
        """Warnings where labels coincide with samples, cell lines or sublines (`label_coincidences`)."""
        if self.cells is None or "response" not in self.cells:
            return []
        labels = encode_labels(self.cells["response"].to_numpy(), source=str(self.run_dir))
        return [c.message() for c in label_coincidences(self.cells, labels, ObsKeys())]

    def embedding_models(self) -> list[str]:
        """Models with a saved embedding sample, in run order."""
        return self.folder.embedding_models()

    def embedding(self, model: str) -> tuple[np.ndarray, np.ndarray]:
        """Return (embedding (cells x dim) float32, cell names) of a model's saved sample."""
        return self.folder.embedding(model)

    def embedding_map(self, model: str) -> EmbeddingMap | None:
        """Return the 2-D map the run stored with a model's sample, or None (older runs)."""
        return self.folder.embedding_map(model)

    @property
    def seed(self) -> int:
        """The run's seed (0 when its config does not say)."""
        return int(self.config.get("seed", 0) or 0)


def settings_order(results: pd.DataFrame) -> list[str]:
    """Return the training settings (strategy + head) present, frozen before LoRA, MLP before logistic."""
    pairs = results[["strategy", "head"]].drop_duplicates().itertuples(index=False)

    def rank(pair) -> tuple:
        strategy, head = pair
        return (STRATEGY_ORDER.index(strategy) if strategy in STRATEGY_ORDER else len(STRATEGY_ORDER), strategy,
                HEAD_ORDER.index(head) if head in HEAD_ORDER else len(HEAD_ORDER), head)

    return [setting_name(s, h) for s, h in sorted(pairs, key=rank)]


def categories_order(results: pd.DataFrame) -> list[str]:
    """Return the categories present: tissue, cancer type, therapy, regimen first, then any other."""
    present = set(results["category"].astype(str))
    return [c for c in CATEGORY_KINDS if c in present] + sorted(present - set(CATEGORY_KINDS))


def _normalise_results(results: pd.DataFrame) -> pd.DataFrame:
    frame = results.copy()
    for column, default in ROW_DEFAULTS.items():
        if column not in frame:
            frame[column] = default
        frame[column] = frame[column].fillna(default).astype(str)
    for column in ("model", "category", "value", "fold", "status", "key"):
        if column not in frame:
            msg = f"results have no {column!r} column; is this a scdrugmap run directory?"
            raise ConfigError(msg)
        frame[column] = frame[column].astype(str)
    for name in METRICS:
        frame[name] = pd.to_numeric(frame[name], errors="coerce") if name in frame else np.nan
    frame["setting"] = [setting_name(s, h) for s, h in zip(frame["strategy"], frame["head"], strict=True)]
    if "also" in frame:  # values run once for several categories are shown under all their names
        also = frame["also"].fillna("").astype(str)
        frame["value"] = [value if not more else " = ".join([value, *(a.split("=", 1)[1] for a in more.split("; "))])
                          for value, more in zip(frame["value"], also, strict=True)]
    return frame


def read_run_data(run: str | Path | RunFolder) -> RunData:
    """Read a run folder (or take one already read) for a report.

    Raises
    ------
    ConfigError
        When the folder is not one or holds no results, or the results lack a job column.
    """
    folder = run if isinstance(run, RunFolder) else read_run(run)
    results = _normalise_results(folder.results)
    level = results.pop("level").fillna("cell") if "level" in results else pd.Series("cell", index=results.index)
    samples = results[level == "sample"].reset_index(drop=True)
    return RunData(folder=folder, results=results[level == "cell"].reset_index(drop=True),
                   sample_results=samples if len(samples) else None)


def scored(results: pd.DataFrame, *, scenario: str | None = None, split: str | None = None) -> pd.DataFrame:
    """Return the jobs that were scored (status ``done``), optionally of one scenario and split.

    Skipped and failed jobs have no metrics and are never plotted.
    """
    keep = results["status"] == "done"
    if scenario is not None:
        keep &= results["scenario"] == scenario
    if split is not None:
        keep &= results["split"] == split
    return results[keep]


def reference_split(results: pd.DataFrame) -> str:
    """Return the split the main figures show: ``sample`` (patient-grouped) when scored, else ``cell``."""
    done = scored(results, scenario="pooled")
    splits = set(done["split"])
    if "sample" in splits or not splits:
        return "sample"
    return sorted(splits)[0]


def labelled_predictions(run: RunData) -> pd.DataFrame | None:
    """Return the predictions joined to their job (model, setting, category, value, split, scenario)."""
    if run.predictions is None or run.predictions.empty:
        return None
    jobs = scored(run.results)[["key", "model", "setting", "strategy", "head", "scenario", "category", "value",
                                "fold", "split"]].drop_duplicates("key")
    predictions = run.predictions
    # what an inner merge on the key gives, row for row, without its join tables and copies (a full-size run
    # has millions of predictions): each prediction's job row by position, unscored and NaN predictions left out
    position = pd.Index(jobs["key"]).get_indexer(predictions["key"])
    keep = (position >= 0) & np.isfinite(predictions["probability"].to_numpy(dtype=np.float64))
    frame = predictions.copy(deep=False) if keep.all() else predictions[keep].reset_index(drop=True)
    for column in jobs.columns.drop("key"):
        frame[column] = jobs[column].to_numpy()[position[keep]]
    return frame
