"""Retrain a benchmark run's fold heads exactly, so that they can be explained: a run keeps predictions, not models.

`refit_fold_heads` reads the run's config and saved splits, makes the same folds (`make_folds` with the
saved assignments), embeds the cells as the run did (the same embedding cache entry), and trains the
folds of each category value together, as the frozen executor did (`scdrugmap.evaluate.executors`:
`fit_predict_frozen` with the run's head settings, seed and device, the same inner validation groups).
Each retrained fold must reproduce the probabilities the run saved for its test cells to within
`TOLERANCE`; where one does not (the config, the data, the device or a library changed since the run),
it refuses rather than explain another model than the one that made the predictions.

For a baseline (``pca``, ``hvg``) each fold's head carries the baseline's fitted state (genes, mean,
components; fitted on all cells without labels, as in the run), so it is a complete frozen head bundle
(`scdrugmap.train.bundle.Head`) that `scdrugmap.explain.attribution` can differentiate through.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from scdrugmap.data import schema
from scdrugmap.errors import ConfigError, SchemaError

if TYPE_CHECKING:
    import anndata as ad
    import numpy.typing as npt

    from scdrugmap.models.base import Encoder
    from scdrugmap.train.bundle import Head

log = logging.getLogger(__name__)

#: Largest |retrained - saved| out-of-fold probability accepted.
TOLERANCE = 1e-6


@dataclass
class FoldHead:
    """One retrained fold: its job, its test cells and its head.

    Attributes
    ----------
    key
        The job's key in the run (``model|strategy|head|scenario|category|value|fold|split``).
    test_cells
        Names of the fold's test cells the head predicted (cells whose embedding is NaN are left out, as
        in the run).
    head
        The fold's frozen head bundle, in memory (with a baseline's fitted state as ``encoder.*``).
    probability
        The retrained head's P(sensitive) on ``test_cells`` (uncalibrated, as the run saved it).
    max_difference
        Largest |retrained - saved| probability over ``test_cells``.
    """

    key: str
    test_cells: npt.NDArray[np.str_]
    head: Head
    probability: npt.NDArray[np.float32]
    max_difference: float


@dataclass
class RefitFolds:
    """What `refit_fold_heads` returns: the fold heads, the encoder they sit on, and how well they match."""

    model: str
    folds: list[FoldHead]
    encoder: Encoder
    facts: dict[str, Any] = field(default_factory=dict)


def _check_keys(keys: Sequence[str], model: str) -> list[str]:
    chosen = list(dict.fromkeys(str(k) for k in keys))
    if not chosen:
        msg = "no job keys given: name the run's jobs whose folds to retrain."
        raise ConfigError(msg)
    strategies = {k.split("|")[1] if k.count("|") >= 2 else "" for k in chosen}
    others = sorted(s for s in strategies if s != "frozen")
    if others:
        msg = (f"only frozen heads can be retrained from a run (jobs of strategy {', '.join(others)} were given); "
               "LoRA and prompt jobs keep no model to explain.")
        raise ConfigError(msg)
    wrong = [k for k in chosen if not k.startswith(f"{model}|")]
    if wrong:
        msg = f"job {wrong[0]!r} is not a job of model {model}."
        raise ConfigError(msg)
    return chosen


def refit_fold_heads(run_dir: str | Path, adata: ad.AnnData, model: str, keys: Sequence[str], *,
                     progress: Callable[[int, int], None] | None = None) -> RefitFolds:
    """Retrain the frozen fold heads of the run's jobs ``keys`` and check they reproduce the saved predictions.

    Parameters
    ----------
    run_dir
        A `scdrugmap benchmark` run folder.
    adata
        The data the run was made on (the same cells, genes and values: checked by fingerprint).
    model
        The model of the jobs.
    keys
        Job keys of scored frozen jobs of ``model`` (e.g. every fold of one setting). Each category value
        they touch is retrained whole, as the run trained it.
    progress
        Called with (category values done, category values).

    Returns
    -------
    `RefitFolds`: one `FoldHead` per job of ``keys``, in the order given, the loaded encoder (fitted
    to the data for a baseline), and facts (``n_folds``, ``max_difference``, ``tolerance``,
    ``device``, ``embedding_cache``, ``seconds``).

    Raises
    ------
    ConfigError
        When a job is not a frozen job of ``model`` or is not in the run, or a retrained fold's
        probabilities differ from the saved ones by more than `TOLERANCE` (the message names the job,
        the difference and the likely causes).
    SchemaError
        When ``adata`` is not the data of the run.
    """
    from scdrugmap.data.io import data_fingerprint
    from scdrugmap.evaluate.grid import BenchmarkConfig, Job, make_folds
    from scdrugmap.evaluate.runner import _rows_with_nan, _units
    from scdrugmap.evaluate.store import ResultStore, read_run
    from scdrugmap.models.base import load_encoder, resolve_device
    from scdrugmap.models.cache import cached_embed
    from scdrugmap.train.bundle import ENCODER_PREFIX, Head
    from scdrugmap.train.frozen import fit_predict_frozen
    from scdrugmap.train.predict import is_fitted_baseline

    start = time.perf_counter()
    wanted = _check_keys(keys, model)
    run = read_run(run_dir)
    try:
        config = BenchmarkConfig(**run.config)
    except TypeError as err:
        msg = f"{run_dir}: its config names settings this version does not know ({err}); retrain with this version."
        raise ConfigError(msg) from err
    fingerprint = data_fingerprint(adata, layer=config.layer)
    if run.fingerprint is not None and fingerprint != run.fingerprint:
        msg = (f"{run_dir} was made on other data (its fingerprint differs from this data's: other cells, genes, "
               "values or layer); give the data the run was made on.")
        raise SchemaError(msg)
    predictions = run.predictions
    if predictions is None or predictions.empty:
        msg = f"{run_dir}: the run stored no out-of-fold predictions to check retrained folds against."
        raise ConfigError(msg)
    obs_keys = config.obs_keys()
    labels = schema.encode_labels(adata.obs[obs_keys.response].to_numpy(), column=obs_keys.response,
                                  source=str(run_dir))
    folds, made = make_folds(adata, labels, config, ResultStore(run_dir).read_splits(adata.obs_names))
    if made:
        log.info("the run saved no splits for %s; made them again from its seed", ", ".join(made))
    head_of = {key.split("|")[2] for key in wanted}
    jobs = {job.key: job for job in (Job(model, "frozen", head, fold) for head in sorted(head_of) for fold in folds)}
    unknown = [k for k in wanted if k not in jobs]
    if unknown:
        msg = f"{run_dir}: job {unknown[0]!r} is not in the run's grid (its config or splits changed)."
        raise ConfigError(msg)
    groups_wanted = {jobs[k].group for k in wanted}
    # every runnable fold of a touched category value: the run trained them as one batched network
    runnable = [job for job in jobs.values() if job.group in groups_wanted and job.fold.skipped is None]

    options = dict(config.model_options.get(model, {}))
    device = str(options.pop("device", config.device))
    encoder = load_encoder(model, config.weights.get(model), device=device, **options)
    embeddings, embedded = cached_embed(encoder, adata, data_fingerprint=fingerprint, layer=config.layer,
                                        batch_size=config.batch_size)
    state: dict[str, np.ndarray] = {}
    if is_fitted_baseline(encoder):  # the run fitted genes and components on all cells, without labels
        encoder.fit(adata, layer=config.layer)  # type: ignore[attr-defined]
        state = encoder.state()  # type: ignore[attr-defined]
    valid = ~_rows_with_nan(embeddings) if embeddings.shape[1] else np.ones(adata.n_obs, dtype=bool)
    sample_groups = (np.asarray(adata.obs[obs_keys.sample].astype(str)) if obs_keys.sample in adata.obs else None)
    saved = predictions[predictions["key"].isin(wanted)]
    saved_by_key = {key: part.set_index(part["cell"].astype(str))["probability"] for key, part in
                    saved.groupby("key", sort=False)}
    names = np.asarray(adata.obs_names.astype(str))
    resolved = resolve_device(device)
    retrained: dict[str, FoldHead] = {}
    units = _units(runnable, valid)
    for done, unit in enumerate(units, start=1):
        if embeddings.shape[1] == 0:
            msg = f"{model} has no embedding (the majority reference): it has no head to explain."
            raise ConfigError(msg)
        split_groups = None if unit.jobs[0].fold.split == "cell" else sample_groups
        fitted = fit_predict_frozen(embeddings, labels, split_groups, unit.fold_sets, head=unit.jobs[0].head,
                                    config=config.head_config(), device=resolved, return_heads=True)
        for job, (train, test), outcome in zip(unit.jobs, unit.fold_sets, fitted, strict=True):
            if job.key not in wanted:
                continue
            if job.key not in saved_by_key:
                msg = f"{run_dir}: job {job.key!r} has no saved predictions (it was not scored)."
                raise ConfigError(msg)
            cells = names[test]
            stored = saved_by_key[job.key].reindex(cells).to_numpy(dtype=np.float64)
            difference = np.abs(outcome.probability.astype(np.float64) - stored)
            worst = float(np.nanmax(difference)) if difference.size else 0.0
            if np.isnan(stored).any() or worst > TOLERANCE:
                msg = (f"{run_dir}: the retrained fold {job.key!r} does not reproduce the run's saved predictions "
                       f"(largest difference {worst:.3g}, allowed {TOLERANCE:g}"
                       f"{'; cells differ' if np.isnan(stored).any() else ''}). The run's config, data, device "
                       f"({resolved} here) or library versions changed since it ran; rerun the benchmark with "
                       "this setup, or pass a head (--head) to explain instead.")
                raise ConfigError(msg)
            assert outcome.head is not None  # asked for with return_heads
            meta = {"kind": job.head, "model": model, "checkpoint_sha256": encoder.checkpoint_sha256,
                    "embedding_dim": int(embeddings.shape[1]), "strategy": "frozen", "layer": config.layer,
                    "n_cells": int(train.size), "source": f"{Path(run_dir)} fold {job.key}"}
            tensors = {**{k: np.asarray(v) for k, v in outcome.head.items()},
                       **{f"{ENCODER_PREFIX}{k}": np.asarray(v) for k, v in state.items()}}
            retrained[job.key] = FoldHead(key=job.key, test_cells=cells, head=Head(meta=meta, tensors=tensors),
                                          probability=outcome.probability, max_difference=worst)
        if progress is not None:
            progress(done, len(units))
    fold_heads = [retrained[k] for k in wanted]
    facts = {"n_folds": len(fold_heads), "n_units": len(units), "tolerance": TOLERANCE, "device": resolved,
             "max_difference": max((f.max_difference for f in fold_heads), default=0.0),
             "embedding_cache": embedded.get("cache"), "seconds": round(time.perf_counter() - start, 2)}
    log.info("retrained %d fold heads of %s in %.1fs; largest difference from the saved predictions %.2g",
             len(fold_heads), model, facts["seconds"], facts["max_difference"])
    return RefitFolds(model=model, folds=fold_heads, encoder=encoder, facts=facts)
