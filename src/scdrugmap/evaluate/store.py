"""The run folder: the one module that knows its files. It writes each of them atomically and reads them back.

A run folder is what ``scdrugmap benchmark --out RUN_DIR`` (`scdrugmap.evaluate.runner.run_benchmark`)
writes. `ResultStore` writes it while the grid runs; `read_run` reads it back (`RunFolder`) for
the report, the web server and users. Its files:

``config.json``
    ``{"config": <the resolved BenchmarkConfig>, "environment": {python, platform, packages}}``.
``data_fingerprint.txt``
    The content hash of the data; a folder refuses results of other data.
``splits.parquet``
    Pooled test-fold numbers per cell (index ``cell``; one int8 column per category, split policy,
    fold count and seed; -1 where a cell is in no test fold), reused when the run resumes.
``cells.parquet``
    One row per cell: ``cell``, and where the data has them ``response``, ``study``, ``sample``,
    ``dataset``, ``tissue``, ``cancer_type``, ``therapy``, ``regimen``, ``cell_type`` and columns naming
    cell lines, sublines, donors or batches (as text).
``jobs/<id>.parquet``, ``predictions/<id>.parquet``
    One finished job's rows (``level`` ``cell``, and ``sample`` where samples are known), and its per-cell predictions (``cell``, ``label``, ``probability``,
    ``key``). A job counts as finished once its row file exists (it is renamed into place after its
    predictions), so a killed run leaves no half job and a rerun skips exactly the finished ones.
``results.parquet``, ``predictions.parquet``
    All job rows (one per job and level), and the predictions of every scored job, gathered by `consolidate`.
``permutations.parquet``
    The label-permutation null (``--permutations N``): one row per permutation, model, setting and
    fold (``model``, ``strategy``, ``head``, ``scenario``, ``category``, ``value``, ``fold``, ``split``,
    ``permutation``, ``auroc`` against the permuted labels).
``models.json``
    Facts per model: embedding time and cache use, size, input kind, LoRA targets.
``embeddings/<model>.npz``
    Up to `EMBEDDING_SAMPLE` cells' embeddings (``embedding`` float32, ``cell`` names) and their
    2-D map, computed once in the run (``coordinates`` float32 cells x 2, NaN where the embedding
    is not finite; ``projection``: the method used, ``umap`` or ``pca``; ``projection_requested``;
    ``projection_seed``; ``projection_note``: why it fell back to PCA, or empty). Folders of older
    runs have no map; readers compute one (`RunFolder.embedding_map` is then None).
``biomarkers/``
    A biomarker analysis of the run (``scdrugmap biomarkers DATA --model M --run RUN_DIR``, which writes
    here by default; `scdrugmap.tl.Biomarkers.write`): the files of `BIOMARKER_FILES`, read back by
    `read_biomarkers` (`RunFolder.biomarkers`) for the report. Any ``--out`` folder of
    ``scdrugmap biomarkers`` has the same files.

Every file is written to ``<name>.tmp`` first and renamed into place (`os.replace`), so a reader
never sees half a file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from scdrugmap.data import schema
from scdrugmap.errors import ConfigError, SplitError
from scdrugmap.evaluate.metrics import METRICS, compute_sample_metrics
from scdrugmap.evaluate.stats import within_fold_auroc

if TYPE_CHECKING:
    import numpy.typing as npt

    from scdrugmap.evaluate.grid import Job
    from scdrugmap.evaluate.projection import Projection
    from scdrugmap.models.cache import EmbeddingFile

log = logging.getLogger(__name__)

CONFIG = "config.json"
FINGERPRINT = "data_fingerprint.txt"
SPLITS = "splits.parquet"
CELLS = "cells.parquet"
RESULTS = "results.parquet"
PREDICTIONS = "predictions.parquet"
MODELS = "models.json"
PERMUTATIONS = "permutations.parquet"
JOBS_DIR = "jobs"
PREDICTIONS_DIR = "predictions"
EMBEDDINGS_DIR = "embeddings"
EMBEDDING_SUFFIX = ".npz"
BIOMARKERS_DIR = "biomarkers"
#: The files of a biomarker folder by role (`scdrugmap.tl.Biomarkers.write`; figures only where they show something).
BIOMARKER_FILES = {"table": "biomarkers.parquet", "enrichment": "enrichment.parquet", "facts": "biomarkers.json",
                   "volcano": "volcano.png", "dotplot": "dotplot.png", "attribution": "attribution.png",
                   "enrichment_figure": "enrichment.png"}
#: The figures of a biomarker folder, in the order a report shows them.
BIOMARKER_FIGURES = ("volcano", "dotplot", "attribution", "enrichment_figure")
#: Every file of a run folder, by name (folders end in ``/``): what `scdrugmap.evaluate.store` alone names.
FILE_NAMES = (CONFIG, FINGERPRINT, SPLITS, CELLS, RESULTS, PREDICTIONS, MODELS, PERMUTATIONS, f"{JOBS_DIR}/",
              f"{PREDICTIONS_DIR}/", f"{EMBEDDINGS_DIR}/", f"{BIOMARKERS_DIR}/")
#: Most cells of a model's embedding sample.
EMBEDDING_SAMPLE = 5000
#: Package versions recorded with a run.
RECORDED_PACKAGES = ("scdrugmap", "torch", "numpy", "scikit-learn", "anndata", "transformers", "peft")


def job_id(key: str) -> str:
    """Return a file-safe id for a job key."""
    return hashlib.sha1(key.encode()).hexdigest()[:20]


def _write_atomic(path: Path, write: Callable[[Path], object]) -> None:
    """Write ``path`` through ``write(tmp)`` into ``<path>.tmp``, then rename it into place."""
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def _write_parquet_atomic(frame: pd.DataFrame, path: Path, *, index: bool | None = False) -> None:
    _write_atomic(path, lambda tmp: frame.to_parquet(tmp, index=index))


def _concat_parquet_atomic(parts: list[Path], path: Path) -> None:
    """Write the rows of the parquet files ``parts`` one after another into ``path``, one part in memory at a time.

    A column some parts lack is null there (NaN in pandas), as ``pd.concat`` fills it; a run's
    predictions at full size (cells x jobs) never sit in memory whole.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.unify_schemas([pq.read_schema(part).remove_metadata() for part in parts])

    def write(tmp: Path) -> None:
        with pq.ParquetWriter(tmp, schema) as writer:
            for part in parts:
                table = pq.read_table(part).replace_schema_metadata(None)
                for name in schema.names:
                    if name not in table.column_names:
                        table = table.append_column(schema.field(name), pa.nulls(table.num_rows, schema.field(name).type))
                writer.write_table(table.select(schema.names).cast(schema))

    _write_atomic(path, write)


