"""Benchmark results in the database: import a run folder, and summarise it for the explorer.

A run folder is what ``scdrugmap benchmark --out RUN_DIR`` writes (`scdrugmap.evaluate.store`).
Importing the same folder again replaces its rows, so a re-import after a resumed run is safe.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import pandas as pd
from fastapi import HTTPException
from sqlalchemy import delete, func, insert, select
from sqlalchemy.orm import Session

from scdrugmap.errors import ConfigError
from scdrugmap.evaluate.metrics import METRICS, summarise
from scdrugmap.evaluate.store import read_run
from scdrugmap.report.serialise import make_json_safe
from scdrugmap.web.db import MAX_ID, BenchmarkResult, BenchmarkRun, utcnow

log = logging.getLogger(__name__)

REQUIRED_COLUMNS = ("key", "model", "strategy", "head", "scenario", "category", "value", "fold", "split", "status")
NUMBER_COLUMNS = ("n_train", "n_test", "seconds", *METRICS)
#: Explorer choices, in the order the page shows them.
CHOICES = ("category", "strategy", "head", "scenario", "split")


def _number(value: Any) -> float | int | None:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    try:
        return None if pd.isna(value) else value.item() if hasattr(value, "item") else value
    except (TypeError, ValueError):
        return None


def import_results(session: Session, run_dir: str | Path) -> BenchmarkRun:
    """Import (or re-import) the results store in ``run_dir``.

    Raises
    ------
    ConfigError
        When ``run_dir`` is not a folder or holds no results, or its rows lack the columns of a results store.
    """
    run_dir = Path(run_dir).expanduser().resolve()
    folder = read_run(run_dir)
    results = folder.results
    if "level" in results:  # the explorer shows cell-level rows; sample-level ones are in the run's report
        results = results[results["level"] == "cell"]
    missing = [c for c in REQUIRED_COLUMNS if c not in results.columns]
    if missing:
        msg = f"{run_dir}: results lack the columns {missing}; is this a `scdrugmap benchmark` run folder?"
        raise ConfigError(msg)
    config = json.loads(json.dumps(folder.config, default=str))
    fingerprint = None if folder.fingerprint is None else folder.fingerprint[:64]
    run = session.scalar(select(BenchmarkRun).where(BenchmarkRun.source == str(run_dir)))
    if run is None:
        run = BenchmarkRun(source=str(run_dir))
        session.add(run)
    else:
        session.execute(delete(BenchmarkResult).where(BenchmarkResult.run_id == run.id))
    run.name = run_dir.name
    run.fingerprint = fingerprint
    run.config = config
    run.n_jobs = len(results)
    run.imported_at = utcnow()
    session.flush()
    rows = []
    for record in results.to_dict("records"):
        row: dict[str, Any] = {"run_id": run.id, **{c: str(record[c]) for c in REQUIRED_COLUMNS}}
        row.update({c: _number(record.get(c)) for c in NUMBER_COLUMNS})
        reasons = record.get("reasons")
        row["reasons"] = None if reasons is None or (isinstance(reasons, float) and math.isnan(reasons)) else str(reasons)
        rows.append(row)
    if rows:
        session.execute(insert(BenchmarkResult), rows)
    session.commit()
    log.info("imported benchmark results", extra={"run": run.name, "jobs": len(rows)})
    return run


def list_runs(session: Session) -> list[BenchmarkRun]:
    return list(session.scalars(select(BenchmarkRun).order_by(BenchmarkRun.imported_at.desc(), BenchmarkRun.id)))


def run_frame(session: Session, run_id: int, **filters: str | None) -> pd.DataFrame:
    """Return the result rows of one run (optionally only those matching ``filters``) as a frame."""
    columns = [getattr(BenchmarkResult, c) for c in (*REQUIRED_COLUMNS, *NUMBER_COLUMNS)]
    query = select(*columns).where(BenchmarkResult.run_id == run_id)
    for name, value in filters.items():
        if value is not None:
            query = query.where(getattr(BenchmarkResult, name) == value)
    rows = session.execute(query).all()
    frame = pd.DataFrame(rows, columns=[*REQUIRED_COLUMNS, *NUMBER_COLUMNS])
    for metric in METRICS:
        frame[metric] = pd.to_numeric(frame[metric], errors="coerce")
    return frame


def choices(session: Session, run_id: int) -> dict[str, list[str]]:
    """Return the values present in a run for each explorer choice (category, strategy, ...)."""
    found = {}
    for name in CHOICES:
        column = getattr(BenchmarkResult, name)
        found[name] = sorted(session.scalars(select(column).where(BenchmarkResult.run_id == run_id)
                                             .group_by(column)))
    return found


def pick(options: dict[str, list[str]], requested: dict[str, str | None]) -> dict[str, str | None]:
    """Return the requested choices where the run has them, else a sensible default for each."""
    preferred = {"strategy": "frozen", "head": "mlp", "scenario": "pooled", "split": "sample"}
    picked: dict[str, str | None] = {}
    for name, values in options.items():
        value = requested.get(name)
        if value not in values:
            value = preferred.get(name) if preferred.get(name) in values else (values[0] if values else None)
        picked[name] = value
    return picked


def explorer_tables(frame: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Return (per model, per model and category value) mean and sd of every metric, with scored/unscored fold counts."""
    tables = []
    for by in (["model"], ["model", "value"]):
        if frame.empty:
            tables.append(pd.DataFrame(columns=[*by, "n_folds", "n_not_scored"]))
            continue
        table = summarise(frame, by)
        unscored = frame[frame["status"] != "done"].groupby(by, observed=True).size().rename("n_not_scored")
        table = table.merge(unscored.reset_index(), on=by, how="outer")
        table = table.fillna({"n_folds": 0, "n_not_scored": 0}).astype({"n_folds": int, "n_not_scored": int})
        tables.append(table.sort_values(by, ignore_index=True))
    return tables[0], tables[1]


