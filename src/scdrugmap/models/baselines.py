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
from scdrugmap.errors import ConfigError
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
    """Shared steps: log-normalise, pick highly variable genes, and remember them.

    Embedding a data set with no fitted state fits on that data (the benchmark's
    unsupervised, label-free use). `fit` fixes the genes (and components) on
    training data so that `embed` maps new data into the same space, as
    `scdrugmap predict` needs; `state`/`from_state` carry that into a head bundle.
    """

    family = "baseline"
    input_kind = "any"

    def __init__(self, n_top_genes: int = N_TOP_GENES) -> None:
        self.n_top_genes = n_top_genes
        self.genes_: np.ndarray | None = None

    @classmethod
    def from_pretrained(cls, path_or_name: str | Path | None = None, **options: Any) -> Encoder:
        return cls(**options)

    def _normalised(self, adata: ad.AnnData, layer: str | None) -> sp.csr_matrix | np.ndarray:
        X = expression_matrix(adata, layer)
        if hasattr(X, "to_memory"):
            X = X.to_memory()
        return log_normalise(X, detect_value_kind(X))

    def _select(self, adata: ad.AnnData, normalised, genes: np.ndarray) -> np.ndarray:
        """Return the columns of ``genes`` (zeros for genes the data lacks, which are logged)."""
        names = np.asarray(adata.var_names.astype(str))
        position = {name: i for i, name in enumerate(names)}
        columns = np.array([position.get(g, -1) for g in genes])
        missing = int((columns < 0).sum())
        if missing:
            log.warning("%d of the %d fitted genes are absent from the data; they count as 0", missing, genes.size)
        dense = normalised[:, np.maximum(columns, 0)]
        dense = dense.toarray() if sp.issparse(dense) else np.asarray(dense)
        dense[:, columns < 0] = 0.0
        return dense.astype(np.float32)

    def _hvg_matrix(self, adata: ad.AnnData, layer: str | None, *, refit: bool) -> np.ndarray:
        normalised = self._normalised(adata, layer)
        if refit or self.genes_ is None:
            self.genes_ = np.asarray(adata.var_names.astype(str))[highly_variable(normalised, self.n_top_genes)]
        return self._select(adata, normalised, self.genes_)

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
        self._hvg_matrix(adata, layer, refit=True)
        return self

    def embed(self, adata: ad.AnnData, *, layer: str | None = None, batch_size: int | None = None,
              progress: Progress | None = None) -> npt.NDArray[np.float32]:
        if self.genes_ is not None:
            return self._hvg_matrix(adata, layer, refit=False)
        out = self._hvg_matrix(adata, layer, refit=True)  # unfitted: select on this data, stay stateless
        self.genes_ = None
        return out


class PCAEncoder(_ExpressionBaseline):
    """Principal components of the log-normalised highly variable genes."""

    name: ClassVar[str] = "pca"

    def __init__(self, n_components: int = N_COMPONENTS, n_top_genes: int = N_TOP_GENES, seed: int = 0) -> None:
        super().__init__(n_top_genes)
        self.n_components = n_components
        self.seed = seed
        self.mean_: np.ndarray | None = None
        self.components_: np.ndarray | None = None

    @property
    def embedding_dim(self) -> int:
        return self.n_components

    def fit(self, adata: ad.AnnData, *, layer: str | None = None) -> PCAEncoder:
        from sklearn.decomposition import PCA

        X = self._hvg_matrix(adata, layer, refit=True)
        n_components = min(self.n_components, X.shape[0] - 1, X.shape[1])
        pca = PCA(n_components=n_components, svd_solver="randomized", random_state=self.seed).fit(X)
        self.mean_ = pca.mean_.astype(np.float32)
        self.components_ = np.zeros((self.n_components, X.shape[1]), dtype=np.float32)
        self.components_[:n_components] = pca.components_
        return self

    def embed(self, adata: ad.AnnData, *, layer: str | None = None, batch_size: int | None = None,
              progress: Progress | None = None) -> npt.NDArray[np.float32]:
        if self.components_ is None:  # unfitted: fit on this data, without labels
            self.fit(adata, layer=layer)
            fitted_here = True
        else:
            fitted_here = False
        X = self._hvg_matrix(adata, layer, refit=False)
        out = ((X - self.mean_) @ self.components_.T).astype(np.float32)
        if fitted_here:
            self.mean_ = self.components_ = self.genes_ = None  # stay stateless between data sets
        return out

    def state(self) -> dict[str, np.ndarray]:
        if self.components_ is None:
            msg = "pca is not fitted; call fit(adata) first."
            raise ConfigError(msg)
        return {**super().state(), "mean": self.mean_, "components": self.components_}

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        super().load_state(state)
        self.mean_ = np.asarray(state["mean"], dtype=np.float32)
        self.components_ = np.asarray(state["components"], dtype=np.float32)


class MajorityEncoder(Encoder):
    """No features: a head on it predicts the training fold's share of sensitive cells."""

    name: ClassVar[str] = "majority"
    shardable: ClassVar[bool] = True  # no computation per cell at all
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
