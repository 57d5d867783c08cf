"""The one 2-D projection of cell embeddings: the run's stored maps, the report and the web's results page.

`project_embedding` centres the cells and takes their principal components; UMAP
(umap-learn) maps at most `UMAP_INPUT_PCS` of them to 2-D (the usual scanpy practice), or
the first two components are the map. UMAP needs `MIN_UMAP_CELLS` cells; below that, or
without umap-learn, ``method="auto"`` falls back to PCA and logs why.

A benchmark run maps each model's embedding sample once and stores the map with it
(`scdrugmap.evaluate.store.ResultStore.save_embedding_sample`); the report reuses it.

umap-learn compiles its numba functions in every process (tens of seconds), as most of them
are declared without ``cache=True``. `project_embedding` turns numba's on-disk cache on for
them (`cache_umap_compilation`), so only the first process on a machine compiles; the cache
goes where numba puts that of ``cache=True`` functions (``__pycache__`` beside umap-learn's
sources, else numba's user-wide cache folder, or ``NUMBA_CACHE_DIR`` when set).
"""

from __future__ import annotations

import logging
import sys
import warnings
from typing import TYPE_CHECKING, Literal

import numpy as np

from scdrugmap.errors import ConfigError

if TYPE_CHECKING:
    import numpy.typing as npt

log = logging.getLogger(__name__)

Projection = Literal["auto", "umap", "pca"]
#: UMAP is run on at most this many principal components.
UMAP_INPUT_PCS = 50
#: Fewest cells (with a finite embedding) UMAP is run on; fewer give PCA, with a warning.
MIN_UMAP_CELLS = 20
#: Fewest cells (with a finite embedding) that get a 2-D view at all.
MIN_CELLS = 3
#: UMAP's neighbourhood size (umap-learn's default), lowered to the cells there are minus one.
UMAP_NEIGHBOURS = 15
#: Below this many cells umap-learn finds exact neighbours from all pairwise distances (its own
#: threshold, ``umap_.UMAP.fit``); we hand it those distances. From it on, it searches with pynndescent.
UMAP_EXACT_BELOW = 4096


UMAP_MISSING = "umap-learn is not installed"


def _umap_installed() -> bool:
    try:
        import umap  # noqa: F401
    except ImportError:
        return False
    return True


#: umap-learn modules whose numba functions already have their on-disk cache turned on.
_CACHED_MODULES: set[str] = set()


def cache_umap_compilation() -> None:
    """Turn numba's on-disk cache on for umap-learn's compiled functions (those of its imported modules).

    Functions compiled before the call are cached from their next compilation on. A no-op for
    modules already handled and for anything that is not a numba function.
    """
    from numba.core.dispatcher import Dispatcher

    for name, module in list(sys.modules.items()):
        if (name != "umap" and not name.startswith("umap.")) or name in _CACHED_MODULES \
                or getattr(module, "__file__", None) is None:
            continue
        for function in list(vars(module).values()):
            if isinstance(function, Dispatcher) and function.py_func.__module__ == name:
                function.enable_caching()
        _CACHED_MODULES.add(name)


def _umap_class() -> type:
    import umap

    if getattr(umap, "__file__", None) is not None:  # the real package, not a stand-in put in sys.modules
        cache_umap_compilation()
    return umap.UMAP


