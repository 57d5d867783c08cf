"""The benchmark grid: model x strategy x scenario x category value x fold, run and stored job by job.

`run_benchmark` loads the data, makes (or reuses) the splits, embeds each model's
cells once (cached on disk), trains the heads of all pending folds of one category
value together, and writes each job to the `ResultStore` as soon as it is known.
Rerunning the same configuration skips finished jobs.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from scdrugmap.data import schema
from scdrugmap.data.io import read_h5ad
from scdrugmap.errors import ConfigError, ScDrugMapError
from scdrugmap.evaluate.executors import (
    LocalExecutor,
    ModelInputs,
    RayExecutor,
    Unit,
    UnitOutcome,
    make_executor,
)
from scdrugmap.evaluate.metrics import METRICS, compute_metrics, summarise
from scdrugmap.evaluate.splits import (
    Fold,
    load_assignments,
    save_assignments,
    split_cross_study,
    split_pooled,
)
from scdrugmap.evaluate.store import ResultStore
from scdrugmap.train.heads import HeadConfig

if TYPE_CHECKING:
    import anndata as ad

log = logging.getLogger(__name__)

STRATEGIES = ("frozen", "lora", "prompt")
SCENARIOS = ("pooled", "cross")
DEFAULT_MODELS = ("pca", "minilm", "majority")
DEMO_CELLS = 1500
DEMO_GENES = 2000
#: Callback: (stage, done, total, detail).
BenchmarkProgress = Callable[[str, int, int, str], None]


@dataclass
class BenchmarkConfig:
    """Everything that defines a benchmark run (written to ``config.json`` of the run)."""

    data: str = "demo"
    out: str = "scdrugmap-runs/demo"
    models: list[str] = field(default_factory=lambda: list(DEFAULT_MODELS))
    strategies: list[str] = field(default_factory=lambda: ["frozen"])
    heads: list[str] = field(default_factory=lambda: ["mlp"])
    scenarios: list[str] = field(default_factory=lambda: list(SCENARIOS))
    categories: list[str] = field(default_factory=lambda: list(schema.CATEGORY_KINDS))
    splits: list[str] = field(default_factory=lambda: ["sample"])
    folds: int = 10
    seed: int = 0
    layer: str | None = None
    batch_size: int | None = None
    device: str = "auto"
    executor: str = "local"
    ray_address: str | None = None
    cpus_per_job: float = 1.0
    gpus_per_job: float = 0.0
    shard_cells: int = 20_000
    demo_cells: int = DEMO_CELLS
    demo_genes: int = DEMO_GENES
    weights: dict[str, str] = field(default_factory=dict)
    model_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    keys: dict[str, str] = field(default_factory=dict)
    head: dict[str, Any] = field(default_factory=dict)
    lora: dict[str, Any] = field(default_factory=dict)
    prompt: dict[str, Any] = field(default_factory=dict)

    def obs_keys(self) -> schema.ObsKeys:
        return schema.ObsKeys(**self.keys)

    def head_config(self) -> HeadConfig:
        return HeadConfig(**{"seed": self.seed, **self.head})

    def lora_config(self):
        from scdrugmap.train.lora import LoRAConfig

        return LoRAConfig(**{"seed": self.seed, **self.lora})

    def prompt_config(self):
        from scdrugmap.prompting import PromptConfig

        return PromptConfig.from_dict({"seed": self.seed, "layer": self.layer, **self.prompt})

    def validate(self) -> None:
        """Refuse unknown strategies, scenarios, categories or split policies, naming the allowed ones."""
        checks = (("strategies", self.strategies, STRATEGIES), ("scenarios", self.scenarios, SCENARIOS),
                  ("categories", self.categories, schema.CATEGORY_KINDS), ("splits", self.splits, ("sample", "cell")),
                  ("heads", self.heads, ("mlp", "logistic")))
        for name, chosen, allowed in checks:
            unknown = [c for c in chosen if c not in allowed]
            if unknown:
                msg = f"--{name} {','.join(unknown)} is not available; choose from {', '.join(allowed)}."
                raise ConfigError(msg)
        if self.folds < 2:
            msg = f"--folds {self.folds}: need at least 2 folds."
            raise ConfigError(msg)


@dataclass(frozen=True)
class Job:
    """One cell of the grid: a model and strategy evaluated on one fold."""

    model: str
    strategy: str
    head: str
    fold: Fold

    @property
    def key(self) -> str:
        return f"{self.model}|{self.strategy}|{self.head}|{self.fold.key}"

    @property
    def group(self) -> tuple[str, ...]:
        """Jobs sharing a group train together (the folds of one category value)."""
        f = self.fold
        return (self.model, self.strategy, self.head, f.scenario, f.category, f.value, f.split)


def data_file(config: BenchmarkConfig) -> Path:
    """Return the benchmark's data file: ``config.data``, or the simulated demo collection (made once)."""
    if config.data != "demo":
        path = Path(config.data)
        if not path.exists():
            msg = f"--data {config.data}: no such file. Pass an .h5ad path, or demo for the simulated collection."
            raise ConfigError(msg)
        return path
    from scdrugmap import config as paths
    from scdrugmap.data.simulate import simulate_collection

    path = paths.home_dir() / "demo" / f"demo-{config.demo_cells}x{config.demo_genes}-seed{config.seed}.h5ad"
    if not path.exists():
        log.info("simulating the demo collection (%d cells x %d genes) into %s", config.demo_cells,
                 config.demo_genes, path)
        path.parent.mkdir(parents=True, exist_ok=True)
        simulate_collection(n_cells=config.demo_cells, n_genes=config.demo_genes, seed=config.seed, out_path=path)
    return path