def _write_npz_atomic(arrays: dict[str, Any], path: Path) -> None:
    def write(tmp: Path) -> None:
        with tmp.open("wb") as handle:  # a handle: numpy would add .npz to the name of a path
            np.savez_compressed(handle, **arrays)

    _write_atomic(path, write)


def _write_text_atomic(text: str, path: Path) -> None:
    _write_atomic(path, lambda tmp: tmp.write_text(text))


def _read_json(path: Path) -> dict[str, Any]:
    if not path.exists():
        log.info("%s is missing; what it would hold is left out", path)
        return {}
    return json.loads(path.read_text())


@dataclass(frozen=True)
class EmbeddingMap:
    """A model's stored 2-D map of its embedding sample, row for row with `RunFolder.embedding`.

    Attributes
    ----------
    coordinates
        Float32, cells x 2; NaN where the cell's embedding is not finite.
    method
        The method that made it: ``umap`` or ``pca``.
    requested
        The method asked for (``auto``, ``umap`` or ``pca``).
    seed
        The seed it was made with.
    note
        Why ``method`` is PCA although UMAP could have been chosen (``auto``), else empty.
    """

    coordinates: npt.NDArray[np.float32]
    method: str
    requested: str
    seed: int
    note: str = ""


def _embedding_map_arrays(sample: np.ndarray, projection: Projection, seed: int) -> dict[str, np.ndarray]:
    """Return the arrays of a sample's 2-D map as the embedding file stores them (none without a 2-D view)."""
    from scdrugmap.evaluate.projection import project_embedding, umap_fallback_reason

    coordinates, method = project_embedding(sample, method=projection, seed=seed)
    if coordinates is None or method is None:
        return {}
    note = ""
    if method == "pca" and projection != "pca":
        note = umap_fallback_reason(int(np.isfinite(sample).all(axis=1).sum())) or ""
    return {"coordinates": coordinates, "projection": np.asarray(method), "projection_requested": np.asarray(projection),
            "projection_seed": np.asarray(seed, dtype=np.int64), "projection_note": np.asarray(note)}


