"""Cell embeddings cached on disk, keyed by model, weights, options and data content.

Every job of a benchmark grid that uses the same (model, data) pair reads one file. A cached
embedding can stay on disk (`EmbeddingFile`): a benchmark on one machine then reads the rows of
each training batch from it, so a (cells x 2,000) hvg embedding of the full collection (2.6 GB) never sits
in memory whole, and an encoder that embeds in row blocks (`RowStreamingEncoder`) writes a miss
straight into the cache file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol, overload, runtime_checkable

import numpy as np

from scdrugmap import config

if TYPE_CHECKING:
    import anndata as ad
    import numpy.typing as npt

    from scdrugmap.models.base import Encoder, Progress

log = logging.getLogger(__name__)


@runtime_checkable
class RowStreamingEncoder(Protocol):
    """An encoder that writes its embedding a block of rows at a time (the expression baselines)."""

    def embed_into(self, adata: ad.AnnData, out: Any, *, layer: str | None = None,
                   progress: Progress | None = None) -> None:
        """Write each cell's embedding into ``out[start:stop] = block``."""


class EmbeddingFile:
    """A (cells x dim) float32 ``.npy`` of the cache, read by rows on demand instead of loaded whole.

    Rows are read with plain file reads, so what was read is not kept mapped into the process (a
    memory map would count every page read as resident). Index it with a slice or an array of
    positions; `load` reads it all.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        with self.path.open("rb") as handle:
            version = np.lib.format.read_magic(handle)
            read_header = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
            if version not in read_header:
                msg = f"{self.path}: .npy format {version} is not read here; delete it so it is computed again."
                raise ValueError(msg)
            shape, fortran, dtype = read_header[version](handle)
            self.offset = handle.tell()
        if fortran or len(shape) != 2:
            msg = f"{self.path}: not a C-ordered (cells x dim) array; delete it so the embedding is computed again."
            raise ValueError(msg)
        self.shape: tuple[int, int] = (int(shape[0]), int(shape[1]))
        self.dtype = np.dtype(dtype)

    @property
    def nbytes(self) -> int:
        return self.shape[0] * self.shape[1] * self.dtype.itemsize

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows: slice | npt.ArrayLike) -> npt.NDArray[Any]:
        """Return the rows of a slice (step 1) or of an array of positions, in the order given."""
        if isinstance(rows, slice):
            start, stop, step = rows.indices(self.shape[0])
            if step != 1:
                msg = "EmbeddingFile reads slices of step 1 only"
                raise IndexError(msg)
            return self.read_sorted(np.arange(start, max(start, stop)))
        positions = np.asarray(rows, dtype=np.int64)
        order = np.argsort(positions, kind="stable")
        block = self.read_sorted(positions[order])
        out = np.empty_like(block)
        out[order] = block
        return out

    def read_sorted(self, positions: npt.NDArray[np.int64]) -> npt.NDArray[Any]:
        """Return the rows at ascending ``positions``, one read per run of consecutive rows."""
        out = np.empty((positions.size, self.shape[1]), dtype=self.dtype)
        if positions.size == 0:
            return out
        if positions[0] < 0 or positions[-1] >= self.shape[0]:
            msg = f"rows out of range for {self.shape[0]} cells"
            raise IndexError(msg)
        breaks = np.flatnonzero(np.diff(positions) != 1) + 1
        row_bytes = self.shape[1] * self.dtype.itemsize
        view = out.reshape(-1).view(np.uint8).data
        with self.path.open("rb", buffering=0) as handle:
            for begin, end in zip(np.r_[0, breaks], np.r_[breaks, positions.size], strict=True):
                handle.seek(self.offset + int(positions[begin]) * row_bytes)
                wanted = (int(end) - int(begin)) * row_bytes
                got = handle.readinto(view[int(begin) * row_bytes : int(begin) * row_bytes + wanted])
                if got != wanted:
                    msg = f"{self.path}: the file ends early; delete it so the embedding is computed again."
                    raise OSError(msg)
        return out

    def load(self) -> npt.NDArray[Any]:
        """Return the whole array in memory."""
        return np.load(self.path, allow_pickle=False)


class _RowWriter:
    """Write a (cells x dim) float32 ``.npy`` a block of rows at a time (``writer[start:stop] = block``).

    The width is taken from the first block (a baseline knows it once its genes are selected).
    """

    def __init__(self, path: Path, n_cells: int) -> None:
        self.path, self.n_cells = path, n_cells
        self.handle = path.open("wb")
        self.width: int | None = None
        self.offset = 0

    def _start(self, width: int) -> None:
        self.width = width
        np.lib.format.write_array_header_1_0(self.handle, {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float32)),
                                                           "fortran_order": False, "shape": (self.n_cells, width)})
        self.offset = self.handle.tell()
        self.handle.truncate(self.offset + self.n_cells * width * 4)

    def __setitem__(self, rows: slice, block: npt.ArrayLike) -> None:
        values = np.ascontiguousarray(block, dtype=np.float32)
        if self.width is None:
            self._start(values.shape[1])
        self.handle.seek(self.offset + rows.indices(self.n_cells)[0] * values.shape[1] * 4)
        self.handle.write(values.data)

    def close(self, width: int) -> None:
        """Finish the file (``width``: of an embedding of no cells, where no block came)."""
        if self.width is None:
            self._start(width)
        self.handle.close()


def embedding_key(encoder: Encoder, data_fingerprint: str, *, layer: str | None, options: dict[str, Any]) -> str:
    """Return the cache key of ``encoder``'s embeddings of one data set."""
    facts = {"model": encoder.name, "weights": encoder.checkpoint_sha256, "layer": layer, "data": data_fingerprint,
             "options": options, "encoder": encoder.describe()}
    return hashlib.sha256(json.dumps(facts, sort_keys=True, default=str).encode()).hexdigest()[:24]