def make_folds(adata: ad.AnnData, labels: np.ndarray, config: BenchmarkConfig, run_dir: Path) -> list[Fold]:
    """Return every fold of the run, reusing the pooled assignments saved in ``run_dir/splits.parquet``."""
    keys = config.obs_keys()
    obs = adata.obs
    splits_path = run_dir / "splits.parquet"
    saved = load_assignments(splits_path, adata.obs_names) if splits_path.exists() else {}
    changed = False
    folds: list[Fold] = []
    for category in config.categories:
        column = keys.category(category)
        if column not in obs:
            log.warning("obs has no %r column; category %s is left out", column, category)
            continue
        if "pooled" in config.scenarios:
            for split in config.splits:
                name = f"{category}|{split}|k{config.folds}|seed{config.seed}"
                category_folds = split_pooled(obs, labels, category_column=column, category=category,
                                              sample_column=keys.sample, split=split, n_folds=config.folds,
                                              seed=config.seed, assignment=saved.get(name))
                if name not in saved:
                    assignment = np.full(adata.n_obs, -1, dtype=np.int8)
                    for fold in category_folds:
                        if fold.skipped is None:
                            assignment[fold.test] = int(fold.fold)
                    saved[name] = assignment
                    changed = True
                folds.extend(category_folds)
        if "cross" in config.scenarios:
            folds.extend(split_cross_study(obs, labels, category_column=column, category=category,
                                           study_column=keys.study))
    if changed:
        save_assignments(splits_path, adata.obs_names, saved)
    return folds


