import datetime as dt
import json
import math

import numpy as np
import pandas as pd

from scdrugmap.report.serialise import make_json_safe


def test_json_safe_turns_nan_inf_and_missing_values_into_null():
    found = make_json_safe({"nan": float("nan"), "inf": np.float32(np.inf), "ninf": -math.inf, "na": pd.NA,
                            "nat": pd.NaT, "none": None, "datetime64_nat": np.datetime64("NaT")})
    assert found == dict.fromkeys(("nan", "inf", "ninf", "na", "nat", "none", "datetime64_nat"))


def test_json_safe_makes_numpy_values_plain_python_and_keeps_the_rest():
    when = dt.datetime(2024, 1, 2, 3, 4)
    found = make_json_safe({1: np.int64(3), "f": np.float32(0.5), "b": np.bool_(True), "s": "NaN", "t": (1, 2.5),
                            "a": np.array([[1.0, np.nan], [np.inf, 2.0]]), "nested": [{"x": np.float64("nan")}],
                            "when": when})
    assert found == {"1": 3, "f": 0.5, "b": True, "s": "NaN", "t": [1, 2.5], "a": [[1.0, None], [None, 2.0]],
                     "nested": [{"x": None}], "when": when}
    assert type(found["1"]) is int and type(found["f"]) is float and type(found["b"]) is bool


def test_json_safe_frame_rows_parse_as_strict_json():
    frame = pd.DataFrame({"model": ["pca", None], "f1": [0.5, np.nan], "n": pd.array([1, None], dtype="Int64")})
    rows = [make_json_safe(row) for row in frame.to_dict("records")]
    assert rows == [{"model": "pca", "f1": 0.5, "n": 1}, {"model": None, "f1": None, "n": None}]
    assert json.loads(json.dumps(rows, allow_nan=False)) == rows
