"""Tools: embed cells, train a head, predict, benchmark (``import scdrugmap as sdm; sdm.tl.embed(adata, "pca")``).

scanpy's conventions: ``adata`` first, keyword-only options, results written into
``obsm`` / ``obs`` / ``uns["scdrugmap"][key]`` in place (returning None) or into a copy
with ``copy=True``. The command line and the web server call these functions; nothing
else implements "embed, predict, annotate".

Written where:

========================================  =================================================
``obsm["X_<model>"]``                     embeddings (`embed`; `predict` with ``embedding_key``)
``obs["<model>_gene_overlap"]``           per cell, the share of its expressed genes the model knows
``obs["scdrugmap_<model>_prob_sensitive"]``  P(sensitive) per cell (`predict`; NaN: unreadable cell)
``obs["scdrugmap_<model>_prediction"]``   ``sensitive`` / ``resistant`` at ``threshold``
``uns["scdrugmap"][key]``                 the parameters: model, variant, weights sha256, layer, ...
========================================  =================================================
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from scdrugmap.data.gate import validate_input
from scdrugmap.errors import ConfigError, SchemaError

if TYPE_CHECKING:
    from collections.abc import Callable

    import anndata as ad
    import numpy.typing as npt
    import pandas as pd

    from scdrugmap.models.base import Encoder
    from scdrugmap.train.bundle import Head

log = logging.getLogger(__name__)

UNS_KEY = "scdrugmap"

# --- names of what is written ---------------------------------------------------------------------------------

def embedding_key(model: str) -> str:
    """Return the default obsm key of ``model``'s embeddings (``X_<model>``)."""
    return f"X_{model}"


def overlap_key(model: str) -> str:
    """Return the obs column of each cell's gene overlap with ``model``'s vocabulary."""
    return f"{model}_gene_overlap"


def prediction_key(model: str) -> str:
    """Return the default prefix of ``predict``'s obs columns (``scdrugmap_<model>``)."""
    return f"scdrugmap_{model}"


def probability_column(key: str) -> str:
    return f"{key}_prob_sensitive"


def label_column(key: str) -> str:
    return f"{key}_prediction"


# --- helpers --------------------------------------------------------------------------------------------------

def _load_encoder(model: str, weights: str | Path | None, device: str | None, options: dict[str, Any]) -> Encoder:
    """Load a registered encoder; resolve the device (which imports torch) only for models with a network."""
    from scdrugmap.models.base import TorchEncoder, get_encoder_class, load_encoder

    cls = get_encoder_class(model)
    needs_device = issubclass(cls, TorchEncoder)
    return load_encoder(model, None if weights is None else str(weights), device=device if needs_device else None,
                        **options)


def _target(adata: ad.AnnData, copy: bool) -> ad.AnnData:
    from anndata import AnnData

    if not isinstance(adata, AnnData):
        msg = f"expected an AnnData, got {type(adata).__name__}; read a file with anndata.read_h5ad first."
        raise SchemaError(msg)
    if copy:
        return adata.copy()
    if adata.is_view:  # writing into a view would copy it silently; say so instead
        msg = "adata is a view of another AnnData; pass adata.copy() or copy=True."
        raise SchemaError(msg)
    return adata


def _params(adata: ad.AnnData, key: str, facts: dict[str, Any]) -> None:
    adata.uns.setdefault(UNS_KEY, {})[key] = facts


def labels_of(adata: ad.AnnData, label_key: str = "response") -> npt.NDArray[np.int8]:
    """Return ``obs[label_key]`` as 1 (sensitive) / 0 (resistant).

    Strings (sensitive/resistant, responder/non-responder), categoricals, booleans and 0/1 are all
    accepted, through `scdrugmap.data.schema.encode_labels`.

    Raises
    ------
    SchemaError
        When the column is missing or holds anything else (a missing value included).

    Examples
    --------
    >>> import scdrugmap as sdm
    >>> adata = sdm.datasets.simulate(n_cells=60, n_genes=200, seed=0)
    >>> sdm.tl.labels_of(adata)[:5].tolist()
    [1, 0, 0, 1, 1]
    """
    from scdrugmap.data.schema import encode_labels

    if label_key not in adata.obs:
        msg = f"obs has no {label_key!r} column (columns: {', '.join(map(str, adata.obs.columns[:8]))}); pass label_key."
        raise SchemaError(msg)
    return encode_labels(adata.obs[label_key], column=label_key)


