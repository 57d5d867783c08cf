"""Plots of cells and predictions (``sdm.pl.embedding(adata, basis="X_pca")``), in the report's style.

Each function draws on ``ax`` (a new figure when None) and returns the matplotlib Axes. Run-level
figures (per-fold ROC and PR, critical difference, leakage, calibration) are in `scdrugmap.report`
and ``scdrugmap report RUN_DIR``; `roc` draws one of them from a run folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from scdrugmap.errors import ConfigError, SchemaError

if TYPE_CHECKING:
    import anndata as ad
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure


def _axes(ax: Axes | None, size: tuple[float, float] = (4.8, 4.2)) -> Axes:
    import matplotlib.pyplot as plt

    if ax is not None:
        return ax
    _, new = plt.subplots(figsize=size)
    return new


def _prediction_key(adata: ad.AnnData, key: str | None) -> str:
    """Return the obs prefix of one `scdrugmap.tl.predict` result (the only one when ``key`` is None)."""
    from scdrugmap.tl import probability_column

    if key is not None:
        if probability_column(key) not in adata.obs:
            msg = f"obs has no {probability_column(key)!r}; run sdm.tl.predict (key_added={key!r}) first."
            raise SchemaError(msg)
        return key
    keys = [str(c)[: -len("_prob_sensitive")] for c in adata.obs.columns if str(c).endswith("_prob_sensitive")]
    if len(keys) != 1:
        msg = (f"obs holds {len(keys)} predictions ({', '.join(keys) or 'none'}); "
               + ("run sdm.tl.predict first." if not keys else "pass key=."))
        raise SchemaError(msg)
    return keys[0]


def embedding(adata: ad.AnnData, basis: str, *, color: str | None = "response", method: str = "auto",
              seed: int = 0, size: float | None = None, ax: Axes | None = None) -> Axes:
    """Scatter the cells on a 2-D map of ``obsm[basis]`` coloured by an obs column.

    Parameters
    ----------
    basis
        obsm key; wider than 2 it is projected (UMAP, or PCA where UMAP is missing or the cells too few,
        with the fallback named in the axis labels).
    color
        obs column: categories get the report's palette (sensitive blue, resistant orange), numbers a
        colour scale; None draws one colour.
    method
        ``auto``, ``umap`` or ``pca``.

    Examples
    --------
    >>> import scdrugmap as sdm
    >>> adata = sdm.datasets.simulate(n_cells=60, n_genes=200, seed=0)
    >>> sdm.tl.embed(adata, "pca")
    >>> ax = sdm.pl.embedding(adata, "X_pca", method="pca")
    >>> ax.get_title(loc="left")
    'X_pca coloured by response (60 cells)'
    """
    import pandas as pd

    from scdrugmap.report.projection import project_embedding
    from scdrugmap.report.style import RESPONSE_COLOURS, UNKNOWN_COLOUR, category_colours

    if basis not in adata.obsm:
        msg = f"obsm has no {basis!r} (keys: {', '.join(adata.obsm.keys()) or 'none'}); run sdm.tl.embed first."
        raise SchemaError(msg)
    values = np.asarray(adata.obsm[basis], dtype=np.float64)
    valid = ~np.isnan(values).any(axis=1) if values.shape[1] else np.zeros(values.shape[0], dtype=bool)
    if valid.sum() < 3:
        msg = f"obsm[{basis!r}] has {int(valid.sum())} cells with an embedding; a map needs at least 3."
        raise SchemaError(msg)
    xy: np.ndarray | None
    if values.shape[1] == 2:
        xy, label = values[valid], basis
    else:
        if method not in ("auto", "umap", "pca"):
            msg = f"method={method!r}: choose auto, umap or pca."
            raise ConfigError(msg)
        xy, used = project_embedding(values[valid], method=method, seed=seed)  # type: ignore[arg-type]
        if xy is None:
            msg = f"obsm[{basis!r}] is narrower than 2 dimensions; nothing to map."
            raise SchemaError(msg)
        label = "UMAP" if used == "umap" else "PC"
    ax = _axes(ax)
    size = size if size is not None else float(np.clip(6000 / max(int(valid.sum()), 1), 1.5, 14))
    if color is None:
        ax.scatter(xy[:, 0], xy[:, 1], s=size, color="#555555", linewidth=0)
    elif color not in adata.obs:
        msg = f"obs has no {color!r} column to colour by."
        raise SchemaError(msg)
    else:
        column = adata.obs[color].to_numpy()[valid]
        if pd.api.types.is_numeric_dtype(adata.obs[color]) and not pd.api.types.is_bool_dtype(adata.obs[color]):
            points = ax.scatter(xy[:, 0], xy[:, 1], s=size, c=column.astype(float), cmap="viridis", linewidth=0)
            ax.figure.colorbar(points, ax=ax, label=color)
        else:
            names = sorted({str(v) for v in column})
            palette = ({n: RESPONSE_COLOURS.get(n, UNKNOWN_COLOUR) for n in names}
                       if set(names) <= {*RESPONSE_COLOURS, "nan", "None"} else category_colours(names))
            text = column.astype(str)
            for name in names:
                rows = text == name
                ax.scatter(xy[rows, 0], xy[rows, 1], s=size, color=palette[name], linewidth=0,
                           label=f"{name} ({int(rows.sum())})")
            ax.legend(title=f"{color} (cells)", markerscale=2.0, frameon=False, fontsize=8)
    ax.set_title(f"{basis} coloured by {color or 'nothing'} ({int(valid.sum())} cells)", loc="left", fontsize=10)
    ax.set_xlabel(f"{label} 1")
    ax.set_ylabel(f"{label} 2")
    ax.set_xticks([])
    ax.set_yticks([])
    return ax


def probability_histogram(adata: ad.AnnData, key: str | None = None, *, label_key: str | None = "response",
                          bins: int = 20, ax: Axes | None = None) -> Axes:
    """Histogram of the predicted P(sensitive) per cell, split by the observed label when it is known.

    ``key`` is the prefix `scdrugmap.tl.predict` wrote (default: the only one in ``obs``).

    Examples
    --------
    >>> import scdrugmap as sdm
    >>> adata = sdm.datasets.simulate(n_cells=120, n_genes=200, seed=0)
    >>> sdm.tl.predict(adata, sdm.tl.train(adata, "pca", head="logistic"))
    >>> ax = sdm.pl.probability_histogram(adata)
    >>> ax.get_xlabel()
    'P(sensitive) per cell'
    """
    from scdrugmap.report.style import RESPONSE_COLOURS
    from scdrugmap.tl import probability_column

    key = _prediction_key(adata, key)
    probability = adata.obs[probability_column(key)].to_numpy(dtype=np.float64)
    readable = ~np.isnan(probability)
    ax = _axes(ax)
    edges = np.linspace(0.0, 1.0, bins + 1).tolist()
    if label_key is not None and label_key in adata.obs:
        from scdrugmap.data.schema import encode_labels

        labels = encode_labels(adata.obs[label_key], column=label_key)
        for code, name in ((0, "resistant"), (1, "sensitive")):
            rows = readable & (labels == code)
            ax.hist(probability[rows], bins=edges, alpha=0.65, color=RESPONSE_COLOURS[name],
                    label=f"observed {name} ({int(rows.sum())})")
        ax.legend(frameon=False, fontsize=8)
    else:
        ax.hist(probability[readable], bins=edges, color="#555555")
    threshold = adata.uns.get("scdrugmap", {}).get(key, {}).get("threshold")
    if threshold is not None:
        ax.axvline(float(threshold), color="#333333", linestyle=":", linewidth=1)
    ax.set_xlabel("P(sensitive) per cell")
    ax.set_ylabel("cells")
    ax.set_title(f"{key}: {int(readable.sum())} cells", loc="left", fontsize=10)
    return ax


def roc(data: ad.AnnData | str | Path, key: str | None = None, *, label_key: str = "response",
        ax: Axes | None = None, **options: Any) -> Axes | Figure:
    """ROC curve of predictions against observed labels.

    For an AnnData: one curve of ``obs["<key>_prob_sensitive"]`` against ``obs[label_key]``, unit: cells,
    with the AUROC and N in the legend. For a benchmark run folder: the report's per-fold ROC and PR
    figure (returned as a Figure; ``options`` go to it, e.g. ``split="sample"``).

    Examples
    --------
    >>> import scdrugmap as sdm
    >>> adata = sdm.datasets.simulate(n_cells=120, n_genes=200, seed=0)
    >>> sdm.tl.predict(adata, sdm.tl.train(adata, "pca", head="logistic"))
    >>> ax = sdm.pl.roc(adata)
    >>> ax.get_xlabel()
    'false positive rate (cells)'
    """
    from anndata import AnnData

    if not isinstance(data, AnnData):
        from scdrugmap.report.figures import plot_roc_pr
        from scdrugmap.report.run import labelled_predictions, read_run_data
        from scdrugmap.report.style import model_colours

        run = read_run_data(data)
        return plot_roc_pr(labelled_predictions(run), model_colours(run.model_list), **options)
    from scdrugmap.data.schema import encode_labels
    from scdrugmap.evaluate.metrics import binary_curves
    from scdrugmap.tl import probability_column

    key = _prediction_key(data, key)
    if label_key not in data.obs:
        msg = f"obs has no {label_key!r} column of observed labels to draw a ROC curve against."
        raise SchemaError(msg)
    probability = data.obs[probability_column(key)].to_numpy(dtype=np.float64)
    labels = encode_labels(data.obs[label_key], column=label_key)
    readable = ~np.isnan(probability)
    ax = _axes(ax, (4.2, 4.2))
    if np.unique(labels[readable]).size < 2:
        msg = f"obs[{label_key!r}] holds one class among the predicted cells; a ROC curve needs both."
        raise SchemaError(msg)
    curves = binary_curves(labels[readable], probability[readable])  # scikit-learn's curves, one ROC code
    fpr, tpr, auroc = curves.fpr, curves.tpr, curves.auroc
    ax.plot(fpr, tpr, color="#0072B2", label=f"{key}: AUROC {auroc:.3f} (N = {int(readable.sum())} cells)")
    ax.plot([0, 1], [0, 1], color="#444444", linestyle=(0, (1, 3)), linewidth=1)
    ax.set_xlabel("false positive rate (cells)")
    ax.set_ylabel("true positive rate (cells)")
    ax.legend(loc="lower right", frameon=False, fontsize=8)
    ax.set_aspect("equal")
    return ax
