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
    """Return (labelled data, weights path, from_pretrained options) for a model's golden checkpoint."""
    folder = shared("golden", name)
    if name in {"scgpt", "tgpt"}:
        inputs = np.load(folder / "inputs.npz")
        return _labelled(inputs["counts"], inputs["genes"]), str(folder / "checkpoint"), {}
    if name == "cellplm":
        inputs = np.load(folder / "inputs.npz")
        return _labelled(inputs["counts"], inputs["genes"]), str(folder), {"device": "cpu"}
    if name == "geneformer":
        cells = ad.read_h5ad(folder / "cells.h5ad")
        vocab = shared("vocab", "geneformer_v1")
        options = {"model_version": "V1", "token_dictionary_file": vocab / "geneformer_token_dictionary.pkl",
                   "gene_median_file": vocab / "geneformer_gene_median_dictionary.pkl", "gene_mapping_file": None}
        return _labelled(cells.X.toarray(), cells.var["ensembl_id"]), str(folder / "checkpoint"), options
    if name == "scfoundation":
        table = pd.read_csv(folder / "counts.csv", index_col=0)
        return (_labelled(table.to_numpy(), table.columns), str(folder / "checkpoint.ckpt"),
                {"gene_index_path": folder / "OS_scRNA_gene_index.200.tsv"})
    if name == "uce":
        cells = ad.read_h5ad(folder / "tiny_human.h5ad")
        return (_labelled(cells.X.toarray(), cells.var_names), str(folder / "checkpoint.torch"),
                {"nhead": 4, "chrom_token_offset": 264})
    inputs = np.load(folder / "inputs.npz")
    if name == "scbert":
        from scdrugmap.models.scbert import ScBERTConfig

        return (_labelled(inputs["counts"], inputs["genes"]), str(folder),
                {"config": ScBERTConfig.from_official(folder / "tiny_config.json"), "min_genes": 5})
    from scdrugmap.models.celllm import CellLMConfig

    return (_labelled(inputs["counts"], inputs["genes"]), str(folder / "checkpoint.pth"),
            {"config": CellLMConfig.from_official(folder / "config.json"), "genes": list(inputs["vocab_genes"]),
             "min_genes": 5})


@pytest.mark.parametrize("name", ["geneformer", "tgpt", "scgpt", "scfoundation", "uce", "cellplm", "scbert", "celllm"])
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
