"""scDrugMap: single-cell drug response prediction and benchmarking with foundation models.

One public face, scanpy style::

    import scdrugmap as sdm

    adata = sdm.datasets.simulate(n_cells=800)          # or anndata.read_h5ad("cells.h5ad")
    sdm.tl.embed(adata, "pca")                           # obsm["X_pca"]
    head = sdm.tl.train(adata, "pca")                    # a trained head; head.save("heads/pca")
    sdm.tl.predict(adata, head)                          # obs["scdrugmap_pca_prob_sensitive"], ...
    results = sdm.tl.benchmark("cells.h5ad", models=["pca", "scgpt"], out="runs/mine")
    run = sdm.read_run("runs/mine")

Nothing here imports torch: models load only when a tool runs.
"""

from scdrugmap import datasets, pl, tl
from scdrugmap.errors import CheckpointError, ConfigError, ScDrugMapError, SchemaError
from scdrugmap.readwrite import Head, read_head, read_run
from scdrugmap.registry import download_weights, list_models, model_card
from scdrugmap.version import __version__

__all__ = ["CheckpointError", "ConfigError", "Head", "ScDrugMapError", "SchemaError", "__version__", "datasets",
           "download_weights", "list_models", "model_card", "pl", "read_head", "read_run", "tl"]