class _JobWriter:
    """Store job rows: one place that turns a job and its outcome into a results row (and its predictions).

    The per-cell sample names are read once per run, not once per job.
    """

    def __init__(self, store: ResultStore, obs: pd.DataFrame, sample_column: str, labels: np.ndarray) -> None:
        self.store, self.labels = store, labels
        self.cells = obs.index.astype(str)
        self.samples = obs[sample_column].astype(str).to_numpy() if sample_column in obs else None

    def row(self, job: Job, *, status: str, metrics: dict[str, float], reasons: dict[str, Any], seconds: float,
            extra: dict[str, Any]) -> dict[str, Any]:
        fold, samples = job.fold, self.samples
        row: dict[str, Any] = {
            "key": job.key, "model": job.model, "strategy": job.strategy, "head": job.head, "scenario": fold.scenario,
            "category": fold.category, "value": fold.value, "fold": fold.fold, "split": fold.split, "status": status,
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
               reasons: dict[str, Any], seconds: float, extra: dict[str, Any]) -> None:
        row = self.row(job, status="done", metrics=metrics, reasons=reasons, seconds=seconds, extra=extra)
        cells = pd.DataFrame({"cell": self.cells[test], "label": self.labels[test], "probability": probability})
        self.store.write_job(row, cells)


