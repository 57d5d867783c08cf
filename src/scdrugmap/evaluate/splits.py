"""Train/test splits for the two benchmark scenarios, grouped by sample by default.

``pooled``: k-fold within each value of a category (tissue, cancer type, therapy,
regimen), stratified by label and grouped by ``sample`` so that one patient never
sits in both train and test (``split="cell"`` gives the paper's cell-level split).
``cross``: leave-one-study-out within each category value.
``external``: train on every cell of a category value in one file, test on the same value of another
(`split_external`).

Folds that cannot be formed are returned with a ``skipped`` reason, never dropped.
Fold assignments depend only on obs, the labels and the seed, so every model sees
identical folds; the run folder keeps them (`scdrugmap.evaluate.store`).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd

from scdrugmap.errors import SplitError

if TYPE_CHECKING:
    import numpy.typing as npt

Scenario = Literal["pooled", "cross", "external"]
SplitPolicy = Literal["sample", "cell"]


@dataclass(frozen=True)
class Fold:
    """One train/test split of the cells of a category value (positions into the full data)."""

    scenario: Scenario
    category: str
    value: str
    fold: str
    split: SplitPolicy
    train: npt.NDArray[np.int64]
    test: npt.NDArray[np.int64]
    skipped: str | None = None
    #: Other category values selecting exactly these cells (``cancer_type=Melanoma``): they are not run again.
    also: tuple[str, ...] = ()

    @property
    def key(self) -> str:
        """Stable id of the split, part of every job key."""
        return f"{self.scenario}|{self.category}|{self.value}|{self.fold}|{self.split}"


def _empty() -> npt.NDArray[np.int64]:
    return np.empty(0, dtype=np.int64)


def assign_pooled_folds(labels: npt.NDArray, groups: npt.NDArray | None, *, n_folds: int,
                        seed: int) -> tuple[npt.NDArray[np.int8] | None, str | None]:
    """Return each cell's test-fold number (0..k-1) for one category value, or None and the reason.

    Stratified by label; grouped by ``groups`` when given (StratifiedGroupKFold), so a
    group lands in exactly one test fold.
    """
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

    labels = np.asarray(labels)
    n_pos = int(labels.sum())
    if n_pos in (0, labels.size):
        return None, f"only {'sensitive' if n_pos else 'resistant'} cells"
    assignment = np.full(labels.size, -1, dtype=np.int8)
    if groups is None:
        smaller = min(n_pos, labels.size - n_pos)
        if smaller < n_folds:
            return None, f"the smaller class has {smaller} cells, fewer than {n_folds} folds"
        splitter = StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed)
        parts = splitter.split(np.zeros(labels.size), labels)
    else:
        n_groups = np.unique(groups).size
        if n_groups < n_folds:
            return None, f"{n_groups} samples, fewer than {n_folds} folds (use fewer folds or --split cell)"
        larger = max(n_pos, labels.size - n_pos)
        if larger < n_folds:  # StratifiedGroupKFold refuses when every class is smaller than k
            return None, f"{labels.size} cells ({n_pos} sensitive), too few to stratify {n_folds} folds"
        splitter = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
        with warnings.catch_warnings():  # the least-populated-class warning is reported per fold instead
            warnings.simplefilter("ignore", UserWarning)
            parts = list(splitter.split(np.zeros(labels.size), labels, groups))
    for number, (_, test) in enumerate(parts):
        assignment[test] = number
    return assignment, None


def split_pooled(obs: pd.DataFrame, labels: npt.NDArray, *, category_column: str, category: str,
                 sample_column: str | None, split: SplitPolicy = "sample", n_folds: int = 10, seed: int = 0,
                 assignment: npt.NDArray[np.int8] | None = None) -> list[Fold]:
    """Return the k folds of every value of ``category_column`` (pooled scenario).

    Parameters
    ----------
    obs
        Cell metadata.
    labels
        1 = sensitive, 0 = resistant, per cell.
    category_column, category
        The obs column and the category kind it holds (``tissue``...).
    sample_column
        The patient/sample column that groups cells when ``split="sample"``.
    assignment
        Saved test-fold numbers per cell (-1 where unassigned), to reuse a run's folds.

    Raises
    ------
    SplitError
        When a grouped split is asked for but the sample column is missing.
    """
    if category_column not in obs:
        msg = f"obs has no column {category_column!r} for category {category!r}; name it with --{category.replace('_', '-')}-key."
        raise SplitError(msg)
    if split == "sample" and (sample_column is None or sample_column not in obs):
        msg = (f"obs has no sample column {sample_column!r}, so a patient-grouped split is impossible. "
               "Name it with --sample-key, or use --split cell.")
        raise SplitError(msg)
    folds: list[Fold] = []
    values = obs[category_column].astype(str).to_numpy()
    for value in sorted(np.unique(values)):
        rows = np.flatnonzero(values == value)
        local: npt.NDArray[np.int8] | None
        groups = obs[sample_column].astype(str).to_numpy()[rows] if split == "sample" else None
        if assignment is not None and (assignment[rows] >= 0).any():
            local, reason = assignment[rows], None
        else:  # no saved folds, or none could be formed: the reason is the same as when the run began
            local, reason = assign_pooled_folds(labels[rows], groups, n_folds=n_folds, seed=seed)
            if assignment is not None and reason is None:
                reason = "no fold could be formed (see saved splits)"
        if reason is not None or local is None:
            folds.append(Fold("pooled", category, value, "all", split, _empty(), _empty(), skipped=reason))
            continue
        for number in range(n_folds):
            test = rows[local == number]
            train = rows[(local != number) & (local >= 0)]
            folds.append(Fold("pooled", category, value, str(number), split, train, test))
    return folds


def split_cross_study(obs: pd.DataFrame, labels: npt.NDArray, *, category_column: str, category: str,
                      study_column: str) -> list[Fold]:
    """Return leave-one-study-out folds within every value of ``category_column``."""
    for column in (category_column, study_column):
        if column not in obs:
            msg = f"obs has no column {column!r}, needed by the cross-study scenario."
            raise SplitError(msg)
    folds: list[Fold] = []
    values = obs[category_column].astype(str).to_numpy()
    studies = obs[study_column].astype(str).to_numpy()
    for value in sorted(np.unique(values)):
        rows = np.flatnonzero(values == value)
        present = sorted(np.unique(studies[rows]))
        if len(present) < 2:
            folds.append(Fold("cross", category, value, "all", "sample", _empty(), _empty(),
                              skipped=f"only one study ({present[0]}); leave-one-study-out needs two or more"))
            continue
        for study in present:
            test = rows[studies[rows] == study]
            train = rows[studies[rows] != study]
            reason = None
            if np.unique(labels[train]).size < 2:
                reason = "the training studies hold one class only"
            folds.append(Fold("cross", category, value, study, "sample", train, test, skipped=reason))
    return folds



def permute_labels(labels: npt.NDArray, values: npt.NDArray, groups: npt.NDArray | None,
                   rng: np.random.Generator) -> npt.NDArray:
    """Return labels shuffled within each category value, at the level of the split's groups.

    With ``groups`` (the samples of a patient-grouped split) each sample takes the label of another
    sample of its value (the label of most of that sample's cells), so every cell of a sample keeps
    sharing one label, as real per-patient labels do; without (a cell-level split), cell labels are
    shuffled. Folds stay as they are: this is the null distribution of the benchmark's own
    procedure when labels carry no information.
    """
    permuted = np.asarray(labels).copy()
    for value in np.unique(values):
        rows = np.flatnonzero(values == value)
        if groups is None:
            permuted[rows] = rng.permutation(permuted[rows])
            continue
        names, position = np.unique(groups[rows], return_inverse=True)
        share = np.bincount(position, weights=labels[rows].astype(np.float64)) / np.bincount(position)
        sample_labels = (share >= 0.5).astype(permuted.dtype)
        permuted[rows] = rng.permutation(sample_labels)[position]
    return permuted


def split_external(obs: pd.DataFrame, labels: npt.NDArray, *, category_column: str, category: str,
                   origin: npt.NDArray[np.bool_]) -> list[Fold]:
    """Return one fold per category value: train on its cells of the data, test on its cells of the test file.

    Parameters
    ----------
    obs, labels
        Cells of both files (``origin`` True for the test file's cells) and their labels.
    category_column, category
        The obs column and the category kind it holds.

    Values present in one file only, or whose training cells hold one class, are returned skipped
    with the reason.
    """
    if category_column not in obs:
        msg = f"obs has no column {category_column!r} for category {category!r}; name it with --{category.replace('_', '-')}-key."
        raise SplitError(msg)
    values = obs[category_column].astype(str).to_numpy()
    folds = []
    for value in sorted(np.unique(values)):
        train = np.flatnonzero((values == value) & ~origin)
        test = np.flatnonzero((values == value) & origin)
        reason = None
        if not train.size:
            reason = "only in --test-data: no training cells of this value in --data"
        elif not test.size:
            reason = "only in --data: the test file has no cells of this value"
        elif np.unique(labels[train]).size < 2:
            reason = f"the training cells hold only {'sensitive' if labels[train][0] else 'resistant'} cells"
        if reason is not None:
            folds.append(Fold("external", category, value, "test", "sample", _empty(), _empty(), skipped=reason))
        else:
            folds.append(Fold("external", category, value, "test", "sample", train, test))
    return folds
