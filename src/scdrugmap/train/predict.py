"""Train a head on a whole labelled data set, and predict new cells with it.

`fit_head` returns a `Head` (see `scdrugmap.train.bundle`); `predict_cells` applies one to new
cells through the same encoder. These are the only implementation of "train, embed, predict":
the public API (`scdrugmap.tl`), the command line and the web server all call them.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from scdrugmap.data.schema import encode_labels
from scdrugmap.errors import CheckpointError, SchemaError
from scdrugmap.train.bundle import ENCODER_PREFIX, GENES_TENSOR, Head, decode_names, encode_names
from scdrugmap.train.conformal import ALPHA
from scdrugmap.train.heads import HeadConfig, LogisticHead, fit_mlp_heads
from scdrugmap.train.trust import TrustKit, fit_trust
from scdrugmap.train.validation import inner_validation_split

if TYPE_CHECKING:
    import anndata as ad
    import numpy.typing as npt

    from scdrugmap.models.base import Encoder

log = logging.getLogger(__name__)


def is_fitted_baseline(encoder: Encoder) -> bool:
    """True for encoders whose embedding is fitted to data (genes, components) and travels with a head."""
    return hasattr(encoder, "fit") and hasattr(encoder, "state") and hasattr(encoder, "load_state")


def calibration_fraction(fraction: float, n_cells: int, alpha: float) -> float:
    """Return the inner validation share: ``fraction``, raised on small data sets (to at most 0.3) so the
    split can hold the 1/alpha cells per class that conformal sets need to ever exclude a class."""
    needed = 2.5 * math.ceil(1.0 / alpha) / max(n_cells, 1)
    return float(max(fraction, min(0.3, needed)))


def _gene_space(encoder: Encoder, adata: ad.AnnData, state: dict[str, np.ndarray]) -> np.ndarray:
    """Return the names of the genes a head depends on: a baseline's fitted genes, else the training genes."""
    if state and "genes" in state:
        return decode_names(state["genes"])
    return np.asarray(adata.var_names.astype(str))


