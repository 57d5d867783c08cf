"""What a head carries so its predictions can be trusted: calibration, conformal sets, an OOD reference.

`fit_trust` fits the three on a head's inner validation split (calibration and conformal sets)
and its training embeddings (the out-of-distribution reference); `TrustKit.apply` turns raw
probabilities and embeddings of new cells into calibrated probabilities, prediction sets and
flags. A kit travels inside the head bundle: arrays under ``calibration.``, ``conformal.`` and
``ood.`` in the safetensors file, settings under ``meta["trust"]``.

The inner validation split also drives the head's early stopping, so its cells are not fully
unseen: the conformal guarantee holds for exchangeable cells up to that mild selection (the
benchmark's per-fold coverage measures it on truly held-out cells).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from scdrugmap.train._trust import join_state, split_state
from scdrugmap.train.calibration import PlattCalibrator, calibration_metrics
from scdrugmap.train.conformal import ALPHA, MondrianConformal, coverage
from scdrugmap.train.ood import OutOfDistributionDetector

if TYPE_CHECKING:
    import numpy.typing as npt

log = logging.getLogger(__name__)

PARTS = ("calibration", "conformal", "ood")
#: Validation logits are clipped to this magnitude for the Platt fit (far beyond any calibrated use).
LOGIT_LIMIT = 1e4


@dataclass
class TrustedPrediction:
    """Per cell: raw and calibrated P(sensitive), the conformal set, and the out-of-distribution verdict."""

    raw: npt.NDArray[np.float32]
    calibrated: npt.NDArray[np.float32]
    prediction_set: npt.NDArray[np.object_]  # sensitive / resistant / uncertain / none; None for unreadable cells
    ood_score: npt.NDArray[np.float32]
    ood: npt.NDArray[np.bool_]
    ood_reason: npt.NDArray[np.object_]


@dataclass
class TrustKit:
    """A fitted calibrator, conformal predictor and OOD detector (each may be None: an older head)."""

    calibrator: PlattCalibrator | None = None
    conformal: MondrianConformal | None = None
    detector: OutOfDistributionDetector | None = None

    # --- bundle state ------------------------------------------------------------------------------------

    def to_bundle(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Return (arrays for the safetensors file, settings for ``meta["trust"]``)."""
        arrays: dict[str, np.ndarray] = {}
        facts: dict[str, Any] = {}
        for prefix, part in zip(PARTS, (self.calibrator, self.conformal, self.detector), strict=True):
            if part is None:
                continue
            part_arrays, part_facts = split_state(part.state(), prefix)
            arrays.update(part_arrays)
            facts.update(part_facts)
        return arrays, facts

    @classmethod
    def from_bundle(cls, tensors: dict[str, np.ndarray], facts: dict[str, Any] | None) -> TrustKit:
        """Rebuild the kit a head bundle holds (parts it lacks stay None)."""
        facts = facts or {}

        def part(prefix: str, kind: Any) -> Any:
            if not any(k.startswith(f"{prefix}.") for k in (*tensors, *facts)):
                return None
            return kind.from_state(join_state(tensors, facts, prefix))

        return cls(part("calibration", PlattCalibrator), part("conformal", MondrianConformal),
                   part("ood", OutOfDistributionDetector))

    @property
    def complete(self) -> bool:
        return self.calibrator is not None and self.conformal is not None and self.detector is not None

    # --- applying ------------------------------------------------------------------------------------------

    def apply(self, logits: npt.ArrayLike, embeddings: npt.ArrayLike | None, *, alpha: float | None = None,
              gene_overlap: float | npt.ArrayLike | None = None) -> TrustedPrediction:
        """Calibrate the head's ``logits``, build prediction sets at ``alpha``, and flag cells far from training."""
        from scdrugmap.train.bundle import sigmoid

        logits = np.asarray(logits, dtype=np.float64)
        raw = sigmoid(logits).astype(np.float64)
        readable = ~np.isnan(logits)
        if self.calibrator is None:
            calibrated = raw.copy()
        else:
            scores = logits if self.calibrator.score_kind == "logit" else raw
            calibrated = np.full(raw.shape[0], np.nan)
            calibrated[readable] = self.calibrator.transform(scores[readable])
        sets = np.full(raw.shape[0], None, dtype=object)
        if self.conformal is not None:
            conformal = self.conformal
            if alpha is not None and alpha != conformal.alpha:
                conformal = MondrianConformal.from_state({**conformal.state(), "alpha": float(alpha)})
            sets[readable] = conformal.predict(calibrated[readable])
        score = np.full(raw.shape[0], np.nan, dtype=np.float32)
        flagged = np.zeros(raw.shape[0], dtype=bool)
        reason = np.full(raw.shape[0], "", dtype=object)
        if self.detector is not None and embeddings is not None and np.asarray(embeddings).shape[1]:
            verdict = self.detector.score_cells(embeddings, gene_overlap=gene_overlap)
            score, flagged, reason = verdict.score.astype(np.float32), verdict.flagged, verdict.reason
        return TrustedPrediction(raw.astype(np.float32), calibrated.astype(np.float32), sets, score, flagged, reason)


