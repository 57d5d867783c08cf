"""Read a run directory (the results store) into plain frames for the report.

The report reads only what a benchmark wrote: ``results.parquet`` (through
`scdrugmap.evaluate.store.read_results`), ``predictions.parquet``, ``cells.parquet``,
``embeddings/<model>.npz``, ``models.json`` and ``config.json``. Every file but the
results is optional; a figure that needs a missing file says so instead of failing.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from scdrugmap.data.schema import CATEGORY_KINDS
from scdrugmap.errors import ConfigError
from scdrugmap.evaluate.metrics import METRICS
from scdrugmap.evaluate.store import read_results
from scdrugmap.report.style import setting_name

log = logging.getLogger(__name__)

#: Columns a job row must have; older runs without ``head``/``split``/``strategy`` get these defaults.
ROW_DEFAULTS: dict[str, str] = {"strategy": "frozen", "head": "mlp", "split": "sample", "scenario": "pooled"}
STRATEGY_ORDER = ("frozen", "lora")
HEAD_ORDER = ("mlp", "logistic")


@dataclass
class RunData:
    """Everything a report shows about one run, read from its directory."""

    run_dir: Path
    results: pd.DataFrame
    predictions: pd.DataFrame | None = None
    cells: pd.DataFrame | None = None
    models: dict[str, dict[str, Any]] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    environment: dict[str, Any] = field(default_factory=dict)

    @property
    def simulated(self) -> bool:
        """True when the cells came from the simulator (``config.data == "demo"``)."""
        return str(self.config.get("data", "")) == "demo"

    @property
    def model_list(self) -> list[str]:
        """Every model of the run, in the order the run config lists them (then any other, sorted)."""
        listed = [str(m) for m in self.config.get("models", [])]
        present = set(self.results["model"].astype(str))
        return [m for m in listed if m in present] + sorted(present - set(listed))

    def embedding_models(self) -> list[str]:
        """Models with a saved embedding sample (``embeddings/<model>.npz``), in run order."""
        folder = self.run_dir / "embeddings"
        saved = {path.stem for path in folder.glob("*.npz")} if folder.exists() else set()
        return [m for m in self.model_list if m in saved] + sorted(saved - set(self.model_list))

    def embedding(self, model: str) -> tuple[np.ndarray, np.ndarray]:
        """Return (embedding (cells x dim) float32, cell names) of a model's saved sample."""
        path = self.run_dir / "embeddings" / f"{model}.npz"
        with np.load(path, allow_pickle=False) as saved:
            embedding = np.asarray(saved["embedding"], dtype=np.float32)
            try:
                cells = np.asarray(saved["cell"]).astype(str)
            except ValueError as err:  # an object array would need pickle: never load one
                msg = (f"{path}: cell names are stored as a pickled object array, which is not loaded. "
                       "Rerun the benchmark with this scDrugMap version to rewrite the embedding sample.")
                raise ConfigError(msg) from err
        return embedding, cells


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
    return frame


def _read_json(path: Path) -> dict[str, Any]:
    if not path.exists():
        log.info("%s is missing; the report leaves out what it would show", path)
        return {}
    return json.loads(path.read_text())


def read_run(run_dir: str | Path) -> RunData:
    """Read a run directory for a report.

    Raises
    ------
    ConfigError
        When the folder holds no results.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        msg = f"{run_dir} is not a folder; give the --out folder of a `scdrugmap benchmark` run."
        raise ConfigError(msg)
    results = _normalise_results(read_results(run_dir))
    predictions = None
    if (run_dir / "predictions.parquet").exists():
        predictions = pd.read_parquet(run_dir / "predictions.parquet")
        predictions["key"] = predictions["key"].astype(str)
    cells = pd.read_parquet(run_dir / "cells.parquet") if (run_dir / "cells.parquet").exists() else None
    facts = _read_json(run_dir / "config.json")
    return RunData(run_dir=run_dir, results=results, predictions=predictions, cells=cells,
                   models=_read_json(run_dir / "models.json"), config=facts.get("config", {}),
                   environment=facts.get("environment", {}))


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
