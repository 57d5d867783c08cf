import numpy as np
import pytest

from scdrugmap.errors import SchemaError
from scdrugmap.train._trust import binary_labels, join_state, split_state
from scdrugmap.train.bundle import Head
from scdrugmap.train.calibration import PlattCalibrator
from scdrugmap.train.conformal import MondrianConformal
from scdrugmap.train.ood import OutOfDistributionDetector


def test_trust_states_travel_through_a_head_bundle_without_pickle(tmp_path):
    rng = np.random.default_rng(0)
    embeddings = rng.normal(size=(300, 6))
    probabilities = 1 / (1 + np.exp(-3 * embeddings[:, 0]))
    labels = (rng.random(300) < 1 / (1 + np.exp(-embeddings[:, 0]))).astype(np.int8)
    fitted = {"calibration": PlattCalibrator().fit(probabilities, labels),
              "conformal": MondrianConformal().fit(probabilities, labels),
              "ood": OutOfDistributionDetector().fit(embeddings)}
    tensors, meta = {}, {}
    for prefix, thing in fitted.items():
        arrays, facts = split_state(thing.state(), prefix)
        tensors.update(arrays)
        meta.update(facts)
    Head(meta={"kind": "mlp", "model": "pca", "trust": meta}, tensors=tensors).save(tmp_path / "head")
    head = Head.read(tmp_path / "head")
    facts, loaded = head.meta["trust"], head.tensors
    kit = head.trust_kit()
    assert kit.complete
    again = {"calibration": PlattCalibrator.from_state(join_state(loaded, facts, "calibration")),
             "conformal": MondrianConformal.from_state(join_state(loaded, facts, "conformal")),
             "ood": OutOfDistributionDetector.from_state(join_state(loaded, facts, "ood"))}
    new_p, new_cells = rng.random(50), rng.normal(size=(50, 6)) * 2
    assert np.array_equal(again["calibration"].transform(new_p), fitted["calibration"].transform(new_p))
    assert np.array_equal(again["conformal"].predict(new_p), fitted["conformal"].predict(new_p))
    assert np.array_equal(again["ood"].score_cells(new_cells).score, fitted["ood"].score_cells(new_cells).score)
    assert np.array_equal(kit.calibrator.transform(new_p), fitted["calibration"].transform(new_p))


def test_labels_may_be_numbers_booleans_or_names():
    assert binary_labels([True, False]).tolist() == [1, 0]
    assert binary_labels(np.array([1.0, 0.0])).tolist() == [1, 0]
    assert binary_labels(["sensitive", "resistant"]).tolist() == [1, 0]
    with pytest.raises(SchemaError, match=r"\[0.5\]"):
        binary_labels([0.5, 1.0])
