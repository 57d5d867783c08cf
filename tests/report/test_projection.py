"""The one 2-D projection of embeddings (report maps and the web's results page)."""

from __future__ import annotations

import logging
import sys
from types import ModuleType, SimpleNamespace

import numpy as np
import pytest
from scipy.spatial.distance import cdist
from sklearn.decomposition import PCA

from scdrugmap.errors import ConfigError
from scdrugmap.evaluate import projection
from scdrugmap.report.projection import MIN_UMAP_CELLS, project_embedding, umap_fallback_reason


class FakeUMAP:
    calls: dict = {}

    def __init__(self, **options):
        FakeUMAP.calls["options"] = options

    def fit_transform(self, data):
        FakeUMAP.calls["shape"] = data.shape
        FakeUMAP.calls["data"] = data
        return data[:, :2] * 2


@pytest.fixture
def fake_umap(monkeypatch):
    FakeUMAP.calls = {}
    monkeypatch.setitem(sys.modules, "umap", SimpleNamespace(UMAP=FakeUMAP))
    return FakeUMAP.calls


def test_projection_falls_back_to_pca_without_umap_and_says_so(monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "umap", None)  # import umap -> ImportError
    embedding = np.random.default_rng(0).normal(size=(40, 6))
    with caplog.at_level(logging.WARNING, logger="scdrugmap.evaluate.projection"):
        coordinates, method = project_embedding(embedding, method="auto")
    assert coordinates.shape == (40, 2) and method == "pca"
    assert "instead of UMAP: umap-learn is not installed" in caplog.text
    assert umap_fallback_reason(40) == "umap-learn is not installed"
    with pytest.raises(ConfigError, match="umap-learn is not installed"):
        project_embedding(embedding, method="umap")


def test_umap_needs_the_minimum_of_cells_and_falls_back_to_pca_below_it(fake_umap, caplog):
    embedding = np.random.default_rng(0).normal(size=(MIN_UMAP_CELLS - 1, 6))
    for method in ("auto", "umap"):
        with caplog.at_level(logging.WARNING, logger="scdrugmap.evaluate.projection"):
            coordinates, chosen = project_embedding(embedding, method=method)
        assert chosen == "pca" and coordinates.shape == (MIN_UMAP_CELLS - 1, 2)
    assert f"too few cells for UMAP ({MIN_UMAP_CELLS - 1} < {MIN_UMAP_CELLS})" in caplog.text
    assert fake_umap == {}
    assert project_embedding(np.vstack([embedding, embedding[:1]]), method="auto")[1] == "umap"


def test_umap_runs_on_the_distances_of_the_principal_components_with_a_fixed_seed(fake_umap):
    embedding = np.random.default_rng(0).normal(size=(80, 120))
    coordinates, method = project_embedding(embedding, method="auto", seed=7)
    assert method == "umap"
    assert fake_umap["options"] == {"n_components": 2, "n_neighbors": 15, "random_state": 7, "metric": "precomputed"}
    components = PCA(n_components=50, random_state=7).fit_transform(embedding)  # at most 50 PCs go into UMAP
    assert np.allclose(fake_umap["data"], cdist(components, components))
    assert coordinates.shape == (80, 2) and coordinates.dtype == np.float32


def test_umap_searches_neighbours_itself_from_its_exact_limit_on(fake_umap, monkeypatch):
    monkeypatch.setattr(projection, "UMAP_EXACT_BELOW", 60)
    embedding = np.random.default_rng(0).normal(size=(80, 120))
    project_embedding(embedding, method="auto", seed=7)
    assert fake_umap["options"] == {"n_components": 2, "n_neighbors": 15, "random_state": 7}
    assert fake_umap["shape"] == (80, 50)


def test_pca_projection_gives_the_top_two_principal_components():
    rng = np.random.default_rng(1)
    embedding = rng.normal(size=(50, 4)) * np.array([10.0, 3.0, 0.1, 0.1])
    coordinates, method = project_embedding(embedding, method="pca")
    assert method == "pca"
    variances = coordinates.var(axis=0)
    assert variances[0] > variances[1] > 1.0
    assert np.allclose(np.abs(np.corrcoef(coordinates[:, 0], embedding[:, 0])[0, 1]), 1.0, atol=1e-2)


def test_cells_without_a_finite_embedding_keep_nan_coordinates(fake_umap):
    embedding = np.random.default_rng(2).normal(size=(30, 5))
    embedding[[3, 7], 1] = np.nan
    embedding[11, 0] = np.inf
    coordinates, method = project_embedding(embedding, method="auto")
    assert method == "umap" and fake_umap["shape"] == (27, 27)
    assert np.isnan(coordinates[[3, 7, 11]]).all()
    assert np.isfinite(np.delete(coordinates, [3, 7, 11], axis=0)).all()


@pytest.mark.parametrize("embedding", [np.ones((30, 1)), np.full((30, 4), np.nan), np.ones((2, 4)), np.ones(30)])
def test_no_view_without_two_dimensions_or_three_finite_cells(embedding, caplog):
    with caplog.at_level(logging.WARNING, logger="scdrugmap.evaluate.projection"):
        assert project_embedding(embedding, method="pca") == (None, None)
    assert "no 2-D view" in caplog.text


def test_unknown_projection_is_refused():
    with pytest.raises(ConfigError, match="projection 'tsne'"):
        project_embedding(np.ones((5, 3)), method="tsne")  # type: ignore[arg-type]


def test_umap_functions_get_numba_disk_caching_once_per_module(monkeypatch):
    numba = pytest.importorskip("numba")
    from numba.core.dispatcher import Dispatcher

    cached = []
    monkeypatch.setattr(Dispatcher, "enable_caching", lambda self: cached.append(self.py_func.__qualname__))
    module = ModuleType("umap.stand_in")
    module.__file__ = __file__
    exec("import numba\n@numba.njit\ndef jitted(x):\n    return x + 1\n", module.__dict__)
    module.borrowed = numba.njit(lambda x: x)  # a function of another module, only imported here
    monkeypatch.setitem(sys.modules, "umap.stand_in", module)
    projection.cache_umap_compilation()
    projection.cache_umap_compilation()
    assert cached == ["jitted"]
    assert "umap.stand_in" in projection._CACHED_MODULES
    projection._CACHED_MODULES.discard("umap.stand_in")