@contextmanager
def _fallbacks_at_debug(quiet: bool) -> Iterator[None]:
    """Lower the calibration and conformal fallback warnings to debug (the benchmark records them per fold)."""
    loggers = [logging.getLogger(f"scdrugmap.train.{name}") for name in ("calibration", "conformal")]
    levels = [logger.level for logger in loggers]
    if quiet:
        for logger in loggers:
            logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def fit_trust(val_logits: npt.ArrayLike, val_labels: npt.ArrayLike,
              train_embeddings: npt.ArrayLike | None, *, alpha: float = ALPHA, seed: int = 0,
              quiet: bool = False) -> TrustKit:
    """Fit calibration (Platt, on the head's logits) and conformal sets on the validation cells, and the
    OOD reference on the training cells.

    Fallbacks are explicit, never a crash: too few validation cells of a class give an identity
    calibration and conformal sets that always hold that class, each with its reason in the state.
    """
    p = np.clip(np.asarray(val_logits, dtype=np.float64), -LOGIT_LIMIT, LOGIT_LIMIT)
    y = np.asarray(val_labels)
    keep = ~np.isnan(p)
    with _fallbacks_at_debug(quiet):  # a fold's fallback is stored in its row (trust_reason), not logged
        calibrator = PlattCalibrator(score_kind="logit").fit(p[keep], y[keep])
        calibrated = calibrator.transform(p[keep])
        conformal = MondrianConformal(alpha=alpha).fit(calibrated, y[keep])
    detector = None
    if train_embeddings is not None and np.asarray(train_embeddings).shape[1]:
        detector = OutOfDistributionDetector(seed=seed).fit(train_embeddings)
    return TrustKit(calibrator, conformal, detector)


def fold_trust_metrics(test_labels: npt.ArrayLike, test_logits: npt.ArrayLike, kit: TrustKit) -> dict[str, Any]:
    """Return one fold's Brier and ECE before and after calibration, the coverage and set size of its sets,
    and (under ``calibrated``) the test cells' calibrated probabilities."""
    y = np.asarray(test_labels)
    trusted = kit.apply(test_logits, None)
    raw = trusted.raw.astype(np.float64)
    metrics: dict[str, Any] = {}
    calibration = calibration_metrics(y, raw, trusted.calibrated)
    metrics.update({k: v for k, v in calibration.items() if k not in {"n_cells", "reason"}})
    readable = ~np.isnan(raw)
    if kit.conformal is not None and readable.any():
        sets = kit.conformal.predict_sets(trusted.calibrated[readable])
        measured = coverage(y[readable], sets)
        metrics.update({k: v for k, v in measured.items() if k.startswith(("coverage", "mean_set_size", "share_"))})
    reasons = [str(r) for r in (calibration.get("reason"), getattr(kit.calibrator, "reason_", ""),
                                getattr(kit.conformal, "reason_", "")) if r]
    metrics["trust_reason"] = "; ".join(reasons)
    metrics["calibrated"] = trusted.calibrated
    return metrics
