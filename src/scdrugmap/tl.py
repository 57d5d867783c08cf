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
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast

import numpy as np

from scdrugmap.data.gate import validate_input
from scdrugmap.errors import ConfigError, SchemaError

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Sequence

    import anndata as ad
    import numpy.typing as npt
    import pandas as pd

    from scdrugmap.models.base import Encoder, TorchEncoder
    from scdrugmap.models.precision import Dtype
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

def _load_encoder(model: str, weights: str | Path | None, device: str | None, options: dict[str, Any],
                  dtype: str | None = None) -> Encoder:
    """Load a registered encoder; resolve the device (which imports torch) only for models with a network."""
    from scdrugmap.models.base import TorchEncoder, get_encoder_class, load_encoder

    cls = get_encoder_class(model)
    needs_device = issubclass(cls, TorchEncoder)
    return load_encoder(model, None if weights is None else str(weights), device=device if needs_device else None,
                        dtype=dtype, **options)


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
          key_added: str | None = None, batch_size: int | None = None, device: str = "auto", dtype: Dtype = "auto",
          copy: bool = False, progress: Callable[[int, int], None] | None = None,
          **model_options: Any) -> ad.AnnData | None:
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
    dtype
        What the forward passes run in: ``auto`` (the model's default for the device: float32 on the CPU,
        the official mixed precision on CUDA), ``float32``, or ``bfloat16`` (x1.1-2.6 faster at the published
        widths on a CPU with AVX512-BF16; refused by a model whose parity with float32 does not hold, see
        `scdrugmap.models.precision`). Baselines compute in float32 whatever is asked.
    copy
        Return a copy instead of writing into ``adata``.
    progress
        Called with (cells done, cells) as batches finish.
    model_options
        Options of the model's loader (e.g. ``version="V2"`` for Geneformer).

    Returns
    -------
    None, or the copy, with ``obsm[key_added]`` (float32 whatever ``dtype``, cells x width; NaN rows for cells
    the model could not read), ``obs["<model>_gene_overlap"]`` (models with a vocabulary), and
    ``uns["scdrugmap"][key_added]`` = model, variant, checkpoint_sha256, layer, dtype (what the forward
    passes ran in) (and, for a baseline, the fitted genes and components in ``encoder_state``, so a head
    trained on them travels).

    Raises
    ------
    ConfigError
        When ``dtype`` is unknown, or ``bfloat16`` is asked of a model that refuses it (before any weights
        are read).

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
    encoder = _load_encoder(model, weights, device, model_options, dtype)
    encoder.check_input(adata, layer=layer)
    facts: dict[str, Any] = {"model": encoder.name, "variant": str(getattr(encoder, "variant", "") or ""),
                             "checkpoint_sha256": encoder.checkpoint_sha256 or "", "layer": layer or "X",
                             "dtype": encoder.compute_dtype}
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
               batch_size: int | None = None, device: str = "auto", dtype: Dtype = "auto",
               ray_address: str | None = None, shard_cells: int = 20_000, cpus: float = 1.0, gpus: float = 0.0,
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
    from scdrugmap.models.base import get_encoder_class
    from scdrugmap.models.precision import resolve_dtype
    from scdrugmap.models.sharded import EncoderSpec, embed_sharded

    resolve_dtype(get_encoder_class(model), dtype, "cpu")  # refuse bfloat16 here, not on every worker
    cluster.connect(ray_address)
    backed = read_h5ad(path, backed=True)
    n_obs = backed.n_obs
    backed.file.close()
    result = embed_sharded(EncoderSpec(model, None if weights is None else str(weights), dict(model_options), device,
                                       dtype),
                           Path(path).resolve(), n_obs=n_obs, layer=layer, batch_size=batch_size,
                           shard_cells=shard_cells, resources=cluster.Resources(cpus=cpus, gpus=gpus),
                           progress=progress)
    facts = {"model": model, "variant": "", "checkpoint_sha256": result.checkpoint_sha256 or "",
             "layer": layer or "X", "dtype": result.dtype}
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


# --- biomarkers -----------------------------------------------------------------------------------------------

#: Columns of `Biomarkers.table`, in order.
BIOMARKER_COLUMNS = ("gene", "comparison", "stratum", "test", "log2fc", "pvalue", "qvalue", "score", "n_resistant",
                     "n_sensitive", "attribution_mean", "attribution_sd", "attribution_abs_mean", "deletion_delta",
                     "stability")
#: Genes per direction in the dot plot.
DOTPLOT_GENES = 10


