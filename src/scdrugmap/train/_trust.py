"""Helpers shared by the trust modules (calibration, conformal, ood): labels, probabilities, saved state.

A fitted trust object keeps its state as a flat dict, `State`: numpy arrays, which go into a head
bundle's safetensors file, and floats, ints and strings, which go into its JSON. `split_state` and
`join_state` do that split under a key prefix, so one bundle can hold several objects.
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any

import numpy as np

from scdrugmap.data import schema
from scdrugmap.errors import CheckpointError, SchemaError

if TYPE_CHECKING:
    from collections.abc import Iterable

    import numpy.typing as npt

#: A trust object's fitted state: arrays (safetensors) and JSON-able scalars.
State = dict[str, np.ndarray | float | int | str]

#: Positions of the two classes in every (cells x 2) array: 0 resistant, 1 sensitive (the positive class).
CLASS_NAMES: tuple[str, str] = (schema.RESISTANT, schema.SENSITIVE)


class NotFittedError(ValueError, AttributeError):
    """A trust object was used before `fit` (the bases of scikit-learn's ``NotFittedError``)."""


class Estimator:
    """The part of scikit-learn's ``BaseEstimator`` the trust objects use, without importing scikit-learn.

    ``__init__`` only stores its keyword arguments, so `get_params` and `set_params` read and write them
    (scikit-learn's ``clone`` works on these objects); `check_fitted` plays ``check_is_fitted``.
    Predicting with a saved head then needs no scikit-learn import (about a second on a busy 2-core machine).
    """

    @classmethod
    def _param_names(cls) -> list[str]:
        parameters = inspect.signature(cls.__init__).parameters.values()
        return sorted(p.name for p in parameters if p.name != "self" and p.kind == p.KEYWORD_ONLY)

    def get_params(self, deep: bool = True) -> dict[str, Any]:
        """Return the constructor's keyword arguments as set on this object."""
        return {name: getattr(self, name) for name in self._param_names()}

    def set_params(self, **params: Any) -> Estimator:
        """Set constructor arguments; an unknown name raises ``ValueError`` naming the valid ones."""
        valid = self._param_names()
        for name, value in params.items():
            if name not in valid:
                msg = f"{name!r} is not a parameter of {type(self).__name__}; valid ones: {valid}."
                raise ValueError(msg)
            setattr(self, name, value)
        return self

    def __repr__(self) -> str:
        defaults = {p.name: p.default for p in inspect.signature(type(self).__init__).parameters.values()}
        changed = [f"{name}={value!r}" for name, value in self.get_params().items() if value != defaults.get(name)]
        return f"{type(self).__name__}({', '.join(changed)})"


def check_fitted(estimator: Estimator, attribute: str) -> None:
    """Refuse an estimator without ``attribute`` (set by its `fit`), as scikit-learn's ``check_is_fitted``."""
    if not hasattr(estimator, attribute):
        msg = (f"This {type(estimator).__name__} instance is not fitted yet. Call 'fit' with appropriate arguments "
               "before using this estimator.")
        raise NotFittedError(msg)


def binary_labels(labels: npt.ArrayLike, *, name: str = "labels") -> npt.NDArray[np.int8]:
    """Return labels as an int8 vector of 1 (sensitive) and 0 (resistant).

    Numbers and booleans must be 0 or 1; text goes through `scdrugmap.data.schema.encode_labels`.
    """
    values = np.asarray(labels).reshape(-1)
    if values.dtype.kind in "biuf":
        bad = values[~np.isin(values, (0, 1))]
        if bad.size:
            msg = f"{name} has {np.unique(bad)[:3].tolist()}; expected 1 (sensitive) or 0 (resistant)."
            raise SchemaError(msg)
        return values.astype(np.int8)
    return schema.encode_labels(values, source=name)


def probability_vector(probabilities: npt.ArrayLike, *, name: str = "probabilities") -> npt.NDArray[np.float64]:
    """Return P(sensitive) per cell as float64; NaN (an unscored cell) is kept, anything else outside [0, 1] refused."""
    values = np.asarray(probabilities, dtype=np.float64).reshape(-1)
    finite = values[np.isfinite(values)]
    bad = finite[(finite < 0.0) | (finite > 1.0)]
    if bad.size or np.isinf(values).any():
        shown = (bad.tolist() + values[np.isinf(values)].tolist())[:3]
        msg = f"{name} has {shown}; expected probabilities of 'sensitive' in [0, 1] (NaN for an unscored cell)."
        raise SchemaError(msg)
    return values


def check_lengths(labels: np.ndarray, values: np.ndarray, *, what: str = "probabilities") -> None:
    if labels.shape[0] != values.shape[0]:
        msg = f"labels has {labels.shape[0]} cells but {what} has {values.shape[0]}; pass one value per cell."
        raise SchemaError(msg)


def require_keys(state: State, keys: Iterable[str], owner: str) -> None:
    """Refuse a saved state that lacks one of ``keys``, naming each missing one."""
    missing = [key for key in keys if key not in state]
    if missing:
        msg = f"{owner} state lacks {missing}; it has {sorted(state)}. Save it again with {owner}.state()."
        raise CheckpointError(msg)


def split_state(state: State, prefix: str) -> tuple[dict[str, np.ndarray], dict[str, float | int | str]]:
    """Split a state into (arrays for safetensors, scalars for JSON), every key prefixed ``prefix.``."""
    arrays = {f"{prefix}.{k}": np.ascontiguousarray(v) for k, v in state.items() if isinstance(v, np.ndarray)}
    facts = {f"{prefix}.{k}": v for k, v in state.items() if not isinstance(v, np.ndarray)}
    return arrays, facts


def join_state(arrays: dict[str, np.ndarray], facts: dict[str, float | int | str], prefix: str) -> State:
    """Gather the entries under ``prefix.`` from a bundle's arrays and JSON facts back into one state."""
    start = f"{prefix}."
    state: State = {k[len(start):]: np.asarray(v) for k, v in arrays.items() if k.startswith(start)}
    state.update({k[len(start):]: v for k, v in facts.items() if k.startswith(start)})
    return state
