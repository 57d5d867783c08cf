"""The one JSON sanitiser of reports and the web server: `make_json_safe`.

Results hold NaN (a metric that could not be computed), pandas NA, and numpy scalars and
arrays; JSON has none of them, and a browser's ``JSON.parse`` refuses the ``NaN`` that
Python's ``json`` writes. The web API (result rows, catalog facts, check reports), the
pages' embedded plotly figures and the HTML report's config dump all go through here.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd


def make_json_safe(value: Any) -> Any:
    """Return ``value`` with only JSON types inside: NaN, inf, NA and NaT become None.

    Mappings become dicts with string keys; lists, tuples, sets and numpy arrays become lists
    (recursively); numpy scalars become the Python scalar they hold. Strings, bools, ints, finite
    floats and other objects (datetimes, for example) are returned as they are.

    Examples
    --------
    >>> make_json_safe({"f1": np.float32(0.5), "auroc": float("nan"), "n": np.int64(3), "folds": np.array([1.0, np.inf])})
    {'f1': 0.5, 'auroc': None, 'n': 3, 'folds': [1.0, None]}
    """
    if value is None or isinstance(value, str | bool):
        return value
    if isinstance(value, Mapping):
        return {str(key): make_json_safe(item) for key, item in value.items()}
    if isinstance(value, list | tuple | set | frozenset | np.ndarray):
        return [make_json_safe(item) for item in (value.tolist() if isinstance(value, np.ndarray) else value)]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is pd.NA or value is pd.NaT:
        return None
    return value
