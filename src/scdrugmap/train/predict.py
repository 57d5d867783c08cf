"""Train a head on a whole labelled data set, and predict new cells with it.

`fit_head` returns a `Head` (see `scdrugmap.train.bundle`); `predict_cells` applies one to new
cells through the same encoder. These are the only implementation of "train, embed, predict":
the public API (`scdrugmap.tl`), the command line and the web server all call them.
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from scdrugmap.data.schema import encode_labels
from scdrugmap.errors import CheckpointError
from scdrugmap.train.bundle import ENCODER_PREFIX, Head
from scdrugmap.train.heads import HeadConfig, LogisticHead, fit_mlp_heads
from scdrugmap.train.validation import inner_validation_split

if TYPE_CHECKING:
    import anndata as ad
    import numpy.typing as npt

    from scdrugmap.models.base import Encoder

log = logging.getLogger(__name__)


def is_fitted_baseline(encoder: Encoder) -> bool:
    """True for encoders whose embedding is fitted to data (genes, components) and travels with a head."""
    return hasattr(encoder, "fit") and hasattr(encoder, "state") and hasattr(encoder, "load_state")


def fit_head(encoder: Encoder, adata: ad.AnnData, labels: npt.ArrayLike, groups: npt.ArrayLike | None = None, *,
             strategy: Literal["frozen", "lora"] = "frozen", head: Literal["mlp", "logistic"] = "mlp",
             layer: str | None = None, embeddings: npt.NDArray[np.float32] | None = None,
             encoder_state: dict[str, np.ndarray] | None = None, head_config: HeadConfig | None = None,
             lora_config: Any = None) -> Head:
    """Train a head on every labelled cell of ``adata``.

    Parameters
    ----------
    encoder
        The model the head sits on (a baseline is fitted on ``adata`` first, without labels).
    labels
        Per cell: sensitive/resistant, 1/0, booleans or a categorical of those (`encode_labels`).
    groups
        Per cell sample names: the inner validation split for early stopping holds out whole samples.
    embeddings
        Embeddings already computed for ``adata`` with ``encoder`` (frozen strategy only); with a
        baseline, ``encoder_state`` must give the fitted state they came from.
    """
    from scdrugmap.version import __version__

    y = encode_labels(labels)
    group_names = None if groups is None else np.asarray(groups).astype(str)
    meta: dict[str, Any] = {"model": encoder.name, "checkpoint_sha256": encoder.checkpoint_sha256,
                            "embedding_dim": encoder.embedding_dim, "strategy": strategy, "layer": layer,
                            "n_cells": int(adata.n_obs), "n_sensitive": int(y.sum()),
                            "created": datetime.now(timezone.utc).isoformat(), "scdrugmap": __version__}
    if strategy == "lora":
        from scdrugmap.train.lora import LoRAConfig, fine_tune

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
        tensors = {f"adapter.{k}": v.detach().cpu().numpy() for k, v in fitted.module.named_parameters()
                   if "lora_" in k}
        tensors.update({f"head.{k}": v.detach().cpu().numpy() for k, v in fitted.head.state_dict().items()})
        return Head(meta={"kind": "lora", **meta, "lora": asdict(lora_config), "training": fitted.info},
                    tensors=tensors)
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
    if head == "logistic":
        model = LogisticHead.fit(X, y_kept, seed=head_config.seed)
        tensors = {"mean": model.mean, "scale": model.scale, "coef": model.coef,
                   "intercept": np.array([model.intercept])}
        return Head(meta={"kind": "logistic", **meta}, tensors=tensors | encoder_tensors)
    import torch

    fit, val = inner_validation_split(y_kept, None if group_names is None else group_names[keep],
                                      fraction=head_config.val_fraction, seed=head_config.seed)
    heads, records = fit_mlp_heads(torch.as_tensor(X), torch.as_tensor(y_kept, dtype=torch.float32), [(fit, val)],
                                   head_config)
    tensors = {k: v.numpy() for k, v in heads.head_state(0).items()}
    return Head(meta={"kind": "mlp", **meta, "head": asdict(head_config), "training": records[0]},
                tensors=tensors | encoder_tensors)


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
                  progress: Any = None) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32] | None]:
    """Return (probability of sensitivity per cell, embeddings or None); NaN where the model could not read a cell.

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
        probability = np.full(adata.n_obs, np.nan, dtype=np.float32)
        logits = predict_logits(encoder, network_head, tokens, np.arange(tokens.n_cells),  # type: ignore[arg-type]
                                batch_size or 32)
        probability[tokens.cell_index] = torch.sigmoid(logits.float()).cpu().numpy()
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
        elif is_fitted_baseline(encoder):
            msg = (f"the {head.model} head carries no fitted genes or components, so new cells cannot be put in "
                   "its space; retrain it with this version.")
            raise CheckpointError(msg)
        embeddings = encoder.embed(adata, layer=layer, batch_size=batch_size, progress=progress)
    probability = head.predict_proba(embeddings)
    return probability, (embeddings if return_embeddings else None)
