"""The results store of a run directory: one file per finished job, written atomically.

``jobs/<id>.parquet`` holds a job's row and ``predictions/<id>.parquet`` its per-cell
predictions; a job counts as finished once its row file exists (it is renamed into
place after its predictions), so a killed run leaves no half job and a rerun skips
exactly the finished ones. `consolidate` gathers them into ``results.parquet`` and
``predictions.parquet``.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import pandas as pd

from scdrugmap.errors import ConfigError

RESULTS = "results.parquet"
PREDICTIONS = "predictions.parquet"


def job_id(key: str) -> str:
    """Return a file-safe id for a job key."""
    return hashlib.sha1(key.encode()).hexdigest()[:20]


def _write_parquet_atomic(frame: pd.DataFrame, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    frame.to_parquet(tmp, index=False)
    os.replace(tmp, path)


class ResultStore:
    """Results of one benchmark run, kept in ``run_dir``."""

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)
        self.jobs_dir = self.run_dir / "jobs"
        self.predictions_dir = self.run_dir / "predictions"

    def _job_path(self, key: str) -> Path:
        return self.jobs_dir / f"{job_id(key)}.parquet"

    def status(self, key: str) -> str | None:
        """Return the stored status of a job (``done``, ``skipped``, ``failed``) or None."""
        path = self._job_path(key)
        if not path.exists():
            return None
        return str(pd.read_parquet(path, columns=["status"])["status"].iloc[0])

    def finished_keys(self) -> set[str]:
        """Return the keys of every job stored as done or skipped (failed jobs are retried)."""
        if not self.jobs_dir.exists():
            return set()
        keys = set()
        for path in self.jobs_dir.glob("*.parquet"):
            row = pd.read_parquet(path, columns=["key", "status"])
            if row["status"].iloc[0] in {"done", "skipped"}:
                keys.add(str(row["key"].iloc[0]))
        return keys

    def write_job(self, row: dict[str, Any], predictions: pd.DataFrame | None = None) -> None:
        """Store one finished job: its predictions first, then its row (which marks it finished)."""
        self.jobs_dir.mkdir(parents=True, exist_ok=True)
        identifier = job_id(row["key"])
        if predictions is not None and len(predictions):
            self.predictions_dir.mkdir(parents=True, exist_ok=True)
            _write_parquet_atomic(predictions.assign(key=row["key"]), self.predictions_dir / f"{identifier}.parquet")
        frame = pd.DataFrame([{k: (json.dumps(v) if isinstance(v, dict | list) else v) for k, v in row.items()}])
        _write_parquet_atomic(frame, self.jobs_dir / f"{identifier}.parquet")

    def results(self) -> pd.DataFrame:
        """Return every stored job row (one per job)."""
        files = sorted(self.jobs_dir.glob("*.parquet")) if self.jobs_dir.exists() else []
        if not files:
            return pd.DataFrame()
        return pd.concat([pd.read_parquet(path) for path in files], ignore_index=True).sort_values("key",
                                                                                                    ignore_index=True)

    def consolidate(self) -> pd.DataFrame:
        """Write ``results.parquet`` and ``predictions.parquet`` from the per-job files; return the results."""
        results = self.results()
        if results.empty:
            return results
        _write_parquet_atomic(results, self.run_dir / RESULTS)
        parts = sorted(self.predictions_dir.glob("*.parquet")) if self.predictions_dir.exists() else []
        if parts:
            done = set(results.loc[results["status"] == "done", "key"])
            frames = [frame for frame in (pd.read_parquet(p) for p in parts) if frame["key"].iloc[0] in done]
            if frames:
                _write_parquet_atomic(pd.concat(frames, ignore_index=True), self.run_dir / PREDICTIONS)
        return results

    def check_data(self, fingerprint: str) -> None:
        """Refuse to mix results of different data in one run directory."""
        path = self.run_dir / "data_fingerprint.txt"
        if path.exists() and path.read_text().strip() != fingerprint:
            msg = (f"{self.run_dir} holds results for other data (fingerprint differs). "
                   "Use a new --out folder, or delete this one to start over.")
            raise ConfigError(msg)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(fingerprint)


def read_results(run_dir: str | Path) -> pd.DataFrame:
    """Read a run's ``results.parquet`` (or its per-job files when the run was cut short)."""
    run_dir = Path(run_dir)
    if (run_dir / RESULTS).exists():
        return pd.read_parquet(run_dir / RESULTS)
    results = ResultStore(run_dir).results()
    if results.empty:
        msg = f"{run_dir}: no results found; run `scdrugmap benchmark --out {run_dir}` first."
        raise ConfigError(msg)
    return results
