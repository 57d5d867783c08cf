"""Naive baselines behind the encoder contract, so every benchmark has them.

``pca``: 50 principal components of log-normalised highly variable genes.
``hvg``: the log-normalised expression of the highly variable genes itself.
``majority``: no features at all; a head on it predicts the training prior (the class-balance reference).

Counts, TPM and normalised values are scaled to 10,000 per cell and log1p-transformed;
log-transformed and z-scored values are used as they are. Gene selection and PCA see
all cells but no labels (like a foundation model's embedding, they are unsupervised).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import scipy.sparse as sp

from scdrugmap.data.schema import detect_value_kind, expression_matrix
from scdrugmap.models.base import Encoder, Progress

if TYPE_CHECKING:
    import anndata as ad
    import numpy.typing as npt

log = logging.getLogger(__name__)

TARGET_SUM = 1e4  # per-cell total before log1p, as scanpy's normalize_total default for this use
N_TOP_GENES = 2000
N_COMPONENTS = 50


def log_normalise(X: np.ndarray | sp.spmatrix, kind: str) -> sp.csr_matrix | np.ndarray:
    """Return log1p(10,000 x X / row total) for count-like values, X itself for log or z-scored values."""
    if kind in {"log", "zscore", "negative"}:
        return sp.csr_matrix(X, dtype=np.float32) if sp.issparse(X) else np.asarray(X, dtype=np.float32)
    X = sp.csr_matrix(X, dtype=np.float32)
    totals = np.asarray(X.sum(axis=1)).ravel()
    totals[totals == 0] = 1.0
    X = sp.diags((TARGET_SUM / totals).astype(np.float32)) @ X
    X.data = np.log1p(X.data)
    return X.tocsr()


def highly_variable(X: sp.csr_matrix | np.ndarray, n_top: int) -> npt.NDArray[np.int64]:
    """Return the column indices of the ``n_top`` most variable genes (ties by column order)."""
    if sp.issparse(X):
        mean = np.asarray(X.mean(axis=0)).ravel()
        mean_sq = np.asarray(X.multiply(X).mean(axis=0)).ravel()
    else:
        mean, mean_sq = X.mean(axis=0), (X * X).mean(axis=0)
    variance = mean_sq - mean**2
    order = np.argsort(-variance, kind="stable")[: min(n_top, X.shape[1])]
    return np.sort(order)


class _ExpressionBaseline(Encoder):
    family = "baseline"
    input_kind = "any"

    def __init__(self, n_top_genes: int = N_TOP_GENES) -> None:
        self.n_top_genes = n_top_genes

    @classmethod
    def from_pretrained(cls, path_or_name: str | Path | None = None, **options: Any) -> Encoder:
        return cls(**options)

    def _hvg_matrix(self, adata: ad.AnnData, layer: str | None) -> np.ndarray:
        X = expression_matrix(adata, layer)
        if hasattr(X, "to_memory"):
            X = X.to_memory()
        kind = detect_value_kind(X)
        normalised = log_normalise(X, kind)
        genes = highly_variable(normalised, self.n_top_genes)
        selected = normalised[:, genes]
        return selected.toarray() if sp.issparse(selected) else np.asarray(selected)


class HVGEncoder(_ExpressionBaseline):
    """Log-normalised expression of the most variable genes."""

    name: ClassVar[str] = "hvg"

    @property
    def embedding_dim(self) -> int:
        return self.n_top_genes

    def embed(self, adata: ad.AnnData, *, layer: str | None = None, batch_size: int | None = None,
              progress: Progress | None = None) -> npt.NDArray[np.float32]:
        return self._hvg_matrix(adata, layer).astype(np.float32)


class PCAEncoder(_ExpressionBaseline):
    """Principal components of the log-normalised highly variable genes."""

    name: ClassVar[str] = "pca"

    def __init__(self, n_components: int = N_COMPONENTS, n_top_genes: int = N_TOP_GENES, seed: int = 0) -> None:
        super().__init__(n_top_genes)
        self.n_components = n_components
        self.seed = seed

    @property
    def embedding_dim(self) -> int:
        return self.n_components

    def embed(self, adata: ad.AnnData, *, layer: str | None = None, batch_size: int | None = None,
              progress: Progress | None = None) -> npt.NDArray[np.float32]:
        from sklearn.decomposition import PCA

        X = self._hvg_matrix(adata, layer)
        n_components = min(self.n_components, X.shape[0] - 1, X.shape[1])
        pca = PCA(n_components=n_components, svd_solver="randomized", random_state=self.seed)
        out = np.zeros((adata.n_obs, self.n_components), dtype=np.float32)
        out[:, :n_components] = pca.fit_transform(X)
        return out


class MajorityEncoder(Encoder):
    """No features: a head on it predicts the training fold's share of sensitive cells."""

    name: ClassVar[str] = "majority"
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
