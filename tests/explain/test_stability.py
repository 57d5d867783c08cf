"""Stability of top-k genes across folds and resamples, and the label-permutation null."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("scanpy")
pytest.importorskip("pydeseq2")

from explain_helpers import DE_COLLECTION, NULL_COLLECTION, planted, simulated  # noqa: E402

from scdrugmap.explain.de import label_groups  # noqa: E402
from scdrugmap.explain.stability import (  # noqa: E402
    bootstrap_stability,
    cross_validation_stability,
    de_ranking,
    jaccard_index,
    permute_labels,
    top_k_stability,
)


def test_jaccard_and_top_k_frequency_by_hand():
    assert jaccard_index(["A", "B"], ["B", "C"]) == pytest.approx(1 / 3)
    assert np.isnan(jaccard_index([], []))
    result = top_k_stability({"f0": ["A", "B", "C"], "f1": ["B", "A", "D"], "f2": ["E", "F", "A"]}, k=2)
    assert result.rankings == {"f0": ["A", "B"], "f1": ["B", "A"], "f2": ["E", "F"]}
    assert result.jaccard.loc["f0", "f1"] == 1.0 and result.jaccard.loc["f0", "f2"] == 0.0
    assert result.jaccard_mean == pytest.approx(1 / 3)
    assert result.frequency.to_dict() == {"A": 2 / 3, "B": 2 / 3, "E": 1 / 3, "F": 1 / 3}
    assert result.frequency.name == "stability" and result.frequency.index.name == "gene"


def test_per_sample_labels_are_permuted_across_samples_within_studies_and_balanced():
    rng = np.random.default_rng(0)
    samples = np.repeat([f"P{i}" for i in range(40)], 5)
    truth = np.repeat(np.where(np.arange(40) % 2, "sensitive", "resistant"), 5).astype(object)
    studies = np.repeat([f"S{i // 10}" for i in range(40)], 5)
    truth[:3] = None
    for i in range(20):
        shuffled = permute_labels(truth, samples=samples, within=studies, rng=np.random.default_rng([0, i]))
        frame = pd.DataFrame({"sample": samples, "study": studies, "shuffled": shuffled, "truth": truth})[3:]
        assert frame.groupby("sample")["shuffled"].nunique().max() == 1  # still one label per sample
        per_sample = frame.groupby("sample").first()
        resistant = per_sample.assign(shuffled=per_sample["shuffled"] == "resistant",
                                      truth=per_sample["truth"] == "resistant").groupby("study")[["shuffled", "truth"]]
        assert (resistant.sum()["shuffled"] == resistant.sum()["truth"]).all()  # each study keeps its count
        agreement = (per_sample["shuffled"] == per_sample["truth"]).mean()
        assert abs(agreement - 0.5) <= 0.1  # balanced: uncorrelated with the truth
        assert shuffled[0] is None
    cells = np.array(["sensitive", "resistant"] * 50, dtype=object)
    shuffled = permute_labels(cells, samples=np.repeat(["A", "B"], 50), within=np.repeat(["A", "B"], 50), rng=rng,
                              balanced=False)
    assert (shuffled[:50] == "resistant").sum() == 25 and not np.array_equal(shuffled, cells)


def test_top_genes_are_stable_across_folds_and_bootstrap_resamples_and_reproducible():
    collection = simulated(*DE_COLLECTION)
    rank = de_ranking(10, test="wilcoxon")  # pseudobulk is tested in test_de; fast here
    folds = cross_validation_stability(collection, rank, n_folds=3, k=10, seed=0)
    assert list(folds.rankings) == ["fold0", "fold1", "fold2"]
    assert folds.jaccard_mean >= 0.4
    assert folds.frequency.index[0] in planted(collection)
    resamples = bootstrap_stability(collection, rank, n_resamples=2, k=10, seed=0)
    assert resamples.jaccard_mean >= 0.3 and len(resamples.rankings) == 2
    again = bootstrap_stability(collection, rank, n_resamples=2, k=10, seed=0)
    assert again.rankings == resamples.rankings
    pd.testing.assert_series_equal(again.frequency, resamples.frequency)


def test_a_bootstrap_resample_keeps_a_sample_drawn_twice_as_two_samples():
    from scdrugmap.explain.stability import _resample_groups

    collection = simulated(*NULL_COLLECTION)[:, :5].copy()
    groups = collection.obs["sample"].astype(str).to_numpy()
    resample = _resample_groups(collection, groups, "sample", "response", np.random.default_rng(1))
    names = resample.obs["sample"].astype(str)
    assert names.str.contains("#").any() and resample.obs_names.is_unique
    assert resample.obs.groupby("sample", observed=True)["response"].nunique().max() == 1
    sizes = pd.Series(groups).value_counts()
    copies = names.str.split("#").str[0].value_counts()
    assert all(copies[name] % sizes[name] == 0 for name in copies.index)
    original = label_groups(collection)
    assert set(original) == set(label_groups(resample))
