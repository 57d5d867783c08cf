"""A benchmark run as the report shows it: the run folder read through the store, results normalised.

The report reads only what a benchmark wrote, through `scdrugmap.evaluate.store.read_run`
(`RunFolder`): results, predictions, cells, embedding samples, model facts and the run's config.
Every file but the results is optional; a figure that needs a missing file says so instead of
failing.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from scdrugmap.data.schema import CATEGORY_KINDS
from scdrugmap.errors import ConfigError
from scdrugmap.evaluate.metrics import METRICS
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

    ``results`` has every column of `ROW_DEFAULTS` (filled for older runs), text keys, numeric
    metrics and a ``setting`` column (strategy and head, as the figures name them). The other
    attributes are the folder's, read on first use.
    """

    folder: RunFolder
    results: pd.DataFrame

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
    return RunData(folder=folder, results=_normalise_results(folder.results))


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
                                "fold", "split"]]
    frame = run.predictions.merge(jobs, on="key", how="inner")
    frame = frame[np.isfinite(frame["probability"].to_numpy(dtype=np.float64))]
    return frame