def results_file(run_dir: str | Path) -> Path:
    """Return the path of a run's consolidated results (one row per job and level)."""
    return Path(run_dir) / RESULTS


def biomarkers_dir(run_dir: str | Path) -> Path:
    """Return the folder of a run's biomarker analysis (``scdrugmap biomarkers --run RUN_DIR`` writes there)."""
    return Path(run_dir) / BIOMARKERS_DIR


@dataclass
class BiomarkerFolder:
    """A biomarker analysis read back (`read_biomarkers`).

    Attributes
    ----------
    path
        The folder.
    table
        One row per gene, comparison, stratum and test (`scdrugmap.tl.BIOMARKER_COLUMNS`).
    enrichment
        One row per comparison, method and gene set; None when no gene sets were given.
    facts
        What was run on what (`scdrugmap.tl.Biomarkers.facts`): comparisons, groups, tests, attribution, ...
    figures
        Path of each figure written, by role (``volcano``, ``dotplot``, ``attribution``, ``enrichment_figure``).
    """

    path: Path
    table: pd.DataFrame
    enrichment: pd.DataFrame | None
    facts: dict[str, Any]
    figures: dict[str, Path]


def read_biomarkers(folder: str | Path) -> BiomarkerFolder:
    """Read a folder written by `scdrugmap.tl.Biomarkers.write` (a run's `biomarkers_dir`, or any ``--out``).

    Raises
    ------
    ConfigError
        When the folder holds no biomarker table.
    """
    folder = Path(folder)
    table_path = folder / BIOMARKER_FILES["table"]
    if not table_path.is_file():
        msg = f"{folder}: no {BIOMARKER_FILES['table']}; run `scdrugmap biomarkers` with --out {folder} first."
        raise ConfigError(msg)
    enrichment_path = folder / BIOMARKER_FILES["enrichment"]
    figures = {role: folder / BIOMARKER_FILES[role] for role in BIOMARKER_FIGURES
               if (folder / BIOMARKER_FILES[role]).is_file()}
    return BiomarkerFolder(path=folder, table=pd.read_parquet(table_path),
                           enrichment=pd.read_parquet(enrichment_path) if enrichment_path.is_file() else None,
                           facts=_read_json(folder / BIOMARKER_FILES["facts"]), figures=figures)


