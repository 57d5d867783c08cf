"""Small helpers shared by tests (not fixtures), and the one door to ../shared."""

import os
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp


def write_tiny_h5ad(folder, name="tiny.h5ad", seed=0):
    path = folder / name
    make_adata(n_cells=120, n_samples=12, seed=seed).write_h5ad(path)
    return path


GENE_SYMBOLS = ["TP53", "EGFR", "KRAS", "BRAF", "MYC", "CD3E", "CD4", "CD8A", "PTPRC", "ACTB", "GAPDH", "MKI67", "TOP2A", "CDK1", "CCNB1", "ERBB2", "ESR1", "PGR", "AR", "VIM", "EPCAM", "KRT8", "KRT18", "KRT19", "CDH1", "CDH2", "SNAI1", "TWIST1", "ZEB1", "FN1", "COL1A1", "COL1A2", "SPARC", "PDGFRB", "ACTA2", "CD68", "CD14", "LYZ", "MS4A1", "CD19", "CD79A", "NKG7", "GNLY", "GZMB", "PRF1", "IFNG", "TNF", "IL2", "IL7R", "CCR7", "SELL", "FOXP3", "CTLA4", "PDCD1", "LAG3", "HAVCR2", "TIGIT", "CD274", "B2M", "HLA-A", "HLA-B", "HLA-C", "JUN", "FOS", "EGR1", "HSPA1A", "HSPA1B", "MT2A", "MT1X", "ABCB1", "ABCC1", "ABCG2", "BCL2", "BAX", "CASP3"]


def make_adata(n_cells: int = 80, n_samples: int = 8, seed: int = 0, n_studies: int = 2):
    """Return a tiny count AnnData in the data contract: per-sample labels, two tissues, studies."""
    import anndata as ad
    import numpy as np
    import pandas as pd
    import scipy.sparse as sp

    rng = np.random.default_rng(seed)
    samples = np.arange(n_cells) % n_samples
    sample_label = np.arange(n_samples) % 2
    labels = sample_label[samples]
    n_genes = len(GENE_SYMBOLS)
    rate = rng.gamma(2.0, 1.0, n_genes)
    shift = np.zeros(n_genes)
    shift[:10] = 1.5
    mean = rate[None, :] * np.exp(np.outer(labels, shift))
    counts = rng.poisson(mean).astype(np.float32)
    counts[:, 5] += 1  # every cell expresses ACTB
    obs = pd.DataFrame({
        "response": np.where(labels == 1, "sensitive", "resistant"),
        "sample": [f"P{s}" for s in samples],
        "study": [f"GSE{100 + s % n_studies}" for s in samples],
        "dataset": [f"D{s % n_studies}" for s in samples],
        "tissue": np.where(samples < n_samples // 2, "Tumor tissue", "Cell line"),
        "cancer_type": "Melanoma",
        "therapy": "Immunotherapy",
        "regimen": "anti-PD1",
    }, index=[f"cell{i}" for i in range(n_cells)])
    return ad.AnnData(X=sp.csr_matrix(counts), obs=obs, var=pd.DataFrame(index=list(GENE_SYMBOLS)))


def labelled_copies(counts: np.ndarray, genes, *, copies: int = 4, seed: int = 0) -> ad.AnnData:
    """Tile the golden cells into a small labelled collection: 2 studies x 4 samples, one label per sample."""
    rng = np.random.default_rng(seed)
    tiled = np.concatenate([rng.poisson(np.asarray(counts, dtype=np.float64) + 0.1) for _ in range(copies)])
    n = tiled.shape[0]
    samples = np.arange(n) % 8
    obs = pd.DataFrame({"response": np.where(samples % 2, "sensitive", "resistant"), "sample": [f"P{s}" for s in samples],
                        "study": [f"S{s // 4}" for s in samples], "tissue": "Tumor tissue", "cancer_type": "Melanoma",
                        "therapy": "Immunotherapy", "regimen": "anti-PD1"}, index=[f"c{i}" for i in range(n)])
    return ad.AnnData(sp.csr_matrix(tiled.astype(np.float32)), obs=obs, var=pd.DataFrame(index=[str(g) for g in genes]))


def golden_case(shared, name):
    """Return (labelled data, weights path, from_pretrained options) for a model's golden checkpoint."""
    folder = shared("golden", name)
    if name in {"scgpt", "tgpt"}:
        inputs = np.load(folder / "inputs.npz")
        return labelled_copies(inputs["counts"], inputs["genes"]), str(folder / "checkpoint"), {}
    if name == "cellplm":
        inputs = np.load(folder / "inputs.npz")
        return labelled_copies(inputs["counts"], inputs["genes"]), str(folder), {"device": "cpu"}
    if name == "geneformer":
        cells = ad.read_h5ad(folder / "cells.h5ad")
        vocab = shared("vocab", "geneformer_v1")
        options = {"model_version": "V1", "token_dictionary_file": vocab / "geneformer_token_dictionary.pkl",
                   "gene_median_file": vocab / "geneformer_gene_median_dictionary.pkl", "gene_mapping_file": None}
        return labelled_copies(cells.X.toarray(), cells.var["ensembl_id"]), str(folder / "checkpoint"), options
    if name == "scfoundation":
        table = pd.read_csv(folder / "counts.csv", index_col=0)
        return (labelled_copies(table.to_numpy(), table.columns), str(folder / "checkpoint.ckpt"),
                {"gene_index_path": folder / "OS_scRNA_gene_index.200.tsv"})
    if name == "uce":
        cells = ad.read_h5ad(folder / "tiny_human.h5ad")
        return (labelled_copies(cells.X.toarray(), cells.var_names), str(folder / "checkpoint.torch"),
                {"nhead": 4, "chrom_token_offset": 264})
    inputs = np.load(folder / "inputs.npz")
    if name == "scbert":
        from scdrugmap.models.scbert import ScBERTConfig

        return (labelled_copies(inputs["counts"], inputs["genes"]), str(folder),
                {"config": ScBERTConfig.from_official(folder / "tiny_config.json"), "min_genes": 5})
    from scdrugmap.models.celllm import CellLMConfig

    return (labelled_copies(inputs["counts"], inputs["genes"]), str(folder / "checkpoint.pth"),
            {"config": CellLMConfig.from_official(folder / "config.json"), "genes": list(inputs["vocab_genes"]),
             "min_genes": 5})


SHARED_DIR = Path(__file__).resolve().parents[1].parent / "shared"
REQUIRE_SHARED_ENV = "SCDRUGMAP_REQUIRE_SHARED"


def shared_path(*parts: str) -> Path:
    """Return a path inside ../shared, skipping (or failing in CI) when it is missing."""
    path = SHARED_DIR.joinpath(*parts)
    if not path.exists():
        reason = f"{path} is missing: this test reads ../shared, which only the project's developers and CI have"
        if os.environ.get(REQUIRE_SHARED_ENV) == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    return path