# --- embed ----------------------------------------------------------------------------------------------------

def embed(adata: ad.AnnData, model: str, *, weights: str | Path | None = None, layer: str | None = None,
          key_added: str | None = None, batch_size: int | None = None, device: str = "auto", copy: bool = False,
          progress: Callable[[int, int], None] | None = None, **model_options: Any) -> ad.AnnData | None:
    """Embed every cell with ``model``.

    Parameters
    ----------
    adata
        Cells in the data contract (counts in ``X`` or ``layer`` for models that need them).
    model
        A registry name (``scdrugmap models list``): ``geneformer``, ``scgpt``, ``pca``, ``minilm``, ...
    weights
        A checkpoint folder or file in the official format; None takes the cache (or a download).
    layer
        Expression layer to read instead of ``X``.
    key_added
        obsm key of the embeddings (default ``X_<model>``), also the key of the parameters in ``uns``.
    batch_size
        Cells per forward pass (None: the model's default).
    device
        ``auto`` (CUDA when visible), ``cpu``, ``cuda`` or ``cuda:N``.
    copy
        Return a copy instead of writing into ``adata``.
    progress
        Called with (cells done, cells) as batches finish.
    model_options
        Options of the model's loader (e.g. ``version="V2"`` for Geneformer).

    Returns
    -------
    None, or the copy, with ``obsm[key_added]`` (float32, cells x width; NaN rows for cells the model
    could not read), ``obs["<model>_gene_overlap"]`` (models with a vocabulary), and
    ``uns["scdrugmap"][key_added]`` = model, variant, checkpoint_sha256, layer (and, for a baseline,
    the fitted genes and components in ``encoder_state``, so a head trained on them travels).

    Examples
    --------
    >>> import scdrugmap as sdm
    >>> adata = sdm.datasets.simulate(n_cells=60, n_genes=200, seed=0)
    >>> sdm.tl.embed(adata, "pca")
    >>> adata.obsm["X_pca"].shape
    (60, 50)
    >>> adata.uns["scdrugmap"]["X_pca"]["model"]
    'pca'
    """
    validate_input(adata, layer=layer)  # the gate: no cells or genes, NaN/inf, duplicate names -> one SchemaError
    from scdrugmap.train.predict import is_fitted_baseline

    adata = _target(adata, copy)
    key = key_added or embedding_key(model)
    start = time.perf_counter()
    encoder = _load_encoder(model, weights, device, model_options)
    encoder.check_input(adata, layer=layer)
    facts: dict[str, Any] = {"model": encoder.name, "variant": str(getattr(encoder, "variant", "") or ""),
                             "checkpoint_sha256": encoder.checkpoint_sha256 or "", "layer": layer or "X"}
    if is_fitted_baseline(encoder):  # fit once, keep the basis: a head trained on these embeddings travels
        from scdrugmap.train.bundle import state_sha256

        encoder.fit(adata, layer=layer)  # type: ignore[attr-defined]
        state = encoder.state()  # type: ignore[attr-defined]
        facts["encoder_state"] = state
        facts["encoder_state_sha256"] = state_sha256(state)
    embeddings = encoder.embed(adata, layer=layer, batch_size=batch_size, progress=progress)
    adata.obsm[key] = embeddings
    if encoder.gene_overlap_ is not None:
        adata.obs[overlap_key(encoder.name)] = encoder.gene_overlap_
    _params(adata, key, facts)
    log.info("embedded %d cells with %s into obsm[%r] in %.1fs", adata.n_obs, model, key, time.perf_counter() - start)
    return adata if copy else None