@dataclass
class Biomarkers:
    """What `biomarkers` found: one row per gene and comparison, the enrichment, and the facts.

    Attributes
    ----------
    table
        One row per gene, comparison, stratum and test, columns `BIOMARKER_COLUMNS` (see `biomarkers`).
    enrichment
        One row per comparison, method and gene set, or None when no gene sets were given.
    facts
        What was run on what: source, model, head, cells and samples per group, tests, caveats, attribution
        and deletion settings, seeds, timings (JSON-serialisable).
    expression
        The dot plot's data: per top gene, sample and group, ``mean_expression`` (log-normalised),
        ``fraction_expressing`` and ``n_cells``.
    """

    table: pd.DataFrame
    enrichment: pd.DataFrame | None
    facts: dict[str, Any]
    expression: pd.DataFrame | None = field(default=None, repr=False)

    def top_genes(self, comparison: str | None = None, *, direction: Literal["up", "down", "both"] = "up",
                  k: int = 20) -> list[str]:
        """Return the ``k`` genes with the smallest p-values of one comparison (default: the first).

        ``up``: higher in resistant cells; ``down``: lower in resistant cells.
        """
        from scdrugmap.explain.de import top_genes

        comparison = comparison or self.facts["comparisons"][0]
        return top_genes(self.table[self.table["comparison"] == comparison], k, direction=direction)

    def write(self, out_dir: str | Path) -> list[Path]:
        """Write the table, the enrichment, the facts and the figures (PNG) into ``out_dir``, atomically.

        A run's ``biomarkers/`` folder (`scdrugmap.evaluate.store.biomarkers_dir`) is where its report
        looks; `scdrugmap.evaluate.store.read_biomarkers` reads any such folder back.

        Every file is written to a temporary name first and moved into place only when all were written,
        so a failure leaves the earlier files of ``out_dir`` as they were.

        Returns
        -------
        The paths written: ``biomarkers.parquet``, ``enrichment.parquet`` (with gene sets), ``biomarkers.json``,
        and the figures ``volcano.png``, ``dotplot.png``, ``attribution.png`` (with a head) and
        ``enrichment.png`` (with gene sets).
        """
        import json
        import os
        import tempfile

        from scdrugmap.evaluate.store import BIOMARKER_FILES
        from scdrugmap.report import biomarkers as figures

        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        writers: dict[str, Callable[[Path], None]] = {
            "table": lambda path: self.table.to_parquet(path, index=False),
            "volcano": lambda path: _save(figures.plot_volcano(self.table), path),
        }
        if self.enrichment is not None:
            writers["enrichment"] = lambda path: self.enrichment.to_parquet(path, index=False)  # type: ignore[union-attr]
            if len(self.enrichment):
                writers["enrichment_figure"] = lambda path: _save(
                    figures.plot_enrichment(self.enrichment, top=10), path)
        if self.expression is not None and len(self.expression):
            writers["dotplot"] = lambda path: _save(figures.plot_dotplot(self.expression, self.facts), path)
        if self.table["attribution_abs_mean"].notna().any() or self.table["deletion_delta"].notna().any():
            writers["attribution"] = lambda path: _save(figures.plot_attribution(self.table, self.facts), path)
        facts = {**self.facts, "files": sorted(BIOMARKER_FILES[name] for name in [*writers, "facts"])}

        def write_facts(path: Path) -> None:
            path.write_text(json.dumps(facts, indent=2, default=str) + "\n")

        writers["facts"] = write_facts
        temporary: dict[str, Path] = {}
        try:
            for name, write in writers.items():
                handle, tmp_name = tempfile.mkstemp(dir=out_dir, prefix=f".{BIOMARKER_FILES[name]}.", suffix=".tmp")
                os.close(handle)
                temporary[name] = Path(tmp_name)
                write(temporary[name])
            for name, tmp_path in temporary.items():
                os.replace(tmp_path, out_dir / BIOMARKER_FILES[name])
        finally:
            for tmp_path in temporary.values():
                tmp_path.unlink(missing_ok=True)
        return [out_dir / BIOMARKER_FILES[name] for name in writers]


def _save(figure: Any, path: Path) -> None:
    figure.savefig(path, format="png")


def _stage(progress: Callable[[str, int, int, str], None] | None, stage: str) -> Callable[[int, int], None] | None:
    if progress is None:
        return None
    return lambda done, total: progress(stage, done, total, "")


