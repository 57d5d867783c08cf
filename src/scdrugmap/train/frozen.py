"""The frozen strategy: a head trained on cached cell embeddings, one per fold.

Each fold's training cells are split again into fit and validation cells (grouped
by sample where possible) for early stopping and for the fold's calibration and conformal
sets; the test cells are only predicted. Each fold's info carries, under ``trust``, its
Brier score and ECE before and after calibration, and its sets' coverage and size.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from scdrugmap.train.heads import HeadConfig, LogisticHead, RowsOnDisk, fit_mlp_heads, predict_mlp_heads
from scdrugmap.train.trust import fit_trust, fold_trust_metrics
from scdrugmap.train.validation import inner_validation_split

if TYPE_CHECKING:
    import numpy.typing as npt

    from scdrugmap.models.cache import EmbeddingFile

log = logging.getLogger(__name__)


@dataclass
class FoldPrediction:
    """Probability of sensitivity for one fold's test cells, with training facts.

    ``head`` is the fold's trained head as the tensors of a frozen head bundle (`scdrugmap.train.bundle.Head`:
    ``0.weight`` ... ``4.bias`` of an MLP; ``mean``, ``scale``, ``coef``, ``intercept`` of a logistic head),
    when `fit_predict_frozen` was asked for it (``return_heads``), else None.
    """

    probability: npt.NDArray[np.float32]
    info: dict[str, Any] = field(default_factory=dict)
    head: dict[str, npt.NDArray[np.float32]] | None = None


def fit_predict_frozen(embeddings: npt.NDArray[np.float32] | EmbeddingFile, labels: npt.NDArray, groups: npt.NDArray | None,
                       folds: list[tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]], *, head: str = "mlp",
                       config: HeadConfig | None = None, device: str = "cpu",
                       return_heads: bool = False) -> list[FoldPrediction]:
    """Train a head per (train, test) fold and predict its test cells.

    A zero-width embedding (the majority reference) predicts the training prior (and has no head).
    With ``return_heads`` each fold's trained head comes back in `FoldPrediction.head` (a benchmark
    keeps only the predictions; `scdrugmap.evaluate.refit` retrains the folds to explain them).
    """
    config = config or HeadConfig()
    results: list[FoldPrediction] = []
    if embeddings.shape[1] == 0:
        for train, test in folds:
            prior = float(labels[train].mean())
            results.append(FoldPrediction(np.full(test.size, prior, dtype=np.float32), {"prior": prior}))
        return results
    fits = []
    for train, _ in folds:
        fit, val = inner_validation_split(labels[train], None if groups is None else groups[train],
                                          fraction=config.val_fraction, seed=config.seed)
        fits.append((train[fit], train[val]))
    if head == "logistic":  # fitted on the fit cells, as `fit_head` does, so the validation cells calibrate it
        for (fit, val), (_, test) in zip(fits, folds, strict=True):
            logistic = LogisticHead.fit(embeddings[fit], labels[fit], seed=config.seed)
            kit = fit_trust(logistic.decision_function(embeddings[val]), labels[val], None, seed=config.seed,
                            quiet=True)
            trust = fold_trust_metrics(labels[test], logistic.decision_function(embeddings[test]), kit)
            state = ({"mean": logistic.mean, "scale": logistic.scale, "coef": logistic.coef,
                      "intercept": np.array([logistic.intercept])} if return_heads else None)
            results.append(FoldPrediction(logistic.predict_proba(embeddings[test]),
                                          {"n_fit": int(fit.size), "n_val": int(val.size), "trust": trust}, state))
        return results
    import torch

    # embeddings left on disk (the runner's cache file) are read a batch of rows at a time
    X = (torch.as_tensor(embeddings, dtype=torch.float32, device=device) if isinstance(embeddings, np.ndarray)
         else RowsOnDisk(embeddings, device))
    y = torch.as_tensor(labels, dtype=torch.float32, device=device)
    model, records = fit_mlp_heads(X, y, fits, config)
    tests_logits = predict_mlp_heads(model, X, [test for _, test in folds], logits=True)
    # the sigmoid of those logits is what predict_mlp_heads returns without logits=True: test cells are read once
    probabilities = [torch.sigmoid(torch.from_numpy(values)).numpy() for values in tests_logits]
    vals_logits = predict_mlp_heads(model, X, [val for _, val in fits], logits=True)
    for index, (probability, record, (fit, val)) in enumerate(zip(probabilities, records, fits, strict=True)):
        kit = fit_trust(vals_logits[index], labels[val], None, seed=config.seed, quiet=True)
        trust = fold_trust_metrics(labels[folds[index][1]], tests_logits[index], kit)
        state = ({name: tensor.numpy() for name, tensor in model.head_state(index).items()} if return_heads
                 else None)
        results.append(FoldPrediction(probability, {**record, "n_fit": int(fit.size), "n_val": int(val.size),
                                                    "trust": trust}, state))
    return results