def embed_file(path: str | Path, model: str, *, weights: str | Path | None = None, layer: str | None = None,
               batch_size: int | None = None, device: str = "auto", ray_address: str | None = None,
               shard_cells: int = 20_000, cpus: float = 1.0, gpus: float = 0.0,
               progress: Callable[[int, int], None] | None = None,
               **model_options: Any) -> tuple[npt.NDArray[np.float32], dict[str, Any], npt.NDArray[np.float32] | None]:
    """Embed the cells of an ``.h5ad`` file on a Ray cluster, in row shards read from disk.

    For files larger than one machine's memory: each task opens the file backed and reads only its
    rows. Models whose cells see each other embed as one task (see `Encoder.shardable`).

    Returns
    -------
    The embeddings in cell order, the facts `embed` writes to ``uns``, and the per-cell gene overlap
    (None for models that read every gene).
    """
    from scdrugmap import cluster
    from scdrugmap.data.io import read_h5ad
    from scdrugmap.models.sharded import EncoderSpec, embed_sharded

    cluster.connect(ray_address)
    backed = read_h5ad(path, backed=True)
    n_obs = backed.n_obs
    backed.file.close()
    result = embed_sharded(EncoderSpec(model, None if weights is None else str(weights), dict(model_options), device),
                           Path(path).resolve(), n_obs=n_obs, layer=layer, batch_size=batch_size,
                           shard_cells=shard_cells, resources=cluster.Resources(cpus=cpus, gpus=gpus),
                           progress=progress)
    facts = {"model": model, "variant": "", "checkpoint_sha256": result.checkpoint_sha256 or "",
             "layer": layer or "X"}
    return result.embeddings, facts, result.gene_overlap


# --- train ----------------------------------------------------------------------------------------------------

def train(adata: ad.AnnData, model: str, *, strategy: Literal["frozen", "lora"] = "frozen",
          head: Literal["mlp", "logistic"] = "mlp", label_key: str = "response", sample_key: str | None = "sample",
          layer: str | None = None, weights: str | Path | None = None, use_rep: str | None = None,
          device: str = "auto", seed: int = 0, head_options: dict[str, Any] | None = None,
          lora_options: dict[str, Any] | None = None, **model_options: Any) -> Head:
    """Train a head that predicts sensitivity from ``model``'s view of every labelled cell.

    Parameters
    ----------
    adata
        Labelled cells.
    model
        The registry name of the model the head sits on.
    strategy
        ``frozen``: a head on fixed embeddings; ``lora``: LoRA adapters (peft) + the MLP head, trained end
        to end (foundation models only).
    head
        ``mlp`` (the scDrugMap paper's head) or ``logistic`` (frozen only).
    label_key
        obs column of the labels: sensitive/resistant, 1/0, booleans or a categorical of those.
    sample_key
        obs column of the patient or sample: the inner validation split holds out whole samples.
    layer, weights, device
        As in `embed`.
    use_rep
        An obsm key of embeddings made by `embed` with the same model (frozen only); None embeds here.
    seed
        Seed of the head's initialisation, shuffling and inner split.
    head_options, lora_options
        Fields of `scdrugmap.train.heads.HeadConfig` / `scdrugmap.train.lora.LoRAConfig` (epochs, ...).

    Returns
    -------
    The trained `Head`; ``head.save(dir)`` writes the bundle that ``scdrugmap predict --head dir`` reads.

    Examples
    --------
    >>> import scdrugmap as sdm
    >>> adata = sdm.datasets.simulate(n_cells=120, n_genes=200, seed=0)
    >>> head = sdm.tl.train(adata, "pca", head="logistic")
    >>> head.kind, head.model, head.meta["n_cells"]
    ('logistic', 'pca', 120)
    """
    validate_input(adata, layer=layer)  # the gate: no cells or genes, NaN/inf, duplicate names -> one SchemaError
    from scdrugmap.train.heads import HeadConfig
    from scdrugmap.train.predict import fit_head

    if strategy not in ("frozen", "lora") or head not in ("mlp", "logistic"):
        msg = f"strategy={strategy!r}, head={head!r}: choose frozen or lora, and mlp or logistic."
        raise ConfigError(msg)
    if strategy == "lora" and head != "mlp":
        msg = "the lora strategy trains the MLP head with the adapters; use head='mlp'."
        raise ConfigError(msg)
    labels = labels_of(adata, label_key)
    groups = adata.obs[sample_key].astype(str).to_numpy() if sample_key and sample_key in adata.obs else None
    encoder = _load_encoder(model, weights, device, model_options)
    embeddings, state = None, None
    if use_rep is not None:
        embeddings, state = _representation(adata, use_rep, encoder)
    else:
        encoder.check_input(adata, layer=layer)
    head_config = HeadConfig(**{"seed": seed, **(head_options or {})})
    lora_config = None
    if strategy == "lora":
        from scdrugmap.train.lora import LoRAConfig

        lora_config = LoRAConfig(**{"seed": seed, **(lora_options or {})})
    start = time.perf_counter()
    fitted = fit_head(encoder, adata, labels, groups, strategy=strategy, head=head, layer=layer,
                      embeddings=embeddings, encoder_state=state, head_config=head_config, lora_config=lora_config)
    log.info("trained a %s %s head on %d %s cells in %.1fs", strategy, fitted.kind, adata.n_obs, model,
             time.perf_counter() - start)
    return fitted


