"""Run the benchmark grid (`scdrugmap.evaluate.grid`): model x strategy x scenario x category value x fold.

`run_benchmark` loads the data, makes (or reuses) the splits, embeds each model's
cells once (cached on disk), trains the heads of all folds of one category value
together, and writes each job to the run folder (`scdrugmap.evaluate.store`) as soon
as it is known. Rerunning the same configuration skips finished jobs, and recomputes a
category value's folds whole when one of them is missing (`pending_jobs`), so a
resumed run gives exactly the numbers of an uninterrupted one.
"""

from __future__ import annotations

import logging
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from scdrugmap.data import schema
from scdrugmap.data.io import read_h5ad
from scdrugmap.errors import ConfigError, ScDrugMapError, SchemaError
from scdrugmap.evaluate.executors import (
    LocalExecutor,
    ModelInputs,
    RayExecutor,
    Unit,
    UnitOutcome,
    compute_unit,
    make_executor,
)
from scdrugmap.evaluate.grid import TEST_ORIGIN, BenchmarkConfig, Job, data_file, external_file, make_folds
from scdrugmap.evaluate.metrics import compute_metrics, summarise
from scdrugmap.evaluate.store import JobWriter, ResultStore

if TYPE_CHECKING:
    import anndata as ad

    from scdrugmap.models.cache import EmbeddingFile
    from scdrugmap.models.sharded import EncoderSpec

log = logging.getLogger(__name__)

#: Callback: (stage, done, total, detail).
BenchmarkProgress = Callable[[str, int, int, str], None]


def _run_prompt_jobs(jobs: list[Job], adata: ad.AnnData, labels: np.ndarray, keys: schema.ObsKeys, prompt_config,
                     writer: JobWriter, *, progress: BenchmarkProgress | None, done: int, total: int) -> int:
    """Ask the language model for every pending prompt job, one category value (its folds) per call."""
    from scdrugmap import config as paths
    from scdrugmap.prompting import fit_predict_prompt

    for job in (job for job in jobs if job.fold.skipped is not None):
        assert job.fold.skipped is not None
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
            assert predictions is not None  # set whenever there is no failure
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
    """The data in memory, read from the backed file the first time something needs the expression.

    Encoders that read a backed AnnData in row blocks themselves (``reads_backed``: the baselines) get
    the backed data instead, so ``X`` is never loaded whole for them (`for_encoder`).
    """

    def __init__(self, adata: ad.AnnData) -> None:
        self.adata, self._loaded = adata, None

    def __call__(self) -> ad.AnnData:
        if self._loaded is None:
            self._loaded = self.adata.to_memory() if self.adata.isbacked else self.adata
        return self._loaded

    def for_encoder(self, encoder: Any) -> ad.AnnData:
        """Return the data as ``encoder`` should read it: backed when it streams, else in memory."""
        return self.adata if getattr(encoder, "reads_backed", False) else self()


def _rows_with_nan(embeddings: np.ndarray | EmbeddingFile, chunk_rows: int = 65_536) -> np.ndarray:
    """Return True per row holding a NaN, without a (cells x dim) temporary (an `EmbeddingFile` read in chunks)."""
    rows = np.zeros(embeddings.shape[0], dtype=bool)
    for start in range(0, embeddings.shape[0], chunk_rows):
        rows[start : start + chunk_rows] = np.isnan(embeddings[start : start + chunk_rows]).any(axis=1)
    return rows


