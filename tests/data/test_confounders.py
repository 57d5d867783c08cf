"""Labels that coincide with samples, cell lines or sublines are named, in `check` and the report."""

import numpy as np
import pandas as pd

from scdrugmap.data.check import check_adata
from scdrugmap.data.confounders import label_coincidences
from scdrugmap.data.schema import ObsKeys
from tests_helpers import make_adata


def test_per_sample_labels_are_named_as_coinciding_with_samples():
    adata = make_adata(n_cells=80, n_samples=8, n_studies=3)  # studies and data sets hold both labels
    labels = (adata.obs["response"] == "sensitive").to_numpy()
    found = label_coincidences(adata.obs, labels, ObsKeys())
    assert [(c.column, c.kind, c.n_values) for c in found] == [("sample", "sample", 8)]
    assert "P0: resistant" in found[0].message() and "--split sample" in found[0].message()


def test_a_subline_column_whose_values_hold_one_label_each_is_named():
    obs = pd.DataFrame({"sample": ["line_A"] * 6, "subline": ["A1", "A1", "A2", "A2", "A3", "A3"]})
    labels = np.array([1, 1, 0, 0, 1, 1])
    found = label_coincidences(obs, labels, ObsKeys())
    assert [(c.column, c.kind) for c in found] == [("subline", "subline")]
    assert label_coincidences(obs.assign(subline="A1"), labels, ObsKeys()) == []  # one value: nothing to say


def test_check_warns_where_labels_coincide_with_samples():
    report = check_adata(make_adata(n_cells=80, n_samples=8, n_studies=3), source="d.h5ad", n_folds=2)
    warnings = [str(p) for p in report.problems if "labels coincide with samples" in str(p)]
    assert len(warnings) == 1 and "obs['sample']" in warnings[0]


def test_text_codes_equal_factorizing_the_text_of_every_cell():
    from scdrugmap.data.confounders import text_codes

    rng = np.random.default_rng(0)
    picks = rng.integers(0, 5, 400)
    columns = {
        "categorical": pd.Categorical(np.array(["b", "a", "c", "a b", "Z"])[picks]),
        "unused and NaN": pd.Categorical(np.array(["x", "y", None, "x", "y"], dtype=object)[picks],
                                         categories=["y", "x", "never"]),
        "numbers as categories": pd.Categorical(np.array([1.5, 2.0, 10.0, np.nan, 2.0])[picks]),
        "texts that collide": pd.Categorical(np.array([1, "1", "2", 2, "x"], dtype=object)[picks]),
        "object with None and NaN": np.array(["s1", None, np.nan, "s2", "s1"], dtype=object)[picks],
        "floats": np.array([0.5, 1.0, np.nan, 3.0, 1.0])[picks],
        "integers": picks * 7,
    }
    for name, values in columns.items():
        series = pd.Series(values)
        codes, names = text_codes(series)
        expected_codes, expected_names = pd.factorize(series.astype(str).to_numpy(), sort=True)
        assert names.tolist() == list(expected_names), name
        np.testing.assert_array_equal(codes, expected_codes, err_msg=name)
