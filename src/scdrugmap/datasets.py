"""Data sets: the curated scDrugMap catalog and the simulator (``sdm.datasets.catalog()``, ``sdm.datasets.simulate()``)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import anndata as ad
    import pandas as pd


def simulate(n_cells: int = 1500, *, n_genes: int = 2000, seed: int = 0, **options: Any) -> ad.AnnData:
    """Simulate a drug-response collection shaped like the scDrugMap catalog, in memory.

    Counts over real human genes, with studies, patients (labels per patient), tissues, cancer
    types, therapies, regimens and cell types, and a planted resistance program. The result is
    marked as simulated in ``uns``. Options are those of `scdrugmap.data.simulate.simulate_collection`
    (``resistance_strength``, ``collection``, ...).

    Examples
    --------
    >>> import scdrugmap as sdm
    >>> adata = sdm.datasets.simulate(n_cells=60, n_genes=200, seed=0)
    >>> adata.shape
    (60, 200)
    >>> sorted(adata.obs["response"].unique())
    ['resistant', 'sensitive']
    """
    from scdrugmap.data.simulate import simulate_collection

    if "out_path" in options:
        msg = "simulate returns the AnnData in memory; to stream a large one to disk use simulate_collection(out_path=...)."
        raise TypeError(msg)
    return simulate_collection(n_cells=n_cells, n_genes=n_genes, seed=seed, **options)


def catalog(**filters: str | None) -> pd.DataFrame:
    """Return the curated catalog of the 60 published data sets, optionally filtered.

    Filters: ``collection`` (primary / validation), ``tissue``, ``cancer_type``, ``therapy``, ``regimen``
    (case-insensitive substrings).

    Examples
    --------
    >>> import scdrugmap as sdm
    >>> len(sdm.datasets.catalog())
    60
    """
    from scdrugmap.data.catalog import filter_catalog

    return filter_catalog(**filters)


def category_counts() -> pd.DataFrame:
    """Return the catalog's cells per category value (sensitive / resistant)."""
    from scdrugmap.data.catalog import load_category_counts

    return load_category_counts()
