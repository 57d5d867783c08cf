"""Reading what scDrugMap wrote: trained heads and benchmark run folders (``sdm.read_head``, ``sdm.read_run``)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from scdrugmap.train.bundle import META_FILE, WEIGHTS_FILE, Head

if TYPE_CHECKING:
    from scdrugmap.evaluate.store import RunFolder

__all__ = ["META_FILE", "WEIGHTS_FILE", "Head", "read_head", "read_run"]


def read_head(path: str | Path) -> Head:
    """Read a head bundle folder (``head.json`` + ``head.safetensors``), as `Head.save` or ``scdrugmap train`` wrote it.

    Raises
    ------
    CheckpointError
        When a file is missing or damaged.

    Examples
    --------
    >>> import tempfile
    >>> import scdrugmap as sdm
    >>> adata = sdm.datasets.simulate(n_cells=120, n_genes=200, seed=0)
    >>> folder = sdm.tl.train(adata, "pca", head="logistic").save(tempfile.mkdtemp())
    >>> sdm.read_head(folder).kind
    'logistic'
    """
    return Head.read(path)


def read_run(run_dir: str | Path) -> RunFolder:
    """Read a benchmark run folder: results (one row per job), predictions, cells, config, model facts.

    Each file is read the first time it is used (see `scdrugmap.evaluate.store.RunFolder`).

    Raises
    ------
    ConfigError
        When the folder holds no results.
    """
    from scdrugmap.evaluate.store import read_run as read

    return read(run_dir)
