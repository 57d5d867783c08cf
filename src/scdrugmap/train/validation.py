"""The inner validation split that early stopping watches, carved from a training fold only."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import numpy.typing as npt


def _empty() -> npt.NDArray[np.int64]:
    return np.empty(0, dtype=np.int64)


def inner_validation_split(labels: npt.NDArray, groups: npt.NDArray | None, *, fraction: float = 0.1,
                           seed: int = 0) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """Split a training fold into (fit, validation) positions for early stopping.

    Grouped by sample when possible (whole samples go to validation), else
    stratified by cell; validation never comes from the test fold because only
    training positions are passed in.
    """
    from sklearn.model_selection import StratifiedShuffleSplit

    rng = np.random.default_rng(seed)
    positions = np.arange(labels.size)
    if groups is not None:
        unique = np.unique(groups)
        if unique.size >= 5:
            for _ in range(20):
                chosen = rng.choice(unique, size=max(1, round(unique.size * fraction)), replace=False)
                in_val = np.isin(groups, chosen)
                if 0 < in_val.sum() < labels.size and np.unique(labels[~in_val]).size == 2:
                    return positions[~in_val], positions[in_val]
    n_val = max(2, round(labels.size * fraction))
    if np.bincount(labels.astype(np.int64), minlength=2).min() < 2 or labels.size - n_val < 2:
        return positions, _empty()  # too few cells to hold some out: train on all, no early stopping
    splitter = StratifiedShuffleSplit(n_splits=1, test_size=n_val, random_state=seed)
    fit, val = next(splitter.split(np.zeros(labels.size), labels))
    return fit.astype(np.int64), val.astype(np.int64)
