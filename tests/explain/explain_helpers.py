"""Shared pieces of the explain tests: the simulated collections and small measures."""

from __future__ import annotations

import functools

import numpy as np

from scdrugmap.data import schema
from scdrugmap.data.simulate import simulate_collection

#: Collections of the tests: (collection, cells, genes, resistance strength, seed). Their resistance program
#: acts alike in every study (``study_program_sd=0``): then the planted genes are exactly the genes that
#: separate the labels everywhere, the truth these tests measure recovery against.
DE_COLLECTION = ("validation", 2000, 300, 2.0, 0)  # ~50 cells per pseudobulk sample
HEAD_COLLECTION = ("primary", 3000, 300, 2.0, 0)  # more samples, so a head learns few patient quirks
NULL_COLLECTION = ("validation", 1500, 150, 1.0, 1)


@functools.cache
def simulated(collection: str, n_cells: int, n_genes: int, strength: float, seed: int):
    """Return a simulated collection (cached: tests must not change it; use .copy())."""
    return simulate_collection(n_cells, n_genes=n_genes, seed=seed, resistance_strength=strength, study_program_sd=0.0,
                               collection=collection)


def planted(adata) -> set[str]:
    return set(adata.uns["scdrugmap"]["simulation"]["resistance_genes"])


def labels(adata) -> np.ndarray:
    return schema.encode_labels(adata.obs[schema.RESPONSE].to_numpy()).astype(np.float32)


def precision_at(genes, truth: set[str], k: int = 20) -> float:
    top = list(genes)[:k]
    return sum(g in truth for g in top) / k
