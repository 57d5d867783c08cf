"""The 2-D projection of cell embeddings, as the report, `scdrugmap.pl` and the web import it.

It lives in `scdrugmap.evaluate.projection`: a benchmark run computes each model's map once
and stores it with the embedding sample (`scdrugmap.evaluate.store`), and the report reuses it.
"""

from scdrugmap.evaluate.projection import (
    MIN_CELLS,
    MIN_UMAP_CELLS,
    UMAP_INPUT_PCS,
    UMAP_MISSING,
    UMAP_NEIGHBOURS,
    Projection,
    project_embedding,
    umap_fallback_reason,
)

__all__ = ["MIN_CELLS", "MIN_UMAP_CELLS", "UMAP_INPUT_PCS", "UMAP_MISSING", "UMAP_NEIGHBOURS", "Projection",
           "project_embedding", "umap_fallback_reason"]
