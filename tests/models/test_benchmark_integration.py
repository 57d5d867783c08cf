"""Foundation models inside the benchmark runner: frozen and LoRA jobs on their golden tiny checkpoints."""

import numpy as np
import pytest

from scdrugmap.evaluate.grid import BenchmarkConfig
from scdrugmap.evaluate.runner import run_benchmark
from tests_helpers import golden_case


@pytest.mark.parametrize("name", ["geneformer", "tgpt", "scgpt", "scfoundation", "uce", "cellplm", "scbert", "celllm"])
def test_foundation_model_runs_frozen_and_lora_in_the_benchmark(name, shared, tmp_path):
    adata, weights, options = golden_case(shared, name)
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



@pytest.mark.parametrize("name", ["geneformer", "tgpt"])
def test_a_shardable_model_embeds_a_shard_as_inside_the_whole_data(name, shared):
    """`shardable` is a promise the sharded (Ray) embedding relies on: a cell's embedding ignores other cells.

    Only padding differs between the two runs (other cells share a length bucket), hence 1e-5, not equality.
    """
    from scdrugmap.models.base import get_encoder_class, load_encoder

    assert get_encoder_class(name).shardable
    adata, weights, options = golden_case(shared, name)
    whole = load_encoder(name, weights, **options).embed(adata)
    shard = load_encoder(name, weights, **options).embed(adata[5:29].copy())
    np.testing.assert_allclose(shard, whole[5:29], atol=1e-5, rtol=0)


def test_models_that_depend_on_other_cells_are_not_shardable():
    """Batch-wide statistics, cell-to-cell attention, a random stream over cells or a fit on the data."""
    from scdrugmap.models.base import get_encoder_class

    for name in ["scgpt", "scfoundation", "uce", "cellplm", "scbert", "celllm", "pca", "hvg"]:
        assert not get_encoder_class(name).shardable, name