def _representation(adata: ad.AnnData, use_rep: str, encoder: Encoder
                    ) -> tuple[npt.NDArray[np.float32], dict[str, np.ndarray] | None]:
    """Return ``obsm[use_rep]`` and the baseline state it was made with, after checking it is ``encoder``'s."""
    if use_rep not in adata.obsm:
        msg = f"obsm has no {use_rep!r} (keys: {', '.join(adata.obsm.keys()) or 'none'}); run sdm.tl.embed first."
        raise SchemaError(msg)
    facts = adata.uns.get(UNS_KEY, {}).get(use_rep, {})
    made_by = facts.get("model")
    if made_by is not None and made_by != encoder.name:
        msg = f"obsm[{use_rep!r}] holds {made_by} embeddings, not {encoder.name}; pass the matching model."
        raise ConfigError(msg)
    recorded = facts.get("checkpoint_sha256") or None
    if recorded is not None and recorded != encoder.checkpoint_sha256:
        msg = (f"obsm[{use_rep!r}] was made with {made_by} weights sha256 {recorded}, not the loaded "
               f"{encoder.checkpoint_sha256}; pass the same weights.")
        raise ConfigError(msg)
    state = facts.get("encoder_state")
    return np.asarray(adata.obsm[use_rep], dtype=np.float32), (dict(state) if state is not None else None)


# --- predict --------------------------------------------------------------------------------------------------

