"""Train a head on a whole labelled data set, save it as a bundle, and predict new cells with it.

A bundle is a folder with ``head.json`` (model, weights sha256, strategy, settings) and
``head.safetensors`` (head weights, and LoRA adapters for the lora strategy); no pickle.
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from scdrugmap.errors import CheckpointError
from scdrugmap.train.heads import (
    HeadConfig,
    LogisticHead,
    fit_mlp_heads,
    load_head_bundle,
    make_mlp,
    save_head_bundle,
)
from scdrugmap.train.validation import inner_validation_split

if TYPE_CHECKING:
    import anndata as ad
    import numpy.typing as npt

    from scdrugmap.models.base import Encoder

log = logging.getLogger(__name__)


def train_bundle(encoder: Encoder, adata: ad.AnnData, labels: npt.NDArray, groups: npt.NDArray | None, out: str | Path,
                 *, strategy: Literal["frozen", "lora"] = "frozen", head: Literal["mlp", "logistic"] = "mlp",
                 layer: str | None = None, head_config: HeadConfig | None = None, lora_config: Any = None) -> Path:
    """Train on every labelled cell of ``adata`` and save a bundle for `predict_cells`."""
    import torch

    from scdrugmap import __version__

    meta: dict[str, Any] = {"model": encoder.name, "checkpoint_sha256": encoder.checkpoint_sha256,
                            "embedding_dim": encoder.embedding_dim, "strategy": strategy, "layer": layer,
                            "n_cells": int(adata.n_obs), "n_sensitive": int(labels.sum()),
                            "created": datetime.now(timezone.utc).isoformat(), "scdrugmap": __version__}
    if strategy == "lora":
        from scdrugmap.train.lora import LoRAConfig, fine_tune, save_lora_bundle

        lora_config = lora_config or LoRAConfig()
        tokens = encoder.tokenize(adata, layer=layer)
        token_labels = labels[tokens.cell_index]
        token_groups = None if groups is None else groups[tokens.cell_index]
        fit, val = inner_validation_split(token_labels, token_groups, fraction=lora_config.val_fraction,
                                          seed=lora_config.seed)
        fitted = fine_tune(encoder, tokens, token_labels, fit, val, lora_config)
        return save_lora_bundle(out, fitted, model=encoder.name,
                                meta={**meta, "lora": asdict(lora_config), "training": fitted.info})
    head_config = head_config or HeadConfig()
    encoder_state: dict[str, Any] = {}
    if hasattr(encoder, "fit") and hasattr(encoder, "state"):  # baselines: fix genes/components on training data
        encoder.fit(adata, layer=layer)
        encoder_state = {f"encoder.{k}": v for k, v in encoder.state().items()}
    embeddings = encoder.embed(adata, layer=layer)
    meta["embedding_dim"] = int(embeddings.shape[1])
    keep = ~np.isnan(embeddings).any(axis=1) if embeddings.shape[1] else np.ones(adata.n_obs, dtype=bool)
    X, y = embeddings[keep], labels[keep]
    if head == "logistic":
        model = LogisticHead.fit(X, y, seed=head_config.seed)
        tensors = asdict(model) | {"intercept": np.array([model.intercept])} | encoder_state
        return save_head_bundle(out, kind="logistic", tensors=tensors, meta=meta)
    fit, val = inner_validation_split(y, None if groups is None else groups[keep], fraction=head_config.val_fraction,
                                      seed=head_config.seed)
    heads, records = fit_mlp_heads(torch.as_tensor(X), torch.as_tensor(y, dtype=torch.float32), [(fit, val)],
                                   head_config)
    return save_head_bundle(out, kind="mlp", tensors=heads.head_state(0) | encoder_state,
                            meta={**meta, "head": asdict(head_config), "training": records[0]})


def predict_cells(encoder: Encoder, adata: ad.AnnData, bundle: str | Path, *, layer: str | None = None,
                  allow_other_weights: bool = False) -> npt.NDArray[np.float32]:
    """Return the probability of sensitivity per cell (NaN where the model could not read a cell).

    Raises
    ------
    CheckpointError
        When the bundle was trained for another model or other weights.
    """
    import torch

    meta, tensors = load_head_bundle(bundle)
    if meta["model"] != encoder.name:
        msg = f"{bundle}: the head was trained on {meta['model']} embeddings, not {encoder.name}. Use --model {meta['model']}."
        raise CheckpointError(msg)
    if (meta.get("checkpoint_sha256") != encoder.checkpoint_sha256) and not allow_other_weights:
        msg = (f"{bundle}: trained with weights sha256 {meta.get('checkpoint_sha256')}, but the loaded weights are "
               f"{encoder.checkpoint_sha256}. Pass the same --weights.")
        raise CheckpointError(msg)
    if meta["kind"] == "lora":
        from scdrugmap.train.lora import load_lora_bundle, predict_logits

        head = load_lora_bundle(encoder, tensors, meta)
        tokens = encoder.tokenize(adata, layer=layer)
        encoder.measure_gene_overlap(adata, tokens, layer=layer)  # reported with the predictions, no second pass
        probability = np.full(adata.n_obs, np.nan, dtype=np.float32)
        logits = predict_logits(encoder, head, tokens, np.arange(tokens.n_cells))
        probability[tokens.cell_index] = torch.sigmoid(logits.float()).cpu().numpy()
        return probability
    encoder_state = {k[len("encoder."):]: v.numpy() for k, v in tensors.items() if k.startswith("encoder.")}
    tensors = {k: v for k, v in tensors.items() if not k.startswith("encoder.")}
    if encoder_state:
        encoder.load_state(encoder_state)
    embeddings = encoder.embed(adata, layer=layer)
    keep = ~np.isnan(embeddings).any(axis=1) if embeddings.shape[1] else np.ones(adata.n_obs, dtype=bool)
    probability = np.full(adata.n_obs, np.nan, dtype=np.float32)
    if meta["kind"] == "logistic":
        model = LogisticHead(tensors["mean"].numpy(), tensors["scale"].numpy(), tensors["coef"].numpy(),
                             float(tensors["intercept"].numpy()[0]))
        probability[keep] = model.predict_proba(embeddings[keep])
        return probability
    head = make_mlp(meta["embedding_dim"], tensors["0.weight"].shape[0])
    head.load_state_dict(tensors)
    with torch.inference_mode():
        probability[keep] = torch.sigmoid(head(torch.as_tensor(embeddings[keep]))).reshape(-1).numpy()
    return probability
