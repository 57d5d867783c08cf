"""Flag cells a head should not be trusted on: far from every training cell, or read over too few genes.

`OutOfDistributionDetector` keeps a reference sample of the head's training cells (at most
``max_reference_cells``, drawn with a seeded generator), centred and scaled. A cell's distance is the
mean Euclidean distance to its ``n_neighbors`` nearest reference cells (`nearest_distances`: scikit-learn
``NearestNeighbors``' brute-force arithmetic in numpy, so neither fit nor scoring imports scikit-learn;
tested equal to it). The training cells' own distances, each reference cell to its nearest *other*
reference cells (leave-one-out), give the yardstick: their ``quantile`` (0.99). A cell's score is its
distance over that yardstick, so 1 means "as far from its neighbours as the 1% most isolated training
cells", and a cell is flagged when its score exceeds ``margin`` (1.0 by default).

Scaling. ``scaling="global"`` (the default) centres each dimension and divides the whole embedding by
one number, the training cells' root mean square distance from their mean; distances keep the
embedding's own geometry. ``scaling="dimension"`` z-scores each dimension instead, which helps where a
few dimensions of huge variance would otherwise decide every distance, but gives low-variance, mostly
noise dimensions (the last principal components, say) the weight of the informative ones. On the
simulator (20 to 50 PCA dimensions, 3 seeds, a study's held-out patients against the same cells with a
gene-wise batch effect of log-scale SD 1) global scaling flagged as many shifted cells or more (97%
against 86% at 50 dimensions) for the same share of held-out patients (3 to 10%).

Margin. Held-out cells of the training distribution are flagged at about ``1 - quantile`` (1%) at
margin 1; new patients of a known study a little more (3 to 10% on the simulator: their patient effect
puts them further away). Raising the margin to 1.2 spares nearly all of them but misses most cells of a
moderately shifted study at 50 dimensions; the test tests/train/test_ood.py pins the default's
behaviour. Distances concentrate in many noisy dimensions, so the detector is sharper on an
embedding with fewer, informative dimensions, and on a larger reference sample.

Blind spot. Only shifts the embedding represents can be seen: an embedding fitted on the training
cells alone (a PCA of one study, say) projects another study's differences away and flags nothing.
Foundation models, and the PCA baseline, which is fitted on every cell without labels, do represent them.

Gene overlap. A cell is also flagged when its gene overlap, the share of the training gene space its
data set measures, is below ``min_gene_overlap`` (0.5): its embedding was read from too few of the
genes the model and head rely on, however ordinary it looks. A cell whose embedding has a NaN or
infinite value (the model could not read it) gets a NaN score and is flagged.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np

from scdrugmap.errors import SchemaError
from scdrugmap.train._trust import Estimator, State, check_fitted, require_keys

Scaling = Literal["global", "dimension"]

if TYPE_CHECKING:
    import numpy.typing as npt

log = logging.getLogger(__name__)

N_NEIGHBORS = 10
#: Training cells kept as the reference sample (memory and time grow with it, not with the training set).
MAX_REFERENCE_CELLS = 5_000
#: The quantile of the training cells' leave-one-out distances that a score of 1 stands for.
QUANTILE = 0.99
#: A cell is flagged when its distance is more than MARGIN times that quantile.
MARGIN = 1.0
#: A cell whose gene overlap is below this is flagged.
MIN_GENE_OVERLAP = 0.5
#: Dimensions whose training standard deviation is below this are only centred, not scaled.
MIN_SCALE = 1e-8
REASON_NOT_READ = "the embedding has non-finite values (the model could not read this cell)"
STATE_KEYS = ("mean", "scale", "reference", "reference_distances", "threshold", "n_neighbors", "k",
              "quantile", "margin", "min_gene_overlap", "scaling", "max_reference_cells", "seed", "n_training_cells", "reason")


@dataclass(frozen=True)
class OutOfDistribution:
    """Per-cell result of `OutOfDistributionDetector.score_cells`; every array has one entry per cell.

    ``score``: kNN distance over the training quantile (NaN for an unreadable cell); ``distance``: the mean
    distance to the nearest reference cells, standardised units; ``flagged``: True where the head should
    not be trusted; ``reason``: empty, or why the cell is flagged (several reasons joined by ``"; "``).
    """

    score: npt.NDArray[np.float64]
    distance: npt.NDArray[np.float64]
    flagged: npt.NDArray[np.bool_]
    reason: npt.NDArray[np.object_]


def _matrix(embeddings: npt.ArrayLike, name: str = "embeddings") -> np.ndarray:
    X = np.asarray(embeddings, dtype=np.float64)
    if X.ndim != 2:
        msg = f"{name} has shape {X.shape}; expected (cells x dimensions)."
        raise SchemaError(msg)
    return X


#: Query cells per block of `nearest_distances` (128 x 5,000 reference cells: 2.5 MB of float32 screen).
QUERY_BLOCK = 128
#: Column groups whose minima bound a block's k-th smallest screened distance (see `nearest_distances`).
SCREEN_GROUPS = 128
#: Largest magnitude (norm products) screened in float32; larger inputs are screened in float64.
FLOAT32_SCREEN_LIMIT = 1e30


def nearest_distances(queries: np.ndarray, reference: np.ndarray, k: int, *,
                      leave_one_out: bool = False) -> npt.NDArray[np.float64]:
    """Return each query cell's Euclidean distances to its ``k`` nearest reference cells, ascending.

    What scikit-learn's brute-force ``NearestNeighbors.kneighbors`` returns (the same float64 arithmetic:
    squared norms and the cross term in float64, negative squares clipped to 0; tested equal within 1e-6),
    without importing scikit-learn (about a second of a prediction's start-up). With ``leave_one_out`` the
    queries are the reference cells themselves and each cell's own row is skipped, as ``kneighbors()``
    without ``X`` does (a duplicate of a cell still counts, at distance 0); the fit uses that. A query with
    a non-finite value gets NaN distances.

    Notes
    -----
    Two passes per block of `QUERY_BLOCK` queries. A screen computes every squared distance (less the
    query's own norm) in float32, half the time of float64 products, and keeps as candidates the reference
    cells within a proven error bound of the k-th smallest screened value: the float32 rounding of the
    inputs and of a dot product of ``d + 1`` terms is at most ``(2d + 8) u (|q| max|r| + max|r|^2)`` with
    ``u = 2**-24``, so every cell among the true ``k`` nearest passes (the k-th smallest value itself is
    bounded from above by the k-th smallest of `SCREEN_GROUPS` strided column minima, one reduction
    instead of ``k`` selection passes). The candidates, about ``k`` per query, are then measured again in
    float64, and the ``k`` smallest kept. Inputs too large for float32 are screened in float64.

    Blocks run on one thread per CPU, with one BLAS thread each
    (`scdrugmap.train._blocks.map_row_blocks`), as scikit-learn's ``kneighbors`` does.

    Raises
    ------
    SchemaError
        When ``k`` is not between 1 and the reference cells available (one fewer with ``leave_one_out``),
        or the reference has a non-finite value.
    """
    from scdrugmap.train._blocks import map_row_blocks

    n_reference, width = reference.shape
    if leave_one_out and queries.shape[0] != n_reference:
        msg = f"leave_one_out needs the reference cells as queries; got {queries.shape[0]} and {n_reference}."
        raise SchemaError(msg)
    available = n_reference - int(leave_one_out)
    if not 1 <= k <= available:
        msg = f"k={k} nearest neighbours asked of {available} reference cells; expected 1 to {available}."
        raise SchemaError(msg)
    reference64 = reference.astype(np.float64)
    if not np.isfinite(reference64).all():
        msg = "the reference cells have non-finite values; leave those cells out of the reference."
        raise SchemaError(msg)
    reference_norms = np.einsum("ij,ij->i", reference64, reference64)
    scaled = -2.0 * reference64  # times -2 exactly (a power of two): one pass less per candidate
    largest = float(np.sqrt(reference_norms.max()))
    query_norms = np.einsum("ij,ij->i", queries, queries, dtype=np.float64)
    finite = np.isfinite(query_norms)
    largest_query = float(np.sqrt(query_norms[finite].max())) if finite.any() else 0.0
    screen_dtype = (np.float32 if (largest_query + largest) * largest < FLOAT32_SCREEN_LIMIT else np.float64)
    # the screen: [q, 1] @ [[-2 r], [|r|^2]] = |r|^2 - 2 q.r for every reference cell r
    screen = np.empty((width + 1, n_reference), dtype=screen_dtype)
    screen[:width] = scaled.T
    screen[width] = reference_norms
    # error bound of a screened value against float64 (screen rounding, plus float64's own, both bounded)
    unit = float(np.finfo(screen_dtype).eps) / 2 + 2.0**-53
    slack = 1.01 * (2 * width + 8) * unit
    groups = min(n_reference, max(SCREEN_GROUPS, k + 1))  # k + 1: a query's own (infinite) column spared
    per_group = n_reference // groups
    out = np.empty((queries.shape[0], k), dtype=np.float64)

    def fill(start: int, stop: int) -> None:
        block = queries[start:stop].astype(np.float64)
        block[~finite[start:stop]] = 0.0  # measured as zeros, returned as NaN
        n_rows = block.shape[0]
        augmented = np.ones((n_rows, width + 1), dtype=screen_dtype)
        augmented[:, :width] = block
        screened = augmented @ screen
        rows = np.arange(n_rows)
        if leave_one_out:
            screened[rows, rows + start] = np.inf
        minima = screened[:, : per_group * groups].reshape(n_rows, per_group, groups).min(axis=1)
        kth = np.partition(minima, k - 1, axis=1)[:, k - 1]  # at least the k-th smallest screened value
        error = slack * (np.sqrt(query_norms[start:stop], where=finite[start:stop], out=np.zeros(n_rows))
                         * largest + largest * largest)
        bound = (kth + 3.0 * error).astype(screen_dtype)  # 2 errors proven; 1 more for rounding the bound
        candidates = np.flatnonzero(screened <= bound[:, None])
        row, column = np.divmod(candidates, n_reference)
        squared = np.einsum("ij,ij->i", block[row], scaled[column])
        squared += reference_norms[column]
        order = np.lexsort((squared, row))  # by query, then distance
        counts = np.bincount(row, minlength=n_rows)
        nearest = squared[order[(np.cumsum(counts) - counts)[:, None] + np.arange(k)]]
        nearest += query_norms[start:stop, None]
        distances = np.sqrt(np.maximum(nearest, 0.0))
        distances[~finite[start:stop]] = np.nan
        out[start:stop] = distances

    map_row_blocks(fill, queries.shape[0], QUERY_BLOCK)
    return out


class OutOfDistributionDetector(Estimator):
    """Score and flag cells far from a head's training cells in embedding space, or with low gene overlap.

    Parameters
    ----------
    n_neighbors
        Nearest reference cells whose mean distance is a cell's distance.
    max_reference_cells
        Training cells kept as reference, drawn at random (seeded) when there are more.
    quantile
        The quantile of the training cells' leave-one-out distances that a score of 1 stands for.
    margin
        A cell is flagged when its score is above this.
    min_gene_overlap
        A cell is flagged when its gene overlap, given to `score_cells`, is below this.
    scaling
        ``global`` (centre, then divide by one number: the embedding's geometry is kept) or ``dimension``
        (z-score each dimension); see the module docstring.
    seed
        Seed of the reference sample.

    Attributes
    ----------
    mean_, scale_
        Centring and scaling of the training embeddings, per dimension (float64; ``scale_`` is one repeated
        number with ``scaling="global"``).
    reference_
        The reference cells, standardised (float32, reference cells x dimensions).
    reference_distances_
        Each reference cell's leave-one-out distance to its nearest other reference cells (float64).
    threshold_
        The ``quantile`` of ``reference_distances_``: the distance of score 1.
    k_
        Neighbours used: ``n_neighbors``, or fewer when the reference has too few cells.
    n_training_cells_
        Training cells with a finite embedding.
    reason_
        Empty, or what the fit had to change (fewer neighbours, training cells left out).

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> detector = OutOfDistributionDetector().fit(rng.normal(size=(500, 8)))
    >>> result = detector.score_cells(np.vstack([rng.normal(size=(1, 8)), rng.normal(6.0, 1.0, (1, 8))]))
    >>> result.flagged.tolist()
    [False, True]
    """

    def __init__(self, *, n_neighbors: int = N_NEIGHBORS, max_reference_cells: int = MAX_REFERENCE_CELLS,
                 quantile: float = QUANTILE, margin: float = MARGIN, min_gene_overlap: float = MIN_GENE_OVERLAP,
                 scaling: Scaling = "global", seed: int = 0) -> None:
        self.n_neighbors = n_neighbors
        self.max_reference_cells = max_reference_cells
        self.quantile = quantile
        self.margin = margin
        self.min_gene_overlap = min_gene_overlap
        self.scaling = scaling
        self.seed = seed

    def _check_params(self) -> None:
        problems = []
        if self.n_neighbors < 1:
            problems.append(f"n_neighbors={self.n_neighbors} (expected >= 1)")
        if self.max_reference_cells < 2:
            problems.append(f"max_reference_cells={self.max_reference_cells} (expected >= 2)")
        if not 0.0 < self.quantile <= 1.0:
            problems.append(f"quantile={self.quantile} (expected in (0, 1])")
        if self.margin <= 0.0:
            problems.append(f"margin={self.margin} (expected > 0)")
        if self.scaling not in ("global", "dimension"):
            problems.append(f"scaling={self.scaling!r} (expected 'global' or 'dimension')")
        if problems:
            msg = f"OutOfDistributionDetector has {', '.join(problems)}."
            raise SchemaError(msg)

    def fit(self, embeddings: npt.ArrayLike) -> OutOfDistributionDetector:
        """Keep a standardised reference sample of the training cells and their leave-one-out distances.

        Rows with a non-finite value are left out (and counted in ``reason_``).

        Raises
        ------
        SchemaError
            When ``embeddings`` is not a matrix, fewer than 2 rows are finite, or a parameter is out of range.
        """
        self._check_params()
        X = _matrix(embeddings)
        finite = np.isfinite(X).all(axis=1)
        notes = []
        if not finite.all():
            notes.append(f"{int((~finite).sum())} training cells with non-finite embeddings left out")
        X = X[finite]
        if X.shape[0] < 2:
            msg = (f"embeddings has {X.shape[0]} cells with finite values; the OOD reference needs at least 2 "
                   "training cells.")
            raise SchemaError(msg)
        self.mean_ = X.mean(axis=0)
        if self.scaling == "dimension":
            scale = X.std(axis=0)
        else:  # one number: the root mean square distance of a cell from the mean, so the geometry is kept
            scale = np.full(X.shape[1], np.sqrt(np.mean(np.sum((X - self.mean_) ** 2, axis=1))))
        self.scale_ = np.where(scale < MIN_SCALE, 1.0, scale)
        rng = np.random.default_rng(self.seed)
        rows = np.arange(X.shape[0])
        if rows.size > self.max_reference_cells:
            rows = np.sort(rng.choice(rows, size=self.max_reference_cells, replace=False))
        self.reference_ = self._standardise(X[rows])
        self.k_ = min(self.n_neighbors, rows.size - 1)
        if self.k_ < self.n_neighbors:
            notes.append(f"only {rows.size} reference cells, so {self.k_} neighbours instead of {self.n_neighbors}")
        # each reference cell's neighbours exclude itself (scikit-learn's ``kneighbors()`` without X)
        distances = nearest_distances(self.reference_, self.reference_, self.k_, leave_one_out=True)
        self.reference_distances_ = distances.mean(axis=1)
        self.threshold_ = float(np.quantile(self.reference_distances_, self.quantile))
        self.n_training_cells_ = int(X.shape[0])
        self.reason_ = "; ".join(notes)
        log.debug("OOD reference: %d of %d training cells, k=%d, %g quantile distance %.3f",
                  rows.size, X.shape[0], self.k_, self.quantile, self.threshold_)
        return self

    def _standardise(self, X: np.ndarray) -> np.ndarray:
        return ((X - self.mean_) / self.scale_).astype(np.float32)

    def score_cells(self, embeddings: npt.ArrayLike, *, gene_overlap: float | npt.ArrayLike | None = None) -> OutOfDistribution:
        """Score and flag each cell.

        Parameters
        ----------
        embeddings
            (cells x dimensions) embeddings from the same model as the training cells'.
        gene_overlap
            Share of the training gene space measured for each cell (one number for all cells, or one per
            cell), in [0, 1]; NaN means unknown and is not flagged. None skips the check.

        Returns
        -------
        An `OutOfDistribution` with ``score``, ``distance``, ``flagged`` and ``reason`` per cell.

        Raises
        ------
        SchemaError
            When the width differs from the training embeddings', or ``gene_overlap`` has the wrong
            length or a value outside [0, 1].
        """
        check_fitted(self, "reference_")
        X = _matrix(embeddings)
        if X.shape[1] != self.mean_.size:
            msg = (f"embeddings has {X.shape[1]} dimensions but the head's training cells had {self.mean_.size}; "
                   "embed the cells with the model the head was trained on.")
            raise SchemaError(msg)
        n = X.shape[0]
        overlap = self._overlap(gene_overlap, n)
        readable = np.isfinite(X).all(axis=1)
        distance = np.full(n, np.nan)
        if readable.any():
            distance[readable] = nearest_distances(self._standardise(X[readable]), self.reference_, self.k_).mean(axis=1)
        score = distance / max(self.threshold_, np.finfo(np.float64).tiny)
        far = readable & (score > self.margin)
        low = overlap < self.min_gene_overlap  # NaN (unknown) compares False
        flagged = ~readable | far | low
        reason = np.full(n, "", dtype=object)
        for i in np.flatnonzero(flagged):
            notes = []
            if not readable[i]:
                notes.append(REASON_NOT_READ)
            if far[i]:
                notes.append(f"{score[i]:.2f}x the training cells' {self.quantile:g} quantile of nearest-neighbour "
                             f"distance, above the margin {self.margin:g}")
            if low[i]:
                notes.append(f"gene overlap {overlap[i]:.2f} is below {self.min_gene_overlap:g}")
            reason[i] = "; ".join(notes)
        return OutOfDistribution(score=score, distance=distance, flagged=flagged, reason=reason)

    @staticmethod
    def _overlap(gene_overlap: float | npt.ArrayLike | None, n: int) -> np.ndarray:
        if gene_overlap is None:
            return np.full(n, np.nan)
        overlap = np.asarray(gene_overlap, dtype=np.float64)
        if overlap.ndim == 0:
            overlap = np.full(n, float(overlap))
        if overlap.shape != (n,):
            msg = f"gene_overlap has shape {overlap.shape}; expected one number, or one per cell ({n})."
            raise SchemaError(msg)
        known = overlap[~np.isnan(overlap)]
        if ((known < 0.0) | (known > 1.0)).any():
            msg = f"gene_overlap has {np.unique(known[(known < 0) | (known > 1)])[:3].tolist()}; expected shares in [0, 1]."
            raise SchemaError(msg)
        return overlap

    def state(self) -> State:
        """Return the fitted state: arrays ``mean``, ``scale``, ``reference`` (float32), ``reference_distances``;
        the rest numbers and a ``reason`` string."""
        check_fitted(self, "reference_")
        return {"mean": self.mean_.copy(), "scale": self.scale_.copy(), "reference": self.reference_.copy(),
                "reference_distances": self.reference_distances_.copy(), "threshold": self.threshold_,
                "n_neighbors": int(self.n_neighbors), "k": int(self.k_), "quantile": float(self.quantile),
                "margin": float(self.margin), "min_gene_overlap": float(self.min_gene_overlap), "scaling": self.scaling,
                "max_reference_cells": int(self.max_reference_cells), "seed": int(self.seed),
                "n_training_cells": self.n_training_cells_, "reason": self.reason_}

    @classmethod
    def from_state(cls, state: State) -> OutOfDistributionDetector:
        """Rebuild a fitted detector from `state`; a missing key raises `CheckpointError` naming it."""
        require_keys(state, STATE_KEYS, cls.__name__)
        detector = cls(n_neighbors=int(state["n_neighbors"]), max_reference_cells=int(state["max_reference_cells"]),
                       quantile=float(state["quantile"]), margin=float(state["margin"]),
                       min_gene_overlap=float(state["min_gene_overlap"]), scaling=str(state["scaling"]),  # type: ignore[arg-type]
                       seed=int(state["seed"]))
        detector.mean_ = np.asarray(state["mean"], dtype=np.float64)
        detector.scale_ = np.asarray(state["scale"], dtype=np.float64)
        detector.reference_ = np.asarray(state["reference"], dtype=np.float32)
        detector.reference_distances_ = np.asarray(state["reference_distances"], dtype=np.float64)
        detector.threshold_ = float(state["threshold"])
        detector.k_ = int(state["k"])
        detector.n_training_cells_ = int(state["n_training_cells"])
        detector.reason_ = str(state["reason"])
        return detector
