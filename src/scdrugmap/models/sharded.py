"""Embedding a large ``.h5ad`` in row shards on a Ray cluster, written back in cell order.

Each task opens the file in backed mode, reads only its rows, loads the encoder once per worker
process (`EncoderSpec.load`) and returns its shard's embeddings; the driver places them by row
range as they arrive, so the result equals ``encoder.embed(adata)`` for any shard size. That
holds only for models whose cells do not see each other (`Encoder.shardable`); the others are
embedded as one task over the whole file, on one worker, with a log line saying why.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from scdrugmap import cluster
from scdrugmap.errors import ScDrugMapError, SchemaError
from scdrugmap.models.base import get_encoder_class, load_encoder

if TYPE_CHECKING:
    import numpy.typing as npt

    from scdrugmap.models.base import Encoder, Progress

log = logging.getLogger(__name__)

#: Cells per shard by default: large enough that loading the model is a small part of a task.
DEFAULT_SHARD_CELLS = 20_000


@dataclass(frozen=True)
class EncoderSpec:
    """How any process (a Ray worker included) loads the same encoder: name, weights, options, device, dtype."""

    name: str
    weights: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    device: str = "auto"
    dtype: str = "auto"

    def load(self) -> Encoder:
        """Return the encoder, loaded once per process (a worker reuses it across its tasks)."""
        key = repr((self.name, self.weights, sorted(self.options.items()), self.device, self.dtype))
        if _LOADED.get("key") != key:
            _LOADED.clear()  # one model per worker at a time: the next one must not share its memory
            _LOADED.update(key=key, encoder=load_encoder(self.name, self.weights, device=self.device, dtype=self.dtype,
                                                         **self.options))
        return _LOADED["encoder"]


_LOADED: dict[str, Any] = {}


def shard_bounds(n_obs: int, shard_cells: int) -> list[tuple[int, int]]:
    """Return consecutive ``(start, stop)`` row ranges of at most ``shard_cells`` rows covering ``n_obs``."""
    if shard_cells < 1:
        msg = f"--shard-cells {shard_cells}: a shard needs at least one cell."
        raise SchemaError(msg)
    return [(start, min(start + shard_cells, n_obs)) for start in range(0, n_obs, shard_cells)]


@dataclass
class ShardedEmbedding:
    """Embeddings in cell order, with the checkpoint that made them and how the work was split.

    ``gene_overlap`` is each cell's fraction of expressed genes the model's vocabulary knows, in cell order
    (`Encoder.gene_overlap_`); None for a model that gives none (baselines read every gene). ``dtype`` is
    what the workers' forward passes ran in (`Encoder.compute_dtype`; comma-joined if they differ).
    """

    embeddings: npt.NDArray[np.float32]
    checkpoint_sha256: str | None
    n_shards: int
    seconds: float
    gene_overlap: npt.NDArray[np.float32] | None = None
    dtype: str = "float32"


def embed_rows(spec: EncoderSpec, path: str, start: int, stop: int, layer: str | None,
               batch_size: int | None
               ) -> tuple[npt.NDArray[np.float32], str | None, npt.NDArray[np.float32] | None, str]:
    """Embed rows ``start:stop`` of the ``.h5ad`` at ``path`` (a Ray task; reads only those rows).

    Returns the embeddings, the sha256 of the checkpoint the worker loaded, the shard's gene overlap
    (`Encoder.gene_overlap_`, None for models that give none) and the dtype it ran in.
    """
    import socket

    import torch

    from scdrugmap.data.io import read_h5ad

    if not Path(path).exists():
        msg = (f"{path} is not readable on worker {socket.gethostname()}: put the data on storage every node of the "
               "cluster mounts, at the same path.")
        raise SchemaError(msg)
    torch.set_num_threads(cluster.task_threads())
    backed = read_h5ad(path, backed=True)
    try:
        part = backed[start:stop].to_memory()
    finally:
        backed.file.close()
    encoder = spec.load()
    embeddings = encoder.embed(part, layer=layer, batch_size=batch_size)
    return embeddings, encoder.checkpoint_sha256, encoder.gene_overlap_, encoder.compute_dtype


def embed_sharded(spec: EncoderSpec, path: str | Path, *, n_obs: int, layer: str | None = None,
                  batch_size: int | None = None, shard_cells: int = DEFAULT_SHARD_CELLS,
                  resources: cluster.Resources | None = None,
                  progress: Progress | None = None) -> ShardedEmbedding:
    """Return the (n_obs x dim) embeddings of the file at ``path``, computed in row shards on the Ray cluster.

    Call `scdrugmap.cluster.connect` first. Rows of cells the model drops are NaN, as with ``embed``.

    Raises
    ------
    ScDrugMapError
        When a shard fails (the message names its rows and the worker's error).
    """
    resources = resources or cluster.Resources()
    if not get_encoder_class(spec.name).shardable:
        log.info("%s embeds cells together (batch-wide statistics, cell-to-cell attention or a random stream over "
                 "cells), so it runs as one task over all %d cells", spec.name, n_obs)
        shard_cells = max(n_obs, 1)
    bounds = shard_bounds(n_obs, shard_cells)
    start_time = time.perf_counter()
    refs = {cluster.submit(embed_rows, spec, str(path), start, stop, layer, batch_size, resources=resources,
                           name=f"embed-{spec.name}-{start}"): (start, stop) for start, stop in bounds}
    out: np.ndarray | None = None
    overlap: np.ndarray | None = np.full(n_obs, np.nan, dtype=np.float32)
    checkpoints: set[str | None] = set()
    dtypes: set[str] = set()
    done = 0
    for ref, result in cluster.as_completed(refs):
        start, stop = refs[ref]
        if isinstance(result, BaseException):
            msg = f"embedding rows {start}:{stop} of {path} with {spec.name} failed on the cluster: {result}"
            raise ScDrugMapError(msg)
        embeddings, checkpoint, shard_overlap, dtype = result
        checkpoints.add(checkpoint)
        dtypes.add(dtype)
        if out is None:
            out = np.empty((n_obs, embeddings.shape[1]), dtype=np.float32)
        out[start:stop] = embeddings
        if shard_overlap is None:
            overlap = None
        elif overlap is not None:
            overlap[start:stop] = shard_overlap
        done += stop - start
        if progress is not None:
            progress(done, n_obs)
    if len(checkpoints) > 1:
        msg = (f"the cluster's workers loaded different {spec.name} checkpoints ({sorted(map(str, checkpoints))}): "
               "give every node the same weights (a shared SCDRUGMAP_HOME or --weights path).")
        raise ScDrugMapError(msg)
    seconds = time.perf_counter() - start_time
    log.info("    embedded %d cells with %s in %d shards in %.1fs", n_obs, spec.name, len(bounds), seconds)
    return ShardedEmbedding(out if out is not None else np.zeros((0, 0), dtype=np.float32),
                            checkpoints.pop() if checkpoints else None, len(bounds), seconds,
                            gene_overlap=overlap if bounds else None, dtype=",".join(sorted(dtypes)) or "float32")
