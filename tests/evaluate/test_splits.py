import numpy as np
import pandas as pd
import pytest

from scdrugmap.data.schema import encode_labels
from scdrugmap.errors import SplitError
from scdrugmap.evaluate.splits import split_cross_study, split_pooled


def _obs(n_samples=20, cells_per_sample=6, seed=0):
    rng = np.random.default_rng(seed)
    samples = np.repeat([f"S{i}" for i in range(n_samples)], cells_per_sample)
    label_of = {f"S{i}": i % 2 for i in range(n_samples)}
    obs = pd.DataFrame({"sample": samples, "tissue": rng.choice(["a", "b"], n_samples)[np.arange(samples.size) // cells_per_sample],
                        "study": [f"G{int(s[1:]) % 3}" for s in samples]})
    labels = np.array([label_of[s] for s in samples])
    return obs, labels


def test_pooled_split_keeps_each_sample_in_one_fold():
    obs, labels = _obs()
    folds = split_pooled(obs, labels, category_column="tissue", category="tissue", sample_column="sample",
                         n_folds=3, seed=1)
    scored = [f for f in folds if f.skipped is None]
    assert scored
    for fold in scored:
        train_samples = set(obs["sample"].iloc[fold.train])
        test_samples = set(obs["sample"].iloc[fold.test])
        assert not train_samples & test_samples
    for value in {f.value for f in scored}:
        tests = np.concatenate([f.test for f in scored if f.value == value])
        assert np.unique(tests).size == tests.size == (obs["tissue"] == value).sum()


def test_cell_split_mixes_samples_and_is_stratified():
    obs, labels = _obs()
    folds = split_pooled(obs, labels, category_column="tissue", category="tissue", sample_column="sample",
                         split="cell", n_folds=3, seed=0)
    fold = next(f for f in folds if f.skipped is None)
    assert set(obs["sample"].iloc[fold.train]) & set(obs["sample"].iloc[fold.test])
    assert 0 < labels[fold.test].mean() < 1


def test_unformable_value_is_listed_with_reason():
    obs, labels = _obs(n_samples=4)
    obs["tissue"] = "a"
    folds = split_pooled(obs, labels, category_column="tissue", category="tissue", sample_column="sample", n_folds=10)
    assert all(f.skipped and "fewer than 10 folds" in f.skipped for f in folds)
    one_class = split_pooled(obs, np.zeros_like(labels), category_column="tissue", category="tissue",
                             sample_column="sample", n_folds=2)
    assert all("only resistant" in f.skipped for f in one_class)


def test_grouped_split_without_sample_column_is_an_error():
    obs, labels = _obs()
    with pytest.raises(SplitError, match="--sample-key"):
        split_pooled(obs.drop(columns="sample"), labels, category_column="tissue", category="tissue",
                     sample_column="sample", n_folds=3)


def test_cross_study_leaves_one_study_out():
    obs, labels = _obs()
    folds = split_cross_study(obs, labels, category_column="tissue", category="tissue", study_column="study")
    for fold in folds:
        if fold.skipped:
            continue
        assert set(obs["study"].iloc[fold.test]) == {fold.fold}
        assert fold.fold not in set(obs["study"].iloc[fold.train])


def test_labels_accept_both_codings_and_refuse_others():
    assert encode_labels(["sensitive", "Resistant", "1", 0]).tolist() == [1, 0, 1, 0]
    with pytest.raises(Exception, match="expected sensitive/resistant"):
        encode_labels(["sensitive", "partial"])


def test_a_category_value_with_fewer_cells_per_class_than_folds_is_a_reason_not_a_crash():
    from scdrugmap.evaluate.splits import assign_pooled_folds

    labels = np.array([1, 0, 1, 0, 1, 0])
    groups = np.array(["a", "b", "c", "d", "e", "f"])
    assignment, reason = assign_pooled_folds(labels, groups, n_folds=5, seed=0)
    assert assignment is None and "too few to stratify 5 folds" in reason


def test_a_value_without_folds_gives_the_same_reason_from_saved_splits():
    obs = pd.DataFrame({"tissue": ["T"] * 6, "sample": ["a", "a", "b", "b", "c", "c"]})
    labels = np.array([1, 1, 0, 0, 1, 1])
    fresh = split_pooled(obs, labels, category_column="tissue", category="tissue", sample_column="sample", n_folds=5)
    saved = split_pooled(obs, labels, category_column="tissue", category="tissue", sample_column="sample", n_folds=5,
                         assignment=np.full(6, -1, dtype=np.int8))
    assert fresh[0].skipped == saved[0].skipped == "3 samples, fewer than 5 folds (use fewer folds or --split cell)"