def _umap(components: npt.NDArray[np.float64], *, seed: int) -> npt.NDArray[np.floating]:
    """Map cells to 2-D with UMAP; below `UMAP_EXACT_BELOW` cells, from pairwise distances computed in C.

    Below that size umap-learn computes every euclidean distance itself, through a Python loop
    over the pairs (about 3/4 of its time on 1,500 cells); here `scipy.spatial.distance.cdist`
    computes them and UMAP gets them as ``metric="precomputed"``: the same exact neighbours, with
    distances rounded to float32 where umap-learn rounds the input. The edge weights differ in the
    6th digit, so the layout is not bit-identical to umap-learn's own route (its optimisation
    amplifies any rounding change) but as faithful (trustworthiness 0.9305 vs 0.9308 at 15
    neighbours on the demo's PCA sample).
    """
    n_cells = components.shape[0]
    options: dict[str, object] = {"n_components": 2, "n_neighbors": min(UMAP_NEIGHBOURS, n_cells - 1),
                                  "random_state": seed}
    data = components
    if n_cells < UMAP_EXACT_BELOW:
        from scipy.spatial.distance import cdist

        data, options["metric"] = cdist(components, components, metric="euclidean"), "precomputed"
    umap_class = _umap_class()
    with warnings.catch_warnings():  # umap warns that a fixed random_state turns off parallelism
        warnings.simplefilter("ignore", UserWarning)
        return umap_class(**options).fit_transform(data)


def umap_fallback_reason(n_cells: int) -> str | None:
    """Return why UMAP cannot map ``n_cells`` cells (umap-learn missing, too few cells), or None when it can."""
    if not _umap_installed():
        return UMAP_MISSING
    if n_cells < MIN_UMAP_CELLS:
        return f"too few cells for UMAP ({n_cells} < {MIN_UMAP_CELLS})"
    return None


def project_embedding(embeddings: npt.NDArray[np.floating], *, method: Projection = "auto",
                      seed: int = 0) -> tuple[npt.NDArray[np.float32] | None, Literal["umap", "pca"] | None]:
    """Return 2-D coordinates of cells and the method used (``"umap"`` or ``"pca"``).

    Parameters
    ----------
    embeddings
        Cells x dimensions. Rows with a NaN or infinite value are left out of the fit and get
        NaN coordinates.
    method
        ``"auto"``: UMAP when umap-learn is installed and at least `MIN_UMAP_CELLS` cells have a
        finite embedding, else PCA with a warning naming why. ``"umap"``: the same, but a missing
        umap-learn is an error. ``"pca"``: the first two principal components.
    seed
        Random state of UMAP (and of a randomised PCA solver on large inputs).

    Returns
    -------
    ``(coordinates, method)``: float32 coordinates of shape (cells, 2), NaN on the rows left out,
    and the method that made them; ``(None, None)`` when there is no 2-D view to draw (fewer than
    two dimensions, or fewer than `MIN_CELLS` finite cells).

    Raises
    ------
    ConfigError
        When ``method="umap"`` and umap-learn is not installed, or ``method`` is unknown.
    """
    if method not in ("auto", "umap", "pca"):
        msg = f"projection {method!r} is not available; choose from auto, umap, pca."
        raise ConfigError(msg)
    data = np.asarray(embeddings, dtype=np.float64)
    if data.ndim != 2 or data.shape[1] < 2:
        log.warning("no 2-D view: the embedding has shape %s; two or more dimensions are needed", data.shape)
        return None, None
    valid = np.isfinite(data).all(axis=1)
    n_cells = int(valid.sum())
    if n_cells < MIN_CELLS:
        log.warning("no 2-D view: %d cells have a finite embedding; %d are needed", n_cells, MIN_CELLS)
        return None, None
    chosen: Literal["umap", "pca"] = "pca"
    if method == "umap" and not _umap_installed():
        msg = f"{UMAP_MISSING}; pip install 'scdrugmap[report]' or choose projection 'pca'."
        raise ConfigError(msg)
    if method != "pca":
        reason = umap_fallback_reason(n_cells)
        if reason is None:
            chosen = "umap"
        else:
            log.warning("the 2-D view uses PCA instead of UMAP: %s", reason)
    from sklearn.decomposition import PCA

    cells = data[valid]
    n_components = 2 if chosen == "pca" else min(UMAP_INPUT_PCS, n_cells - 1, data.shape[1])
    components = PCA(n_components=n_components, random_state=seed).fit_transform(cells)
    if chosen == "umap":
        components = _umap(components, seed=seed)
    coordinates = np.full((data.shape[0], 2), np.nan, dtype=np.float32)
    coordinates[valid] = components[:, :2]
    return coordinates, chosen