def _run_probabilities(run_dir: str | Path, model: str | None, cells: npt.NDArray[np.str_]
                       ) -> tuple[str, npt.NDArray[np.float64], dict[str, Any], list[str]]:
    """Return (model, out-of-fold P(sensitive) per cell of ``cells`` (NaN where the run has none), facts, the
    keys of the jobs that predicted them)."""
    import pandas as pd

    from scdrugmap.evaluate.store import read_run

    run = read_run(run_dir)
    predictions = run.predictions
    if predictions is None or predictions.empty:
        msg = f"{run_dir}: the run stored no out-of-fold predictions; rerun `scdrugmap benchmark` with this version."
        raise ConfigError(msg)
    done = run.results[run.results["status"] == "done"]
    models = sorted(done["model"].astype(str).unique())
    if model is None and len(models) == 1:
        model = models[0]
    if model not in models:
        msg = f"{run_dir}: no scored job of model {model!r}; the run has {', '.join(models) or 'none'}. Pass --model."
        raise ConfigError(msg)
    jobs = done[done["model"].astype(str) == model]
    if "level" in jobs:  # one row per job: its cell-level row
        jobs = jobs[jobs["level"].fillna("cell") == "cell"]
    for column, preferred in (("scenario", "pooled"), ("split", "sample")):
        if column in jobs and (jobs[column] == preferred).any():
            jobs = jobs[jobs[column] == preferred]
    # one setting (strategy, head, category): the one whose test folds predict the most cells
    setting = [c for c in ("strategy", "head", "category") if c in jobs]
    rows = predictions.merge(jobs[["key", *setting]].astype({"key": str}), on="key")
    wanted = set(cells)
    rows = rows[rows["cell"].astype(str).isin(wanted)]
    if rows.empty:
        msg = (f"{run_dir}: none of the run's predicted cells of {model} is in the data (cell names differ); "
               "give the data the run was made on.")
        raise SchemaError(msg)
    reach = rows.groupby(setting, sort=True)["cell"].nunique().sort_values(ascending=False, kind="stable")
    chosen = dict(zip(setting, reach.index[0] if len(setting) > 1 else (reach.index[0],), strict=True))
    picked = rows
    for column, value in chosen.items():
        picked = picked[picked[column] == value]
    per_cell = picked.groupby("cell", sort=False)["probability"].mean()
    probability = pd.Series(per_cell).reindex(pd.Index(cells)).to_numpy(dtype=np.float64)
    scenario_split = {c: str(jobs[c].iloc[0]) for c in ("scenario", "split") if c in jobs and jobs[c].nunique() == 1}
    facts = {"run": str(run_dir), "jobs": int(picked["key"].nunique()),
             "setting": {**scenario_split, **{k: str(v) for k, v in chosen.items()}},
             "cells_predicted": int(np.isfinite(probability).sum()),
             "cells_predicted_twice": int((picked.groupby("cell")["key"].nunique() > 1).sum())}
    return str(model), probability, facts, list(dict.fromkeys(picked["key"].astype(str)))


def _refit_folds(run: str | Path, adata: ad.AnnData, model: str, keys: list[str], facts: dict[str, Any],
                 progress: Callable[[str, int, int, str], None] | None) -> Any:
    """Retrain the run's fold heads behind ``keys`` (`refit_fold_heads`); None, with the reason in ``facts``,
    where the jobs keep no model that can be retrained (LoRA, prompts)."""
    from scdrugmap.evaluate.refit import refit_fold_heads

    strategies = sorted({key.split("|")[1] for key in keys if key.count("|") >= 2})
    if not keys or strategies != ["frozen"]:
        facts["fold_models"] = {"reason": f"the run's predictions come from {', '.join(strategies) or 'no'} jobs, "
                                          "whose fold models cannot be retrained exactly (frozen heads only); "
                                          "pass a head (--head) to attribute one"}
        return None
    refitted = refit_fold_heads(run, adata, model, keys, progress=_stage(progress, "retraining the fold heads"))
    facts["fold_models"] = refitted.facts
    return refitted


@contextmanager
def _quiet_resamples() -> Iterator[None]:
    """Keep the per-resample log lines and anndata's duplicate-name warning (resamples repeat cells) out of the way."""
    import warnings

    logger = logging.getLogger("scdrugmap.explain")
    level = logger.level
    logger.setLevel(max(level, logging.ERROR))
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Observation names are not unique", category=UserWarning)
            yield
    finally:
        logger.setLevel(level)


def _caveats(comparison: str, tests: list[str], per_sample: bool, value_kind: str, n_cells: int) -> list[str]:
    notes = []
    if value_kind == "log" and "wilcoxon" in tests:
        notes.append(f"{comparison}: the values are already log-transformed (base unknown); the Wilcoxon fold change "
                     "assumes natural log1p values, so log2fc orders genes correctly but its size is not a calibrated "
                     "fold change.")
    if "wilcoxon" in tests and per_sample:
        why = (f"the values are {value_kind}, not raw counts, so pseudobulk DESeq2 could not run"
               if value_kind != "counts" else "too few samples per group for pseudobulk")
        notes.append(f"{comparison}: labels are per sample but the Wilcoxon test treats the {n_cells} cells as "
                     f"replicates (pseudoreplication; {why}): its p- and q-values are far too small. Read them as a "
                     "ranking, not as evidence.")
    elif "wilcoxon" in tests:
        notes.append(f"{comparison}: the Wilcoxon test treats cells as independent, but cells of one sample are "
                     "not: its p-values are optimistic.")
    return notes