def category_table(frame: pd.DataFrame) -> pd.DataFrame:
    """Return mean and sd of every metric per model and category (over all values and folds)."""
    if frame.empty:
        return pd.DataFrame(columns=["model", "category", "n_folds"])
    return summarise(frame, ["model", "category"])


def count_results(session: Session, run_id: int) -> int:
    return int(session.scalar(select(func.count()).select_from(BenchmarkResult)
                              .where(BenchmarkResult.run_id == run_id)) or 0)


# --- view helpers shared by the API and the pages ------------------------------------------------------------

def records(frame: Any) -> list[dict[str, Any]]:
    """Return a frame's rows as JSON-safe dicts (NaN and NA become null)."""
    return [make_json_safe(row) for row in frame.to_dict("records")]


def dataset_facts(dataset_id: str) -> dict[str, Any]:
    """Return one data set's catalog row and its cells per category value; 404 when unknown."""
    from scdrugmap.data.catalog import get_dataset, load_category_counts

    try:
        row = get_dataset(dataset_id)
    except ConfigError as err:
        raise HTTPException(404, str(err)) from err
    counts = load_category_counts()
    holding = counts[counts["dataset_ids"].astype(str).str.split().apply(lambda ids: row["dataset_id"] in ids)]
    cells = [{"category": str(c["category"]), "value": str(c["value"]), "n_cells": int(c["n_cells"]),
              "n_sensitive": int(c["n_sensitive"]), "n_resistant": int(c["n_resistant"])}
             for c in holding.to_dict("records")]
    facts = make_json_safe(dict(row))
    if facts.get("pmid") is not None:
        facts["pmid"] = str(facts["pmid"]).removesuffix(".0")
    return {"facts": facts, "cells": cells}


def run_summary(session: Session, run_id: int, requested: dict[str, str | None]) -> dict[str, Any]:
    """Return the explorer's data for one run: choices, the picked ones, and the two summary tables.

    Raises
    ------
    HTTPException
        404 when there is no run ``run_id``.
    """
    run = session.get(BenchmarkRun, run_id) if 0 < run_id <= MAX_ID else None  # a larger id overflows the database
    if run is None:
        raise HTTPException(404, f"no benchmark run {run_id}; see /api/runs.")
    options = choices(session, run_id)
    picked = pick(options, requested)
    frame = run_frame(session, run_id, **picked)
    by_model, by_value = explorer_tables(frame)
    return {"run": run.name, "choices": options, "picked": picked, "by_model": records(by_model),
            "by_value": records(by_value), "_by_model": by_model, "_by_value": by_value}
