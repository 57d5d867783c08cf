"""The curated scDrugMap collection: 60 published drug-response data sets as tables of facts."""

from __future__ import annotations

from functools import cache
from importlib.resources import files

import pandas as pd

from scdrugmap.errors import ConfigError

#: Catalog columns a user can filter on, and the obs field each describes.
FILTERS = ("collection", "tissue", "cancer_type", "therapy", "regimen")


@cache
def load_catalog() -> pd.DataFrame:
    """Return the 60 data sets (one row each, ``dataset_id`` P01..P36, V01..V24)."""
    with files("scdrugmap.data").joinpath("catalog", "datasets.csv").open() as handle:
        return pd.read_csv(handle, dtype={"pmid": str, "n_samples": "Int64"})


@cache
def load_category_counts() -> pd.DataFrame:
    """Return cells per category value, with sensitive and resistant counts."""
    with files("scdrugmap.data").joinpath("catalog", "category_counts.csv").open() as handle:
        return pd.read_csv(handle)


def filter_catalog(**criteria: str | None) -> pd.DataFrame:
    """Return catalog rows matching every given filter (case-insensitive substring match)."""
    table = load_catalog()
    for key, value in criteria.items():
        if value is None:
            continue
        if key not in FILTERS:
            msg = f"cannot filter the catalog by {key!r}; filters: {', '.join(FILTERS)}."
            raise ConfigError(msg)
        table = table[table[key].str.contains(value, case=False, regex=False, na=False)]
    return table.reset_index(drop=True)


def get_dataset(dataset_id: str) -> pd.Series:
    """Return one catalog row by id (``P07``) or subgroup name."""
    table = load_catalog()
    match = table[(table["dataset_id"].str.upper() == dataset_id.upper()) | (table["subgroup"] == dataset_id)]
    if match.empty:
        msg = f"no data set {dataset_id!r} in the catalog; ids run P01-P36 and V01-V24 (`scdrugmap datasets list`)."
        raise ConfigError(msg)
    return match.iloc[0]