def _dotplot_expression(adata: ad.AnnData, genes: list[str], groups: npt.NDArray[np.object_],
                        samples: npt.NDArray[np.object_], layer: str | None) -> pd.DataFrame:
    """Mean log-normalised expression and share of expressing cells per gene, sample and group."""
    import pandas as pd
    import scipy.sparse as sp

    from scdrugmap.data.schema import detect_value_kind, expression_matrix
    from scdrugmap.models.baselines import log_normalise

    X = expression_matrix(adata, layer)
    if hasattr(X, "to_memory"):
        X = X.to_memory()
    labelled = np.array([g is not None for g in groups])
    columns = adata.var_names.get_indexer(genes)
    values: Any = log_normalise(X[labelled], detect_value_kind(X))
    values = values[:, columns]
    dense = np.asarray(values.toarray() if sp.issparse(values) else values, dtype=np.float64)
    frame = pd.DataFrame(dense, columns=genes)
    frame["sample"], frame["group"] = samples[labelled].astype(str), groups[labelled].astype(str)
    long = frame.melt(id_vars=["sample", "group"], var_name="gene", value_name="value")
    long["expressing"] = long["value"] > 0
    summary = long.groupby(["gene", "sample", "group"], sort=False).agg(
        mean_expression=("value", "mean"), fraction_expressing=("expressing", "mean"), n_cells=("value", "size"))
    return summary.reset_index()


