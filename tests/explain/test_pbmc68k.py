"""Real data: one PBMC cell type labelled resistant; its canonical markers must lead DE and attribution.

``scanpy.datasets.pbmc68k_reduced()`` ships inside scanpy (no download): 700 PBMCs from Zheng et al. 2017
(Nat Commun 8:14049), 765 genes, ``raw`` holding log-normalised expression, ``obs['bulk_labels']`` the
sorted-population labels. The NK cells ("CD56+ NK", 31 cells) are labelled resistant, the rest sensitive.

Canonical NK markers: GNLY and NKG7, the NK-cell markers of the Seurat "Guided clustering tutorial"
(PBMC 3k, satijalab.org/seurat/articles/pbmc3k_tutorial, table of canonical markers: "NK: GNLY, NKG7"),
also the NK markers of Zheng et al. 2017, Fig. 3.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

sc = pytest.importorskip("scanpy")

import anndata as ad  # noqa: E402

from scdrugmap.data import schema  # noqa: E402
from scdrugmap.explain.attribution import attribute_expression  # noqa: E402
from scdrugmap.explain.de import differential_expression, top_genes  # noqa: E402
from scdrugmap.models.baselines import HVGEncoder  # noqa: E402
from scdrugmap.train.predict import fit_head  # noqa: E402

CELL_TYPE = "CD56+ NK"
MARKERS = ("GNLY", "NKG7")


@pytest.fixture(scope="module")
def pbmc():
    reduced = sc.datasets.pbmc68k_reduced()
    adata = ad.AnnData(reduced.raw.X.copy(), obs=reduced.obs[["bulk_labels"]].copy(),
                       var=pd.DataFrame(index=reduced.raw.var_names.astype(str)))
    adata.obs[schema.RESPONSE] = np.where(adata.obs["bulk_labels"] == CELL_TYPE, schema.RESISTANT, schema.SENSITIVE)
    return adata


def test_nk_markers_lead_differential_expression(pbmc):
    table = differential_expression(pbmc, sample_key=None)  # no samples: cells are the replicates
    assert set(table["test"]) == {"wilcoxon"}
    top = top_genes(table, 10)
    assert set(MARKERS) <= set(top), top
    assert (table.set_index("gene").loc[list(MARKERS), "log2fc"] > 1).all()


def test_nk_markers_lead_the_attribution_of_an_hvg_head(pbmc, tmp_path):
    labels = schema.encode_labels(pbmc.obs[schema.RESPONSE]).astype(np.float32)
    bundle = fit_head(HVGEncoder(), pbmc, labels).save(tmp_path / "hvg")  # the paper's MLP head, defaults
    result = attribute_expression(pbmc, bundle, max_cells=None)
    resistant = pbmc.obs_names[labels == 0]
    top = result.top_genes(10, cells=resistant)  # what makes the model call the NK cells resistant
    assert set(MARKERS) <= set(top), top
    gradient = attribute_expression(pbmc, bundle, method="gradient", max_cells=None).summary(resistant)
    assert (gradient.set_index("gene").loc[list(MARKERS), "attribution_mean"] < 0).all()  # they lower P(sensitive)