def fit_head(encoder: Encoder, adata: ad.AnnData, labels: npt.ArrayLike, groups: npt.ArrayLike | None = None, *,
             strategy: Literal["frozen", "lora"] = "frozen", head: Literal["mlp", "logistic"] = "mlp",
             layer: str | None = None, embeddings: npt.NDArray[np.float32] | None = None,
             encoder_state: dict[str, np.ndarray] | None = None, head_config: HeadConfig | None = None,
             lora_config: Any = None, alpha: float = ALPHA) -> Head:
    """Train a head on every labelled cell of ``adata``, with what its predictions need to be trusted.

    The head records the training data's gene space (harmonised ids), value kind and label balance,
    and a trust kit: Platt calibration and class-conditional conformal sets fitted on the inner
    validation split, and the training embeddings' out-of-distribution reference.

    Parameters
    ----------
    encoder
        The model the head sits on (a baseline is fitted on ``adata`` first, without labels).
    labels
        Per cell: sensitive/resistant, 1/0, booleans or a categorical of those (`encode_labels`).
    groups
        Per cell sample names: the inner validation split holds out whole samples.
    embeddings
        Embeddings already computed for ``adata`` with ``encoder`` (frozen strategy only); with a
        baseline, ``encoder_state`` must give the fitted state they came from.
    alpha
        Default miscoverage of the conformal sets (each class's set misses at most this share).
    """
    from scdrugmap.data.schema import detect_value_kind, expression_matrix
    from scdrugmap.version import __version__

    y = encode_labels(labels)
    group_names = None if groups is None else np.asarray(groups).astype(str)
    meta: dict[str, Any] = {"model": encoder.name, "checkpoint_sha256": encoder.checkpoint_sha256,
                            "embedding_dim": encoder.embedding_dim, "strategy": strategy, "layer": layer,
                            "n_cells": int(adata.n_obs), "n_sensitive": int(y.sum()),
                            "n_resistant": int(y.size - y.sum()),
                            "value_kind": detect_value_kind(expression_matrix(adata, layer)),
                            "created": datetime.now(timezone.utc).isoformat(), "scdrugmap": __version__}
    if strategy == "lora":
        import torch

        from scdrugmap.train.lora import LoRAConfig, fine_tune, predict_logits, using_module

        if embeddings is not None:
            msg = "a LoRA head fine-tunes the network on tokens; it cannot start from precomputed embeddings."
            raise CheckpointError(msg)
        lora_config = lora_config or LoRAConfig()
        tokens = encoder.tokenize(adata, layer=layer)  # type: ignore[attr-defined]
        token_labels = y[tokens.cell_index]
        token_groups = None if group_names is None else group_names[tokens.cell_index]
        fit, val = inner_validation_split(token_labels, token_groups, fraction=lora_config.val_fraction,
                                          seed=lora_config.seed)
        fitted = fine_tune(encoder, tokens, token_labels, fit, val, lora_config)  # type: ignore[arg-type]
        with using_module(encoder, fitted.module):  # type: ignore[arg-type]
            val_logits = predict_logits(encoder, fitted.head, tokens, val,  # type: ignore[arg-type]
                                        lora_config.batch_size).double().numpy()
            reference = encoder.embed_tokens(tokens)  # type: ignore[attr-defined]
        kit = fit_trust(val_logits, token_labels[val], reference, alpha=alpha, seed=lora_config.seed)
        tensors = {f"adapter.{k}": v.detach().cpu().numpy() for k, v in fitted.module.named_parameters()
                   if "lora_" in k}
        tensors.update({f"head.{k}": v.detach().cpu().numpy() for k, v in fitted.head.state_dict().items()})
        return _with_trust(Head(meta={"kind": "lora", **meta, "lora": asdict(lora_config), "training": fitted.info},
                                tensors=tensors), kit, _gene_space(encoder, adata, {}))
    head_config = head_config or HeadConfig()
    state: dict[str, np.ndarray] = {}
    if is_fitted_baseline(encoder):  # baselines: fix genes/components on the training data
        if embeddings is None:
            encoder.fit(adata, layer=layer)  # type: ignore[attr-defined]
            state = encoder.state()  # type: ignore[attr-defined]
        elif encoder_state:
            state = encoder_state
        else:
            msg = (f"{encoder.name} embeddings are fitted to their data; without the fitted genes and components "
                   "a head trained on them cannot be applied to new cells. Embed with scdrugmap.tl.embed (which "
                   "records them) or let train embed the cells.")
            raise CheckpointError(msg)
    if embeddings is None:
        embeddings = encoder.embed(adata, layer=layer)
    embeddings = np.asarray(embeddings, dtype=np.float32)
    meta["embedding_dim"] = int(embeddings.shape[1])
    keep = ~np.isnan(embeddings).any(axis=1) if embeddings.shape[1] else np.ones(adata.n_obs, dtype=bool)
    X, y_kept = embeddings[keep], y[keep]
    encoder_tensors = {f"{ENCODER_PREFIX}{k}": np.asarray(v) for k, v in state.items()}
    fit, val = inner_validation_split(y_kept, None if group_names is None else group_names[keep],
                                      fraction=calibration_fraction(head_config.val_fraction, y_kept.size, alpha),
                                      seed=head_config.seed)
    genes = _gene_space(encoder, adata, state)
    if head == "logistic":  # fitted on the fit cells, so the validation cells calibrate it honestly
        model = LogisticHead.fit(X[fit], y_kept[fit], seed=head_config.seed)
        tensors = {"mean": model.mean, "scale": model.scale, "coef": model.coef,
                   "intercept": np.array([model.intercept])}
        fitted_head = Head(meta={"kind": "logistic", **meta, "n_fit": int(fit.size), "n_val": int(val.size)},
                           tensors=tensors | encoder_tensors)
    else:
        import torch

        heads, records = fit_mlp_heads(torch.as_tensor(X), torch.as_tensor(y_kept, dtype=torch.float32),
                                       [(fit, val)], head_config)
        tensors = {k: v.numpy() for k, v in heads.head_state(0).items()}
        fitted_head = Head(meta={"kind": "mlp", **meta, "head": asdict(head_config), "training": records[0]},
                           tensors=tensors | encoder_tensors)
    kit = fit_trust(fitted_head.predict_logits(X[val]), y_kept[val], X, alpha=alpha, seed=head_config.seed)
    return _with_trust(fitted_head, kit, genes)


def _with_trust(head: Head, kit: TrustKit, genes: np.ndarray) -> Head:
    """Put the trust kit and the gene space (harmonised ids) into ``head``."""
    from scdrugmap.data.genes import canonical_gene_ids

    arrays, facts = kit.to_bundle()
    head.tensors.update(arrays)
    head.tensors[GENES_TENSOR] = encode_names(canonical_gene_ids(genes))
    head.meta["trust"] = facts
    head.meta["gene_space"] = {"n_genes": int(len(genes)), "ids": "harmonised (Ensembl id, else symbol)"}
    return head


