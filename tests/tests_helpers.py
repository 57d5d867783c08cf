"""Small helpers shared by tests (not fixtures)."""



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