def pending_jobs(jobs: list[Job], finished: set[str]) -> list[Job]:
    """Return the jobs to run: the unfinished ones, and every job of a frozen group with one unfinished.

    The folds of one category value train as one batched network (`Unit`), whose initial weights and
    batch order depend on which folds it holds. A run killed while a group's jobs were being written
    would otherwise retrain the missing folds in a smaller network and give other numbers than an
    uninterrupted run; recomputing the whole group gives exactly the same ones.
    """
    incomplete = {job.group for job in jobs if job.key not in finished and job.strategy == "frozen"
                  and job.fold.skipped is None}
    return [job for job in jobs if job.key not in finished or job.group in incomplete]


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
    from scdrugmap.models.base import TorchEncoder, get_encoder_class, load_encoder
    from scdrugmap.models.cache import RowStreamingEncoder, cached_embed
    from scdrugmap.models.sharded import EncoderSpec, embed_sharded

    options = dict(config.model_options.get(model, {}))
    device, asked = str(options.pop("device", config.device)), str(options.pop("dtype", config.dtype))
    spec = EncoderSpec(model, config.weights.get(model), options, device, asked)
    on_cluster = isinstance(executor, RayExecutor)
    # the driver of a cluster run only needs the model's facts and tokenizer: keep it off the GPU
    # before loading weights: SchemaError when the model cannot read these values (only the first rows are read)
    schema.require_value_kind(adata, needs=get_encoder_class(model).input_kind, model=model, layer=config.layer)
    encoder = load_encoder(model, spec.weights, device="cpu" if on_cluster else spec.device,
                           dtype=None if on_cluster else spec.dtype, **spec.options)
    dtype = _run_dtype(spec)
    inputs = ModelInputs(model=model, labels=labels, groups=groups, head_config=config.head_config(),
                         device=spec.device, spec=spec, lora_config=config.lora_config(),
                         encoder=None if on_cluster else encoder)
    facts: dict[str, Any] = {}
    report = None if progress is None else (lambda d, t: progress("embed", d, t, model))
    if any(job.strategy == "frozen" for job in jobs):
        if progress:
            progress("embed", 0, adata.n_obs, model)
        if isinstance(executor, RayExecutor):  # on_cluster, spelt out so the closure sees a RayExecutor
            def compute() -> np.ndarray:
                return embed_sharded(spec, data_path, n_obs=adata.n_obs, layer=config.layer,
                                     batch_size=config.batch_size, shard_cells=config.shard_cells,
                                     resources=executor.resources, progress=report).embeddings
        else:
            def compute() -> np.ndarray:
                return encoder.embed(memory.for_encoder(encoder), layer=config.layer, batch_size=config.batch_size,
                                     progress=report)
        # here, the embeddings stay in the cache file and heads read their batches' rows; a baseline writes a
        # miss into it block by block (at full size hvg's 2.6 GB never sit in memory); a cluster gets an array
        streams = not on_cluster and isinstance(encoder, RowStreamingEncoder)
        inputs.embeddings, facts = cached_embed(encoder, adata, data_fingerprint=fingerprint, layer=config.layer,
                                                batch_size=config.batch_size, options=_dtype_key(dtype),
                                                compute=None if streams else compute, progress=report,
                                                in_memory=on_cluster)
    if (any(job.strategy == "lora" for job in jobs) and isinstance(encoder, TorchEncoder)
            and encoder.lora_targets):
        inputs.tokens = encoder.tokenize(memory(), layer=config.layer)
    facts = {**facts, **{k: v for k, v in encoder.describe().items() if k != "name"}, "dtype": dtype}
    return inputs, facts


def _run_dtype(spec: EncoderSpec) -> str:
    """Return the dtype ``spec``'s embedding runs in on the run's device (a cluster's GPUs need not be visible here)."""
    from scdrugmap.models.base import get_encoder_class, resolve_device
    from scdrugmap.models.precision import resolve_dtype

    device = resolve_device("auto") if spec.device == "auto" else spec.device
    return resolve_dtype(get_encoder_class(spec.name), spec.dtype, device)


def _dtype_key(dtype: str) -> dict[str, str]:
    """Return what the dtype adds to an embedding's cache key: nothing for float32, so earlier caches still hit."""
    return {} if dtype == "float32" else {"dtype": dtype}


def _store_unprepared(writer: JobWriter, model: str, jobs: list[Job], err: Exception) -> int:
    """Record the jobs of a model that could not be prepared; return how many.

    A model that cannot read the data (`SchemaError`, e.g. a gene-ranking model on z-scored values)
    has its jobs stored as skipped with the reason: rerunning cannot change that. Any other error
    (missing weights, a crash while embedding) stores them as failed with the traceback, so the
    next run retries them. Either way the other models go on.
    """
    if isinstance(err, SchemaError):
        log.warning("%s cannot read this data; its %d jobs are skipped: %s", model, len(jobs), err)
        for job in jobs:
            writer.skipped(job, f"{model} cannot read this data: {err}")
    else:
        log.error("%s could not be prepared; its %d jobs failed: %s", model, len(jobs), err)
        error = "".join(traceback.format_exception(err))
        for job in jobs:
            writer.failed(job, error, seconds=0.0, extra={})
    return len(jobs)