#: Below this share of the head's genes present in the data, `check_head_applies` refuses by default.
MIN_GENE_OVERLAP = 0.25
#: Below this share it warns: the prediction rests on a minority of the genes the head was trained on.
WARN_GENE_OVERLAP = 0.5
#: Value kinds on one scale after the models' own preprocessing (counts, TPM and normalised values are
#: log-normalised; log values are used as they are); z-scored or otherwise negative values are another.
VALUE_SCALES = {"counts": "expression", "tpm": "expression", "normalised": "expression", "log": "expression",
                "zscore": "z-scored", "negative": "z-scored"}


@dataclass
class HeadFit:
    """How well new data fits a head: its gene overlap, both value kinds, and the warnings to show."""

    gene_overlap: float | None
    n_head_genes: int | None
    n_shared_genes: int | None
    value_kind: str
    head_value_kind: str | None
    warnings: list[str] = field(default_factory=list)


def check_head_applies(head: Head, adata: ad.AnnData, *, layer: str | None = None,
                       min_gene_overlap: float = MIN_GENE_OVERLAP, allow_value_kind_mismatch: bool = False,
                       source: str = "the data") -> HeadFit:
    """Refuse data a head cannot be trusted on: too few of its genes, or values of another kind.

    Genes are matched through harmonised ids (symbols, Ensembl, Entrez and aliases all map), so a head
    trained on Entrez ids finds its genes in data named by symbols.

    Raises
    ------
    SchemaError
        When the share of the head's genes present in the data is below ``min_gene_overlap`` (naming the
        overlap, the id types on both sides and the fix), or the value kinds differ in scale (z-scored vs
        counts or log) and ``allow_value_kind_mismatch`` is False.
    """
    from scdrugmap.data.genes import canonical_gene_ids, detect_gene_id_type
    from scdrugmap.data.schema import detect_value_kind, expression_matrix

    kind = detect_value_kind(expression_matrix(adata, layer))
    fit = HeadFit(None, None, None, kind, head.value_kind)
    if head.value_kind is not None and VALUE_SCALES.get(kind, kind) != VALUE_SCALES.get(head.value_kind,
                                                                                      head.value_kind):
        msg = (f"{source}: the values look {kind}, but the head was trained on {head.value_kind} values; a head "
               f"does not transfer between those scales. Pass data of the training kind (e.g. --layer), or "
               f"--allow-value-kind-mismatch to predict anyway.")
        if not allow_value_kind_mismatch:
            raise SchemaError(msg)
        fit.warnings.append(f"the values look {kind} but the head was trained on {head.value_kind} values "
                            "(allowed by --allow-value-kind-mismatch): treat these predictions with caution.")
    head_ids = head.gene_ids
    if head_ids is None:
        fit.warnings.append("the head records no gene space or value kind (trained with an earlier version): "
                            "gene overlap and value kind are not checked; retrain it to have them checked.")
    else:
        data_ids = set(canonical_gene_ids(adata.var_names))
        unique = np.unique(head_ids)
        shared = int(np.isin(unique, list(data_ids)).sum())
        fit.n_head_genes, fit.n_shared_genes = int(unique.size), shared
        fit.gene_overlap = shared / max(unique.size, 1)
        if fit.gene_overlap < min_gene_overlap:
            data_type = detect_gene_id_type(adata.var_names)
            msg = (f"{source}: only {shared:,} of the head's {unique.size:,} genes ({fit.gene_overlap:.0%}) are in "
                   f"the data after harmonising ids (data: {data_type} ids; head: harmonised Ensembl ids/symbols); "
                   f"the minimum is {min_gene_overlap:.0%}. Use data measuring the head's genes, a head trained on "
                   "this platform, or lower --min-gene-overlap knowingly.")
            raise SchemaError(msg)
        if fit.gene_overlap < WARN_GENE_OVERLAP:
            fit.warnings.append(f"only {fit.gene_overlap:.0%} of the head's {unique.size:,} genes are in the data "
                                f"({shared:,}); the missing ones count as 0, so predictions may shift.")
    return fit


