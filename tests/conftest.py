"""Shared fixtures: tiny AnnData built in code, and the one door to ../shared.

Tests that need ../shared skip where it is absent (a user's clone); CI sets
SCDRUGMAP_REQUIRE_SHARED=1, which turns that skip into a failure.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

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


@pytest.fixture
def shared() -> type:
    """Give tests `shared("golden", "scgpt")` -> Path, skipping where ../shared is absent."""
    return shared_path


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path_factory, monkeypatch):
    """Keep every test's cache (weights, embeddings) out of the user's home."""
    monkeypatch.setenv("SCDRUGMAP_HOME", str(tmp_path_factory.mktemp("scdrugmap_home")))


GENE_SYMBOLS = (
    "TP53 EGFR KRAS BRAF MYC CD3E CD4 CD8A PTPRC ACTB GAPDH MKI67 TOP2A CDK1 CCNB1 ERBB2 ESR1 PGR AR VIM "
    "EPCAM KRT8 KRT18 KRT19 CDH1 CDH2 SNAI1 TWIST1 ZEB1 FN1 COL1A1 COL1A2 SPARC PDGFRB ACTA2 CD68 CD14 LYZ "
    "MS4A1 CD19 CD79A NKG7 GNLY GZMB PRF1 IFNG TNF IL2 IL7R CCR7 SELL FOXP3 CTLA4 PDCD1 LAG3 HAVCR2 TIGIT "
    "CD274 B2M HLA-A HLA-B HLA-C JUN FOS EGR1 HSPA1A HSPA1B MT2A MT1X ABCB1 ABCC1 ABCG2 BCL2 BAX CASP3"
).split()


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


@pytest.fixture
def adata():
    """A fresh tiny AnnData per test (80 cells, 8 samples, 2 studies, 2 tissues)."""
    return make_adata()