def predict(adata: ad.AnnData, head: Head | str | Path, *, weights: str | Path | None = None,
            layer: str | None = None, use_rep: str | None = None, threshold: float = 0.5, alpha: float | None = None,
            min_gene_overlap: float = 0.25, allow_value_kind_mismatch: bool = False, key_added: str | None = None,
            embedding_key: str | None = None, device: str = "auto", batch_size: int | None = None,
            allow_other_weights: bool = False, progress: Callable[[int, int], None] | None = None,
            copy: bool = False, **model_options: Any) -> ad.AnnData | None:
    """Predict each cell's sensitivity with a trained head: calibrated, with a prediction set and an OOD flag.

    Parameters
    ----------
    adata
        Cells in the data contract.
    head
        A `Head` (from `train` or `scdrugmap.read_head`) or the path of a saved bundle.
    weights, layer, device, batch_size
        As in `embed`; ``weights`` must be those the head was trained with.
    use_rep
        obsm key of embeddings already made with the head's model (frozen heads only). A baseline's
        embeddings must come from the head's own fitted genes and components, or are refused.
    threshold
        Calibrated P(sensitive) at or above which a cell is called ``sensitive``.
    alpha
        Miscoverage of the conformal prediction sets (default: the head's, 0.1): for each class, at most
        this share of its cells get a set without their true label (on data like the training data).
    min_gene_overlap
        Refuse data holding less than this share of the head's genes (harmonised ids); below 0.5 warns.
    allow_value_kind_mismatch
        Predict although the values are of another kind than the training data's (z-scored vs counts or
        log), with a warning.
    key_added
        Prefix of the obs columns and the ``uns`` key (default ``scdrugmap_<model>``).
    embedding_key
        Also store the embeddings the head saw in ``obsm[embedding_key]`` (computed with the head's
        adapters for a LoRA head).
    allow_other_weights
        Apply the head to embeddings of other weights than it was trained with (not recommended).
    copy
        Return a copy instead of writing into ``adata``.

    Returns
    -------
    None, or the copy, with these obs columns (``<key>`` = ``key_added``):

    ``<key>_prob_sensitive``
        calibrated P(sensitive), float32; NaN for a cell the model could not read;
    ``<key>_prob_raw``
        the head's uncalibrated output;
    ``<key>_prediction``
        ``sensitive`` / ``resistant`` at ``threshold`` (categorical);
    ``<key>_set``
        the conformal prediction set: ``sensitive``, ``resistant``, ``uncertain`` (both) or ``none``;
    ``<key>_ood``, ``<key>_ood_score``, ``<key>_ood_reason``
        out of distribution (bool), the kNN distance over the training cells' 99% quantile, and why;
    ``<model>_gene_overlap``
        models with a vocabulary: the share of each cell's expressed genes the model knows;

    and ``uns["scdrugmap"][key]``: model, head, threshold, alpha, checkpoint_sha256, the gene overlap with
    the head, both value kinds, and the warnings.

    Raises
    ------
    SchemaError
        When the data holds too few of the head's genes, or values of another kind (see the options).
    CheckpointError
        When the head belongs to another model or other weights.

    Examples
    --------
    >>> import scdrugmap as sdm
    >>> adata = sdm.datasets.simulate(n_cells=120, n_genes=200, seed=0)
    >>> head = sdm.tl.train(adata, "pca", head="logistic")
    >>> sdm.tl.predict(adata, head)
    >>> sorted(adata.obs["scdrugmap_pca_prediction"].cat.categories)
    ['resistant', 'sensitive']
    >>> set(adata.obs["scdrugmap_pca_set"].dropna()) <= {"sensitive", "resistant", "uncertain", "none"}
    True
    """
    validate_input(adata, layer=layer)  # the gate: no cells or genes, NaN/inf, duplicate names -> one SchemaError
    import pandas as pd

    from scdrugmap.train.bundle import Head as HeadClass
    from scdrugmap.train.predict import check_head_applies, predict_cells

    if not 0.0 <= threshold <= 1.0:
        msg = f"threshold {threshold}: a probability between 0 and 1."
        raise ConfigError(msg)
    if alpha is not None and not 0.0 < alpha < 1.0:
        msg = f"alpha {alpha}: the miscoverage of the prediction sets, between 0 and 1 (e.g. 0.1)."
        raise ConfigError(msg)
    head = head if isinstance(head, HeadClass) else HeadClass.read(head)
    adata = _target(adata, copy)
    fit = check_head_applies(head, adata, layer=layer, min_gene_overlap=min_gene_overlap,
                             allow_value_kind_mismatch=allow_value_kind_mismatch)
    for warning in fit.warnings:
        log.warning("%s", warning)
    encoder = _load_encoder(head.model, weights, device, model_options)
    embeddings = None
    if use_rep is not None:
        if head.kind == "lora":
            msg = "a LoRA head scores the cells through its adapted network; drop use_rep."
            raise ConfigError(msg)
        embeddings, state = _representation(adata, use_rep, encoder)
        head_state = head.encoder_state_sha256
        if head_state is not None:
            from scdrugmap.train.bundle import state_sha256

            if state is None or state_sha256(state) != head_state:
                msg = (f"obsm[{use_rep!r}] was not made in the head's fitted {head.model} genes and components (an "
                       f"embedding of these cells fits its own); drop use_rep so predict embeds in the head's space.")
                raise ConfigError(msg)
    else:
        encoder.check_input(adata, layer=layer)
    key = key_added or prediction_key(head.model)
    start = time.perf_counter()
    encoder.gene_overlap_ = None
    kit = head.trust_kit()
    need_embeddings = embedding_key is not None or kit.detector is not None
    logits, used = predict_cells(encoder, adata, head, layer=layer, embeddings=embeddings,
                              return_embeddings=need_embeddings, allow_other_weights=allow_other_weights,
                              batch_size=batch_size, progress=progress)
    # per cell, the share of its expressed genes the model knows; the data set's overlap with the head's
    # genes is guarded above (refused below min_gene_overlap, warned below 0.5), not flagged cell by cell
    trusted = kit.apply(logits, used if used is not None else embeddings, alpha=alpha,
                        gene_overlap=encoder.gene_overlap_)
    probability = trusted.calibrated
    calls = np.where(probability >= threshold, "sensitive", "resistant").astype(object)
    calls[np.isnan(probability)] = None
    obs = adata.obs
    obs[probability_column(key)] = probability
    obs[f"{key}_prob_raw"] = trusted.raw
    obs[label_column(key)] = pd.Categorical(calls, categories=["resistant", "sensitive"])
    obs[f"{key}_set"] = pd.Categorical(trusted.prediction_set,
                                       categories=["sensitive", "resistant", "uncertain", "none"])
    obs[f"{key}_ood"] = trusted.ood
    obs[f"{key}_ood_score"] = trusted.ood_score
    obs[f"{key}_ood_reason"] = pd.Categorical(trusted.ood_reason.astype(str))
    if encoder.gene_overlap_ is not None:
        obs[overlap_key(head.model)] = encoder.gene_overlap_
    if embedding_key is not None and used is not None:
        adata.obsm[embedding_key] = used
        facts: dict[str, Any] = {"model": head.model, "variant": str(getattr(encoder, "variant", "") or ""),
                                 "checkpoint_sha256": encoder.checkpoint_sha256 or "", "layer": layer or "X"}
        if head.encoder_state:  # made in the head's basis: a later predict(use_rep=...) may reuse it
            facts.update(encoder_state=head.encoder_state, encoder_state_sha256=head.encoder_state_sha256)
        if head.kind == "lora":
            facts["adapters"] = str(head.path or "in memory")
        _params(adata, embedding_key, facts)
    used_alpha = alpha if alpha is not None else (kit.conformal.alpha if kit.conformal is not None else None)
    notes = list(fit.warnings)
    if not kit.complete:
        notes.append("the head carries no calibration, conformal set or OOD reference (an earlier version): "
                     "probabilities are uncalibrated and sets and flags are empty; retrain it to have them.")
    _params(adata, key, {"model": head.model, "head": str(head.path or ""), "head_kind": head.kind,
                         "threshold": float(threshold), "alpha": used_alpha, "calibration": "platt",
                         "checkpoint_sha256": encoder.checkpoint_sha256 or "", "layer": layer or "X",
                         "gene_overlap": fit.gene_overlap, "n_head_genes": fit.n_head_genes,
                         "n_shared_genes": fit.n_shared_genes, "value_kind": fit.value_kind,
                         "head_value_kind": fit.head_value_kind or "", "warnings": notes})
    log.info("predicted %d cells with the %s %s head in %.1fs", adata.n_obs, head.model, head.kind,
             time.perf_counter() - start)
    return adata if copy else None