def in_head_gene_names(adata: ad.AnnData, head: Head) -> ad.AnnData:
    """Return ``adata`` with its genes named as the head's fitted genes wherever their harmonised ids match.

    The expression is shared, not copied. Only baselines (which select genes by name) need it; genes
    the head does not know keep their names.
    """
    import anndata as ad_module
    import pandas as pd

    from scdrugmap.data.genes import canonical_gene_ids

    fitted = head.encoder_state.get("genes")
    if fitted is None:
        return adata
    fitted_names = decode_names(fitted)
    by_id = dict(zip(canonical_gene_ids(fitted_names), fitted_names, strict=True))
    names = np.asarray(adata.var_names.astype(str), dtype=object)
    renamed = np.array([by_id.get(i, n) for i, n in zip(canonical_gene_ids(names), names, strict=True)], dtype=object)
    if np.array_equal(renamed, names):
        return adata
    duplicated = pd.Index(renamed).duplicated()
    renamed[duplicated] = names[duplicated]  # two data genes of one id: the first one stands for it
    if pd.Index(renamed).duplicated().any():
        return adata  # names would clash: keep the data's own
    return ad_module.AnnData(X=adata.X, obs=pd.DataFrame(index=adata.obs_names), var=pd.DataFrame(index=renamed),
                             layers=dict(adata.layers.items()))


def check_head_fits(head: Head, encoder: Encoder, *, allow_other_weights: bool = False) -> None:
    """Refuse a head trained for another model or other weights.

    Raises
    ------
    CheckpointError
        Naming both models, or both weights digests, and the option that fixes it.
    """
    where = f"{head.path}: " if head.path is not None else ""
    if head.model != encoder.name:
        msg = f"{where}the head was trained on {head.model} embeddings, not {encoder.name}. Use --model {head.model}."
        raise CheckpointError(msg)
    if head.checkpoint_sha256 != encoder.checkpoint_sha256 and not allow_other_weights:
        msg = (f"{where}trained with weights sha256 {head.checkpoint_sha256}, but the loaded weights are "
               f"{encoder.checkpoint_sha256}. Pass the same --weights.")
        raise CheckpointError(msg)


def predict_cells(encoder: Encoder, adata: ad.AnnData, head: Head, *, layer: str | None = None,
                  embeddings: npt.NDArray[np.float32] | None = None, return_embeddings: bool = False,
                  allow_other_weights: bool = False, batch_size: int | None = None,
                  progress: Any = None) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float32] | None]:
    """Return (the head's logit of sensitivity per cell, embeddings or None); NaN where the model could not read a cell.

    A frozen head embeds the cells with ``encoder`` (a baseline in the head's fitted genes and
    components) unless ``embeddings`` are given; a LoRA head puts its adapters into ``encoder``
    (in place) and scores the tokens, embedding with the adapted network only when
    ``return_embeddings`` asks for them.

    Raises
    ------
    CheckpointError
        When the head was trained for another model or other weights.
    """
    check_head_fits(head, encoder, allow_other_weights=allow_other_weights)
    if head.kind == "lora":
        import torch

        from scdrugmap.train.lora import load_lora_bundle, predict_logits

        tensors = {k: torch.from_numpy(np.array(v)) for k, v in head.tensors.items()}
        network_head = load_lora_bundle(encoder, tensors, head.meta)  # type: ignore[arg-type]
        tokens = encoder.tokenize(adata, layer=layer)  # type: ignore[attr-defined]
        encoder.measure_gene_overlap(adata, tokens, layer=layer)  # type: ignore[attr-defined]
        probability = np.full(adata.n_obs, np.nan, dtype=np.float64)
        logits = predict_logits(encoder, network_head, tokens, np.arange(tokens.n_cells),  # type: ignore[arg-type]
                                batch_size or 32)
        probability[tokens.cell_index] = logits.double().cpu().numpy()
        if not return_embeddings:
            return probability, None
        overlap = encoder.gene_overlap_
        embedded = encoder.embed(adata, layer=layer, batch_size=batch_size, progress=progress)
        encoder.gene_overlap_ = overlap
        return probability, embedded
    if embeddings is None:
        state = head.encoder_state
        if state:
            encoder.load_state(state)  # type: ignore[attr-defined]
            adata = in_head_gene_names(adata, head)
        elif is_fitted_baseline(encoder):
            msg = (f"the {head.model} head carries no fitted genes or components, so new cells cannot be put in "
                   "its space; retrain it with this version.")
            raise CheckpointError(msg)
        embeddings = encoder.embed(adata, layer=layer, batch_size=batch_size, progress=progress)
    return head.predict_logits(embeddings), (embeddings if return_embeddings else None)
