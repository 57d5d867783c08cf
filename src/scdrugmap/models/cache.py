"""Cell embeddings cached on disk, keyed by model, weights, options and data content.

Every job of a benchmark grid that uses the same (model, data) pair reads one file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from scdrugmap import config

if TYPE_CHECKING:
    import anndata as ad
    import numpy.typing as npt

    from scdrugmap.models.base import Encoder, Progress

log = logging.getLogger(__name__)


def embedding_key(encoder: Encoder, data_fingerprint: str, *, layer: str | None, options: dict[str, Any]) -> str:
    """Return the cache key of ``encoder``'s embeddings of one data set."""
    facts = {"model": encoder.name, "weights": encoder.checkpoint_sha256, "layer": layer, "data": data_fingerprint,
             "options": options, "encoder": encoder.describe()}
    return hashlib.sha256(json.dumps(facts, sort_keys=True, default=str).encode()).hexdigest()[:24]


def cached_embed(encoder: Encoder, adata: ad.AnnData, *, data_fingerprint: str, layer: str | None = None,
                 batch_size: int | None = None, options: dict[str, Any] | None = None,
                 progress: Progress | None = None,
                 compute: Callable[[], npt.NDArray[np.float32]] | None = None,
                 ) -> tuple[npt.NDArray[np.float32], dict[str, Any]]:
    """Return (embeddings, facts) from the cache, embedding and storing them on a miss.

    ``adata`` may be backed: it is only read on a miss. ``compute`` replaces ``encoder.embed`` on a miss
    (e.g. a sharded embedding on a cluster); the key is the same, so either way fills the same entry.
    ``facts`` holds ``cache`` ("hit"/"miss"), ``seconds`` and ``cells_per_second`` of the embedding.
    """
    key = embedding_key(encoder, data_fingerprint, layer=layer, options=options or {})
    folder = config.embeddings_cache_dir()
    path = folder / f"{encoder.name}-{key}.npy"
    meta_path = path.with_suffix(".json")
    if path.exists() and meta_path.exists():
        facts = json.loads(meta_path.read_text())
        return np.load(path, allow_pickle=False), {**facts, "cache": "hit"}
    start = time.perf_counter()
    if compute is not None:
        embeddings = compute()
    else:
        embeddings = encoder.embed(adata, layer=layer, batch_size=batch_size, progress=progress)
    seconds = time.perf_counter() - start
    folder.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npy")
    np.save(tmp, embeddings, allow_pickle=False)
    os.replace(tmp, path)
    facts = {"seconds": seconds, "cells_per_second": adata.n_obs / seconds if seconds else float("inf"),
             "n_cells": int(adata.n_obs), "dim": int(embeddings.shape[1])}
    meta_path.write_text(json.dumps(facts))
    return embeddings, {**facts, "cache": "miss"}
