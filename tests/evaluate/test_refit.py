"""A run's fold heads retrain exactly from its config and saved splits, or the retraining refuses."""

import json

import anndata as ad
import numpy as np
import pytest

from scdrugmap.errors import ConfigError, SchemaError
from scdrugmap.evaluate.grid import BenchmarkConfig
from scdrugmap.evaluate.refit import TOLERANCE, refit_fold_heads
from scdrugmap.evaluate.runner import run_benchmark
from scdrugmap.evaluate.store import read_run
from tests_helpers import make_adata, write_tiny_h5ad


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A small run: pca with an MLP and a logistic head, hvg with an MLP head; 3 patient-grouped folds per tissue."""
    folder = tmp_path_factory.mktemp("refit")
    data = write_tiny_h5ad(folder)
    config = BenchmarkConfig(data=str(data), out=str(folder / "run"), models=["pca", "hvg"], heads=["mlp", "logistic"],
                             folds=3, categories=["tissue"], scenarios=["pooled"], head={"epochs": 2, "hidden": 16})
    run_benchmark(config)
    return folder / "run", data


def _keys(run_dir, model, head):
    results = read_run(run_dir).results
    done = results[(results["model"] == model) & (results["head"] == head) & (results["status"] == "done")]
    return list(dict.fromkeys(done["key"]))


@pytest.mark.parametrize(("model", "head"), [("pca", "mlp"), ("pca", "logistic"), ("hvg", "mlp")])
def test_retrained_folds_reproduce_the_saved_predictions_on_their_own_test_cells(run, model, head):
    run_dir, data = run
    keys = _keys(run_dir, model, head)
    refitted = refit_fold_heads(run_dir, ad.read_h5ad(data), model, keys)
    assert [f.key for f in refitted.folds] == keys and refitted.facts["max_difference"] <= TOLERANCE
    saved = read_run(run_dir).predictions
    for fold in refitted.folds:
        stored = saved[saved["key"] == fold.key].set_index("cell")["probability"]
        assert set(fold.test_cells) == set(stored.index)  # its own test cells, no others
        # the head it carries scores its test cells as the run did (numpy here, torch in training)
        embeddings = refitted.encoder.embed(ad.read_h5ad(data)[fold.test_cells])
        np.testing.assert_allclose(fold.head.predict_proba(embeddings), stored.loc[fold.test_cells], atol=1e-5)
        assert fold.head.kind == head and fold.head.encoder_state  # a baseline's fitted state travels with it


def test_a_changed_config_or_other_data_is_refused(run, tmp_path):
    run_dir, data = run
    keys = _keys(run_dir, "pca", "mlp")
    with pytest.raises(SchemaError, match="other data"):
        refit_fold_heads(run_dir, make_adata(n_cells=120, n_samples=12, seed=5), "pca", keys)
    with pytest.raises(ConfigError, match="frozen heads"):
        refit_fold_heads(run_dir, ad.read_h5ad(data), "pca", [k.replace("|frozen|", "|lora|") for k in keys])
    changed = tmp_path / "run"
    changed.mkdir()
    for path in run_dir.iterdir():  # the same run, but its config now says another learning rate
        if path.is_file():
            (changed / path.name).write_bytes(path.read_bytes())
    facts = json.loads((run_dir / "config.json").read_text())
    facts["config"]["head"]["learning_rate"] = 0.05
    (changed / "config.json").write_text(json.dumps(facts))
    with pytest.raises(ConfigError, match="does not reproduce the run's saved predictions"):
        refit_fold_heads(changed, ad.read_h5ad(data), "pca", keys)


@pytest.mark.slow
def test_a_token_model_run_is_explained_by_its_fold_heads_on_cached_embeddings(shared, tmp_path):
    """Geneformer (golden tiny checkpoint): frozen fold heads retrain on the cached embeddings and are attributed
    with token integrated gradients through the retrained head, each on its own test cells."""
    import scdrugmap as sdm
    from tests_helpers import golden_case

    adata, weights, options = golden_case(shared, "geneformer")
    options = {k: None if v is None else str(v) for k, v in options.items()}
    run_dir = tmp_path / "run"
    sdm.tl.benchmark(adata, out=str(run_dir), models=["geneformer"], weights={"geneformer": weights},
                     model_options={"geneformer": options}, categories=["tissue"], scenarios=["pooled"], folds=2,
                     head={"epochs": 2, "hidden": 16}, device="cpu")
    found = sdm.tl.biomarkers(adata, "geneformer", run=run_dir, max_cells=16, max_genes=3, top_k=5, n_bootstrap=0)
    assert found.facts["fold_models"]["n_folds"] == 2 and found.facts["fold_models"]["max_difference"] <= TOLERANCE
    about = found.facts["attribution"]
    assert about["method"] == "integrated_gradients" and "every gene token replaced by <pad>" in about["baseline"]
    assert sum(about["folds"].values()) == about["n_cells"] == 16
    assert found.table["attribution_abs_mean"].notna().any() and found.facts["stability"]["method"] == "folds"
