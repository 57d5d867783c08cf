"""Foundation models inside the benchmark runner: frozen and LoRA jobs on their golden tiny checkpoints."""

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from scdrugmap.evaluate.runner import BenchmarkConfig, run_benchmark


def _labelled(counts: np.ndarray, genes, *, copies: int = 4, seed: int = 0) -> ad.AnnData:
    """Tile the golden cells into a small labelled collection: 2 studies x 4 samples, one label per sample."""
    rng = np.random.default_rng(seed)
    tiled = np.concatenate([rng.poisson(np.asarray(counts, dtype=np.float64) + 0.1) for _ in range(copies)])
    n = tiled.shape[0]
    samples = np.arange(n) % 8
    obs = pd.DataFrame({"response": np.where(samples % 2, "sensitive", "resistant"), "sample": [f"P{s}" for s in samples],
                        "study": [f"S{s // 4}" for s in samples], "tissue": "Tumor tissue", "cancer_type": "Melanoma",
                        "therapy": "Immunotherapy", "regimen": "anti-PD1"}, index=[f"c{i}" for i in range(n)])
    return ad.AnnData(sp.csr_matrix(tiled.astype(np.float32)), obs=obs, var=pd.DataFrame(index=[str(g) for g in genes]))


def _golden_case(shared, name):
    if name == "scgpt":
        inputs = np.load(shared("golden", "scgpt", "inputs.npz"))
        return _labelled(inputs["counts"], inputs["genes"]), str(shared("golden", "scgpt", "checkpoint")), {}
    if name == "tgpt":
        inputs = np.load(shared("golden", "tgpt", "inputs.npz"), allow_pickle=False)
        return _labelled(inputs["counts"], inputs["genes"]), str(shared("golden", "tgpt", "checkpoint")), {}
    inputs = np.load(shared("golden", "cellplm", "inputs.npz"))
    return _labelled(inputs["counts"], inputs["genes"]), str(shared("golden", "cellplm")), {"device": "cpu"}


@pytest.mark.parametrize("name", ["scgpt", "tgpt", "cellplm"])
def test_foundation_model_runs_frozen_and_lora_in_the_benchmark(name, shared, tmp_path):
    adata, weights, options = _golden_case(shared, name)
    data = tmp_path / "data.h5ad"
    adata.write_h5ad(data)
    config = BenchmarkConfig(data=str(data), out=str(tmp_path / "run"), models=[name], strategies=["frozen", "lora"],
                             scenarios=["pooled", "cross"], categories=["tissue"], folds=2, weights={name: weights},
                             model_options={name: options}, head={"epochs": 2, "hidden": 16},
                             lora={"epochs": 1, "hidden": 16, "batch_size": 8})
    results = run_benchmark(config)
    done = results[results["status"] == "done"]
    assert set(done["strategy"]) == {"frozen", "lora"}, results[["strategy", "status", "reasons"]]
    assert set(done["scenario"]) == {"pooled", "cross"}
    assert done["auroc"].between(0, 1).all()
    lora = done[done["strategy"] == "lora"]
    assert (lora["train_trainable_parameters"] > 0).all()