def biomarkers(
    adata: ad.AnnData,
    model: str | None = None,
    *,
    head: Head | str | Path | None = None,
    run: str | Path | None = None,
    label_key: str = "response",
    sample_key: str | None = "sample",
    cell_type_key: str | None = None,
    gene_sets: str | Path | dict[str, list[str]] | None = None,
    comparisons: Sequence[Literal["observed", "predicted"]] | None = None,
    threshold: float = 0.5,
    probability_key: str | None = None,
    top_k: int = 20,
    max_cells: int | None = 500,
    max_genes: int | None = 50,
    attribute: bool = True,
    n_steps: int | None = None,
    n_bootstrap: int = 20,
    n_permutations: int = 1000,
    test: Literal["auto", "wilcoxon", "pseudobulk", "both"] = "auto",
    non_counts: Literal["raise", "wilcoxon"] = "wilcoxon",
    layer: str | None = None,
    weights: str | Path | None = None,
    device: str = "auto",
    seed: int = 0,
    progress: Callable[[str, int, int, str], None] | None = None,
    **model_options: Any,
) -> Biomarkers:
    """Find the genes that separate resistant from sensitive cells, the genes a model relies on, and their programs.

    Parameters
    ----------
    adata
        Cells x genes (raw counts for pseudobulk; see ``non_counts``). Not changed.
    model
        The registry name of the model (checked against ``head``; picks the model's jobs of ``run``).
    head
        A trained head (`train`, `scdrugmap.read_head`, or its folder). Its predictions on ``adata``
        (`predict`, calibrated, threshold 0.5) form the ``predicted`` groups, unless ``run`` is given, and
        it is the model that is attributed and whose genes are deleted.
    run
        A benchmark run folder (`benchmark`): the ``predicted`` groups come from its out-of-fold
        probabilities of ``model`` on these cells (threshold 0.5), in the pooled scenario and patient-grouped
        split where the run has them, and the one strategy, head and category whose test folds cover the most
        cells (a cell predicted by several of its jobs takes their mean). Without ``head``, each fold's
        model is retrained from the run's config and saved splits (frozen heads:
        `scdrugmap.evaluate.refit.refit_fold_heads`, checked to reproduce the saved predictions to 1e-6)
        and attributed, and has genes deleted, on its own test cells only; ``stability`` is then the share
        of fold models with the gene among their ``top_k`` most attributed genes (no bootstrap). With
        ``head``, that head is attributed instead (trained on all cells, not each fold's model: the facts
        say so).
    label_key
        obs column of the observed labels (the ``observed`` comparison).
    sample_key
        obs column of the sample (patient): pseudobulk replicates, bootstrap units, dot-plot columns.
    cell_type_key
        obs column of cell types: differential expression runs within each (the ``stratum`` column).
    gene_sets
        A GMT file (or ``{name: genes}``) for the enrichment; None: no enrichment.
    comparisons
        ``observed`` (labels in ``obs[label_key]``) and/or ``predicted`` (needs ``head``, ``run`` or
        ``probability_key``). Default: ``observed`` when the labels are there, and ``predicted`` when a head
        or run is given.
    threshold
        P(sensitive) at and above which a cell is predicted sensitive (the ``predicted`` groups).
    probability_key
        obs column of P(sensitive) already predicted on these cells (`predict` writes
        ``scdrugmap_<model>_prob_sensitive``): it forms the ``predicted`` groups instead of predicting
        again with ``head`` (which is still the model attributed). Not with ``run``.
    top_k
        Top genes per direction: the stability ranking, the over-representation lists, the genes deleted.
    max_cells
        Cells attributed and deleted from (drawn with ``seed``; None: all).
    max_genes
        Genes deleted in silico (the top genes of each comparison and of the attribution; 0: no deletion).
    attribute
        Attribute the model and delete genes (False: differential expression, stability and enrichment
        only; ``facts["attribution"]["reason"]`` says so).
    n_steps
        Integrated-gradients steps; None: 50 for pca/hvg heads, 20 for token models. ``facts["attribution"]``
        gives the largest completeness error: raise the steps when it is a large share of ``largest_change``.
    n_bootstrap
        Bootstrap resamples of samples for the ``stability`` column (0: NaN stability).
    n_permutations
        Gene-set permutations of the rank enrichment.
    test, non_counts
        As `scdrugmap.explain.de.differential_expression`; by default pseudobulk where labels are per
        sample and values are counts, else the Wilcoxon test, with the caveat in ``facts["caveats"]``.
    layer, weights, device, model_options
        As in `predict`.
    seed
        Seed of the cell sample, the bootstrap and the enrichment permutations: the same seed gives the
        same output.
    progress
        Called with (stage, done, total, detail).

    Returns
    -------
    `Biomarkers`. ``table`` has one row per gene, comparison, stratum and test (columns `BIOMARKER_COLUMNS`):
    ``log2fc`` (resistant over sensitive), ``pvalue``, ``qvalue`` (BH within comparison, stratum and test),
    ``score`` (signed test statistic, positive: higher in resistant), ``n_resistant``/``n_sensitive`` (cells,
    or pseudobulk samples); ``attribution_mean`` and ``attribution_sd``: integrated gradients of the head's
    P(sensitive) (before calibration) over the comparison's resistant cells among those attributed, relative
    to the average cell (pca, hvg) or, for token models, on the input embeddings relative to the model's
    baseline input (gene tokens padded or genes unexpressed, per model: `scdrugmap.explain.token_hooks`;
    ``facts["attribution"]`` names it and the largest completeness error) (negative: the gene pushes these
    cells towards resistance); ``attribution_abs_mean``: mean |attribution| over every attributed cell (the
    gene's weight in the model); ``deletion_delta``: mean
    change in P(sensitive) when the gene is zeroed, over the cells expressing it (NaN for genes not
    deleted); ``stability``: share of bootstrap resamples (of samples, within each group) with the gene among
    the comparison's top ``top_k`` of its direction, or, for a run's fold models, share of fold models with
    the gene among their ``top_k`` most attributed genes (``facts["stability"]["method"]`` says which).
    ``enrichment`` has one row per comparison, method (``ora_up``, ``ora_down``: hypergeometric test of the
    top ``top_k`` genes per direction; ``rank``: GSEA preranked on ``score``) and gene set.

    Raises
    ------
    SchemaError
        For missing obs columns, unreadable labels, data the head cannot read, or cells unknown to the run.
    ConfigError
        For a comparison that cannot run, or a head of another model; with ``run``, when a retrained fold
        head does not reproduce the run's saved predictions (its config, data, device or libraries changed).

    Examples
    --------
    >>> import tempfile
    >>> import scdrugmap as sdm
    >>> adata = sdm.datasets.simulate(n_cells=400, n_genes=200, seed=0)
    >>> found = sdm.tl.biomarkers(adata, n_bootstrap=0)
    >>> found.facts["comparisons"], len(found.top_genes("observed", direction="up", k=5))
    (['observed'], 5)
    >>> found.write(tempfile.mkdtemp())  # doctest: +ELLIPSIS
    [PosixPath('.../biomarkers.parquet'), ...]
    """
    import anndata
    import pandas as pd

    from scdrugmap.explain import attribution as attr
    from scdrugmap.explain import de, enrichment, stability
    from scdrugmap.train.bundle import Head as HeadClass
    from scdrugmap.version import __version__

    validate_input(adata, layer=layer)
    start = time.perf_counter()
    if isinstance(adata, anndata.AnnData) and adata.is_view:
        adata = adata.copy()
    # a light working copy: obs is ours to add to, X is shared and never written
    work = anndata.AnnData(X=adata.X, obs=adata.obs.copy(), var=adata.var.copy(), layers=dict(adata.layers),
                           uns=dict(adata.uns))
    trained = None if head is None else head if isinstance(head, HeadClass) else HeadClass.read(head)
    if trained is not None:
        if model is not None and model != trained.model:
            msg = f"the head was trained on {trained.model} embeddings, not {model}. Use model={trained.model!r}."
            raise ConfigError(msg)
        model = trained.model
    if top_k < 1:
        msg = f"top_k={top_k}; expected at least 1."
        raise ConfigError(msg)
    if comparisons is None:
        predicted = trained is not None or run is not None or probability_key is not None
        requested = [c for c, present in (("observed", label_key in work.obs), ("predicted", predicted)) if present]
        if not requested:
            msg = (f"nothing to compare: obs has no {label_key!r} column and no head or run was given. Name the label "
                   "column (label_key=), or give a head or a run for predicted groups.")
            raise SchemaError(msg)
    else:
        requested = list(comparisons)
    requested = list(dict.fromkeys(requested))
    unknown = [c for c in requested if c not in ("observed", "predicted")]
    if unknown:
        msg = f"comparisons {unknown}; expected observed and/or predicted."
        raise ConfigError(msg)
    comparisons = cast("list[Literal['observed', 'predicted']]", requested)
    if "predicted" in comparisons and trained is None and run is None and probability_key is None:
        msg = "the predicted comparison needs a head (head=, --head) or a benchmark run (run=, --run)."
        raise ConfigError(msg)
    if run is not None and probability_key is not None:
        msg = "give a run (its out-of-fold predictions) or probability_key (predictions on these cells), not both."
        raise ConfigError(msg)
    if not 0.0 < threshold < 1.0:
        msg = f"threshold={threshold}; choose a probability between 0 and 1."
        raise ConfigError(msg)
    if sample_key is not None and sample_key not in work.obs:
        msg = f"obs has no {sample_key!r} column for the samples; columns: {list(work.obs.columns)[:10]}. Pass sample_key."
        raise SchemaError(msg)
    samples = (work.obs[sample_key].astype(str).to_numpy().astype(object) if sample_key is not None
               else np.full(work.n_obs, "all", dtype=object))
    facts: dict[str, Any] = {"version": __version__, "model": model, "head": None if trained is None else
                             str(trained.path or "in memory"), "comparisons": comparisons, "label_key": label_key,
                             "sample_key": sample_key, "cell_type_key": cell_type_key, "seed": seed, "top_k": top_k,
                             "n_cells": int(work.n_obs), "n_genes": int(work.n_vars), "caveats": [], "groups": {},
                             "tests": {}, "skipped_strata": {}}

    # 1. the groups of each comparison ---------------------------------------------------------------------
    groups: dict[str, npt.NDArray[np.object_]] = {}
    run_keys: list[str] = []
    if "observed" in comparisons:
        groups["observed"] = de.label_groups(work, None, label_key)
    if "predicted" in comparisons:
        if run is not None:
            model, probability, facts["run"], run_keys = _run_probabilities(run, model,
                                                                            np.asarray(work.obs_names.astype(str)))
            facts["model"] = model
            facts["predicted_from"] = f"the run's out-of-fold probabilities (threshold {threshold:g})"
        elif probability_key is not None:
            if probability_key not in work.obs:
                msg = (f"obs has no {probability_key!r} column of predicted P(sensitive); predict first "
                       "(sdm.tl.predict) or leave probability_key out to predict with the head.")
                raise SchemaError(msg)
            probability = work.obs[probability_key].to_numpy(dtype=np.float64)
            facts["predicted_from"] = f"obs[{probability_key!r}], P(sensitive) as predicted (threshold {threshold:g})"
        else:
            assert trained is not None
            predict(work, trained, weights=weights, layer=layer, device=device, progress=_stage(progress, "predict"),
                    **model_options)
            probability = work.obs[probability_column(prediction_key(trained.model))].to_numpy(dtype=np.float64)
            facts["predicted_from"] = f"the head's calibrated P(sensitive) on these cells (threshold {threshold:g})"
        groups["predicted"] = de.predicted_groups(probability, threshold=threshold)
        facts["threshold"] = threshold
    fold_heads = None
    if run is not None and trained is None and attribute and (max_cells is None or max_cells > 0):
        fold_heads = _refit_folds(run, work, str(model), run_keys, facts, progress)
    for name, labels in groups.items():
        present = np.array([g is not None for g in labels])
        facts["groups"][name] = {
            "cells": {g: int((labels == g).sum()) for g in de.GROUPS},
            "samples": {g: len(set(samples[present & (labels == g)])) for g in de.GROUPS},
            "unlabelled_cells": int((~present).sum()),
            "labels_per_sample": bool(sample_key is not None and de.labels_are_per_sample(labels, samples)),
        }

    # 2. differential expression ---------------------------------------------------------------------------
    options: dict[str, Any] = {"sample_key": sample_key, "cell_type_key": cell_type_key, "test": test, "layer": layer,
                               "non_counts": non_counts}
    tables = []
    for name, labels in groups.items():
        table = de.differential_expression(work, labels=labels, comparison=name,
                                           progress=_stage(progress, f"differential expression ({name})"), **options)
        tests = sorted(set(table["test"]))
        facts["tests"][name] = tests
        facts["value_kind"] = table.attrs.get("value_kind")
        facts["skipped_strata"][name] = dict(table.attrs.get("skipped", {}))
        if table.attrs.get("designs"):
            facts.setdefault("designs", {})[name] = dict(table.attrs["designs"])
        labelled = sum(g is not None for g in labels)
        facts["caveats"] += _caveats(name, tests, facts["groups"][name]["labels_per_sample"],
                                     str(table.attrs.get("value_kind")), labelled)
        tables.append(table)
    table = pd.concat(tables, ignore_index=True)

    # 3. stability over bootstrap resamples of samples -----------------------------------------------------
    stable = []
    if n_bootstrap > 0 and fold_heads is None:
        for name, labels in groups.items():
            column = "_scdrugmap_group"
            present = np.flatnonzero([g is not None for g in labels])
            subset = work[present].copy()
            subset.obs[column] = labels[present].astype(str)

            # the top_k of each direction in every resample, as the table and the printout list them
            def rank(resample: ad.AnnData, column: str = column) -> list[str]:
                tested = de.differential_expression(resample, label_key=column, **options)
                return de.top_genes(tested, top_k, direction="up") + de.top_genes(tested, top_k, direction="down")

            with _quiet_resamples():
                result = stability.bootstrap_stability(subset, rank, n_resamples=n_bootstrap, group_key=sample_key,
                                                       label_key=column, k=2 * top_k, seed=seed,
                                                       progress=_stage(progress, f"bootstrap ({name})"))
            stable.append(result.frequency.rename("stability").reset_index().assign(comparison=name))
            facts.setdefault("stability", {})[name] = {"jaccard_mean": result.jaccard_mean,
                                                       "resamples": n_bootstrap, "k_per_direction": top_k}
    if stable:
        table = table.merge(pd.concat(stable, ignore_index=True), on=["gene", "comparison"], how="left")
        table["stability"] = table["stability"].fillna(0.0)
    else:
        table["stability"] = np.nan

    # 4. attribution and in-silico deletion of the head (or of each fold's model) --------------------------
    table["attribution_mean"] = table["attribution_sd"] = table["attribution_abs_mean"] = np.nan
    table["deletion_delta"] = np.nan
    explained = trained.model if trained is not None else None if fold_heads is None else fold_heads.model
    if not attribute:
        facts["attribution"] = {"method": None, "reason": "not asked for (attribute=False): differential "
                                                          "expression only"}
    elif explained is None:
        facts["attribution"] = {"method": None, "reason": facts.get("fold_models", {}).get("reason") or
                                "no head given: train one (sdm.tl.train, `scdrugmap train`) and pass it to "
                                "attribute genes"}
    else:
        from scdrugmap.explain import folds as fold_explain

        found, note = None, ""
        folds_found = None
        encoder = None if fold_heads is None else fold_heads.encoder
        token_model = explained not in attr.EXPRESSION_MODELS
        baseline = "the mean attributed cell"
        step_option: dict[str, Any] = {} if n_steps is None else {"n_steps": int(n_steps)}
        if token_model:
            encoder = encoder or _load_encoder(explained, weights, device, model_options)
            try:
                baseline = attr.token_attribution_hook(encoder).description
            except ConfigError as err:
                note = f"{err} Only in-silico deletion was run."
                baseline = ""
                log.warning("%s", note)
        if not note:
            if fold_heads is not None:
                folds_found = fold_explain.attribute_folds(work, fold_heads.folds, encoder, layer=layer,
                                                           max_cells=max_cells, top_k=top_k, seed=seed,
                                                           n_steps=n_steps, progress=_stage(progress, "attribution"))
                found = folds_found.attributions
            elif not token_model:
                assert trained is not None  # explained is the head's model
                found = attr.attribute_expression(work, trained, layer=layer, max_cells=max_cells, seed=seed,
                                                  progress=_stage(progress, "attribution"), **step_option)
            else:
                assert trained is not None and encoder is not None
                found = attr.attribute_tokens(cast("TorchEncoder", encoder), work, trained, layer=layer,
                                              max_cells=max_cells, seed=seed, progress=_stage(progress, "attribution"),
                                              **step_option)
        facts["attribution"] = {"method": None if found is None else found.method, "note": note,
                                "baseline": baseline,
                                "n_cells": 0 if found is None else len(found.obs_names),
                                "explains": "uncalibrated P(sensitive)"}
        if fold_heads is not None:
            facts["attribution"]["model"] = ("each fold's model, retrained from the run and checked against its saved "
                                             "predictions, on its own test cells")
            facts["attribution"]["folds"] = {key: int(cells.size) for key, cells in
                                             (folds_found.cells.items() if folds_found is not None else ())}
        elif run is not None:
            facts["attribution"]["model"] = ("the given head (trained on its own data), not each fold's model: the "
                                             "run keeps no fold models")
        if found is not None and found.convergence_delta is not None and len(found.convergence_delta):
            # IG's completeness: a cell's attributions sum to P(cell) - P(baseline) up to this error
            facts["attribution"]["completeness_error_max"] = float(np.nanmax(np.abs(found.convergence_delta)))
            if found.baseline_probability is not None:
                facts["attribution"]["largest_change"] = float(np.nanmax(np.abs(found.probability
                                                                                - found.baseline_probability)))
        if found is not None:
            overall = found.summary().set_index("gene")["attribution_abs_mean"]
            pieces = []
            position = {c: i for i, c in enumerate(work.obs_names.astype(str))}
            for name, labels in groups.items():
                resistant = np.array([labels[position[c]] == de.GROUPS[0] for c in found.obs_names])
                summary = (found.summary(resistant) if resistant.any() else
                           found.summary().assign(attribution_mean=np.nan, attribution_sd=np.nan))
                pieces.append(summary[["gene", "attribution_mean", "attribution_sd"]].assign(comparison=name))
                facts["attribution"].setdefault("resistant_cells", {})[name] = int(resistant.sum())
            per_comparison = pd.concat(pieces, ignore_index=True)
            table = table.drop(columns=["attribution_mean", "attribution_sd"]).merge(
                per_comparison, on=["gene", "comparison"], how="left")
            table["attribution_abs_mean"] = table["gene"].map(overall)
        if folds_found is not None:  # stability: how many fold models agree on a gene
            result = folds_found.stability
            table["stability"] = table["gene"].map(result.frequency).fillna(0.0)
            facts["stability"] = {"method": "folds", "jaccard_mean": result.jaccard_mean,
                                  "n_folds": len(result.rankings), "k": top_k,
                                  "ranking": "mean |attribution| of each fold's model over its own test cells"}
        if max_genes is None or max_genes > 0:
            # the top genes of every list in turn (up and down of each comparison, the attribution), so that
            # a small max_genes still deletes some of each
            lists = [de.top_genes(table[table["comparison"] == name], top_k, direction=direction)
                     for name in groups for direction in ("up", "down")]
            if found is not None:
                lists.append(found.top_genes(top_k))
            chosen = list(dict.fromkeys(g for rank in range(top_k) for genes in lists if rank < len(genes)
                                        for g in [genes[rank]]))[: max_genes or None]
            encoder = encoder or _load_encoder(explained, weights, device, model_options)
            # a model whose output for a cell depends on the other cells given deletes one gene per call
            per_call = None if encoder.shardable else 1
            if fold_heads is not None:
                cells = (folds_found.cells if folds_found is not None
                         else fold_explain.fold_cells(fold_heads.folds, max_cells, seed))
                deleted = fold_explain.delete_in_folds(work, fold_heads.folds, encoder, chosen, cells, layer=layer,
                                                       genes_per_call=per_call, progress=_stage(progress, "deletion"))
            else:
                assert trained is not None
                predict_fn = attr.make_predict_function(encoder, trained, layer=layer)
                deleted = attr.measure_deletion_effects(work, predict_fn, genes=chosen, layer=layer,
                                                        max_cells=max_cells, max_genes=None, genes_per_call=per_call,
                                                        seed=seed, progress=_stage(progress, "deletion"))
            table["deletion_delta"] = table["gene"].map(deleted.set_index("gene")["deletion_delta"])
            facts["deletion"] = {"n_genes": len(chosen), "n_cells": int(deleted["n_cells"].max()) if len(deleted)
                                 else 0, "explains": "uncalibrated P(sensitive), zeroed gene minus cell"}
    table = table.loc[:, list(BIOMARKER_COLUMNS)]
    table = table.sort_values(["comparison", "test", "stratum", "pvalue", "gene"], kind="stable",
                              na_position="last").reset_index(drop=True)

    # 5. enrichment ----------------------------------------------------------------------------------------
    found_sets = None
    if gene_sets is not None:
        sets = enrichment.read_gmt(gene_sets) if isinstance(gene_sets, str | Path) else dict(gene_sets)
        facts["gene_sets"] = {"source": str(gene_sets) if isinstance(gene_sets, str | Path) else "given",
                              "n_sets": len(sets)}
        parts = []
        steps = len(groups)
        for i, name in enumerate(groups):
            part = table[table["comparison"] == name]
            universe = part.loc[part["pvalue"].notna(), "gene"].unique()
            for direction in ("up", "down"):
                listed = de.top_genes(part, top_k, direction=direction)
                ora = enrichment.over_representation(listed, sets, universe=universe)
                parts.append(ora.assign(comparison=name, method=f"ora_{direction}"))
            ranked = enrichment.rank_enrichment(enrichment.de_scores(part), sets, n_permutations=n_permutations,
                                                seed=seed)
            parts.append(ranked.rename(columns={"leading_edge": "genes"}).assign(comparison=name, method="rank"))
            if progress is not None:
                progress("enrichment", i + 1, steps, "")
        columns = ["comparison", "method", "gene_set", "size", "overlap", "expected", "fold_enrichment",
                   "enrichment_score", "nes", "pvalue", "qvalue", "genes"]
        found_sets = pd.concat(parts, ignore_index=True).reindex(columns=columns)

    # 6. the dot plot: top genes by sample and (predicted) group ---------------------------------------------
    shown = "predicted" if "predicted" in groups else comparisons[0]
    part = table[table["comparison"] == shown]
    genes = list(dict.fromkeys(de.top_genes(part, DOTPLOT_GENES, direction="up")
                               + de.top_genes(part, DOTPLOT_GENES, direction="down")))
    expression = _dotplot_expression(work, genes, groups[shown], samples, layer) if genes else None
    facts["dotplot"] = {"comparison": shown, "genes_up": de.top_genes(part, DOTPLOT_GENES, direction="up"),
                        "genes_down": de.top_genes(part, DOTPLOT_GENES, direction="down"),
                        "unit": "log1p(counts per 10,000)" if facts.get("value_kind") in de.UNLOGGED_KINDS
                        else f"{facts.get('value_kind')} values as given"}
    facts["seconds"] = round(time.perf_counter() - start, 2)
    log.info("biomarkers of %s (%s) in %.1fs", model or "observed labels", ", ".join(comparisons), facts["seconds"])
    return Biomarkers(table=table, enrichment=found_sets, facts=facts, expression=expression)