def _write_run_config(config: BenchmarkConfig, run_dir: Path) -> None:
    import importlib.metadata as metadata

    versions = {}
    for package in ("scdrugmap", "torch", "numpy", "scikit-learn", "anndata", "transformers", "peft"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    facts = {"config": asdict(config), "environment": {"python": platform.python_version(),
                                                        "platform": platform.platform(), "packages": versions}}
    tmp = run_dir / "config.json.tmp"
    tmp.write_text(json.dumps(facts, indent=1, default=str))
    os.replace(tmp, run_dir / "config.json")


EMBEDDING_SAMPLE = 5000


def _save_cells(run_dir: Path, obs: pd.DataFrame, keys: schema.ObsKeys) -> None:
    """Write ``cells.parquet``: each cell's label and categories, for reports that only read the run."""
    columns = {"response": keys.response, "study": keys.study, "sample": keys.sample, "dataset": keys.dataset,
               **{kind: keys.category(kind) for kind in schema.CATEGORY_KINDS}}
    frame = pd.DataFrame({"cell": obs.index.astype(str)})
    for name, column in columns.items():
        if column in obs:
            frame[name] = obs[column].astype(str).to_numpy()
    tmp = run_dir / "cells.parquet.tmp"
    frame.to_parquet(tmp, index=False)
    os.replace(tmp, run_dir / "cells.parquet")


def _save_embedding_sample(run_dir: Path, model: str, embeddings: np.ndarray, obs_names: pd.Index, *,
                           seed: int) -> None:
    """Write up to 5,000 cells' embeddings to ``embeddings/<model>.npz`` (for UMAPs in reports)."""
    rng = np.random.default_rng(seed)
    rows = np.arange(embeddings.shape[0])
    if rows.size > EMBEDDING_SAMPLE:
        rows = np.sort(rng.choice(rows, EMBEDDING_SAMPLE, replace=False))
    folder = run_dir / "embeddings"
    folder.mkdir(exist_ok=True)
    tmp = folder / f"{model}.tmp.npz"
    np.savez_compressed(tmp, embedding=embeddings[rows], cell=np.asarray(obs_names[rows], dtype=str))
    os.replace(tmp, folder / f"{model}.npz")


def _run_prompt_jobs(jobs: list[Job], adata: ad.AnnData, labels: np.ndarray, keys: schema.ObsKeys, prompt_config,
                     writer: _JobWriter, *, progress: BenchmarkProgress | None, done: int, total: int) -> int:
    """Ask the language model for every pending prompt job, one category value (its folds) per call."""
    from scdrugmap import config as paths
    from scdrugmap.prompting import fit_predict_prompt

    for job in (job for job in jobs if job.fold.skipped is not None):
        writer.skipped(job, job.fold.skipped)
        done += 1
    grouped: dict[tuple, list[Job]] = {}
    for job in (job for job in jobs if job.fold.skipped is None):
        grouped.setdefault(job.group, []).append(job)
    for batch in grouped.values():
        start = time.perf_counter()
        fold_sets = [(job.fold.train, job.fold.test) for job in batch]
        report = None if progress is None else (
            lambda answered, requests, m=batch[0].model: progress("prompt", answered, requests, m))
        try:
            predictions = fit_predict_prompt(adata, labels, fold_sets, keys=keys, config=prompt_config,
                                             cache_dir=paths.home_dir() / "prompts", progress=report)
            failure = None
        except ConfigError:
            raise  # a missing key, a refused model or URL: every prompt job would fail alike
        except (ScDrugMapError, ValueError, RuntimeError) as err:  # e.g. PromptRequestError after all retries
            predictions, failure = None, "".join(traceback.format_exception(err))
            log.error("prompt jobs of %s failed: %s", batch[0].group, err)
        seconds = (time.perf_counter() - start) / len(batch)
        for index, job in enumerate(batch):
            _, test = fold_sets[index]
            if failure is not None:
                writer.failed(job, failure, seconds=seconds, extra={})
                continue
            probability, info = predictions[index]
            metrics, reasons = compute_metrics(labels[test], probability)
            if not info["has_probabilities"]:  # 0/1 answers rank nothing: no AUROC from them
                metrics["auroc"] = float("nan")
                reasons["auroc"] = info["auroc_reason"]
            writer.scored(job, test, probability, metrics=metrics, reasons=reasons, seconds=seconds,
                          extra={f"prompt_{name}": value for name, value in info.items()})
        done += len(batch)
        if progress:
            progress("jobs", done, total, batch[0].model)
    return done


class _InMemory:
    """The data in memory, read from the backed file the first time something needs the expression."""

    def __init__(self, adata: ad.AnnData) -> None:
        self.adata, self._loaded = adata, None

    def __call__(self) -> ad.AnnData:
        if self._loaded is None:
            self._loaded = self.adata.to_memory() if self.adata.isbacked else self.adata
        return self._loaded


def _units(jobs: list[Job], valid: np.ndarray) -> list[Unit]:
    """Group runnable jobs into units: the folds of one category value (frozen), one job (LoRA)."""
    grouped: dict[tuple, list[Job]] = {}
    for job in jobs:
        grouped.setdefault(job.group, []).append(job)
    units = []
    for group_jobs in grouped.values():
        batches = [group_jobs] if group_jobs[0].strategy == "frozen" else [[job] for job in group_jobs]
        for batch in batches:
            units.append(Unit(batch, [(job.fold.train[valid[job.fold.train]], job.fold.test[valid[job.fold.test]])
                                      for job in batch]))
    return units


def _prepare_model(model: str, jobs: list[Job], config: BenchmarkConfig, adata: ad.AnnData, data_path: Path,
                   memory: _InMemory, fingerprint: str, labels: np.ndarray, groups: np.ndarray | None,
                   executor: LocalExecutor | RayExecutor, progress: BenchmarkProgress | None
                   ) -> tuple[ModelInputs, dict[str, Any]]:
    """Load a model and compute what its units need: embeddings (cached) for frozen heads, tokens for LoRA."""
    from scdrugmap.models.base import TorchEncoder, load_encoder
    from scdrugmap.models.cache import cached_embed
    from scdrugmap.models.sharded import EncoderSpec, embed_sharded

    options = dict(config.model_options.get(model, {}))
    spec = EncoderSpec(model, config.weights.get(model), options, str(options.pop("device", config.device)))
    on_cluster = isinstance(executor, RayExecutor)
    # the driver of a cluster run only needs the model's facts and tokenizer: keep it off the GPU
    encoder = load_encoder(model, spec.weights, device="cpu" if on_cluster else spec.device, **spec.options)
    inputs = ModelInputs(model=model, labels=labels, groups=groups, head_config=config.head_config(),
                         device=spec.device, spec=spec, lora_config=config.lora_config(),
                         encoder=None if on_cluster else encoder)
    facts: dict[str, Any] = {}
    report = None if progress is None else (lambda d, t: progress("embed", d, t, model))
    if any(job.strategy == "frozen" for job in jobs):
        if progress:
            progress("embed", 0, adata.n_obs, model)
        if on_cluster:
            def compute() -> np.ndarray:
                return embed_sharded(spec, data_path, n_obs=adata.n_obs, layer=config.layer,
                                     batch_size=config.batch_size, shard_cells=config.shard_cells,
                                     resources=executor.resources, progress=report).embeddings
        else:
            def compute() -> np.ndarray:
                return encoder.embed(memory(), layer=config.layer, batch_size=config.batch_size, progress=report)
        inputs.embeddings, facts = cached_embed(encoder, adata, data_fingerprint=fingerprint, layer=config.layer,
                                                batch_size=config.batch_size, compute=compute)
    if (any(job.strategy == "lora" for job in jobs) and isinstance(encoder, TorchEncoder)
            and encoder.lora_targets):
        inputs.tokens = encoder.tokenize(memory(), layer=config.layer)
    facts = {**facts, **{k: v for k, v in encoder.describe().items() if k != "name"}}
    return inputs, facts


def _store_outcome(writer: _JobWriter, unit: Unit, outcome: UnitOutcome, labels: np.ndarray,
                   extra_of: dict[str, dict[str, Any]]) -> None:
    """Write the jobs of one finished unit."""
    seconds = outcome.seconds / len(unit.jobs)
    for index, job in enumerate(unit.jobs):
        if outcome.status == "skipped":
            writer.skipped(job, outcome.reason)
            continue
        extra = {**extra_of[job.model], "n_dropped_cells": int(job.fold.test.size - unit.fold_sets[index][1].size)}
        if outcome.status == "failed":
            writer.failed(job, outcome.reason, seconds=seconds, extra=extra)
            continue
        _, test = unit.fold_sets[index]
        probability, info = outcome.predictions[index]
        metrics, reasons = compute_metrics(labels[test], probability)
        extra.update({f"train_{k}": v for k, v in info.items()})
        writer.scored(job, test, probability, metrics=metrics, reasons=reasons, seconds=seconds, extra=extra)


def run_benchmark(config: BenchmarkConfig, *, progress: BenchmarkProgress | None = None) -> pd.DataFrame:
    """Run (or resume) the benchmark grid of ``config`` and return one row per job.

    The data is opened backed: expression is read in chunks for the fingerprint and loaded whole only
    when a model must embed (not cached) or fine-tune, or a language model is prompted.

    Returns
    -------
    The consolidated results (also in ``<out>/results.parquet``); per-cell predictions are in
    ``<out>/predictions.parquet``.
    """
    from scdrugmap.data.io import data_fingerprint

    config.validate()
    run_dir = Path(config.out)
    start = time.perf_counter()
    executor = make_executor(config.executor, address=config.ray_address, cpus_per_job=config.cpus_per_job,
                             gpus_per_job=config.gpus_per_job)
    data_path = data_file(config)
    adata = read_h5ad(data_path, backed=True)
    memory = _InMemory(adata)
    keys = config.obs_keys()
    if keys.response not in adata.obs:
        msg = f"{config.data}: obs has no {keys.response!r} column; name the label column with --label-key."
        raise ConfigError(msg)
    labels = schema.encode_labels(adata.obs[keys.response].to_numpy(), column=keys.response, source=config.data)
    fingerprint = data_fingerprint(adata, layer=config.layer)
    store = ResultStore(run_dir)
    store.check_data(fingerprint)
    _write_run_config(config, run_dir)
    folds = make_folds(adata, labels, config, run_dir)
    _save_cells(run_dir, adata.obs, keys)
    jobs = [Job(model, strategy, head if strategy == "frozen" else "mlp", fold) for model in config.models
            for strategy in config.strategies if strategy != "prompt"
            for head in (config.heads if strategy == "frozen" else ["mlp"]) for fold in folds]
    prompt_config = config.prompt_config() if "prompt" in config.strategies else None
    if prompt_config is not None:  # the language model is its own "model": one job per fold, not per encoder
        jobs += [Job(prompt_config.model, "prompt", f"{prompt_config.shots}-shot", fold) for fold in folds]
    finished = store.finished_keys()
    pending = [job for job in jobs if job.key not in finished]
    log.info("%d jobs in the grid, %d already finished, %d to run on the %s executor", len(jobs),
             len(jobs) - len(pending), len(pending), executor.name)
    done = len(jobs) - len(pending)
    if progress:
        progress("jobs", done, len(jobs), "")
    groups = np.asarray(adata.obs[keys.sample].astype(str)) if keys.sample in adata.obs else None
    writer = _JobWriter(store, adata.obs, keys.sample, labels)
    model_facts: dict[str, Any] = {}
    prompt_jobs = [job for job in pending if job.strategy == "prompt"]
    if prompt_jobs:  # API calls, limited per key: they run here whatever the executor
        from scdrugmap.prompting import describe_config

        done = _run_prompt_jobs(prompt_jobs, memory(), labels, keys, prompt_config, writer, progress=progress,
                                done=done, total=len(jobs))
        model_facts[prompt_config.model] = {"strategy": "prompt", **describe_config(prompt_config)}
    by_model: dict[str, list[Job]] = {}
    for job in pending:
        if job.strategy != "prompt":
            by_model.setdefault(job.model, []).append(job)
    extra_of: dict[str, dict[str, Any]] = {}

    def store_finished(*, wait: bool) -> None:
        nonlocal done
        for unit, outcome in executor.finished(wait=wait):
            _store_outcome(writer, unit, outcome, labels, extra_of)
            done += len(unit.jobs)
            if progress:
                progress("jobs", done, len(jobs), unit.jobs[0].model)

    for model_name, model_jobs in by_model.items():
        skipped = [job for job in model_jobs if job.fold.skipped is not None]
        for job in skipped:
            writer.skipped(job, job.fold.skipped)
        done += len(skipped)
        runnable = [job for job in model_jobs if job.fold.skipped is None]
        if not runnable:
            continue
        inputs, facts = _prepare_model(model_name, runnable, config, adata, data_path, memory, fingerprint, labels,
                                       groups, executor, progress)
        model_facts[model_name] = facts
        extra_of[model_name] = {"embed_seconds": facts.get("seconds"),
                                "embed_cells_per_second": facts.get("cells_per_second")}
        valid = np.ones(adata.n_obs, dtype=bool)
        if inputs.embeddings is not None and inputs.embeddings.shape[1]:
            valid = ~np.isnan(inputs.embeddings).any(axis=1)
            _save_embedding_sample(run_dir, model_name, inputs.embeddings, adata.obs_names, seed=config.seed)
        shared = executor.share(inputs)
        for unit in _units(runnable, valid):
            executor.submit(shared, unit)
        store_finished(wait=False)  # local: runs this model's units now; Ray: stores what is done so far
    store_finished(wait=True)
    results = store.consolidate()
    if model_facts:
        facts_path = run_dir / "models.json"
        previous = json.loads(facts_path.read_text()) if facts_path.exists() else {}
        facts_path.write_text(json.dumps({**previous, **model_facts}, indent=1, default=str))
    log.info("    finished the benchmark in %.1fs", time.perf_counter() - start)
    return results


def summary_table(results: pd.DataFrame) -> pd.DataFrame:
    """Return mean F1 and AUROC (with sd and fold counts) per model, strategy, scenario, category and split."""
    by = ["model", "strategy", "head", "scenario", "category", "split"]
    table = summarise(results, by)
    skipped = results[results["status"] != "done"].groupby(by, observed=True).size().rename("n_not_scored")
    return table.merge(skipped.reset_index(), on=by, how="left").fillna({"n_not_scored": 0})