@overload
def cached_embed(encoder: Encoder, adata: ad.AnnData, *, data_fingerprint: str, layer: str | None = None,
                 batch_size: int | None = None, options: dict[str, Any] | None = None,
                 progress: Progress | None = None, compute: Callable[[], npt.NDArray[np.float32]] | None = None,
                 in_memory: Literal[True] = True) -> tuple[npt.NDArray[np.float32], dict[str, Any]]: ...


@overload
def cached_embed(encoder: Encoder, adata: ad.AnnData, *, data_fingerprint: str, layer: str | None = None,
                 batch_size: int | None = None, options: dict[str, Any] | None = None,
                 progress: Progress | None = None, compute: Callable[[], npt.NDArray[np.float32]] | None = None,
                 in_memory: bool) -> tuple[npt.NDArray[np.float32] | EmbeddingFile, dict[str, Any]]: ...


def cached_embed(encoder: Encoder, adata: ad.AnnData, *, data_fingerprint: str, layer: str | None = None,
                 batch_size: int | None = None, options: dict[str, Any] | None = None,
                 progress: Progress | None = None,
                 compute: Callable[[], npt.NDArray[np.float32]] | None = None,
                 in_memory: bool = True,
                 ) -> tuple[npt.NDArray[np.float32] | EmbeddingFile, dict[str, Any]]:
    """Return (embeddings, facts) from the cache, embedding and storing them on a miss.

    ``adata`` may be backed: it is only read on a miss. ``compute`` replaces ``encoder.embed`` on a miss
    (e.g. a sharded embedding on a cluster); the key is the same, so either way fills the same entry.
    With ``in_memory=False`` the embeddings come back as the cache file (`EmbeddingFile`), and an
    encoder that embeds in row blocks (`RowStreamingEncoder`, without ``compute``) writes a miss into
    it block by block. ``facts`` holds ``cache`` ("hit"/"miss"), ``seconds`` and ``cells_per_second``.
    """
    key = embedding_key(encoder, data_fingerprint, layer=layer, options=options or {})
    folder = config.embeddings_cache_dir()
    path = folder / f"{encoder.name}-{key}.npy"
    meta_path = path.with_suffix(".json")
    if path.exists() and meta_path.exists():
        facts = json.loads(meta_path.read_text())
        return (np.load(path, allow_pickle=False) if in_memory else EmbeddingFile(path)), {**facts, "cache": "hit"}
    start = time.perf_counter()
    folder.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npy")
    embeddings: npt.NDArray[np.float32] | EmbeddingFile
    if compute is None and not in_memory and isinstance(encoder, RowStreamingEncoder):
        writer = _RowWriter(tmp, adata.n_obs)
        try:
            encoder.embed_into(adata, writer, layer=layer, progress=progress)
        except BaseException:
            writer.handle.close()
            tmp.unlink(missing_ok=True)
            raise
        writer.close(encoder.embedding_dim)
        os.replace(tmp, path)
        embeddings = EmbeddingFile(path)
    else:
        computed = compute() if compute is not None else encoder.embed(adata, layer=layer, batch_size=batch_size,
                                                                         progress=progress)
        np.save(tmp, computed, allow_pickle=False)
        os.replace(tmp, path)
        embeddings = computed if in_memory else EmbeddingFile(path)
    seconds = time.perf_counter() - start
    facts = {"seconds": seconds, "cells_per_second": adata.n_obs / seconds if seconds else float("inf"),
             "n_cells": int(adata.n_obs), "dim": int(embeddings.shape[1])}
    meta_path.write_text(json.dumps(facts))
    return embeddings, {**facts, "cache": "miss"}