class ResultStore:
    """Write a run folder while its grid runs (and read the job files a resume needs)."""

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)
        self.jobs_dir = self.run_dir / JOBS_DIR
        self.predictions_dir = self.run_dir / PREDICTIONS_DIR

    def _job_path(self, key: str) -> Path:
        return self.jobs_dir / f"{job_id(key)}.parquet"

    # --- jobs ------------------------------------------------------------------------------------------

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

    def has_jobs(self) -> bool:
        """Return True when at least one job is stored."""
        return self.jobs_dir.exists() and next(self.jobs_dir.glob("*.parquet"), None) is not None

    def write_job(self, rows: dict[str, Any] | list[dict[str, Any]], predictions: pd.DataFrame | None = None) -> None:
        """Store one finished job: its predictions first, then its rows (which mark it finished).

        ``rows`` is the job's row, or its rows per level (``cell`` first, then ``sample``).
        """
        rows = [rows] if isinstance(rows, dict) else rows
        key = rows[0]["key"]
        self.jobs_dir.mkdir(parents=True, exist_ok=True)
        identifier = job_id(key)
        if predictions is not None and len(predictions):
            self.predictions_dir.mkdir(parents=True, exist_ok=True)
            _write_parquet_atomic(predictions.assign(key=key), self.predictions_dir / f"{identifier}.parquet")
        frame = pd.DataFrame([{k: (json.dumps(v) if isinstance(v, dict | list) else v) for k, v in row.items()}
                              for row in rows])
        _write_parquet_atomic(frame, self.jobs_dir / f"{identifier}.parquet")

    def results(self) -> pd.DataFrame:
        """Return every stored job row (one per job and level), sorted by key, cell level first."""
        files = sorted(self.jobs_dir.glob("*.parquet")) if self.jobs_dir.exists() else []
        if not files:
            return pd.DataFrame()
        results = pd.concat([pd.read_parquet(path) for path in files], ignore_index=True)
        if "level" not in results:
            results["level"] = "cell"
        results["level"] = results["level"].fillna("cell")
        return results.sort_values(["key", "level"], ignore_index=True)

    def consolidate(self) -> pd.DataFrame:
        """Write ``results.parquet`` and ``predictions.parquet`` from the per-job files; return the results."""
        results = self.results()
        if results.empty:
            return results
        _write_parquet_atomic(results, self.run_dir / RESULTS)
        parts = sorted(self.predictions_dir.glob("*.parquet")) if self.predictions_dir.exists() else []
        done = {job_id(key) for key in results.loc[results["status"] == "done", "key"]}
        if parts := [part for part in parts if part.stem in done]:
            _concat_parquet_atomic(parts, self.run_dir / PREDICTIONS)
        return results

    # --- the run's data --------------------------------------------------------------------------------

    def check_data(self, fingerprint: str) -> None:
        """Refuse to mix results of different data in one run directory; record the data's fingerprint."""
        path = self.run_dir / FINGERPRINT
        if path.exists() and path.read_text().strip() != fingerprint:
            msg = (f"{self.run_dir} holds results for other data (fingerprint differs). "
                   "Use a new --out folder, or delete this one to start over.")
            raise ConfigError(msg)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        _write_text_atomic(fingerprint, path)

    def write_config(self, config: dict[str, Any]) -> None:
        """Write the run's resolved settings with the Python, platform and package versions running it."""
        import importlib.metadata as metadata

        versions = {}
        for package in RECORDED_PACKAGES:
            try:
                versions[package] = metadata.version(package)
            except metadata.PackageNotFoundError:
                continue
        facts = {"config": config, "environment": {"python": platform.python_version(),
                                                   "platform": platform.platform(), "packages": versions}}
        _write_text_atomic(json.dumps(facts, indent=1, default=str), self.run_dir / CONFIG)

    def read_splits(self, obs_names: pd.Index) -> dict[str, npt.NDArray[np.int8]]:
        """Return the saved pooled fold numbers per cell by name (empty when none are saved).

        Raises
        ------
        SplitError
            When they were saved for other cells than ``obs_names``.
        """
        path = self.run_dir / SPLITS
        if not path.exists():
            return {}
        frame = pd.read_parquet(path)
        if not frame.index.equals(pd.Index(obs_names.astype(str))):
            msg = f"{path}: the saved splits belong to other cells than this data; use a new --out folder."
            raise SplitError(msg)
        return {column: frame[column].to_numpy() for column in frame.columns}

    def write_splits(self, obs_names: pd.Index, assignments: dict[str, npt.NDArray[np.int8]]) -> None:
        """Write pooled test-fold numbers per cell (one column per category, policy, fold count and seed)."""
        frame = pd.DataFrame(assignments, index=pd.Index(obs_names.astype(str), name="cell"))
        _write_parquet_atomic(frame, self.run_dir / SPLITS, index=None)

    def save_cells(self, obs: pd.DataFrame, keys: schema.ObsKeys) -> None:
        """Write each cell's label, categories, cell type and the columns naming its units, for reports."""
        from scdrugmap.data.confounders import unit_columns

        columns = {"response": keys.response, "study": keys.study, "sample": keys.sample, "dataset": keys.dataset,
                   **{kind: keys.category(kind) for kind in schema.CATEGORY_KINDS}, "cell_type": keys.cell_type,
                   **{column: column for column, _ in unit_columns(list(obs.columns), keys)
                      if column not in {keys.sample, keys.dataset, keys.study}}}
        frame = pd.DataFrame({"cell": obs.index.astype(str)})
        for name, column in columns.items():
            if column in obs:
                frame[name] = obs[column].astype(str).to_numpy()
        _write_parquet_atomic(frame, self.run_dir / CELLS)

    def save_embedding_sample(self, model: str, embeddings: np.ndarray | EmbeddingFile, obs_names: pd.Index, *,
                              seed: int, projection: Projection | None = "auto") -> None:
        """Write up to `EMBEDDING_SAMPLE` cells' embeddings of ``model`` (drawn with ``seed``) and their 2-D map.

        The map (`scdrugmap.evaluate.projection.project_embedding` of the sample, with ``seed``) is
        computed here, once per model and run, so reports reuse it; ``projection=None`` stores none.
        """
        rng = np.random.default_rng(seed)
        rows = np.arange(embeddings.shape[0])
        if rows.size > EMBEDDING_SAMPLE:
            rows = np.sort(rng.choice(rows, EMBEDDING_SAMPLE, replace=False))
        sample = np.asarray(embeddings[rows], dtype=np.float32)
        arrays: dict[str, Any] = {"embedding": sample, "cell": np.asarray(obs_names[rows], dtype=str)}
        if projection is not None:
            arrays.update(_embedding_map_arrays(sample, projection, seed))
        folder = self.run_dir / EMBEDDINGS_DIR
        folder.mkdir(exist_ok=True)
        _write_npz_atomic(arrays, folder / f"{model}{EMBEDDING_SUFFIX}")

    def add_embedding_maps(self, *, seed: int, projection: Projection = "auto") -> list[str]:
        """Add the 2-D map to every embedding sample saved without one (``projection=None``); return their models.

        A run computes the maps after its models' jobs, so UMAP's compiled code (which stays in memory)
        never sits beside a model's embeddings; a run cut short before adds them when resumed.
        """
        folder = self.run_dir / EMBEDDINGS_DIR
        added = []
        for path in sorted(folder.glob(f"*{EMBEDDING_SUFFIX}")) if folder.exists() else []:
            with np.load(path, allow_pickle=False) as saved:
                if "coordinates" in saved.files:
                    continue
                arrays: dict[str, Any] = {name: saved[name] for name in saved.files}
            arrays.update(_embedding_map_arrays(np.asarray(arrays["embedding"], dtype=np.float32), projection, seed))
            _write_npz_atomic(arrays, path)
            added.append(path.name.removesuffix(EMBEDDING_SUFFIX))
        return added

    def read_permutations(self) -> pd.DataFrame:
        """Return the label-permutation null computed so far (empty when none)."""
        path = self.run_dir / PERMUTATIONS
        return pd.read_parquet(path) if path.exists() else pd.DataFrame()

    def add_permutations(self, rows: pd.DataFrame) -> None:
        """Add rows of the label-permutation null to those stored (the file is rewritten atomically)."""
        frame = pd.concat([self.read_permutations(), rows], ignore_index=True)
        _write_parquet_atomic(frame, self.run_dir / PERMUTATIONS)

    def model_facts(self) -> dict[str, dict[str, Any]]:
        """Return the facts stored per model (empty when none are)."""
        path = self.run_dir / MODELS
        return json.loads(path.read_text()) if path.exists() else {}

    def write_model_facts(self, facts: dict[str, dict[str, Any]]) -> None:
        """Add (or replace) the facts of these models to those already stored."""
        path = self.run_dir / MODELS
        previous = self.model_facts()
        _write_text_atomic(json.dumps({**previous, **facts}, indent=1, default=str), path)