def check_head(adata: ad.AnnData, head: Head | str | Path, *, layer: str | None = None,
               min_gene_overlap: float = 0.25, allow_value_kind_mismatch: bool = False,
               source: str = "the data") -> dict[str, Any]:
    """Check that ``head`` can be applied to ``adata`` (the guards `predict` runs first), without predicting.

    Works on a backed AnnData: only the gene names and the first rows are read.

    Returns
    -------
    ``gene_overlap`` (share of the head's genes present, harmonised ids), ``n_head_genes``,
    ``n_shared_genes``, ``value_kind``, ``head_value_kind`` and ``warnings``.

    Raises
    ------
    SchemaError
        As `predict` does: too few of the head's genes, or values of another kind.
    """
    from dataclasses import asdict

    from scdrugmap.train.bundle import Head as HeadClass
    from scdrugmap.train.predict import check_head_applies

    head = head if isinstance(head, HeadClass) else HeadClass.read(head)
    return asdict(check_head_applies(head, adata, layer=layer, min_gene_overlap=min_gene_overlap,
                                     allow_value_kind_mismatch=allow_value_kind_mismatch, source=source))


def prediction_summary(adata: ad.AnnData, key: str, *, label_key: str | None = "response") -> dict[str, Any]:
    """Return the counts a user reads after `predict`, and, where labels exist, F1, AUROC and coverage.

    Keys: ``n_cells``, ``n_sensitive``, ``n_resistant``, ``n_missing`` (unreadable cells), ``n_uncertain``,
    ``n_empty_set``, ``n_ood``, ``mean_probability``; with labels ``scored`` = F1, AUROC, accuracy, ...
    (unit: cells) and ``coverage`` (overall and per class, mean set size), each with its reasons.
    """
    from scdrugmap.data.schema import encode_labels
    from scdrugmap.errors import ScDrugMapError

    obs = adata.obs
    probability = obs[probability_column(key)].to_numpy(dtype=np.float64)
    calls = obs[label_column(key)].astype(object).to_numpy()
    sets = obs[f"{key}_set"].astype(object).to_numpy() if f"{key}_set" in obs else np.full(adata.n_obs, None)
    summary: dict[str, Any] = {
        "n_cells": int(adata.n_obs), "n_sensitive": int((calls == "sensitive").sum()),
        "n_resistant": int((calls == "resistant").sum()), "n_missing": int(np.isnan(probability).sum()),
        "n_uncertain": int((sets == "uncertain").sum()), "n_empty_set": int((sets == "none").sum()),
        "n_ood": int(obs[f"{key}_ood"].sum()) if f"{key}_ood" in obs else 0,
        "mean_probability": None if np.isnan(probability).all() else float(np.nanmean(probability)),
    }
    if label_key is None or label_key not in obs or not obs[label_key].notna().all():
        return summary
    try:
        labels = encode_labels(obs[label_key], column=label_key)
    except ScDrugMapError:
        return summary
    from scdrugmap.evaluate.metrics import compute_metrics

    threshold = float(adata.uns.get(UNS_KEY, {}).get(key, {}).get("threshold", 0.5))
    metrics, reasons = compute_metrics(labels, probability.astype(np.float32), threshold=threshold)
    summary["scored"] = {"unit": "cells", "n": int((~np.isnan(probability)).sum()), **metrics}
    summary["scored_notes"] = reasons
    readable = ~np.isnan(probability) & np.array([s is not None and s == s for s in sets])
    if readable.any():
        from scdrugmap.train.conformal import coverage

        members = np.stack([np.isin(sets[readable], ["resistant", "uncertain"]),
                            np.isin(sets[readable], ["sensitive", "uncertain"])], axis=1)
        summary["coverage"] = coverage(labels[readable], members)
    return summary