def _store_outcome(writer: JobWriter, unit: Unit, outcome: UnitOutcome, labels: np.ndarray,
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
        assert outcome.predictions is not None  # a "done" outcome carries its predictions
        probability, info = outcome.predictions[index]
        metrics, reasons = compute_metrics(labels[test], probability)
        trust = dict(info.pop("trust", None) or {})  # per-fold calibration and conformal metrics, on the test cells
        calibrated = trust.pop("calibrated", None)
        extra.update({f"train_{k}": v for k, v in info.items()})
        extra.update(trust)
        writer.scored(job, test, probability, metrics=metrics, reasons=reasons, seconds=seconds, extra=extra,
                      calibrated=calibrated)


def run_benchmark(config: BenchmarkConfig, *, progress: BenchmarkProgress | None = None) -> pd.DataFrame:
    """Run (or resume) the benchmark grid of ``config`` and return one row per job and level.

    The data is opened backed: expression is read in chunks for the fingerprint (and by the baselines,
    which embed from row blocks), and loaded whole only when another model must embed (not cached) or
    fine-tune, or a language model is prompted.

    Returns
    -------
    The consolidated results, one row per job and level (``cell``; ``sample`` for scored jobs where
    the data names samples). They and the per-cell predictions are also in the
    run folder ``config.out``; read it back with `scdrugmap.evaluate.store.read_run`.
    """
    from scdrugmap.data.io import data_fingerprint

    config.validate()
    run_dir = Path(config.out)
    start = time.perf_counter()
    executor = make_executor(config.executor, address=config.ray_address, cpus_per_job=config.cpus_per_job,
                             gpus_per_job=config.gpus_per_job)
    data_path = data_file(config)
    if config.test_data:  # both files in one, on their shared genes; the test file's cells form the external folds
        data_path = external_file(config, data_path)
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
    store.write_config(asdict(config))
    own = (adata.obs_names[~adata.obs[TEST_ORIGIN].to_numpy(dtype=bool)] if TEST_ORIGIN in adata.obs
           else adata.obs_names)  # the pooled folds' cells: those of --data
    saved = store.read_splits(own)
    folds, made = make_folds(adata, labels, config, saved)
    if made:
        store.write_splits(own, {**saved, **made})
    store.save_cells(adata.obs, keys)
    jobs = [Job(model, strategy, head if strategy == "frozen" else "mlp", fold) for model in config.models
            for strategy in config.strategies if strategy != "prompt"
            for head in (config.heads if strategy == "frozen" else ["mlp"]) for fold in folds]
    prompt_config = config.prompt_config() if "prompt" in config.strategies else None
    if prompt_config is not None:  # the language model is its own "model": one job per fold, not per encoder
        jobs += [Job(prompt_config.model, "prompt", f"{prompt_config.shots}-shot", fold) for fold in folds]
    pending = pending_jobs(jobs, store.finished_keys())
    log.info("%d jobs in the grid, %d already finished, %d to run on the %s executor", len(jobs),
             len(jobs) - len(pending), len(pending), executor.name)
    done = len(jobs) - len(pending)
    if progress:
        progress("jobs", done, len(jobs), "")
    groups = np.asarray(adata.obs[keys.sample].astype(str)) if keys.sample in adata.obs else None
    writer = JobWriter(store, adata.obs, keys.sample, labels, strata={"cell_type": keys.cell_type, "study": keys.study})
    model_facts: dict[str, Any] = {}
    prompt_jobs = [job for job in pending if job.strategy == "prompt"]
    if prompt_jobs:  # API calls, limited per key: they run here whatever the executor
        from scdrugmap.prompting import describe_config

        assert prompt_config is not None  # prompt jobs exist only when a prompt config does
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
            assert job.fold.skipped is not None
            writer.skipped(job, job.fold.skipped)
        done += len(skipped)
        runnable = [job for job in model_jobs if job.fold.skipped is None]
        if not runnable:
            continue
        try:
            inputs, facts = _prepare_model(model_name, runnable, config, adata, data_path, memory, fingerprint,
                                           labels, groups, executor, progress)
        except ConfigError:
            raise  # a wrong setting (device, weights option): every model would fail alike
        except (ScDrugMapError, ValueError, RuntimeError, OSError) as err:
            done += _store_unprepared(writer, model_name, runnable, err)
            model_facts[model_name] = {"unavailable": str(err)}
            store.write_model_facts({model_name: model_facts[model_name]})
            if progress:
                progress("jobs", done, len(jobs), model_name)
            continue
        model_facts[model_name] = facts
        store.write_model_facts({model_name: facts})  # now, so a run cut short keeps them
        extra_of[model_name] = {"embed_seconds": facts.get("seconds"),
                                "embed_cells_per_second": facts.get("cells_per_second")}
        valid = np.ones(adata.n_obs, dtype=bool)
        if inputs.embeddings is not None and inputs.embeddings.shape[1]:
            valid = ~_rows_with_nan(inputs.embeddings)
            # its 2-D map comes after every model's jobs (`add_embedding_maps`): UMAP's compiled code stays
            # in memory, and there it does not sit beside a model's embeddings
            store.save_embedding_sample(model_name, inputs.embeddings, adata.obs_names, seed=config.seed,
                                        projection=None)
        shared = executor.share(inputs)
        for unit in _units(runnable, valid):
            executor.submit(shared, unit)
        store_finished(wait=False)  # local: runs this model's units now; Ray: stores what is done so far
        del inputs, shared  # the next model's embeddings never sit beside this one's
    store_finished(wait=True)
    store.add_embedding_maps(seed=config.seed)
    results = store.consolidate()
    if model_facts:
        store.write_model_facts(model_facts)
    if config.permutations:
        _run_permutations(config, store, jobs, adata, data_path, memory, fingerprint, labels, groups, executor)
    _complete_model_facts(store, config, [m for m in config.models if m not in model_facts], adata, fingerprint)
    log.info("    finished the benchmark in %.1fs", time.perf_counter() - start)
    return results


def _run_permutations(config: BenchmarkConfig, store: ResultStore, jobs: list[Job], adata: ad.AnnData,
                      data_path: Path, memory: _InMemory, fingerprint: str, labels: np.ndarray,
                      groups: np.ndarray | None, executor: LocalExecutor | RayExecutor) -> None:
    """Compute the label-permutation null of the frozen jobs: the same folds and heads, labels shuffled.

    Permutation ``i`` shuffles the labels within each category value (per sample under a
    patient-grouped split, per cell under a cell-level split: `permute_labels`), with a seed made
    of the run's seed and ``i``, trains every frozen unit again and scores its test cells against
    the shuffled labels. Permutations already stored are not rerun. LoRA and prompt jobs have no
    null (too costly to repeat); the null runs here, whatever the executor.
    """
    from scdrugmap.evaluate.splits import permute_labels

    runnable = [job for job in jobs if job.strategy == "frozen" and job.fold.skipped is None]
    stored = store.read_permutations()
    have = set(zip(stored["model"], stored["permutation"], strict=True)) if len(stored) else set()
    keys = config.obs_keys()
    obs = adata.obs
    for model in dict.fromkeys(job.model for job in runnable):
        model_jobs = [job for job in runnable if job.model == model]
        todo = [i for i in range(config.permutations) if (model, i) not in have]
        if not todo:
            continue
        try:
            inputs, _ = _prepare_model(model, model_jobs, config, adata, data_path, memory, fingerprint, labels,
                                       groups, LocalExecutor(), None)
        except (ScDrugMapError, ValueError, RuntimeError, OSError) as err:
            log.warning("no permutation null for %s: %s", model, err)
            continue
        valid = np.ones(adata.n_obs, dtype=bool)
        if inputs.embeddings is not None and inputs.embeddings.shape[1]:
            valid = ~_rows_with_nan(inputs.embeddings)
        start = time.perf_counter()
        rows = []
        for permutation in todo:
            rng = np.random.default_rng([config.seed, 11, permutation])
            by_split: dict[tuple[str, str, str], list[Job]] = {}
            for job in model_jobs:
                by_split.setdefault((job.fold.scenario, job.fold.category, job.fold.split), []).append(job)
            for (_, category, split), split_jobs in sorted(by_split.items()):
                shuffled = permute_labels(labels, obs[keys.category(category)].astype(str).to_numpy(),
                                          groups if split == "sample" else None, rng)
                for unit in _units(split_jobs, valid):
                    outcome = compute_unit(replace(inputs, labels=shuffled), unit)
                    for index, job in enumerate(unit.jobs):
                        auroc = float("nan")
                        if outcome.status == "done":
                            test = unit.fold_sets[index][1]
                            assert outcome.predictions is not None  # a "done" outcome carries its predictions
                            auroc = compute_metrics(shuffled[test], outcome.predictions[index][0])[0]["auroc"]
                        fold = job.fold
                        rows.append({"model": model, "strategy": job.strategy, "head": job.head,
                                     "scenario": fold.scenario, "category": fold.category, "value": fold.value,
                                     "fold": fold.fold, "split": fold.split, "permutation": permutation,
                                     "auroc": auroc})
        store.add_permutations(pd.DataFrame(rows))
        log.info("label-permutation null of %s: %d permutations in %.1fs", model, len(todo),
                 time.perf_counter() - start)


def _complete_model_facts(store: ResultStore, config: BenchmarkConfig, models: list[str], adata: ad.AnnData,
                          fingerprint: str) -> None:
    """Store the facts of models that ran nothing now and have none stored (their jobs all finished earlier).

    The embedding facts come from the embedding cache (a hit repeats the original timing).
    """
    from scdrugmap.models.base import load_encoder
    from scdrugmap.models.cache import cached_embed
    from scdrugmap.models.sharded import EncoderSpec

    stored = store.model_facts()
    for model in (m for m in models if m not in stored):
        options = dict(config.model_options.get(model, {}))
        device, asked = str(options.pop("device", config.device)), str(options.pop("dtype", config.dtype))
        spec = EncoderSpec(model, config.weights.get(model), options, device, asked)
        try:
            dtype = _run_dtype(spec)  # the key of the run's embeddings, whatever device they were made on
            encoder = load_encoder(model, spec.weights, device="cpu", **spec.options)
            facts: dict[str, Any] = {}
            if "frozen" in config.strategies:
                _, facts = cached_embed(encoder, adata, data_fingerprint=fingerprint, layer=config.layer,
                                        batch_size=config.batch_size, options=_dtype_key(dtype))
        except (ScDrugMapError, ValueError, RuntimeError, OSError) as err:
            log.warning("the run folder has no facts for %s, and describing it failed: %s", model, err)
            continue
        store.write_model_facts({model: {**facts, **{k: v for k, v in encoder.describe().items() if k != "name"},
                                         "dtype": dtype}})


def summary_table(results: pd.DataFrame) -> pd.DataFrame:
    """Return mean F1 and AUROC (with sd and fold counts) per model, strategy, scenario, category and split.

    Cell-level rows only; sample-level results are summarised by `scdrugmap.evaluate.stats`.
    """
    by = ["model", "strategy", "head", "scenario", "category", "split"]
    if "level" in results:
        results = results[results["level"].fillna("cell") == "cell"]
    table = summarise(results, by)
    skipped = results[results["status"] != "done"].groupby(by, observed=True).size().rename("n_not_scored")
    table = table.merge(skipped.reset_index(), on=by, how="left").fillna({"n_not_scored": 0})
    order = {"sample": 0, "cell": 1}  # the patient-grouped split first
    return table.sort_values(["model", "strategy", "head", "scenario", "category", "split"], kind="stable",
                             key=lambda c: c.map(order).fillna(2) if c.name == "split" else c, ignore_index=True)