class JobWriter:
    """Turn a job and its outcome into its results row (and its predictions), and store them.

    The per-cell sample names are read once per run, not once per job.
    """

    def __init__(self, store: ResultStore, obs: pd.DataFrame, sample_column: str, labels: np.ndarray,
                 strata: dict[str, str] | None = None) -> None:
        self.store, self.labels = store, labels
        self.cells = obs.index.astype(str)
        self.samples = obs[sample_column].astype(str).to_numpy() if sample_column in obs else None
        #: Per confounder (``cell_type``, ``study``), each cell's group: AUROC is also scored within them.
        self.strata = {name: obs[column].astype(str).to_numpy() for name, column in (strata or {}).items()
                       if column in obs}

    def row(self, job: Job, *, status: str, metrics: dict[str, float], reasons: dict[str, Any], seconds: float,
            extra: dict[str, Any]) -> dict[str, Any]:
        fold, samples = job.fold, self.samples
        row: dict[str, Any] = {
            "key": job.key, "model": job.model, "strategy": job.strategy, "head": job.head, "scenario": fold.scenario,
            "category": fold.category, "value": fold.value, "also": "; ".join(fold.also), "fold": fold.fold,
            "split": fold.split, "level": "cell", "status": status,
            "n_train": int(fold.train.size), "n_test": int(fold.test.size),
            "n_train_samples": int(np.unique(samples[fold.train]).size) if samples is not None else None,
            "n_test_samples": int(np.unique(samples[fold.test]).size) if samples is not None else None,
            "seconds": seconds, "reasons": reasons, **{name: metrics.get(name, float("nan")) for name in METRICS},
        }
        row.update(extra)
        return row

    def skipped(self, job: Job, reason: str) -> None:
        self.store.write_job(self.row(job, status="skipped", metrics={}, reasons={"skipped": reason}, seconds=0.0,
                                      extra={}))

    def failed(self, job: Job, error: str, *, seconds: float, extra: dict[str, Any]) -> None:
        self.store.write_job(self.row(job, status="failed", metrics={}, reasons={"error": error}, seconds=seconds,
                                      extra=extra))

    def scored(self, job: Job, test: np.ndarray, probability: np.ndarray, *, metrics: dict[str, float],
               reasons: dict[str, Any], seconds: float, extra: dict[str, Any],
               calibrated: np.ndarray | None = None) -> None:
        """Store a scored job: its cell-level row, its sample-level row (when samples are known), its predictions.

        The sample-level row scores the same predictions per sample: each test sample's mean
        probability (`scdrugmap.evaluate.metrics.compute_sample_metrics`). ``calibrated`` is each test
        cell's calibrated probability (the report's trust figure).
        """
        row = self.row(job, status="done", metrics=metrics, reasons=reasons, seconds=seconds, extra=extra)
        for name, groups in self.strata.items():  # pairs of one cell type (study) only: composition cannot score
            within = within_fold_auroc(self.labels[test], probability, groups[test], n_bootstrap=0)
            row[f"auroc_within_{name}"] = within["auroc"]
            if within["reason"]:
                row["reasons"] = {**row["reasons"], f"auroc_within_{name}": f"no {name.replace('_', ' ')} of the "
                                  "test fold holds both labels"}
        cells = pd.DataFrame({"cell": self.cells[test], "label": self.labels[test], "probability": probability})
        if calibrated is not None:
            cells["calibrated"] = np.asarray(calibrated, dtype=np.float32)
        rows = [row]
        if self.samples is not None:
            values, why = compute_sample_metrics(self.labels[test], probability, self.samples[test])
            rows.append({**{k: v for k, v in row.items() if not k.startswith("auroc_within_")}, "level": "sample",
                         "reasons": why, "auroc_fraction": values.pop("auroc_fraction"),
                         **{name: values[name] for name in METRICS}})
        self.store.write_job(rows, cells)


