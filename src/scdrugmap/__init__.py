"""scDrugMap: single-cell drug response prediction and benchmarking with foundation models.

One public face, scanpy style::

    import scdrugmap as sdm

    adata = sdm.datasets.simulate(n_cells=800)          # or anndata.read_h5ad("cells.h5ad")
    sdm.tl.embed(adata, "pca")                           # obsm["X_pca"]
    head = sdm.tl.train(adata, "pca")                    # a trained head; head.save("heads/pca")
    sdm.tl.predict(adata, head)                          # obs["scdrugmap_pca_prob_sensitive"], ...
    results = sdm.tl.benchmark("cells.h5ad", models=["pca", "scgpt"], out="runs/mine")
    run = sdm.read_run("runs/mine")

Nothing here imports torch: models load only when a tool runs. The submodules and functions below load
on first use (``sdm.tl`` imports ``scdrugmap.tl``), so a command that needs one module, such as
``scdrugmap check``, does not import the others.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from scdrugmap.errors import CheckpointError, ConfigError, ScDrugMapError, SchemaError
from scdrugmap.version import __version__

if TYPE_CHECKING:
    from scdrugmap import datasets, pl, tl
    from scdrugmap.readwrite import Head, read_head, read_run
    from scdrugmap.registry import download_weights, list_models, model_card

#: Public names loaded on first use: submodules, and functions by the module that defines them.
_SUBMODULES = ("datasets", "pl", "tl")
_FUNCTIONS = {"Head": "scdrugmap.readwrite", "read_head": "scdrugmap.readwrite", "read_run": "scdrugmap.readwrite",
              "download_weights": "scdrugmap.registry", "list_models": "scdrugmap.registry",
              "model_card": "scdrugmap.registry"}


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f"scdrugmap.{name}")
    if name in _FUNCTIONS:
        value = getattr(importlib.import_module(_FUNCTIONS[name]), name)
        globals()[name] = value  # once: later look-ups do not come here
        return value
    msg = f"module 'scdrugmap' has no attribute {name!r}"
    raise AttributeError(msg)


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


__all__ = ["CheckpointError", "ConfigError", "Head", "ScDrugMapError", "SchemaError", "__version__", "datasets",
           "download_weights", "list_models", "model_card", "pl", "read_head", "read_run", "tl"]
