"""Naive baselines behind the encoder contract, so every benchmark has them.

``pca``: 50 principal components of log-normalised highly variable genes.
``hvg``: the log-normalised expression of the highly variable genes itself.
``majority``: no features at all; a head on it predicts the training prior (the class-balance reference).

Counts, TPM and normalised values are scaled to 10,000 per cell and log1p-transformed;
log-transformed and z-scored values are used as they are. Gene selection and PCA see
all cells but no labels (like a foundation model's embedding, they are unsupervised).

Both stream: the expression (in memory, or backed with ``read_h5ad(path, backed=True)``) is read in
blocks of rows, each normalised on its own (the normalisation is per cell), and never densified or
copied whole. Fitting reads it once for the gene statistics (mean and mean square of the normalised
values of every gene), and PCA once more for the covariance of the selected genes; embedding reads it
once for the output. Memory is one block plus the output, whatever the number of cells.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, cast

import numpy as np
import scipy.sparse as sp

from scdrugmap.data.io import iter_row_blocks
from scdrugmap.data.schema import detect_value_kind, expression_matrix
from scdrugmap.errors import ConfigError
from scdrugmap.models.base import Encoder, Progress

if TYPE_CHECKING:
    from collections.abc import Iterator

    import anndata as ad
    import numpy.typing as npt

log = logging.getLogger(__name__)

TARGET_SUM = 1e4  # per-cell total before log1p, as scanpy's normalize_total default for this use
N_TOP_GENES = 2000
N_COMPONENTS = 50
#: Cells read and normalised at a time. At 1,650 stored values per cell (20,000 genes) and 2,000 selected
#: genes the transient memory is about 75 MiB (measured); the dense blocks are 8 MB (float32) and 16 MB
#: (float64, for the covariance).
CHUNK_ROWS = 1024
#: Value kinds used as they are (no per-cell scaling, no log).
AS_IS_KINDS = frozenset({"log", "zscore", "negative"})


def log_normalise(X: np.ndarray | sp.spmatrix, kind: str) -> sp.csr_matrix | np.ndarray:
    """Return log1p(10,000 x X / row total) for count-like values, X itself for log or z-scored values.

    Row by row, so a block of rows normalises exactly as those rows of the whole matrix: the blocks of
    `iter_row_blocks` are normalised one at a time. The result shares no memory with ``X`` where it
    changes values.
    """
    if kind in AS_IS_KINDS:
        return sp.csr_matrix(X, dtype=np.float32) if sp.issparse(X) else np.asarray(X, dtype=np.float32)
    X = sp.csr_matrix(X, dtype=np.float32)
    return _scaled_log1p(X, _row_factors(X))


def _row_factors(X: sp.csr_matrix) -> npt.NDArray[np.float32]:
    """Return 10,000 / row total (1 for empty rows) per row of a float32 CSR matrix, as float32."""
    totals = np.asarray(X.sum(axis=1)).ravel()
    totals[totals == 0] = 1.0
    return (TARGET_SUM / totals).astype(np.float32)


def _scaled_log1p(X: sp.csr_matrix, factors: npt.NDArray[np.float32]) -> sp.csr_matrix:
    """Return log1p(value x its row's factor) of a float32 CSR matrix as a new one (``X`` is left as it is)."""
    data = X.data * np.repeat(factors, np.diff(X.indptr))  # float32: each value times its row's factor
    np.log1p(data, out=data)
    return sp.csr_matrix((data, X.indices, X.indptr), shape=X.shape)


def gene_moments(X, kind: str, *, chunk_rows: int = CHUNK_ROWS
                 ) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """Return the mean and the mean square of every gene's normalised values, in one pass over row blocks.

    ``X`` may be in memory or backed (see `iter_row_blocks`); sums are float64.
    """
    n_cells, n_genes = (int(n) for n in X.shape)
    total = np.zeros(n_genes, dtype=np.float64)
    total_sq = np.zeros(n_genes, dtype=np.float64)
    for _, block in iter_row_blocks(X, chunk_rows=chunk_rows):
        normalised = log_normalise(block, kind)
        if sp.issparse(normalised):
            matrix = cast("sp.csr_matrix", normalised)
            values = matrix.data.astype(np.float64)
            total += np.bincount(matrix.indices, weights=values, minlength=n_genes)
            total_sq += np.bincount(matrix.indices, weights=values * values, minlength=n_genes)
        else:
            values = normalised.astype(np.float64)
            total += values.sum(axis=0)
            total_sq += (values * values).sum(axis=0)
    n = max(1, n_cells)
    return total / n, total_sq / n


def top_variable(mean: npt.NDArray[np.float64], mean_sq: npt.NDArray[np.float64],
                 n_top: int) -> npt.NDArray[np.int64]:
    """Return the column indices (sorted) of the ``n_top`` genes of largest variance (ties by column order)."""
    variance = mean_sq - mean**2
    order = np.argsort(-variance, kind="stable")[: min(n_top, variance.size)]
    return np.sort(order)


def highly_variable(X, n_top: int, *, kind: str = "log", chunk_rows: int = CHUNK_ROWS) -> npt.NDArray[np.int64]:
    """Return the column indices of the ``n_top`` most variable genes of ``X`` (ties by column order).

    ``X`` holds values as they are by default (``kind="log"``: already normalised); pass the value kind
    of raw data (``counts``, ...) to normalise it block by block first.
    """
    return top_variable(*gene_moments(X, kind, chunk_rows=chunk_rows), n_top)


def _selected_columns(matrix: sp.csr_matrix, columns: npt.NDArray[np.int64], kind: str, *,
                      out: npt.NDArray[np.float32] | None = None) -> npt.NDArray[np.float32]:
    """Return the dense normalised ``matrix[:, columns]`` of a float32 CSR block without duplicate entries (in
    ``out``, zeros, when given): `log_normalise` of the block, then the columns, bit for bit.

    scipy selects the columns first (its compiled column indexing), so only the selected values are scaled
    and logged: a head's 2,000 genes of 20,000 or more take a fraction of the logarithms. Each row's factor
    comes from the whole row.
    """
    selected = matrix[:, columns]
    if kind not in AS_IS_KINDS:
        selected = _scaled_log1p(selected, _row_factors(matrix))  # factors of the whole rows
    return selected.toarray(out=out)


class _ExpressionBaseline(Encoder):
    """Shared steps: log-normalise, pick highly variable genes, and remember them.

    Embedding a data set with no fitted state fits on that data (the benchmark's
    unsupervised, label-free use). `fit` fixes the genes (and components) on
    training data so that `embed` maps new data into the same space, as
    `scdrugmap predict` needs; `state`/`from_state` carry that into a head bundle.
    """

    family = "baseline"
    input_kind = "any"
    #: `embed` and `fit` read a backed AnnData in row blocks themselves: callers need not load it.
    reads_backed: ClassVar[bool] = True

    def __init__(self, n_top_genes: int = N_TOP_GENES) -> None:
        self.n_top_genes = n_top_genes
        self.genes_: np.ndarray | None = None

    @classmethod
    def from_pretrained(cls, path_or_name: str | Path | None = None, **options: Any) -> Encoder:
        return cls(**options)

    @staticmethod
    def _source(adata: ad.AnnData, layer: str | None) -> tuple[Any, str]:
        """Return the expression (in memory or backed, never loaded here) and its value kind."""
        X = expression_matrix(adata, layer)
        return X, detect_value_kind(X)

    def _fit_genes(self, adata: ad.AnnData, X, kind: str) -> npt.NDArray[np.float64]:
        """Pick the highly variable genes (one pass); return their mean normalised values."""
        mean, mean_sq = gene_moments(X, kind)
        columns = top_variable(mean, mean_sq, self.n_top_genes)
        self.genes_ = np.asarray(adata.var_names.astype(str))[columns]
        return mean[columns]

    def _selected_blocks(self, adata: ad.AnnData, X, kind: str, genes: np.ndarray, *, reuse: bool = False,
                         ) -> Iterator[tuple[int, npt.NDArray[np.float32]]]:
        """Yield (first row, dense float32 normalised values of ``genes``) per block of rows.

        Genes the data lacks are columns of zeros (logged once). With ``reuse`` the blocks of a sparse matrix are
        written into one array, valid until the next block is asked for: a new 8 MB array per block costs more
        in page faults (~6 us each on a virtual machine) than its values take to write.
        """
        names = np.asarray(adata.var_names.astype(str))
        position = {name: i for i, name in enumerate(names)}
        columns = np.array([position.get(g, -1) for g in genes], dtype=np.int64)
        missing = columns < 0
        if missing.any():
            log.warning("%d of the %d fitted genes are absent from the data; they count as 0",
                        int(missing.sum()), genes.size)
        taken = np.maximum(columns, 0)
        every_column = columns.size == names.size and np.array_equal(columns, np.arange(names.size))
        buffer = None
        for start, block in iter_row_blocks(X, chunk_rows=CHUNK_ROWS):
            out = None
            if reuse and sp.issparse(block):
                if buffer is None or buffer.shape[0] < block.shape[0]:
                    buffer = np.empty((block.shape[0], genes.size), dtype=np.float32)
                out = buffer[: block.shape[0]]
                out.fill(0.0)  # toarray adds into it
            if every_column:  # the fitted genes in the data's own order: nothing to select
                normalised = log_normalise(block, kind)
                dense = cast("sp.csr_matrix", normalised).toarray(out=out) if sp.issparse(normalised) \
                    else normalised.copy()
            elif sp.issparse(block) and (matrix := sp.csr_matrix(block, dtype=np.float32)).has_canonical_format:
                dense = _selected_columns(matrix, taken, kind, out=out)
            else:  # dense, or duplicate entries (summed by the selection, after the logarithm, as before)
                selected = log_normalise(block, kind)[:, taken]  # a new array either way
                dense = cast("sp.csr_matrix", selected).toarray() if sp.issparse(selected) else selected
            dense[:, missing] = 0.0
            yield start, dense

    def embedding_blocks(self, adata: ad.AnnData, *, layer: str | None = None,
                         progress: Progress | None = None) -> Iterator[tuple[int, npt.NDArray[np.float32]]]:
        """Yield (first row, embedding of a block of rows) in row order; fits on ``adata`` first when unfitted."""
        raise NotImplementedError

    def embed_into(self, adata: ad.AnnData, out: Any, *, layer: str | None = None,
                   progress: Progress | None = None) -> None:
        """Write every cell's embedding into ``out`` (``out[start:stop] = block``): an array or a file writer."""
        for start, block in self.embedding_blocks(adata, layer=layer, progress=progress):
            out[start : start + block.shape[0]] = block

    def embed(self, adata: ad.AnnData, *, layer: str | None = None, batch_size: int | None = None,
              progress: Progress | None = None) -> npt.NDArray[np.float32]:
        out: npt.NDArray[np.float32] | None = None
        for start, block in self.embedding_blocks(adata, layer=layer, progress=progress):
            if out is None:  # the width is known once the genes are selected
                out = np.empty((adata.n_obs, block.shape[1]), dtype=np.float32)
            out[start : start + block.shape[0]] = block
        return out if out is not None else np.empty((adata.n_obs, self.embedding_dim), dtype=np.float32)

    def state(self) -> dict[str, np.ndarray]:
        """Return the fitted state (gene names as a fixed-width byte array, so safetensors can hold it)."""
        if self.genes_ is None:
            msg = f"{self.name} is not fitted; call fit(adata) first."
            raise ConfigError(msg)
        return {"genes": np.char.encode(self.genes_.astype(str), "utf-8").view(np.uint8).reshape(self.genes_.size, -1)}

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        raw = np.asarray(state["genes"], dtype=np.uint8)
        width = raw.shape[1]
        self.genes_ = np.char.decode(raw.view(f"S{width}").ravel(), "utf-8").astype(str)


class HVGEncoder(_ExpressionBaseline):
    """Log-normalised expression of the most variable genes."""

    name: ClassVar[str] = "hvg"

    @property
    def embedding_dim(self) -> int:
        return self.n_top_genes if self.genes_ is None else int(self.genes_.size)

    def fit(self, adata: ad.AnnData, *, layer: str | None = None) -> HVGEncoder:
        X, kind = self._source(adata, layer)
        self._fit_genes(adata, X, kind)
        return self

    def embedding_blocks(self, adata: ad.AnnData, *, layer: str | None = None,
                         progress: Progress | None = None) -> Iterator[tuple[int, npt.NDArray[np.float32]]]:
        X, kind = self._source(adata, layer)
        fitted_here = self.genes_ is None
        if fitted_here:  # unfitted: select on this data, stay stateless
            self._fit_genes(adata, X, kind)
        assert self.genes_ is not None  # fitted above or before
        try:
            for start, block in self._selected_blocks(adata, X, kind, self.genes_):
                yield start, block
                if progress:
                    progress(start + block.shape[0], adata.n_obs)
        finally:
            if fitted_here:
                self.genes_ = None


class PCAEncoder(_ExpressionBaseline):
    """Principal components of the log-normalised highly variable genes.

    Notes
    -----
    The components are those of scikit-learn's exact ``PCA(svd_solver="covariance_eigh")``: the
    eigenvectors of the covariance of the selected genes (largest first, signs by `svd_flip`), with the
    covariance summed over row blocks (centred on the exact gene means) instead of from the whole
    matrix. Before, they came from ``PCA(svd_solver="randomized")`` on the dense matrix, an
    approximation: the leading components agree (tests/models/test_baselines.py), trailing ones with
    near-equal variances may differ, so `describe` names the solver and old cached embeddings are not
    reused. Head bundles of either keep working: they carry their own genes, mean and components.
    """

    name: ClassVar[str] = "pca"
    #: How the components are computed, part of the embedding cache key (see `describe`).
    solver: ClassVar[str] = "covariance_eigh over row blocks"

    def __init__(self, n_components: int = N_COMPONENTS, n_top_genes: int = N_TOP_GENES, seed: int = 0) -> None:
        super().__init__(n_top_genes)
        self.n_components = n_components
        self.seed = seed  # kept for old configurations: the exact solver draws no random numbers
        self.mean_: np.ndarray | None = None
        self.components_: np.ndarray | None = None

    @property
    def embedding_dim(self) -> int:
        return self.n_components

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "solver": self.solver}

    def fit(self, adata: ad.AnnData, *, layer: str | None = None) -> PCAEncoder:
        X, kind = self._source(adata, layer)
        self._fit(adata, X, kind)
        return self

    def _fit(self, adata: ad.AnnData, X, kind: str) -> None:
        """Select genes (one pass), then sum the covariance of their values over row blocks (another)."""
        from scipy.linalg import eigh
        from sklearn.utils.extmath import svd_flip

        mean = self._fit_genes(adata, X, kind)
        assert self.genes_ is not None  # set by _fit_genes
        n_cells, n_genes = adata.n_obs, int(self.genes_.size)
        gram = np.zeros((n_genes, n_genes), dtype=np.float64)
        for _, block in self._selected_blocks(adata, X, kind, self.genes_, reuse=True):
            centred = block.astype(np.float64)
            centred -= mean
            gram += centred.T @ centred  # float64 throughout: the result does not depend on the block size
        n_components = min(self.n_components, n_cells - 1, n_genes)
        self.mean_ = mean.astype(np.float32)
        self.components_ = np.zeros((self.n_components, n_genes), dtype=np.float32)
        if n_components < 1:
            return
        covariance = gram / max(1, n_cells - 1)
        _, vectors = eigh(covariance, subset_by_index=[n_genes - n_components, n_genes - 1])
        _, components = svd_flip(None, vectors[:, ::-1].T, u_based_decision=False)  # largest first
        self.components_[:n_components] = components

    def embedding_blocks(self, adata: ad.AnnData, *, layer: str | None = None,
                         progress: Progress | None = None) -> Iterator[tuple[int, npt.NDArray[np.float32]]]:
        X, kind = self._source(adata, layer)
        fitted_here = self.components_ is None
        if fitted_here:  # unfitted: fit on this data, without labels
            self._fit(adata, X, kind)
        # fitted above or before (fit and load_state set all three)
        assert self.genes_ is not None and self.mean_ is not None and self.components_ is not None
        try:
            for start, block in self._selected_blocks(adata, X, kind, self.genes_, reuse=True):
                block -= self.mean_  # the block is this loop's own: centred in place
                yield start, block @ self.components_.T
                if progress:
                    progress(start + block.shape[0], adata.n_obs)
        finally:
            if fitted_here:
                self.mean_ = self.components_ = self.genes_ = None  # stay stateless between data sets

    def state(self) -> dict[str, np.ndarray]:
        if self.components_ is None:
            msg = "pca is not fitted; call fit(adata) first."
            raise ConfigError(msg)
        assert self.mean_ is not None  # fitted together with the components
        return {**super().state(), "mean": self.mean_, "components": self.components_}

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        super().load_state(state)
        self.mean_ = np.asarray(state["mean"], dtype=np.float32)
        self.components_ = np.asarray(state["components"], dtype=np.float32)


class MajorityEncoder(Encoder):
    """No features: a head on it predicts the training fold's share of sensitive cells."""

    name: ClassVar[str] = "majority"
    shardable: ClassVar[bool] = True  # no computation per cell at all
    reads_backed: ClassVar[bool] = True  # reads no expression at all
    family = "baseline"
    input_kind = "any"

    @property
    def embedding_dim(self) -> int:
        return 0

    @classmethod
    def from_pretrained(cls, path_or_name: str | Path | None = None, **options: Any) -> Encoder:
        return cls()

    def embed(self, adata: ad.AnnData, *, layer: str | None = None, batch_size: int | None = None,
              progress: Progress | None = None) -> npt.NDArray[np.float32]:
        return np.zeros((adata.n_obs, 0), dtype=np.float32)