class RunFolder:
    """A benchmark run folder, read back: what `read_run` returns.

    Each file is read the first time its attribute is used, then kept. Every file but the results
    is optional: an attribute whose file is missing is None or empty.

    Attributes
    ----------
    path
        The run folder.
    results
        One row per job of the grid and level (`pandas.DataFrame`; ``level`` ``cell``, and for
        scored jobs with known samples a ``sample`` row scoring each test sample's mean probability,
        with ``auroc_fraction`` for the fraction of its cells called sensitive): ``key``, ``model``, ``strategy``,
        ``head``, ``scenario``, ``category``, ``value``, ``also`` (other category values selecting the
        same cells, run once under this one: ``cancer_type=Melanoma; therapy=Immunotherapy``), ``fold``,
        ``split``, ``status`` (``done``,
        ``skipped``, ``failed``), ``n_train``, ``n_test``, ``n_train_samples``, ``n_test_samples``,
        ``seconds``, ``reasons`` (JSON text: why a metric is NaN or a job was not scored), the
        metrics ``f1``, ``auroc``, ``accuracy``, ``precision``, ``recall``, ``auroc_within_cell_type`` and
        ``auroc_within_study`` (cell level: pairs of one cell type or study only, so composition cannot
        score; where the data names them), and the model's and the
        training's facts (``embed_seconds``, ``train_*``, ``prompt_*``). Read from the consolidated
        results, or from the per-job files when the run was cut short.
    predictions
        One row per cell and scored job: ``cell``, ``label`` (1 = sensitive), ``probability`` of
        sensitive (NaN where the model gave none) and the job's ``key``; None when not written.
    cells
        One row per cell of the data: ``cell`` and its ``response``, ``study``, ``sample``,
        ``dataset``, ``tissue``, ``cancer_type``, ``therapy``, ``regimen`` (as text, where present).
    config
        The resolved settings of the run (the fields of `scdrugmap.evaluate.grid.BenchmarkConfig`).
    environment
        ``python``, ``platform`` and ``packages`` (name: version) of the machine that ran it.
    models
        Facts per model: of its embedding (``seconds``, ``cells_per_second``, ``n_cells``, ``dim``,
        ``cache`` hit or miss) and of the model (``family``, ``input``, ``embedding_dim``,
        ``lora_targets``, ``parameters`` of a network); for a prompted language model, its settings.
    fingerprint
        The content hash of the data the run used.
    splits
        Pooled test-fold numbers per cell (index ``cell``), one column per category, split policy,
        fold count and seed; -1 where a cell is in no test fold.
    simulated
        True when the cells came from the simulator (``config["data"] == "demo"``).
    biomarkers
        The run's biomarker analysis (`BiomarkerFolder`), or None.
    model_list
        Every model of the run, in the order of the run's config, then any other, sorted.

    ``embedding_models()``, ``embedding(model)`` and ``embedding_map(model)`` read the saved
    embedding samples and their stored 2-D maps (`EmbeddingMap`).

    Examples
    --------
    >>> run = read_run("scdrugmap-runs/demo")  # doctest: +SKIP
    >>> run.results.groupby("model")["auroc"].mean()  # doctest: +SKIP
    >>> embedding, cells = run.embedding("pca")  # doctest: +SKIP
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunFolder({str(self.path)!r})"

    @cached_property
    def results(self) -> pd.DataFrame:
        """One row per job and level (see the class docstring)."""
        path = self.path / RESULTS
        if path.exists():
            results = pd.read_parquet(path)
            if "level" not in results:  # runs of versions without sample-level rows
                results["level"] = "cell"
            return results
        results = ResultStore(self.path).results()
        if results.empty:
            raise _no_results(self.path)
        return results

    @cached_property
    def predictions(self) -> pd.DataFrame | None:
        """One row per cell and scored job (``cell``, ``label``, ``probability``, ``key``), or None."""
        path = self.path / PREDICTIONS
        if not path.exists():
            return None
        predictions = pd.read_parquet(path)
        predictions["key"] = predictions["key"].astype(str)
        return predictions

    @cached_property
    def permutations(self) -> pd.DataFrame | None:
        """The label-permutation null per permutation, model, setting and fold; None when not run."""
        path = self.path / PERMUTATIONS
        return pd.read_parquet(path) if path.exists() else None

    @cached_property
    def cells(self) -> pd.DataFrame | None:
        """One row per cell: ``cell``, its label and categories as text; None when not written."""
        path = self.path / CELLS
        return pd.read_parquet(path) if path.exists() else None

    @cached_property
    def _config_file(self) -> dict[str, Any]:
        return _read_json(self.path / CONFIG)

    @property
    def config(self) -> dict[str, Any]:
        """The resolved settings of the run (empty when not written)."""
        facts = self._config_file
        return facts.get("config", {}) if "config" in facts or "environment" in facts else facts

    @property
    def environment(self) -> dict[str, Any]:
        """``python``, ``platform`` and ``packages`` of the machine that ran it (empty when not written)."""
        return self._config_file.get("environment", {})

    @cached_property
    def models(self) -> dict[str, dict[str, Any]]:
        """Facts per model (empty when not written)."""
        return _read_json(self.path / MODELS)

    @cached_property
    def fingerprint(self) -> str | None:
        """The content hash of the run's data, or None."""
        path = self.path / FINGERPRINT
        return path.read_text().strip() if path.exists() else None

    @cached_property
    def biomarkers(self) -> BiomarkerFolder | None:
        """The run's biomarker analysis (``biomarkers/``, see `read_biomarkers`), or None when there is none."""
        folder = biomarkers_dir(self.path)
        return read_biomarkers(folder) if (folder / BIOMARKER_FILES["table"]).is_file() else None

    @cached_property
    def splits(self) -> pd.DataFrame | None:
        """Pooled test-fold numbers per cell (index ``cell``, one column per split), or None."""
        path = self.path / SPLITS
        return pd.read_parquet(path) if path.exists() else None

    @property
    def simulated(self) -> bool:
        """True when the cells came from the simulator (``config["data"] == "demo"``)."""
        return str(self.config.get("data", "")) == "demo"

    @property
    def model_list(self) -> list[str]:
        """Every model of the run, in the order the run's config lists them (then any other, sorted)."""
        listed = [str(m) for m in self.config.get("models", [])]
        present = set(self.results["model"].astype(str))
        return [m for m in listed if m in present] + sorted(present - set(listed))

    def embedding_models(self) -> list[str]:
        """Return the models with a saved embedding sample, in run order (then any other, sorted)."""
        folder = self.path / EMBEDDINGS_DIR
        saved = {path.stem for path in folder.glob(f"*{EMBEDDING_SUFFIX}")} if folder.exists() else set()
        return [m for m in self.model_list if m in saved] + sorted(saved - set(self.model_list))

    def embedding(self, model: str) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.str_]]:
        """Return a model's saved embedding sample: (embedding (cells x dim) float32, cell names).

        Raises
        ------
        FileNotFoundError
            When the run saved no sample for ``model`` (see `embedding_models`).
        ConfigError
            When the cell names were stored as a pickled object array (never loaded).
        """
        path = self.path / EMBEDDINGS_DIR / f"{model}{EMBEDDING_SUFFIX}"
        with np.load(path, allow_pickle=False) as saved:
            embedding = np.asarray(saved["embedding"], dtype=np.float32)
            try:
                cells = np.asarray(saved["cell"]).astype(str)
            except ValueError as err:  # an object array would need pickle: never load one
                msg = (f"{path}: cell names are stored as a pickled object array, which is not loaded. "
                       "Rerun the benchmark with this scDrugMap version to rewrite the embedding sample.")
                raise ConfigError(msg) from err
        return embedding, cells

    def embedding_map(self, model: str) -> EmbeddingMap | None:
        """Return the 2-D map the run stored with a model's embedding sample, or None when it stored none.

        Runs written before maps were stored, and samples with no 2-D view (fewer than two
        dimensions or three finite cells), have none.

        Raises
        ------
        FileNotFoundError
            When the run saved no sample for ``model`` (see `embedding_models`).
        """
        path = self.path / EMBEDDINGS_DIR / f"{model}{EMBEDDING_SUFFIX}"
        with np.load(path, allow_pickle=False) as saved:
            if "coordinates" not in saved.files:
                return None
            return EmbeddingMap(coordinates=np.asarray(saved["coordinates"], dtype=np.float32),
                                method=str(saved["projection"]), requested=str(saved["projection_requested"]),
                                seed=int(saved["projection_seed"]), note=str(saved["projection_note"]))