# --- benchmark ------------------------------------------------------------------------------------------------

def benchmark(data: str | Path | ad.AnnData = "demo", *, progress: Callable[[str, int, int, str], None] | None = None,
              **settings: Any) -> pd.DataFrame:
    """Run (or resume) the benchmark grid: model x strategy x scenario x category value x fold.

    Parameters
    ----------
    data
        An ``.h5ad`` path, ``"demo"`` (the simulated collection), or an AnnData (written once to the cache
        under its fingerprint, so a rerun resumes).
    progress
        Called with (stage, done, total, detail).
    settings
        Fields of `scdrugmap.evaluate.grid.BenchmarkConfig`: ``out``, ``models``, ``strategies``, ``heads``,
        ``scenarios``, ``categories``, ``splits``, ``folds``, ``seed``, ``keys`` (obs column names), ...

    Returns
    -------
    One row per job (also stored in the run folder ``out``); read the whole run with `scdrugmap.read_run`.

    Examples
    --------
    >>> import scdrugmap as sdm
    >>> adata = sdm.datasets.simulate(n_cells=300, n_genes=200, seed=0)
    >>> import tempfile
    >>> results = sdm.tl.benchmark(adata, out=tempfile.mkdtemp(), models=["pca", "majority"],
    ...                            categories=["tissue"], scenarios=["pooled"], folds=3)
    >>> sorted(results["model"].unique())
    ['majority', 'pca']
    """
    from anndata import AnnData

    from scdrugmap.evaluate.grid import BenchmarkConfig
    from scdrugmap.evaluate.runner import run_benchmark

    if isinstance(data, AnnData):
        from scdrugmap import config as paths
        from scdrugmap.data.io import data_fingerprint, write_h5ad_atomic

        path = paths.home_dir() / "inputs" / f"{data_fingerprint(data)[:24]}.h5ad"
        if not path.exists():
            write_h5ad_atomic(data, path)
        data = path
    settings.setdefault("out", str(Path("scdrugmap-runs") / ("demo" if str(data) == "demo" else Path(data).stem)))
    config = BenchmarkConfig(data=str(data), **settings)
    return run_benchmark(config, progress=progress)