def _no_results(run_dir: Path) -> ConfigError:
    return ConfigError(f"{run_dir}: no results found; run `scdrugmap benchmark --out {run_dir}` first.")


def read_run(run_dir: str | Path) -> RunFolder:
    """Read a benchmark run folder: its results, predictions, cells, settings and model facts.

    Parameters
    ----------
    run_dir
        The ``--out`` folder of ``scdrugmap benchmark`` (`scdrugmap.evaluate.runner.run_benchmark`),
        finished or cut short.

    Returns
    -------
    The run (`RunFolder`): ``results`` (one row per job and level), ``predictions`` (one row per cell and
    scored job), ``cells``, ``config``, ``environment``, ``models`` (facts per model),
    ``fingerprint``, ``splits``, ``simulated``, ``model_list``, and ``embedding_models()`` /
    ``embedding(model)`` / ``embedding_map(model)`` for the saved embedding samples and their 2-D
    maps. Files are read on first use.

    Raises
    ------
    ConfigError
        When ``run_dir`` is not a folder or holds no results.

    Examples
    --------
    >>> from scdrugmap.evaluate.store import read_run
    >>> run = read_run("scdrugmap-runs/demo")  # doctest: +SKIP
    >>> done = run.results[run.results["status"] == "done"]  # doctest: +SKIP
    >>> done.groupby(["model", "category"])["auroc"].mean()  # doctest: +SKIP
    >>> run.predictions.merge(run.cells, on="cell")  # doctest: +SKIP
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        msg = f"{run_dir} is not a folder; give the --out folder of a `scdrugmap benchmark` run."
        raise ConfigError(msg)
    if not (run_dir / RESULTS).exists() and not ResultStore(run_dir).has_jobs():
        raise _no_results(run_dir)
    return RunFolder(run_dir)

